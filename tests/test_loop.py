"""studylib.trainer.EpochLoop: exact mid-epoch resume, non-finite losses, interrupts between steps."""
import os
import signal

import pytest
import torch

from studylib.trainer import EpochLoop, Interrupted, NonFiniteLoss, resume_point


def _run(loop, losses=None):
    seen = []
    for idx in loop:
        seen.append(idx.clone())
        loss = torch.tensor(1.0) if losses is None else losses[len(seen) - 1]
        loop.record(loss, torch.stack([loss, torch.tensor(float(len(idx)))]))
    return seen


def test_a_loop_resumed_from_its_saved_state_finishes_like_an_uninterrupted_one():
    whole = EpochLoop(1, 50, 8, torch.Generator().manual_seed(0), 'cpu', num_sums=2)
    expected = _run(whole)
    assert torch.equal(torch.sort(torch.cat(expected)).values, torch.arange(50))   # a permutation, last batch 2
    saved = []
    first = EpochLoop(1, 50, 8, torch.Generator().manual_seed(0), 'cpu', num_sums=2, checkpoint_every=3,
                      save=saved.append)
    _run(first)
    assert [s['step'] for s in saved] == [3, 6]
    rng = torch.Generator().manual_seed(123)            # the order must come from the state, not from the rng
    resumed = EpochLoop(1, 50, 8, rng, 'cpu', num_sums=2, mid=saved[0])
    rest = _run(resumed)
    assert all(torch.equal(a, b) for a, b in zip(expected[3:], rest)) and len(rest) == len(expected) - 3
    assert torch.equal(resumed.finish()[0], whole.finish()[0])               # sums carried over: 7 steps, 50 images
    assert whole.finish()[0].tolist() == [7.0, 50.0]


def test_a_non_finite_loss_stops_the_epoch_naming_the_step_unless_allowed():
    losses = [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(float('nan')), torch.tensor(1.0)]
    loop = EpochLoop(3, 32, 8, torch.Generator().manual_seed(0), 'cpu', num_sums=2)
    _run(loop, losses)
    with pytest.raises(NonFiniteLoss, match='epoch 3, step 3 of 4'):
        loop.finish()
    saved = []
    loop = EpochLoop(3, 32, 8, torch.Generator().manual_seed(0), 'cpu', num_sums=2, checkpoint_every=3,
                     save=saved.append)
    with pytest.raises(NonFiniteLoss):
        _run(loop, losses)                                # the checkpoint after step 3 would hold NaN weights
    assert saved == []
    loop = EpochLoop(3, 32, 8, torch.Generator().manual_seed(0), 'cpu', num_sums=2, allow_nan=True)
    _run(loop, losses)
    assert torch.isnan(loop.finish()[0][0])


def test_an_interrupt_checkpoints_between_steps_and_exits_130():
    saved = []
    before = signal.getsignal(signal.SIGINT)   # the default, or SIG_IGN under nohup
    loop = EpochLoop(2, 40, 8, torch.Generator().manual_seed(0), 'cpu', num_sums=2, save=saved.append)
    with pytest.raises(Interrupted, match='epoch 2 after step 2 of 5') as exc:
        for i, idx in enumerate(loop):
            loop.record(torch.tensor(0.5), torch.zeros(2))
            if i == 1:
                os.kill(os.getpid(), signal.SIGINT)       # arrives "inside" step 2: acted on after it
    assert exc.value.exit_code == 130
    assert [s['step'] for s in saved] == [2] and saved[0]['epoch'] == 2
    assert signal.getsignal(signal.SIGINT) == before   # the handler is put back


def test_resume_point():
    assert resume_point(None) == (1, None)
    assert resume_point({'epoch': 4, 'extra': {'mid_epoch': None}}) == (5, None)
    mid = {'epoch': 5, 'step': 7}
    assert resume_point({'epoch': 4, 'extra': {'mid_epoch': mid}}) == (5, mid)
