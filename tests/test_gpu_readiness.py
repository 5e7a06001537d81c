"""The GPU box without a GPU: the CUDA-only code paths checked with torch.cuda mocked where only CUDA shows a bug,
the CUDA tests themselves (marked `cuda`, run by scripts/gpu_check.py on a GPU), and a dry run of that check."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from studylib import run as R
from tests.conftest import ROOT
from tests.test_distributed import _run


# ----------------------------------------------------------------------------------------------------------------
# CUDA random state under torchrun (mocked: only CUDA shows these)

class FakeCuda:
    """torch.cuda's random-state calls for a process on `current` of `count` visible GPUs, each with its own
    state; records every set."""

    def __init__(self, monkeypatch, current, count):
        self.states = {d: torch.tensor([d, 0], dtype=torch.uint8) for d in range(count)}
        self.current, self.count, self.sets = current, count, []
        for name, fn in [('is_available', lambda: True), ('current_device', lambda: self.current),
                         ('device_count', lambda: self.count), ('get_rng_state', self.get),
                         ('set_rng_state', self.set), ('get_rng_state_all', self.get_all),
                         ('set_rng_state_all', self.set_all)]:
            monkeypatch.setattr(torch.cuda, name, fn)

    def get(self, device='cuda'):
        return self.states[_index(device, self.current)].clone()

    def set(self, state, device='cuda'):
        d = _index(device, self.current)
        if d >= self.count:
            raise IndexError(d)
        self.sets.append((d, state.clone()))
        self.states[d] = state.clone()

    def get_all(self):
        return [self.states[d].clone() for d in range(self.count)]

    def set_all(self, states):
        for d, s in enumerate(states):
            self.set(s, d)


def _index(device, current):
    if isinstance(device, int):
        return device
    device = torch.device(device)
    return device.index if device.index is not None else current


def test_checkpoint_saves_the_state_of_the_gpu_this_process_drew_on(monkeypatch):
    cuda = FakeCuda(monkeypatch, current=0, count=4)
    cuda.states[0] = torch.tensor([7, 7], dtype=torch.uint8)   # rank 0 has drawn on its GPU
    state = R.rng_state()
    assert len(state['cuda']) == 1 and torch.equal(state['cuda'][0], torch.tensor([7, 7], dtype=torch.uint8))


def test_rank_1_resumes_with_the_drawn_state_on_its_own_gpu(monkeypatch):
    """Rank 0 saved; rank 1 (on GPU 1) must continue from the state rank 0's draws reached (every rank draws the
    same numbers), not from GPU 1's seed state that rank 0's process saw."""
    saver = FakeCuda(monkeypatch, current=0, count=2)
    saver.states[0] = torch.tensor([9, 9], dtype=torch.uint8)
    state = R.rng_state()
    rank1 = FakeCuda(monkeypatch, current=1, count=2)
    R.set_rng_state(state)
    assert [d for d, _ in rank1.sets] == [1]
    assert torch.equal(rank1.states[1], torch.tensor([9, 9], dtype=torch.uint8))


def test_a_four_gpu_checkpoint_resumes_on_one_gpu(monkeypatch):
    """A checkpoint of older code listed all 4 visible GPUs; resuming where one is visible used to raise
    IndexError. The first entry (the writer's GPU) goes to this process's GPU."""
    state = R.rng_state()
    state['cuda'] = [torch.tensor([d, 1], dtype=torch.uint8) for d in range(4)]
    one = FakeCuda(monkeypatch, current=0, count=1)
    R.set_rng_state(state)
    assert one.sets and torch.equal(one.states[0], torch.tensor([0, 1], dtype=torch.uint8))


# ----------------------------------------------------------------------------------------------------------------
# optimizer kernel options survive a resume

def test_resume_keeps_the_fused_setting_of_the_new_optimizer():
    """A checkpoint written by a foreach (CPU-style) Adam, loaded into a fused Adam (a GPU run): still fused."""
    model = nn.Linear(3, 2)
    cpu_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    cpu_opt.step()
    state = cpu_opt.state_dict()
    fused = torch.optim.Adam(model.parameters(), lr=5e-4, fused=True)
    R.load_optimizer_state(fused, state)
    assert fused.param_groups[0]['fused'] is True
    assert fused.param_groups[0]['lr'] == 1e-3                         # the state itself is the checkpoint's
    fused.step()                                                        # and it still steps
    back = torch.optim.Adam(model.parameters(), lr=1e-3)
    R.load_optimizer_state(back, fused.state_dict())
    assert not back.param_groups[0]['fused']


def test_restore_uses_the_option_preserving_load():
    model = nn.Linear(3, 2)
    ckpt = {'model': model.state_dict(), 'optimizer': torch.optim.Adam(model.parameters()).state_dict(),
            'rng': R.rng_state()}
    fused = torch.optim.Adam(model.parameters(), fused=True)
    R.restore(ckpt, model, fused)
    assert fused.param_groups[0]['fused'] is True


# ----------------------------------------------------------------------------------------------------------------
# the digit classifier leaves the GPU generators alone

def test_training_the_digit_net_never_reseeds_the_gpus(monkeypatch):
    from studylib import digit_net
    calls = []
    monkeypatch.setattr(torch.cuda, 'manual_seed_all', lambda seed: calls.append(seed))
    monkeypatch.setattr(torch.cuda, 'manual_seed', lambda seed: calls.append(seed))
    x = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(20) % 10
    with torch.random.fork_rng(devices=[]):
        digit_net.train_digit_net(x, y, x[:10], y[:10], epochs=1, batch_size=10)
    assert calls == []


# ----------------------------------------------------------------------------------------------------------------
# TF32 in the CUDA comparisons

def test_tf32_off_switches_tf32_off_and_restores_it():
    """The CUDA comparisons (no_tf32 fixture) run in full float32 and leave the settings as they found them."""
    from tests.conftest import tf32_off
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        with tf32_off():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ----------------------------------------------------------------------------------------------------------------
# torchrun: the last partial batch smaller than the number of processes; --compile with DDP and synced batch norm

@pytest.mark.parametrize('script, extra', [
    ('train_vae.py', ['--ll-k', '1', '--profile-per-class', '1']),
    ('train_ddpm.py', ['--num-samples', '2', '--quality-samples', '2', '--timesteps', '10']),
])
def test_a_last_batch_smaller_than_the_world_is_skipped(data_dir, tmp_path, script, extra):
    """97 images at batch 16 on 2 processes: the last global batch has 1 image, which would leave rank 1 with none
    (the U-Net then failed in a reshape, the VAE's loss became NaN). It sits the epoch out; the loss is finite."""
    args = ['--data-dir', data_dir, '--no-download', '--device', 'cpu', '--epochs', '1', '--limit-train', '97',
            '--limit-test', '16', '--batch-size', '16', *extra]
    out = _run(script, args, tmp_path / 'run', 2)
    rows = [json.loads(line) for line in open(out / 'metrics.jsonl')]
    assert len(rows) == 1 and rows[0]['train_loss'] == rows[0]['train_loss'] and abs(rows[0]['train_loss']) < 1e6


def test_epoch_loop_drops_only_a_too_small_last_batch_under_run():
    from studylib.trainer import Ranks
    from studylib.trainer import EpochLoop
    g = torch.Generator().manual_seed(0)
    two = Ranks(rank=0, world=2)
    assert EpochLoop(1, 33, 16, g, 'cpu', num_sums=1, ranks=two).images == 32
    assert EpochLoop(1, 34, 16, g, 'cpu', num_sums=1, ranks=two).images == 34
    assert EpochLoop(1, 33, 16, g, 'cpu', num_sums=1).images == 33           # one process trains on every image


def test_compile_under_torchrun_with_synced_batch_norm_matches_one_process(data_dir, tmp_path):
    """--compile under torchrun compiles the DDP-wrapped step (DDP splits the graph at its buckets; the all-reduce
    batch norm runs as a graph break). Two gloo processes with --compile train what one process trains without
    it, to the tolerance of tests/test_distributed.py."""
    args = ['--data-dir', data_dir, '--no-download', '--device', 'cpu', '--epochs', '1', '--limit-train', '64',
            '--limit-test', '16', '--batch-size', '16', '--ll-k', '1', '--profile-per-class', '1']
    one = _run('train_vae.py', args, tmp_path / 'one', 1)
    two = _run('train_vae.py', args + ['--compile'], tmp_path / 'two', 2)
    a = torch.load(one / 'checkpoint.pt', weights_only=True)['model']
    b = torch.load(two / 'checkpoint.pt', weights_only=True)['model']
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), rtol=0, atol=1e-3), key


