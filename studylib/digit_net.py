"""An in-domain sample-quality measure for SVHN generators: a small digit classifier's Frechet distance and scores.

The Inception weights of the standard FID cannot be downloaded on every machine this study runs on, so the samples
are judged by DigitNet, a small CNN trained on the SVHN training split of the data folder and cached in the cache
folder (cache_dir(): $STUDYLIB_CACHE, else $XDG_CACHE_HOME/studylib or ~/.cache/studylib), one file per training
file content (digit_net-<sha256 prefix>.pt). Nothing is written into the data folder; a cache folder that cannot be
written only means the net is trained for this run alone. digit_quality(net, samples, reference) gives

- digit_fd: the Frechet distance between Gaussians fitted to DigitNet's 128 penultimate features of the samples
  and of the reference images (computed by torchmetrics' FrechetInceptionDistance on DigitNet's features).
  Lower is better, 0 for identical statistics. It sees digit shape and identity, not only colour and layout;
- digit_confidence: the mean largest class probability (higher: the samples look more like some digit);
- digit_entropy: the mean predictive entropy in nats (lower is better; ln 10 = 2.30 is a uniform guess);
- digit_score: exp(E_x KL(p(y|x) || p(y))), the Inception Score computed with DigitNet (higher is better, at most
  10: confident about each sample, and all ten digits across samples).
- digit_kid, digit_kid_std: the Kernel Inception Distance (Binkowski et al. 2018) on the same features: the
  unbiased MMD^2 under the kernel (x.y / 128 + 1)^3, mean and spread over 100 random subsets of up to 500 images
  of each set (kernel_distance; 500, not the paper's 1000, so that 1,000 samples still give a spread). Lower is
  better, 0 in expectation for samples of the reference distribution (it can come out negative); unlike the FD's,
  its expectation does not depend on the set sizes. Each subset holds all of a set of 500 images or fewer: with
  two such sets digit_kid_std is 0, for it is the subsets' spread, not the estimate's sampling error (two draws of
  the samples show that, as for the FD).

The numbers are only comparable between sample sets of the same size against the same reference set, judged by
the same cached net: the FD estimate is biased upwards for small sets (by roughly tr(C) / N), and another net
(other data, epochs or seed) has other features. Take the reference from the test split: the net has seen the
training images, whose features sit apart from those of unseen digits (with the default net and N = 1000, test
against train gives an FD of about 18, test against other test images about 6). The scores are not comparable
with published Inception FIDs; on a connected machine inception_fd() gives the standard one.

    python train_digit_net.py --data-dir ./data         # train once (1-2 minutes on one CPU core), cache

(the command line lives in train_digit_net.py at the repository root)
"""
import hashlib
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from . import UserError
from .data import SVHN_FILES, batch_indices, load_split, to_unit_range

FORMAT = 'studylib-digit-net-v1'
EPOCHS, BATCH_SIZE, LR, SEED = 6, 128, 3e-3, 0   # the cached net's settings (load_or_train)
EVAL_BATCH = 256
SHIFT = 2   # augmentation: random translation by up to SHIFT pixels each way (no flips: digits are not symmetric)


class DigitNet(nn.Module):
    """Three conv blocks (32-64-128 channels, each halving the resolution), a 128-unit feature layer, 10 logits.

    Input: (B, 3, 32, 32) in [-1, 1]."""
    num_features = 128

    def __init__(self):
        super().__init__()

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                    nn.MaxPool2d(2)]

        self.body = nn.Sequential(*block(3, 32), *block(32, 64), *block(64, 128), nn.Flatten(),
                                  nn.Linear(128 * 4 * 4, self.num_features), nn.ReLU())
        self.head = nn.Linear(self.num_features, 10)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


def _unit(images):
    """uint8 images (as load_split gives them) -> [-1, 1]; float images are taken to be in [-1, 1] already."""
    return to_unit_range(images) if images.dtype == torch.uint8 else images.float()


def translate(x, shift, generator):
    """Shift each image by its own random offset in [-shift, shift]^2, filling with the edge pixels.

    One gather for the whole batch: the offsets index a padded copy."""
    b, c, h, w = x.shape
    padded = F.pad(x, (shift,) * 4, mode='replicate')
    dy, dx = torch.randint(0, 2 * shift + 1, (2, b, 1), generator=generator).to(x.device)
    rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]   # (B, 1, H, 1)
    cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]   # (B, 1, 1, W)
    return padded[torch.arange(b, device=x.device)[:, None, None, None],
                  torch.arange(c, device=x.device)[None, :, None, None], rows, cols]


