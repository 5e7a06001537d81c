"""One run = one folder: config.json, metrics.jsonl, figures, checkpoint.pt and summary.json (docs/api.md).

Checkpoints are self-describing (model name and config, weights, optimizer, epoch, every RNG state) so a model can
be rebuilt without the training script, and they are written atomically (temp file + os.replace) so a crash while
saving leaves the previous checkpoint intact. Loading uses torch.load(weights_only=True): a checkpoint is data,
never code.
"""
import io
import json
import os
import platform
import random
import subprocess
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


def git_commit():
    """The code version: the commit hash, with '-dirty' when the tree has uncommitted changes; None outside git."""
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
    rank draws the same random numbers (each step's draws are made for the global batch, studylib.dist), so the
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


# Flags a resumed run may change: where and how fast it runs, what it reports. Every other flag defines the
# training itself (lr, batch, images, seed, model and recipe flags...): a resume with another value is refused,
# since the checkpoint would silently keep the old one while config.json recorded the new.
RESUMABLE_FLAGS = frozenset({
    'epochs', 'resume', 'out_dir', 'data_dir', 'no_download', 'device', 'checkpoint_every', 'allow_nan', 'amp',
    'compile', 'workers', 'loader', 'inception_fid', 'compare_vae', 'sample_every', 'num_samples', 'sampler',
    'sample_steps', 'clip_denoised', 't_primes', 'll_k', 'profile_per_class', 'experiment',
})

_LOCKS = {}   # folder -> open lock file of this process: the kernel releases them when it exits, however it exits


def prepare_out_dir(path, flag='--out-dir'):
    """Make the folder the user named and prove it can be written, before any work: one line when it cannot."""
    if not path or not str(path).strip():
        raise UserError(f'{flag} is empty: name the folder to write into')
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f'{flag} {path} is a file, not a folder: choose another {flag}')
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f'.write-test-{os.getpid()}')
        with open(probe, 'w') as f:
            f.write('ok')
        os.remove(probe)
    except OSError as exc:
        raise UserError(f'{flag} {path} cannot be written ({exc.strerror or exc}): choose another {flag}, or '
                        f'fix its permissions or free space') from exc


def lock_dir(path, flag='--out-dir'):
    """An exclusive lock on the folder for the life of this process (fcntl.flock on .lock): a second run started
    into the same folder is refused; a killed process holds nothing, since the kernel drops its locks."""
    import fcntl
    key = os.path.realpath(path)
    if key in _LOCKS:   # this process holds it already
        return _LOCKS[key]
    lock_path = os.path.join(path, '.lock')
    try:
        f = open(lock_path, 'a+')
    except OSError as exc:
        raise UserError(f'{flag} {path} cannot be written ({exc.strerror}): choose another {flag}') from exc
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or 'another process'
        f.close()
        raise UserError(f'{path} is in use by {holder}: wait for that run to end, or choose another {flag}') from None
    f.seek(0)
    f.truncate()
    f.write(f'process {os.getpid()} on {platform.node()}\n')
    f.flush()
    _LOCKS[key] = f
    return f


def release_locks():
    """Drop this process's folder locks (at the end of a driver's main(), so that a second main() in the same
    process, as the tests run them, can open the folder again)."""
    while _LOCKS:
        _LOCKS.popitem()[1].close()


def read_summary(path):
    """A folder's summary.json as a dict, None when there is none; one line when it is not a summary."""
    summary_path = os.path.join(path, 'summary.json')
    if not os.path.exists(summary_path):
        return None
    try:
        with open(summary_path) as f:
            summary = json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f'{summary_path} is unreadable or not JSON ({exc}); repair or remove it') from exc
    if not isinstance(summary, dict) or not isinstance(summary.get('metrics'), dict) \
            or not isinstance(summary.get('figures', {}), dict):
        raise UserError(f'{summary_path} is not a run summary (expected an object with "model", "figures" and '
                        f'"metrics"); repair or remove it')
    return summary


def refuse_finished(path, flag='--out-dir'):
    """Never replace a finished run: a folder whose summary.json exists holds one, checkpoint or not."""
    summary = read_summary(path)
    if summary is not None:
        raise UserError(f'{path} holds a finished {summary.get("model", "")} run (summary.json): choose another '
                        f'{flag}, or delete that folder to redo it')


