"""One run = one folder: config.json, metrics.jsonl, figures, checkpoint.pt and summary.json (SPEC.md).

Checkpoints are self-describing (model name and config, weights, optimizer, epoch, every RNG state) so a model can
be rebuilt without the training script, and they are written atomically (temp file + os.replace) so a crash while
saving leaves the previous checkpoint intact. Loading uses torch.load(weights_only=True): a checkpoint is data,
never code.
"""
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


class RunDir:
    """The run folder. Nothing is written until `start()` has checked that this start cannot clobber a run."""

    def __init__(self, path):
        self.path = path
        self.checkpoint_path = os.path.join(path, CHECKPOINT)
        self.metrics_path = os.path.join(path, 'metrics.jsonl')

    def file(self, name):
        return os.path.join(self.path, name)

    def start(self, config, resume):
        """Check the folder against --resume; on a fresh start write config.json. Returns the checkpoint or None.

        A fresh start refuses a folder that already holds a checkpoint (it would be overwritten); a resume needs
        one, and refuses one that is unreadable or was made by another model or model config.
        """
        if resume:
            if not os.path.exists(self.checkpoint_path):
                raise UserError(f'--resume: no checkpoint at {self.checkpoint_path}; '
                                f'start without --resume, or point --out-dir at the run to continue')
            ckpt = load_checkpoint(self.checkpoint_path)
            if ckpt['model_name'] != config['model'] or ckpt['model_config'] != config['model_config']:
                raise UserError(f'--resume: {self.checkpoint_path} holds a {ckpt["model_name"]} with config '
                                f'{ckpt["model_config"]}, but this run asks for a {config["model"]} with '
                                f'{config["model_config"]}; use the same model flags or another --out-dir')
            self.truncate_metrics(ckpt['epoch'])
            self.write_json('config.json', config)
            return ckpt
        if os.path.exists(self.checkpoint_path):
            raise UserError(f'{self.path} already holds a run (checkpoint.pt); pass --resume to continue it, '
                            f'or choose another --out-dir')
        os.makedirs(self.path, exist_ok=True)
        if os.path.exists(self.metrics_path):
            os.remove(self.metrics_path)  # a fresh run's log must not continue an aborted run's rows
        self.write_json('config.json', config)
        return None

    def write_json(self, name, obj):
        tmp = self.file(name + '.tmp')
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=2, default=str)
            f.write('\n')
        os.replace(tmp, self.file(name))

    def log_metrics(self, row):
        with open(self.metrics_path, 'a') as f:
            f.write(json.dumps(row) + '\n')

    def read_metrics(self):
        if not os.path.exists(self.metrics_path):
            return []
        with open(self.metrics_path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_metrics(self, epoch):
        """Keep the rows up to `epoch`: rows logged after the last checkpoint belong to lost work."""
        rows = [r for r in self.read_metrics() if r['epoch'] <= epoch]
        tmp = self.metrics_path + '.tmp'
        with open(tmp, 'w') as f:
            f.writelines(json.dumps(r) + '\n' for r in rows)
        os.replace(tmp, self.metrics_path)

    def save_checkpoint(self, **state):
        save_checkpoint(self.checkpoint_path, **state)

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


def make_config(args, model, model_config, device, command):
    """config.json's content: every command-line setting plus what is needed to reproduce the run."""
    return {
        'model': model,
        'model_config': model_config,
        'args': vars(args),
        'command': command,
        'git_commit': git_commit(),
        'torch_version': torch.__version__,
        'python_version': platform.python_version(),
        'device': str(device),
        'device_name': device_description(device),
        'started': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
    }


def open_run(args, model, model_config, device, command):
    """Make config.json's content, print it (minGPT style) and start the run folder: (run, config, ckpt or None)."""
    run = RunDir(args.out_dir)
    config = make_config(args, model, model_config, device, command)
    print(json.dumps(config, indent=2, default=str))
    return run, config, run.start(config, args.resume)


def save_checkpoint(path, *, model_name, model_config, model, optimizer, epoch, extra=None):
    """Write atomically: a reader (or a crash) never sees a half-written checkpoint.pt."""
    state = {
        'format': CHECKPOINT_FORMAT,
        'model_name': model_name,
        'model_version': MODEL_VERSIONS.get(model_name, 1),
        'model_config': model_config,
        'model': model.state_dict(),
        'optimizer': optimizer.state_dict(),
        'epoch': epoch,
        'rng': rng_state(),
        'extra': extra or {},
    }
    tmp = path + '.tmp'
    torch.save(state, tmp)
    os.replace(tmp, path)


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
