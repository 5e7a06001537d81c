"""How the drivers train: processes and devices, the speed paths, one epoch, and the run that holds them.

    run = TrainingRun(ranks, args, config, RESUMABLE)   # opens (or resumes) --out-dir, prints the config
    model, optimizer = build(...)
    state = run.resume(model, optimizer, figures=[])    # restores weights, optimizer, RNG states, data order, state
    for epoch in run.epochs():
        loop = run.epoch_loop(epoch, len(train_x), num_sums=3)
        for idx in loop:                                # (B,) indices of this step's batch, on the device
            ... forward, backward, step ...
            loop.record(loss, sums)
        sums, seconds = loop.finish()
        with loop.end_of_epoch():
            ... evaluate, figures, run.log(row, figures) ...
            run.save(epoch)
    run.write_summary(model_name, figures, metrics)

The model's forward, backward and step stay in the driver. `run.state` holds what the driver keeps across epochs
(figure lists, timings): it is saved with every checkpoint and given back by resume(); a value that is a callable
(an EMA's state_dict) is called at save time.

Processes (torchrun): one per device, DistributedDataParallel, rank 0 the only writer.

    torchrun --nproc_per_node=4 train_simsiam.py ...      # 4 GPUs (nccl), or 4 CPU processes (gloo)

--batch-size stays the GLOBAL batch: every rank draws the same permutation and takes its contiguous slice of each
global batch, and a step's random numbers (noise, time steps, augmentation parameters) are drawn for the whole
global batch on every rank. With batch norm synchronised, N processes compute what one computes, up to the order
of float reductions; batch-dependent learning rates (SimSiam's 0.03 * batch / 256) use the global batch. Under
torchrun a last partial batch with fewer images than processes is skipped.

Speed: bf16 autocast (--amp), channels_last, fused or foreach optimiser kernels and torch.compile (--compile),
none of which changes what a step computes. channels_last and fused kernels are CUDA's choices;
STUDYLIB_SPEED_PATHS=all (for tests) takes them on the CPU too, so that the CPU suite runs every line a GPU run does.

Exact resume (EpochLoop): the epoch's permutation, the step reached, the running sums and seconds are saved every
--checkpoint-every steps and on Ctrl-C or SIGTERM, with every RNG state; --resume rebuilds the same permutation and
skips the steps done, so it ends with the weights of an uninterrupted run. An interrupt is acted on between two
steps (a second one stops at once), so a checkpoint never holds a half-done step. Non-finite losses are tracked on
the device and checked at each checkpoint and epoch end: the run stops with the step named, before a non-finite
state is saved, unless --allow-nan.
"""
import contextlib
import json
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from . import UserError
from .run import (BOARD_DIR, Board, RunDir, load_checkpoint, pick_device, release_locks, require_tensorboard, restore,
                  rng_state, set_rng_state, stop_on_signals, user_errors)


# ---- processes and devices (torchrun) -------------------------------------------------------------------------
@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device('cpu')

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world > 1


def setup(device_flag):
    """The process group when torchrun started this process (nccl on CUDA, gloo on the CPU), else one process."""
    try:
        world = int(os.environ.get('WORLD_SIZE', '1'))
    except ValueError:
        raise UserError(f'WORLD_SIZE={os.environ["WORLD_SIZE"]!r} is not a number: start with torchrun, or unset '
                        f'it') from None
    if world == 1:
        return Ranks(device=pick_device(device_flag))
    if 'RANK' not in os.environ:
        raise UserError(f'WORLD_SIZE={world} is set but RANK is not: start with torchrun, or unset WORLD_SIZE '
                        f'for a single process')
    rank, local_rank = int(os.environ['RANK']), int(os.environ.get('LOCAL_RANK', '0'))
    device = pick_device(device_flag)
    if device.type == 'cuda':
        if local_rank >= torch.cuda.device_count():
            raise UserError(f'local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): '
                            f'lower --nproc_per_node')
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return Ranks(rank, world, device)


def teardown(ranks):
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()


