"""Unit tests for q3_solution.py and q3_misc.py (Problem 3, SimSiam) against independent oracles.

The oracles are formulas written out here (cosine similarity as dot / max(n1 * n2, eps), the symmetrised loss),
autograd on an explicitly detached re-computation of the loss (for the stop-gradient), a brute-force Python kNN
(loops, sorted lists), torch.nn.functional and sample statistics whose tolerances come from their standard
errors. A tiny base encoder (one conv, 8x8 inputs) keeps the SimSiam tests fast; the CIFAR ResNet-18 is built
only for the shape checks.

Isolation: every test runs inside ``torch.random.fork_rng`` (the global CPU RNG is restored afterwards) and with
torch's intra-op thread count set to 1 and restored afterwards.
"""
import inspect
import math
import pathlib
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import q3_misc as M  # noqa: E402
import q3_solution as Q  # noqa: E402

DIM, PRED_DIM = 32, 8


pytestmark = pytest.mark.usefixtures('isolated_torch_state')


class TinyNet(nn.Module):
    """A stand-in backbone with torchvision's constructor keywords: (B, 3, 8, 8) -> (B, num_classes).
    Records the keyword arguments of every construction and the fc instance it created."""
    calls = []

    def __init__(self, num_classes=10, zero_init_residual=False):
        super().__init__()
        TinyNet.calls.append({'num_classes': num_classes, 'zero_init_residual': zero_init_residual})
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)
        self.created_fc = self.fc

    def forward(self, x):
        h = torch.relu(self.conv(x))                      # (B, 16, 8, 8)
        return self.fc(self.pool(h).flatten(1))           # (B, num_classes)


