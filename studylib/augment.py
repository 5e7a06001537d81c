"""The SimSiam CIFAR augmentations on a whole batch at once, on the batch's device, with no per-image Python.

`SimSiamAugment` reproduces, image by image and in distribution, the torchvision v2 per-image pipeline of
`torchvision_pipeline` below (the oracle of tests/test_augment.py and the per-image baseline of the benchmarks):

    RandomResizedCrop(32, scale, ratio=(3/4, 4/3), bilinear, antialias) -> RandomHorizontalFlip(0.5)
    -> RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8) -> RandomGrayscale(0.2) -> float -> Normalize

Every random quantity is drawn per image, as torchvision does: the crop box (torchvision's get_params algorithm:
ten (area, log-ratio) candidates, the first that fits, else the centred fallback), the flip, whether the jitter
applies, its four factors and its order of the four colour operations, and the grayscale.

The crop, the resize and the flip are one pair of per-image interpolation matrices applied by two batched matmuls,
reproducing torchvision's resize of the cropped slice (F.interpolate, bilinear, align_corners=False, antialias=True,
reading only pixels inside the crop) to float rounding; the hue step is a closed-form hexcone rotation (torchvision's
result to float rounding), and grayscale uses torchvision's weights (0.2989, 0.587, 0.114).
Why this is hand-written rather than kornia.augmentation is explained in docs/design.md.

The steps work on float images in [0, 1]. torchvision's pipeline runs them on uint8, rounding after the resize and
truncating after every colour step (about 0.5/255 darker per step on average); that quantisation is not
reproduced.

Reproducibility: every random number of a call comes from ONE `torch.rand` call on `generator` (on the generator's
device), or, when `generator` is None, on torch's global CPU RNG (seeded by torch.manual_seed / seed_everything).
The parameters are drawn on that device before the images are touched, so the same seed gives the same
parameters, and the same augmented images up to float rounding, whether the images live on the CPU or on a GPU.
"""
import math

import torch
import torch.nn as nn

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)   # as train_simsiam.MEAN, STD
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)                                         # torchvision's rgb_to_grayscale
CROP_TRIES = 10                                                                # torchvision's get_params


def _jitter_range(value, name, center, bound):
    """torchvision's ColorJitter._check_input: a number v gives [max(0, center - v), center + v] (hue: [-v, v]),
    a pair is taken as is; None when the range is just the neutral value (the op is then skipped)."""
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f'{name}={value} must be non-negative')
        lo, hi = center - value, center + value
        if center == 1.0:
            lo = max(lo, 0.0)
    else:
        lo, hi = (float(v) for v in value)
    if not bound[0] <= lo <= hi <= bound[1]:
        raise ValueError(f'{name} range ({lo}, {hi}) must be increasing and within {bound}')
    return None if lo == hi == center else (lo, hi)


def _check_probability(p, name):
    if not 0.0 <= p <= 1.0:
        raise ValueError(f'{name}={p} must be a probability in [0, 1]')
    return float(p)


# ---------------------------------------------------------------------------------------------------------------
# The batched kernels: each is torchvision's per-image operation applied with per-image arguments.

def _interp_matrix(start, length, in_size, out_size, flip):
    """(B, out_size, in_size) resampling weights along one axis: output pixel i of image b reads the crop
    [start, start + length) of an axis of in_size pixels as torchvision's resize (F.interpolate, bilinear,
    align_corners=False, antialias=True) resizes the cropped slice: a triangle filter centred on source position
    (i + 0.5) * length / out_size, as wide as one output pixel when downsampling, restricted to the crop and
    normalised (upsampling: plain bilinear, clamped at the crop's edges). Rows reversed where flip is set."""
    i = torch.arange(out_size, device=start.device, dtype=torch.float32)
    i = torch.where(flip[:, None], out_size - 1 - i, i)                                   # (B, out)
    scale = (length.to(torch.float32) / out_size)[:, None, None]                           # (B, 1, 1)
    centre = start.to(torch.float32)[:, None, None] + (i[..., None] + 0.5) * scale         # (B, out, 1)
    j = torch.arange(in_size, device=start.device, dtype=torch.float32)                    # (in,)
    weights = (1 - (j + 0.5 - centre).abs_() / scale.clamp(min=1)).clamp_(min=0)          # (B, out, in)
    inside = (j >= start[:, None, None]) & (j < (start + length)[:, None, None])
    weights.mul_(inside)
    return weights.div_(weights.sum(dim=2, keepdim=True))