class RunDir:
    """The run folder. Nothing is written until `start()` has checked that this start cannot clobber a run."""

    def __init__(self, path):
        self.path = path
        self.checkpoint_path = os.path.join(path, CHECKPOINT)
        self.metrics_path = os.path.join(path, 'metrics.jsonl')
        self.args = None

    def file(self, name):
        return os.path.join(self.path, name)

    def start(self, config, resume):
        """Check the folder against --resume; write config.json. Returns the checkpoint or None.

        Everything is checked before anything is written: the folder is writable and not in use by another run
        (a lock held until this process ends); a fresh start refuses a folder that holds a finished run
        (summary.json) or a checkpoint; a resume needs a checkpoint of the same model, model config and training
        flags (RESUMABLE_FLAGS may change).
        """
        if not self.path or not str(self.path).strip():
            raise UserError('--out-dir is empty: name the folder to write into')
        self.args = dict(config.get('args', {}))
        if resume:
            if not os.path.exists(self.checkpoint_path):
                raise UserError(f'--resume: no checkpoint at {self.checkpoint_path}; '
                                f'start without --resume, or point --out-dir at the run to continue')
            ckpt = load_checkpoint(self.checkpoint_path)
            if ckpt['model_name'] != config['model'] or ckpt['model_config'] != config['model_config']:
                raise UserError(f'--resume: {self.checkpoint_path} holds a {ckpt["model_name"]} with config '
                                f'{ckpt["model_config"]}, but this run asks for a {config["model"]} with '
                                f'{config["model_config"]}; use the same model flags or another --out-dir')
            self._check_resumed_flags(ckpt)
            prepare_out_dir(self.path)
            lock_dir(self.path)
            self.truncate_metrics(ckpt['epoch'])
            self.write_json('config.json', config)
            return ckpt
        self.refuse_fresh_start()
        prepare_out_dir(self.path)
        lock_dir(self.path)
        if os.path.exists(self.metrics_path):
            os.remove(self.metrics_path)  # a fresh run's log must not continue an aborted run's rows
        self.write_json('config.json', config)
        return None

    def refuse_fresh_start(self):
        """A fresh start never replaces a finished run (summary.json) nor an unfinished one (checkpoint.pt)."""
        refuse_finished(self.path)
        if os.path.exists(self.checkpoint_path):
            raise UserError(f'{self.path} already holds a run (checkpoint.pt); pass --resume to continue it, '
                            f'or choose another --out-dir')

    def _check_resumed_flags(self, ckpt):
        saved = ckpt.get('args')
        if saved is None:   # a checkpoint of older code: its run's config.json holds the flags
            try:
                with open(self.file('config.json')) as f:
                    saved = json.load(f).get('args')
            except (OSError, ValueError):
                saved = None
        if not isinstance(saved, dict):
            print(f'note: {self.path} records no training flags; --resume cannot check that they are unchanged')
            return
        changed = [k for k in sorted(set(saved) | set(self.args))
                   if k not in RESUMABLE_FLAGS and saved.get(k) != self.args.get(k)]
        if changed:
            what = ', '.join(f'--{k.replace("_", "-")} {self.args.get(k)} (the run has {saved.get(k)})'
                             for k in changed)
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


PROVENANCE_KEYS = ('command', 'device_name', 'git_commit', 'torch_version', 'started', 'args')


def time_metrics(rows):
    """Training-time totals of a metrics log whose rows carry 'seconds'."""
    total = sum(r['seconds'] for r in rows)
    return dict(train_seconds_total=total, seconds_per_epoch_mean=total / len(rows))


def make_config(args, model, model_config, device, command, hyperparameters=None):
    """config.json's content: every command-line setting (args: a dict, or argparse's namespace), the driver's
    hyperparameter block, and what is needed to reproduce the run."""
    return {
        'model': model,
        'model_config': model_config,
        'args': dict(args) if isinstance(args, dict) else vars(args),
        'hyperparameters': hyperparameters or {},
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
