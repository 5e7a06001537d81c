"""Hostile but realistic use of the drivers: every user error or environment failure is one line and exit status 2
(130 for a signal), checked before the run folder is touched, and nothing that existed is lost or replaced.

The malformed inputs are made here. CI runs as root, where file modes stop nothing, so permission, read-only and
disk-full failures are injected (patched calls raising EACCES / EROFS, writes sent to /dev/full). Data-file
corruption is tests/test_hostile_data.py; the report and comparison tools are tests/test_hostile_tools.py.
"""
import builtins
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

import train_ddpm
import train_simsiam
import train_vae
from studylib import UserError
from studylib import run as R
from tests.conftest import ROOT, read_only_cache, run_script, stop_mid_epoch

VAE_TINY = ['--no-download', '--device', 'cpu', '--epochs', '1', '--limit-train', '96', '--limit-test', '16',
            '--batch-size', '16', '--ll-k', '1', '--profile-per-class', '1']
SIMSIAM_TINY = ['--no-download', '--device', 'cpu', '--epochs', '1', '--limit-train', '64', '--limit-test', '32',
                '--batch-size', '16', '--knn-k', '10', '--dim', '64', '--pred-dim', '16']


def snapshot(folder):
    """Every file under folder with its bytes' hash: 'nothing changed' is this dict being equal (the run folder's
    empty .lock file, which a refused start may leave, is no content)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            if name == '.lock':
                continue
            path = os.path.join(root, name)
            with open(path, 'rb') as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def refused(main, argv, capsys, code=2):
    """main(argv) exits with `code` and one 'error:' line on stderr, no traceback; returns that line."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == code
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith('error:')]
    assert len(err) == 1 and 'Traceback' not in stderr, stderr[-2000:]
    return err[0]


def vae(data_dir, out, *extra):
    return ['--data-dir', data_dir, '--out-dir', str(out), *VAE_TINY, *extra]


