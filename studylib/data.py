"""Datasets as whole uint8 tensors, read straight from the standard files torchvision downloads.

Both datasets are small (SVHN train is 235 MB, CIFAR-10 180 MB as uint8), so each split is held as one
(N, 3, 32, 32) uint8 tensor and batches are drawn by index: no Dataset/DataLoader and no per-image Python in the
training loop. Local files are read directly, without torchvision's MD5 check, so re-encoded or partial copies
in the standard layout work too. torchvision is only asked to download, and only when a file is missing and the
user allowed the network.
"""
import os
import pickle

import numpy as np
import torch

from . import UserError

SVHN_FILES = {'train': 'train_32x32.mat', 'test': 'test_32x32.mat'}
CIFAR_DIR = 'cifar-10-batches-py'
CIFAR_FILES = {'train': [f'data_batch_{i}' for i in range(1, 6)], 'test': ['test_batch']}
CIFAR_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')


def _missing(dataset, path, data_dir, download_hint):
    return UserError(f'{dataset} file {path} is missing (looked in --data-dir {data_dir}); '
                     f'{download_hint}')


def _download(fetch, dataset, data_dir):
    """Call torchvision's downloader; turn any network failure into one actionable line."""
    try:
        fetch()
    except Exception as exc:  # torchvision raises URLError, RuntimeError, OSError... depending on the failure
        raise UserError(f'could not download {dataset} into {data_dir} ({type(exc).__name__}: {exc}); '
                        f'put the standard files there by hand and pass --no-download') from exc


def load_svhn(data_dir, split, download=True):
    """SVHN cropped digits: (images (N, 3, 32, 32) uint8, labels (N,) int64 digit 0-9).

    The official .mat files store X as (32, 32, 3, N) and the digit 0 as label 10; both are converted here.
    """
    from scipy.io import loadmat  # scipy is slow to import and only needed here
    path = os.path.join(data_dir, SVHN_FILES[split])
    if not os.path.exists(path):
        if not download:
            raise _missing('SVHN', path, data_dir,
                           f'drop --no-download to fetch it with torchvision, or copy the official '
                           f'{SVHN_FILES[split]} there')
        import torchvision
        _download(lambda: torchvision.datasets.SVHN(data_dir, split=split, download=True), 'SVHN', data_dir)
    try:
        mat = loadmat(path)
        x, y = mat['X'], mat['y']
    except Exception as exc:
        raise UserError(f'SVHN file {path} is unreadable ({type(exc).__name__}: {exc}); '
                        f'delete it and download it again') from exc
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8 or y.size != x.shape[3]:
        raise UserError(f'SVHN file {path} has X {x.shape} {x.dtype} and y {y.shape}; expected X (32, 32, 3, N) '
                        f'uint8 and y (N, 1): is it the cropped-digits file?')
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))  # (N, 3, 32, 32)
    labels = torch.from_numpy(y.reshape(-1).astype(np.int64)) % 10            # 10 -> digit 0
    return images, labels


def load_cifar10(data_dir, split, download=True):
    """CIFAR-10: (images (N, 3, 32, 32) uint8, labels (N,) int64 class 0-9), from the python pickles."""
    folder = os.path.join(data_dir, CIFAR_DIR)
    paths = [os.path.join(folder, name) for name in CIFAR_FILES[split]]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        if not download:
            raise _missing('CIFAR-10', missing[0], data_dir,
                           'drop --no-download to fetch it with torchvision, or extract the official '
                           'cifar-10-python.tar.gz there')
        import torchvision
        _download(lambda: torchvision.datasets.CIFAR10(data_dir, train=(split == 'train'), download=True),
                  'CIFAR-10', data_dir)
    images, labels = [], []
    for path in paths:
        try:
            with open(path, 'rb') as f:
                batch = pickle.load(f, encoding='bytes')
            data, batch_labels = batch[b'data'], batch[b'labels']
        except Exception as exc:
            raise UserError(f'CIFAR-10 file {path} is unreadable ({type(exc).__name__}: {exc}); '
                            f'delete {folder} and download it again') from exc
        images.append(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32))  # rows are R, G, B planes
        labels.append(np.asarray(batch_labels, dtype=np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def load_split(name, data_dir, split, download=True, limit=None):
    """One split of 'svhn' or 'cifar10', optionally cut to its first `limit` images."""
    loader = {'svhn': load_svhn, 'cifar10': load_cifar10}[name]
    images, labels = loader(data_dir, split, download)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def to_unit_range(images):
    """uint8 [0, 255] -> float [-1, 1], on the images' device."""
    return images.float().div_(127.5).sub_(1.0)


def batch_indices(n, batch_size, generator=None, shuffle=True, drop_last=False, device=None):
    """Index tensors of one pass over n items, reshuffled by `generator` (a CPU generator, so the order does not
    depend on the device) when shuffle is set; the whole order moves to `device` in one copy per pass."""
    order = (torch.randperm(n, generator=generator) if shuffle else torch.arange(n)).to(device)
    stop = n - n % batch_size if drop_last else n
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]


def first_per_class(labels, per_class, num_classes=10):
    """Indices of the first `per_class` items of each class, class by class: (num_classes * per_class,).

    Raises UserError when a class has fewer items, so a study never silently averages over fewer images.
    """
    picked = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()[:per_class]
        if len(idx) < per_class:
            raise UserError(f'class {c} has only {len(idx)} images in this split, {per_class} were asked for; '
                            f'lower --profile-per-class or use more training images')
        picked.append(idx)
    return torch.cat(picked)
