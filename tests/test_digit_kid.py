"""The digit KID (studylib.digit_net.kernel_distance, digit_quality's digit_kid): the unbiased MMD^2 against a
brute-force double loop, against torchmetrics' KernelInceptionDistance, its unbiasedness and power by Monte Carlo,
and digit_quality on an untrained DigitNet."""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from studylib import digit_net as dn


def _brute_force_mmd2(x, y):
    """The unbiased MMD^2 of two (m, d) numpy sets under k(u, v) = (u.v / d + 1)^3, one pair at a time: the
    within-set means over the m(m-1) ordered pairs i != j, the cross mean over all m^2 pairs."""
    m, d = x.shape

    def k(u, v):
        return (float(np.dot(u, v)) / d + 1.0) ** 3

    within_x = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    within_y = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    cross = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return within_x + within_y - 2.0 * cross


def _sets(n, d, seed, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), shift + scale * rng.normal(size=(n, d))


@pytest.mark.parametrize('n, d', [(2, 1), (5, 3), (9, 4)])
def test_one_full_subset_is_the_brute_force_unbiased_mmd(n, d):
    """subsets=1, subset_size = the set size: no sampling, exactly the double loop (float64 round-off only)."""
    x, y = _sets(n, d, seed=n, shift=0.7, scale=1.3)
    want = _brute_force_mmd2(x, y)
    mean, std = dn.kernel_distance(torch.from_numpy(x), torch.from_numpy(y), subsets=1, subset_size=n)
    assert mean == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert std == 0.0
    # float32 input is computed in float64 (the float32 values themselves, not float32 arithmetic)
    x32, y32 = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    want32 = _brute_force_mmd2(x32.double().numpy(), y32.double().numpy())
    assert dn.kernel_distance(x32, y32, subsets=1, subset_size=n)[0] == pytest.approx(want32, rel=1e-12, abs=1e-12)


def test_subset_size_is_capped_at_the_smaller_set():
    """subset_size beyond both sets: every subset is the whole of each set, in some order, so every subset gives
    the brute-force value and the spread is 0. Against a larger set, the larger one is subsampled."""
    x, y = _sets(8, 3, seed=1, shift=0.4)
    mean, std = dn.kernel_distance(x, y, subsets=5)   # default subset_size 1000 >> 8
    assert mean == pytest.approx(_brute_force_mmd2(x, y), rel=1e-12)
    assert std == 0.0
    _, big = _sets(30, 3, seed=2, shift=0.4)
    assert dn.kernel_distance(x, big, subsets=5)[1] > 1e-3   # 8 of the 30 rows each time: the subsets differ


def test_mean_over_subsets_tends_to_the_full_set_value():
    """The average of the unbiased estimate over random subsets drawn without replacement is, in expectation
    over the draws, exactly the full sets' unbiased estimate (each ordered pair i != j of a subset is a uniformly
    random such pair of the whole set). With S independent draws the mean's standard error is std / sqrt(S);
    allowing 5 of them passes by chance with probability ~6e-7. Drawing with replacement instead would add about
    (E k(x, x) - E k(x, x')) / n per set, here ~0.4 or ~50 standard errors; the wrong subset size or the wrong
    kernel moves the full-set values checked above."""
    x, y = _sets(40, 8, seed=3, shift=0.2)
    full = _brute_force_mmd2(x, y)
    s = 4000
    mean, std = dn.kernel_distance(x, y, subsets=s, subset_size=10, generator=torch.Generator().manual_seed(7))
    assert std > 0.01   # subsets of 10 of 40 rows really differ
    assert abs(mean - full) < 5 * std / math.sqrt(s), (mean, full, std)


def test_deterministic_given_the_generator_and_leaves_the_global_rng_alone():
    x, y = _sets(50, 4, seed=4)
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = dn.kernel_distance(x, y, subsets=20, subset_size=10)
    assert torch.equal(torch.rand(3), expected_draw)   # the default generator is a fresh seed-0 one, not the global
    assert dn.kernel_distance(x, y, subsets=20, subset_size=10) == first
    assert dn.kernel_distance(x, y, subsets=20, subset_size=10, generator=torch.Generator().manual_seed(0)) == first
    other = dn.kernel_distance(x, y, subsets=20, subset_size=10, generator=torch.Generator().manual_seed(1))
    assert other != first