# ----------------------------------------------------------------------------------------------------------------
# the prepared GPU check, dry-run at toy size on the CPU

def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / 'gpu_check.md'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'gpu_check.py'), '--dry-run',
                             '--out', str(out), '--keep', str(tmp_path / 'work')], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = out.read_text()
    report = json.loads((tmp_path / 'gpu_check.json').read_text())
    steps = {r['step']: r['status'] for r in report['rows']}
    assert not [s for s in steps.values() if s.startswith('FAIL')], steps
    assert steps['CUDA-only tests (pytest -m cuda)'] == 'skipped'
    assert steps['bench.py --device cuda'] == 'skipped'
    assert steps['resumed weights vs straight run'] == 'pass'
    assert 'torchrun --nproc_per_node=1 (gloo) VAE, straight' in steps
    assert '| step | result | seconds | note |' in table and 'skipped' in table


# ----------------------------------------------------------------------------------------------------------------
# on a GPU (scripts/gpu_check.py runs these with -m cuda)

@pytest.mark.cuda
def test_cuda_rng_state_round_trip_on_the_current_gpu():
    torch.cuda.manual_seed(3)
    state = R.rng_state()
    a = torch.randn(4, device='cuda')
    R.set_rng_state(state)
    assert torch.equal(torch.randn(4, device='cuda'), a)


