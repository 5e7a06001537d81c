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


def _describe(exc):
    """'TypeName: message' on one line, whatever the exception's message holds."""
    return f'{type(exc).__name__}: {" ".join(str(exc).split())}'


def _unreadable(dataset, path, exc, state='exists but is unreadable'):
    """The OS will not let us read the file: say so, with the OS error, and how to fix that."""
    if isinstance(exc, PermissionError):
        fix = 'give this user read access to it (e.g. chmod a+r, and a+x on its folders) or point --data-dir at a copy'
    else:
        fix = 'check that it is a plain file on a working disk, or delete it and download it again'
    return UserError(f'{dataset} file {path} {state} ({_describe(exc)}); {fix}')


def _exists(dataset, path):
    """True / False for a file that is there / missing; a UserError when the OS will not say (e.g. a folder on
    the way is not searchable): os.path.exists would call such a file missing and send the user to download it."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise _unreadable(dataset, path, exc, 'is unreadable: the OS will not say whether it exists') from exc
    return True


def _open(dataset, path):
    try:
        return open(path, 'rb')
    except OSError as exc:
        raise _unreadable(dataset, path, exc) from exc


def _download(fetch, dataset, data_dir):
    """Call torchvision's downloader; turn any network failure into one actionable line."""
    try:
        fetch()
    except Exception as exc:  # torchvision raises URLError, RuntimeError, OSError... depending on the failure
        raise UserError(f'could not download {dataset} into {data_dir} ({_describe(exc)}); '
                        f'put the standard files there by hand and pass --no-download') from exc


def load_svhn(data_dir, split, download=True):
    """SVHN cropped digits: (images (N, 3, 32, 32) uint8, labels (N,) int64 digit 0-9).

    The official .mat files store X as (32, 32, 3, N) and the digit 0 as label 10; both are converted here.
    """
    from scipy.io import loadmat  # scipy is slow to import and only needed here
    path = os.path.join(data_dir, SVHN_FILES[split])
    if not _exists('SVHN', path):
        if not download:
            raise _missing('SVHN', path, data_dir,
                           f'drop --no-download to fetch it with torchvision, or copy the official '
                           f'{SVHN_FILES[split]} there')
        import torchvision
        _download(lambda: torchvision.datasets.SVHN(data_dir, split=split, download=True), 'SVHN', data_dir)
    fix = 'delete it and download it again'
    with _open('SVHN', path) as f:
        try:
            mat = loadmat(f)
        except Exception as exc:
            raise UserError(f'SVHN file {path} is unreadable as a .mat file ({_describe(exc)}); {fix}') from exc
    if 'X' not in mat or 'y' not in mat:
        found = sorted(k for k in mat if not k.startswith('__'))
        raise UserError(f'SVHN file {path} holds the variables {found}; expected X (32, 32, 3, N) uint8 and '
                        f'y (N, 1): is it the cropped-digits file? {fix}')
    x, y = mat['X'], mat['y']
    if (not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray) or x.ndim != 4
            or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8 or y.size != x.shape[3]):
        raise UserError(f'SVHN file {path} has X {getattr(x, "shape", type(x).__name__)} '
                        f'{getattr(x, "dtype", "")} and y {getattr(y, "shape", type(y).__name__)}; '
                        f'expected X (32, 32, 3, N) uint8 and y (N, 1): is it the cropped-digits file? {fix}')
    if x.shape[3] == 0:
        raise UserError(f'SVHN file {path} holds no images (X is {x.shape}); expected X (32, 32, 3, N) with '
                        f'N > 0: {fix}')
    y = y.reshape(-1)
    if y.dtype.kind not in 'iuf':
        raise UserError(f'SVHN file {path} has labels y of dtype {y.dtype}; expected integer labels 1..10 '
                        f'(10 is the digit 0): {fix}')
    bad = ~np.isin(y, np.arange(1, 11))  # also catches NaN and 3.5 in float labels
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise UserError(f'SVHN file {path} has {int(bad.sum())} labels outside 1..10 (the first, at index {i}, '
                        f'is {y[i].item()!r}); expected 1..10 with 10 for the digit 0: {fix}')
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))  # (N, 3, 32, 32)
    labels = torch.from_numpy(y.astype(np.int64)) % 10                        # 10 -> digit 0
    return images, labels


