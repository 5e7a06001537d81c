"""train_ddpm.py, compare_ddpm.py and probe_ddpm.py end to end on real SVHN files from DATA_DIR (tiny T and sizes)."""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import compare_ddpm
import ddpm_solution
import probe_ddpm
import train_ddpm
import train_vae
from tests.conftest import ROOT

TINY = ['--limit-train', '32', '--limit-test', '16', '--batch-size', '16', '--num-samples', '4',
        '--quality-samples', '4',
        '--sample-every', '1', '--no-download', '--device', 'cpu', '--epochs', '2']


@pytest.fixture(scope='module')
def vae_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('vae') / 'run'
    train_vae.main(['--data-dir', data_dir, '--out-dir', str(out), '--epochs', '1', '--limit-train', '64',
                    '--limit-test', '16', '--ll-k', '1', '--profile-per-class', '1', '--no-download',
                    '--device', 'cpu'])
    return out


@pytest.fixture(scope='module')
def ddpm_runs(data_dir, vae_run, tmp_path_factory):
    root = tmp_path_factory.mktemp('ddpm')
    t10 = train_ddpm.main(['--data-dir', data_dir, '--out-dir', str(root / 'T10'), '--timesteps', '10',
                           '--compare-vae', str(vae_run), *TINY])
    t20 = train_ddpm.main(['--data-dir', data_dir, '--out-dir', str(root / 'T20'), '--timesteps', '20',
                           '--t-primes', '0,5,19', *TINY])
    return root, t10, t20


def test_every_figure_and_the_t_star_metric(ddpm_runs):
    root, t10, t20 = ddpm_runs
    summary = json.load(open(root / 'T10' / 'summary.json'))
    assert summary['model'] == 'ddpm'
    assert sorted(summary['figures']) == ['2.2a', '2.2b', '2.2c', '2.2d']
    assert len(summary['figures']['2.2b']) == 2 and len(summary['figures']['2.2c']) == 2
    assert summary['figures']['2.2d'] == ['2.2d_ddpm_vs_vae.png']
    for paths in summary['figures'].values():
        for rel in paths:
            with Image.open(root / 'T10' / rel) as im:
                im.verify()
    m = summary['metrics']
    assert m == t10 and m['timesteps'] == 10 and m['epochs'] == 2
    assert m['t_primes'] == train_ddpm.default_t_primes(10) and m['t_star'] in m['t_primes']
    assert len(m['restored_psnr']) == len(m['t_primes']) == len(m['noised_psnr'])
    # t* is the first t' whose restorations keep the digit (by the classifier) below the midpoint of clean and
    # unrelated images; the sweep used every one of the 16 test images (--sweep-images 256 caps at the test set)
    assert m['sweep_images'] == 16 and len(m['restored_digit_accuracy']) == len(m['t_primes'])
    assert m['t_star_threshold'] == pytest.approx((m['clean_digit_accuracy'] + m['chance_digit_accuracy']) / 2)
    below = [t for t, a in zip(m['t_primes'], m['restored_digit_accuracy']) if a < m['t_star_threshold']]
    assert m['t_star'] == (below[0] if below else m['t_primes'][-1])
    assert all(a in [100 * k / 16 for k in range(17)] for a in m['restored_digit_accuracy'])   # shares of 16
    assert m['sample_seconds'] > 0 and m['sample_batch'] == 4
    for prefix in ('', 'vae_', 'reference_'):   # the DDPM's, the VAE's and the training images' quality
        assert m[prefix + 'digit_fd'] >= 0 and 0.1 <= m[prefix + 'digit_confidence'] <= 1
    assert m['quality_samples'] == 4 and m['quality_reference'] == 16 and m['digit_net_test_accuracy'] > 10
    assert t20['t_primes'] == [0, 5, 19] and t20['t_star'] in (0, 5, 19)
    for prefix in ('', 'vae_', 'reference_'):   # a second draw of each, to judge differences by
        assert m[prefix + 'digit_fd_redraw'] >= 0 and m[prefix + 'digit_fd_redraw'] != m[prefix + 'digit_fd']
    rows = [json.loads(line) for line in open(root / 'T10' / 'metrics.jsonl')]
    assert [r['epoch'] for r in rows] == [1, 2] and all('sample_seconds' in r for r in rows)
    assert all(r['digit_fd'] >= 0 for r in rows) and rows[-1]['digit_fd'] == pytest.approx(m['digit_fd'])
    samples = np.load(root / 'T10' / 'samples.npz')['arr_0']   # guided-diffusion's evaluator layout
    assert samples.dtype == np.uint8 and samples.shape == (4, 32, 32, 3) and samples.std() > 0
    ckpt = torch.load(root / 'T10' / 'checkpoint.pt', weights_only=True)
    assert ckpt['model_config']['timesteps'] == 10


