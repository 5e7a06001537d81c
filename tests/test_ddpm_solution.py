"""Unit tests for ddpm_solution.py (Problem 2) against independent oracles.

The oracles are written out here from the DDPM paper (Ho, Jain & Abbeel, 2020): the linear beta schedule and its
derived quantities computed in float64 with plain Python arithmetic, the reverse-step mean of eq. 11 and the
posterior variance of eq. 7, an independently re-implemented sampling chain fed with the same random draws, an
explicit Huber loss, ``torch.nn.functional.scaled_dot_product_attention`` for the softmax attention, and
Monte-Carlo statistics whose tolerances come from their standard errors (5 sigma, so a false failure has a
probability of order 1e-6 per check, while the plausible bugs named in each docstring move the statistic by
tens of standard errors; the tests assert that separation too, so they cannot pass by accident).

Isolation: every test runs inside ``torch.random.fork_rng`` (the global CPU RNG is restored afterwards) and
with torch's intra-op thread count set to 1 and restored afterwards.
"""
import inspect
import math
import pathlib
import random
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import stats

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import ddpm_solution as D  # noqa: E402

SCHEDULE_NAMES = ('betas', 'alphas', 'sqrt_recip_alphas', 'alphas_cumprod', 'sqrt_alphas_cumprod',
                  'sqrt_one_minus_alphas_cumprod', 'alphas_cumprod_prev', 'posterior_variance')
N_SIGMA = 5.0


pytestmark = pytest.mark.usefixtures('isolated_torch_state')


# ----------------------------------------------------------------------------------------------------------------
# Oracles.

def oracle_schedule(T, b0=1e-4, b1=0.02):
    """The DDPM linear schedule and every derived quantity, in float64, with plain Python arithmetic."""
    betas = [b0 + (b1 - b0) * i / (T - 1) for i in range(T)]
    alphas = [1.0 - b for b in betas]
    acp, prod = [], 1.0
    for a in alphas:
        prod *= a
        acp.append(prod)
    acp_prev = [1.0] + acp[:-1]
    out = {
        'betas': betas,
        'alphas': alphas,
        'sqrt_recip_alphas': [1.0 / math.sqrt(a) for a in alphas],
        'alphas_cumprod': acp,
        'sqrt_alphas_cumprod': [math.sqrt(a) for a in acp],
        'sqrt_one_minus_alphas_cumprod': [math.sqrt(1.0 - a) for a in acp],
        'alphas_cumprod_prev': acp_prev,
        'posterior_variance': [b * (1.0 - ap) / (1.0 - a) for b, a, ap in zip(betas, acp, acp_prev)],
    }
    return {k: np.array(v, dtype=np.float64) for k, v in out.items()}


ORACLE_1000 = oracle_schedule(1000)


def oracle_mean(x, eps, t, sched):
    """DDPM eq. 11 in float64: 1/sqrt(alpha_t) * (x - beta_t / sqrt(1 - abar_t) * eps), per batch row."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    t = t.numpy()
    beta = torch.from_numpy(sched['betas'][t]).view(shape)
    alpha = torch.from_numpy(sched['alphas'][t]).view(shape)
    abar = torch.from_numpy(sched['alphas_cumprod'][t]).view(shape)
    return (x.double() - beta / torch.sqrt(1.0 - abar) * eps.double()) / torch.sqrt(alpha)


def oracle_chain(model, shape, n_steps, sched, seed):
    """DDPM Algorithm 2 re-implemented in float64 with the same random draws as the module: one randn(shape) for
    x_T, then one randn per step except the last (t_index 0). Returns every x_{t-1}, (n_steps, *shape)."""
    torch.manual_seed(seed)
    x = torch.randn(shape)
    x64 = x.double()
    out = []
    for i in reversed(range(n_steps)):
        t = torch.full((shape[0],), i, dtype=torch.long)
        with torch.no_grad():
            eps = model(x64.float(), t)
        mean = oracle_mean(x64, eps, t, sched)
        if i > 0:
            x64 = mean + math.sqrt(sched['posterior_variance'][i]) * torch.randn(shape).double()
        else:
            x64 = mean
        out.append(x64)
    return torch.stack(out)


def huber(pred, target):
    """Huber loss with delta 1, mean reduction, written out: 0.5 d^2 if |d| < 1 else |d| - 0.5."""
    d = (pred.double() - target.double()).abs()
    return torch.where(d < 1.0, 0.5 * d ** 2, d - 0.5).mean()


class AffineStub(nn.Module):
    """eps(x, t) = w * x + c(t) with w = 0.3 and c(t) = 0.5 * cos(t / 37): a known function of x and t, with
    a parameter (so the module can find the model's device and gradients can be checked)."""

    def __init__(self, w=0.3):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(float(w)))

    @staticmethod
    def c(t):
        return 0.5 * torch.cos(t.double() / 37.0)

    def forward(self, x, t):
        c = self.c(t).to(x.dtype).view((-1,) + (1,) * (x.dim() - 1))
        return self.w * x + c


