"""One run = one folder: config.json, metrics.jsonl, figures, checkpoint.pt and summary.json.

The folder's files are described in docs/operations.md, "The run folder".

Checkpoints are self-describing (model name and config, weights, optimizer, epoch, every RNG state) so a model can
be rebuilt without the training script, and they are written atomically (temp file + os.replace) so a crash while
saving leaves the previous checkpoint intact. Loading uses torch.load(weights_only=True): a checkpoint is data,
never code.
"""
import argparse
import contextlib
import errno
import functools
import io
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from . import UserError

CHECKPOINT = 'checkpoint.pt'
CHECKPOINT_FORMAT = 'studylib-checkpoint-v1'
# The architecture version of each model a checkpoint records, bumped when the same model config builds other
# weights. ddpm 2: the template's U-Net, whose ResnetBlocks add the time embedding (version 1, before 2026-11-30,
# scaled and shifted by it: other tensor shapes). A checkpoint without the field is version 1.
MODEL_VERSIONS = {'vae': 1, 'ddpm': 2, 'simsiam': 1}
OLD_MODEL_HELP = {'ddpm': ('its U-Net conditions on time by scale/shift, while the course template (and this code) '
                           'adds the time embedding')}


@functools.lru_cache(maxsize=1)
def git_commit():
    """The code version: the commit hash, with '-dirty' when the tree has uncommitted changes; None outside git.
    Read once per process (cached): every configuration of a long SimSiam experiment records the code the process
    started with, not whatever the tree holds when that configuration begins."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=here, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ('-dirty' if dirty else '')) if sha else None


def pick_device(name):
    """'auto' -> cuda when available else cpu; 'cuda' without a GPU is a user error, not a silent fallback."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name == 'cuda' and not torch.cuda.is_available():
        raise UserError('--device cuda was asked for but torch sees no CUDA GPU; use --device cpu or auto')
    return torch.device(name)


