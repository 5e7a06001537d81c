"""Unit tests for the DDIM sampler of ddpm_solution.DiffusionSchedule (Song, Meng & Ermon, 2021, ICLR).

Oracles, all independent of the module's code:
- the linear-beta schedule and abar recomputed in float64 with plain Python arithmetic;
- the DDPM posterior (Ho et al., eq. 7 and 11) and, for jumps t -> p, the Bayes posterior q(x_p | x_t, x_0)
  obtained by conditioning the joint Gaussian of (x_p, x_t) given x_0 -- a different derivation from DDIM's
  eq. 12/16, which must coincide with it at eta = 1;
- "perfect" noise predictors for data distributions whose exact eps(x_t, t) = E[eps | x_t] is known in closed
  form: a single image x* (eps = (x_t - sqrt(abar_t) x*) / sqrt(1 - abar_t)) and N(m, s^2 I) data (eps linear in
  x_t, derived in GaussEps). For the Gaussian data every DDIM step is affine plus Gaussian noise, so the exact
  output distribution of the discrete chain is propagated in float64 (mean, variance) and Monte-Carlo statistics
  are compared with it at 5 standard errors; the same propagation for plausible wrong implementations (alphas for
  alphas_cumprod, sigma without the outer sqrt, sigma^2 for sigma, the direction term ignoring sigma^2, DDPM's
  sqrt(beta) as sigma, abar[-1] wrapping around for the final step) is asserted to lie > 20 SE away, so the
  checks cannot pass by accident.

Every test runs with one torch thread and the global RNG restored afterwards (conftest's isolated_torch_state).
"""
import inspect
import math
import pathlib
import sys
from fractions import Fraction

import pytest
import torch
import torch.nn as nn

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import ddpm_solution as D  # noqa: E402

N_SIGMA = 5.0
pytestmark = pytest.mark.usefixtures('isolated_torch_state')


# ----------------------------------------------------------------------------------------------------------------
# Oracles.

def oracle_abar(T, b0=1e-4, b1=0.02):
    """(betas, abar) of the linear schedule, float64 Python lists. The betas are the template's: torch.linspace in
    float32 (docs/api.md), whose values may differ from the exact b0 + (b1 - b0) i / (T - 1) by an ulp; abar is then
    accumulated in float64 here, as DDIM does."""
    betas = torch.linspace(b0, b1, T, dtype=torch.float32).double().tolist()
    abar, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        abar.append(prod)
    return betas, abar


BETAS_1000, ABAR_1000 = oracle_abar(1000)


def oracle_tau(T, steps):
    """Round-half-up of i (T - 1) / (steps - 1) with exact rationals, descending."""
    if steps == 1:
        return [0]
    return [int(Fraction(i * (T - 1), steps - 1) + Fraction(1, 2)) for i in reversed(range(steps))]


def _rows(values, t, like):
    """values[t] per batch row, shaped to broadcast against `like`, as a tensor of like's dtype/device."""
    v = torch.tensor([values[i] for i in t.tolist()], dtype=like.dtype, device=like.device)
    return v.view((-1,) + (1,) * (like.dim() - 1))


class FixedEps(nn.Module):
    """eps(x, t) = E, a fixed tensor (broadcast over the batch), ignoring x and t."""

    def __init__(self, E):
        super().__init__()
        self.register_buffer('E', E)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        return self.E.to(x.dtype).expand_as(x)


class PointEps(nn.Module):
    """The exact eps for data = the single image x*: eps = (x_t - sqrt(abar_t) x*) / sqrt(1 - abar_t).
    Records every call's (x, t) so tests can inspect the trajectory."""

    def __init__(self, x_star, abar):
        super().__init__()
        self.x_star = x_star
        self.abar = abar
        self.calls = []
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        self.calls.append((x.clone(), t.clone()))
        a = _rows(self.abar, t, x)
        return (x - a.sqrt() * self.x_star.to(x.dtype)) / (1.0 - a).sqrt()


class GaussEps(nn.Module):
    """The exact eps for data x_0 ~ N(m, s^2 I). x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps is jointly Gaussian with
    eps: x_t ~ N(sqrt(abar) m, v_t), v_t = abar s^2 + 1 - abar, Cov(eps, x_t) = sqrt(1 - abar), hence
    E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) m) / v_t, the minimiser of the DDPM training loss."""

    def __init__(self, m, s, abar):
        super().__init__()
        self.m, self.s, self.abar = m, s, abar
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        a = _rows(self.abar, t, x)
        return (1.0 - a).sqrt() * (x - a.sqrt() * self.m) / (a * self.s ** 2 + 1.0 - a)