def test_vae_run_keeps_its_final_samples(vae_run):
    samples = np.load(vae_run / 'samples.npz')['arr_0']
    assert samples.dtype == np.uint8 and samples.shape == (64, 32, 32, 3) and samples.std() > 0


def test_compare_by_recipe_plots_digit_fd_against_training_minutes(ddpm_runs, tmp_path):
    root, t10, t20 = ddpm_runs
    out = tmp_path / 'recipes'
    metrics = compare_ddpm.main(['--by', 'recipe', str(root / 'T10'), str(root / 'T20'), '--out-dir', str(out)])
    rows = [json.loads(line) for line in open(root / 'T10' / 'metrics.jsonl')]
    curve = metrics['T10']
    assert curve['digit_fd'] == [r['digit_fd'] for r in rows]
    expected = [sum(r['seconds'] for r in rows[:i + 1]) / 60 for i in range(len(rows))]
    assert curve['minutes'] == pytest.approx(expected, abs=0.01) and curve['final_digit_fd'] == t10['digit_fd']
    assert 'assignment recipe (T10): batch 16' in curve['label'] and curve['run'] == str(root / 'T10')
    assert curve['train_minutes'] == pytest.approx(expected[-1], abs=0.01)
    assert (curve['epochs'], curve['num_train']) == (t10['epochs'], t10['num_train'])   # the report's scale line
    summary = json.load(open(out / 'summary.json'))
    assert summary['model'] == 'ddpm-recipes' and summary['figures'] == {'2.2e': ['recipes_fd_vs_minutes.png']}
    with Image.open(out / 'recipes_fd_vs_minutes.png') as im:
        im.verify()


def test_compare_writes_the_2_3a_figure_and_table(ddpm_runs, tmp_path):
    root, t10, t20 = ddpm_runs
    metrics = compare_ddpm.main([str(root / 'T20'), str(root / 'T10'), '--out-dir', str(tmp_path / 'cmp')])
    assert list(metrics) == ['T10', 'T20']
    assert metrics['T20']['sample_seconds'] == t20['sample_seconds']
    summary = json.load(open(tmp_path / 'cmp' / 'summary.json'))
    assert summary['figures'] == {'2.3a': ['2.3a_tradeoff.png']}
    with Image.open(tmp_path / 'cmp' / '2.3a_tradeoff.png') as im:
        im.verify()
    table = open(tmp_path / 'cmp' / '2.3a_table.md').read()
    assert '| 10 |' in table and '| 20 |' in table
    for name, run in (('T10', t10), ('T20', t20)):   # the exact T-step chain beside the figure's sampler
        chain = run['samplers'][f'ddpm_{name[1:]}']
        assert metrics[name]['chain_seconds'] == chain['seconds']
        assert metrics[name]['chain_digit_fd'] == chain['digit_fd']
        assert f'| {chain["seconds"]:.1f} | {chain["digit_fd"]:.2f} |' in table


def test_compare_refuses_a_vae_run(vae_run, tmp_path):
    with pytest.raises(SystemExit) as exc:
        compare_ddpm.main([str(vae_run), '--out-dir', str(tmp_path / 'cmp')])
    assert exc.value.code == 2