def device_description(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f'cpu ({platform.processor() or platform.machine()}, {threads} thread{"s" if threads > 1 else ""})'


def seed_everything(seed):
    """Seed every generator. STUDYLIB_DETERMINISTIC=1 (the GPU check's resume test) also switches on torch's
    deterministic algorithms (warn_only: an op without a deterministic version warns instead of failing) and
    deterministic cuDNN; CUDA matmuls then need CUBLAS_WORKSPACE_CONFIG=:4096:8 set before the process starts."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if os.environ.get('STUDYLIB_DETERMINISTIC') == '1':
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def rng_state():
    """Every global RNG state, in types torch.load(weights_only=True) accepts.

    'cuda' holds ONE state: the generator of this process's current GPU (empty without CUDA). Under torchrun every
    rank draws the same random numbers (each step's draws are made for the global batch, EpochLoop), so the
    writing rank's state is every rank's; saving every visible GPU's state instead would hand rank r the state of
    a GPU that rank 0 never drew on."""
    np_state = np.random.get_state()
    return {
        'python': random.getstate(),
        'numpy': [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        'torch': torch.get_rng_state(),
        'cuda': [torch.cuda.get_rng_state(torch.cuda.current_device())] if torch.cuda.is_available() else [],
    }


def set_rng_state(state):
    """Restore rng_state()'s states; the CUDA one goes to this process's current GPU, whichever rank it is and
    however many GPUs are visible (a checkpoint of older code, which listed every visible GPU, gives its first:
    the GPU its writer drew on)."""
    random.setstate(_as_tuples(state['python']))
    kind, keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'][0], torch.cuda.current_device())


def _as_tuples(x):
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# Flags a resumed run may change whatever the driver: where and how fast it runs. Each driver adds its own
# (RESUMABLE in the driver: what it reports, not what it trains); every other flag defines the training itself
# (lr, batch, images, seed, model and recipe flags...): a resume with another value is refused, since the
# checkpoint would silently keep the old one while config.json recorded the new.
RESUMABLE_COMMON = frozenset({'epochs', 'resume', 'out_dir', 'data_dir', 'no_download', 'device',
                              'checkpoint_every', 'allow_nan', 'amp', 'compile', 'tensorboard'})


class _Claim:
    """A folder this process holds: its open .lock file, and what the claim created (removed again at release
    when nothing else was written, so that a refused command leaves the folder as it found it)."""

    def __init__(self, path, lock_file, created_lock, created_dir):
        self.path, self.lock_file, self.created_lock, self.created_dir = path, lock_file, created_lock, created_dir


_CLAIMS = {}   # real path -> _Claim of this process: the kernel drops the locks when it exits, however it exits


def _fail(flag, path, exc):
    return UserError(f'{flag} {path} cannot be written ({exc.strerror or exc}): choose another {flag}, or fix its '
                     f'permissions or free space')


def _refuse_run(path, flag, resumable):
    """A fresh start never replaces a finished run (summary.json) nor an unfinished one (checkpoint.pt)."""
    summary = read_summary(path)
    if summary is not None:
        raise UserError(f'{path} holds a finished {summary.get("model", "")} run (summary.json): choose another '
                        f'{flag}, or delete that folder to redo it')
    if os.path.exists(os.path.join(path, CHECKPOINT)):
        hint = 'pass --resume to continue it, or ' if resumable else ''
        raise UserError(f'{path} holds an unfinished run ({CHECKPOINT}): {hint}choose another {flag}')


def claim_folder(path, *, fresh, flag='--out-dir', inputs=(), members=(), resumable=True):
    """The one check before a command writes into a folder, then its claim. Refused, with one line and nothing
    written: an empty name, a file, one of the command's input folders (`inputs`: (flag, path) pairs, compared by
    real path), and for a fresh start (`fresh`) a folder, or one of its `members` sub-folders, that holds a run
    (the refusal suggests --resume when the command has one: `resumable`).
    Then the folder is made, proven writable and locked for the life of this process (a second command into it is
    refused); release_locks() undoes what the claim made when nothing else was written there."""
    if not path or not str(path).strip():
        raise UserError(f'{flag} is empty: name the folder to write into')
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f'{flag} {path} is a file, not a folder: choose another {flag}')
    real = os.path.realpath(path)
    for given_flag, run in inputs:
        if os.path.realpath(run) == real:
            given = f' ({given_flag})' if given_flag else ''
            raise UserError(f'{flag} {path} is the input run folder {run}{given}: writing there would replace its '
                            f'summary.json and config.json; choose another {flag}')
    if fresh:
        for folder in (path, *members):
            _refuse_run(folder, flag, resumable)
    if real in _CLAIMS:   # this process holds it already
        return
    created = not os.path.exists(path)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f'.write-test-{os.getpid()}')
        with open(probe, 'w') as f:
            f.write('ok')
        os.remove(probe)
    except OSError as exc:
        raise _fail(flag, path, exc) from exc
    lock_dir(path, flag, created_dir=created)
    if fresh:
        _refuse_run(path, flag, resumable)   # again under the lock: another process may have finished into it meanwhile


def lock_dir(path, flag='--out-dir', created_dir=False):
    """An exclusive lock on the folder for the life of this process (fcntl.flock on its .lock file): a second run
    started into the same folder is refused; a killed process holds nothing, since the kernel drops its locks."""
    import fcntl
    key = os.path.realpath(path)
    if key in _CLAIMS:
        return _CLAIMS[key].lock_file
    lock_path = os.path.join(path, '.lock')
    while True:
        created_lock = not os.path.exists(lock_path)
        try:
            f = open(lock_path, 'a+')
        except OSError as exc:
            raise _fail(flag, path, exc) from exc
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or 'another process'
            f.close()
            raise UserError(f'{path} is in use by {holder}: wait for that run to end, or choose another '
                            f'{flag}') from None
        try:   # the holder we waited on may have removed the file at its release: lock the file that is there
            same = os.stat(lock_path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    f.seek(0)
    f.truncate()
    f.write(f'process {os.getpid()} on {platform.node()}\n')
    f.flush()
    _CLAIMS[key] = _Claim(path, f, created_lock, created_dir)
    return f


def release_locks():
    """Drop this process's folder claims (at the end of a command's main(), however it ends, so that a second
    main() in the same process, as the tests run them, can open the folder again). A .lock file the claim made is
    removed, while still held, and so is a folder it made that holds nothing else. Open TensorBoard logs are
    flushed and closed first."""
    while _OPEN_BOARDS:
        _OPEN_BOARDS[-1].close()
    while _CLAIMS:
        claim = _CLAIMS.popitem()[1]
        lock_path = os.path.join(claim.path, '.lock')
        try:
            if claim.created_lock:
                os.remove(lock_path)
            if claim.created_dir and not os.listdir(claim.path):
                os.rmdir(claim.path)
        except OSError:
            pass   # a folder made read-only meanwhile keeps them: harmless, the lock is free once closed
        claim.lock_file.close()


def _kind_of(value):
    return {dict: 'an object', list: 'a list', str: 'a string', bool: 'a boolean', type(None): 'null',
            int: 'an integer', float: 'a number'}.get(type(value), type(value).__name__)


def read_summary(path, hint=None):
    """A run folder's summary.json, checked to be a run summary: {"model": str, "figures": {id: [file, ...]},
    "metrics": {...}, "run": {...} (optional)}. Without one: None, or with `hint` (what the folder should have
    been) one line. Every problem is one line naming the file (and the key)."""
    summary_path = os.path.join(path, 'summary.json')
    if hint is not None and not os.path.isdir(path):
        raise UserError(f'{path} is not a folder: {hint}')
    if not os.path.exists(summary_path):
        if hint is None:
            return None
        raise UserError(f'{path} has no summary.json: {hint}')
    try:
        with open(summary_path, encoding='utf-8') as f:
            summary = json.load(f)
    except (OSError, ValueError) as exc:   # ValueError: not JSON, not UTF-8
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        raise UserError(f'{summary_path} is unreadable or not JSON ({type(exc).__name__}: {why}); repair it or '
                        f'rerun the run that wrote it') from exc
    fix = 'repair it or rerun the run that wrote it'
    if not isinstance(summary, dict):
        raise UserError(f'{summary_path} is not a run summary: it holds {_kind_of(summary)}, not an object with '
                        f'"model", "figures" and "metrics"; {fix}')
    for key in ('model', 'figures', 'metrics'):
        if key not in summary:
            raise UserError(f'{summary_path} is not a run summary: it has no "{key}"; {fix}')
    if not isinstance(summary['model'], str) or not summary['model']:
        raise UserError(f'{summary_path} is not a run summary: "model" is {_kind_of(summary["model"])}, not a '
                        f'model name; {fix}')
    for key in ('figures', 'metrics', 'run'):
        if key in summary and not isinstance(summary[key], dict):
            raise UserError(f'{summary_path} is not a run summary: "{key}" is {_kind_of(summary[key])}, not an '
                            f'object; {fix}')
    for qid, names in summary['figures'].items():
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise UserError(f'{summary_path} is not a run summary: "figures"."{qid}" is {_kind_of(names)}, not a '
                            f'list of file names; {fix}')
    return summary


class RunDir:
    """The run folder. Nothing is written until `start()` has checked that this start cannot clobber a run."""

    def __init__(self, path):
        self.path = path
        self.checkpoint_path = os.path.join(path, CHECKPOINT)
        self.metrics_path = os.path.join(path, 'metrics.jsonl')
        self.args = None

    def file(self, name):
        return os.path.join(self.path, name)

    def start(self, config, resume, resumable=RESUMABLE_COMMON):
        """Check the folder against --resume (claim_folder's rules, then the checkpoint's); write config.json.
        Returns the checkpoint or None.

        Everything is checked before anything is written: a fresh start refuses a folder that holds a run; a resume
        needs a checkpoint of the same model, model config and training flags (only `resumable` ones may change).
        The folder stays locked until this process ends.
        """
        if not self.path or not str(self.path).strip():
            raise UserError('--out-dir is empty: name the folder to write into')
        self.args = dict(config.get('args', {}))
        ckpt = None
        if resume:
            if not os.path.exists(self.checkpoint_path):
                raise UserError(f'--resume: no checkpoint at {self.checkpoint_path}; '
                                f'start without --resume, or point --out-dir at the run to continue')
            ckpt = load_checkpoint(self.checkpoint_path)
            if ckpt['model_name'] != config['model'] or ckpt['model_config'] != config['model_config']:
                raise UserError(f'--resume: {self.checkpoint_path} holds a {ckpt["model_name"]} with config '
                                f'{ckpt["model_config"]}, but this run asks for a {config["model"]} with '
                                f'{config["model_config"]}; use the same model flags or another --out-dir')
            self.check_same_flags(self.args, resumable, saved=ckpt.get('args'))
        claim_folder(self.path, fresh=not resume)
        if resume:
            self.truncate_metrics(ckpt['epoch'])
        else:   # a fresh run's log and curves must not continue an aborted run's
            if os.path.exists(self.metrics_path):
                os.remove(self.metrics_path)
            shutil.rmtree(self.file(BOARD_DIR), ignore_errors=True)
        self.write_json('config.json', config)
        return ckpt

    def check_same_flags(self, args, resumable, saved=None):
        """A --resume keeps the run's training flags: refuse `args` (a dict) when one outside `resumable` differs
        from what the run recorded (`saved`: the checkpoint's flags, else config.json's). A flag that only one
        side knows (added or removed by a later version of the code) is not compared."""
        if saved is None:   # a finished run, or a checkpoint of older code: config.json holds the flags
            try:
                with open(self.file('config.json')) as f:
                    saved = json.load(f).get('args')
            except (OSError, ValueError):
                saved = None
        if not isinstance(saved, dict):
            print(f'note: {self.path} records no training flags; --resume cannot check that they are unchanged')
            return
        changed = [k for k in sorted(set(saved) & set(args)) if k not in resumable and saved[k] != args[k]]
        if changed:
            what = ', '.join(f'--{k.replace("_", "-")} {args[k]} (the run has {saved[k]})' for k in changed)
            raise UserError(f'--resume with other training flags: {what}; a resumed run keeps its own: drop or '
                            f'restore them, or start a new run in another --out-dir')

    def write_json(self, name, obj):
        write_atomically(self.file(name), (json.dumps(obj, indent=2, default=str) + '\n').encode())

    def save_samples(self, images, name='samples.npz'):
        """Final samples (N, 3, H, W) in [-1, 1] as samples.npz: uint8 (N, H, W, 3) under 'arr_0', the layout
        openai/guided-diffusion's evaluation suite reads, so that any evaluator can score them its own way."""
        pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        buffer = io.BytesIO()
        np.savez(buffer, pixels.permute(0, 2, 3, 1).numpy())   # (N, H, W, 3)
        write_atomically(self.file(name), buffer.getvalue())
        return self.file(name)

    def log_metrics(self, row):
        try:
            with open(self.metrics_path, 'a') as f:
                f.write(json.dumps(row) + '\n')
        except OSError as exc:
            raise UserError(f'could not write {self.metrics_path}: {exc.strerror or exc}; free space or choose '
                            f'another --out-dir, then rerun with --resume') from exc

    def read_metrics(self):
        """The logged rows; a line cut short (a crash while appending) or garbled is skipped with a note."""
        if not os.path.exists(self.metrics_path):
            return []
        rows = []
        with open(self.metrics_path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    row = None
                if isinstance(row, dict) and isinstance(row.get('epoch'), int):
                    rows.append(row)
                else:
                    print(f'note: {self.metrics_path} line {number} is not a metrics row; skipped')
        return rows

    def truncate_metrics(self, epoch):
        """Keep the rows up to `epoch`: rows logged after the last checkpoint belong to lost work."""
        rows = [r for r in self.read_metrics() if r['epoch'] <= epoch]
        write_atomically(self.metrics_path, ''.join(json.dumps(r) + '\n' for r in rows).encode())

    def save_checkpoint(self, **state):
        args = self.args or {}
        save_checkpoint(self.checkpoint_path, args=args, check_finite=not args.get('allow_nan', False), **state)

    def provenance(self):
        """How the run was made, from its config.json, so that a reader of summary.json alone can cite it."""
        path = self.file('config.json')
        if not os.path.exists(path):
            return {}
        with open(path) as f:
            config = json.load(f)
        return {k: config[k] for k in PROVENANCE_KEYS if k in config}

    def write_summary(self, model, figures, metrics):
        """summary.json: what the report builder reads. Figures live in the run folder, named relative to it."""
        figures = {qid: [os.path.basename(p) for p in figures[qid]] for qid in sorted(figures)}
        self.write_json('summary.json', {'model': model, 'figures': figures, 'metrics': metrics,
                                         'run': self.provenance()})
        print(json.dumps(metrics, indent=2))
        print(f'run folder: {self.path}')


BOARD_DIR = 'tb'
_OPEN_BOARDS = []   # closed by release_locks(), at the end of a command however it ends


def require_tensorboard():
    """--tensorboard without the optional tensorboard package: one line, before anything is loaded or written."""
    try:
        from torch.utils.tensorboard import SummaryWriter   # noqa: F401 (torch's writer needs the package)
    except ImportError:
        raise UserError('--tensorboard needs the tensorboard package, which is not installed: pip install '
                        'tensorboard (or requirements-test.txt), or drop --tensorboard') from None


class Board:
    """Live curves and grids for TensorBoard (--tensorboard): one event log at <run folder>/tb, written by rank 0.

    One step axis per run: the optimizer steps, counted from the first (a resume continues the count, which the
    checkpoint holds). Tags: train/loss (each step's training loss; under torchrun rank 0's share of the batch) and
    train/lr (the first parameter group's); epoch/<key> (every number of the epoch's metrics.jsonl row, at the step
    that ends the epoch; SimSiam's epoch 0 at step 0); figures/<file> (each grid the driver saves, the file name
    without its _epochNNN, so that TensorBoard's slider walks the epochs); summary/<key> (summary.json's numbers).
    A resumed run's writer purges what was logged after its checkpoint (purge_step)."""
    FLUSH_EVERY = 50   # per-step losses stay on the device and are read in blocks: no host sync in a step

    def __init__(self, path, purge_step=None):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(path, purge_step=purge_step, flush_secs=30)
        self.pending, self.shown = [], set()   # (step, loss tensor, lr) not written yet; figures written
        _OPEN_BOARDS.append(self)

    def step(self, step, loss, lr):
        self.pending.append((step, loss.detach(), lr))
        if len(self.pending) >= self.FLUSH_EVERY:
            self.flush()

    def flush(self):
        if self.pending:
            losses = torch.stack([loss.float().reshape(()) for _, loss, _ in self.pending]).tolist()
            for (step, _, lr), loss in zip(self.pending, losses):
                self.writer.add_scalar('train/loss', loss, step)
                self.writer.add_scalar('train/lr', lr, step)
            self.pending = []
        self.writer.flush()

    def scalars(self, prefix, values, step):
        """Every number of `values` (a metrics row or summary) as prefix/<key>; other values are not curves."""
        self.flush()
        for key, value in values.items():
            if key != 'epoch' and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f'{prefix}/{key}', value, step)
        self.writer.flush()

    def figures(self, paths, step):
        """The PNGs not shown yet, as images: the figure as saved, with its title and labels."""
        from matplotlib.image import imread
        for path in paths:
            if path in self.shown:
                continue
            self.shown.add(path)
            tag = re.sub(r'_epoch\d+$', '', os.path.splitext(os.path.basename(path))[0])
            self.writer.add_image(f'figures/{tag}', imread(path)[..., :3], step, dataformats='HWC')   # drop alpha
        self.writer.flush()

    def close(self):
        self.flush()
        self.writer.close()
        if self in _OPEN_BOARDS:
            _OPEN_BOARDS.remove(self)