def resized_crop(x, top, left, height, width, size, *, flip=None):
    """Float (B, C, H, W) -> (B, C, size, size): image b cropped to rows [top, top + height) and columns
    [left, left + width), resized as torchvision's resized_crop(antialias=True) does, then mirrored where flip is
    set. Two batched matmuls with per-image resampling matrices: no Python per image."""
    if flip is None:
        flip = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    rows = _interp_matrix(top, height, x.shape[-2], size, torch.zeros_like(flip))         # (B, size, H)
    cols = _interp_matrix(left, width, x.shape[-1], size, flip)                           # (B, size, W)
    return torch.matmul(torch.matmul(rows[:, None], x), cols.transpose(1, 2)[:, None])


def grayscale(x):
    """(B, 3, H, W) -> (B, 1, H, W) luma with torchvision's weights."""
    r, g, b = x.unbind(1)
    return (r * GRAY_WEIGHTS[0] + g * GRAY_WEIGHTS[1] + b * GRAY_WEIGHTS[2]).unsqueeze(1)


def adjust_brightness(x, factor):
    """torchvision's adjust_brightness on float images, per image: clamp(f * x, 0, 1)."""
    return (x * factor.view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_contrast(x, factor):
    """torchvision's adjust_contrast: blend with the mean of the image's grayscale, then clamp to [0, 1]."""
    f = factor.view(-1, 1, 1, 1)
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return (x * f).add_(mean * (1 - f)).clamp_(0, 1)


def adjust_saturation(x, factor):
    """torchvision's adjust_saturation: blend with the image's per-pixel grayscale, then clamp to [0, 1]."""
    f = factor.view(-1, 1, 1, 1)
    return (x * f).add_(grayscale(x) * (1 - f)).clamp_(0, 1)


def adjust_hue(x, factor):
    """torchvision's adjust_hue (factor in turns, [-0.5, 0.5]) on float RGB in [0, 1], per image, in closed form.

    With V = max(r, g, b), C = V - min(r, g, b) and the hue h6 in [0, 6) (torchvision's tie-breaking: r, then g,
    then b), the HSV->RGB conversion of (h6 + 6 * factor, C / V, V) is, channel by channel (n = 5, 3, 1 for
    r, g, b): V - C * clamp(min(k, 4 - k), 0, 1) with k = (n + h6 + 6 * factor) mod 6. Equal to torchvision's
    RGB->HSV, shift, HSV->RGB up to float rounding (tests/test_augment.py checks it to 1e-5).
    """
    r, g, b = x.unbind(1)
    v = torch.maximum(torch.maximum(r, g), b)
    c = v - torch.minimum(torch.minimum(r, g), b)
    safe_c = c.masked_fill(c == 0, 1.0)            # a grey pixel (c == 0) has every channel = v, whatever its hue
    h6 = torch.where(v == r, (g - b) / safe_c,
                     torch.where(v == g, (b - r).div_(safe_c).add_(2), (r - g).div_(safe_c).add_(4)))
    h6.add_(6 * factor.view(-1, 1, 1))
    out = torch.empty_like(x)
    for channel, n in enumerate((5.0, 3.0, 1.0)):
        k = torch.remainder(h6 + n, 6.0)
        ramp = torch.minimum(k, 4.0 - k).clamp_(0, 1)
        torch.sub(v, c * ramp, out=out[:, channel])
    return out


_ADJUST = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(x, factors, order, applied=None):
    """Float (B, 3, H, W) in [0, 1]: torchvision's ColorJitter with per-image parameters.

    factors (B, 4): brightness, contrast, saturation, hue factors (NaN: that op is disabled, as torchvision's None);
    order (B, 4): op ids (0 brightness, 1 contrast, 2 saturation, 3 hue), image b applies them in order[b];
    applied (B,) bool: images left untouched where False (RandomApply). Each (step, op) pair is applied to the images
    that have that op at that step, as one batched call: at most 16 calls, whatever the batch size. The parameters
    may live on another device than x (the CPU, where sample_params draws them by default): the image indices are
    then found there, with no device synchronisation, and copied over.
    """
    if applied is None:
        applied = torch.ones(x.shape[0], dtype=torch.bool, device=factors.device)
    active = (~torch.isnan(factors).all(dim=0)).tolist()
    x = x.clone()
    for step in range(4):
        for op in range(4):
            if not active[op]:
                continue
            idx = torch.nonzero(applied & (order[:, step] == op)).flatten()
            if idx.numel():
                f = factors[idx, op].to(x.device, non_blocking=True)
                idx = idx.to(x.device, non_blocking=True)
                x.index_copy_(0, idx, _ADJUST[op](x.index_select(0, idx), f))
    return x


# ---------------------------------------------------------------------------------------------------------------

class SimSiamAugment(nn.Module):
    """The SimSiam/MoCo v2 CIFAR augmentation of a whole uint8 batch, on its device: (B, 3, H, W) -> normalised
    float (B, 3, size, size). Each image gets its own random crop, flip, jitter (order included) and grayscale,
    with torchvision's semantics (see the module docstring for what differs from kornia.augmentation and why).

        aug = SimSiamAugment(crop_scale=(0.2, 1.0))
        x1, x2 = aug.two_views(images_uint8)                 # two independent views, as TwoCropsTransform
        x = aug(images_uint8, generator=g)                  # g: a torch.Generator, or None for the global RNG

    Reproducibility: a call draws all its random numbers with one torch.rand on `generator` (on its device), or on
    torch's global CPU RNG when it is None, so torch.manual_seed(s) (or a Generator seeded with s) before the same
    sequence of calls gives the same views on any device, up to float rounding.
    """

    def __init__(self, crop_scale=(0.2, 1.0), *, size=32, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grayscale_p=0.2,
                 flip_p=0.5, mean=CIFAR_MEAN, std=CIFAR_STD, ratio=(3.0 / 4.0, 4.0 / 3.0)):
        super().__init__()
        lo, hi = (float(v) for v in crop_scale)
        if not 0 < lo <= hi:
            raise ValueError(f'crop_scale={crop_scale} must be increasing and positive')
        r_lo, r_hi = (float(v) for v in ratio)
        if not 0 < r_lo <= r_hi:
            raise ValueError(f'ratio={ratio} must be increasing and positive')
        self.crop_scale, self.ratio, self.size = (lo, hi), (r_lo, r_hi), int(size)
        b, c, s, h = jitter
        self.jitter_ranges = (_jitter_range(b, 'brightness', 1.0, (0, math.inf)),
                              _jitter_range(c, 'contrast', 1.0, (0, math.inf)),
                              _jitter_range(s, 'saturation', 1.0, (0, math.inf)),
                              _jitter_range(h, 'hue', 0.0, (-0.5, 0.5)))
        self.jitter_p = _check_probability(jitter_p, 'jitter_p')
        self.grayscale_p = _check_probability(grayscale_p, 'grayscale_p')
        self.flip_p = _check_probability(flip_p, 'flip_p')
        self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def extra_repr(self):
        return (f'crop_scale={self.crop_scale}, ratio={self.ratio}, size={self.size}, jitter={self.jitter_ranges}, '
                f'jitter_p={self.jitter_p}, grayscale_p={self.grayscale_p}, flip_p={self.flip_p}')

    @torch.no_grad()
    def sample_params(self, n, height, width, generator=None):
        """The random parameters of n images of height x width, on the generator's device (CPU for None):
        top, left, height, width (n,) int64 crop boxes; flip, jitter, gray (n,) bool; factors (n, 4) float32
        (NaN for a disabled op); order (n, 4) int64, a uniformly random permutation of the four ops per image."""
        device = generator.device if generator is not None else torch.device('cpu')
        ftype = torch.float32 if device.type == 'mps' else torch.float64
        u = torch.rand(n, 2 * CROP_TRIES + 13, generator=generator, device=device, dtype=ftype)
        u_area, u_ratio, u_factors, u_order, u_single = u.split([CROP_TRIES, CROP_TRIES, 4, 4, 5], dim=1)
        u_top, u_left, u_flip, u_jit, u_gray = u_single.unbind(1)

        # torchvision's RandomResizedCrop.make_params, the ten tries side by side; the first that fits wins.
        area = height * width
        target = area * (self.crop_scale[0] + (self.crop_scale[1] - self.crop_scale[0]) * u_area)
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = torch.sqrt(target * aspect).round()                # round half to even, as Python's round()
        h = torch.sqrt(target / aspect).round()
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        tries = torch.arange(CROP_TRIES, device=device).expand(n, CROP_TRIES)
        first = torch.where(fits, tries, CROP_TRIES - 1).amin(dim=1, keepdim=True)   # the first that fits
        any_fit = fits.any(dim=1)
        w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
        in_ratio = width / height                              # fallback: torchvision's centred crop
        if in_ratio < self.ratio[0]:
            fw, fh = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            fw, fh = int(round(height * self.ratio[1])), height
        else:
            fw, fh = width, height
        w = torch.where(any_fit, w, torch.full_like(w, fw)).long()
        h = torch.where(any_fit, h, torch.full_like(h, fh)).long()
        # uniform integer start in [0, H - h] (torch.randint(0, H - h + 1)); min() guards u * n rounding up to n
        top = torch.minimum((u_top * (height - h + 1)).floor().long(), height - h)
        left = torch.minimum((u_left * (width - w + 1)).floor().long(), width - w)
        top = torch.where(any_fit, top, (height - h) // 2)
        left = torch.where(any_fit, left, (width - w) // 2)

        factors = torch.full((n, 4), math.nan, device=device, dtype=torch.float32)
        for op, rng in enumerate(self.jitter_ranges):
            if rng is not None:
                factors[:, op] = (rng[0] + (rng[1] - rng[0]) * u_factors[:, op]).float()
        return dict(top=top, left=left, height=h, width=w, flip=u_flip < self.flip_p,
                    jitter=u_jit < self.jitter_p, factors=factors, order=u_order.argsort(dim=1),
                    gray=u_gray < self.grayscale_p)

    @torch.no_grad()
    def apply(self, images, params):
        """Augment images (uint8 (B, 3, H, W), or float in [0, 1]) with the given sample_params(): normalised
        float32 (B, 3, size, size) on the images' device."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f'expected images of shape (B, 3, H, W), got {tuple(images.shape)}')
        device = images.device
        crop = {k: params[k].to(device, non_blocking=True) for k in ('top', 'left', 'height', 'width', 'flip')}
        if images.dtype == torch.uint8:
            x = images.float().div_(255)
        elif images.is_floating_point():
            x = images.float()
        else:
            raise TypeError(f'expected uint8 or float images, got {images.dtype}')
        x = resized_crop(x, crop['top'], crop['left'], crop['height'], crop['width'], self.size, flip=crop['flip'])
        x.clamp_(0, 1)                                   # bilinear weights summing to 1 may overshoot by an ulp
        if self.jitter_p > 0 and any(r is not None for r in self.jitter_ranges):
            x = color_jitter(x, params['factors'], params['order'], params['jitter'])
        if self.grayscale_p > 0:
            idx = torch.nonzero(params['gray']).flatten().to(device, non_blocking=True)
            if idx.numel():
                x.index_copy_(0, idx, grayscale(x.index_select(0, idx)).expand(-1, 3, -1, -1))
        return x.sub_(self.mean.to(device)).div_(self.std.to(device))

    def forward(self, images, generator=None):
        """uint8 (B, 3, H, W) on any device -> normalised float32 (B, 3, size, size) on that device."""
        params = self.sample_params(images.shape[0], images.shape[-2], images.shape[-1], generator)
        return self.apply(images, params)

    def two_views(self, images, generator=None):
        """Two independent augmentations of the same batch: (x1, x2), as TwoCropsTransform gives per image."""
        return self(images, generator), self(images, generator)


def torchvision_pipeline(crop_scale):
    """The per-image torchvision v2 pipeline (uint8 (3, H, W) -> normalised float) of the official SimSiam code:
    the reference the batched path is tested against, and the per-image baseline bench.py times it against."""
    from torchvision.transforms import v2
    return v2.Compose([
        v2.RandomResizedCrop(32, scale=crop_scale, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(CIFAR_MEAN, CIFAR_STD),
    ])