def test_refuses_what_it_cannot_estimate():
    x, y = _sets(5, 3, seed=5)
    for bad in [dict(features_a=x[:1], features_b=y), dict(features_a=x, features_b=y[:, :2]),
                dict(features_a=x[0], features_b=y[0])]:
        with pytest.raises(ValueError):
            dn.kernel_distance(bad['features_a'], bad['features_b'])
    with pytest.raises(ValueError):
        dn.kernel_distance(x, y, subsets=0)


# ---------------------------------------------------------------------------------------------------------------
# torchmetrics' KernelInceptionDistance: its `feature` may be any nn.Module, called on what update() is given, so
# an identity module feeds it precomputed float64 features. It draws its subsets with the global torch RNG (the
# fixture restores it) and reports std with unbiased=False, the convention kernel_distance follows.

class _Identity(nn.Module):
    def forward(self, x):
        return x


def _torchmetrics_kid(x, y, subsets, subset_size):
    from torchmetrics.image.kid import KernelInceptionDistance
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UserWarning)   # "will save all extracted features in buffer"
        metric = KernelInceptionDistance(feature=_Identity(), subsets=subsets, subset_size=subset_size,
                                         sync_on_compute=False)
    metric.update(x, real=True)
    metric.update(y, real=False)
    mean, std = metric.compute()
    return mean.item(), std.item()


def test_full_sets_match_torchmetrics_exactly(isolated_torch_state):
    """subset_size = the (equal) set sizes: both compute the same number, whatever order the rows are drawn in."""
    x, y = map(torch.from_numpy, _sets(120, 16, seed=6, shift=0.15, scale=1.2))
    torch.manual_seed(0)
    tm_mean, tm_std = _torchmetrics_kid(x, y, subsets=3, subset_size=120)
    mean, std = dn.kernel_distance(x, y, subsets=3, subset_size=120)
    assert mean == pytest.approx(tm_mean, rel=1e-10)
    assert std < 1e-12 and tm_std < 1e-12


def test_random_subsets_match_torchmetrics_statistically(isolated_torch_state):
    """Both average the same quantity over S independent random subsets (each its own draws), so the two means
    differ by a N(0, 2 sigma^2 / S) error (sigma: the per-subset spread), and the two population standard
    deviations by about sigma sqrt((kappa - 1) / (2 S)) with kappa the per-subset values' kurtosis (measured
    3.35 on these sets; 4 is assumed). With S = 4000: 5 such errors are 0.0068 on a mean of 0.039 and 8.6% of
    sigma = 0.061, so a chance failure is ~1e-6. A subset of the wrong size moves sigma (~ 1 / size) by more,
    drawing with replacement moves the mean by ~0.05, and correction=1 against 0 would be 1 / (2 S), invisible,
    which is why the convention is checked in the docstring, not here."""
    x, y = map(torch.from_numpy, _sets(300, 16, seed=7, shift=0.1, scale=1.1))
    s, size = 4000, 50
    torch.manual_seed(0)
    tm_mean, tm_std = _torchmetrics_kid(x, y, subsets=s, subset_size=size)
    mean, std = dn.kernel_distance(x, y, subsets=s, subset_size=size, generator=torch.Generator().manual_seed(1))
    sigma, kappa = (std + tm_std) / 2, 4.0
    assert mean > 10 * sigma * math.sqrt(2 / s)   # the sets really differ: the comparison is not of two zeros
    assert abs(mean - tm_mean) < 5 * sigma * math.sqrt(2 / s), (mean, tm_mean, sigma)
    assert abs(std - tm_std) < 5 * sigma * math.sqrt((kappa - 1) / (2 * s)), (std, tm_std)


# ---------------------------------------------------------------------------------------------------------------
# Monte Carlo: unbiased for one distribution, and it sees a shift