PROVENANCE_KEYS = ('command', 'device_name', 'git_commit', 'torch_version', 'started', 'args')


def time_metrics(rows):
    """Training-time totals of a metrics log whose rows carry 'seconds'."""
    total = sum(r['seconds'] for r in rows)
    return dict(train_seconds_total=total, seconds_per_epoch_mean=total / len(rows))


def make_config(args, model, model_config, device, command, constants=None):
    """config.json's content, exactly what ran: the effective value of every flag (args: a dict, or argparse's
    namespace, after the recipe set the defaults), the driver's fixed hyperparameters that are no flag
    (`constants`), and what is needed to reproduce the run."""
    return {
        'model': model,
        'model_config': model_config,
        'args': dict(args) if isinstance(args, dict) else vars(args),
        'constants': constants or {},
        'command': command,
        'git_commit': git_commit(),
        'torch_version': torch.__version__,
        'python_version': platform.python_version(),
        'device': str(device),
        'device_name': device_description(device),
        'started': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
    }


def save_checkpoint(path, *, model_name, model_config, model, optimizer, epoch, extra=None, args=None,
                    check_finite=True):
    """Write atomically: a reader (or a crash) never sees a half-written checkpoint.pt. Non-finite weights are
    refused (check_finite; the loss guard alone misses the last step's update, e.g. with an infinite lr), and a
    failed write (a full disk, a read-only mount) is one line with the previous checkpoint intact."""
    weights = model.state_dict()
    if check_finite:
        bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            which = bad[0] + (' and others' if len(bad) > 1 else '')
            raise UserError(f'the weights became non-finite in epoch {epoch + 1} ({which}); '
                            f'the previous checkpoint is kept: rerun with a lower --lr, or --allow-nan to train '
                            f'on regardless')
    state = {
        'format': CHECKPOINT_FORMAT,
        'model_name': model_name,
        'model_version': MODEL_VERSIONS.get(model_name, 1),
        'model_config': model_config,
        'model': weights,
        'optimizer': optimizer.state_dict(),
        'epoch': epoch,
        'rng': rng_state(),
        'args': args,
        'extra': extra or {},
    }
    buffer = io.BytesIO()   # serialised in memory first: a write error is then an OSError with its errno
    torch.save(state, buffer)
    write_atomically(path, buffer.getbuffer())