def gauss_chain_oracle(T, steps, eta, m, s, bug=None):
    """Exact (mean, std) of DDIM's output for GaussEps data, x_T ~ N(0, 1) per element: each step maps
    x -> c_x x + c_0 + sigma z, so (mu, V) -> (c_x mu + c_0, c_x^2 V + sigma^2), in float64.
    `bug` switches in a plausible wrong implementation to measure the tests' power."""
    _, abar = oracle_abar(T)
    tau = oracle_tau(T, steps)
    A = [1.0 - b for b in oracle_abar(T)[0]] if bug == 'alphas' else abar     # alphas instead of alphas_cumprod
    mu, V = 0.0, 1.0
    for t, p in zip(tau, tau[1:] + [-1]):
        at = abar[t]
        k = math.sqrt(1.0 - at) / (at * s * s + 1.0 - at)                     # eps = k x + c
        c = -k * math.sqrt(at) * m
        a_t = A[t]
        a_p = A[p] if (p >= 0 or bug == 'wrap') else 1.0                      # 'wrap': abar[-1] = abar_{T-1}
        gx = (1.0 - math.sqrt(1.0 - a_t) * k) / math.sqrt(a_t)               # x0_hat = gx x + g0
        g0 = -math.sqrt(1.0 - a_t) * c / math.sqrt(a_t)
        if p < 0 and bug != 'wrap':
            mu, V = gx * mu + g0, gx * gx * V
            continue
        sig = eta * math.sqrt(max((1.0 - a_p) / (1.0 - a_t) * (1.0 - a_t / a_p), 0.0))   # max: for 'wrap'
        if bug == 'no_outer_sqrt':
            sig = eta * math.sqrt((1.0 - a_p) / (1.0 - a_t)) * (1.0 - a_t / a_p)
        if bug == 'sigma_squared':
            sig = sig * sig
        if bug == 'ddpm_beta':
            sig = eta * math.sqrt(1.0 - a_t / a_p)
        d = math.sqrt(max(1.0 - a_p - sig * sig, 0.0))
        if bug == 'direction_ignores_sigma':
            d = math.sqrt(1.0 - a_p)
        cx = math.sqrt(a_p) * gx + d * k
        c0 = math.sqrt(a_p) * g0 + d * c
        mu, V = cx * mu + c0, cx * cx * V + sig * sig
    return mu, math.sqrt(V)


def ddpm_mean_oracle(x, eps, t, betas, abar):
    """DDPM eq. 11: 1/sqrt(alpha_t) (x - beta_t / sqrt(1 - abar_t) eps), float64, t an int."""
    return (x.double() - betas[t] / math.sqrt(1.0 - abar[t]) * eps.double()) / math.sqrt(1.0 - betas[t])


def ddpm_posterior_std_oracle(t, betas, abar):
    """sqrt(beta~_t), beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t) (DDPM eq. 7), abar_{-1} = 1."""
    a_prev = abar[t - 1] if t > 0 else 1.0
    return math.sqrt(betas[t] * (1.0 - a_prev) / (1.0 - abar[t]))


def bayes_posterior_oracle(x_t, x0, t, p, abar):
    """q(x_p | x_t, x_0) by Gaussian conditioning: given x_0, x_p ~ N(sqrt(abar_p) x_0, A), A = 1 - abar_p, and
    x_t = c x_p + N(0, B), c = sqrt(abar_t / abar_p), B = 1 - abar_t / abar_p. Then
    Var = A B / (c^2 A + B), mean = sqrt(abar_p) x_0 + A c / (c^2 A + B) (x_t - c sqrt(abar_p) x_0)."""
    A = 1.0 - abar[p]
    c = math.sqrt(abar[t] / abar[p])
    B = 1.0 - abar[t] / abar[p]
    mean = math.sqrt(abar[p]) * x0 + A * c / (c * c * A + B) * (x_t - c * math.sqrt(abar[p]) * x0)
    return mean, math.sqrt(A * B / (c * c * A + B))