def test_compare_vae_must_be_a_vae_run(data_dir, ddpm_runs, tmp_path):
    root = ddpm_runs[0]
    for bad in (root / 'T10', tmp_path / 'empty'):
        result = subprocess.run([sys.executable, os.path.join(ROOT, 'train_ddpm.py'), '--data-dir', data_dir,
                                 '--out-dir', str(tmp_path / 'run'), '--compare-vae', str(bad), *TINY],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1 and '--compare-vae' in result.stderr
        assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('flags', [['--timesteps', '0'], ['--t-primes', '5,x'], ['--timesteps', '10',
                                                                                  '--t-primes', '10']])
def test_bad_flags_are_argparse_errors(flags, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'train_ddpm.py'), *flags],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and 'usage:' in result.stderr and 'Traceback' not in result.stderr


def test_missing_data_offline(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'train_ddpm.py'), '--no-download', '--data-dir',
                             str(tmp_path), '--out-dir', str(tmp_path / 'run')],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and 'train_32x32.mat is missing' in result.stderr
    assert not (tmp_path / 'run').exists()


def test_choose_t_star_is_the_first_crossing_of_the_midpoint():
    t, threshold = train_ddpm.choose_t_star([10, 20, 30, 40], [30.0, 25.0, 19.0, 12.0], chance=10.0)
    assert threshold == 20.0 and t == 30
    assert train_ddpm.choose_t_star([1, 2], [30.0, 29.0], 10.0)[0] == 2   # never crosses: the last t'


class _Affine(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x, t):
        return self.w * x + 0.01 * t.float().view(-1, 1, 1, 1)


class _MeanOnly(ddpm_solution.DiffusionSchedule):
    """Reverse steps without the posterior noise: makes every chain deterministic, so bookkeeping can be compared."""

    def p_sample(self, model, x, t, t_index):
        return super().p_sample(model, x, t, 0)


def test_t_prime_sweep_restores_each_image_from_its_own_t_prime():
    """The batched sweep must equal, image for image, a separate chain x_t' -> x_0 run for each t' alone:
    catches an image updated before its t' is reached, or skipped after."""
    diffusion = _MeanOnly(12)
    model = _Affine()
    x0 = torch.rand(3, 3, 4, 4) * 2 - 1
    t_primes = [0, 4, 11]
    noised, restored = train_ddpm.t_prime_sweep(diffusion, model, x0, t_primes, seed=0)
    assert noised.shape == restored.shape == (3, 3, 3, 4, 4)
    for k, tp in enumerate(t_primes):
        x = noised[k]
        for i in reversed(range(tp + 1)):
            t = torch.full((3,), i)
            x = (x - diffusion.betas[i] / diffusion.sqrt_one_minus_alphas_cumprod[i] * model(x, t)) \
                / diffusion.alphas[i].sqrt()
        assert torch.allclose(restored[k], x, atol=1e-5), tp
    # the noised inputs are q_sample draws at their own t': their spread around sqrt(abar) x0 grows with t'
    spread = [(noised[k] - diffusion.sqrt_alphas_cumprod[tp] * x0).std().item() for k, tp in enumerate(t_primes)]
    assert spread[0] < spread[1] < spread[2]


def test_probe_writes_2_3b_from_the_two_run_folders(ddpm_runs, vae_run, data_dir, tmp_path):
    root, _, _ = ddpm_runs
    args = ['--ddpm', str(root / 'T20'), '--vae', str(vae_run), '--data-dir', data_dir, '--no-download',
            '--device', 'cpu', '--limit-train', '60', '--limit-test', '30', '--out-dir', str(tmp_path / 'probe')]
    metrics = probe_ddpm.main(args + ['--t', '0,19'])
    summary = json.load(open(tmp_path / 'probe' / 'summary.json'))
    assert summary['model'] == 'ddpm-probe' and summary['figures'] == {'2.3b': ['2.3b_feature_probe.png']}
    assert summary['run']['command'].startswith('python probe_ddpm.py --ddpm')
    assert metrics['t'] == [0, 19] and sorted(metrics['accuracy']) == ['pixels', 'unet', 'vae']
    assert all(0 <= metrics['accuracy'][s][f't{t}'] <= 100 for s in metrics['accuracy'] for t in (0, 19))
    with Image.open(tmp_path / 'probe' / '2.3b_feature_probe.png') as im:
        im.verify()
    with pytest.raises(SystemExit) as exc:   # T=20 has steps 0..19
        probe_ddpm.main(args + ['--t', '20'])
    assert exc.value.code == 2