class ConvStub(nn.Module):
    """A 1x1 convolution that ignores t: cheap enough for a 1000-step chain."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x, t):
        return self.conv(x)


def assert_schedule_close(tensor, expected, T):
    """Within float32 rounding of the closed form. The template computes in float32, so its cumulative product abar
    carries up to ~T * 2^-24 relative error, and 1 - abar (>= beta_1 = 1e-4) up to T * 2^-24 * abar / 1e-4: 1.2e-3
    relative for T = 1500 (measured: 1.6e-4 for T = 1000). Every bug named below moves a value by far more. The
    exact float32 arithmetic is checked against the template's formulas in test_template_compat.py."""
    assert tensor.shape == (T,)
    assert tensor.dtype == torch.float32
    assert tensor.device.type == 'cpu'
    np.testing.assert_allclose(tensor.double().numpy(), expected, rtol=T * 2.0 ** -24 / 1e-4, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# 1. Schedules.

@pytest.mark.parametrize('name', SCHEDULE_NAMES)
def test_module_schedule_tensor_matches_float64_closed_form(name):
    """Module-level schedule tensor == its DDPM closed form (float64 oracle) within float32 rounding; shape (T,),
    float32, CPU, index 0 = first step. Catches: off-by-one shifts (index 0 meaning t = 0 / alphas_cumprod_prev
    not starting at 1), sqrt vs no-sqrt, cumsum for cumprod, posterior variance using alphas_cumprod instead of
    _prev, wrong shape/dtype."""
    assert_schedule_close(getattr(D, name), ORACLE_1000[name], 1000)


def test_module_schedule_boundary_values():
    """Exact boundary values: alphas_cumprod_prev[0] == 1, posterior_variance[0] == 0, betas run from 1e-4 to
    0.02 and alphas_cumprod decreases. Catches: a nonzero first posterior variance (noise added at the final
    step), padding alphas_cumprod_prev with 0, a reversed schedule."""
    assert D.alphas_cumprod_prev[0].item() == 1.0
    assert D.posterior_variance[0].item() == 0.0
    assert D.betas[0].item() == pytest.approx(1e-4, rel=1e-6)
    assert D.betas[-1].item() == pytest.approx(0.02, rel=1e-6)
    assert torch.all(D.alphas_cumprod[1:] < D.alphas_cumprod[:-1])
    assert torch.equal(D.alphas_cumprod_prev[1:], D.alphas_cumprod[:-1])


@pytest.mark.parametrize('T', [500, 1500])
@pytest.mark.parametrize('name', SCHEDULE_NAMES)
def test_diffusion_schedule_other_T_matches_closed_form(T, name):
    """DiffusionSchedule(T) attributes for the T = 500 / 1500 study equal the closed forms for that T. Catches:
    a schedule object that silently keeps T = 1000 tensors or the module-level globals, or ignores timesteps."""
    sched = D.DiffusionSchedule(T)
    assert sched.timesteps == T
    assert_schedule_close(getattr(sched, name), oracle_schedule(T)[name], T)


def test_module_tensors_equal_diffusion_schedule_1000():
    """The module-level tensors are exactly DiffusionSchedule(1000)'s. Catches: the two code paths diverging
    (e.g. module globals built differently from the schedule object used by train_ddpm)."""
    sched = D.DiffusionSchedule(1000, 1e-4, 0.02)
    for name in SCHEDULE_NAMES:
        assert torch.equal(getattr(D, name), getattr(sched, name)), name


def test_linear_beta_schedule_endpoints_and_spacing():
    """linear_beta_schedule(beta_start, beta_end, T) starts at beta_start, ends at beta_end, is evenly spaced,
    float32 by default. Catches: swapped arguments, linspace over T + 1 points, a geometric/quadratic schedule."""
    b = D.linear_beta_schedule(1e-4, 0.02, 1000)
    assert b.shape == (1000,) and b.dtype == torch.float32
    assert b[0].item() == pytest.approx(1e-4, rel=1e-6)
    assert b[-1].item() == pytest.approx(0.02, rel=1e-6)
    np.testing.assert_allclose(np.diff(b.double().numpy()), (0.02 - 1e-4) / 999, rtol=1e-3)
    b2 = D.linear_beta_schedule(0.001, 0.05, 7)
    np.testing.assert_allclose(b2.double().numpy(), np.linspace(0.001, 0.05, 7), rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# 2. extract.

def test_extract_values_and_shapes():
    """extract(a, t, x_shape) == a[t] reshaped to (B, 1, 1, 1) for a 4-D x and (B, 1) for a 2-D x, on t's device.
    Catches: gathering along the wrong axis, returning (B,) (which broadcasts against W instead of B), a reshape
    that ignores len(x_shape)."""
    a = torch.arange(10, dtype=torch.float32) * 1.5 + 0.25
    t = torch.tensor([3, 0, 9, 3])
    out4 = D.extract(a, t, (4, 3, 5, 5))
    assert out4.shape == (4, 1, 1, 1)
    assert torch.equal(out4.flatten(), torch.tensor([4.75, 0.25, 13.75, 4.75]))
    out2 = D.extract(a, t, (4, 7))
    assert out2.shape == (4, 1)
    assert torch.equal(out2.flatten(), a[t])
    assert out4.device == t.device and out2.device == t.device
    # broadcasting really is per batch row
    x = torch.ones(4, 3, 5, 5)
    assert torch.equal((out4 * x)[:, 1, 2, 3], a[t])


# ----------------------------------------------------------------------------------------------------------------
# 3. q_sample.

@pytest.mark.parametrize('sched_T', [None, 500, 1500])
def test_q_sample_exact_formula_with_given_noise(sched_T):
    """q_sample(x0, t, noise) == sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (DDPM eq. 4), per batch row, for the
    module (T = 1000) and DiffusionSchedule(500 / 1500). Catches: abar vs sqrt(abar), alphas instead of
    alphas_cumprod, t - 1 indexing, the noise argument being ignored."""
    torch.manual_seed(1)
    T = 1000 if sched_T is None else sched_T
    fn = D.q_sample if sched_T is None else D.DiffusionSchedule(sched_T).q_sample
    x0 = torch.randn(5, 3, 4, 4)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 1, T // 2, T - 2, T - 1])
    out = fn(x0, t, noise)
    o = oracle_schedule(T)
    abar = torch.from_numpy(o['alphas_cumprod'][t.numpy()]).view(-1, 1, 1, 1)
    expected = abar.sqrt() * x0.double() + (1.0 - abar).sqrt() * noise.double()
    assert out.shape == x0.shape and out.dtype == torch.float32
    # the float32 schedule's rounding (assert_schedule_close): 1.2e-4 relative at t = 0 measured, 1e-3 allowed
    torch.testing.assert_close(out.double(), expected, rtol=1e-3, atol=1e-6)


def test_q_sample_monte_carlo_mean_and_variance():
    """With noise=None, x_t ~ N(sqrt(abar_t) x0, (1 - abar_t)): sample mean and variance per t (incl. 0 and T-1)
    within 5 standard errors. Catches: std/variance confusion (variance (1 - abar)^2, > 20 SE away at
    t = 0, 10, 100, asserted below), abar vs sqrt(abar) in the mean (> 20 SE at t = 100, 500, asserted), a wrong
    noise scale, and the same noise reused for every element (variance 0 across columns)."""
    torch.manual_seed(2)
    N = 20000
    ts = torch.tensor([0, 10, 100, 500, 999])
    x0_vals = torch.tensor([1.0, -2.0, 4.0, 3.0, -1.5])
    x0 = x0_vals[:, None].expand(-1, N).contiguous()
    xt = D.q_sample(x0, ts).double()
    abar = torch.from_numpy(ORACLE_1000['alphas_cumprod'][ts.numpy()])
    mean_true = abar.sqrt() * x0_vals.double()
    var_true = 1.0 - abar
    mean_hat = xt.mean(dim=1)
    var_hat = xt.var(dim=1)
    se_mean = (var_true / N).sqrt()
    se_var = var_true * math.sqrt(2.0 / (N - 1))
    assert torch.all((mean_hat - mean_true).abs() < N_SIGMA * se_mean), (mean_hat, mean_true)
    assert torch.all((var_hat - var_true).abs() < N_SIGMA * se_var), (var_hat, var_true)
    # power: the std-for-variance bug would put the variance at (1 - abar)^2, far outside the band here
    for i in range(3):
        assert abs(var_true[i] ** 2 - var_true[i]) > 20 * se_var[i]
    # and the abar-for-sqrt(abar) bug in the mean would be far outside too at t = 100, 500
    for i in (2, 3):
        assert abs(abar[i] * x0_vals[i] - mean_true[i]) > 20 * se_mean[i]


# ----------------------------------------------------------------------------------------------------------------
# 4. p_sample.

def test_p_sample_t_index_zero_returns_exact_mean_deterministically():
    """At t_index == 0, p_sample returns the DDPM eq. 11 mean exactly (no noise), so two calls agree bitwise.
    Catches: a wrong mean formula (beta_t/sqrt(1-abar_t) vs beta_t/(1-abar_t), sqrt(alpha) vs alpha, alphas vs
    alphas_cumprod), noise added at the last step, the model called with the wrong t."""
    torch.manual_seed(3)
    model = AffineStub()
    x = torch.randn(4, 2, 3, 3)
    t = torch.tensor([0, 0, 0, 0])
    out1 = D.p_sample(model, x, t, 0)
    out2 = D.p_sample(model, x, t, 0)
    assert torch.equal(out1, out2)
    with torch.no_grad():
        eps = model(x, t)
    torch.testing.assert_close(out1.double(), oracle_mean(x, eps, t, ORACLE_1000), rtol=1e-5, atol=1e-6)


def test_p_sample_mean_formula_for_several_t():
    """The deterministic part of p_sample equals eq. 11 at several t (rows with different t in one batch).
    Uses t_index = 0 to switch the noise off, with t rows != 0. Catches: mean coefficients taken at the wrong
    index or from the wrong tensor, a per-batch (not per-row) extract."""
    torch.manual_seed(4)
    model = AffineStub()
    x = torch.randn(5, 3, 2, 2)
    t = torch.tensor([0, 1, 250, 700, 999])
    out = D.p_sample(model, x, t, 0)
    with torch.no_grad():
        eps = model(x, t)
    torch.testing.assert_close(out.double(), oracle_mean(x, eps, t, ORACLE_1000), rtol=1e-5, atol=1e-6)


def test_p_sample_noise_std_is_sqrt_posterior_variance():
    """For t_index > 0, output - mean ~ N(0, beta~_t): Monte-Carlo std within 5 SE of sqrt(posterior_variance_t)
    and more than 20 SE from posterior_variance_t itself (asserted). Catches: the variance used as the std
    (docs/api.md's 'standard deviation, not the variance' pitfall), betas instead of beta~, a missing sqrt, noise
    shared across elements."""
    torch.manual_seed(5)
    N = 20000
    model = AffineStub()
    ts = torch.tensor([1, 10, 500, 999])
    x = torch.randn(len(ts), N)
    out = D.p_sample(model, x, ts, 1).double()
    with torch.no_grad():
        eps = model(x, ts)
    resid = out - oracle_mean(x, eps, ts, ORACLE_1000)
    pv = torch.from_numpy(ORACLE_1000['posterior_variance'][ts.numpy()])
    std_true = pv.sqrt()
    std_hat = resid.std(dim=1)
    se_std = std_true / math.sqrt(2.0 * (N - 1))
    assert torch.all((std_hat - std_true).abs() < N_SIGMA * se_std), (std_hat, std_true)
    assert torch.all(resid.mean(dim=1).abs() < N_SIGMA * std_true / math.sqrt(N))
    assert torch.all((std_hat - pv).abs() > 20 * se_std)           # variance-for-std would fail loudly
    betas_std = torch.from_numpy(ORACLE_1000['betas'][ts.numpy()]).sqrt()
    assert (std_hat[0] - betas_std[0]).abs() > 20 * se_std[0]      # sqrt(beta_t) instead of sqrt(beta~_t)


# ----------------------------------------------------------------------------------------------------------------
# 5. Sampling chains.

def test_p_sample_loop_matches_independent_chain():
    """p_sample_loop(model, shape, 5) returns (5, *shape) on the CPU and every step equals an independent
    float64 re-implementation of Algorithm 2 fed the same random draws. Catches: iterating t upwards,
    starting at t = timesteps instead of timesteps - 1, keeping x_T instead of x_0 as the last entry,
    passing the loop index off by one as t_index (noise at the last step), not stacking every step."""
    model = AffineStub()
    shape = (2, 1, 4, 4)
    torch.manual_seed(6)
    out = D.p_sample_loop(model, shape, 5)
    assert out.shape == (5, *shape) and out.device.type == 'cpu' and out.dtype == torch.float32
    ref = oracle_chain(model, shape, 5, ORACLE_1000, seed=6)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # the last step is the deterministic mean of the previous one
    with torch.no_grad():
        t0 = torch.zeros(2, dtype=torch.long)
        mean0 = oracle_mean(out[-2], model(out[-2], t0), t0, ORACLE_1000)
    torch.testing.assert_close(out[-1].double(), mean0, rtol=1e-5, atol=1e-6)


def test_sample_shape_and_equals_p_sample_loop_with_T_steps():
    """sample(model, image_size, batch_size, channels) returns (T, B, C, H, W) = p_sample_loop with T = 1000 steps
    for the same seed, and its x_0 equals the independent chain. Catches: sample running a different number of
    steps, swapping batch_size / channels, returning only x_0."""
    torch.manual_seed(7)
    model = ConvStub(2)
    with torch.no_grad():
        model.conv.weight.mul_(0.5)
    torch.manual_seed(8)
    out = D.sample(model, image_size=4, batch_size=1, channels=2)
    assert out.shape == (1000, 1, 2, 4, 4) and out.device.type == 'cpu'
    torch.manual_seed(8)
    loop = D.p_sample_loop(model, (1, 2, 4, 4), 1000)
    assert torch.equal(out, loop)
    ref = oracle_chain(model, (1, 2, 4, 4), 1000, ORACLE_1000, seed=8)
    torch.testing.assert_close(out[-1].double(), ref[-1], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(out[0].double(), ref[0], rtol=1e-5, atol=1e-5)


def test_diffusion_schedule_sample_returns_x0_of_its_own_chain():
    """DiffusionSchedule(20).sample(model, shape) returns x_0 only, equal to p_sample_loop's last entry for the same
    seed and to the independent T = 20 chain. Catches: sample ignoring the schedule's own T (using the module's
    T = 1000 tensors or 1000 steps), returning x_T or the whole stack."""
    sched = D.DiffusionSchedule(20)
    model = AffineStub()
    shape = (3, 2, 2, 2)
    torch.manual_seed(9)
    x0 = sched.sample(model, shape)
    assert x0.shape == shape
    torch.manual_seed(9)
    loop = sched.p_sample_loop(model, shape)
    assert loop.shape == (20, *shape)
    assert torch.equal(x0.cpu(), loop[-1])
    ref = oracle_chain(model, shape, 20, oracle_schedule(20), seed=9)
    torch.testing.assert_close(loop.double(), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# 6. p_losses.

def test_p_losses_is_huber_between_prediction_and_the_drawn_noise():
    """p_losses == mean Huber(delta 1) between model(q_sample(x, t, noise), t) and the very noise drawn (re-drawn
    here with the same seed), checked against an explicit Huber and F.smooth_l1_loss; both Huber branches are
    exercised. Catches: MSE/L1 instead of Huber, target x_start instead of noise, fresh noise for x_noisy and
    the target, sum instead of mean, sqrt(abar)/abar confusion in x_noisy, t ignored."""
    model = AffineStub(w=1.7)
    torch.manual_seed(10)
    x = torch.randn(6, 3, 4, 4) * 1.5
    t = torch.tensor([0, 3, 100, 400, 800, 999])
    torch.manual_seed(11)
    loss = D.p_losses(model, x, t)
    torch.manual_seed(11)
    noise = torch.randn_like(x)
    abar = torch.from_numpy(ORACLE_1000['alphas_cumprod'][t.numpy()]).view(-1, 1, 1, 1)
    x_noisy = (abar.sqrt() * x.double() + (1.0 - abar).sqrt() * noise.double()).float()
    with torch.no_grad():
        pred = model(x_noisy, t)
    frac_quadratic = ((pred - noise).abs() < 1).double().mean().item()
    assert 0.1 < frac_quadratic < 0.9                                  # both Huber branches in play
    assert loss.dim() == 0
    expected = huber(pred, noise)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() == pytest.approx(F.smooth_l1_loss(pred, noise).item(), rel=1e-5)
    # the plausible alternatives are all far from it
    assert abs(F.mse_loss(pred, noise).item() - loss.item()) > 0.05
    assert abs(huber(pred, x).item() - loss.item()) > 0.05


def test_p_losses_gradient_reaches_model():
    """p_losses is differentiable w.r.t. the model's parameters. Catches: computing it under no_grad,
    detaching the prediction."""
    model = AffineStub()
    torch.manual_seed(12)
    loss = D.p_losses(model, torch.randn(4, 1, 2, 2), torch.tensor([1, 2, 3, 900]))
    loss.backward()
    assert model.w.grad is not None and model.w.grad.abs().item() > 0


# ----------------------------------------------------------------------------------------------------------------
# 7. t_sample.

def _chi2_pvalue(samples, k):
    counts = np.bincount(samples, minlength=k)
    assert len(counts) == k
    return stats.chisquare(counts).pvalue


def test_t_sample_dtype_shape_range():
    """t_sample(timesteps, batch_size) is a (batch_size,) long tensor covering exactly {0, ..., timesteps-1} (with
    20000 draws from 1000 values each end is missed with probability e^-20). Catches: randint(1, T + 1),
    randint(0, T - 1), float output, a wrong shape. Same for DiffusionSchedule.t_sample."""
    torch.manual_seed(13)
    t = D.t_sample(1000, 20000)
    assert t.shape == (20000,) and t.dtype == torch.long
    assert t.min().item() == 0 and t.max().item() == 999
    assert D.t_sample(1000, 3).shape == (3,)
    s = D.DiffusionSchedule(50).t_sample(5000)
    assert s.dtype == torch.long and s.shape == (5000,)
    assert s.min().item() == 0 and s.max().item() == 49


def test_t_sample_is_uniform_chi_square_with_power_check():
    """Counts of t_sample(10, 50000) pass a chi-square uniformity test (p > 1e-4, fixed seed) while deliberately
    biased samplers (one never returning T-1; one with 2% extra mass on t = 0) are rejected by the same test
    (p < 1e-10), showing the test has power. Catches: non-uniform time sampling (e.g. biased towards small t)."""
    torch.manual_seed(14)
    N, k = 50000, 10
    t = D.t_sample(k, N)
    assert _chi2_pvalue(t.numpy(), k) > 1e-4
    s = D.DiffusionSchedule(k).t_sample(N)
    assert _chi2_pvalue(s.numpy(), k) > 1e-4
    gen = torch.Generator().manual_seed(15)
    never_last = torch.randint(0, k - 1, (N,), generator=gen)
    assert _chi2_pvalue(never_last.numpy(), k) < 1e-10
    mixed = torch.randint(0, k, (N,), generator=gen)
    mixed[torch.rand(N, generator=gen) < 0.02] = 0
    assert _chi2_pvalue(mixed.numpy(), k) < 1e-10


# ----------------------------------------------------------------------------------------------------------------
# 8. U-Net.

def _tiny_unet(seed=0, **kw):
    torch.manual_seed(seed)
    return D.Unet(dim=8, channels=3, dim_mults=(1, 2), **kw)


def test_unet_real_config_preserves_shape():
    """Unet(dim=32, channels=3, dim_mults=(1, 2, 4, 8)) maps a (2, 3, 32, 32) batch to the same shape and the
    default init_dim is dim // 3 * 2 = 20 (the template's default). Catches: skip-connection / up-sampling
    mismatches, out_dim not defaulting to channels, a different init_dim default."""
    torch.manual_seed(16)
    model = D.Unet(dim=32, channels=3, dim_mults=(1, 2, 4, 8))
    assert model.init_conv.out_channels == 32 // 3 * 2 == 20
    assert model.init_conv.in_channels == 3 and model.init_conv.kernel_size == (7, 7)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 999]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert D.Unet(dim=8, init_dim=6, dim_mults=(1, 2)).init_conv.out_channels == 6
    assert D.Unet(dim=8, out_dim=5, dim_mults=(1, 2))(torch.randn(1, 3, 8, 8), torch.tensor([3])).shape \
        == (1, 5, 8, 8)


def test_unet_time_conditioning():
    """With the same x, different t give different outputs (per batch row), and with_time_emb=False ignores t
    exactly. Also each row's output is independent of the rest of the batch (GroupNorm, not BatchNorm).
    Catches: the time embedding not wired into the ResNet blocks, t broadcast from the first row only,
    batch-coupled normalisation."""
    model = _tiny_unet()
    x = torch.randn(1, 3, 8, 8).expand(3, -1, -1, -1).contiguous()
    with torch.no_grad():
        out = model(x, torch.tensor([0, 0, 500]))
        single = model(x[:1], torch.tensor([500]))
    assert torch.equal(out[0], out[1]) or torch.allclose(out[0], out[1], atol=1e-6)
    assert (out[0] - out[2]).abs().max().item() > 1e-3
    torch.testing.assert_close(out[2], single[0], rtol=1e-4, atol=1e-5)
    assert model.time_mlp is not None
    lin = [m for m in model.time_mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lin] == [(8, 32), (32, 32)]

    no_t = _tiny_unet(with_time_emb=False)
    assert no_t.time_mlp is None
    with torch.no_grad():
        a = no_t(x[:2], torch.tensor([0, 1]))
        b = no_t(x[:2], torch.tensor([999, 500]))
    assert torch.equal(a, b)


def test_sinusoidal_embedding_closed_form():
    """SinusoidalPositionEmbeddings(dim)(t) has shape (B, dim) and equals [sin(t f_k), cos(t f_k)] with
    f_k = exp(-log(10000) k / (half - 1)), computed in float64. Catches: interleaved instead of concatenated
    sin/cos, cos first, half instead of half - 1 in the exponent, log(1000)."""
    dim = 32
    half = dim // 2
    t = torch.tensor([0, 1, 7, 100, 999])
    out = D.SinusoidalPositionEmbeddings(dim)(t)
    assert out.shape == (5, dim)
    k = np.arange(half)
    f = np.exp(-math.log(10000.0) * k / (half - 1))
    args = t.numpy().astype(np.float64)[:, None] * f[None, :]
    expected = np.concatenate([np.sin(args), np.cos(args)], axis=1)
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=0, atol=1e-4)
    # exact at t = 0: sin part 0, cos part 1
    assert torch.equal(out[0], torch.cat([torch.zeros(half), torch.ones(half)]))


def _permute_pixels(x, perm):
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w)[:, :, perm].reshape(b, c, h, w)


@pytest.mark.parametrize('cls', [D.Attention, D.LinearAttention])
def test_attention_shape_and_permutation_equivariance(cls):
    """Attention / LinearAttention map (B, C, H, W) to the same shape, are equivariant to permuting the H*W
    positions (permuting pixels permutes the outputs), and are non-local (changing one pixel changes other
    pixels' outputs). Catches: reshapes that mix the channel and position axes, softmax over the wrong axis
    (breaks equivariance), an attention that degenerated to a per-pixel map."""
    torch.manual_seed(17)
    attn = cls(8, heads=2, dim_head=4)
    x = torch.randn(2, 8, 4, 4)
    perm = torch.randperm(16)
    with torch.no_grad():
        out = attn(x)
        out_p = attn(_permute_pixels(x, perm))
        x2 = x.clone()
        x2[:, :, 0, 0] += 3.0
        out2 = attn(x2)
    assert out.shape == x.shape
    torch.testing.assert_close(out_p, _permute_pixels(out, perm), rtol=1e-5, atol=1e-5)
    assert (out2 - out)[:, :, 2:, 2:].abs().max().item() > 1e-4


def test_attention_matches_scaled_dot_product_attention():
    """Attention == to_out(softmax(q k^T / sqrt(dim_head)) v) per head, computed with
    F.scaled_dot_product_attention, channels split as (heads, dim_head). Catches: a wrong scale, softmax over
    queries instead of keys, heads split as (dim_head, heads), output channels ordered (d, heads)."""
    torch.manual_seed(18)
    heads, dh = 2, 4
    attn = D.Attention(6, heads=heads, dim_head=dh)
    x = torch.randn(2, 6, 3, 3)
    with torch.no_grad():
        out = attn(x)
        b, _, h, w = x.shape
        q, k, v = attn.to_qkv(x).chunk(3, dim=1)
        q, k, v = (z.reshape(b, heads, dh, h * w).transpose(-1, -2).double() for z in (q, k, v))  # (B, h, n, d)
        o = F.scaled_dot_product_attention(q, k, v)                                            # (B, h, n, d)
        o = o.transpose(-1, -2).reshape(b, heads * dh, h, w).float()
        ref = attn.to_out(o)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_linear_attention_matches_explicit_formula():
    """LinearAttention == to_out(context^T q) with q softmaxed over features (times dim_head^-0.5), k softmaxed
    over positions, context = k v^T, written with explicit float64 matmuls. Catches: softmax axes swapped,
    a missing scale, a missing GroupNorm in to_out."""
    torch.manual_seed(19)
    heads, dh = 2, 4
    la = D.LinearAttention(6, heads=heads, dim_head=dh)
    x = torch.randn(2, 6, 3, 3)
    with torch.no_grad():
        out = la(x)
        b, _, h, w = x.shape
        q, k, v = (z.reshape(b, heads, dh, h * w).double() for z in la.to_qkv(x).chunk(3, dim=1))  # (B,h,d,n)
        q = torch.softmax(q, dim=2) * dh ** -0.5
        k = torch.softmax(k, dim=3)
        context = k @ v.transpose(-1, -2)                      # (B, h, d, e) = sum_n k[d, n] v[e, n]
        o = context.transpose(-1, -2) @ q                      # (B, h, e, n) = sum_d context[d, e] q[d, n]
        o = o.reshape(b, heads * dh, h, w).float()
        assert isinstance(la.to_out[1], nn.GroupNorm)
        ref = la.to_out(o)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_blocks_and_resampling_shapes():
    """Block and ResnetBlock map (B, dim, H, W) to (B, dim_out, H, W); a zero scale/shift is the identity FiLM;
    the time embedding changes ResnetBlock's output; ResnetBlock's residual is a 1x1 conv iff dims differ;
    Upsample doubles and Downsample halves H and W; PreNorm applies GroupNorm(1, dim) first. Catches: FiLM as
    x * scale + shift (zero scale would kill the signal), missing residual, wrong resampling stride."""
    torch.manual_seed(20)
    x = torch.randn(2, 4, 6, 6)
    blk = D.Block(4, 8)
    y = blk(x)
    assert y.shape == (2, 8, 6, 6)
    zeros = torch.zeros(2, 8, 1, 1)
    torch.testing.assert_close(blk(x, (zeros, zeros)), y)

    rb = D.ResnetBlock(4, 8, time_emb_dim=16)
    temb = torch.randn(2, 16)
    assert rb(x, temb).shape == (2, 8, 6, 6)
    assert (rb(x, temb) - rb(x, torch.randn(2, 16))).abs().max().item() > 1e-4
    assert isinstance(rb.res_conv, nn.Conv2d) and rb.res_conv.kernel_size == (1, 1)
    assert isinstance(D.ResnetBlock(8, 8).res_conv, nn.Identity)
    assert D.ResnetBlock(8, 8)(y).shape == y.shape

    assert D.Upsample(4)(x).shape == (2, 4, 12, 12)
    assert D.Downsample(4)(x).shape == (2, 4, 3, 3)

    pn = D.PreNorm(4, nn.Identity())
    torch.testing.assert_close(pn(x), F.group_norm(x, 1, pn.norm.weight, pn.norm.bias))
    r = D.Residual(nn.Linear(6, 6))
    torch.testing.assert_close(r(x), r.fn(x) + x)


# ----------------------------------------------------------------------------------------------------------------
# 9. Overfitting.

def test_tiny_unet_overfits_one_batch():
    """A tiny Unet trained with Adam on one fixed batch (fixed x, t, noise) lowers the Huber noise-prediction
    loss below half its initial value within 40 steps. Catches: gradients not flowing through the U-Net (e.g. a
    detached branch), a broken skip connection or time path that makes the target unlearnable."""
    model = _tiny_unet(seed=21)
    torch.manual_seed(22)
    x = torch.rand(8, 3, 8, 8) * 2 - 1
    t = torch.tensor([0, 10, 50, 100, 250, 500, 750, 999])
    noise = torch.randn_like(x)
    x_noisy = D.q_sample(x, t, noise)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        loss = F.smooth_l1_loss(model(x_noisy, t), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses


# ----------------------------------------------------------------------------------------------------------------
# 10. Constants, seeding, imports.

def test_module_constants_match_spec():
    """Template constants per docs/api.md. Catches: a changed default (e.g. lr 2e-4, T 500) leaking into the autograder
    or the drivers."""
    assert D.train_batch_size == 64
    assert D.lr == 1e-4
    assert D.T == 1000
    assert D.beta_start == 0.0001
    assert D.beta_end == 0.02
    assert D.image_size == 32
    assert D.input_channels == 3
    assert D.data_root == './data'
    assert D.device == ('cuda' if torch.cuda.is_available() else 'cpu')


def test_fix_experiment_seed_reproducible():
    """fix_experiment_seed(s) makes python, numpy and torch draws reproducible and sets cuDNN deterministic.
    Catches: one of the three RNGs left unseeded, the seed argument ignored."""
    py_state, np_state = random.getstate(), np.random.get_state()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        def draws(seed):
            D.fix_experiment_seed(seed)
            return random.random(), float(np.random.rand()), torch.rand(3).tolist()
        assert draws(123) == draws(123)
        assert draws(123) != draws(124)
        assert torch.backends.cudnn.deterministic is True and torch.backends.cudnn.benchmark is False
        assert inspect.signature(D.fix_experiment_seed).parameters['seed'].default == 0
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


# ----------------------------------------------------------------------------------------------------------------
# The clipped-x0 ancestral step (DiffusionSchedule.p_sample_clipped), an option beside the template's p_sample.

class PointEpsModel(nn.Module):
    """The exact noise predictor for data that is the single point x*: eps = (x - sqrt(abar_t) x*) / sqrt(1-abar_t),
    so that the predicted x_0 is x* at every t."""

    def __init__(self, x_star, abar):
        super().__init__()
        self.x_star, self.abar = x_star, abar
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        a = self.abar[t].view(-1, *([1] * (x.dim() - 1)))
        return (x - a.sqrt() * self.x_star) / (1 - a).sqrt()


def _abar64():
    """The module's own (float32) abar in float64, so that the model and the sampler agree on x0_hat exactly."""
    return D.alphas_cumprod.double()


@pytest.mark.parametrize('i', [0, 1, 10, 500, 999])
def test_clipped_step_equals_p_sample_when_x0_is_in_range(i):
    """With x0_hat inside [-1, 1] the clip does nothing, and the x_0-form mean (DDPM eq. 7) is p_sample's eps-form
    mean (eq. 11): same output from the same noise. Catches swapped posterior coefficients, abar_t for abar_{t-1},
    a missing sqrt(alpha_t), noise at t_index 0."""
    sched = D.DiffusionSchedule(1000)
    x_star = torch.rand(1, 3, 4, 4, dtype=torch.float64) * 1.6 - 0.8
    model = PointEpsModel(x_star, _abar64())
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    t = torch.full((2,), i)
    torch.manual_seed(1)
    plain = sched.p_sample(model, x, t, i)
    torch.manual_seed(1)
    clipped = sched.p_sample_clipped(model, x, t, i)
    # The two forms are equal in exact arithmetic; the float32 schedule holds 1 - abar_t to 2^-24 / beta_1 = 6e-4
    # relative, and the forms weight that rounding differently: 2e-3 (the bugs named above are O(1)).
    torch.testing.assert_close(clipped, plain, rtol=2e-3, atol=1e-3)


def test_clipped_step_clamps_x0_and_lands_in_range():
    """Data at 3 (outside [-1, 1]): p_sample's last step returns x* = 3, the clipped one returns 1; its mean at an
    inner step is the posterior mean of eq. 7 with x0 = 1, written out here; a whole clipped chain ends inside
    [-1, 1] while the template's ends at 3."""
    sched = D.DiffusionSchedule(1000)
    abar = _abar64()
    x_star = torch.full((1, 1, 2, 2), 3.0, dtype=torch.float64)
    model = PointEpsModel(x_star, abar)
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    zero = torch.zeros(2, dtype=torch.long)
    torch.testing.assert_close(sched.p_sample(model, x, zero, 0), torch.full_like(x, 3.0), rtol=2e-3, atol=0)
    # at t_index 0 the mean is x0c * beta_1 / (1 - abar_1): 1 up to the float32 rounding of 1 - abar_1 (6e-4)
    torch.testing.assert_close(sched.p_sample_clipped(model, x, zero, 0), torch.ones_like(x), rtol=2e-3, atol=0)
    i = 300
    beta = float(D.betas[i])
    expected = (beta * abar[i - 1].sqrt() * 1.0 + (1 - abar[i - 1]) * math.sqrt(1 - beta) * x) / (1 - abar[i])
    torch.testing.assert_close(sched.p_sample_clipped(model, x, torch.full((2,), i), 0), expected,
                               rtol=2e-3, atol=1e-4)

    small = D.DiffusionSchedule(50)
    model50 = PointEpsModel(x_star.float(), small.alphas_cumprod)
    torch.manual_seed(0)
    out = small.sample(model50, (4, 1, 2, 2), clip_denoised=True)
    assert out.abs().max() <= 1.0 + 1e-5
    torch.manual_seed(0)
    assert small.sample(model50, (4, 1, 2, 2)).min() > 2.5
