"""Malformed, damaged and crafted dataset files: each must be one actionable UserError line naming the file, never
a traceback, silently wrong data or code run. Every file is written here, in tmp_path, from a valid small copy of
the standard layout with one aspect broken."""
import builtins
import errno
import os
import pickle
import re

import numpy as np
import pytest
import torch
from scipy.io import savemat

from studylib import UserError
from studylib.data import load_cifar10, load_split, load_svhn

ROWS = 4  # images per small CIFAR batch
CIFAR_NAMES = [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']


def assert_user_error(call, path, *patterns):
    """`call` raises a UserError whose message is one line, names `path` and matches every pattern."""
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert '\n' not in message, message
    assert str(path) in message, message
    for pattern in patterns:
        assert re.search(pattern, message), f'{pattern!r} not in: {message}'
    return message


def write_batch(path, batch, protocol=pickle.DEFAULT_PROTOCOL):
    with open(path, 'wb') as f:
        pickle.dump(batch, f, protocol=protocol)


@pytest.fixture
def cifar(tmp_path):
    """A valid CIFAR-10 folder (5 train batches + test batch of ROWS images each): (data_dir, folder, batches)."""
    folder = tmp_path / 'cifar-10-batches-py'
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for k, name in enumerate(CIFAR_NAMES):
        batches[name] = {b'batch_label': f'{name} of 6'.encode(),
                         b'labels': [int(v) for v in rng.integers(0, 10, ROWS)],
                         b'data': rng.integers(0, 256, size=(ROWS, 3072), dtype=np.uint8),
                         b'filenames': [f'img_{k}_{i}.png'.encode() for i in range(ROWS)]}
        # protocol 4 writes arrays as numpy's _reconstruct (like the official files), 5 as _frombuffer
        write_batch(folder / name, batches[name], protocol=4 if k % 2 else 5)
    return tmp_path, folder, batches


def test_valid_small_cifar_loads(cifar):
    """A regression guard for the checks below: the standard layout still loads, rows as R, G, B planes."""
    data_dir, _, batches = cifar
    images, labels = load_cifar10(str(data_dir), 'train', download=False)
    assert images.shape == (5 * ROWS, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64
    assert labels.tolist() == sum((batches[f'data_batch_{i}'][b'labels'] for i in range(1, 6)), [])
    rows = batches['data_batch_3'][b'data']
    assert images[2 * ROWS + 1, 1, 3, 4] == rows[1, 1024 + 3 * 32 + 4]
    assert images[2 * ROWS + 3, 2, 31, 31] == rows[3, 3071]
    images, labels = load_split('cifar10', str(data_dir), 'test', download=False, limit=3)
    assert images.shape == (3, 3, 32, 32) and labels.tolist() == batches['test_batch'][b'labels'][:3]
    assert torch.equal(images.reshape(3, -1), torch.from_numpy(batches['test_batch'][b'data'][:3]))


def _set(key, value):
    def corrupt(batch):
        batch[key] = value(batch) if callable(value) else value
    return corrupt


def _drop(key):
    def corrupt(batch):
        del batch[key]
    return corrupt


def _label(index, value):
    def corrupt(batch):
        batch[b'labels'][index] = value
    return corrupt


BAD_BATCHES = {
    'float_pixels_0_to_1': (_set(b'data', lambda b: (b[b'data'] / 255).astype(np.float32)),
                            r'float32 with values 0\.\d+\.\.(0|1)\.\d+.*uint8'),
    'int16_pixels': (_set(b'data', lambda b: b[b'data'].astype(np.int16) + 100), r'int16.*uint8'),
    'hwc_images': (_set(b'data', lambda b: b[b'data'].reshape(ROWS, 32, 32, 3)),
                   r'shape \(4, 32, 32, 3\).*\(N, 3072\)'),
    'short_rows': (_set(b'data', lambda b: b[b'data'][:, :3000]), r'shape \(4, 3000\).*\(N, 3072\)'),
    'data_as_lists': (_set(b'data', lambda b: b[b'data'].tolist()), r"b'data' of type list.*uint8 numpy array"),
    'one_row_short': (_set(b'data', lambda b: b[b'data'][:-1]), r'3 images but 4 labels.*one label per image'),
    'one_label_extra': (_set(b'labels', lambda b: b[b'labels'] + [0]), r'4 images but 5 labels'),
    'no_images': (lambda b: b.update({b'data': b[b'data'][:0], b'labels': []}), r'holds no images'),
    'label_10': (_label(2, 10), r'label 10 .*at index 2.*0\.\.9'),
    'label_negative': (_label(1, -1), r'label -1 .*at index 1.*0\.\.9'),
    'label_float': (_label(0, 3.0), r'label 3\.0 \(float\) at index 0'),
    'label_bytes': (_label(3, b'cat'), r"label b'cat' \(bytes\) at index 3"),
    'labels_missing': (_drop(b'labels'), r"has no b'labels' entry.*expected a dict"),
    'data_missing': (_drop(b'data'), r"has no b'data' entry"),
}


@pytest.mark.parametrize('split', ['train', 'test'])
@pytest.mark.parametrize('case', sorted(BAD_BATCHES))
def test_malformed_cifar_batch_is_one_user_error(cifar, case, split):
    data_dir, folder, batches = cifar
    name = 'data_batch_3' if split == 'train' else 'test_batch'
    corrupt, pattern = BAD_BATCHES[case]
    corrupt(batches[name])
    write_batch(folder / name, batches[name])
    load = (lambda: load_cifar10(str(data_dir), split, download=False)) if split == 'train' else \
        (lambda: load_split('cifar10', str(data_dir), split, download=False))
    assert_user_error(load, folder / name, pattern, r'expected', r'download it again')


def test_cifar_batch_that_is_not_a_dict(cifar):
    data_dir, folder, batches = cifar
    write_batch(folder / 'data_batch_5', [batches['data_batch_5'][b'data'], batches['data_batch_5'][b'labels']])
    assert_user_error(lambda: load_cifar10(str(data_dir), 'train', download=False), folder / 'data_batch_5',
                      r'holds a list.*expected a dict', r'download it again')


class _Payload:
    """Pickles as a call of `func(*args)`: what a crafted file would make a plain pickle.load run."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


PAYLOADS = {
    'builtins_eval': lambda marker: _Payload(eval, f"open({str(marker)!r}, 'w').write('ran')"),
    'os_system': lambda marker: _Payload(os.system, f'touch {marker}'),
    # a numpy function, not an array constructor: admitting "anything from numpy" would run it
    'numpy_savetxt': lambda marker: _Payload(np.savetxt, str(marker), [1.0]),
}


@pytest.mark.parametrize('payload', sorted(PAYLOADS))
def test_crafted_cifar_pickle_runs_no_code(cifar, payload):
    data_dir, folder, batches = cifar
    marker = data_dir / 'marker'
    batches['data_batch_2'][b'data'] = PAYLOADS[payload](marker)
    write_batch(folder / 'data_batch_2', batches['data_batch_2'])
    assert_user_error(lambda: load_cifar10(str(data_dir), 'train', download=False), folder / 'data_batch_2',
                      r'contains something other than a CIFAR-10 batch', r'(eval|system|savetxt)',
                      r'download it again')
    assert not marker.exists(), 'the crafted pickle ran code'


def test_cifar_pickle_with_any_other_class_is_refused(cifar):
    """Only numpy's array reconstruction is admitted, even for harmless classes."""
    from collections import OrderedDict
    data_dir, folder, batches = cifar
    write_batch(folder / 'test_batch', OrderedDict(batches['test_batch']))
    assert_user_error(lambda: load_cifar10(str(data_dir), 'test', download=False), folder / 'test_batch',
                      r'something other than a CIFAR-10 batch.*collections\.OrderedDict')


def _deny(monkeypatch, target, function):
    """Make os.stat or builtins.open raise EACCES for `target` only (root can read any file, so no chmod)."""
    module, name = (os, 'stat') if function == 'stat' else (builtins, 'open')
    real = getattr(module, name)

    def denied(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and os.fsdecode(file) == str(target):
            raise PermissionError(errno.EACCES, 'Permission denied', str(target))
        return real(file, *args, **kwargs)
    monkeypatch.setattr(module, name, denied)


def _svhn(tmp_path, x, y, split='train'):
    path = tmp_path / {'train': 'train_32x32.mat', 'test': 'test_32x32.mat'}[split]
    savemat(path, {'X': x, 'y': y})
    return path


def _svhn_valid(tmp_path, n=5, split='train'):
    x = np.random.default_rng(2).integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    return _svhn(tmp_path, x, np.arange(1, n + 1, dtype=np.uint8).reshape(n, 1) % 10 + 1, split)


@pytest.mark.parametrize('function', ['open', 'stat'])
@pytest.mark.parametrize('dataset', ['svhn', 'cifar10'])
def test_unreadable_file_is_called_unreadable_not_missing(tmp_path, cifar, monkeypatch, dataset, function):
    """EACCES on open (file mode) or on stat (a folder on the way not searchable, which os.path.exists reports as
    missing) is a permissions problem: say unreadable, with the OS error, and not 'missing' or 're-download'."""
    if dataset == 'svhn':
        target = _svhn_valid(tmp_path)
        data_dir = tmp_path
    else:
        data_dir, folder, _ = cifar
        target = folder / 'data_batch_4'
    _deny(monkeypatch, target, function)
    message = assert_user_error(lambda: load_split(dataset, str(data_dir), 'train', download=False), target,
                                r'is unreadable', r'PermissionError: \[Errno 13\] Permission denied',
                                r'read access')
    assert 'missing' not in message and 'download' not in message, message


def test_svhn_without_images_is_refused(tmp_path):
    """Today an empty X loads as 0 images and the training loop later blames --batch-size."""
    path = _svhn(tmp_path, np.zeros((32, 32, 3, 0), np.uint8), np.zeros((0, 1), np.uint8), split='test')
    for load in (lambda: load_svhn(str(tmp_path), 'test', download=False),
                 lambda: load_split('svhn', str(tmp_path), 'test', download=False)):
        message = assert_user_error(load, path, r'holds no images', r'download it again')
        assert 'batch' not in message


@pytest.mark.parametrize('bad', [0, 11, 255, 2.5])
def test_svhn_labels_outside_1_to_10_are_refused(tmp_path, bad):
    """0 would read as the digit 0 and 11 as 1 after the % 10: refused instead."""
    y = np.array([[10], [1], [bad], [3], [bad]], dtype=np.float64 if isinstance(bad, float) else np.uint8)
    x = np.zeros((32, 32, 3, 5), np.uint8)
    path = _svhn(tmp_path, x, y)
    assert_user_error(lambda: load_split('svhn', str(tmp_path), 'train', download=False), path,
                      r'2 labels outside 1\.\.10', r'index 2', rf'is {re.escape(repr(y[2, 0].item()))}\)',
                      r'10 for the digit 0', r'download it again')


def test_svhn_valid_file_still_loads(tmp_path):
    """A regression guard: the checks leave the standard layout and the 10 -> 0 mapping alone."""
    path = _svhn_valid(tmp_path, n=5, split='test')
    images, labels = load_svhn(str(tmp_path), 'test', download=False)
    assert images.shape == (5, 3, 32, 32) and labels.tolist() == [2, 3, 4, 5, 6]
    path = _svhn(tmp_path, np.zeros((32, 32, 3, 2), np.uint8), np.array([[10], [1]], np.uint8), split='test')
    assert load_svhn(str(tmp_path), 'test', download=False)[1].tolist() == [0, 1]
    assert path.exists()


def test_real_files_still_load(data_dir):
    """The official files (DATA_DIR) pass the restricted unpickler and every check."""
    for split in ('train', 'test'):
        images, labels = load_cifar10(data_dir, split, download=False)
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
        assert labels.shape == (images.shape[0],) and images.shape[0] > 0
        assert labels.min() >= 0 and labels.max() <= 9 and len(labels.unique()) == 10
    images, labels = load_svhn(data_dir, 'test', download=False)
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32) and labels.shape == (images.shape[0],)
    assert labels.min() == 0 and labels.max() == 9