@torch.no_grad()
def accuracy(net, images, labels, batch_size=EVAL_BATCH):
    """Top-1 accuracy in percent, in eval mode; the net's mode is restored afterwards."""
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    correct = sum((net(_unit(images[i:i + batch_size].to(device))).argmax(1).cpu() == labels[i:i + batch_size])
                  .sum().item() for i in range(0, len(images), batch_size))
    net.train(was_training)
    return 100.0 * correct / len(images)


def train_digit_net(train_x, train_y, test_x, test_y, *, epochs=EPOCHS, batch_size=BATCH_SIZE, seed=SEED,
                    device='cpu'):
    """Train a DigitNet from scratch: (net in eval mode, test accuracy in percent).

    Images are uint8 (as load_split gives them) or float in [-1, 1]. AdamW with a one-cycle schedule, random
    translations. The seed fixes the initial weights, the batch order and the augmentation without touching the
    global RNGs (a driver calling this keeps its own random stream)."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        # the CPU generator alone: torch.manual_seed would also reseed every GPU, which fork_rng(devices=[]) does not
        # restore (the net is built on the CPU, so its initial weights need no other generator)
        torch.default_generator.manual_seed(seed)
        net = DigitNet()
    net.to(device)
    g = torch.Generator().manual_seed(seed)
    train_x, train_y = train_x.to(device), train_y.to(device)   # uint8 stays uint8: converted a batch at a time
    steps = [idx for _ in range(epochs) for idx in batch_indices(len(train_x), batch_size, g, device=device)]
    optimizer = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=len(steps))
    net.train()
    bar = tqdm(steps, desc=f'digit net ({len(train_x)} images, {epochs} epochs)')
    for step, idx in enumerate(bar):
        loss = F.cross_entropy(net(translate(_unit(train_x[idx]), SHIFT, g)), train_y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f'{loss.item():.3f}')
    net.eval()
    return net, accuracy(net, test_x, test_y)


# ---------------------------------------------------------------------------------------------------------------
# the cache (cache_dir(), never the data folder)

def cache_dir():
    """Where trained digit nets are kept: $STUDYLIB_CACHE, else $XDG_CACHE_HOME/studylib, else ~/.cache/studylib."""
    if os.environ.get('STUDYLIB_CACHE'):
        return os.environ['STUDYLIB_CACHE']
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'studylib')


def default_path(data_dir):
    """The cache file of the net trained on data_dir's SVHN training file, named by a hash of that file's bytes
    (another copy or subset of SVHN gets its own net); None while the training file is not there."""
    train = os.path.join(data_dir, SVHN_FILES['train'])
    try:
        digest = hashlib.sha256()
        with open(train, 'rb') as f:
            for block in iter(lambda: f.read(1 << 20), b''):
                digest.update(block)
    except OSError:
        return None   # missing or unreadable: load_split says which, with the fix
    return os.path.join(cache_dir(), f'digit_net-{digest.hexdigest()[:16]}.pt')


def save_digit_net(path, net, info):
    """Atomically (temp file + os.replace): an interrupted save never leaves a half-written cache behind. Returns
    False, with a note, when the cache folder cannot be written (absent, read-only, full): the net then serves
    this run only."""
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save({'format': FORMAT, 'model': net.state_dict(), 'info': info}, tmp)
        os.replace(tmp, path)
        return True
    except (OSError, RuntimeError) as exc:   # torch.save reports a failed write as a RuntimeError
        try:
            os.remove(tmp)
        except OSError:
            pass
        print(f'note: could not cache the digit net at {path} ({getattr(exc, "strerror", None) or exc}); it serves '
              f'this run only (set STUDYLIB_CACHE to a writable folder to keep it)')
        return False


def load_digit_net(path, device='cpu'):
    """(net in eval mode, info) from a cache written by save_digit_net; anything else is one UserError line."""
    fix = 'delete it and rerun to train a new one (python train_digit_net.py --data-dir DIR --force)'
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)   # a cache is data, never code
    except Exception as exc:   # truncated zip, random bytes, pickled code: all land here
        raise UserError(f'digit-net cache {path} is unreadable or truncated ({type(exc).__name__}); {fix}') from exc
    if not isinstance(state, dict) or state.get('format') != FORMAT:
        raise UserError(f'{path} is not a digit-net cache (no {FORMAT} marker); {fix}')
    with torch.random.fork_rng(devices=[]):   # its initial weights are overwritten: the caller's RNG stays put
        net = DigitNet()
    try:
        net.load_state_dict(state['model'])
    except (RuntimeError, KeyError, TypeError) as exc:
        raise UserError(f'the weights in {path} do not fit DigitNet ({str(exc).splitlines()[0]}); {fix}') from exc
    return net.to(device).eval(), state['info']


def train_and_save(data_dir, device='cpu', epochs=EPOCHS, batch_size=BATCH_SIZE, allow_download=True):
    """Train on the whole SVHN training split of data_dir, test on the whole test split, cache: (net, info)."""
    train_x, train_y = load_split('svhn', data_dir, 'train', allow_download)
    test_x, test_y = load_split('svhn', data_dir, 'test', allow_download)
    start = time.time()
    net, acc = train_digit_net(train_x, train_y, test_x, test_y, epochs=epochs, batch_size=batch_size, device=device)
    info = dict(test_accuracy=acc, num_train=len(train_x), num_test=len(test_x), epochs=epochs,
                batch_size=batch_size, seed=SEED, seconds=time.time() - start,   # training and testing
                device=str(torch.device(device)))
    path = default_path(data_dir)
    cached = save_digit_net(path, net, info)
    print(f'digit net trained on {len(train_x)} SVHN images ({epochs} epochs, {info["seconds"]:.0f} s): '
          f'{acc:.2f}% test accuracy on {len(test_x)} images' + (f'; cached at {path}' if cached else ''))
    return net, info


def load_or_train(data_dir, device='cpu', allow_download=True):
    """The cached DigitNet of data_dir, trained (with the fixed defaults) and cached first when there is none."""
    path = default_path(data_dir)
    if path is not None and os.path.exists(path):
        return load_digit_net(path, device)
    return train_and_save(data_dir, device, allow_download=allow_download)


# ---------------------------------------------------------------------------------------------------------------
# the measures

def _fid_metric_class():
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance   # slow to import; only the measures need it
    except ImportError as exc:
        raise UserError(f'the Frechet distance needs torchmetrics ({exc}): pip install torchmetrics') from exc
    return FrechetInceptionDistance


class _FeatureExtractor(nn.Module):
    """A feature function in the form torchmetrics' FID takes as `feature`.

    The metric calls it on each image batch given to update() and needs (B, num_features) back. With
    `num_features` set it skips its probe call on a random (1, 3, 299, 299) image."""

    def __init__(self, fn, num_features):
        super().__init__()
        # a plain function, not a submodule: the metric's .to() / .train() must not move or switch the caller's net
        self.fn = fn
        self.num_features = num_features

    def forward(self, x):
        # float64: the metric accumulates in float64 but hands back the distance in the features' dtype
        return self.fn(x).double()


def _identity(x):
    return x


def _batched_features(features, images, batch_size, device):
    """features(batch) for each batch of `batch_size` images, moved to `device`: (N, num_features) float64 there."""
    return torch.cat([features(images[i:i + batch_size].to(device)).double()
                      for i in range(0, len(images), batch_size)])


def _frechet_of_features(samples, reference, num_features, batch_size):
    """The torchmetrics Frechet distance of two precomputed (N, num_features) feature sets, fed in batches of
    `batch_size` (the metric's float64 sums then see the same batches as when it extracts the features itself)."""
    # sync_on_compute=False: under torchrun, rank 0 alone measures; the metric must not wait for the others
    metric = _fid_metric_class()(feature=_FeatureExtractor(_identity, num_features),
                                 sync_on_compute=False).to(samples.device)
    for real, feats in ((True, reference), (False, samples)):
        for batch in feats.split(batch_size):
            metric.update(batch, real=real)
    return metric.compute().item()


@torch.no_grad()
def feature_fd(features, num_features, samples, reference, batch_size=EVAL_BATCH, device=None):
    """Frechet distance between Gaussians fitted to features(samples) and features(reference), by torchmetrics.

    `features` maps a batch (B, ...) to (B, num_features); batches of `batch_size` go to `device` (by default
    the samples' device)."""
    device = torch.device(device) if device is not None else samples.device
    feats = [_batched_features(features, x, batch_size, device) for x in (samples, reference)]
    return _frechet_of_features(*feats, num_features, batch_size)


def _unbiased_mmd2(x, y):
    """The unbiased estimate of MMD^2 between two (m, d) sets under k(x, y) = (x.y / d + 1)^3: the within-set
    means leave out the diagonal k(x_i, x_i), the cross mean keeps every pair (Binkowski et al. 2018)."""
    m, d = x.shape
    k_xx, k_yy, k_xy = ((u @ v.T / d + 1) ** 3 for u, v in ((x, x), (y, y), (x, y)))
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return within - 2 * k_xy.mean()


@torch.no_grad()
def kernel_distance(features_a, features_b, *, subsets=100, subset_size=1000, generator=None):
    """The Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs") of two (N, d) feature sets:
    (mean, std) as Python floats of the unbiased MMD^2 estimate under the cubic polynomial kernel
    k(x, y) = (x.y / d + 1)^3 over `subsets` random subsets.

    Each subset takes min(subset_size, len(features_a), len(features_b)) rows of each set, drawn without
    replacement (a fresh draw per subset), in float64 on the features' device. std is the population standard
    deviation over the subsets (correction=0, as torchmetrics' KernelInceptionDistance reports it): the spread
    of the subset estimates, not a standard error of the mean. When both sets fit in one subset, every subset is
    the pair of whole sets (the estimate does not depend on the row order): it is computed once, std 0. The
    estimate is unbiased, so it can be negative; 0 in expectation for one distribution. The draws use
    `generator` (a CPU torch.Generator; default: a fresh one seeded 0), never the global RNG."""
    a, b = torch.as_tensor(features_a).double(), torch.as_tensor(features_b).double()
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f'need two (N, d) feature sets with the same d, got {tuple(a.shape)} and {tuple(b.shape)}')
    m = min(subset_size, len(a), len(b))
    if m < 2 or subsets < 1:
        raise ValueError(f'the unbiased KID needs subsets of at least 2 rows and at least 1 subset, got '
                         f'{m} rows (sets of {len(a)} and {len(b)}, subset_size {subset_size}), {subsets} subsets')
    if m == len(a) == len(b):
        return _unbiased_mmd2(a, b).item(), 0.0
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    values = torch.stack([_unbiased_mmd2(a[torch.randperm(len(a), generator=g)[:m].to(a.device)],
                                         b[torch.randperm(len(b), generator=g)[:m].to(b.device)])
                          for _ in range(subsets)])
    return values.mean().item(), values.std(correction=0).item()


