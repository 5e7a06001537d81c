"""One training epoch as the drivers run it: batches by index, mid-epoch checkpoints, Ctrl-C, non-finite losses.

    epoch_loop = EpochLoop(epoch, len(train_x), args.batch_size, order_rng, device, mid=mid, ...)
    for idx in epoch_loop:                      # (B,) indices of this step's batch, on the device
        ... forward, backward, step ...
        epoch_loop.record(loss, torch.stack([...]))
    sums, seconds = epoch_loop.finish()

Exact resume: the epoch's permutation, the step reached, the running sums and seconds are handed to `save(state)`
every `checkpoint_every` steps and when the user interrupts (Ctrl-C or SIGTERM), with every RNG state and the
model/optimizer in the driver's checkpoint; a run restarted with --resume rebuilds the same permutation and skips
the steps already done, so it ends with the weights of an uninterrupted run. An interrupt is acted on between two
steps (the first signal sets a flag; a second one stops at once), so a checkpoint never holds a half-done step.

Under torchrun a last partial batch with fewer images than processes is skipped (`images` counts what an epoch
visits).

Non-finite losses are tracked on the device (no host sync per step) and checked once per checkpoint and at the end
of the epoch: the run stops with the step named, before a non-finite state is saved, unless allow_nan.
"""
import contextlib
import signal
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import UserError
from .dist import Ranks
from .run import rng_state, set_rng_state

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
                 checkpoint_every=0, save=None, allow_nan=False, desc=None, ranks=None):
        """epoch: 1-based; mid: the checkpoint's mid-epoch state when it belongs to this epoch (then the order
        comes from it and order_rng is not drawn from again); ranks: under torchrun, this process's share
        (studylib.dist): every rank walks the same order and takes its contiguous slice of each global batch."""
        self.ranks = ranks or Ranks(device=torch.device(device))
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
