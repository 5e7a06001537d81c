"""The support package: dataset readers against hand-built files in the official layouts, batching, run folder,
checkpoints and their refusals. No real data needed."""
import json
import math
import os
import pickle
import random

import numpy as np
import pytest
import torch
from scipy.io import savemat

from studylib import UserError
from studylib.data import batch_indices, first_per_class, load_cifar10, load_svhn, to_unit_range
from studylib.run import (RunDir, load_checkpoint, restore, rng_state, save_checkpoint, set_rng_state)


def test_svhn_reader_layout_and_label_10(tmp_path):
    """X is (32, 32, 3, N) in the .mat file and 10 means digit 0: catches a wrong transpose or label shift."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(32, 32, 3, 5), dtype=np.uint8)
    y = np.array([[10], [1], [9], [10], [5]], dtype=np.uint8)
    savemat(tmp_path / 'train_32x32.mat', {'X': x, 'y': y})
    images, labels = load_svhn(str(tmp_path), 'train', download=False)
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 1, 9, 0, 5]
    for n, c, r, col in [(0, 0, 0, 0), (3, 2, 31, 7), (4, 1, 5, 30)]:
        assert images[n, c, r, col] == x[r, col, c, n]


def test_cifar_reader_layout(tmp_path):
    """Each (3072,) row is the R plane, then G, then B, row-major: catches an HWC reshape."""
    folder = tmp_path / 'cifar-10-batches-py'
    folder.mkdir()
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
    with open(folder / 'test_batch', 'wb') as f:
        pickle.dump({b'data': rows, b'labels': [3, 1, 4, 1]}, f)
    images, labels = load_cifar10(str(tmp_path), 'test', download=False)
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == [3, 1, 4, 1]
    assert images[2, 1, 3, 4] == rows[2, 1024 + 3 * 32 + 4]
    assert images[0, 2, 31, 31] == rows[0, 3071]


def test_missing_and_corrupt_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match=r'train_32x32\.mat is missing.*--no-download'):
        load_svhn(str(tmp_path), 'train', download=False)
    with pytest.raises(UserError, match=r'data_batch_1 is missing'):
        load_cifar10(str(tmp_path), 'train', download=False)
    (tmp_path / 'test_32x32.mat').write_bytes(b'not a mat file')
    with pytest.raises(UserError, match='unreadable'):
        load_svhn(str(tmp_path), 'test', download=False)


def test_unit_range_is_p_over_127_5_minus_1():
    x = torch.arange(256, dtype=torch.uint8)
    assert torch.allclose(to_unit_range(x), torch.arange(256, dtype=torch.float64).div(127.5).sub(1).float(),
                          atol=1e-6)
    assert to_unit_range(x)[0] == -1 and to_unit_range(x)[-1] == 1


def test_batch_indices_cover_each_index_once():
    g = torch.Generator().manual_seed(0)
    batches = batch_indices(10, 4, g)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    assert [len(b) for b in batch_indices(10, 4, g, drop_last=True)] == [4, 4]
    assert torch.cat(batch_indices(5, 2, shuffle=False)).tolist() == [0, 1, 2, 3, 4]
    # the order comes from the CPU generator alone: asking for a device must not change it (resume relies on it)
    a = batch_indices(10, 4, torch.Generator().manual_seed(3))
    b = batch_indices(10, 4, torch.Generator().manual_seed(3), device=torch.device('cpu'))
    assert [x.tolist() for x in a] == [x.tolist() for x in b]


def test_first_per_class():
    labels = torch.tensor([1, 0, 1, 0, 2, 2, 1])
    assert first_per_class(labels, 2, num_classes=3).tolist() == [1, 3, 0, 2, 4, 5]
    with pytest.raises(UserError, match='class 0 has only 2'):
        first_per_class(labels, 3, num_classes=3)


def _tiny_state():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_checkpoint_round_trip_restores_weights_optimizer_and_rngs(tmp_path):
    model, optimizer = _tiny_state()
    path = str(tmp_path / 'checkpoint.pt')
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    save_checkpoint(path, model_name='toy', model_config={'d': 3}, model=model, optimizer=optimizer, epoch=4,
                    extra={'note': 'x'})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    assert not os.path.exists(path + '.tmp')
    ckpt = load_checkpoint(path)
    assert ckpt['epoch'] == 4 and ckpt['model_name'] == 'toy' and ckpt['extra'] == {'note': 'x'}
    fresh, fresh_opt = torch.nn.Linear(3, 2), None
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.1)
    restore(ckpt, fresh, fresh_opt)
    assert torch.equal(fresh.weight, model.weight)
    assert fresh_opt.state_dict()['state'][0]['step'] == optimizer.state_dict()['state'][0]['step']
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_rng_state_survives_weights_only_load(tmp_path):
    torch.save(rng_state(), tmp_path / 'rng.pt')
    state = torch.load(tmp_path / 'rng.pt', weights_only=True)
    a = torch.randn(2)
    set_rng_state(state)
    assert torch.equal(torch.randn(2), a)


@pytest.mark.parametrize('content', [b'', b'garbage bytes', 'truncated'])
def test_bad_checkpoints_are_refused(tmp_path, content):
    path = str(tmp_path / 'checkpoint.pt')
    if content == 'truncated':
        model, optimizer = _tiny_state()
        save_checkpoint(path, model_name='toy', model_config={}, model=model, optimizer=optimizer, epoch=1)
        with open(path, 'rb') as f:
            content = f.read()[:200]
    with open(path, 'wb') as f:
        f.write(content)
    with pytest.raises(UserError, match='unreadable, truncated or not a checkpoint'):
        load_checkpoint(path)


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A kill in the middle of writing (simulated: the temp file holds half the bytes when the process dies) must
    leave the last good checkpoint.pt loadable and unchanged."""
    import studylib.run as R
    model, optimizer = _tiny_state()
    path = str(tmp_path / 'checkpoint.pt')
    save_checkpoint(path, model_name='toy', model_config={}, model=model, optimizer=optimizer, epoch=1)
    good = open(path, 'rb').read()

    def dying_fsync(fd):
        os.ftruncate(fd, len(good) // 2)
        raise KeyboardInterrupt('killed while saving')

    monkeypatch.setattr(R.os, 'fsync', dying_fsync)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model_name='toy', model_config={}, model=model, optimizer=optimizer, epoch=2)
    monkeypatch.undo()
    assert open(path, 'rb').read() == good
    assert load_checkpoint(path)['epoch'] == 1


