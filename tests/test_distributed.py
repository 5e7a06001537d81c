"""torchrun: two CPU processes (gloo) train what one process trains with the same global batch.

Every rank draws the same global batch and its random numbers and keeps its rows, and batch norm is synchronised,
so the two runs differ only in the order of float reductions (gradients summed over ranks, batch statistics
all-reduced). Stated tolerance: final weights within 1e-3 absolute (Adam divides by sqrt(v) and amplifies those
rounding differences over the steps; measured 3e-6 to 1e-4 here) and the logged losses within 1e-5
relative. One run folder, written by rank 0 alone.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT


def _run(script, args, out, nproc):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}'] \
        if nproc > 1 else [sys.executable]
    result = subprocess.run([*launcher, os.path.join(ROOT, script), *args, '--out-dir', str(out)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _compare(single, double, loss_keys):
    a = torch.load(single / 'checkpoint.pt', weights_only=True)['model']
    b = torch.load(double / 'checkpoint.pt', weights_only=True)['model']
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), rtol=0, atol=1e-3), key
    rows = [[json.loads(line) for line in open(run / 'metrics.jsonl')] for run in (single, double)]
    assert [r['epoch'] for r in rows[0]] == [r['epoch'] for r in rows[1]]
    for ra, rb in zip(*rows):
        for key in loss_keys:
            assert rb[key] == pytest.approx(ra[key], rel=1e-5), key
    leftovers = {p.name for p in double.iterdir()} - {p.name for p in single.iterdir()}
    assert not leftovers, leftovers                                    # rank 1 wrote nothing of its own


def test_vae_two_processes_match_one(data_dir, tmp_path):
    args = ['--data-dir', data_dir, '--no-download', '--device', 'cpu', '--epochs', '2', '--limit-train', '96',
            '--limit-test', '16', '--batch-size', '16', '--checkpoint-every', '2', '--ll-k', '1',
            '--profile-per-class', '1']
    _compare(_run('train_vae.py', args, tmp_path / 'one', 1), _run('train_vae.py', args, tmp_path / 'two', 2),
             ['train_loss', 'test_neg_elbo'])


def test_ddpm_two_processes_match_one(data_dir, tmp_path):
    args = ['--data-dir', data_dir, '--no-download', '--device', 'cpu', '--epochs', '1', '--limit-train', '64',
            '--limit-test', '16', '--batch-size', '16', '--num-samples', '2',
            '--quality-samples', '2', '--timesteps', '10',
            '--ema-decay', '0.9']
    _compare(_run('train_ddpm.py', args, tmp_path / 'one', 1), _run('train_ddpm.py', args, tmp_path / 'two', 2),
             ['train_loss'])


def test_simsiam_two_processes_match_one_with_the_knn_bank_gathered(data_dir, tmp_path):
    args = ['--data-dir', data_dir, '--no-download', '--device', 'cpu', '--epochs', '1', '--limit-train', '64',
            '--limit-test', '32', '--batch-size', '16', '--knn-k', '10', '--dim', '64',
            '--pred-dim', '16']
    one = _run('train_simsiam.py', args, tmp_path / 'one', 1)
    two = _run('train_simsiam.py', args, tmp_path / 'two', 2)
    _compare(one, two, ['train_loss'])
    rows = [[json.loads(line) for line in open(run / 'metrics.jsonl')] for run in (one, two)]
    assert [r['knn_top1'] for r in rows[0]] == [r['knn_top1'] for r in rows[1]]   # same bank, same votes


def test_a_global_batch_that_does_not_split_evenly_is_refused(data_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             os.path.join(ROOT, 'train_vae.py'), '--data-dir', data_dir, '--no-download',
                             '--device', 'cpu', '--batch-size', '15', '--limit-train', '64',
                             '--out-dir', str(tmp_path / 'odd')], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0 and 'not divisible by the 2 processes' in result.stderr
    assert not (tmp_path / 'odd').exists()


def test_cpu_sync_batchnorm_is_batchnorm_on_one_rank(tmp_path):
    """On a single-rank gloo group the all-reduced statistics are the batch's own: outputs, gradients and running
    statistics equal nn.BatchNorm2d's (the multi-rank agreement is the driver tests above)."""
    import torch.distributed as dist
    from studylib.trainer import CPUSyncBatchNorm
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        reference, ours = torch.nn.BatchNorm2d(3), CPUSyncBatchNorm(3)
        with torch.no_grad():
            reference.weight.uniform_(0.5, 1.5), reference.bias.uniform_(-1, 1)
        ours.load_state_dict(reference.state_dict())
        x = torch.randn(5, 3, 4, 4) * 3 + 1
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = reference(xa), ours(xb)
        assert torch.allclose(ya, yb, atol=1e-5)
        upstream = torch.randn_like(ya)
        (ya * upstream).sum().backward()
        (yb * upstream).sum().backward()
        assert torch.allclose(xa.grad, xb.grad, atol=1e-5)
        assert torch.allclose(reference.weight.grad, ours.weight.grad, atol=1e-5)
        for name in ('running_mean', 'running_var'):
            assert torch.allclose(getattr(reference, name), getattr(ours, name), atol=1e-6), name
        ours.eval(), reference.eval()
        assert torch.allclose(reference(x), ours(x), atol=1e-5)
    finally:
        dist.destroy_process_group()
