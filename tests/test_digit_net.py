"""The digit-net quality measure: the torchmetrics Frechet distance against the closed form for Gaussians, the
scores against hand-computed values, the ranking of degraded images on real data, and the cache's refusals."""
import math
import os
import re
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn as nn

from tests.conftest import ROOT, read_only_cache

import train_digit_net
from studylib import UserError
from studylib import digit_net as dn
from studylib.data import load_split, to_unit_range


def _commuting_gaussians(n, means, variances, seed, exact=False):
    """n samples of each N(m, Q diag(v) Q^T), one shared rotation Q so the covariances commute.

    exact=True whitens the noise so that each set's sample mean and (N-1) sample covariance are exactly m and
    Q diag(v) Q^T: the distance of the sets is then the closed form to round-off, however small n is."""
    rng = np.random.default_rng(seed)
    d = len(means[0])
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    sets = []
    for m, v in zip(means, variances):
        z = rng.normal(size=(n, d))
        if exact:
            z -= z.mean(0)
            z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
        sets.append(torch.from_numpy(np.asarray(m) + (z * np.sqrt(v)) @ q.T))
    return sets


def _closed_form(m1, m2, v1, v2):
    """FD of N(m1, C1), N(m2, C2) with commuting C: ||m1 - m2||^2 + sum_i (sqrt(v1_i) - sqrt(v2_i))^2."""
    m1, m2, v1, v2 = map(np.asarray, (m1, m2, v1, v2))
    return float(((m1 - m2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum())


def _flat(x):
    return x.flatten(1)


M1, M2, V1, V2 = [0.5, -1.0, 2.0], [1.5, 0.0, 2.5], [1.0, 4.0, 0.25], [2.0, 1.0, 1.0]


def test_fd_matches_the_closed_form_for_exact_moments(isolated_torch_state):
    """Sets whose sample moments are exactly the Gaussians' ones: catches an N instead of N-1, a wrong sqrt."""
    a, b = _commuting_gaussians(40, [M1, M2], [V1, V2], seed=0, exact=True)
    got = dn.feature_fd(_flat, 3, a, b, batch_size=16)   # several update() calls per set
    assert got == pytest.approx(_closed_form(M1, M2, V1, V2), rel=1e-9)


def test_fd_of_large_gaussian_samples_is_near_the_closed_form(isolated_torch_state):
    """Plain samples: the estimate is off by sampling error, which shrinks as 1/sqrt(N).

    To first order the error is 2 (m1 - m2).(e1 - e2) from the means, with e ~ N(0, C/N), plus
    sum_i (sqrt(v1_i) - sqrt(v2_i)) (d1_i - d2_i) with sqrt(v)'s error d of variance v / (2N): a standard deviation
    sigma below. The estimator is also biased upwards by O(tr(C1 + C2) / N). The test allows 5 sigma plus that."""
    n = 20000
    a, b = _commuting_gaussians(n, [M1, M2], [V1, V2], seed=1)
    dm, s1, s2 = np.subtract(M1, M2), np.sqrt(V1), np.sqrt(V2)
    sigma = math.sqrt(4 * (dm ** 2 * (np.add(V1, V2))).sum() / n + 2 * ((s1 - s2) ** 2 * np.add(V1, V2)).sum() / n)
    bias = 2 * (sum(V1) + sum(V2)) / n
    assert dn.feature_fd(_flat, 3, a, b, batch_size=4096) == pytest.approx(_closed_form(M1, M2, V1, V2),
                                                                           abs=5 * sigma + bias)


def test_fd_of_a_set_with_itself_is_zero_and_order_free(isolated_torch_state):
    a, b = _commuting_gaussians(300, [M1, M2], [V1, V2], seed=2)
    assert abs(dn.feature_fd(_flat, 3, a, a, batch_size=64)) < 1e-9
    ab = dn.feature_fd(_flat, 3, a, b, batch_size=64)
    perm = torch.randperm(len(a), generator=torch.Generator().manual_seed(0))
    assert dn.feature_fd(_flat, 3, a[perm], b.flip(0), batch_size=64) == pytest.approx(ab, rel=1e-9)
    assert dn.feature_fd(_flat, 3, b, a, batch_size=64) == pytest.approx(ab, rel=1e-9)   # symmetric


class FakeNet(nn.Module):
    """Logits set by one pixel: 0 -> all-zero logits (uniform), 1 -> class 0 gets log 91 (p = 0.91, 0.01 each
    other class). Features are two pixels."""
    num_features = 2

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))   # digit_quality finds the device from the parameters

    def features(self, x):
        return x[:, 0, 0, :2]

    def forward(self, x):
        logits = torch.zeros(len(x), 10)
        logits[:, 0] = x[:, 0, 0, 0] * math.log(91)
        return logits


def _fake_images(first_pixels):
    x = torch.zeros(len(first_pixels), 3, 32, 32)
    x[:, 0, 0, 0] = torch.tensor(first_pixels)
    x[:, 0, 0, 1] = torch.arange(len(first_pixels), dtype=torch.float)   # features must vary for the covariance
    return x