@pytest.fixture(scope='module')
def finished_vae(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('finished') / 'vae'
    train_vae.main(vae(data_dir, out))
    return out


# ----------------------------------------------------------------------------------------------------------------
# 1. finished work is never replaced

def test_a_fresh_start_never_replaces_a_finished_run(finished_vae, data_dir, tmp_path, capsys):
    before = snapshot(finished_vae)
    line = refused(train_vae.main, vae(data_dir, finished_vae), capsys)
    assert 'finished' in line
    # a finished run whose checkpoint was deleted (as committed under plots/) is still finished
    bare = tmp_path / 'committed'
    bare.mkdir()
    for name in ('summary.json', 'config.json', 'metrics.jsonl'):
        (bare / name).write_bytes((finished_vae / name).read_bytes())
    kept = snapshot(bare)
    assert 'finished' in refused(train_vae.main, vae(data_dir, bare), capsys)
    assert snapshot(bare) == kept and snapshot(finished_vae) == before


def _finished_experiment(root):
    """A finished SimSiam --experiment 3.4 folder as committed: summaries, no checkpoints."""
    for name in ('baseline', 'no-stop-grad'):
        (root / name).mkdir(parents=True)
        (root / name / 'summary.json').write_text(json.dumps({'model': 'simsiam', 'figures': {},
                                                              'metrics': {'epochs': 1, 'knn_top1': 10.0, 'dim': 64}}))
        (root / name / 'metrics.jsonl').write_text(json.dumps({'epoch': 1, 'train_loss': -0.5, 'knn_top1': 10.0,
                                                               'z_std': 0.1, 'lr': 0.01, 'seconds': 1.0}) + '\n')
    (root / 'summary.json').write_text(json.dumps({'model': 'simsiam', 'figures': {'3.4': []}, 'metrics': {}}))


@pytest.mark.parametrize('extra', [[], ['--resume'], ['--experiment', '3.4']])
def test_a_finished_simsiam_experiment_is_never_replaced(data_dir, tmp_path, capsys, extra):
    _finished_experiment(tmp_path / 'exp')
    before = snapshot(tmp_path / 'exp')
    refused(train_simsiam.main, ['--data-dir', data_dir, '--out-dir', str(tmp_path / 'exp'), *SIMSIAM_TINY, *extra],
            capsys)
    assert snapshot(tmp_path / 'exp') == before


def test_a_resumed_experiment_skips_committed_configurations(data_dir, tmp_path, capsys):
    """Summaries alone (a fresh checkout) are enough for --resume of an experiment to skip those configurations."""
    _finished_experiment(tmp_path / 'exp')
    (tmp_path / 'exp' / 'summary.json').unlink()
    results = train_simsiam.main(['--data-dir', data_dir, '--out-dir', str(tmp_path / 'exp'), *SIMSIAM_TINY,
                                  '--experiment', '3.4', '--resume'])
    assert results['baseline']['knn_top1'] == 10.0 and results['no-stop-grad']['knn_top1'] == 10.0
    assert 'already finished' in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# 4 and 8. the digit classifier: never written into the data folder, checked before training

def test_ddpm_writes_nothing_into_the_data_folder(tiny_svhn, tmp_path, monkeypatch):
    """A read-only data folder is fine: the classifier's cache lives in the cache folder (here unwritable too:
    injected EROFS), so the run trains it, uses it and finishes."""
    before = snapshot(tiny_svhn)
    read_only_cache(monkeypatch)
    metrics = train_ddpm.main(['--data-dir', tiny_svhn, '--out-dir', str(tmp_path / 'run'), '--no-download',
                               '--device', 'cpu', '--epochs', '1', '--batch-size', '16', '--num-samples', '2',
                               '--quality-samples', '2',
                               '--timesteps', '10', '--limit-test', '16'])
    assert metrics['digit_fd'] == metrics['digit_fd']
    assert snapshot(tiny_svhn) == before


def test_a_corrupt_classifier_cache_stops_the_ddpm_before_training(tiny_svhn, tmp_path, capsys):
    from studylib import digit_net
    path = digit_net.default_path(tiny_svhn)
    os.makedirs(os.path.dirname(path))
    with open(path, 'wb') as f:
        f.write(b'not a checkpoint')
    line = refused(train_ddpm.main, ['--data-dir', tiny_svhn, '--out-dir', str(tmp_path / 'run'), '--no-download',
                                     '--device', 'cpu', '--epochs', '1', '--batch-size', '16', '--num-samples', '2',
                                     '--quality-samples', '2',
                                     '--timesteps', '10'], capsys)
    assert path in line and not (tmp_path / 'run').exists()


# ----------------------------------------------------------------------------------------------------------------
# 5 and 6. a resume with other training flags is refused, before anything is written

@pytest.mark.parametrize('flag', [['--lr', '0.001'], ['--batch-size', '32'], ['--limit-train', '64'],
                                  ['--seed', '3']])
def test_resume_with_other_training_flags_is_refused(finished_vae, data_dir, capsys, flag):
    before = snapshot(finished_vae)
    argv = vae(data_dir, finished_vae, '--epochs', '2', '--resume')
    i = argv.index(flag[0]) if flag[0] in argv else None
    if i is not None:
        argv[i + 1] = flag[1]
    else:
        argv += flag
    line = refused(train_vae.main, argv, capsys)
    assert flag[0] in line and 'keeps its own' in line
    assert snapshot(finished_vae) == before


def test_resume_may_change_where_and_how_long(finished_vae, data_dir, tmp_path):
    copy = tmp_path / 'copy'
    copy.mkdir()
    for name in os.listdir(finished_vae):
        (copy / name).write_bytes((finished_vae / name).read_bytes())
    metrics = train_vae.main(vae(data_dir, copy, '--epochs', '2', '--resume', '--checkpoint-every', '3'))
    assert metrics['epochs'] == 2


# ----------------------------------------------------------------------------------------------------------------
# 7. non-finite learning rates and weights

def test_an_infinite_lr_is_refused(data_dir, tmp_path, capsys):
    for value in ('inf', 'nan', '-1'):
        with pytest.raises(SystemExit) as info:
            train_vae.main(vae(data_dir, tmp_path / 'run', '--lr', value))
        assert info.value.code == 2
    assert 'finite' in capsys.readouterr().err and not (tmp_path / 'run').exists()


def test_non_finite_weights_never_reach_the_checkpoint(tmp_path):
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1)
    path = str(tmp_path / 'checkpoint.pt')
    R.save_checkpoint(path, model_name='toy', model_config={}, model=model, optimizer=optimizer, epoch=1)
    good = open(path, 'rb').read()
    with torch.no_grad():
        model.weight[0, 0] = float('inf')
    with pytest.raises(UserError, match='non-finite'):
        R.save_checkpoint(path, model_name='toy', model_config={}, model=model, optimizer=optimizer, epoch=2)
    assert open(path, 'rb').read() == good
    R.save_checkpoint(path, model_name='toy', model_config={}, model=model, optimizer=optimizer, epoch=2,
                      check_finite=False)   # --allow-nan
    assert R.load_checkpoint(path)['epoch'] == 2