def _simsiam(seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault('dim', DIM)
    kwargs.setdefault('pred_dim', PRED_DIM)
    return Q.SimSiam(TinyNet, **kwargs)


def _views(seed=1, batch=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 8, 8, generator=g), torch.randn(batch, 3, 8, 8, generator=g)


def _cos_oracle(a, b, dim=1, eps=1e-8):
    """The assignment's definition, written out: dot / max(||a|| * ||b||, eps)."""
    dot = (a * b).sum(dim)
    prod = torch.sqrt((a * a).sum(dim)) * torch.sqrt((b * b).sum(dim))
    return dot / torch.maximum(prod, torch.full_like(prod, eps))


# ----------------------------------------------------------------------------------------------------------------
# CosineSimilarity, bdot, loss
# ----------------------------------------------------------------------------------------------------------------

def test_cosine_similarity_matches_torch_on_ordinary_vectors():
    """Away from zero the definition is the usual cosine: catches a missing norm, a norm without sqrt, summing
    over the wrong axis, or returning the plain dot product."""
    a, b = torch.randn(5, 7, dtype=torch.float64), 3.0 * torch.randn(5, 7, dtype=torch.float64)
    out = Q.CosineSimilarity()(a, b)
    assert out.shape == (5,)
    torch.testing.assert_close(out, F.cosine_similarity(a, b, dim=1))
    torch.testing.assert_close(out, _cos_oracle(a, b))
    assert Q.CosineSimilarity.__constants__ == ['dim', 'eps']
    sim = Q.CosineSimilarity()
    assert sim.dim == 1 and sim.eps == 1e-8 and isinstance(sim, nn.Module)


def test_cosine_similarity_clamps_the_product_of_norms():
    """Zero and near-zero vectors follow dot / max(n1 * n2, eps) exactly: catches clamping each norm separately
    (torch's convention: gives 1.0 instead of 0.01 for two parallel vectors of norm 1e-5), adding eps instead of
    taking the max, and a division by zero (nan) for a zero vector."""
    rows1 = torch.tensor([[0.0, 0.0, 0.0],            # zero vector
                          [1e-5, 0.0, 0.0],           # n1 * n2 = 1e-10 < eps
                          [2e-4, 0.0, 0.0],           # n1 * n2 = 4e-8 > eps
                          [1e-4, 0.0, 0.0],           # n1 * n2 = 1e-8 = eps (boundary)
                          [3e-5, 4e-5, 0.0]], dtype=torch.float64)
    rows2 = torch.tensor([[1.0, 2.0, 3.0],
                          [1e-5, 0.0, 0.0],
                          [2e-4, 0.0, 0.0],
                          [1e-4, 0.0, 0.0],
                          [-3e-5, 4e-5, 0.0]], dtype=torch.float64)
    out = Q.CosineSimilarity()(rows1, rows2)
    expected = torch.tensor([0.0, 1e-10 / 1e-8, 1.0, 1.0, (-9e-10 + 16e-10) / 1e-8], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=0)
    torch.testing.assert_close(out, _cos_oracle(rows1, rows2), rtol=1e-12, atol=0)
    assert not torch.isnan(out).any()
    # The documented difference from torch's per-norm clamp (non-vacuous: the two really differ here).
    assert abs(F.cosine_similarity(rows1[1:2], rows2[1:2]).item() - 1.0) < 1e-6
    # A custom eps is used.
    big = Q.CosineSimilarity(eps=1.0)(rows1[2:3] * 1e3, rows2[2:3] * 1e3)      # n1 * n2 = 0.04 < 1
    torch.testing.assert_close(big, torch.tensor([0.04], dtype=torch.float64))


def test_cosine_similarity_dim_argument_on_3d_inputs():
    """`dim` selects the reduced axis: catches a hard-coded dim=1 or dim=-1."""
    a, b = torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    out1 = Q.CosineSimilarity(dim=1)(a, b)
    out2 = Q.CosineSimilarity(dim=2)(a, b)
    assert out1.shape == (2, 4) and out2.shape == (2, 5)
    torch.testing.assert_close(out1, _cos_oracle(a, b, dim=1))
    torch.testing.assert_close(out2, _cos_oracle(a, b, dim=2))
    torch.testing.assert_close(Q.CosineSimilarity(dim=-1)(a, b), out2)


def test_bdot_matches_einsum():
    """Row-wise dot product (B,): catches an outer product, a transposed reshape, or a sum over the batch."""
    a, b = torch.randn(6, 9), torch.randn(6, 9)
    out = Q.bdot(a, b)
    assert out.shape == (6,)
    torch.testing.assert_close(out, torch.einsum('bd,bd->b', a, b))


def test_loss_matches_manual_formula_and_is_symmetric():
    """-1/2 (mean cos(p1, z2) + mean cos(p2, z1)): catches pairing p1 with z1, a missing minus sign or 1/2,
    a sum over the batch instead of the mean, and an asymmetric loss (swapping the views must not change it)."""
    model = _simsiam()
    g = torch.Generator().manual_seed(3)
    p1, p2, z1, z2 = (torch.randn(7, DIM, generator=g, dtype=torch.float64) for _ in range(4))
    loss = model.loss(p1, p2, z1, z2)
    assert loss.dim() == 0
    manual = -0.5 * (_cos_oracle(p1, z2).mean() + _cos_oracle(p2, z1).mean())
    torch.testing.assert_close(loss, manual)
    torch.testing.assert_close(model.loss(p2, p1, z2, z1), loss)             # views swapped
    torch.testing.assert_close(model.loss(p1, p2, z1, z2, similarity_function='CosineSimilarity'), loss)
    wrong_pairing = -0.5 * (_cos_oracle(p1, z1).mean() + _cos_oracle(p2, z2).mean())
    assert abs((wrong_pairing - manual).item()) > 1e-3                       # the check is not vacuous
    with pytest.raises(ValueError):
        model.loss(p1, p2, z1, z2, similarity_function='L2')


def test_loss_range_and_extremes():
    """In [-1, 1]; exactly -1 when each prediction equals the OTHER view's z (and +1 when opposite), while the
    same-view pairing would give 0 here: catches the wrong pairing and a missing normalisation."""
    model = _simsiam()
    z1 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z2 = torch.tensor([[0.0, 3.0], [5.0, 0.0]])                              # orthogonal to z1 row by row
    torch.testing.assert_close(model.loss(z2.clone(), z1.clone(), z1, z2), torch.tensor(-1.0))
    torch.testing.assert_close(model.loss(-z2, -z1, z1, z2), torch.tensor(1.0))
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        loss = model.loss(*(torch.randn(4, 6, generator=g) for _ in range(4)))
        assert -1.0 <= loss.item() <= 1.0
    p = torch.randn(4, DIM)
    torch.testing.assert_close(model.loss(p, p, p, p), torch.tensor(-1.0))


# ----------------------------------------------------------------------------------------------------------------
# Stop-gradient and the predictor modes
# ----------------------------------------------------------------------------------------------------------------

def _encoder_grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.encoder.named_parameters() if p.requires_grad}