def test_foreign_checkpoint_is_refused(tmp_path):
    path = tmp_path / 'checkpoint.pt'
    torch.save({'model': {}}, path)
    with pytest.raises(UserError, match='not a checkpoint of this project'):
        load_checkpoint(str(path))


def test_mismatched_weights_are_refused(tmp_path):
    model, optimizer = _tiny_state()
    path = str(tmp_path / 'checkpoint.pt')
    save_checkpoint(path, model_name='toy', model_config={}, model=model, optimizer=optimizer, epoch=1)
    with pytest.raises(UserError, match='do not fit the model'):
        restore(load_checkpoint(path), torch.nn.Linear(4, 2))


def test_run_dir_refuses_to_clobber_and_resumes(tmp_path):
    run = RunDir(str(tmp_path / 'run'))
    config = {'model': 'toy', 'model_config': {'d': 3}, 'command': 'python toy.py'}
    with pytest.raises(UserError, match='--resume: no checkpoint'):
        run.start(config, resume=True)
    assert run.start(config, resume=False) is None
    for epoch in (1, 2, 3):
        run.log_metrics({'epoch': epoch, 'loss': float(epoch)})
    model, optimizer = _tiny_state()
    run.save_checkpoint(model_name='toy', model_config={'d': 3}, model=model, optimizer=optimizer, epoch=2)
    before = open(run.checkpoint_path, 'rb').read()
    with pytest.raises(UserError, match='holds an unfinished run'):
        run.start(config, resume=False)
    with pytest.raises(UserError, match='holds a toy with config'):
        run.start({'model': 'toy', 'model_config': {'d': 4}}, resume=True)
    assert open(run.checkpoint_path, 'rb').read() == before
    assert len(run.read_metrics()) == 3          # refusals change nothing
    assert run.start(config, resume=True)['epoch'] == 2
    assert [r['epoch'] for r in run.read_metrics()] == [1, 2]   # the row after the checkpoint is dropped
    run.write_summary('toy', {'1.3a': [run.file('a.png')]}, {'m': math.pi})
    summary = json.load(open(run.file('summary.json')))
    # the provenance comes from config.json, which is the config the run was started with
    assert summary == {'model': 'toy', 'figures': {'1.3a': ['a.png']}, 'metrics': {'m': math.pi},
                       'run': {'command': config['command']}}


def test_psnr_against_its_definition():
    from train_ddpm import psnr
    a = torch.zeros(3, 3, 4, 4)
    assert torch.allclose(psnr(a, a + 0.5), torch.full((3,), 10 * math.log10(4 / 0.25)))
    # values outside [-1, 1] are judged as displayed: clamped, so 5.0 counts as 1.0 (MSE 1 against 0)
    assert torch.allclose(psnr(a, a + 5.0), torch.full((3,), 10 * math.log10(4.0)))



def test_amp_is_bf16_autocast_only_where_asked():
    from studylib.trainer import autocast, prepare_model, use_amp
    cpu = torch.device('cpu')
    assert use_amp('auto', cpu) is False       # bf16 is emulated, slower, on most CPUs
    assert use_amp('on', cpu) is True
    assert use_amp('off', torch.device('cuda')) is False
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast(cpu, True):
        assert (a @ b).dtype == torch.bfloat16
    with autocast(cpu, False):
        assert (a @ b).dtype == torch.float32
    model = torch.nn.Linear(2, 2)
    assert prepare_model(model, cpu) is model                           # nothing to change on the CPU