# ----------------------------------------------------------------------------------------------------------------
# 8. flag errors found before training, not after

@pytest.mark.parametrize('argv, message', [
    (['--num-samples', '1', '--quality-samples', '1'], '--num-samples'),
    (['--sampler', 'ddim', '--sample-steps', '1'], '--sample-steps'),
    (['--timesteps', '1'], '--timesteps'),
])
def test_ddpm_flag_errors_come_first(data_dir, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        train_ddpm.main(['--data-dir', data_dir, '--out-dir', str(tmp_path / 'run'), '--no-download', *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err.splitlines()[-1] and 'Traceback' not in err and not (tmp_path / 'run').exists()


def test_vae_profile_needs_are_checked_before_training(data_dir, tmp_path, capsys):
    argv = vae(data_dir, tmp_path / 'run')
    argv[argv.index('--profile-per-class') + 1] = '100'
    assert '--profile-per-class' in refused(train_vae.main, argv, capsys)
    assert not (tmp_path / 'run').exists()


# ----------------------------------------------------------------------------------------------------------------
# 9 and 10. unusable output paths, full disks

def test_unusable_output_paths(data_dir, tmp_path, capsys, monkeypatch):
    a_file = tmp_path / 'a-file'
    a_file.write_text('keep me')
    for out, word in [(a_file, 'is a file'), (a_file / 'below', 'cannot be written'), ('', 'empty')]:
        assert word in refused(train_vae.main, vae(data_dir, out), capsys)
    assert a_file.read_text() == 'keep me'

    real_open = builtins.open
    forbidden = str(tmp_path / 'locked')

    def no_access(file, *args, **kwargs):
        if str(file).startswith(forbidden):
            raise PermissionError(errno.EACCES, 'Permission denied', str(file))
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(builtins, 'open', no_access)
    assert 'Permission denied' in refused(train_vae.main, vae(data_dir, forbidden), capsys)
    monkeypatch.undo()

    real_makedirs = os.makedirs

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / 'ro')):
            raise OSError(errno.EROFS, 'Read-only file system', str(path))
        return real_makedirs(path, *args, **kwargs)
    monkeypatch.setattr(os, 'makedirs', read_only)
    assert 'Read-only file system' in refused(train_vae.main, vae(data_dir, tmp_path / 'ro' / 'run'), capsys)


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    """Writes go to /dev/full, which fails every write with ENOSPC: the message says so, the temp file is gone
    and the previous checkpoint is intact."""
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1)
    path = str(tmp_path / 'checkpoint.pt')
    R.save_checkpoint(path, model_name='toy', model_config={}, model=model, optimizer=optimizer, epoch=1)
    good = open(path, 'rb').read()
    real_open = builtins.open

    def full_disk(file, mode='r', *args, **kwargs):
        if str(file).endswith('.tmp') and 'w' in mode:
            return real_open('/dev/full', mode, *args, **kwargs)
        return real_open(file, mode, *args, **kwargs)
    monkeypatch.setattr(builtins, 'open', full_disk)
    with pytest.raises(UserError) as info:
        R.save_checkpoint(path, model_name='toy', model_config={}, model=model, optimizer=optimizer, epoch=2)
    monkeypatch.undo()
    assert 'No space left on device' in str(info.value) and '\n' not in str(info.value)
    assert open(path, 'rb').read() == good and not os.path.exists(path + '.tmp')