@pytest.mark.cuda
def test_cuda_notebook_loop_with_t_from_t_sample():
    import ddpm_solution as D
    model = D.Unet(dim=8, channels=3, dim_mults=(1, 2)).cuda()
    x = torch.randn(4, 3, 16, 16, device='cuda')
    t = D.t_sample(D.T, 4)
    assert t.device.type == 'cuda'
    loss = D.p_losses(model, x, t)
    loss.backward()
    assert torch.isfinite(loss)
    assert D.p_losses(model, x, t.cpu()).device.type == 'cuda'          # a CPU t works too


@pytest.mark.cuda
def test_cuda_fused_adam_survives_a_cpu_checkpoint():
    model = nn.Linear(3, 2).cuda()
    cpu_state = torch.optim.Adam(nn.Linear(3, 2).parameters()).state_dict()
    fused = torch.optim.Adam(model.parameters(), fused=True)
    R.load_optimizer_state(fused, cpu_state)
    model(torch.randn(2, 3, device='cuda')).sum().backward()
    fused.step()
    assert fused.param_groups[0]['fused'] is True


@pytest.mark.cuda
@pytest.mark.parametrize('gpu', [0, 'cuda', torch.device('cuda'), 'cuda:0'])
def test_cuda_load_checkpoints_with_every_gpu_form(tmp_path, gpu):
    import q3_misc as M
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.save({'state_dict': model.state_dict(), 'optimizer': opt.state_dict(), 'epoch': 4}, tmp_path / 'c.pt')
    dst = nn.Linear(3, 2).cuda()
    _, _, epoch = M.load_checkpoints(str(tmp_path / 'c.pt'), dst, torch.optim.SGD(dst.parameters(), lr=1), gpu)
    assert epoch == 4 and torch.equal(dst.weight.cpu(), model.weight)