def test_stop_gradient_sends_encoder_gradient_only_through_the_predictor():
    """With stop_gradient=True the encoder's gradient equals that of the loss recomputed with z explicitly
    detached (only the p path); with stop_gradient=False it equals the undetached loss and differs. Catches a
    detach in the wrong place (on p, or nowhere), detaching only one view, or ignoring the flag."""
    x1, x2 = _views()
    sg = _simsiam(seed=0, stop_gradient=True).train()
    nosg = _simsiam(seed=0, stop_gradient=False).train()
    nosg.load_state_dict(sg.state_dict())

    p1, p2, z1, z2 = sg(x1, x2)
    assert p1.requires_grad and p2.requires_grad
    assert not z1.requires_grad and not z2.requires_grad
    sg.loss(p1, p2, z1, z2).backward()
    got_sg = _encoder_grads(sg)

    q1, q2, y1, y2 = nosg(x1, x2)
    assert y1.requires_grad and y2.requires_grad
    nosg.loss(q1, q2, y1, y2).backward()
    got_nosg = _encoder_grads(nosg)

    def oracle(detach):
        ref = _simsiam(seed=0).train()
        ref.load_state_dict(sg.state_dict())
        a1, a2 = ref.encoder(x1), ref.encoder(x2)
        b1, b2 = ref.predictor(a1), ref.predictor(a2)
        t1, t2 = (a1.detach(), a2.detach()) if detach else (a1, a2)
        loss = -0.5 * (F.cosine_similarity(b1, t2).mean() + F.cosine_similarity(b2, t1).mean())
        loss.backward()
        return _encoder_grads(ref)

    want_sg, want_nosg = oracle(True), oracle(False)
    for name in want_sg:
        torch.testing.assert_close(got_sg[name], want_sg[name], rtol=1e-4, atol=1e-7, msg=name)
        torch.testing.assert_close(got_nosg[name], want_nosg[name], rtol=1e-4, atol=1e-7, msg=name)
    # Non-vacuous: the z path carries a real share of the gradient.
    diff = sum((want_sg[n] - want_nosg[n]).norm() ** 2 for n in want_sg).sqrt()
    size = sum(want_nosg[n].norm() ** 2 for n in want_nosg).sqrt()
    assert diff > 0.05 * size


def test_default_predictor_is_a_trainable_bottleneck_mlp():
    """Linear(dim, pred_dim, no bias) - BN(pred_dim) - ReLU - Linear(pred_dim, dim): catches a missing BN or
    bias, swapped sizes, a frozen predictor, or an extra output BN/ReLU."""
    model = _simsiam(MLP_mode=None)
    pred = model.predictor
    assert model.MLP_mode is None and model.stop_gradient is True
    assert isinstance(pred, nn.Sequential) and len(pred) == 4
    assert isinstance(pred[0], nn.Linear) and pred[0].weight.shape == (PRED_DIM, DIM) and pred[0].bias is None
    assert isinstance(pred[1], nn.BatchNorm1d) and pred[1].num_features == PRED_DIM and pred[1].affine
    assert isinstance(pred[2], nn.ReLU)
    assert isinstance(pred[3], nn.Linear) and pred[3].weight.shape == (DIM, PRED_DIM) and pred[3].bias is not None
    assert all(p.requires_grad for p in pred.parameters())
    x1, x2 = _views()
    p1, p2, z1, z2 = model(x1, x2)
    assert p1.shape == p2.shape == z1.shape == z2.shape == (6, DIM)
    model.loss(p1, p2, z1, z2).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pred.parameters())