def test_a_full_disk_in_a_driver_is_one_line(finished_vae, data_dir, tmp_path, capsys, monkeypatch):
    copy = tmp_path / 'copy'
    copy.mkdir()
    for name in os.listdir(finished_vae):
        (copy / name).write_bytes((finished_vae / name).read_bytes())
    checkpoint = (copy / 'checkpoint.pt').read_bytes()
    real_open = builtins.open

    def full_disk(file, mode='r', *args, **kwargs):
        if str(file).startswith(str(copy)) and str(file).endswith('.pt.tmp'):
            return real_open('/dev/full', mode, *args, **kwargs)
        return real_open(file, mode, *args, **kwargs)
    monkeypatch.setattr(builtins, 'open', full_disk)
    line = refused(train_vae.main, vae(data_dir, copy, '--epochs', '2', '--resume'), capsys)
    assert 'No space left on device' in line
    assert (copy / 'checkpoint.pt').read_bytes() == checkpoint


# ----------------------------------------------------------------------------------------------------------------
# 11. SimSiam --resume needs a SimSiam run

def test_simsiam_resume_needs_a_simsiam_run(finished_vae, data_dir, tmp_path, capsys):
    base = ['--data-dir', data_dir, *SIMSIAM_TINY, '--resume']
    assert 'no run' in refused(train_simsiam.main, base + ['--out-dir', str(tmp_path / 'missing')], capsys)
    assert not (tmp_path / 'missing').exists()
    before = snapshot(finished_vae)
    assert 'vae' in refused(train_simsiam.main, base + ['--out-dir', str(finished_vae)], capsys)
    assert 'vae' in refused(train_simsiam.main, base + ['--out-dir', str(finished_vae), '--experiment', '3.4'],
                            capsys)
    assert snapshot(finished_vae) == before


# ----------------------------------------------------------------------------------------------------------------
# 12. one run per folder at a time

def test_a_second_run_into_a_folder_in_use_is_refused_and_a_killed_holder_frees_it(data_dir, tmp_path, capsys):
    folder = tmp_path / 'run'
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, '-c', 'import sys, time; sys.path.insert(0, sys.argv[1]); '
                               'from studylib.run import lock_dir; lock_dir(sys.argv[2]); print("locked", flush=True);'
                               ' time.sleep(120)', ROOT, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        line = refused(train_vae.main, vae(data_dir, folder), capsys)
        assert 'in use' in line and str(holder.pid) in line
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert train_vae.main(vae(data_dir, folder))['epochs'] == 1   # the kernel dropped the dead holder's lock


# ----------------------------------------------------------------------------------------------------------------
# 13. signals outside the training loop

def test_sigterm_during_end_of_epoch_sampling_keeps_the_epoch(tiny_svhn, tmp_path):
    """SIGTERM while the DDPM samples after its epoch: one line, exit 130, and the epoch's training is saved, so
    --resume only redoes the sampling."""
    from studylib import digit_net
    digit_net.load_or_train(tiny_svhn, 'cpu', allow_download=False)   # cached, so the run reaches sampling fast
    args = ['--data-dir', tiny_svhn, '--no-download', '--device', 'cpu', '--epochs', '1', '--batch-size', '16',
            '--num-samples', '2',
            '--quality-samples', '2', '--timesteps', '400', '--t-primes', '5,10', '--limit-test', '16',
            '--out-dir', str(tmp_path / 'run')]
    proc = run_script('train_ddpm.py', args)
    deadline = time.monotonic() + 300
    seen = ''
    while 'sampling' not in seen and time.monotonic() < deadline:
        seen += proc.stderr.read(1)
    assert 'sampling' in seen, seen[-2000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith('error:')]
    assert len(lines) == 1 and 'epoch 1' in lines[0] and 'Traceback' not in err
    mid = torch.load(tmp_path / 'run' / 'checkpoint.pt', weights_only=True)['extra']['mid_epoch']
    assert mid['epoch'] == 1 and mid['step'] == 3          # every step of epoch 1 (48 images / 16)
    resumed = run_script('train_ddpm.py', args + ['--resume'])
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    rows = [json.loads(line) for line in open(tmp_path / 'run' / 'metrics.jsonl')]
    assert [r['epoch'] for r in rows] == [1]


