"""train_vae.py end to end on real SVHN files from DATA_DIR (tiny sizes), and its refusals of bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import train_vae
from tests.conftest import ROOT

TINY = ['--limit-train', '160', '--limit-test', '48', '--batch-size', '32', '--ll-k', '2',
        '--profile-per-class', '2', '--sample-every', '1', '--no-download', '--device', 'cpu']


def run_driver(data_dir, out_dir, *extra):
    return train_vae.main(['--data-dir', data_dir, '--out-dir', str(out_dir), *TINY, *extra])


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'train_vae.py'), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope='module')
def two_epoch_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('vae') / 'run'
    metrics = run_driver(data_dir, out, '--epochs', '2')
    return out, metrics


def test_every_figure_and_metric(two_epoch_run):
    out, metrics = two_epoch_run
    summary = json.load(open(out / 'summary.json'))
    assert summary['model'] == 'vae'
    assert sorted(summary['figures']) == ['1.3a', '1.3b', '1.3c', '1.3d', '1.3e', '1.3f']
    assert len(summary['figures']['1.3b']) == 2 and len(summary['figures']['1.3c']) == 2  # every epoch here
    for paths in summary['figures'].values():
        for rel in paths:
            with Image.open(out / rel) as im:
                im.verify()
                assert im.format == 'PNG'
    m = summary['metrics']
    assert m == metrics
    assert m['num_train'] == 160 and m['num_test'] == 48 and m['epochs'] == 2 and m['ll_k'] == 2
    # A unit-variance Gaussian decoder cannot beat 0.5*log(2*pi) nats per pixel: a hard floor on -log p(x).
    assert m['test_log_likelihood'] < -3072 * 0.5 * torch.log(torch.tensor(2 * torch.pi)).item()
    assert m['test_bits_per_dim'] > 8.0
    rows = [json.loads(line) for line in open(out / 'metrics.jsonl')]
    assert [r['epoch'] for r in rows] == [1, 2]
    for r in rows:
        assert set(r) >= {'train_loss', 'train_nll', 'train_kl', 'test_neg_elbo', 'seconds'}
        assert abs(r['train_loss'] - (r['train_nll'] + r['train_kl'])) < 1e-3 * abs(r['train_loss'])
    config = json.load(open(out / 'config.json'))
    assert config['torch_version'] == torch.__version__ and config['device'] == 'cpu'
    assert config['args']['epochs'] == 2 and config['model_config']['z_dim'] == 32
    assert 'git_commit' in config and config['command'].startswith('python train_vae.py')
    profile = json.load(open(out / '1.3e_latent_profiles.json'))
    assert len(profile['profile']) == 10 and len(profile['profile'][0]) == 32
    assert summary['figures']['1.3e'] == ['1.3e_latent_profiles.png', '1.3e_class_minus_mean.png']
    minus = json.load(open(out / '1.3e_class_minus_mean.json'))
    offset = torch.tensor(profile['profile']).mean(0)   # the mean of the ten digit profiles
    assert torch.allclose(torch.tensor(minus['offset']), offset, atol=1e-6)
    for digit, marks in minus['top_dims'].items():   # each digit's largest |profile - offset|
        diff = torch.tensor(profile['profile'][int(digit)]) - offset
        assert [d for d, _ in marks] == diff.abs().argsort(descending=True)[:3].tolist()
        assert summary['metrics']['class_top_dim'][int(digit)] == marks[0][0]   # the summary names the largest
        assert summary['metrics']['class_top_value'][int(digit)] == pytest.approx(float(diff[marks[0][0]]), abs=1e-6)
    assert summary['metrics']['offset_dim'] == int(offset.abs().argmax())
    assert summary['metrics']['offset_value'] == pytest.approx(float(offset[int(offset.abs().argmax())]), abs=1e-6)


def test_active_units_count_the_posterior_means_that_vary(data_dir, two_epoch_run):
    """Burda et al.'s active units, recounted from the checkpoint on the same training images."""
    import vae_solution
    from studylib.data import load_split
    from studylib.run import load_checkpoint
    out, metrics = two_epoch_run
    ckpt = load_checkpoint(str(out / 'checkpoint.pt'))
    model = vae_solution.VAE(**ckpt['model_config'], device='cpu')
    model.load_state_dict(ckpt['model'])
    model.eval()
    images, _ = load_split('svhn', data_dir, 'train', False, 160)
    with torch.no_grad():
        mu = model.encode(images.float() / 127.5 - 1).mean.double()           # (160, 32)
    variance = ((mu - mu.mean(0)) ** 2).sum(0) / (len(mu) - 1)
    assert metrics['active_units'] == int((variance > 0.01).sum())
    saved = json.load(open(out / '1.3e_class_minus_mean.json'))
    assert saved['active_units'] == [d for d in range(32) if variance[d] > 0.01]


def test_checkpoint_rebuilds_the_model_without_the_driver(two_epoch_run):
    """The checkpoint alone says which model to build; its samples match the run's final weights."""
    import vae_solution
    from studylib.run import load_checkpoint
    ckpt = load_checkpoint(str(two_epoch_run[0] / 'checkpoint.pt'))
    model = vae_solution.VAE(**ckpt['model_config'], device='cpu')
    model.load_state_dict(ckpt['model'])
    assert ckpt['epoch'] == 2
    assert model.sample(4).shape == (4, 3, 32, 32)