def _cifar_globals():
    """What a CIFAR-10 batch pickle may name, and nothing else: numpy's array and dtype reconstruction, under its
    numpy 1 (numpy.core: the official Python 2 files) and numpy 2 (numpy._core) module names. _frombuffer is what
    numpy writes for arrays under pickle protocol 5 (Python 3's default), scalar what it writes for a numpy int."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:
        from numpy.core import multiarray, numeric
    allowed = {('numpy', 'ndarray'): np.ndarray, ('numpy', 'dtype'): np.dtype}
    for core in ('numpy.core', 'numpy._core'):
        allowed[(f'{core}.multiarray', '_reconstruct')] = multiarray._reconstruct
        allowed[(f'{core}.multiarray', 'scalar')] = multiarray.scalar
        allowed[(f'{core}.numeric', '_frombuffer')] = numeric._frombuffer
    return allowed


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds plain containers and numpy arrays only: a crafted file that names any other
    function or class (os.system, builtins.eval, ...) is refused before anything of it runs."""

    def __init__(self, file, path, fix):
        super().__init__(file, encoding='bytes')
        self.path, self.fix, self.allowed = path, fix, _cifar_globals()

    def find_class(self, module, name):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise UserError(f'CIFAR-10 file {self.path} contains something other than a CIFAR-10 batch (it names '
                            f'{module}.{name}, where a batch holds only dicts, lists and numpy arrays; refused '
                            f'without running it): {self.fix}') from None


def _cifar_batch(path, fix):
    """One batch file -> (rows (N, 3072) uint8, labels (N,) int64), checked; a UserError for anything else."""
    def bad(found, expected):
        return UserError(f'CIFAR-10 file {path} {found}; expected {expected}: {fix}')

    with _open('CIFAR-10', path) as f:
        try:
            batch = _CifarUnpickler(f, path, fix).load()
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f'CIFAR-10 file {path} is unreadable: truncated or not a CIFAR-10 batch pickle '
                            f'({_describe(exc)}); {fix}') from exc
    layout = "a dict with b'data' (N, 3072) uint8 and b'labels' (N class numbers 0..9)"
    if not isinstance(batch, dict):
        raise bad(f'holds a {type(batch).__name__}', layout)
    for key in (b'data', b'labels'):
        if key not in batch:
            raise bad(f'has no {key!r} entry (its keys are {sorted(map(repr, batch))})', layout)
    data, labels = batch[b'data'], batch[b'labels']
    if not isinstance(data, np.ndarray):
        raise bad(f"has b'data' of type {type(data).__name__}", 'a (N, 3072) uint8 numpy array')
    if data.dtype != np.uint8:
        values = ''
        if data.dtype.kind in 'biuf' and data.size:
            values = f' with values {data.min()}..{data.max()}'
        raise bad(f"has b'data' of dtype {data.dtype}{values}",
                  'uint8 pixels 0..255 (other dtypes are refused, not cast: [0, 1] floats would become 0 and 1, '
                  'and int16 would wrap)')
    if data.ndim != 2 or data.shape[1] != 3072:
        raise bad(f"has b'data' of shape {data.shape}", '(N, 3072): one row of R, G and B 32x32 planes per image')
    if data.shape[0] == 0:
        raise bad('holds no images (b\'data\' is (0, 3072))', 'N > 0 images')
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1 or labels.dtype.kind not in 'iu':
            raise bad(f"has b'labels' as a {labels.dtype} array of shape {labels.shape}",
                      'a list of N integers 0..9')
    elif not isinstance(labels, (list, tuple)):
        raise bad(f"has b'labels' of type {type(labels).__name__}", 'a list of N integers 0..9')
    if len(labels) != data.shape[0]:
        raise bad(f'has {data.shape[0]} images but {len(labels)} labels', 'one label per image')
    if isinstance(labels, np.ndarray):
        wrong = np.flatnonzero((labels < 0) | (labels > 9))
        if wrong.size:
            i = int(wrong[0])
            raise bad(f'has label {labels[i]} at index {i}', 'class numbers 0..9')
    else:
        for i, v in enumerate(labels):
            if not (type(v) is int or isinstance(v, np.integer)) or not 0 <= v <= 9:
                raise bad(f'has label {v!r} ({type(v).__name__}) at index {i}', 'class numbers 0..9')
    return data, np.asarray(labels, dtype=np.int64)


def load_cifar10(data_dir, split, download=True):
    """CIFAR-10: (images (N, 3, 32, 32) uint8, labels (N,) int64 class 0-9), from the python pickles.

    The pickles are read by an unpickler that admits numpy arrays and nothing else, and every batch is checked
    (uint8 (N, 3072) rows, N labels 0..9), so a crafted or damaged file is one UserError, never code run or
    silently wrong data."""
    folder = os.path.join(data_dir, CIFAR_DIR)
    paths = [os.path.join(folder, name) for name in CIFAR_FILES[split]]
    missing = [p for p in paths if not _exists('CIFAR-10', p)]
    if missing:
        if not download:
            raise _missing('CIFAR-10', missing[0], data_dir,
                           'drop --no-download to fetch it with torchvision, or extract the official '
                           'cifar-10-python.tar.gz there')
        import torchvision
        _download(lambda: torchvision.datasets.CIFAR10(data_dir, train=(split == 'train'), download=True),
                  'CIFAR-10', data_dir)
    fix = (f'delete {folder} and download it again (drop --no-download, or extract the official '
           f'cifar-10-python.tar.gz there)')
    images, labels = [], []
    for path in paths:
        data, batch_labels = _cifar_batch(path, fix)
        images.append(data.reshape(-1, 3, 32, 32))  # rows are R, G, B planes
        labels.append(batch_labels)
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
