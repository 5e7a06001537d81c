"""Every speed path a GPU user's defaults take, run on the CPU: bf16 autocast (--amp on), channels_last and fused
optimisers (forced with STUDYLIB_SPEED_PATHS=all, studylib.trainer) and torch.compile (--compile), for each driver.

CPU bf16 exercises the code path, not CUDA's numerics; what is left unexecuted here is the CUDA kernels themselves
(scripts/gpu_check.py runs those). Each run must end with finite losses and a checkpoint whose weights carry plain
key names (no '_orig_mod.' from torch.compile, no 'module.' from DDP), load strictly into a freshly built model, and
whose optimizer records the fused kernels.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

RUNS = {
    'train_vae.py': ['--limit-train', '64', '--limit-test', '16', '--batch-size', '16', '--ll-k', '1',
                     '--profile-per-class', '1'],
    'train_ddpm.py': ['--limit-train', '32', '--limit-test', '16', '--batch-size', '16', '--num-samples', '2',
                      '--quality-samples', '2',
                      '--timesteps', '10'],
    'train_simsiam.py': ['--limit-train', '64', '--limit-test', '32', '--batch-size', '16', '--knn-k', '10',
                         '--dim', '64', '--pred-dim', '16'],
}


def _fresh_model(script, ckpt):
    import ddpm_solution
    import vae_solution
    config = dict(ckpt['model_config'])
    if script == 'train_vae.py':
        return vae_solution.VAE(**config, device='cpu')
    if script == 'train_ddpm.py':
        return ddpm_solution.Unet(**{k: v for k, v in config.items()
                                     if k not in ('timesteps', 'beta_start', 'beta_end')})
    return None   # SimSiam: its backbone is chosen by the recipe; the key names are checked below


@pytest.mark.parametrize('script', sorted(RUNS))
def test_driver_with_every_speed_path_on(script, data_dir, tmp_path):
    out = tmp_path / 'run'
    env = dict(os.environ, OMP_NUM_THREADS='2', STUDYLIB_SPEED_PATHS='all', PYTHONUNBUFFERED='1')
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), '--data-dir', data_dir, '--no-download',
                             '--device', 'cpu', '--epochs', '1', '--amp', 'on', '--compile', *RUNS[script],
                             '--out-dir', str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / 'metrics.jsonl')]
    assert rows and all(torch.isfinite(torch.tensor(r['train_loss'])) for r in rows)
    ckpt = torch.load(out / 'checkpoint.pt', weights_only=True)
    keys = list(ckpt['model'])
    assert keys and not [k for k in keys if k.startswith(('_orig_mod.', 'module.')) or '._orig_mod.' in k]
    assert all(g.get('fused') is True for g in ckpt['optimizer']['param_groups'])
    model = _fresh_model(script, ckpt)
    if model is not None:
        model.load_state_dict(ckpt['model'], strict=True)
        for key, value in model.state_dict().items():
            assert torch.equal(value, ckpt['model'][key]), key
    if ckpt['extra'].get('ema') is not None:
        assert not [k for k in ckpt['extra']['ema'] if '_orig_mod' in k]