def test_scores_against_hand_computed_values():
    """One uniform prediction and one with p = 0.91 on class 0, the latter's pixel given as 5 (clamped to 1)."""
    samples = _fake_images([0.0, 5.0])
    got = dn.digit_quality(FakeNet(), samples, samples)
    h_uniform = math.log(10)
    h_peaked = -(0.91 * math.log(0.91) + 9 * 0.01 * math.log(0.01))
    p_y = [0.505] + [0.055] * 9                                    # the class mix of the two predictions
    kl_uniform = sum(0.1 * math.log(0.1 / p) for p in p_y)
    kl_peaked = 0.91 * math.log(0.91 / 0.505) + 9 * 0.01 * math.log(0.01 / 0.055)
    assert got['digit_confidence'] == pytest.approx((0.1 + 0.91) / 2, rel=1e-6)
    assert got['digit_entropy'] == pytest.approx((h_uniform + h_peaked) / 2, rel=1e-6)
    assert got['digit_score'] == pytest.approx(math.exp((kl_uniform + kl_peaked) / 2), rel=1e-6)
    assert abs(got['digit_fd']) < 1e-6   # rank-1 covariance: the sqrt turns 1e-16 round-off into 1e-8
    # every sample predicted alike: nothing is learnt about x from y, so the score is exactly 1
    alike = dn.digit_quality(FakeNet(), _fake_images([1.0, 1.0, 1.0]), samples)
    assert alike['digit_score'] == pytest.approx(1.0, abs=1e-12)
    assert alike['digit_confidence'] == pytest.approx(0.91, rel=1e-6)


def test_inception_fd_without_torch_fidelity_or_weights_is_one_line(monkeypatch):
    import torchmetrics.image.fid as tm_fid
    x = torch.zeros(2, 3, 32, 32)
    monkeypatch.setattr(tm_fid, '_TORCH_FIDELITY_AVAILABLE', False)
    with pytest.raises(UserError, match='pip install torch-fidelity'):
        dn.inception_fd(x, x)

    def offline(*args, **kwargs):
        raise urllib.error.URLError('no route to host')
    monkeypatch.setattr(tm_fid, '_TORCH_FIDELITY_AVAILABLE', True)
    monkeypatch.setattr(tm_fid, 'NoTrainInceptionV3', offline)
    with pytest.raises(UserError, match='could not load the Inception weights.*weights_path') as info:
        dn.inception_fd(x, x)
    assert '\n' not in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# real data: a DigitNet trained here briefly (~50% test accuracy), enough to rank degradations

@pytest.fixture(scope='module')
def svhn_net(data_dir):
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_x, train_y = load_split('svhn', data_dir, 'train', download=False)
        test_x, test_y = load_split('svhn', data_dir, 'test', download=False, limit=256)
        net, acc = dn.train_digit_net(train_x[:1024], train_y[:1024], test_x, test_y, epochs=4, batch_size=64)
        yield net, acc, to_unit_range(test_x), to_unit_range(train_x[-256:])   # the last images: unseen by the net
    finally:
        torch.set_num_threads(n_threads)


def test_brief_training_learns_digits(svhn_net):
    net, acc, _, _ = svhn_net
    assert acc > 30   # chance is 10%; the ranking below leans on features that see digits
    assert not net.training


def test_fd_ranks_degraded_images(svhn_net):
    """Train images against test images < the same with noise sigma 0.1 < sigma 0.5 < uniform noise."""
    net, _, reference, clean = svhn_net
    g = torch.Generator().manual_seed(0)
    sets = [clean, clean + 0.1 * torch.randn(clean.shape, generator=g),
            clean + 0.5 * torch.randn(clean.shape, generator=g), torch.rand(clean.shape, generator=g) * 2 - 1]
    fds = [dn.digit_quality(net, s, reference)['digit_fd'] for s in sets]
    assert fds == sorted(fds) and len(set(fds)) == 4, fds


def test_identical_and_reordered_sets_on_real_features(svhn_net):
    net, _, reference, clean = svhn_net
    net.train()   # digit_quality must judge in eval mode and leave the BatchNorm statistics alone
    buffers = [b.clone() for b in net.buffers()]
    same = dn.digit_quality(net, reference, reference)
    assert net.training and all(torch.equal(a, b) for a, b in zip(buffers, net.buffers()))
    net.eval()
    assert abs(same['digit_fd']) < 1e-6
    got = dn.digit_quality(net, clean, reference)
    flipped = dn.digit_quality(net, clean.flip(0), reference[torch.randperm(len(reference))])
    for key in got:
        assert flipped[key] == pytest.approx(got[key], rel=1e-6), key


# ---------------------------------------------------------------------------------------------------------------
# the cache: a made-up SVHN folder, so no real data is needed

