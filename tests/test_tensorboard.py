"""--tensorboard: the event files, read back with tensorboard's own reader, hold what metrics.jsonl and summary.json
hold, on one step axis that a resume continues; a missing package is one line; rank 0 alone writes under torchrun."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

import train_simsiam
import train_vae
from tests.conftest import ROOT

event_accumulator = pytest.importorskip(
    'tensorboard.backend.event_processing.event_accumulator',
    reason='the tensorboard package (requirements-test.txt) is not installed')

VAE = ['--limit-train', '160', '--limit-test', '48', '--batch-size', '32', '--ll-k', '2', '--profile-per-class', '2',
       '--sample-every', '1', '--no-download', '--device', 'cpu', '--tensorboard']
STEPS = 5   # optimizer steps per VAE epoch: 160 images in batches of 32


def read_board(run):
    board = event_accumulator.EventAccumulator(str(run / 'tb'), size_guidance={'scalars': 0, 'images': 0})
    board.Reload()
    return board


def scalars(board, tag):
    return [(e.step, e.value) for e in board.Scalars(tag)]


def rows(run):
    return [json.loads(line) for line in open(run / 'metrics.jsonl')]


def close(a, b):
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)   # the event files hold float32


def assert_board_equals_the_log(run, steps_per_epoch):
    """Every number of every metrics.jsonl row at the step that ends its epoch, once; every summary number."""
    board = read_board(run)
    for row in rows(run):
        for key, value in row.items():
            if key == 'epoch' or not isinstance(value, (int, float)):
                continue
            points = [v for step, v in scalars(board, f'epoch/{key}') if step == row['epoch'] * steps_per_epoch]
            assert len(points) == 1 and close(points[0], value), (key, row['epoch'], points, value)
    summary = json.load(open(run / 'summary.json'))['metrics']
    numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numbers
    last = rows(run)[-1]['epoch'] * steps_per_epoch
    for key, value in numbers.items():   # at the last step (a run resumed after it finished has an earlier one too)
        step, logged = scalars(board, f'summary/{key}')[-1]
        assert step == last and close(logged, value), (key, step, logged, value)
    return board


def test_vae_curves_and_grids_equal_the_run_folder(data_dir, tmp_path):
    run = tmp_path / 'vae'
    (run / 'tb').mkdir(parents=True)
    (run / 'tb' / 'events.out.tfevents.stale').write_text('an aborted run')   # a fresh start clears it
    train_vae.main(['--data-dir', data_dir, '--out-dir', str(run), '--epochs', '2', *VAE])
    board = assert_board_equals_the_log(run, STEPS)
    assert os.listdir(run / 'tb') != ['events.out.tfevents.stale'] and len(os.listdir(run / 'tb')) == 1
    losses = scalars(board, 'train/loss')
    assert [s for s, _ in losses] == list(range(1, 2 * STEPS + 1))
    # the per-step losses average to the epoch's logged train_loss (each batch holds 32 images)
    for epoch, row in enumerate(rows(run), 1):
        mean = sum(v for s, v in losses if (epoch - 1) * STEPS < s <= epoch * STEPS) / STEPS
        assert mean == pytest.approx(row['train_loss'], rel=1e-5)
    assert [v for _, v in scalars(board, 'train/lr')] == pytest.approx([1e-4] * 2 * STEPS)
    grids = board.Images('figures/1.3b_samples')
    assert [g.step for g in grids] == [STEPS, 2 * STEPS] and grids[0].width > 100
    final = {t for t in board.Tags()['images']}
    assert {'figures/1.3c_reconstructions', 'figures/1.3d_final_samples', 'figures/1.3e_latent_profiles',
            'figures/1.3f_interpolations', 'figures/1.3a_training_time'} <= final


def test_a_resume_continues_the_axis_and_purges_what_followed_its_checkpoint(data_dir, tmp_path):
    """Epoch 1, then a resume to epoch 2; then the epoch-1 checkpoint is put back (as after a crash that lost
    epoch 2's checkpoint) and resumed again: every step is on the axis exactly once."""
    run = tmp_path / 'vae'
    common = ['--data-dir', data_dir, '--out-dir', str(run), *VAE]
    train_vae.main([*common, '--epochs', '1'])
    shutil.copy(run / 'checkpoint.pt', tmp_path / 'epoch1.pt')
    train_vae.main([*common, '--epochs', '2', '--resume'])
    shutil.copy(tmp_path / 'epoch1.pt', run / 'checkpoint.pt')
    train_vae.main([*common, '--epochs', '2', '--resume'])
    board = assert_board_equals_the_log(run, STEPS)
    assert [s for s, _ in scalars(board, 'train/loss')] == list(range(1, 2 * STEPS + 1))
    assert [s for s, _ in scalars(board, 'epoch/test_nll')] == [STEPS, 2 * STEPS]


def test_simsiam_logs_epoch_zero_at_step_zero_and_each_step_lr(data_dir, tmp_path):
    run = tmp_path / 'simsiam'
    train_simsiam.main(['--data-dir', data_dir, '--out-dir', str(run), '--limit-train', '64', '--limit-test', '32',
                        '--batch-size', '32', '--knn-k', '10', '--dim', '64', '--pred-dim', '16', '--no-download',
                        '--device', 'cpu', '--epochs', '2', '--tensorboard'])
    board = assert_board_equals_the_log(run, 2)
    assert scalars(board, 'epoch/knn_top1')[0][0] == 0
    lrs = scalars(board, 'train/lr')
    logged = {r['epoch']: r['lr'] for r in rows(run) if r['lr'] is not None}
    assert [s for s, _ in lrs] == [1, 2, 3, 4]
    assert all(close(v, logged[(s - 1) // 2 + 1]) for s, v in lrs)   # the cosine schedule's value of the epoch


def test_without_the_package_the_flag_is_one_line_and_nothing_is_written(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)   # as if tensorboard were not installed
    with pytest.raises(SystemExit) as stop:
        train_vae.main(['--data-dir', data_dir, '--out-dir', str(tmp_path / 'vae'), '--epochs', '1', *VAE])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and 'pip install tensorboard' in err[0], err
    assert not (tmp_path / 'vae').exists()


def test_under_torchrun_rank_zero_alone_writes_the_log(data_dir, tmp_path):
    run = tmp_path / 'two'
    result = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
         os.path.join(ROOT, 'train_vae.py'), '--data-dir', data_dir, '--out-dir', str(run), '--epochs', '1',
         *VAE], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(os.listdir(run / 'tb')) == 1
    assert_board_equals_the_log(run, STEPS)