def test_ema_weights_sample_and_ddim_is_the_figure_sampler(data_dir, tmp_path):
    """--ema-decay: the checkpoint holds an EMA of the weights (and its update count), distinct from them;
    --sampler ddim: the figures use DDIM and the final stage scores DDPM-T beside it."""
    out = tmp_path / 'ema'
    m = train_ddpm.main(['--data-dir', data_dir, '--out-dir', str(out), '--timesteps', '60', '--t-primes', '0,30',
                         '--ema-decay', '0.9', '--sampler', 'ddim', '--sample-steps', '6',
                         *TINY[:-2], '--epochs', '1'])
    assert m['sampler'] == 'DDIM, 6 steps' and m['ema_decay'] == 0.9 and m['ema_updates'] == 2
    assert sorted(m['samplers']) == ['ddim_50', 'ddpm_60'] and m['samplers']['ddim_50']['seconds'] > 0
    ckpt = torch.load(out / 'checkpoint.pt', weights_only=True)
    ema = ckpt['extra']['ema']
    assert int(ema['n_averaged']) == 2                     # 32 images / batch 16: one update per step
    # AveragedModel copies the weights at the first update, then 0.9 * ema + 0.1 * weights: not the weights
    raw = ckpt['model']['final_conv.1.weight']
    assert not torch.equal(ema['module.final_conv.1.weight'], raw)


def test_bad_sampler_flags_are_refused(capsys):
    for bad in (['--ema-decay', '1'], ['--ema-decay', '-0.1'], ['--sampler', 'ddim', '--sample-steps', '2000']):
        with pytest.raises(SystemExit) as exc:
            train_ddpm.parse_args(bad)
        assert exc.value.code == 2


def test_ctrl_c_checkpoints_the_step_and_resume_equals_the_uninterrupted_run(data_dir, tmp_path):
    """SIGINT (Ctrl-C) mid-epoch: exit status 130 with one line, a checkpoint at that step (EMA included), and
    --resume ends with the weights and EMA of an uninterrupted run."""
    from tests.conftest import stop_resume_compare
    import signal
    args = ['--data-dir', data_dir, '--no-download', '--device', 'cpu', '--epochs', '1', '--limit-train', '96',
            '--limit-test', '16', '--batch-size', '8', '--num-samples', '2',
            '--quality-samples', '2', '--timesteps', '10',
            '--checkpoint-every', '1', '--ema-decay', '0.9']
    code, err = stop_resume_compare('train_ddpm.py', args, tmp_path, epoch=1, signum=signal.SIGINT)
    lines = [line for line in err.splitlines() if line.startswith('error:')]
    assert code == 130 and len(lines) == 1
    assert 'interrupted in epoch 1 after step' in lines[0] and '--resume' in lines[0]


def test_inception_fid_without_its_weights_fails_before_training(data_dir, tmp_path, monkeypatch):
    """--inception-fid on a machine without torch-fidelity or the weights: one line, exit 2, before any training."""
    from studylib import UserError

    def unavailable(*args, **kwargs):
        raise UserError('the Inception FID needs torch-fidelity: pip install torch-fidelity')
    monkeypatch.setattr(train_ddpm, 'inception_fd', unavailable)
    with pytest.raises(SystemExit) as exc:
        train_ddpm.main(['--data-dir', data_dir, '--out-dir', str(tmp_path / 'fid'), '--timesteps', '10',
                         '--inception-fid', *TINY])
    assert exc.value.code == 2 and not (tmp_path / 'fid').exists()


