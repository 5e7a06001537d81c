"""The scaffolding every driver shares, in one object: open or resume the run folder, the data order, checkpoints,
the epochs and their EpochLoop. The model's forward, backward and step stay in the driver.

    run = TrainingRun(ranks, out_dir, config, resume, seed=..., epochs=..., batch_size=..., ...)
    model, optimizer = build(...)
    run.resume(model, optimizer, figures={...})     # restores weights, optimizer, RNG states, data order, state
    for epoch in run.epochs():
        loop = run.epoch_loop(epoch, len(train_x), num_sums=3)
        for idx in loop:
            ... forward, backward, step ...
            loop.record(loss, sums)
        sums, seconds = loop.finish()
        with loop.end_of_epoch():
            ... evaluate, figures, run.folder.log_metrics(row) ...
            run.save(epoch)

`run.state` holds what the driver keeps across epochs (figure lists, timings): it is saved with every checkpoint
and given back by resume(); a value that is a callable (e.g. an EMA's state_dict) is called at save time.
"""
import json

import torch
from tqdm import tqdm

from .dist import barrier
from .loop import EpochLoop, resume_point
from .run import RunDir, load_checkpoint, restore


class TrainingRun:
    def __init__(self, ranks, out_dir, config, resume, *, seed, epochs, batch_size, checkpoint_every, allow_nan):
        """Start (or resume) the run folder on rank 0, the only writer; the other ranks read the checkpoint."""
        self.ranks, self.config = ranks, config
        self.folder = RunDir(out_dir)
        if ranks.is_main:
            print(json.dumps(config, indent=2, default=str))   # the configuration first, as minGPT does
        self.ckpt = self.folder.start(config, resume) if ranks.is_main else None
        barrier(ranks)
        if not ranks.is_main and resume:
            self.ckpt = load_checkpoint(self.folder.checkpoint_path)
        self.epochs_total, self.batch_size = epochs, batch_size
        self.checkpoint_every, self.allow_nan = checkpoint_every, allow_nan
        self.order_rng = torch.Generator().manual_seed(seed)   # the data order, checkpointed for resume
        self.start_epoch, self.mid = resume_point(self.ckpt)
        self.state, self.model, self.optimizer = {}, None, None

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
                                    extra={**extra, 'order_rng': self.order_rng.get_state(), 'mid_epoch': mid_epoch})

    def epochs(self):
        return tqdm(range(self.start_epoch, self.epochs_total + 1), desc='epochs', initial=self.start_epoch - 1,
                    total=self.epochs_total)

    def epoch_loop(self, epoch, n, num_sums, drop_last=False, desc=None):
        """The EpochLoop of `epoch` over n images (continuing the checkpoint's mid-epoch state when it is this
        epoch's), checkpointing through save()."""
        loop = EpochLoop(epoch, n, self.batch_size, self.order_rng, self.ranks.device, num_sums=num_sums,
                         mid=self.mid, drop_last=drop_last, checkpoint_every=self.checkpoint_every,
                         save=lambda state: self.save(epoch - 1, state), allow_nan=self.allow_nan, ranks=self.ranks,
                         desc=desc)
        self.mid = None
        return loop
