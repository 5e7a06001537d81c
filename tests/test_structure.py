"""The house's structure, checked: bench.py times the drivers' own steps, driver functions stay short, and every
run records its hyperparameter block."""
import ast
import os

import pytest
import torch

import bench
import train_ddpm
import train_simsiam
import train_vae
from tests.conftest import ROOT


def _groups(optimizer):
    """What defines an optimiser's behaviour: per group, its settings and its parameters' shapes."""
    return [({k: v for k, v in g.items() if k != 'params'}, [tuple(p.shape) for p in g['params']])
            for g in optimizer.param_groups]


@pytest.mark.parametrize('driver, factory, args', [
    (train_vae, bench.vae_step, ()),
    (train_ddpm, bench.ddpm_step, ()),
    (train_simsiam, bench.simsiam_step, (torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8),)),
])
def test_bench_times_the_drivers_step(driver, factory, args, monkeypatch):
    """bench.py builds each model with the driver's build() and steps it with the driver's train_step(); its
    optimiser has the driver's groups (for SimSiam: the encoder's and the predictor's with its fixed lr)."""
    built, stepped = [], []
    real_build, real_step = driver.build, driver.train_step

    def build(*a, **k):
        built.append(real_build(*a, **k))
        return built[-1]

    def train_step(*a, **k):
        stepped.append(True)
        return real_step(*a, **k)
    monkeypatch.setattr(driver, 'build', build)
    monkeypatch.setattr(driver, 'train_step', train_step)
    out = factory(torch.device('cpu'), False, *args)
    assert len(built) == 1
    step = out[0] if isinstance(out, tuple) else out
    if driver is not train_ddpm:   # the DDPM's U-Net step costs seconds here; the other two are quick
        step()
        assert stepped == [True]
    optimizer = built[0][-1]
    torch.manual_seed(0)
    if driver is train_simsiam:
        _, _, fresh = real_build(bench.simsiam_settings(), train_simsiam.BASE_LR * bench.BATCH / 256,
                                  torch.device('cpu'))
        assert [g['fix_lr'] for g in optimizer.param_groups] == [False, True]
    elif driver is train_vae:
        _, _, fresh = real_build(dict(in_channels=3, encoder_features=train_vae.FEATURES,
                                      decoder_features=train_vae.FEATURES, z_dim=train_vae.Z_DIM, input_size=32),
                                 train_vae.LR, torch.device('cpu'))
    else:
        fresh = bench.ddpm_parts(torch.device('cpu'))[-1]
    assert _groups(optimizer) == _groups(fresh)


def test_driver_functions_are_short():
    """No function of a driver over about 60 lines: each reads as setup, data, model, loop, named final steps."""
    for name in ('train_vae.py', 'train_ddpm.py', 'train_simsiam.py'):
        tree = ast.parse(open(os.path.join(ROOT, name)).read())
        long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
                if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 65]
        assert not long, (name, long)


@pytest.mark.parametrize('driver', [train_vae, train_ddpm, train_simsiam])
def test_each_driver_has_one_hyperparameter_block_that_its_flags_default_to(driver):
    hp = driver.HYPERPARAMETERS
    args = driver.parse_args(['--data-dir', 'x'])
    for flag in ('epochs', 'batch_size', 'ema_decay', 'sample_every', 'num_samples', 'z_dim', 'll_k',
                 'profile_per_class', 'timesteps', 'dim', 'pred_dim', 'knn_k', 'knn_t'):
        if flag in hp and hasattr(args, flag):
            expected = hp[flag]
            assert getattr(args, flag) == expected, (driver.__name__, flag)
    lr = hp.get('lr', hp.get('base_lr'))
    assert args.lr == lr


def test_simsiam_lr_is_per_256_images():
    """--lr means the official code's base rate: the SGD lr is lr * batch / 256."""
    args = train_simsiam.parse_args(['--batch-size', '512'])
    assert args.lr == 0.03
    import subprocess
    import sys
    help_text = subprocess.run([sys.executable, os.path.join(ROOT, 'train_simsiam.py'), '--help'],
                               capture_output=True, text=True, timeout=120).stdout
    assert 'per 256 images' in ' '.join(help_text.split())
