"""studylib.ssl_objectives against independent oracles: numpy's correlation and covariance, closed-form effective
ranks, hand-made pixel values for the heavy operations, and the template's SimSiam for the objectives' limits."""
import copy

import numpy as np
import pytest
import torch

import q3_solution
from studylib import ssl_objectives as so
from studylib.augment import CIFAR_MEAN, CIFAR_STD, SimSiamAugment
from studylib.narrow_resnet import narrow_cifar_resnet18


def test_barlow_twins_loss_is_built_from_the_pearson_cross_correlation():
    g = np.random.default_rng(0)
    z1 = g.normal(size=(64, 6)) * [1, 2, 3, 4, 5, 6] + 7
    z2 = z1 @ g.normal(size=(6, 6)) * 0.3 + g.normal(size=(64, 6))
    c = np.corrcoef(z1.T, z2.T)[:6, 6:]                                       # (6, 6) Pearson correlations
    expected = ((1 - np.diag(c)) ** 2).sum() + 0.01 * (c ** 2 - np.diag(np.diag(c) ** 2)).sum()
    got = so.barlow_twins_loss(torch.tensor(z1), torch.tensor(z2), lambd=0.01)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_barlow_twins_loss_vanishes_for_identical_whitened_views():
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(128, 8)) - 0.0)
    q = q - q.mean(0)                                                         # centred columns
    q, _ = np.linalg.qr(q)                                                    # orthonormal and still centred
    z = torch.tensor(q * 5.0)
    assert float(so.barlow_twins_loss(z, z)) < 1e-8


def test_vicreg_terms_match_numpy():
    g = np.random.default_rng(2)
    z = g.normal(size=(50, 5)) * [0.1, 0.5, 1.0, 2.0, 0.9]
    z[:, 4] += 0.8 * z[:, 3]
    variance, covariance = so.vicreg_terms(torch.tensor(z), eps=1e-4)
    std = np.sqrt(z.var(0, ddof=1) + 1e-4)
    cov = np.cov(z.T)
    assert float(variance) == pytest.approx(np.maximum(0, 1 - std).mean(), rel=1e-6)
    assert float(covariance) == pytest.approx(((cov ** 2).sum() - (np.diag(cov) ** 2).sum()) / 5, rel=1e-6)


def test_effective_rank_closed_forms():
    assert so.effective_rank(torch.eye(16) * 3) == pytest.approx(16)            # equal singular values: D
    assert so.effective_rank(torch.ones(100, 32)) == pytest.approx(1, abs=1e-6)  # one direction: 1
    s = np.array([3.0, 1.0])                                                    # p = (3/4, 1/4)
    p = s / s.sum()
    assert so.effective_rank(torch.diag(torch.tensor(s))) == pytest.approx(np.exp(-(p * np.log(p)).sum()))


def _normalised(v):
    mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return (v - mean) / std, mean, std


def test_heavy_operations_on_known_pixels():
    v = torch.tensor([0.1, 0.49, 0.5, 0.77]).repeat(8).view(1, 1, 1, 32).expand(4, 3, 32, 32).contiguous()
    x, mean, std = _normalised(v)
    ops = torch.tensor([[False, False, False], [True, False, False], [False, True, False], [False, False, True]])
    centre = torch.tensor([[0.5, 0.5]] * 3 + [[0.0, 0.0]])                      # the cutout in the top-left corner
    out = so.heavy_views(x, {'ops': ops, 'centre': centre}) * std + mean
    assert torch.allclose(out[0], v[0], atol=1e-6)                              # nothing applied
    solarized = torch.where(v[1] >= 0.5, 1 - v[1], v[1])
    assert torch.allclose(out[1], solarized, atol=1e-6)
    assert torch.allclose(out[2, 0, 0, :4], torch.tensor([1 / 16, 7 / 16, 8 / 16, 12 / 16]), atol=1e-6)
    filled = torch.isclose(out[3], mean[0].expand(3, 32, 32), atol=1e-6).all(0)   # (32, 32)
    assert filled[:8, :8].all() and not filled[8:, :].any() and not filled[:, 8:].any()   # clipped at the border


def test_heavy_params_apply_each_operation_to_half_the_images():
    ops = so.heavy_params(20000, torch.Generator().manual_seed(0))['ops'].float().mean(0)
    assert torch.allclose(ops, torch.full((3,), 0.5), atol=0.015)              # 4.2 standard errors


def _model(dim=16, **kwargs):
    torch.manual_seed(0)
    return q3_solution.SimSiam(narrow_cifar_resnet18, dim=dim, pred_dim=8, **kwargs)


def _views(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 32, 32, generator=g) for _ in range(n)]