def test_fixed_random_init_predictor_is_frozen_at_small_gaussian_weights():
    """Weights ~ N(0, std 0.01) (sample mean and std within 5 standard errors), last bias zero, every predictor
    parameter frozen (no gradient after backward) while the encoder still learns. Catches variance 0.01 read as
    std 0.1, the default init (std ~ 1/sqrt(3 fan_in)), a non-zero bias, and a predictor left trainable."""
    dim, pred_dim = 256, 64
    model = _simsiam(dim=dim, pred_dim=pred_dim, MLP_mode='fixed_random_init')
    assert model.MLP_mode == 'fixed_random_init'
    pred = model.predictor
    for w in (pred[0].weight, pred[3].weight):
        n = w.numel()                                                        # 16384
        w64 = w.detach().double().flatten()
        assert abs(w64.mean().item()) < 5 * 0.01 / math.sqrt(n)
        assert abs(w64.std().item() - 0.01) < 5 * 0.01 / math.sqrt(2 * (n - 1))
    assert torch.equal(pred[3].bias, torch.zeros(dim))
    assert not any(p.requires_grad for p in pred.parameters())

    x1, x2 = _views()
    model.train()
    p1, p2, z1, z2 = model(x1, x2)
    model.loss(p1, p2, z1, z2).backward()
    assert all(p.grad is None for p in pred.parameters())
    assert model.encoder.conv.weight.grad is not None and model.encoder.conv.weight.grad.abs().sum() > 0


def test_no_pred_mlp_predictor_is_identity():
    """The predictor is nn.Identity and p == z: catches a predictor still present (or parameters left in the
    state dict) in the no-predictor ablation."""
    model = _simsiam(MLP_mode='no_pred_mlp').train()
    assert isinstance(model.predictor, nn.Identity)
    assert not any(k.startswith('predictor.') for k in model.state_dict())
    p1, p2, z1, z2 = model(*_views())
    torch.testing.assert_close(p1, z1, rtol=0, atol=0)
    torch.testing.assert_close(p2, z2, rtol=0, atol=0)


def test_invalid_mlp_mode_and_signature_defaults():
    """An unknown MLP_mode fails loudly instead of silently training the default; the template's defaults hold."""
    with pytest.raises(ValueError):
        _simsiam(MLP_mode='fixed_random')
    params = inspect.signature(Q.SimSiam.__init__).parameters
    assert list(params)[1:] == ['base_encoder', 'dim', 'pred_dim', 'stop_gradient', 'MLP_mode']
    assert (params['dim'].default, params['pred_dim'].default) == (2048, 512)
    assert params['stop_gradient'].default is True and params['MLP_mode'].default is None
    assert inspect.signature(Q.SimSiam.loss).parameters['similarity_function'].default == 'CosineSimilarity'
    knn = inspect.signature(Q.knn_predict).parameters
    assert (knn['knn_k'].default, knn['knn_t'].default) == (200, 0.1)


def test_projector_structure_and_frozen_fc_bias():
    """encoder.fc = Linear(no bias)-BN-ReLU-Linear(no bias)-BN-ReLU-[the backbone's own fc]-BN(dim, affine=False);
    the backbone is built with num_classes=dim, zero_init_residual=True; the original fc's bias is frozen and
    stays unchanged by an SGD step with momentum and weight decay while the other layers move. Catches a new
    output layer instead of the original fc, an affine output BN, a missing ReLU/BN, and a trainable bias."""
    TinyNet.calls.clear()
    model = _simsiam(dim=DIM).train()
    assert TinyNet.calls == [{'num_classes': DIM, 'zero_init_residual': True}]
    fc = model.encoder.fc
    prev = 16
    assert isinstance(fc, nn.Sequential) and len(fc) == 8
    linears = [m for m in fc if isinstance(m, nn.Linear)]
    assert len(linears) == 3 and [fc[i] for i in (0, 3, 6)] == linears
    assert fc[0].weight.shape == (prev, prev) and fc[0].bias is None
    assert fc[3].weight.shape == (prev, prev) and fc[3].bias is None
    assert fc[6] is model.encoder.created_fc and fc[6].weight.shape == (DIM, prev)
    for i in (1, 4):
        assert isinstance(fc[i], nn.BatchNorm1d) and fc[i].num_features == prev and fc[i].affine
    assert isinstance(fc[2], nn.ReLU) and isinstance(fc[5], nn.ReLU)
    assert isinstance(fc[7], nn.BatchNorm1d) and fc[7].num_features == DIM and not fc[7].affine
    assert fc[7].weight is None and fc[7].bias is None
    assert fc[6].bias.requires_grad is False and fc[6].weight.requires_grad is True

    bias0, w0 = fc[6].bias.detach().clone(), fc[6].weight.detach().clone()
    assert bias0.abs().sum() > 0                                             # non-zero, so weight decay would show
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    for _ in range(2):
        opt.zero_grad()
        p1, p2, z1, z2 = model(*_views())
        model.loss(p1, p2, z1, z2).backward()
        opt.step()
    assert torch.equal(fc[6].bias, bias0)
    assert not torch.equal(fc[6].weight, w0)
    z = model.eval().encoder(_views()[0])
    assert z.shape == (6, DIM)