def test_resume_equals_uninterrupted_run(data_dir, two_epoch_run, tmp_path):
    """One epoch, stop, --resume to two: the same weights as two epochs in one go (data order and RNGs restored)."""
    out = tmp_path / 'run'
    run_driver(data_dir, out, '--epochs', '1')
    run_driver(data_dir, out, '--epochs', '2', '--resume')
    rows = [json.loads(line) for line in open(out / 'metrics.jsonl')]
    assert [r['epoch'] for r in rows] == [1, 2]
    resumed = torch.load(out / 'checkpoint.pt', weights_only=True)['model']
    straight = torch.load(two_epoch_run[0] / 'checkpoint.pt', weights_only=True)['model']
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name


def test_corrupt_checkpoint_is_refused_and_kept(data_dir, tmp_path):
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'checkpoint.pt').write_bytes(b'PK\x03\x04 truncated')
    with pytest.raises(SystemExit) as exc:
        run_driver(data_dir, out, '--epochs', '1', '--resume')
    assert exc.value.code == 2
    assert (out / 'checkpoint.pt').read_bytes() == b'PK\x03\x04 truncated'
    with pytest.raises(SystemExit):   # a fresh start must not overwrite it either
        run_driver(data_dir, out, '--epochs', '1')
    assert (out / 'checkpoint.pt').read_bytes() == b'PK\x03\x04 truncated'


def test_missing_data_offline_is_one_clear_line(tmp_path):
    result = cli('--no-download', '--data-dir', str(tmp_path / 'nowhere'), '--out-dir', str(tmp_path / 'run'))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert 'train_32x32.mat is missing' in lines[0] and 'nowhere' in lines[0] and '--no-download' in lines[0]
    assert not (tmp_path / 'run').exists()


def test_resume_without_checkpoint(data_dir, tmp_path):
    result = cli('--no-download', '--data-dir', data_dir, '--out-dir', str(tmp_path / 'run'), '--resume',
                 '--limit-train', '64', '--limit-test', '16', '--profile-per-class', '1')
    assert result.returncode == 2
    assert 'no checkpoint' in result.stderr and 'Traceback' not in result.stderr


@pytest.mark.parametrize('flags', [['--epochs', '0'], ['--device', 'tpu'], ['--lr', '-1'], ['--batch-size', 'x']])
def test_bad_flags_are_argparse_errors(flags, tmp_path):
    result = cli(*flags, '--out-dir', str(tmp_path / 'run'))
    assert result.returncode == 2 and 'usage:' in result.stderr and 'Traceback' not in result.stderr


def test_help_documents_every_flag_with_default():
    out = cli('--help').stdout
    for flag in ['--data-dir', '--no-download', '--out-dir', '--epochs', '--batch-size', '--lr', '--seed',
                 '--device', '--limit-train', '--limit-test', '--resume', '--sample-every', '--ll-k',
                 '--profile-per-class', '--z-dim']:
        assert flag in out
    assert '(default: 30)' in out and '(default: 0.0001)' in out and '(default: 64)' in out


def test_sigkill_mid_epoch_then_resume_equals_the_uninterrupted_run(data_dir, tmp_path):
    """The issue's pre-emption test: SIGKILL inside epoch 2, --resume, and the final weights, metric rows and
    summary numbers are those of an uninterrupted run with the same seed."""
    from tests.conftest import stop_resume_compare
    import signal
    args = ['--data-dir', data_dir, '--no-download', '--device', 'cpu', '--epochs', '2', '--limit-train', '1600',
            '--limit-test', '16', '--batch-size', '16', '--checkpoint-every', '10', '--ll-k', '1',
            '--profile-per-class', '1', '--sample-every', '2']
    code, _ = stop_resume_compare('train_vae.py', args, tmp_path, epoch=2, signum=signal.SIGKILL)
    assert code == -signal.SIGKILL
    rows = [[{k: v for k, v in json.loads(line).items() if k != 'seconds'} for line in open(p / 'metrics.jsonl')]
            for p in (tmp_path / 'a', tmp_path / 'b')]
    assert rows[0] == rows[1] and len(rows[0]) == 2
    a, b = (json.load(open(p / 'summary.json'))['metrics'] for p in (tmp_path / 'a', tmp_path / 'b'))
    assert a['test_log_likelihood'] == b['test_log_likelihood']


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    """lr 1e9 diverges at the second step: the run exits 2 naming it, and the checkpoint taken after step 1 (finite
    weights) is what the folder keeps; nothing later was saved."""
    out = tmp_path / 'nan'
    bad = cli('--data-dir', data_dir, '--out-dir', str(out), *TINY, '--epochs', '1', '--lr', '1e9',
              '--checkpoint-every', '1')
    assert bad.returncode == 2
    errors = [line for line in bad.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'non-finite at epoch 1, step' in errors[0] and '--allow-nan' in errors[0]
    step = int(errors[0].split('step ')[1].split()[0])
    ckpt = torch.load(out / 'checkpoint.pt', weights_only=True)
    assert ckpt['extra']['mid_epoch']['step'] == step - 1          # the state just before the bad step
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values() if v.is_floating_point())