def test_unbiased_for_one_gaussian_and_larger_for_a_shifted_one():
    """R = 600 independent pairs of 40 draws of N(0, I_8), each scored on the full sets (one subset): the mean
    estimate must be within 4 standard errors of 0 (chance failure ~6e-5; measured: 0.0028, SE 0.0040, z = 0.69).
    The biased V-statistic (diagonal kept) sits (E k(x, x) - E k(x, x')) / n per set higher, measured 0.41 or
    ~100 standard errors: the check has the power to tell the two apart (asserted below on these very sets). The
    same pairs with the second set shifted by 0.25 in every coordinate give a mean of 0.23 (SE 0.008): more than
    20 standard errors above the same-distribution one is demanded."""
    d, n, r = 8, 40, 600
    rng = np.random.default_rng(8)
    same, shifted, v_bias = [], [], []
    for _ in range(r):
        x, y, z = rng.normal(size=(n, d)), rng.normal(size=(n, d)), 0.25 + rng.normal(size=(n, d))
        same.append(dn.kernel_distance(x, y, subsets=1, subset_size=n)[0])
        shifted.append(dn.kernel_distance(x, z, subsets=1, subset_size=n)[0])
        for u in (x, y):   # what keeping the diagonal k(u_i, u_i) in the within-set mean would add
            k = (u @ u.T / d + 1) ** 3
            v_bias.append((np.diag(k).mean() - (k.sum() - np.trace(k)) / (n * (n - 1))) / n)
    same, shifted = np.array(same), np.array(shifted)
    se_same, se_shifted = same.std(ddof=1) / math.sqrt(r), shifted.std(ddof=1) / math.sqrt(r)
    assert abs(same.mean()) < 4 * se_same, (same.mean(), se_same)
    assert (same < 0).mean() > 0.2   # unbiased, so a good share of the estimates is negative
    assert 2 * np.mean(v_bias) > 20 * se_same   # a biased estimator would fail the first check by far
    assert shifted.mean() - same.mean() > 20 * math.hypot(se_same, se_shifted), (shifted.mean(), same.mean())


# ---------------------------------------------------------------------------------------------------------------
# digit_quality

class _FeatureWrapper(nn.Module):
    def __init__(self, fn, num_features):
        super().__init__()
        self.fn, self.num_features = fn, num_features

    def forward(self, x):
        return self.fn(x).double()


def test_digit_quality_on_an_untrained_net_adds_finite_kid_and_keeps_the_rest(isolated_torch_state):
    """The old keys with the values computed here independently (torchmetrics' FID fed by the net batch by batch,
    the scores from the logits), plus a finite digit_kid equal to kernel_distance of the penultimate features."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    torch.manual_seed(0)
    net = dn.DigitNet().eval()
    g = torch.Generator().manual_seed(0)
    samples = torch.rand(14, 3, 32, 32, generator=g) * 2.4 - 1.2   # some pixels beyond [-1, 1]: clamped
    reference = torch.rand(11, 3, 32, 32, generator=g) * 2 - 1
    torch.manual_seed(5)
    expected_draw = torch.rand(2)
    torch.manual_seed(5)
    got = dn.digit_quality(net, samples, reference, batch_size=4)
    assert torch.equal(torch.rand(2), expected_draw)   # the KID draws nothing from the global RNG
    assert set(got) == {'digit_fd', 'digit_confidence', 'digit_entropy', 'digit_score', 'digit_kid',
                        'digit_kid_std'}
    assert all(isinstance(v, float) and math.isfinite(v) for v in got.values()), got
    assert got['digit_kid_std'] > 0   # subsets of 11 of the 14 samples differ

    s, r = samples.clamp(-1, 1), reference.clamp(-1, 1)
    with torch.no_grad():
        fid = FrechetInceptionDistance(feature=_FeatureWrapper(net.features, 128), sync_on_compute=False)
        for real, images in ((True, r), (False, s)):
            for batch in images.split(4):
                fid.update(batch, real=real)
        log_p = F.log_softmax(net(s).double(), dim=1)
        feats_s, feats_r = (torch.cat([net.features(batch) for batch in x.split(4)]) for x in (s, r))
    p = log_p.exp()
    assert got['digit_fd'] == pytest.approx(fid.compute().item(), rel=1e-9)
    assert got['digit_confidence'] == pytest.approx(p.max(1).values.mean().item(), rel=1e-6)
    assert got['digit_entropy'] == pytest.approx(-(p * log_p).sum(1).mean().item(), rel=1e-6)
    kl = (p * (log_p - p.mean(0).log())).sum(1).mean().item()
    assert got['digit_score'] == pytest.approx(math.exp(kl), rel=1e-6)
    kid, kid_std = dn.kernel_distance(feats_s, feats_r, subsets=100, subset_size=1000)
    assert (got['digit_kid'], got['digit_kid_std']) == pytest.approx((kid, kid_std), rel=1e-9, abs=1e-12)
    assert dn.digit_quality(net, samples, reference, batch_size=4) == got   # repeatable: the seed-0 draws