def test_sighup_in_training_checkpoints_and_exits_130(data_dir, tmp_path):
    args = ['--data-dir', data_dir, '--no-download', '--device', 'cpu', '--epochs', '1', '--limit-train', '512',
            '--limit-test', '16', '--batch-size', '16', '--ll-k', '1', '--profile-per-class', '1',
            '--checkpoint-every', '2', '--out-dir', str(tmp_path / 'run')]
    proc = run_script('train_vae.py', args)
    code, err = stop_mid_epoch(proc, tmp_path / 'run' / 'checkpoint.pt', 1, signal.SIGHUP)
    assert code == 130 and 'Traceback' not in err
    assert torch.load(tmp_path / 'run' / 'checkpoint.pt', weights_only=True)['extra']['mid_epoch']['epoch'] == 1


# ----------------------------------------------------------------------------------------------------------------
# 14. the smaller ones

@pytest.mark.parametrize('seed', ['-1', str(2 ** 32)])
def test_seeds_outside_numpys_range_are_refused(data_dir, tmp_path, capsys, seed):
    with pytest.raises(SystemExit) as info:
        train_vae.main(vae(data_dir, tmp_path / 'run', '--seed', seed))
    assert info.value.code == 2 and '--seed' in capsys.readouterr().err


def test_simsiam_batch_of_one_is_refused_before_the_run_folder(data_dir, tmp_path, capsys):
    argv = ['--data-dir', data_dir, '--out-dir', str(tmp_path / 'run'), *SIMSIAM_TINY]
    argv[argv.index('--batch-size') + 1] = '1'
    with pytest.raises(SystemExit) as info:
        train_simsiam.main(argv)
    assert info.value.code == 2 and 'batch norm' in capsys.readouterr().err
    assert not (tmp_path / 'run').exists()


def test_a_stale_world_size_without_rank_is_one_line(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.delenv('RANK', raising=False)
    assert 'RANK' in refused(train_vae.main, vae(data_dir, tmp_path / 'run'), capsys)


def test_knn_with_a_tiny_temperature_still_votes():
    """knn_t = 1e-9: exp(s / t) overflows to inf and inf / inf votes were NaN, so the ranking was arbitrary. The
    nearest neighbour's class must win."""
    import q3_solution as Q
    bank = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]), dim=1)
    labels = torch.tensor([2, 0, 1])
    query = torch.nn.functional.normalize(torch.tensor([[0.9, 0.2]]), dim=1)
    for t in (1e-9, 1e-3, 0.1):
        assert Q.knn_predict(query, bank.t(), labels, 3, 3, t)[0, 0].item() == 2


@pytest.mark.parametrize('damage', ['truncate', 'delete', 'garbage'])
def test_resume_survives_a_damaged_metrics_log(finished_vae, data_dir, tmp_path, damage):
    copy = tmp_path / 'copy'
    copy.mkdir()
    for name in os.listdir(finished_vae):
        (copy / name).write_bytes((finished_vae / name).read_bytes())
    log = copy / 'metrics.jsonl'
    if damage == 'truncate':
        log.write_bytes(log.read_bytes()[:-7])
    elif damage == 'delete':
        log.unlink()
    else:
        log.write_text('{"epoch": 1, "seconds": 1.0, "train_loss": 1.0}\nnot json\n')
    assert train_vae.main(vae(data_dir, copy, '--epochs', '2', '--resume'))['epochs'] == 2
