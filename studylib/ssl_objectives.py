"""The self-supervised objectives of the written questions 3.5c-3.9, beside SimSiam, on the same backbone and
projector (q3_solution.SimSiam, whose template API stays untouched).

    step = ObjectiveStep(model, settings)   # one module: DistributedDataParallel wraps it, a step calls it once
    loss, z1 = step(views)                  # views: the list make_views() gives for the objective

Objectives (settings['objective']):
- simsiam: the template's symmetric negative cosine, -1/2 [cos(p1, sg z2) + cos(p2, sg z1)] (Chen & He 2021, Sec. 3).
- barlow: Barlow Twins (Zbontar et al. 2021, eq. 1) on the projector outputs, no predictor, no stop-gradient: the
  cross-correlation of the batch-standardised z1, z2 pushed to the identity, off-diagonal terms weighted by lambda;
  trained on the loss divided by the dimension D (the logged loss too).
- vicreg: SimSiam's cosine without stop-gradient plus VICReg's variance and covariance terms on z (Bardes et al.
  2022, Sec. 3.1): a hinge on each dimension's batch standard deviation and the squared off-diagonal covariances.
- byol: a momentum target (Grill et al. 2020, Sec. 3.1): the targets come from an exponential moving average of the
  encoder's weights. Here the target weights of a step are w = m * xi + (1 - m) * theta (xi the average, theta the
  online weights), and xi <- w after the step. With stop-gradient, w is a constant; without, the loss also
  differentiates through w's (1 - m) * theta term, the exact gradient of the averaged weights (m = 0: SimSiam
  without stop-gradient).
- dssl: SimSiam on two standard views plus a heavily augmented copy of view 1 whose prediction is pulled towards
  both standard targets, never the reverse (Bai et al. 2022, "Directional Self-supervised Learning for Heavy Image
  Augmentations", Sec. 3: heavy views only learn from standard ones).
- mean-target: the asymmetry of Wang et al. 2022 (arXiv 2204.00613, Sec. 4, "mean encoding"): each source view's
  target is the mean encoding of the two other views, so the target branch has lower variance than the source.

settings['heavy'] (any objective) makes every view heavy; heavy_views() adds solarize, posterize and cutout, each
with probability 1/2 per image, to the standard views (the RandAugment-style operations of DSSL's heavy set).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from .augment import CIFAR_MEAN, CIFAR_STD

BARLOW_LAMBDA = 5e-3         # weight of Barlow Twins' off-diagonal terms (the paper's 0.0051, rounded)
VICREG_VARIANCE = 1.0        # weight of the variance hinge, relative to the cosine term (VICReg's mu / lambda = 1)
VICREG_COVARIANCE = 0.04     # weight of the covariance term (VICReg's nu / lambda = 1/25)
BYOL_MOMENTUM = 0.99         # target EMA per step (a horizon of ~100 steps; BYOL's 0.996 is for 300+ epochs)
HEAVY_P = 0.5                # probability of each heavy operation per image
CUTOUT = 16                  # side of the cutout square, pixels of the 32x32 view
OBJECTIVES = ('simsiam', 'barlow', 'vicreg', 'byol', 'dssl', 'mean-target')


def negative_cosine(p, z):
    """-mean_b cos(p_b, z_b): the D of the SimSiam paper (Sec. 3), in float32."""
    return -F.cosine_similarity(p.float(), z.float(), dim=1).mean()


def barlow_twins_loss(z1, z2, lambd=BARLOW_LAMBDA):
    """sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2, C the (D, D) cross-correlation of z1 and z2, each
    standardised over the batch (biased std, as the paper's batch norm)."""
    z1, z2 = z1.float(), z2.float()
    n = z1.shape[0]
    a = (z1 - z1.mean(0)) / z1.std(0, correction=0).clamp_min(1e-6)
    b = (z2 - z2.mean(0)) / z2.std(0, correction=0).clamp_min(1e-6)
    c = a.t() @ b / n                                                       # (D, D)
    on = (1 - torch.diagonal(c)).pow(2).sum()
    off = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on + lambd * off


def vicreg_terms(z, eps=1e-4):
    """(variance, covariance) of VICReg for one branch z (B, D): mean_j relu(1 - sqrt(Var z_j + eps)), and the sum
    of the squared off-diagonal entries of the (unbiased) covariance matrix divided by D."""
    z = z.float()
    n, d = z.shape
    std = torch.sqrt(z.var(0) + eps)
    variance = F.relu(1 - std).mean()
    centred = z - z.mean(0)
    cov = centred.t() @ centred / (n - 1)                                   # (D, D)
    covariance = (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / d
    return variance, covariance


def heavy_params(n, generator=None):
    """Per image: which heavy operations apply (solarize, posterize, cutout) and where the cutout sits, drawn in
    one call (rows of a global batch, so that each rank can slice its own)."""
    u = torch.rand(n, 5, generator=generator)
    return {'ops': u[:, :3] < HEAVY_P, 'centre': u[:, 3:]}


def effective_rank(z):
    """exp(entropy) of the normalised singular values of z (N, D) (Roy & Vetterli 2007; RankMe, Garrido et al. 2023):
    D for an isotropic cloud of N >= D points, 1 when every row is the same vector."""
    s = torch.linalg.svdvals(z.double())
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def make_views(augment, x, settings, n=None, part=slice(None)):
    """The views a step of the objective needs, of this rank's uint8 images x (rows `part` of a global batch of n;
    every random parameter is drawn for the whole global batch): two standard views (three for mean-target), every
    one made heavy when settings['heavy'], and for dssl a heavy copy of view 1 as view 3."""
    n = len(x) if n is None else n
    objective = settings.get('objective', 'simsiam')
    params = [augment.sample_params(n, *x.shape[-2:]) for _ in range(3 if objective == 'mean-target' else 2)]
    views = [augment.apply(x, {k: v[part] for k, v in p.items()}) for p in params]
    if settings.get('heavy'):
        views = [heavy_views(v, _rows(heavy_params(n), part)) for v in views]
    if objective == 'dssl':
        views.append(heavy_views(views[0], _rows(heavy_params(n), part)))
    return views


def _rows(params, part):
    return {k: v[part] for k, v in params.items()}


def heavy_views(x, params, mean=CIFAR_MEAN, std=CIFAR_STD):
    """Heavy operations on normalised views x (B, 3, H, W): solarize (v -> 1 - v where v >= 1/2), posterize to 4
    bits and a CUTOUT x CUTOUT square set to the dataset mean, each where params['ops'] says; returns normalised
    views. Every operation is a batched tensor op (no per-image Python)."""
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (mean, std))
    ops = params['ops'].to(x.device)
    v = x * std + mean                                                      # back to [0, 1]
    v = torch.where(ops[:, 0, None, None, None] & (v >= 0.5), 1 - v, v)
    v = torch.where(ops[:, 1, None, None, None], torch.floor(v * 16) / 16, v)
    h, w = v.shape[-2:]
    centre = params['centre'].to(x.device)
    cy, cx = (centre[:, 0] * h).long(), (centre[:, 1] * w).long()           # cutout centres, clipped at the border
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    box = (rows >= cy.view(-1, 1, 1) - CUTOUT // 2) & (rows < cy.view(-1, 1, 1) + CUTOUT // 2) & \
          (cols >= cx.view(-1, 1, 1) - CUTOUT // 2) & (cols < cx.view(-1, 1, 1) + CUTOUT // 2)   # (B, H, W)
    cut = (box & ops[:, 2, None, None]).unsqueeze(1)
    v = torch.where(cut, mean, v)
    return (v - mean) / std


class ObjectiveStep(nn.Module):
    """The model and its objective as one module: forward(views) -> (loss, z1), z1 the first view's projector
    output (the collapse monitor). The forward pass runs under `autocast` (a context manager factory, bf16 or none),
    the losses in float32. For byol it holds the target average (xi, buffers that checkpoint with ema_state())."""

    def __init__(self, model, settings, autocast):
        super().__init__()
        self.model, self.autocast = model, autocast
        self.objective = settings.get('objective', 'simsiam')
        self.stop_grad = settings.get('stop_grad', True)
        if self.objective == 'byol':
            self.target = {k: v.detach().clone() for k, v in model.encoder.named_parameters()}
            self.target_buffers = {k: v.detach().clone() for k, v in model.encoder.named_buffers()}

    def forward(self, views):
        with self.autocast():
            if self.objective == 'simsiam':
                p1, p2, z1, z2 = self.model(views[0], views[1])            # stop-gradient inside the template
                return self.model.loss(p1.float(), p2.float(), z1.float(), z2.float()), z1
            return getattr(self, '_' + self.objective.replace('-', '_'))(views)

    def _barlow(self, views):
        z1, z2 = self.model.encoder(views[0]), self.model.encoder(views[1])  # (B, D) each
        # divided by D, a mean over the dimensions, so that SimSiam's SGD rate suits it: measured on 4,000 images,
        # 4 epochs, the paper's sum with the same lr rose in epoch 1 and reached 21.8% kNN in 2 epochs, the mean
        # 29.0% (and 29.7% after 4, where the sum times 0.1 reached 28.4%)
        return barlow_twins_loss(z1, z2) / z1.shape[1], z1

    def _vicreg(self, views):
        model = self.model
        z1, z2 = model.encoder(views[0]), model.encoder(views[1])
        p1, p2 = model.predictor(z1), model.predictor(z2)
        loss = (negative_cosine(p1, z2) + negative_cosine(p2, z1)) / 2    # no stop-gradient: the collapsing case
        (v1, c1), (v2, c2) = vicreg_terms(z1), vicreg_terms(z2)
        return loss + VICREG_VARIANCE * (v1 + v2) / 2 + VICREG_COVARIANCE * (c1 + c2) / 2, z1

    def _byol(self, views):
        model, m = self.model, BYOL_MOMENTUM
        z1, z2 = model.encoder(views[0]), model.encoder(views[1])
        p1, p2 = model.predictor(z1), model.predictor(z2)
        online = dict(model.encoder.named_parameters())
        weights = {k: m * self.target[k] + (1 - m) * (online[k].detach() if self.stop_grad else online[k])
                   for k in self.target}
        state = {**weights, **self.target_buffers}
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.stop_grad):
            t1 = functional_call(model.encoder, state, (views[0],))         # target branch: the averaged weights
            t2 = functional_call(model.encoder, state, (views[1],))
        if self.training:
            self.target = {k: w.detach() for k, w in weights.items()}        # xi <- w
        return (negative_cosine(p1, t2) + negative_cosine(p2, t1)) / 2, z1

    def _dssl(self, views):
        model = self.model
        z1, z2, z3 = (model.encoder(v) for v in views)                      # view 3: heavy copy of view 1
        p1, p2, p3 = (model.predictor(z) for z in (z1, z2, z3))
        z1s, z2s = z1.detach(), z2.detach()
        standard = (negative_cosine(p1, z2s) + negative_cosine(p2, z1s)) / 2
        heavy = (negative_cosine(p3, z1s) + negative_cosine(p3, z2s)) / 2   # heavy -> standard only
        return standard + heavy, z1

    def _mean_target(self, views):
        model = self.model
        z1, z2, z3 = (model.encoder(v) for v in views)
        p1, p2 = model.predictor(z1), model.predictor(z2)
        t1, t2 = ((z2 + z3) / 2).detach(), ((z1 + z3) / 2).detach()         # mean encodings: lower-variance targets
        return (negative_cosine(p1, t1) + negative_cosine(p2, t2)) / 2, z1

    def ema_state(self):
        """The byol target (xi and its batch-norm buffers) for the checkpoint; None for the other objectives."""
        if self.objective != 'byol':
            return None
        return {'params': dict(self.target), 'buffers': dict(self.target_buffers)}

    def load_ema_state(self, state):
        if state is not None and self.objective == 'byol':
            self.target = {k: v.to(self.model.encoder.fc[0].weight.device) for k, v in state['params'].items()}
            self.target_buffers = {k: v.to(self.model.encoder.fc[0].weight.device)
                                   for k, v in state['buffers'].items()}