@torch.no_grad()
def digit_quality(net, samples, reference, batch_size=EVAL_BATCH, *, kid_subsets=100, kid_subset_size=500):
    """digit_fd, digit_confidence, digit_entropy, digit_score, digit_kid and digit_kid_std (see the module
    docstring) of `samples` against `reference`, both float (N, 3, 32, 32) in [-1, 1]. The FD and the KID are
    computed on one extraction of the features; kid_subsets and kid_subset_size go to kernel_distance (its seed-0
    default generator: the same sets give the same KID).

    Both sets are clamped to [-1, 1] first: a sampler whose pixels overshoot is judged by the images it produces.
    The net runs in eval mode; its mode is restored afterwards."""
    device = next(net.parameters()).device
    samples, reference = samples.float().clamp(-1, 1), reference.float().clamp(-1, 1)
    was_training = net.training
    net.eval()
    try:
        feats = [_batched_features(net.features, x, batch_size, device) for x in (samples, reference)]
        logits = torch.cat([net(samples[i:i + batch_size].to(device)).double().cpu()
                            for i in range(0, len(samples), batch_size)])
    finally:
        net.train(was_training)
    log_p = F.log_softmax(logits, dim=1)            # (N, 10) log p(y|x)
    p = log_p.exp()
    log_marginal = p.mean(0).log()                  # log p(y), the class mix over the whole sample set
    kl = (p * (log_p - log_marginal)).sum(1)        # KL(p(y|x) || p(y)) per sample
    kid, kid_std = kernel_distance(*feats, subsets=kid_subsets, subset_size=kid_subset_size)
    return dict(digit_fd=_frechet_of_features(*feats, net.num_features, batch_size),
                digit_confidence=p.max(1).values.mean().item(),
                digit_entropy=-(p * log_p).sum(1).mean().item(),
                digit_score=math.exp(kl.mean().item()),
                digit_kid=kid, digit_kid_std=kid_std)