def check_batch(ranks, batch_size):
    if batch_size % ranks.world:
        raise UserError(f'--batch-size {batch_size} (the global batch) is not divisible by the {ranks.world} '
                        f'processes; each must get the same share')


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks, differentiable: the sum is used by every rank, so each input's gradient is the sum of
    every rank's gradient of it (DistributedDataParallel then averages the parameter gradients as usual)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose batch statistics are all-reduced over the ranks (torch's SyncBatchNorm is CUDA-only); the
    gradient flows through the all-reduced statistics."""

    def _check_input_dim(self, x):
        pass

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        stats = _AllReduceSum.apply(torch.cat([x.sum(dims), x.pow(2).sum(dims), count]))
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = stats[c:2 * c] / n - mean.pow(2)                          # biased, as batch norm normalises
        with torch.no_grad():
            self.num_batches_tracked += 1
            # momentum None: a cumulative average, as torch's batch norm
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1))   # unbiased, as batch norm keeps
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def sync_batchnorm(module, ranks):
    """Every batch norm of `module` synchronised across the ranks (torch's SyncBatchNorm on CUDA, ours on CPU)."""
    if ranks is None or not ranks.distributed:
        return module
    if ranks.device.type == 'cuda':
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            new = CPUSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.requires_grad_(any(p.requires_grad for p in child.parameters()) if child.affine else False)
            setattr(module, name, new)
        else:
            sync_batchnorm(child, ranks)
    return module


def wrap(model, ranks):
    """DistributedDataParallel over the ranks (the model itself keeps the weights and plain parameter names)."""
    if ranks is None or not ranks.distributed:
        return model
    ids = [ranks.device.index] if ranks.device.type == 'cuda' else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def all_sum(tensor, ranks):
    if ranks.distributed:
        dist.all_reduce(tensor)
    return tensor


def gather_rows(part, ranks):
    """Concatenate every rank's (n_r, ...) block in rank order (blocks may differ in length by one)."""
    if not ranks.distributed:
        return part
    sizes = [torch.zeros(1, dtype=torch.long, device=part.device) for _ in range(ranks.world)]
    dist.all_gather(sizes, torch.tensor([len(part)], device=part.device))
    longest = int(max(s.item() for s in sizes))
    padded = F.pad(part, [0, 0] * (part.dim() - 1) + [0, longest - len(part)])
    blocks = [torch.empty_like(padded) for _ in range(ranks.world)]
    dist.all_gather(blocks, padded)
    return torch.cat([b[:int(s.item())] for b, s in zip(blocks, sizes)])


def barrier(ranks):
    if ranks.distributed:
        dist.barrier()


# ---- speed paths ----------------------------------------------------------------------------------------------

def _gpu_paths(device):
    return device.type == 'cuda' or os.environ.get('STUDYLIB_SPEED_PATHS') == 'all'


def use_amp(amp, device):
    """bf16 autocast from the --amp value: auto turns it on on a CUDA GPU that supports bf16 and off on the CPU
    (where bf16 matmuls are emulated on most processors and slower than float32)."""
    if amp == 'auto':
        return device.type == 'cuda' and torch.cuda.is_bf16_supported()
    return amp == 'on'


def autocast(device, enabled):
    """The forward pass's precision context: bf16 needs no loss scaling (float32's exponent range)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def prepare_model(model, device, compile_model=False, wrap=None):
    """channels_last on CUDA (tensor-core convolutions want NHWC), then `wrap` (DistributedDataParallel under
    torchrun), then torch.compile when asked. Returns the module to call in the training step; `model` itself keeps
    the weights, so checkpoints and EMA see plain names."""
    if _gpu_paths(device):
        model = model.to(memory_format=torch.channels_last)
    if wrap is not None:
        model = wrap(model)
    return torch.compile(model) if compile_model else model


def optimizer_kwargs(device):
    """fused=True (one kernel for the whole update) on CUDA; the default foreach path elsewhere."""
    return {'fused': True} if _gpu_paths(device) else {}


def to_device_batch(x, device):
    """A batch onto the training device in the layout the model was prepared for."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if _gpu_paths(device) and x.dim() == 4 else x


# ---- one epoch ------------------------------------------------------------------------------------------------

SYNC_EVERY = 20   # under torchrun, ranks agree on a Ctrl-C every SYNC_EVERY steps (one tiny all_reduce)


class Interrupted(UserError):
    """Ctrl-C / SIGTERM after a checkpoint was written: exit status 130, as a shell reports an interrupted job."""
    exit_code = 130


class NonFiniteLoss(UserError):
    pass


class _StopFlag:
    """SIGINT/SIGTERM/SIGHUP set a flag instead of raising inside a step; a second signal raises at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            for sig in self._previous:
                signal.signal(sig, self._handle)
        except ValueError:   # not the main thread: signals cannot be caught here, leave them as they are
            self._previous = {}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class EpochLoop:
    def __init__(self, epoch, n, batch_size, order_rng, device, *, num_sums, mid=None, drop_last=False,
                 checkpoint_every=0, save=None, allow_nan=False, desc=None, ranks=None, on_step=None):
        """epoch: 1-based; mid: the checkpoint's mid-epoch state when it belongs to this epoch (then the order
        comes from it and order_rng is not drawn from again); ranks: under torchrun, this process's share
        (Ranks): every rank walks the same order and takes its contiguous slice of each global batch;
        on_step(step index, loss): called by record() after each step (the run's step count, TensorBoard)."""
        self.ranks = ranks or Ranks(device=torch.device(device))
        self.on_step = on_step
        self.epoch, self.batch_size, self.device = epoch, batch_size, device
        self.checkpoint_every, self.save, self.allow_nan, self.desc = checkpoint_every, save, allow_nan, desc
        if mid is not None and mid['epoch'] == epoch:
            self.order, self.start = mid['order'], mid['step']
            self.sums, self.elapsed = mid['sums'].to(device).clone(), mid['seconds']
            if self.ranks.rank > 0:   # the saved sums are every rank's together: rank 0 carries them on
                self.sums.zero_()
        else:
            self.order, self.start = torch.randperm(n, generator=order_rng), 0
            self.sums, self.elapsed = torch.zeros(num_sums, device=device), 0.0
        stop = n - n % batch_size if drop_last else n
        self.starts = list(range(0, stop, batch_size))
        if self.ranks.world > 1 and self.starts and stop - self.starts[-1] < self.ranks.world:
            # a last global batch of fewer images than processes leaves some rank with none, and no model trains
            # on an empty batch (batch norm, reshapes): under torchrun those few images sit this epoch out
            stop = self.starts.pop()
        self.images = stop   # the images this epoch visits: the denominator of per-image means
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.step = self.start

    def __len__(self):
        return len(self.starts)

    def state(self):
        """What a checkpoint must hold to continue this epoch at self.step (under torchrun: a collective call)."""
        sums = self.sums.detach().clone()
        if self.ranks.distributed:
            dist.all_reduce(sums)
        return dict(epoch=self.epoch, step=self.step, order=self.order, sums=sums.cpu(),
                    seconds=time.perf_counter() - self.t0)

    def __iter__(self):
        order = self.order.to(self.device)   # the whole permutation moves once per epoch
        self.t0 = time.perf_counter() - self.elapsed
        with _StopFlag() as stop:
            bar = tqdm(range(self.start, len(self.starts)), initial=self.start, total=len(self.starts),
                       desc=self.desc or f'epoch {self.epoch}', leave=False)
            for self.step in bar:
                if self.step > self.start and self._due(stop):
                    self._checkpoint(interrupted=stop.requested)
                idx = order[self.starts[self.step]:self.starts[self.step] + self.batch_size]
                self.global_batch = len(idx)
                bounds = [len(part) for part in torch.arange(len(idx)).tensor_split(self.ranks.world)]
                first = sum(bounds[:self.ranks.rank])
                # this rank's rows of the global batch: slice every per-image random draw of the step with it
                self.part = slice(first, first + bounds[self.ranks.rank])
                # DDP averages gradients over ranks; with unequal shares that is not the batch mean unless
                # each rank's mean loss is weighted by its share
                self.loss_scale = bounds[self.ranks.rank] * self.ranks.world / len(idx)
                yield idx[self.part]
            self.step = len(self.starts)
            if stop.requested:   # during the last step: save "every step done", resume finishes the epoch
                self._checkpoint(interrupted=True)

    def _due(self, stop):
        periodic = bool(self.checkpoint_every and self.step % self.checkpoint_every == 0)
        if not self.ranks.distributed:
            return stop.requested or periodic
        if self.step % SYNC_EVERY and not periodic:
            return False
        flag = torch.tensor([float(stop.requested)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)   # a signal seen by any rank stops all at the same step
        stop.requested = bool(flag.item())
        return stop.requested or periodic

    def _checkpoint(self, interrupted):
        self.check_finite()
        state = self.state()
        if self.save is not None and self.ranks.is_main:
            self.save(state)
        if self.ranks.distributed:
            dist.barrier()   # nobody runs (or exits) ahead of the checkpoint being on disk
        if interrupted:
            raise Interrupted(f'interrupted in epoch {self.epoch} after step {self.step} of {len(self.starts)}; '
                              f'a checkpoint was saved: rerun the same command with --resume to continue')

    def record(self, loss, sums):
        """After a step: add its sums (a tensor) and remember the first step whose loss is not finite."""
        self.sums += sums
        if self.on_step is not None:
            self.on_step(self.step, loss)
        if not self.allow_nan:
            bad = ~torch.isfinite(loss.detach())
            self.first_bad = torch.where((self.first_bad < 0) & bad, self.step, self.first_bad)

    def check_finite(self):
        bad = self.first_bad.clone()
        if self.ranks.distributed:   # the earliest bad step over all ranks: every rank stops together
            bad = torch.where(bad < 0, torch.iinfo(torch.long).max, bad)
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
            bad = torch.where(bad == torch.iinfo(torch.long).max, -1, bad)
        bad = int(bad)   # the one host sync, at checkpoints and epoch ends only
        if bad >= 0:
            raise NonFiniteLoss(f'the training loss became non-finite at epoch {self.epoch}, step {bad + 1} of '
                                f'{len(self.starts)}; the run stopped before saving it, so its last good checkpoint '
                                f'(if any) is kept: rerun with a lower --lr, or --allow-nan to train on regardless')

    def finish(self):
        """(sums over every rank, seconds) of the whole epoch, after checking that every loss was finite."""
        self.check_finite()
        if self.ranks.distributed:
            dist.all_reduce(self.sums)
        seconds = time.perf_counter() - self.t0
        # "every step done": what end_of_epoch() saves if the stage after the steps is interrupted
        self.done = dict(epoch=self.epoch, step=len(self.starts), order=self.order, sums=self.sums.detach().cpu(),
                         seconds=seconds)
        self.done_rng = rng_state()
        return self.sums, seconds

    @contextlib.contextmanager
    def end_of_epoch(self):
        """The stage after the steps (evaluation, sampling, figures, the log row). Ctrl-C, SIGTERM or SIGHUP there
        saves the epoch's finished training (with the random state it ended with, so a resume redoes this stage
        exactly) and exits 130 with one line, instead of losing the epoch."""
        try:
            yield
        except KeyboardInterrupt:
            if self.save is not None and self.ranks.is_main:
                set_rng_state(self.done_rng)
                self.save(self.done)
            raise Interrupted(f'interrupted after the training steps of epoch {self.epoch}; they were saved: rerun '
                              f'the same command with --resume to continue') from None


def resume_point(ckpt):
    """(first epoch to run, its mid-epoch state or None) of a checkpoint (None: a fresh run)."""
    if ckpt is None:
        return 1, None
    mid = ckpt['extra'].get('mid_epoch')
    return (mid['epoch'], mid) if mid is not None else (ckpt['epoch'] + 1, None)


# ---- the run --------------------------------------------------------------------------------------------------

class TrainingRun:
    def __init__(self, ranks, args, config, resumable, *, out_dir=None, resume=None):
        """Start (or resume) the run folder on rank 0, the only writer; the other ranks read the checkpoint. The
        folder and whether to resume are the flags' (--out-dir, --resume) unless given (a SimSiam configuration's
        sub-folder); `resumable` names the flags a resume may change."""
        self.ranks, self.config = ranks, config
        out_dir = args.out_dir if out_dir is None else out_dir
        resume = args.resume if resume is None else resume
        self.folder = RunDir(out_dir)
        if ranks.is_main:
            print(json.dumps(config, indent=2, default=str))   # the configuration first, as minGPT does
        self.ckpt = self.folder.start(config, resume, resumable) if ranks.is_main else None
        barrier(ranks)
        if not ranks.is_main and resume:
            self.ckpt = load_checkpoint(self.folder.checkpoint_path)
        self.epochs_total, self.batch_size = args.epochs, args.batch_size
        self.checkpoint_every, self.allow_nan = args.checkpoint_every, args.allow_nan
        self.order_rng = torch.Generator().manual_seed(args.seed)   # the data order, checkpointed for resume
        self.start_epoch, self.mid = resume_point(self.ckpt)
        self.state, self.model, self.optimizer = {}, None, None
        # optimizer steps done, the TensorBoard axis; a checkpoint of older code has no count: it is worked out
        # from the first epoch's length (every epoch has as many steps)
        self.steps_done = self.ckpt['extra'].get('steps_done') if self.ckpt is not None else 0
        self.board = None
        if getattr(args, 'tensorboard', False) and ranks.is_main:
            purge = self.steps_done + 1 if self.ckpt is not None and self.steps_done is not None else None
            self.board = Board(self.folder.file(BOARD_DIR), purge_step=purge)

    def resume(self, model, optimizer, **state):
        """Register the model and optimizer; with a checkpoint, restore them, every RNG state, the data order and
        the driver's state (defaults given as keywords). Returns run.state."""
        self.model, self.optimizer = model, optimizer
        self.state = dict(state)
        if self.ckpt is not None:
            restore(self.ckpt, model, optimizer)
            self.order_rng.set_state(self.ckpt['extra']['order_rng'])
            self.state.update({k: self.ckpt['extra'][k] for k in state if k in self.ckpt['extra']})
            print(f'resumed from {self.folder.checkpoint_path} at epoch {self.start_epoch}, '
                  f'step {self.mid["step"] if self.mid else 0}')
        return self.state

    def save(self, epoch, mid_epoch=None):
        """checkpoint.pt after `epoch` finished epochs (and `mid_epoch`'s progress into the next); rank 0 only."""
        if not self.ranks.is_main:
            return
        extra = {k: (v() if callable(v) else v) for k, v in self.state.items()}
        self.folder.save_checkpoint(model_name=self.config['model'], model_config=self.config['model_config'],
                                    model=self.model, optimizer=self.optimizer, epoch=epoch,
                                    extra={**extra, 'order_rng': self.order_rng.get_state(), 'mid_epoch': mid_epoch,
                                           'steps_done': self.steps_done})
        if self.board is not None:
            self.board.flush()   # what a resume keeps is on disk with the checkpoint

    def log(self, row, figures=()):
        """The epoch's metrics.jsonl row (and, with --tensorboard, its numbers and `figures`, the PNGs just saved,
        at the step that ends the epoch); rank 0 only."""
        self.folder.log_metrics(row)
        if self.board is not None:
            self.board.scalars('epoch', row, self.steps_done or 0)
            self.board.figures(figures, self.steps_done or 0)

    def write_summary(self, model_name, figures, metrics):
        """summary.json (RunDir.write_summary); with --tensorboard also its numbers and the figures not shown yet,
        at the last step. The log is then closed."""
        if self.board is not None:
            self.board.scalars('summary', metrics, self.steps_done or 0)
            self.board.figures([p for paths in figures.values() for p in paths], self.steps_done or 0)
            self.board.close()
            self.board = None
        self.folder.write_summary(model_name, figures, metrics)

    def _stepped(self, loop, step, loss):
        self.steps_done = loop.steps_before + step + 1
        if self.board is not None:
            self.board.step(self.steps_done, loss, self.optimizer.param_groups[0]['lr'])

    def epochs(self):
        return tqdm(range(self.start_epoch, self.epochs_total + 1), desc='epochs', initial=self.start_epoch - 1,
                    total=self.epochs_total)

    def epoch_loop(self, epoch, n, num_sums, drop_last=False, desc=None):
        """The EpochLoop of `epoch` over n images (continuing the checkpoint's mid-epoch state when it is this
        epoch's), checkpointing through save()."""
        loop = EpochLoop(epoch, n, self.batch_size, self.order_rng, self.ranks.device, num_sums=num_sums,
                         mid=self.mid, drop_last=drop_last, checkpoint_every=self.checkpoint_every,
                         save=lambda state: self.save(epoch - 1, state), allow_nan=self.allow_nan, ranks=self.ranks,
                         desc=desc, on_step=lambda step, loss: self._stepped(loop, step, loss))
        if self.steps_done is None:   # resumed from a checkpoint without the count
            self.steps_done = (epoch - 1) * len(loop) + loop.start
        loop.steps_before = self.steps_done - loop.start   # the steps of the epochs before this one
        self.mid = None
        return loop


def run_main(script, parse_args, train, argv=None):
    """A driver's main(): parse (argparse errors exit 2 by themselves), then train with user errors as one line.

    `train(args, command, ranks)` gets the command line as the user typed it, for config.json, and the process's
    place under torchrun (Ranks; one process without torchrun)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    with user_errors(), stop_on_signals():
        if getattr(args, 'tensorboard', False):
            require_tensorboard()   # before the data loads, not after an epoch
        ranks = setup(args.device)   # one process, or this process's rank under torchrun
        try:
            return train(args, shlex.join(['python', script, *argv]), ranks)
        finally:
            teardown(ranks)
            release_locks()