def test_load_or_train_trains_once_then_loads(tiny_svhn, monkeypatch, capsys, isolated_torch_state):
    net, info = dn.load_or_train(tiny_svhn, 'cpu', allow_download=False)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and 'cached at' in lines[0]
    assert (info['num_train'], info['num_test'], info['epochs']) == (48, 32, dn.EPOCHS)
    assert 0 <= info['test_accuracy'] <= 100 and not net.training

    def no_training(*args, **kwargs):
        raise AssertionError('the cached net should have been loaded')
    monkeypatch.setattr(dn, 'train_digit_net', no_training)
    loaded, loaded_info = dn.load_or_train(tiny_svhn, 'cpu', allow_download=False)
    assert loaded_info == info and not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), loaded.state_dict().values()))
    assert capsys.readouterr().out == ''


@pytest.mark.parametrize('content, message', [(b'garbage bytes', 'unreadable or truncated'),
                                              ('foreign', 'not a digit-net cache'),
                                              ('wrong weights', 'do not fit DigitNet')])
def test_bad_caches_are_refused_in_one_line(tiny_svhn, content, message):
    path = dn.default_path(tiny_svhn)
    os.makedirs(os.path.dirname(path))
    if content == 'foreign':
        torch.save({'model': {}}, path)
    elif content == 'wrong weights':
        torch.save({'format': dn.FORMAT, 'model': nn.Linear(2, 2).state_dict(), 'info': {}}, path)
    else:
        with open(path, 'wb') as f:
            f.write(content)
    with pytest.raises(UserError, match=f'{message}.*delete it and rerun') as info:
        dn.load_or_train(tiny_svhn, 'cpu', allow_download=False)
    assert '\n' not in str(info.value)


def test_cli_reports_cache_refuses_corrupt_one_and_force_retrains(tiny_svhn, capsys, isolated_torch_state):
    args = ['--data-dir', tiny_svhn, '--no-download', '--device', 'cpu', '--epochs', '1']
    os.makedirs(os.path.dirname(dn.default_path(tiny_svhn)))
    with open(dn.default_path(tiny_svhn), 'wb') as f:
        f.write(b'garbage bytes')
    with pytest.raises(SystemExit) as exit_info:
        train_digit_net.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and 'delete it and rerun' in err[0]
    assert 'python train_digit_net.py --data-dir DIR --force' in err[0]
    assert train_digit_net.main(args + ['--force'])['epochs'] == 1
    assert 'cached at' in capsys.readouterr().out
    assert train_digit_net.main(args)['epochs'] == 1   # the cache now exists: reported, not retrained
    assert 'already holds a digit net' in capsys.readouterr().out


def test_train_digit_net_is_the_one_command_line():
    """`python train_digit_net.py --help` exits 0 and documents every flag; studylib.digit_net has no command line
    of its own (the old `python -m studylib.digit_net` spelling was removed: one entry point per command)."""
    result = subprocess.run([sys.executable, 'train_digit_net.py', '--help'], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, COLUMNS='120'))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('usage: python train_digit_net.py ')
    flags = set(re.findall(r'(?<![\w-])--[a-z][a-z-]*', result.stdout))
    assert {'--data-dir', '--epochs', '--batch-size', '--device', '--no-download', '--force'} <= flags
    assert not hasattr(dn, 'main')


def test_cache_lives_outside_the_data_folder_and_an_unwritable_one_is_not_fatal(tiny_svhn, monkeypatch, capsys,
                                                                                isolated_torch_state):
    """Nothing is written into the data folder (it may be read-only); when the cache folder cannot be written
    (injected EROFS: CI runs as root), the net is trained and used for this run with a note, not a traceback."""
    before = sorted(os.listdir(tiny_svhn))
    read_only_cache(monkeypatch)
    net, info = dn.load_or_train(tiny_svhn, 'cpu', allow_download=False)
    assert info['num_train'] == 48 and not net.training
    out = capsys.readouterr().out
    assert 'could not cache the digit net' in out and 'Read-only file system' in out
    assert sorted(os.listdir(tiny_svhn)) == before
    assert not os.path.exists(dn.default_path(tiny_svhn))
    monkeypatch.undo()
    dn.load_or_train(tiny_svhn, 'cpu', allow_download=False)
    assert os.path.dirname(dn.default_path(tiny_svhn)) == os.environ['STUDYLIB_CACHE']
    assert os.path.exists(dn.default_path(tiny_svhn)) and sorted(os.listdir(tiny_svhn)) == before


def test_loading_the_cache_draws_no_random_numbers(tiny_svhn, isolated_torch_state):
    """Only the writing rank loads the classifier (before training): a draw there would shift that rank's random
    stream against the others' and break the N-process = 1-process equivalence."""
    dn.load_or_train(tiny_svhn, 'cpu', allow_download=False)
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    dn.load_or_train(tiny_svhn, 'cpu', allow_download=False)
    assert torch.equal(torch.rand(4), expected)