def test_the_simsiam_objective_is_the_templates_loss():
    model = _model()
    reference = copy.deepcopy(model)
    x1, x2, _ = _views()
    loss, z1 = so.ObjectiveStep(model, {'stop_grad': True}, _no_autocast)([x1, x2])
    p1, p2, r1, r2 = reference(x1, x2)
    assert torch.equal(loss, reference.loss(p1, p2, r1, r2)) and torch.equal(z1, r1)


def _no_autocast():
    import contextlib
    return contextlib.nullcontext()


def _grads(module, loss):
    module.zero_grad()
    loss.backward()
    return {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}


def test_byol_with_momentum_zero_and_no_stop_gradient_is_simsiam_without_it(monkeypatch):
    monkeypatch.setattr(so, 'BYOL_MOMENTUM', 0.0)
    x1, x2, _ = _views()
    byol = so.ObjectiveStep(_model(), {'objective': 'byol', 'stop_grad': False}, _no_autocast)
    template = _model(stop_gradient=False)
    loss, _ = byol([x1, x2])
    p1, p2, z1, z2 = template(x1, x2)
    reference = template.loss(p1, p2, z1, z2)
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), abs=1e-6)
    a, b = _grads(byol.model, loss), _grads(template, reference)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k


def test_byol_targets_come_from_the_averaged_weights_and_the_average_moves():
    x1, x2, _ = _views()
    step = so.ObjectiveStep(_model(), {'objective': 'byol', 'stop_grad': True}, _no_autocast)
    m = so.BYOL_MOMENTUM
    with torch.no_grad():   # make the average differ from the online weights
        for k in step.target:
            step.target[k] = step.target[k] + 0.05 * torch.randn_like(step.target[k])
    xi = {k: v.clone() for k, v in step.target.items()}
    online = {k: v.detach().clone() for k, v in step.model.encoder.named_parameters()}
    oracle = copy.deepcopy(step.model.encoder)   # an independent target network holding m * xi + (1 - m) * theta
    with torch.no_grad():
        for k, p in oracle.named_parameters():
            p.copy_(m * xi[k] + (1 - m) * online[k])
        t1, t2 = oracle(x1), oracle(x2)
    loss, _ = step([x1, x2])
    z1, z2 = step.model.encoder(x1), step.model.encoder(x2)
    p1, p2 = step.model.predictor(z1), step.model.predictor(z2)
    expected = (so.negative_cosine(p1, t2) + so.negative_cosine(p2, t1)) / 2
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), abs=1e-5)
    for k in xi:
        assert torch.allclose(step.target[k], m * xi[k] + (1 - m) * online[k], atol=1e-7)
    grads = _grads(step.model, loss)
    assert all(k.startswith(('encoder.', 'predictor.')) for k in grads)   # the target gets none: stop-gradient


def test_dssl_pulls_only_the_heavy_view_and_mean_target_averages_two_encodings():
    x1, x2, x3 = _views()
    dssl = so.ObjectiveStep(_model(), {'objective': 'dssl', 'stop_grad': True}, _no_autocast)
    views = [v.clone().requires_grad_() for v in (x1, x2, x3)]
    loss, _ = dssl(views)
    enc, pred = dssl.model.encoder, dssl.model.predictor
    z = [enc(v) for v in (x1, x2, x3)]
    p = [pred(v) for v in z]
    d = so.negative_cosine
    expected = (d(p[0], z[1]) + d(p[1], z[0])) / 2 + (d(p[2], z[0]) + d(p[2], z[1])) / 2
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), abs=1e-5)
    mean = so.ObjectiveStep(_model(), {'objective': 'mean-target', 'stop_grad': True}, _no_autocast)
    loss, _ = mean([x1, x2, x3])
    z = [mean.model.encoder(v) for v in (x1, x2, x3)]
    p = [mean.model.predictor(v) for v in z]
    expected = (d(p[0], (z[1] + z[2]) / 2) + d(p[1], (z[0] + z[2]) / 2)) / 2
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), abs=1e-5)


def test_make_views_keeps_simsiams_random_stream_and_adds_the_objectives_views():
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    aug = SimSiamAugment()
    torch.manual_seed(5)
    params = [aug.sample_params(6, 32, 32) for _ in range(2)]                 # the driver's draws before this module
    old = [aug.apply(images, p) for p in params]
    torch.manual_seed(5)
    new = so.make_views(aug, images, {'stop_grad': True})
    assert len(new) == 2 and all(torch.equal(a, b) for a, b in zip(old, new))
    torch.manual_seed(5)
    dssl = so.make_views(aug, images, {'objective': 'dssl'})
    assert len(dssl) == 3 and torch.equal(dssl[0], old[0]) and torch.equal(dssl[1], old[1])
    assert not torch.equal(dssl[2], dssl[0])                                   # some image got a heavy operation
    torch.manual_seed(5)
    assert len(so.make_views(aug, images, {'objective': 'mean-target'})) == 3
