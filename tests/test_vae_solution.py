"""Unit tests for vae_solution.py (Problem 1) against independent oracles.

The oracles are closed forms written out here, ``torch.distributions`` (allowed in tests only), brute-force
computations (a quadrature of log p(x) over a 2-D latent grid, an explicit importance-sampling sum in float64)
and Monte-Carlo statistics whose tolerances come from their standard errors (5 sigma, so a false failure has a
probability of order 1e-6 per check, while the plausible bugs named in each docstring move the statistic by
tens of standard errors).

Isolation: every test runs inside ``torch.random.fork_rng`` (the global CPU RNG is restored afterwards) and
with torch's intra-op thread count set to 1 and restored afterwards: on a shared 2-core machine OpenMP
contention makes the tiny convolutions used here ~50x slower with 2 threads.
"""
import inspect
import math
import pathlib
import random
import sys

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import vae_solution as V  # noqa: E402

LOG_2PI = math.log(2.0 * math.pi)


pytestmark = pytest.mark.usefixtures('isolated_torch_state')


def _tiny_vae(seed=0, z_dim=2, features=4, decoder_gain=3.0):
    """A small CPU VAE in eval mode. The decoder's dense layer is scaled so that p(x|z) depends visibly on z
    (the Jensen gap between the ELBO and log p(x) is then ~2 nats instead of ~0.1)."""
    torch.manual_seed(seed)
    model = V.VAE(in_channels=3, decoder_features=features, encoder_features=features, z_dim=z_dim,
                  input_size=32, device='cpu').eval()
    with torch.no_grad():
        model.decoder.decoder_dense[0].weight.mul_(decoder_gain)
    return model


def _heads(model, x):
    """Posterior parameters straight from the encoder heads (not through DiagonalGaussianDistribution)."""
    with torch.no_grad():
        h = model.encoder(x)
        return model.mean(h), model.logvar(h)


def _log_px_quadrature(model, x, half_width=6.0, n=61):
    """log p(x) = log \\int N(x; dec(z), I) N(z; 0, I) dz by a Riemann sum on an n x n grid (z_dim must be 2).
    The integrand is a smooth, Gaussian-tailed function of z, so the rule is accurate to ~1e-3 nats here."""
    assert model.z_dim == 2
    g = torch.linspace(-half_width, half_width, n)
    cell = (g[1] - g[0]).item() ** 2
    zs = torch.cartesian_prod(g, g)                                          # (n*n, 2)
    with torch.no_grad():
        dec = torch.cat([model.decoder(c) for c in zs.split(512)]).double()  # (n*n, 3, 32, 32)
    log_prior = Normal(0.0, 1.0).log_prob(zs.double()).sum(1)
    out = []
    for b in range(x.shape[0]):
        log_lik = Normal(dec, 1.0).log_prob(x[b].double()).flatten(1).sum(1)
        out.append(torch.logsumexp(log_lik + log_prior, 0) + math.log(cell))
    return torch.stack(out)


def _brute_force_log_weights(model, x, K, seed):
    """log p(x|z_k) + log p(z_k) - log q(z_k|x) in float64, z_k drawn as K successive reparameterised draws
    of shape (B, z_dim) after torch.manual_seed(seed) (the order the module draws them in)."""
    mu, logvar = _heads(model, x)
    assert logvar.abs().max() < 20  # far from the clamp, so the clamp plays no role
    q = Normal(mu, torch.exp(0.5 * logvar))
    prior = Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.manual_seed(seed)
    ws = []
    with torch.no_grad():
        for _ in range(K):
            z = q.rsample()
            lik = Normal(model.decoder(z).double(), 1.0)
            ws.append(lik.log_prob(x.double()).sum((1, 2, 3))
                      + prior.log_prob(z).sum(1).double() - q.log_prob(z).sum(1).double())
    return torch.stack(ws, 1)                                                # (B, K) float64