# ----------------------------------------------------------------------------------------------------------------
# (1) eta = 1 reproduces the DDPM posterior.

@pytest.mark.parametrize('t', [1, 2, 10, 500, 998, 999])
def test_ddim_step_eta1_adjacent_is_ddpm_posterior_float64(t):
    """With prev = t - 1 (steps == T) and eta = 1, one DDIM update (run in float64) has exactly DDPM's mean
    (eq. 11, noise = 0) and standard deviation sqrt(beta~_t) (eq. 7, read off as (out(z) - out(0)) / z), for a
    fake model with a known eps -- a fixed tensor E and, separately, one that depends on x. Catches: alphas for
    alphas_cumprod, sigma^2 for sigma, the direction term sqrt(1 - abar_prev) ignoring sigma^2, a wrong outer
    sqrt in eq. 16."""
    sched = D.DiffusionSchedule(1000)
    gen = torch.Generator().manual_seed(100 + t)
    x = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64)
    E = torch.randn(1, 2, 3, 3, generator=gen, dtype=torch.float64)
    z = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64)
    for model, eps in ((FixedEps(E), E.expand_as(x)), (PointEps(0.3 * E, ABAR_1000), None)):
        if eps is None:
            a = ABAR_1000[t]
            eps = (x - math.sqrt(a) * 0.3 * E) / math.sqrt(1.0 - a)
        mean = sched.ddim_step(model, x, t, t - 1, eta=1.0, noise=torch.zeros_like(x))
        assert mean.dtype == torch.float64 and mean.shape == x.shape
        torch.testing.assert_close(mean, ddpm_mean_oracle(x, eps, t, BETAS_1000, ABAR_1000), rtol=2e-6, atol=1e-9)
        out = sched.ddim_step(model, x, t, t - 1, eta=1.0, noise=z)
        std = ((out - mean) / z).flatten()
        expected = ddpm_posterior_std_oracle(t, BETAS_1000, ABAR_1000)
        torch.testing.assert_close(std, torch.full_like(std, expected), rtol=2e-6, atol=0)


def test_ddim_last_step_returns_x0_hat_equal_to_ddpm_t0_mean():
    """The final update (t = 0 -> before 0, abar_prev := 1) returns x0_hat = (x - sqrt(1 - abar_0) eps) /
    sqrt(abar_0) with no noise for any eta, even when a noise tensor is passed; this equals DDPM's deterministic
    t_index = 0 mean. Catches: abar[-1] wrapping to abar_{T-1} for the 'previous' of index 0, noise added at the
    last step."""
    sched = D.DiffusionSchedule(1000)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 2, 2, generator=gen, dtype=torch.float64)
    E = torch.randn(1, 1, 2, 2, generator=gen, dtype=torch.float64)
    model = FixedEps(E)
    for eta in (0.0, 0.5, 1.0):
        out = sched.ddim_step(model, x, 0, -1, eta=eta, noise=torch.ones_like(x))
        x0_hat = (x - math.sqrt(1.0 - ABAR_1000[0]) * E) / math.sqrt(ABAR_1000[0])
        torch.testing.assert_close(out, x0_hat, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(out, ddpm_mean_oracle(x, E.expand_as(x), 0, BETAS_1000, ABAR_1000),
                                   rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize('t,p', [(999, 979), (999, 888), (500, 250), (111, 0), (20, 3)])
def test_ddim_step_eta1_jump_is_bayes_posterior(t, p):
    """For a jump t -> p (steps < T) and eta = 1, the DDIM update is the Bayes posterior q(x_p | x_t, x_0 =
    x0_hat), derived here by Gaussian conditioning rather than from eq. 12/16: same mean (noise = 0) and same
    std. Also for eta = 0.5 the std is half of it and the mean satisfies eq. 12 written out in float64.
    Catches: sigma computed with adjacent-step quantities (beta_t, alphas) instead of abar_t / abar_p."""
    sched = D.DiffusionSchedule(1000)
    gen = torch.Generator().manual_seed(t * 7 + p)
    x = torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64)
    E = torch.randn(1, 3, 2, 2, generator=gen, dtype=torch.float64)
    z = torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64)
    model = FixedEps(E)
    a_t, a_p = ABAR_1000[t], ABAR_1000[p]
    x0_hat = (x - math.sqrt(1.0 - a_t) * E) / math.sqrt(a_t)
    mean_o, std_o = bayes_posterior_oracle(x, x0_hat, t, p, ABAR_1000)
    mean = sched.ddim_step(model, x, t, p, eta=1.0, noise=torch.zeros_like(x))
    torch.testing.assert_close(mean, mean_o, rtol=2e-6, atol=1e-8)
    std = ((sched.ddim_step(model, x, t, p, eta=1.0, noise=z) - mean) / z).flatten()
    torch.testing.assert_close(std, torch.full_like(std, std_o), rtol=2e-6, atol=0)

    mean_h = sched.ddim_step(model, x, t, p, eta=0.5, noise=torch.zeros_like(x))
    sig_h = 0.5 * std_o
    torch.testing.assert_close(mean_h, math.sqrt(a_p) * x0_hat + math.sqrt(1.0 - a_p - sig_h ** 2) * E,
                               rtol=2e-6, atol=1e-8)
    std_h = ((sched.ddim_step(model, x, t, p, eta=0.5, noise=z) - mean_h) / z).flatten()
    torch.testing.assert_close(std_h, torch.full_like(std_h, sig_h), rtol=2e-6, atol=0)