# ----------------------------------------------------------------------------------------------------------------
# kNN monitor
# ----------------------------------------------------------------------------------------------------------------

def _knn_oracle(features, bank, labels, classes, k, t):
    """Brute force: for each query, similarities to every bank row, sorted (stable, descending), the first k
    vote exp(s / t) for their class; classes ranked by score, ties to the smaller class index."""
    out = []
    for q in features.tolist():
        sims = [sum(a * b for a, b in zip(q, row)) for row in bank.tolist()]
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        scores = [0.0] * classes
        for i in order:
            scores[int(labels[i])] += math.exp(sims[i] / t)
        out.append(sorted(range(classes), key=lambda c: -scores[c]))
    return torch.tensor(out)


def _unit(angles_deg):
    a = torch.tensor(angles_deg, dtype=torch.float64) * math.pi / 180
    return torch.stack([torch.cos(a), torch.sin(a)], dim=1)


def test_knn_known_neighbours_and_random_data_match_brute_force():
    """(The bank is passed as (D, N), the course notebook's layout: hence bank.t() below.) Queries next to a class
    cluster get that class first; on random data the full ranking equals the
    brute-force oracle. Catches a transposed bank, top-k of the smallest similarities, votes indexed by bank
    position instead of label, and a reversed ranking."""
    bank = _unit([-5, 0, 5, 85, 90, 95, 175, 180, 185])
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    queries = _unit([2, 88, 178, 130])
    pred = Q.knn_predict(queries, bank.t(), labels, classes=3, knn_k=3, knn_t=0.1)
    assert pred.shape == (4, 3) and pred.dtype == torch.long
    assert pred[:3, 0].tolist() == [0, 1, 2]
    assert torch.equal(pred, _knn_oracle(queries, bank, labels, 3, 3, 0.1))

    g = torch.Generator().manual_seed(5)
    bank = F.normalize(torch.randn(30, 4, generator=g, dtype=torch.float64), dim=1)
    feats = F.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 4, (30,), generator=g)
    for k, t in [(7, 0.1), (1, 0.5), (30, 1.0)]:
        assert torch.equal(Q.knn_predict(feats, bank.t(), labels, 4, knn_k=k, knn_t=t),
                           _knn_oracle(feats, bank, labels, 4, k, t))


def test_knn_ties_are_resolved_consistently():
    """Two classes with exactly equal scores (mirror-image neighbours) rank the smaller class index first, in
    every row, whatever else is in the batch: catches a tie broken towards the larger index (e.g. ranking by
    an ascending sort reversed) or a batch-dependent ordering. (torch's CPU sort is stable in practice, so a
    missing stable=True only shows on other devices.)"""
    bank = _unit([30, -30, 170])
    labels = torch.tensor([2, 1, 0])
    q = _unit([0])
    expected = torch.tensor([[1, 2, 0]])
    assert torch.equal(_knn_oracle(q, bank, labels, 3, 2, 0.1), expected)
    for _ in range(3):
        assert torch.equal(Q.knn_predict(q, bank.t(), labels, 3, knn_k=2, knn_t=0.1), expected)
    batch = torch.cat([_unit([100]), q, q])
    assert torch.equal(Q.knn_predict(batch, bank.t(), labels, 3, knn_k=2, knn_t=0.1)[1:], expected.repeat(2, 1))