def write_atomically(path, data, fix='free space or choose another --out-dir, then rerun with --resume'):
    """data (bytes) to path through a temp file, fsync and os.replace. On any failure, an interrupt included, the
    temp file is removed and the old file kept; an OSError (no space left, read-only file system, ...) becomes one
    line naming the file, the cause and `fix`."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise UserError(f'could not write {path}: {exc.strerror or exc}; the previous version (if any) is '
                            f'kept: {fix}') from exc
        raise


def load_checkpoint(path):
    """Read a checkpoint written by save_checkpoint; anything else is refused with one line."""
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:  # truncated zip, random bytes, pickled code: all land here
        raise UserError(f'checkpoint {path} is unreadable, truncated or not a checkpoint '
                        f'({type(exc).__name__}); it was left untouched: delete it to start over') from exc
    if not isinstance(ckpt, dict) or ckpt.get('format') != CHECKPOINT_FORMAT:
        raise UserError(f'{path} is not a checkpoint of this project (no {CHECKPOINT_FORMAT} marker); '
                        f'it was left untouched')
    name, version = ckpt.get('model_name'), ckpt.get('model_version', 1)
    expected = MODEL_VERSIONS.get(name, 1)
    if version != expected:
        why = OLD_MODEL_HELP.get(name, 'its architecture is not the one this code builds') if version < expected \
            else 'it was written by newer code'
        raise UserError(f'{path} holds a {name} checkpoint of model version {version}, this code builds version '
                        f'{expected} ({why}); it cannot be resumed or loaded: retrain in another --out-dir '
                        f'(the file was left untouched)')
    return ckpt


def restore(ckpt, model, optimizer=None):
    """Load weights (and optimizer, RNG states) from a checkpoint dict; mismatched weights -> UserError."""
    try:
        model.load_state_dict(ckpt['model'])
        if optimizer is not None:
            load_optimizer_state(optimizer, ckpt['optimizer'])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise UserError(f'checkpoint weights do not fit the model ({str(exc).splitlines()[0]}); '
                        f'it was left untouched') from exc
    set_rng_state(ckpt['rng'])


# Implementation choices, not state: load_state_dict copies them from the checkpoint's param groups, so a run
# started on the CPU (foreach) and resumed on a GPU would lose its fused kernels, or the other way round fail.
KERNEL_OPTIONS = ('fused', 'foreach', 'capturable', 'differentiable')


def load_optimizer_state(optimizer, state):
    """optimizer.load_state_dict, keeping this optimizer's kernel options (KERNEL_OPTIONS) as constructed."""
    chosen = [{k: g[k] for k in KERNEL_OPTIONS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, options in zip(optimizer.param_groups, chosen):
        group.update(options)


def load_trained(run_dir, model_name, flag):
    """The checkpoint of a finished run folder of `model_name`, or one line saying what `flag` should point at."""
    path = RunDir(run_dir).checkpoint_path
    if not os.path.exists(path):
        raise UserError(f'{flag} {run_dir}: no checkpoint.pt there; pass a {model_name} run folder')
    ckpt = load_checkpoint(path)
    if ckpt['model_name'] != model_name:
        raise UserError(f'{flag} {run_dir}: that folder holds a {ckpt["model_name"]} run, not a {model_name} run')
    return ckpt


# ---- the command line every command shares, and user errors as one line -----------------------------------------

def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {text}')
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be 0 or a positive integer, got {text}')
    return value


def positive_float(text):
    value = float(text)
    if not (value > 0 and math.isfinite(value)):  # refuses nan and inf too
        raise argparse.ArgumentTypeError(f'must be a positive finite number, got {text}')
    return value


def seed_int(text):
    """numpy seeds 0 <= seed < 2**32: refused here rather than by a numpy traceback."""
    value = int(text)
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f'must be an integer from 0 to 2**32 - 1, got {text}')
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' for flags that have a value by default; not for switches or unset options."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def make_parser(description, out_dir, lr_help='learning rate'):
    """A parser holding the common flags; the driver sets their defaults from its hyperparameter block
    (parse_with_recipe)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    common = parser.add_argument_group('common to every driver')
    common.add_argument('--data-dir', default='./data',
                        help='folder holding the standard dataset files, or where torchvision downloads them')
    common.add_argument('--no-download', action='store_true',
                        help='never touch the network: exit at once if a dataset file is missing')
    common.add_argument('--out-dir', default=out_dir, help='the run folder (config, metrics, figures, checkpoint)')
    common.add_argument('--epochs', type=positive_int, help='training epochs')
    common.add_argument('--batch-size', type=positive_int, help='training batch size')
    common.add_argument('--lr', type=positive_float, help=lr_help)
    common.add_argument('--seed', type=seed_int, default=0, help='seed of every random number generator')
    common.add_argument('--device', choices=['auto', 'cpu', 'cuda'], default='auto',
                        help='where to train; auto = cuda when available')
    common.add_argument('--limit-train', type=positive_int, default=None, metavar='N',
                        help='use only the first N training images (smoke tests, CPU runs); all when unset')
    common.add_argument('--limit-test', type=positive_int, default=None, metavar='N',
                        help='use only the first N test images; all when unset')
    common.add_argument('--resume', action='store_true',
                        help="continue from the run folder's checkpoint (after its last finished epoch)")
    common.add_argument('--checkpoint-every', type=non_negative_int, default=500, metavar='STEPS',
                        help='also checkpoint every STEPS optimizer steps inside an epoch (0: only at epoch ends); '
                             'Ctrl-C / SIGTERM checkpoint at the current step too; --resume continues exactly there')
    common.add_argument('--allow-nan', action='store_true',
                        help='train on through non-finite losses (by default the run stops, naming the step, and '
                             'keeps the last good checkpoint)')
    common.add_argument('--tensorboard', action='store_true',
                        help='also log live curves and grids for TensorBoard into OUT_DIR/tb (needs the tensorboard '
                             'package); watch with: tensorboard --logdir runs')
    common.add_argument('--amp', choices=['auto', 'on', 'off'], default='auto',
                        help='bf16 autocast of the training step; auto = on for a CUDA GPU with bf16, off on the CPU')
    common.add_argument('--compile', action='store_true',
                        help='torch.compile the training step (a minute of compilation first; pays off on long runs)')
    return parser


def recipe_help(recipes):
    """--recipe's help: what each recipe sets (the values of RECIPES, the one place they are declared)."""
    def value(v):
        return f'({v[0]:g}, {v[1]:g})' if isinstance(v, (tuple, list)) else str(v)
    return '; '.join(f'{name}: ' + (', '.join(f'{k.replace("_", "-")} {value(v)}' for k, v in changes.items())
                                    or "the block's defaults") for name, changes in recipes.items())


def parse_with_recipe(parser, argv, defaults, recipes=None):
    """The effective configuration: the driver's hyperparameter block (`defaults`), changed by the recipe, which
    is read first and sets the parser's defaults, so that a flag given on the command line wins and --help shows
    the chosen recipe's values. A recipe's value that is no flag (SimSiam's encoder) becomes a setting of the
    namespace all the same, recorded in config.json with the flags."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser.set_defaults(**defaults)
    if recipes:
        recipe = parser.parse_known_args([a for a in argv if a not in ('-h', '--help')])[0].recipe
        parser.set_defaults(**recipes[recipe])
    return parser.parse_args(argv)


# environment failures while writing: one line, like a user error (the message names the file)
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR,
                       errno.EISDIR}


@contextlib.contextmanager
def user_errors():
    """Turn a UserError (and a full disk, a read-only or forbidden path) into one line on stderr and exit status 2;
    Ctrl-C and SIGTERM/SIGHUP outside the training loop into one line and status 130; real bugs keep their
    traceback."""
    try:
        yield
    except UserError as exc:
        print(f'error: {exc}', file=sys.stderr)
        sys.exit(getattr(exc, 'exit_code', 2))
    except KeyboardInterrupt:
        print('error: interrupted; the last checkpoint (if any) is kept: rerun the same command with --resume to '
              'continue from it', file=sys.stderr)
        sys.exit(130)
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = f' {exc.filename}' if exc.filename else ''
        print(f'error: could not write{where}: {exc.strerror}; free space, fix the permissions or choose another '
              f'--out-dir, then rerun (with --resume when a checkpoint was saved)', file=sys.stderr)
        sys.exit(2)


def _stop(signum, frame):
    raise KeyboardInterrupt   # the training loop installs its own handlers, which checkpoint first


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM and SIGHUP end the process the way Ctrl-C does (one line, exit 130) wherever it is outside the
    training loop, instead of dying silently with 143 or leaving no line; the loop checkpoints on them."""
    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, _stop)
    except ValueError:   # not the main thread
        pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_tool(parser, work, argv=None):
    """A tool's main() (compare_ddpm.py, probe_ddpm.py): parse, then work(args, command) with user errors as one
    line, and the folder locks released however it ends. The command recorded in config.json is the parser's prog
    (the command as typed: `python compare_ddpm.py`) followed by the arguments."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    with user_errors():
        try:
            return work(args, shlex.join([*shlex.split(parser.prog), *argv]))
        finally:
            release_locks()