# --------------------------------------------------------------------------------------------------------------
# 1. DiagonalGaussianDistribution
# --------------------------------------------------------------------------------------------------------------

def test_gaussian_constructor_defaults_clamp_and_std_var():
    """Catches: logvar=None not giving zeros (identity covariance), a missing/wrong clamp, an in-place clamp
    that mutates the caller's tensor, std = exp(logvar) or var = exp(0.5*logvar)."""
    torch.manual_seed(0)
    mean = torch.randn(4, 6)
    d = V.DiagonalGaussianDistribution(mean)
    assert d.mean is mean
    assert d.logvar.shape == mean.shape and d.logvar.dtype == mean.dtype
    assert torch.equal(d.logvar, torch.zeros_like(mean))
    assert torch.equal(d.std, torch.ones_like(mean)) and torch.equal(d.var, torch.ones_like(mean))

    raw = torch.tensor([[-1000.0, -30.5, -30.0, -3.0, 0.0, 1.5, 20.0, 20.5, 1000.0]])
    raw_copy = raw.clone()
    d = V.DiagonalGaussianDistribution(torch.zeros_like(raw), raw)
    expected = torch.tensor([[-30.0, -30.0, -30.0, -3.0, 0.0, 1.5, 20.0, 20.0, 20.0]])
    assert torch.equal(d.logvar, expected)
    assert torch.equal(raw, raw_copy), "the caller's logvar must not be modified"
    e64 = expected.double()
    torch.testing.assert_close(d.std.double(), torch.exp(0.5 * e64), rtol=1e-6, atol=0)
    torch.testing.assert_close(d.var.double(), torch.exp(e64), rtol=1e-6, atol=0)
    torch.testing.assert_close(d.std.double() ** 2, d.var.double(), rtol=1e-5, atol=0)
    assert torch.isfinite(d.var).all() and (d.var > 0).all() and (d.std > 0).all()


def test_gaussian_mode_is_mean():
    """Catches mode() returning a sample, the std, or a copy with different values."""
    torch.manual_seed(0)
    mean, logvar = torch.randn(3, 5), torch.randn(3, 5)
    d = V.DiagonalGaussianDistribution(mean, logvar)
    torch.manual_seed(1)
    assert torch.equal(d.mode(), mean)
    assert torch.equal(d.mode(), d.mode())


def test_gaussian_kl_matches_torch_distributions():
    """Catches a wrong closed form (missing -1, missing -logvar, var vs std, a 0.5 factor, summing over the
    batch or averaging over latents); kl must be exactly 0 for N(0, I)."""
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        mean = 2.0 * torch.randn(5, 7, dtype=dtype)
        logvar = 1.5 * torch.randn(5, 7, dtype=dtype)
        kl = V.DiagonalGaussianDistribution(mean, logvar).kl()
        assert kl.shape == (5,)
        ref = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(1)
        torch.testing.assert_close(kl, ref, rtol=tol, atol=tol)
        assert (kl > 0).all()
    zero = V.DiagonalGaussianDistribution(torch.zeros(4, 8), torch.zeros(4, 8)).kl()
    assert torch.equal(zero, torch.zeros(4))
    zero = V.DiagonalGaussianDistribution(torch.zeros(4, 8)).kl()
    assert torch.equal(zero, torch.zeros(4))