def test_knn_weights_are_exp_similarity_over_temperature():
    """Two far neighbours of class 0 (sim 0.5) against one near neighbour of class 1 (sim 0.9), k = 3:
    with t = 0.1 the near one wins (e^9 > 2 e^5), with t = 10 the pair wins (2 e^0.05 > e^0.09). Catches an
    unweighted majority vote (class 0 for both t), nearest-neighbour-only voting (class 1 for both), weights
    exp(s * t) or s / t."""
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    s_far, s_near = 0.5, 0.9
    bank = torch.tensor([[s_far, math.sqrt(1 - s_far ** 2)], [s_far, -math.sqrt(1 - s_far ** 2)],
                         [s_near, math.sqrt(1 - s_near ** 2)], [-1.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 2])
    cold = Q.knn_predict(q, bank.t(), labels, 3, knn_k=3, knn_t=0.1)
    hot = Q.knn_predict(q, bank.t(), labels, 3, knn_k=3, knn_t=10.0)
    assert cold[0].tolist() == [1, 0, 2] and hot[0].tolist() == [0, 1, 2]
    assert torch.equal(cold, _knn_oracle(q, bank, labels, 3, 3, 0.1))
    assert torch.equal(hot, _knn_oracle(q, bank, labels, 3, 3, 10.0))


def test_knn_k_larger_than_the_bank():
    """knn_k = 200 with a 4-row bank uses all 4 rows instead of failing in topk."""
    bank = _unit([0, 60, 120, 180])
    labels = torch.tensor([0, 1, 1, 0])
    q = _unit([10, 100])
    pred = Q.knn_predict(q, bank.t(), labels, classes=2)
    assert torch.equal(pred, _knn_oracle(q, bank, labels, 2, 4, 0.1))


# ----------------------------------------------------------------------------------------------------------------
# CIFAR ResNet-18
# ----------------------------------------------------------------------------------------------------------------

def test_cifar_resnet18_stem_shapes_and_zero_init():
    """3x3 stride-1 conv1, no max-pool (layer4 sees 4x4 maps on 32x32 input, not 1x1), `.fc` kept, and
    zero_init_residual zeroing every BasicBlock's last BN gamma: catches the ImageNet stem left in place and
    ignored constructor keywords."""
    from torchvision.models.resnet import BasicBlock

    torch.manual_seed(0)
    model = Q.cifar_resnet18(num_classes=10).eval()
    conv1 = model.conv1
    assert conv1.in_channels == 3 and conv1.out_channels == 64
    assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1) and conv1.padding == (1, 1)
    assert conv1.bias is None
    assert isinstance(model.maxpool, nn.Identity)
    assert isinstance(model.fc, nn.Linear) and model.fc.weight.shape == (10, 512)
    seen = {}

    def record(module, inputs, output):
        seen['layer4'] = output.shape                 # returns None: the output is left as it is

    model.layer4.register_forward_hook(record)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert seen['layer4'] == (2, 512, 4, 4)

    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 8 and all(torch.all(b.bn2.weight == 1) for b in blocks)
    zeroed = Q.cifar_resnet18(num_classes=7, zero_init_residual=True)
    assert all(torch.all(b.bn2.weight == 0) for b in zeroed.modules() if isinstance(b, BasicBlock))
    assert zeroed.fc.out_features == 7


def test_simsiam_on_cifar_resnet18_shapes():
    """SimSiam(cifar_resnet18) builds with prev_dim = 512 and gives (B, dim) outputs on 32x32 images."""
    torch.manual_seed(0)
    model = Q.SimSiam(Q.cifar_resnet18, dim=64, pred_dim=16).train()
    assert model.encoder.fc[0].weight.shape == (512, 512) and model.encoder.fc[6].weight.shape == (64, 512)
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    p1, p2, z1, z2 = model(x1, x2)
    assert p1.shape == p2.shape == z1.shape == z2.shape == (4, 64)
    loss = model.loss(p1, p2, z1, z2)
    assert loss.dim() == 0 and torch.isfinite(loss) and -1 <= loss.item() <= 1


# ----------------------------------------------------------------------------------------------------------------
# q3_misc helpers
# ----------------------------------------------------------------------------------------------------------------