def inception_fd(samples, reference, batch_size=100, device='cpu', weights_path=None):
    """The standard FID (Inception v3 pool features, 2048-d) by torchmetrics, for a machine that can get the weights.

    Needs torch-fidelity, and the Inception weights: downloaded on first use, or read from `weights_path`
    (pt_inception-2015-12-05-6726825d.pth). Images are float in [-1, 1], clamped, then quantised to uint8 as the
    reference implementation expects."""
    metric_class = _fid_metric_class()
    try:
        metric = metric_class(feature=2048, feature_extractor_weights_path=weights_path, sync_on_compute=False)
    except ModuleNotFoundError as exc:
        raise UserError('the Inception FID needs torch-fidelity: pip install torch-fidelity '
                        '(or pip install "torchmetrics[image]")') from exc
    except Exception as exc:   # the weights download fails with URLError, HTTPError, OSError... by the failure
        raise UserError(f'could not load the Inception weights ({type(exc).__name__}: {str(exc).splitlines()[0]}); '
                        f'download pt_inception-2015-12-05-6726825d.pth from the torch-fidelity releases and '
                        f'pass its path as weights_path') from exc
    metric = metric.to(device)
    with torch.no_grad():
        for real, images in ((True, reference), (False, samples)):
            for i in range(0, len(images), batch_size):
                batch = ((images[i:i + batch_size].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
                metric.update(batch.to(device), real=real)
    return metric.compute().item()