def test_ddim_step_eta1_monte_carlo_matches_ddpm_posterior():
    """Drawn noise (noise=None, float32): for prev = t - 1 and eta = 1, out - DDPM mean has mean 0 and std
    sqrt(beta~_t) within 5 SE (40000 elements), while the variance-for-std and sqrt(beta_t)-for-sqrt(beta~_t)
    alternatives are > 20 SE away (asserted). Catches: noise not standard normal, shared across elements, the
    wrong scale."""
    torch.manual_seed(2)
    N = 40000
    sched = D.DiffusionSchedule(1000)
    model = FixedEps(torch.full((1, 1), 0.7))
    for t in (1, 10, 500):
        x = torch.randn(4, N // 4)
        out = sched.ddim_step(model, x, t, t - 1, eta=1.0).double()
        resid = (out - ddpm_mean_oracle(x, torch.full_like(x, 0.7), t, BETAS_1000, ABAR_1000)).flatten()
        std_true = ddpm_posterior_std_oracle(t, BETAS_1000, ABAR_1000)
        se_std = std_true / math.sqrt(2.0 * (N - 1))
        assert abs(resid.std().item() - std_true) < N_SIGMA * se_std
        assert abs(resid.mean().item()) < N_SIGMA * std_true / math.sqrt(N)
        assert abs(std_true ** 2 - std_true) > 20 * se_std
        if t == 1:
            assert abs(math.sqrt(BETAS_1000[t]) - std_true) > 20 * se_std


def test_ddim_full_schedule_eta1_equals_ddpm_chain():
    """DiffusionSchedule(20).ddim_sample(steps=20, eta=1) fed the same seed as sample() reproduces the DDPM
    chain (same RNG consumption: one randn for x_T, one per step except the last) and an independent float64
    DDPM chain. Catches: a tau that skips or repeats an index at steps == T, noise drawn at the final step, an
    extra draw per step."""
    sched = D.DiffusionSchedule(20)
    betas, abar = oracle_abar(20)
    model = FixedEps(torch.tensor([[[[0.4, -0.2], [0.1, 0.9]]]]))
    shape = (3, 1, 2, 2)
    torch.manual_seed(3)
    ddpm = sched.sample(model, shape)
    torch.manual_seed(3)
    ddim = sched.ddim_sample(model, shape, steps=20, eta=1.0)
    torch.testing.assert_close(ddim, ddpm, rtol=1e-5, atol=1e-5)
    torch.manual_seed(3)
    x = torch.randn(shape).double()
    for t in reversed(range(20)):
        mean = ddpm_mean_oracle(x, model.E.expand(shape), t, betas, abar)
        x = mean + ddpm_posterior_std_oracle(t, betas, abar) * torch.randn(shape).double() if t > 0 else mean
    torch.testing.assert_close(ddim.double(), x, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# (2) eta = 0: deterministic, and exact for a single-image data distribution.

@pytest.mark.parametrize('steps', [10, 50])
def test_ddim_eta0_point_data_follows_closed_form_trajectory(steps):
    """Data = one image x*. With the exact eps and eta = 0, eps stays constant along the chain, so the model's
    input at tau_k is sqrt(abar_k) x* + sqrt(1 - abar_k) eps_0 with eps_0 = (x_T - sqrt(abar_{T-1}) x*) /
    sqrt(1 - abar_{T-1}), and the output is x* -- to 1e-8 in float64 (x_T given as float64; the residue is the
    module's abar being accumulated from its float32-stored betas, ~1e-7 relative to the oracle's) and to 1e-5
    in float32. Catches: alphas for alphas_cumprod, a wrong direction coefficient, visiting the wrong time indices,
    returning anything but x0_hat at the end."""
    sched = D.DiffusionSchedule(1000)
    gen = torch.Generator().manual_seed(steps)
    x_star = torch.rand(1, 3, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    x_T = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    model = PointEps(x_star, ABAR_1000)
    out = sched.ddim_sample(model, x_T.shape, steps=steps, eta=0.0, x_T=x_T)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, x_star.expand_as(out), rtol=0, atol=1e-8)
    tau = oracle_tau(1000, steps)
    assert [c[1].unique().tolist() for c in model.calls] == [[i] for i in tau]
    eps0 = (x_T - math.sqrt(ABAR_1000[999]) * x_star) / math.sqrt(1.0 - ABAR_1000[999])
    for (x_in, _), i in zip(model.calls, tau):
        expected = math.sqrt(ABAR_1000[i]) * x_star + math.sqrt(1.0 - ABAR_1000[i]) * eps0
        torch.testing.assert_close(x_in, expected, rtol=0, atol=1e-8)
    # float32 path
    out32 = sched.ddim_sample(PointEps(x_star.float(), ABAR_1000), x_T.shape, steps=steps, x_T=x_T.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), x_star.expand_as(out32), rtol=0, atol=1e-5)


def test_ddim_eta0_deterministic_given_initial_noise():
    """eta = 0 draws nothing after x_T: the global RNG state is untouched when x_T is given, repeated calls are
    bitwise equal, and sampling with a seed equals sampling from x_T = randn(shape) under that seed (and with a
    seeded generator). eta = 0.5 by contrast does consume the RNG and differs between seeds. Catches: noise
    drawn (and added with sigma = 0, or with a non-zero sigma) at eta = 0."""
    sched = D.DiffusionSchedule(1000)
    model = GaussEps(0.3, 0.6, ABAR_1000)
    shape = (2, 1, 3, 3)
    torch.manual_seed(4)
    x_T = torch.randn(shape)
    state = torch.get_rng_state()
    a = sched.ddim_sample(model, shape, steps=25, x_T=x_T)
    assert torch.equal(torch.get_rng_state(), state)
    b = sched.ddim_sample(model, shape, steps=25, x_T=x_T.clone())
    assert torch.equal(a, b)
    torch.manual_seed(4)
    c = sched.ddim_sample(model, shape, steps=25)
    assert torch.equal(a, c)
    d = sched.ddim_sample(model, shape, steps=25, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, d)
    e1 = sched.ddim_sample(model, shape, steps=25, eta=0.5, x_T=x_T, generator=torch.Generator().manual_seed(5))
    e2 = sched.ddim_sample(model, shape, steps=25, eta=0.5, x_T=x_T, generator=torch.Generator().manual_seed(5))
    e3 = sched.ddim_sample(model, shape, steps=25, eta=0.5, x_T=x_T, generator=torch.Generator().manual_seed(6))
    assert torch.equal(e1, e2) and not torch.equal(e1, e3)


@pytest.mark.parametrize('eta', [0.5, 1.0])
def test_ddim_point_data_preserves_forward_marginals(eta):
    """DDIM's family keeps q(x_t | x_0) = N(sqrt(abar_t) x_0, 1 - abar_t) for every eta (Song et al., Lemma 1).
    With data = x* and the exact eps, the model's input at each tau is, element-wise, Gaussian with mean and
    variance propagated exactly from x_T ~ N(0, 1) (x_prev - sqrt(abar_p) x* = d / sqrt(1 - abar_t) (x_t -
    sqrt(abar_t) x*) + sigma z); that variance equals 1 - abar_tau to 1e-4, and the standardised inputs have mean
    0 and variance 1 within 5 SE (40000 elements). Catches: the direction term ignoring sigma^2 (variance
    inflation), a wrong sigma."""
    torch.manual_seed(7)
    sched = D.DiffusionSchedule(1000)
    x_star = torch.rand(1, 1, 4, 4) * 2 - 1
    N = 40000
    model = PointEps(x_star, ABAR_1000)
    sched.ddim_sample(model, (N // 16, 1, 4, 4), steps=10, eta=eta)
    tau = oracle_tau(1000, 10)
    mean_scale, V = -math.sqrt(ABAR_1000[999]), 1.0      # mean of x - sqrt(abar) x* is mean_scale * x*
    for k, ((x_in, _), i) in enumerate(zip(model.calls, tau)):
        if k > 0:
            t, p = tau[k - 1], i
            a_t, a_p = ABAR_1000[t], ABAR_1000[p]
            sig = eta * math.sqrt((1.0 - a_p) / (1.0 - a_t) * (1.0 - a_t / a_p))
            r = math.sqrt(1.0 - a_p - sig * sig) / math.sqrt(1.0 - a_t)
            mean_scale, V = r * mean_scale, r * r * V + sig * sig
        assert V == pytest.approx(1.0 - ABAR_1000[i], rel=1e-4)
        z = ((x_in.double() - math.sqrt(ABAR_1000[i]) * x_star - mean_scale * x_star) / math.sqrt(V)).flatten()
        assert abs(z.mean().item()) < N_SIGMA / math.sqrt(N)
        assert abs(z.var().item() - 1.0) < N_SIGMA * math.sqrt(2.0 / (N - 1))


# ----------------------------------------------------------------------------------------------------------------
# (3) Gaussian data: output mean m and std s.

GAUSS_M, GAUSS_S = 0.5, 0.5
BUGS = ('alphas', 'no_outer_sqrt', 'sigma_squared', 'ddpm_beta', 'direction_ignores_sigma', 'wrap')


@pytest.mark.parametrize('steps,eta,detect', [
    (1000, 0.0, ('alphas', 'wrap')),
    (50, 0.0, ('alphas', 'wrap')),
    (10, 0.0, ('alphas', 'wrap')),
    (50, 0.5, ('alphas', 'direction_ignores_sigma', 'wrap')),
    (10, 1.0, BUGS),
])
def test_ddim_gaussian_data_output_distribution(steps, eta, detect):
    """Data ~ N(m = 0.5, s = 0.5) per element, exact eps (GaussEps), float32 sampling of 64000 elements. The sample
    mean and std match the exactly propagated (mean, std) of the discrete chain within 5 SE; at steps = T that
    chain is within 1 SE of the data's (m, s) (the residue is N(0, I) vs the true marginal at T-1), so there the
    samples are also checked against (m, s) directly. Few-step DDIM genuinely shrinks the std for s != 1 (0.47 at
    50 steps, 0.36 at 10): the oracle reproduces that. Power: each listed wrong implementation's oracle is > 20 SE
    away from the correct one."""
    N = 64000
    sched = D.DiffusionSchedule(1000)
    model = GaussEps(GAUSS_M, GAUSS_S, ABAR_1000)
    gen = torch.Generator().manual_seed(steps * 10 + int(eta * 10))
    out = sched.ddim_sample(model, (N // 64, 4, 4, 4), steps=steps, eta=eta, generator=gen).double().flatten()
    mu, sd = gauss_chain_oracle(1000, steps, eta, GAUSS_M, GAUSS_S)
    se_mean, se_std = sd / math.sqrt(N), sd / math.sqrt(2.0 * (N - 1))
    assert abs(out.mean().item() - mu) < N_SIGMA * se_mean, (out.mean().item(), mu)
    assert abs(out.std().item() - sd) < N_SIGMA * se_std, (out.std().item(), sd)
    if steps == 1000:
        assert abs(mu - GAUSS_M) < 1.5 * se_mean and abs(sd - GAUSS_S) < 1.5 * se_std
        assert abs(out.mean().item() - GAUSS_M) < N_SIGMA * se_mean
        assert abs(out.std().item() - GAUSS_S) < N_SIGMA * se_std
    for bug in detect:
        mu_b, sd_b = gauss_chain_oracle(1000, steps, eta, GAUSS_M, GAUSS_S, bug=bug)
        assert abs(mu_b - mu) > 20 * se_mean or abs(sd_b - sd) > 20 * se_std, bug


# ----------------------------------------------------------------------------------------------------------------
# (4) The tau sequence.

@pytest.mark.parametrize('T,steps', [(1000, 50), (1000, 10), (1000, 2), (1000, 300), (1000, 999), (1000, 1000),
                                     (20, 7), (1500, 77), (500, 499), (2, 2), (1, 1)])
def test_ddim_timesteps_properties(T, steps):
    """ddim_timesteps(steps): a (steps,) long CPU tensor, strictly decreasing, from T-1 to 0, inside [0, T-1],
    evenly spaced (consecutive gaps differ by at most 1), equal to round-half-up(i (T-1) / (steps-1)) computed
    with exact rationals; steps == T gives every index. Catches: the paper's range(0, T, T // steps) (wrong
    length when steps does not divide T, no T-1), linspace over T points, an ascending order, float dtype."""
    tau = D.DiffusionSchedule(T).ddim_timesteps(steps)
    assert tau.dtype == torch.long and tau.shape == (steps,) and tau.device.type == 'cpu'
    lst = tau.tolist()
    assert lst == oracle_tau(T, steps)
    assert lst[-1] == 0 and lst[0] == T - 1
    assert all(a > b for a, b in zip(lst, lst[1:]))
    assert 0 <= min(lst) and max(lst) <= T - 1
    if steps > 2:
        gaps = [a - b for a, b in zip(lst, lst[1:])]
        assert max(gaps) - min(gaps) <= 1
    if steps == T:
        assert lst == list(reversed(range(T)))


def test_ddim_timesteps_and_sample_refuse_bad_arguments():
    """steps > T raises ValueError naming the limit T; steps < 1 and steps = 1 (T > 1) raise ValueError; a
    non-integer steps raises TypeError; ddim_sample refuses the same, eta outside [0, 1], and an x_T of the
    wrong shape; ddim_step refuses indices out of range (including prev_index >= t_index)."""
    sched = D.DiffusionSchedule(1000)
    with pytest.raises(ValueError, match=r'T=1000'):
        sched.ddim_timesteps(1001)
    with pytest.raises(ValueError, match=r'T=20\b'):
        D.DiffusionSchedule(20).ddim_timesteps(21)
    for bad in (0, -5, 1):
        with pytest.raises(ValueError):
            sched.ddim_timesteps(bad)
    for bad in (2.5, '10', True):
        with pytest.raises(TypeError):
            sched.ddim_timesteps(bad)
    model = FixedEps(torch.zeros(1))
    with pytest.raises(ValueError, match=r'T=1000'):
        sched.ddim_sample(model, (1, 1, 2, 2), steps=1001)
    for eta in (-0.1, 1.5, float('nan')):
        with pytest.raises(ValueError):
            sched.ddim_sample(model, (1, 1, 2, 2), steps=5, eta=eta)
    with pytest.raises(ValueError):
        sched.ddim_sample(model, (1, 1, 2, 2), steps=5, x_T=torch.zeros(2, 1, 2, 2))
    x = torch.zeros(1, 1, 2, 2)
    for t, p in ((1000, 10), (-1, -1), (10, 10), (10, 11), (10, -2)):
        with pytest.raises(ValueError):
            sched.ddim_step(model, x, t, p)


# ----------------------------------------------------------------------------------------------------------------
# (5) Output shape, dtype, device; the calls the model sees; API defaults.

class RecordingConv(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        self.calls = []

    def forward(self, x, t):
        self.calls.append((t.clone(), x.shape, x.device))
        return 0.1 * self.conv(x)


def test_ddim_sample_output_and_model_calls_cpu():
    """ddim_sample returns only x_0: shape (B, C, H, W), float32, on the model's device (CPU here), finite. The
    model is called exactly `steps` times, with (B,) long t on x's device holding tau_k in descending order.
    Default arguments: steps = 50, eta = 0, no clipping, no progress bar. progress=True gives the same result."""
    torch.manual_seed(8)
    model = RecordingConv(3)
    sched = D.DiffusionSchedule(1000)
    shape = (2, 3, 5, 4)
    torch.manual_seed(9)
    out = sched.ddim_sample(model, shape, steps=12, eta=0.3)
    assert out.shape == shape and out.dtype == torch.float32 and out.device.type == 'cpu'
    assert torch.isfinite(out).all()
    assert len(model.calls) == 12
    for (t, xs, dev), i in zip(model.calls, oracle_tau(1000, 12)):
        assert t.dtype == torch.long and t.shape == (2,) and torch.equal(t, torch.full((2,), i))
        assert tuple(xs) == shape and dev.type == 'cpu'
    torch.manual_seed(9)
    assert torch.equal(sched.ddim_sample(model, shape, steps=12, eta=0.3, progress=True), out)
    params = inspect.signature(D.DiffusionSchedule.ddim_sample).parameters
    assert params['steps'].default == 50 and params['eta'].default == 0.0
    assert params['clip_denoised'].default is False and params['progress'].default is False
    assert inspect.signature(D.DiffusionSchedule.ddim_step).parameters['clip_denoised'].default is False
    assert len(D.DiffusionSchedule(1000).ddim_sample(model, shape)) == 2        # default 50 steps runs


@pytest.mark.cuda
def test_ddim_sample_on_cuda_matches_cpu(no_tf32):
    """On a GPU: the schedule moved with .to('cuda') and a CUDA model give a CUDA float32 (B, C, H, W) output
    that equals the CPU result from the same x_T (eta = 0) to float32 rounding (TF32 off: no_tf32)."""
    torch.manual_seed(10)
    model = RecordingConv(3)
    sched = D.DiffusionSchedule(1000)
    x_T = torch.randn(2, 3, 8, 8)
    cpu = sched.ddim_sample(model, x_T.shape, steps=20, x_T=x_T)
    model_c, sched_c = model.cuda(), sched.to('cuda')
    gpu = sched_c.ddim_sample(model_c, x_T.shape, steps=20, x_T=x_T.cuda())
    assert gpu.device.type == 'cuda' and gpu.dtype == torch.float32 and gpu.shape == x_T.shape
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)
    drawn = sched_c.ddim_sample(model_c, (3, 3, 8, 8), steps=5, eta=1.0)
    assert drawn.device.type == 'cuda' and drawn.shape == (3, 3, 8, 8)


def test_ddim_clip_denoised_option():
    """clip_denoised (off by default) clamps x0_hat to [-1, 1] and re-derives eps from the clamped x0_hat:
    with data x* = 3 (outside [-1, 1]) the unclipped sampler returns 3 and the clipped one 1; with x* inside
    [-1, 1] clipping changes nothing; one clipped step equals sqrt(abar_p) x0c + sqrt(1 - abar_p)(x - sqrt(abar_t)
    x0c) / sqrt(1 - abar_t) in float64."""
    sched = D.DiffusionSchedule(1000)
    x_T = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    far = PointEps(torch.full((1, 1, 2, 2), 3.0, dtype=torch.float64), ABAR_1000)
    torch.testing.assert_close(sched.ddim_sample(far, x_T.shape, steps=10, x_T=x_T),
                               torch.full_like(x_T, 3.0), rtol=0, atol=1e-8)
    torch.testing.assert_close(sched.ddim_sample(far, x_T.shape, steps=10, x_T=x_T, clip_denoised=True),
                               torch.full_like(x_T, 1.0), rtol=0, atol=1e-8)
    near = PointEps(torch.tensor([[[[0.5, -0.9], [0.0, 0.99]]]], dtype=torch.float64), ABAR_1000)
    torch.testing.assert_close(sched.ddim_sample(near, x_T.shape, steps=10, x_T=x_T, clip_denoised=True),
                               sched.ddim_sample(near, x_T.shape, steps=10, x_T=x_T), rtol=0, atol=1e-8)
    t, p = 500, 300
    a_t, a_p = ABAR_1000[t], ABAR_1000[p]
    x0c = ((x_T - math.sqrt(1.0 - a_t) * far(x_T, torch.full((2,), t))) / math.sqrt(a_t)).clamp(-1, 1)
    expected = math.sqrt(a_p) * x0c + math.sqrt(1.0 - a_p) * (x_T - math.sqrt(a_t) * x0c) / math.sqrt(1.0 - a_t)
    torch.testing.assert_close(sched.ddim_step(far, x_T, t, p, clip_denoised=True), expected, rtol=1e-6, atol=1e-9)