def test_two_crops_transform_draws_two_independent_views():
    """Both views come from the same input through two separate calls of the random transform: catches
    returning one view twice or transforming two different inputs."""
    seen = []

    def jitter(x):
        seen.append(x)
        return x + 0.1 * torch.randn_like(x)

    x = torch.randn(3, 8, 8)
    views = M.TwoCropsTransform(jitter)(x)
    assert isinstance(views, list) and len(views) == 2
    assert len(seen) == 2 and all(s is x for s in seen)
    assert not torch.equal(views[0], views[1])
    assert all((v - x).abs().max() < 1.0 for v in views)
    same = M.TwoCropsTransform(lambda t: t * 2)(x)
    assert torch.equal(same[0], same[1]) and torch.equal(same[0], 2 * x)


def _model_and_optimizer(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, opt


def test_load_checkpoints_round_trip_and_missing_file(tmp_path, capsys):
    """Weights, optimizer state (momentum buffers) and the epoch come back; a DataParallel 'module.' prefix is
    handled; a missing file means a fresh start at epoch 0 with a message. Catches returning the wrong epoch,
    not restoring the optimizer, and crashing on a missing file."""
    model, opt = _model_and_optimizer(0)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    path = tmp_path / 'checkpoint.pth.tar'
    torch.save({'state_dict': model.state_dict(), 'optimizer': opt.state_dict(), 'epoch': 7}, path)

    fresh, fresh_opt = _model_and_optimizer(1)
    got_model, got_opt, start = M.load_checkpoints(str(path), fresh, fresh_opt, None)
    assert got_model is fresh and got_opt is fresh_opt and start == 7
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    buf = [s['momentum_buffer'] for s in fresh_opt.state.values()]
    ref = [s['momentum_buffer'] for s in opt.state.values()]
    assert len(buf) == len(ref) == 4 and all(torch.equal(a, b) for a, b in zip(buf, ref))

    wrapped = tmp_path / 'ddp.pth.tar'
    torch.save({'state_dict': {'module.' + k: v for k, v in model.state_dict().items()},
                'optimizer': opt.state_dict(), 'epoch': 3}, wrapped)
    fresh2, fresh_opt2 = _model_and_optimizer(2)
    assert M.load_checkpoints(str(wrapped), fresh2, fresh_opt2, None)[2] == 3
    assert torch.equal(fresh2[0].weight, model[0].weight)

    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    capsys.readouterr()
    out = M.load_checkpoints(str(tmp_path / 'nope.pth.tar'), fresh, fresh_opt, None)
    assert out == (fresh, fresh_opt, 0)
    assert 'no checkpoint found' in capsys.readouterr().out
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())


def test_load_pretrained_checkpoints_loads_the_encoder_only(tmp_path):
    """From a SimSiam checkpoint: into another SimSiam the encoder is copied and the predictor is not; into a bare
    backbone the matching backbone weights are copied and its own classifier head is left alone. Catches loading
    the predictor, a key-prefix mismatch that silently loads nothing, and touching the optimizer."""
    src = _simsiam(seed=0)
    path = tmp_path / 'pretrained.pth.tar'
    torch.save({'state_dict': src.state_dict(), 'optimizer': {}, 'epoch': 5}, path)

    dst = _simsiam(seed=1)
    opt = torch.optim.SGD(dst.parameters(), lr=0.1)
    pred_before = {k: v.clone() for k, v in dst.predictor.state_dict().items()}
    got, got_opt, start_epoch = M.load_pretrained_checkpoints(str(path), dst, opt, None)
    assert got is dst and got_opt is opt and start_epoch == 0
    for k, v in src.encoder.state_dict().items():
        assert torch.equal(dst.encoder.state_dict()[k], v), k
    for k, v in pred_before.items():
        assert torch.equal(dst.predictor.state_dict()[k], v), k
    assert not torch.equal(dst.predictor[0].weight, src.predictor[0].weight)

    torch.manual_seed(2)
    backbone = TinyNet(num_classes=10)
    head = backbone.fc.weight.detach().clone()
    M.load_pretrained_checkpoints(str(path), backbone, None, None)
    assert torch.equal(backbone.conv.weight, src.encoder.conv.weight)
    assert torch.equal(backbone.conv.bias, src.encoder.conv.bias)
    assert torch.equal(backbone.fc.weight, head)

    with pytest.raises(FileNotFoundError):
        M.load_pretrained_checkpoints(str(tmp_path / 'nope.pth'), backbone, None, None)


# ----------------------------------------------------------------------------------------------------------------
# Self-containment
# ----------------------------------------------------------------------------------------------------------------