def test_clip_denoised_sampler_option(tiny_svhn, tmp_path):
    """--clip-denoised runs every sampler of the run with x_0 clipped and says so in the figures' sampler name."""
    metrics = train_ddpm.main(['--data-dir', tiny_svhn, '--out-dir', str(tmp_path / 'run'), '--no-download',
                               '--device', 'cpu', '--epochs', '1', '--batch-size', '16', '--num-samples', '2',
                               '--quality-samples', '2',
                               '--timesteps', '60', '--t-primes', '5,10', '--limit-test', '16', '--clip-denoised'])
    assert metrics['clip_denoised'] is True and 'x0 clipped' in metrics['sampler']
    assert set(metrics['samplers']) == {'ddpm_60', 'ddim_50'}
    # the template's own sampler (unclipped p_sample_loop) beside the run's, from the same noise
    summary = json.load(open(tmp_path / 'run' / 'summary.json'))
    assert summary['figures']['2.2d'] == ['2.2d_final_samples.png', '2.2d_template_sampler.png']
    assert metrics['template_sampler']['digit_fd'] >= 0 and metrics['template_sampler']['seconds'] > 0


def test_draw_many_reuses_the_figure_batch_then_draws_fresh_noise(monkeypatch):
    """--quality-samples beyond one batch: the figure's batch first, then batches of --num-samples, each from its
    own seed (seed + 10,000 k), the last one cut to size."""
    calls = []

    def fake_draw(study, n, seed, *a, **k):
        calls.append((n, seed))
        return torch.full((n, 1), float(seed)), 0.0
    monkeypatch.setattr(train_ddpm, 'draw_samples', fake_draw)
    study = type('S', (), {'args': argparse.Namespace(num_samples=4)})()
    first = torch.full((4, 1), -1.0)
    out = train_ddpm.draw_many(study, 10, 7, first=first)
    assert calls == [(4, 10_007), (2, 20_007)]
    assert out.flatten().tolist() == [-1.0] * 4 + [10_007.0] * 4 + [20_007.0] * 2
    calls.clear()
    assert train_ddpm.draw_many(study, 4, 8).flatten().tolist() == [8.0] * 4 and calls == [(4, 8)]


def test_a_recipe_run_records_what_ran(data_dir, tmp_path):
    """--recipe cpu with one flag overridden: config.json's args are the values the run used (the recipe's batch,
    sampler and clipping, the explicit --lr), the optimizer in the checkpoint has that lr, the metrics name the
    recipe's sampler, and the fixed hyperparameters are recorded under "constants"."""
    out = tmp_path / 'cpu'
    metrics = train_ddpm.main(['--data-dir', data_dir, '--out-dir', str(out), '--recipe', 'cpu', '--lr', '5e-4',
                               '--timesteps', '10', '--sample-steps', '3', '--t-primes', '0,5',
                               '--limit-train', '48', '--limit-test', '16', '--num-samples', '2',
                               '--quality-samples', '2',
                               '--no-download', '--device', 'cpu', '--epochs', '1'])
    config = json.load(open(out / 'config.json'))
    ran = {k: config['args'][k] for k in ('recipe', 'batch_size', 'lr', 'sampler', 'clip_denoised', 'ema_decay')}
    assert ran == dict(recipe='cpu', batch_size=16, lr=5e-4, sampler='ddim', clip_denoised=True, ema_decay=0.995)
    assert config['constants'] == dict(sweep_grid=train_ddpm.SWEEP_GRID,
                                       quality_reference=train_ddpm.QUALITY_REFERENCE)
    assert 'hyperparameters' not in config
    ckpt = torch.load(out / 'checkpoint.pt', weights_only=True)
    assert [g['lr'] for g in ckpt['optimizer']['param_groups']] == [5e-4]
    assert int(ckpt['extra']['ema']['n_averaged']) == 3              # 48 images / the recipe's batch 16
    assert metrics['sampler'].startswith('DDIM, 3 steps') and 'x0 clipped' in metrics['sampler']
    assert not (out / '.lock').exists()