def test_gaussian_nll_matches_torch_distributions_4d_and_2d():
    """Catches a missing 0.5*log(2*pi) constant, dividing by std instead of var, missing the logvar term,
    a wrong sign, or summing over the wrong dims (default dims must be [1, 2, 3])."""
    torch.manual_seed(0)
    mean = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    logvar = 0.7 * torch.randn(2, 3, 4, 5, dtype=torch.float64)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    d = V.DiagonalGaussianDistribution(mean, logvar)
    ref = -Normal(mean, torch.exp(0.5 * logvar)).log_prob(x).sum((1, 2, 3))
    torch.testing.assert_close(d.nll(x, dims=[1, 2, 3]), ref, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(d.nll(x), ref, rtol=1e-12, atol=1e-10)
    assert d.nll(x).shape == (2,)

    # Unit variance, written out: 0.5 * sum((x - m)^2) + 0.5 * D * log(2 pi).
    unit = V.DiagonalGaussianDistribution(mean)
    closed = 0.5 * ((x - mean) ** 2).sum((1, 2, 3)) + 0.5 * 60 * LOG_2PI
    torch.testing.assert_close(unit.nll(x), closed, rtol=1e-12, atol=1e-10)

    mean2, logvar2, z = torch.randn(6, 3), torch.randn(6, 3), torch.randn(6, 3)
    d2 = V.DiagonalGaussianDistribution(mean2, logvar2)
    out = d2.nll(z, dims=[1])
    assert out.shape == (6,)
    ref2 = -Normal(mean2, torch.exp(0.5 * logvar2)).log_prob(z).sum(1)
    torch.testing.assert_close(out, ref2, rtol=1e-5, atol=1e-5)


def test_gaussian_sample_monte_carlo_moments():
    """20k draws: per-coordinate mean and std within 5 standard errors, a Gaussian 1-sigma mass, and no
    correlation between coordinates. Catches std replaced by var (the variances 9 and 0.04 are far from 1),
    uniform noise (rand_like), noise shared across coordinates/rows, and a missing mean shift."""
    torch.manual_seed(1234)
    n = 20000
    mu = torch.tensor([1.5, -2.0, 0.0, 0.3])
    var = torch.tensor([9.0, 0.04, 1.0 / 9.0, 4.0])
    std = var.sqrt()
    d = V.DiagonalGaussianDistribution(mu.expand(n, 4).clone(), torch.log(var).expand(n, 4).clone())
    s = d.sample().double()
    assert s.shape == (n, 4)

    se_mean = std.double() / math.sqrt(n)
    assert ((s.mean(0) - mu.double()).abs() < 5 * se_mean).all(), (s.mean(0), mu)
    se_std = std.double() / math.sqrt(2 * (n - 1))                  # SE of the sample std of a Gaussian
    assert ((s.std(0) - std.double()).abs() < 5 * se_std).all(), (s.std(0), std)
    # The test has power against "var instead of std": that bug is hundreds of SEs away.
    assert ((var.double() - std.double()).abs() > 50 * se_std).all()

    # Gaussian shape: P(|s - mu| < std) = erf(1/sqrt 2) = 0.6827 (uniform noise with the same std: 0.577).
    p = math.erf(1 / math.sqrt(2))
    frac = ((s - mu.double()).abs() < std.double()).double().mean(0)
    assert ((frac - p).abs() < 5 * math.sqrt(p * (1 - p) / n)).all(), frac

    # Independent coordinates: sample correlations are N(0, 1/n) under independence.
    corr = torch.corrcoef(s.T)
    off = corr[~torch.eye(4, dtype=torch.bool)]
    assert (off.abs() < 5 / math.sqrt(n)).all(), corr
    # Independent rows (the noise is not one vector broadcast over the batch).
    lag = torch.corrcoef(torch.stack([s[:-1, 0], s[1:, 0]]))[0, 1]
    assert abs(lag) < 5 / math.sqrt(n)


def test_gaussian_sample_reparameterisation_gradients():
    """d sample/d mean = 1 exactly and d sample/d logvar = 0.5*std*eps for the eps re-drawn with the same seed.
    Catches a detached/no-grad sample, sampling with torch.normal (not differentiable in logvar), and a wrong
    std (e.g. exp(logvar): gradient std*eps)."""
    torch.manual_seed(0)
    mean = torch.randn(3, 4, requires_grad=True)
    logvar = (0.8 * torch.randn(3, 4)).requires_grad_(True)
    d = V.DiagonalGaussianDistribution(mean, logvar)
    torch.manual_seed(77)
    s = d.sample()
    assert s.shape == mean.shape and s.requires_grad
    s.sum().backward()

    torch.manual_seed(77)
    eps = torch.randn_like(mean)
    with torch.no_grad():
        std = torch.exp(0.5 * logvar)
        torch.testing.assert_close(s.detach(), mean + std * eps, rtol=1e-6, atol=1e-6)
    assert torch.equal(mean.grad, torch.ones_like(mean))
    torch.testing.assert_close(logvar.grad, 0.5 * std * eps, rtol=1e-5, atol=1e-7)
    assert (logvar.grad != 0).all()

    # One coordinate at a time (the Jacobian is diagonal: no cross-talk between coordinates).
    mean.grad, logvar.grad = None, None
    torch.manual_seed(77)
    V.DiagonalGaussianDistribution(mean, logvar).sample()[1, 2].backward()
    expected_mean_grad = torch.zeros_like(mean)
    expected_mean_grad[1, 2] = 1.0
    assert torch.equal(mean.grad, expected_mean_grad)
    assert torch.count_nonzero(logvar.grad) == 1
    torch.testing.assert_close(logvar.grad[1, 2], 0.5 * std[1, 2] * eps[1, 2], rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------------------------
# 2. VAE shapes, devices, forward
# --------------------------------------------------------------------------------------------------------------

def test_encoder_and_decoder_output_shapes():
    """Catches a wrong flatten size (must be 8*nef*(isize/16)^2 = 1024 for nef=32, isize=32) or a decoder that
    does not return (B, nc, isize, isize)."""
    torch.manual_seed(0)
    enc = V.Encoder(nc=3, nef=32, nz=100, isize=32, device='cpu').eval()
    with torch.no_grad():
        assert enc(torch.randn(2, 3, 32, 32)).shape == (2, 1024)
        enc_small = V.Encoder(nc=1, nef=4, nz=7, isize=64, device='cpu').eval()
        assert enc_small(torch.randn(2, 1, 64, 64)).shape == (2, 8 * 4 * 4 * 4)
        dec = V.Decoder(nc=3, ndf=32, nz=100, isize=32)
        assert dec(torch.randn(2, 100)).shape == (2, 3, 32, 32)
        dec_small = V.Decoder(nc=1, ndf=4, nz=5, isize=64)
        assert dec_small(torch.randn(3, 5)).shape == (3, 1, 64, 64)


def test_vae_return_shapes():
    """Catches wrong shapes of encode/decode/sample/forward/log_likelihood outputs, e.g. an nll or kl that is
    averaged to a scalar or not summed over pixels/latents."""
    torch.manual_seed(0)
    model = V.VAE(z_dim=V.z_dim, device='cpu').eval()
    assert model.mean.in_features == 1024 and model.logvar.in_features == 1024
    assert model.mean.out_features == V.z_dim and model.logvar.out_features == V.z_dim
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        q = model.encode(x)
        assert isinstance(q, V.DiagonalGaussianDistribution)
        assert q.mean.shape == (2, V.z_dim) and q.logvar.shape == (2, V.z_dim)
        p = model.decode(torch.randn(2, V.z_dim))
        assert isinstance(p, V.DiagonalGaussianDistribution)
        assert p.mode().shape == (2, 3, 32, 32)
        assert torch.equal(p.logvar, torch.zeros_like(p.mean)), "p(x|z) must have unit variance"
        recon, nll, kl = model(x)
        assert recon.shape == (2, 3, 32, 32) and nll.shape == (2,) and kl.shape == (2,)
    s = model.sample(3)
    assert s.shape == (3, 3, 32, 32) and not s.requires_grad
    ll = model.log_likelihood(x, K=3)
    assert ll.shape == (2,) and torch.isfinite(ll).all()


def test_vae_default_cuda_device_argument_works_on_cpu():
    """VAE() keeps the template default device=cuda:0; after .to('cpu') every method must run on CPU tensors.
    Catches tensors created on self.device (e.g. torch.randn(..., device=self.device)) in sample,
    log_likelihood, forward or interpolate."""
    torch.manual_seed(0)
    model = V.VAE()
    assert model.device == torch.device('cuda:0')
    assert model.z_dim == 100 and model.in_channels == 3
    model = model.to('cpu')
    assert all(p.device.type == 'cpu' for p in model.parameters())
    x = torch.randn(2, 3, 32, 32)

    model.train()
    recon, nll, kl = model(x)
    (nll + kl).mean().backward()                       # a training step's backward pass works on CPU
    assert recon.device.type == 'cpu' and torch.isfinite(nll).all() and torch.isfinite(kl).all()

    model.eval()
    with torch.no_grad():
        recon, nll, kl = model(x)
        assert recon.shape == (2, 3, 32, 32) and nll.shape == (2,) and kl.shape == (2,)
        assert model.encode(x).mean.device.type == 'cpu'
        assert model.decode(torch.randn(2, 100)).mode().device.type == 'cpu'
    s = model.sample(2)
    assert s.shape == (2, 3, 32, 32) and s.device.type == 'cpu'
    ll = model.log_likelihood(x, K=2)
    assert ll.shape == (2,) and ll.device.type == 'cpu' and torch.isfinite(ll).all()
    interp = V.interpolate(model, torch.randn(1, 100), torch.randn(1, 100), 3)
    assert interp.shape == (3, 3, 32, 32) and interp.device.type == 'cpu'


def test_vae_forward_matches_independent_recomputation():
    """With the same seed, forward's nll equals -sum log N(x; decoder(z), 1) for z = mu + std*eps recomputed
    from the encoder heads, recon equals decoder(z), and kl equals the closed form from the heads. Catches
    using the posterior mean instead of a sample, a reconstruction nll with the wrong variance/constant/sign,
    kl of the wrong distribution, or returning a sample instead of the decoder mean."""
    model = _tiny_vae(seed=3, z_dim=4, features=8, decoder_gain=1.0)
    torch.manual_seed(11)
    x = torch.randn(3, 3, 32, 32)
    mu, logvar = _heads(model, x)
    with torch.no_grad():
        torch.manual_seed(5)
        recon, nll, kl = model(x)

        torch.manual_seed(5)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(3, 4)
        dec = model.decoder(z)
    torch.testing.assert_close(recon, dec, rtol=1e-6, atol=1e-6)
    nll_ref = -Normal(dec.double(), 1.0).log_prob(x.double()).sum((1, 2, 3))
    torch.testing.assert_close(nll.double(), nll_ref, rtol=2e-6, atol=1e-3)
    kl_closed = 0.5 * (mu.double() ** 2 + torch.exp(logvar.double()) - 1.0 - logvar.double()).sum(1)
    torch.testing.assert_close(kl.double(), kl_closed, rtol=1e-5, atol=1e-6)
    kl_td = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(kl, kl_td, rtol=1e-5, atol=1e-6)

    # The draw is random: a different seed gives a different nll (z is not the posterior mean).
    with torch.no_grad():
        torch.manual_seed(6)
        _, nll_other, kl_other = model(x)
        nll_at_mean = -Normal(model.decoder(mu).double(), 1.0).log_prob(x.double()).sum((1, 2, 3))
    assert not torch.allclose(nll_other, nll)
    assert not torch.allclose(nll.double(), nll_at_mean, rtol=0, atol=1e-4)
    torch.testing.assert_close(kl_other, kl)


def test_vae_forward_backpropagates_through_the_sample():
    """The reconstruction term alone must send gradient to both encoder heads (reparameterisation).
    Catches a detached z or a z drawn under no_grad."""
    model = _tiny_vae(seed=0, z_dim=4, features=4, decoder_gain=1.0).train()
    torch.manual_seed(1)
    x = torch.randn(4, 3, 32, 32)
    _, nll, kl = model(x)
    nll.sum().backward()
    for name in ('mean', 'logvar'):
        grad = getattr(model, name).weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert model.encoder.encoder[0].weight.grad.abs().sum() > 0
    assert model.decoder.decoder_conv[-1].weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------------------
# 3. log_likelihood (importance sampling)
# --------------------------------------------------------------------------------------------------------------

def test_log_likelihood_matches_brute_force_importance_sum():
    """Same z draws recomputed with torch.distributions, log-weights in float64, combined naively as
    log(mean(exp(w - max))) + max. Catches a missing -log K, averaging log-weights (the ELBO, ~2 nats lower
    here), a missing prior or posterior term, sign errors, or the wrong posterior (e.g. var instead of std)."""
    model = _tiny_vae(seed=0)
    torch.manual_seed(21)
    x = 0.5 * torch.randn(2, 3, 32, 32)
    K, seed = 50, 123
    torch.manual_seed(seed)
    ll = model.log_likelihood(x, K=K)
    assert ll.shape == (2,) and ll.dtype == torch.float32

    w = _brute_force_log_weights(model, x, K, seed)
    m = w.max(1).values
    ref = torch.log(torch.exp(w - m[:, None]).mean(1)) + m
    torch.testing.assert_close(ll.double(), ref, rtol=0, atol=5e-3)
    # Non-vacuous: the plausible wrong answers are far outside the tolerance.
    assert ((ref - w.mean(1)).abs() > 0.2).all()             # ELBO-style mean of log-weights
    assert math.log(K) > 1.0                                  # a forgotten -log K

    # The default K is 100 (template signature).
    assert inspect.signature(V.VAE.log_likelihood).parameters['K'].default == 100


def test_log_likelihood_k1_is_unbiased_for_the_elbo():
    """E[IS-LL with K=1] = ELBO = -E[nll] - KL. 2000 draws per image, paired on the seed; the mean
    difference must be within 5 standard errors of 0. Catches a missing/extra log q or log p(z) term
    (shifts of ~2.8 nats for z_dim=2) or a KL-vs-log-ratio sign error."""
    model = _tiny_vae(seed=0)
    torch.manual_seed(22)
    x = 0.5 * torch.randn(2, 3, 32, 32)
    n = 2000
    xr = x.repeat(n, 1, 1, 1)                                 # eval mode: rows are independent draws
    with torch.no_grad():
        torch.manual_seed(7)
        _, nll, kl = model(xr)
    torch.manual_seed(7)
    l1 = model.log_likelihood(xr, K=1)
    diff = (l1.double() + nll.double() + kl.double()).view(n, 2)
    se = diff.std(0) / math.sqrt(n)
    assert (se < 0.1).all(), se                               # tight enough to see a 2.8-nat bug
    assert (diff.mean(0).abs() < 5 * se + 1e-3).all(), (diff.mean(0), se)
    # Unpaired check as well (does not rely on forward and log_likelihood drawing z in the same order).
    elbo = -(nll + kl).double().view(n, 2)
    l1v = l1.double().view(n, 2)
    se_u = torch.sqrt(elbo.var(0) / n + l1v.var(0) / n)
    assert ((l1v.mean(0) - elbo.mean(0)).abs() < 5 * se_u).all()


def test_log_likelihood_k50_tightens_the_bound_towards_quadrature_log_px():
    """Burda et al.: ELBO <= E[IS-LL(K=50)] <= log p(x), with IS-LL(50) close to log p(x). log p(x) comes from
    a 2-D quadrature. Catches an estimator that does not improve on the ELBO (mean of log-weights), one that
    overshoots log p(x) (e.g. a missing -log K: +3.9 nats, or max instead of logsumexp), and any bias in the
    ELBO itself; the ELBO-to-IS margin is required to exceed 5 standard errors (not vacuous)."""
    model = _tiny_vae(seed=0)
    torch.manual_seed(23)
    x = 0.5 * torch.randn(2, 3, 32, 32)
    log_px = _log_px_quadrature(model, x)
    # The quadrature is converged: a coarser grid agrees to 1e-2 nats.
    torch.testing.assert_close(log_px, _log_px_quadrature(model, x, half_width=6.0, n=41), rtol=0, atol=1e-2)

    n = 2000
    with torch.no_grad():
        torch.manual_seed(8)
        _, nll, kl = model(x.repeat(n, 1, 1, 1))
    elbo = -(nll + kl).double().view(n, 2)
    elbo_mean, elbo_se = elbo.mean(0), elbo.std(0) / math.sqrt(n)

    reps = 40                                                # 40 independent K=50 estimates per image
    torch.manual_seed(9)
    ll50 = model.log_likelihood(x.repeat(reps, 1, 1, 1), K=50).double().view(reps, 2)
    ll_mean, ll_se = ll50.mean(0), ll50.std(0) / math.sqrt(reps)

    se = torch.sqrt(elbo_se ** 2 + ll_se ** 2)
    gap = log_px - elbo_mean
    assert (gap > 10 * elbo_se).all(), (gap, elbo_se)               # the ELBO is a strict lower bound here
    assert (ll_mean - elbo_mean > 5 * se).all(), (ll_mean, elbo_mean, se)
    assert (ll_mean <= log_px + 5 * ll_se + 1e-2).all(), (ll_mean, log_px, ll_se)
    # E[log p_K] = log p(x) - O(Var/K): K=50 closes most of the ELBO gap.
    assert ((log_px - ll_mean).abs() < 0.25 * gap + 5 * ll_se + 1e-2).all(), (ll_mean, log_px, gap)


def test_log_likelihood_is_stable_for_very_negative_log_weights():
    """Log-weights around -5000 nats underflow exp() even in float64; the module must still return the finite
    log-sum-exp value (and stay finite for an extreme input). Catches log(mean(exp(w))) without the max shift."""
    model = _tiny_vae(seed=0)
    torch.manual_seed(24)
    x = 1.3 * torch.randn(2, 3, 32, 32)
    K, seed = 20, 5
    torch.manual_seed(seed)
    ll = model.log_likelihood(x, K=K)
    w = _brute_force_log_weights(model, x, K, seed)
    assert (w.max(1).values < -4000).all(), w.max(1).values
    naive = torch.log(torch.exp(w).mean(1))
    assert torch.isinf(naive).all()                           # the naive formula really does underflow
    assert torch.isfinite(ll).all()
    m = w.max(1).values
    ref = torch.log(torch.exp(w - m[:, None]).mean(1)) + m
    torch.testing.assert_close(ll.double(), ref, rtol=1e-5, atol=1e-2)

    torch.manual_seed(seed)
    ll_extreme = model.log_likelihood(40.0 * x, K=5)
    assert torch.isfinite(ll_extreme).all() and (ll_extreme < -1e5).all(), ll_extreme


# --------------------------------------------------------------------------------------------------------------
# 4. interpolate and sample
# --------------------------------------------------------------------------------------------------------------

def test_interpolate_endpoints_midpoint_and_linearity():
    """Catches endpoints that are not exactly z_1 / z_2 (e.g. linspace excluding the end, reversed order),
    a non-linear path, returning samples instead of decoder means, or a wrong number of points."""
    model = _tiny_vae(seed=1, z_dim=6, features=4, decoder_gain=1.0)
    torch.manual_seed(31)
    z1, z2 = 2.0 * torch.randn(1, 6), 2.0 * torch.randn(1, 6)
    n = 5
    out = V.interpolate(model, z1, z2, n)
    assert out.shape == (n, 3, 32, 32)
    with torch.no_grad():
        first = model.decode(z1).mode()
        last = model.decode(z2).mode()
        mid = model.decode(0.5 * (z1 + z2)).mode()
        ts = torch.arange(n, dtype=torch.float32)[:, None] / (n - 1)
        path = model.decoder(z1 + ts * (z2 - z1))
    torch.testing.assert_close(out[0:1], first, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[-1:], last, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[2:3], mid, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, path, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(first, last)                    # the endpoints are distinguishable
    # Deterministic (decoder means, no sampling noise).
    torch.testing.assert_close(V.interpolate(model, z1, z2, n), out, rtol=0, atol=0)
    two = V.interpolate(model, z1, z2, 2)
    torch.testing.assert_close(two, torch.cat([first, last]), rtol=1e-5, atol=1e-6)


def test_sample_decodes_standard_normal_latents():
    """sample(n) must be decoder(z) for z = randn(n, z_dim) (the mode, no pixel noise). Catches adding pixel
    noise, drawing z with the wrong shape, or z from a non-standard normal."""
    model = _tiny_vae(seed=2, z_dim=5, features=4, decoder_gain=1.0)
    torch.manual_seed(41)
    s = model.sample(4)
    torch.manual_seed(41)
    with torch.no_grad():
        ref = model.decoder(torch.randn(4, 5))
    assert s.shape == (4, 3, 32, 32)
    torch.testing.assert_close(s, ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# 5. Module constants, seeding, imports
# --------------------------------------------------------------------------------------------------------------

def test_module_constants_and_signatures():
    """Catches constants that drift from the template (docs/api.md) and changed defaults in the public signatures."""
    assert V.train_batch_size == 64 and isinstance(V.train_batch_size, int)
    assert V.z_dim == 32 and isinstance(V.z_dim, int)
    assert V.lr == 1e-4
    assert V.image_size == 32 and V.input_channels == 3
    assert V.data_root == './data'
    assert isinstance(V.device, str)
    assert V.device == ('cuda' if torch.cuda.is_available() else 'cpu')

    params = inspect.signature(V.VAE.__init__).parameters
    assert {k: params[k].default for k in ('in_channels', 'decoder_features', 'encoder_features', 'z_dim',
                                           'input_size')} == dict(in_channels=3, decoder_features=32,
                                                                  encoder_features=32, z_dim=100, input_size=32)
    assert params['device'].default == torch.device('cuda:0')
    assert list(inspect.signature(V.interpolate).parameters) == ['model', 'z_1', 'z_2', 'n_samples']
    assert inspect.signature(V.DiagonalGaussianDistribution.nll).parameters['dims'].default == [1, 2, 3]
    assert inspect.signature(V.fix_experiment_seed).parameters['seed'].default == 0


def test_fix_experiment_seed_reproducible_and_deterministic_cudnn():
    """Catches a seed function that forgets torch/numpy/python or leaves cuDNN non-deterministic.
    All global state it touches is restored afterwards."""
    cudnn = torch.backends.cudnn
    saved = (random.getstate(), np.random.get_state(), cudnn.deterministic, cudnn.benchmark)
    try:
        cudnn.deterministic, cudnn.benchmark = False, True
        V.fix_experiment_seed(123)
        a = (torch.randn(5), np.random.rand(3), random.random())
        assert cudnn.deterministic is True
        assert cudnn.benchmark is False
        torch.randn(7), np.random.rand(2), random.random()    # advance every generator
        V.fix_experiment_seed(123)
        b = (torch.randn(5), np.random.rand(3), random.random())
        assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
        V.fix_experiment_seed(124)
        c = torch.randn(5)
        assert not torch.equal(a[0], c)
        V.fix_experiment_seed()                               # default seed 0
        d = torch.randn(5)
        torch.manual_seed(0)
        assert torch.equal(d, torch.randn(5))
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        cudnn.deterministic, cudnn.benchmark = saved[2], saved[3]
