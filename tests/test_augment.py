"""studylib.augment against torchvision's per-image pipeline (torchvision_pipeline, the independent
oracle): exact comparisons of the batched kernels with torchvision's functional ops, and comparisons of the
distributions of what the random pipeline outputs (crop geometry decoded from a coordinate-encoding image, flip,
jitter and grayscale rates, factor ranges) with torchvision's. Every statistical test runs on a fixed seed and
would also pass for other seeds except with probability ~1e-3; each notes the plausible wrong implementation it
rejects, and the kernel and crop tests check, on the same inputs, that they do reject it. No real data needed."""
import colorsys
import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torchvision.transforms.v2 import functional as TF

import train_simsiam
from studylib.augment import (CIFAR_MEAN, CIFAR_STD, SimSiamAugment, color_jitter, grayscale, resized_crop,
                              torchvision_pipeline)

pytestmark = pytest.mark.usefixtures('isolated_torch_state')   # one thread, global RNG restored afterwards
P_MIN = 1e-3                                                    # a test of equal distributions fails 1 time in 1000


def tv_ops(x, factors, order):
    """torchvision's ColorJitter body on one float image with given factors and order."""
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for op in order:
        x = ops[op](x, float(factors[op]))
    return x


def hard_images(n, generator):
    """Random float RGB images in [0, 1] with the hue edge cases: grey, saturated, tied channels, tiny values."""
    x = torch.rand(n, 3, 32, 32, generator=generator)
    k = n // 8
    x[:k] = x[:k, :1]                                   # grey: every channel equal
    x[k:2 * k] = (x[k:2 * k] > 0.5).float()             # pure primaries, secondaries, black and white
    x[2 * k:3 * k, 1] = x[2 * k:3 * k, 0]               # r == g ties
    x[3 * k:4 * k, 2] = x[3 * k:4 * k, 0]               # r == b ties
    x[4 * k:5 * k] = (x[4 * k:5 * k] * 4).round() / 4   # many exact ties and zeros
    x[5 * k:6 * k] *= 1e-4                              # nearly black
    return x


# ------------------------------------------------------------------------------------------ definitions and kernels

def test_reference_is_the_training_pipeline():
    """The oracle here and in the benchmarks is exactly what train_simsiam trains with, for both recipes."""
    assert (CIFAR_MEAN, CIFAR_STD) == (train_simsiam.MEAN, train_simsiam.STD)
    assert repr(torchvision_pipeline((0.2, 1.0))).count('RandomResizedCrop(size=(32, 32), scale=(0.2, 1.0)') == 1


def random_boxes(n, height, width, generator):
    """n random crop boxes of height x width images, from one pixel to the whole image (the first four forced)."""
    h = torch.randint(1, height + 1, (n,), generator=generator)
    w = torch.randint(1, width + 1, (n,), generator=generator)
    h[:4], w[:4] = torch.tensor([height, 1, height, 1]), torch.tensor([width, width, 1, 1])
    top = (torch.rand(n, generator=generator) * (height + 1 - h)).long()
    left = (torch.rand(n, generator=generator) * (width + 1 - w)).long()
    return top, left, h, w


@pytest.mark.parametrize('height, width, size', [(32, 32, 32), (48, 40, 32), (32, 32, 20)])
def test_crop_kernel_is_torchvisions_resized_crop(height, width, size):
    """resized_crop (+ flip) equals torchvision's resized_crop(antialias=True) on float images to 1e-5, for boxes from
    1 pixel to the whole image, upsampled (CIFAR) or downsampled (the other two cases: its antialias filter). A
    corner-aligned resize (kornia's resample crop mode, or align_corners=True) or one that reads pixels outside the
    crop (grid_sample over the whole image) is off by > 0.01: checked below on the same boxes."""
    g = torch.Generator().manual_seed(0)
    n = 120
    x = torch.rand(n, 3, height, width, generator=g)
    top, left, h, w = random_boxes(n, height, width, g)
    flip = torch.rand(n, generator=g) < 0.5
    out = resized_crop(x, top, left, h, w, size, flip=flip)
    ref, corner = [], []
    for i in range(n):
        box = (int(top[i]), int(left[i]), int(h[i]), int(w[i]))
        r = TF.resized_crop(x[i], *box, [size, size], antialias=True)
        c = F.interpolate(TF.crop(x[i], *box)[None], size=(size, size), mode='bilinear', align_corners=True)[0]
        ref.append(TF.horizontal_flip(r) if flip[i] else r)
        corner.append(TF.horizontal_flip(c) if flip[i] else c)
    ref, corner = torch.stack(ref), torch.stack(corner)
    assert out.shape == (n, 3, size, size)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert (corner - ref).abs().amax() > 0.01                     # the tolerance tells the two geometries apart


def test_color_kernels_are_torchvisions_with_a_per_image_order():
    """color_jitter with per-image factors, order and RandomApply mask equals torchvision's ops applied image by
    image in each image's order, to 1e-5 (the closed-form hue included, on greys, ties and saturated colours, hue
    factors up to +-0.5). One order shared by the whole batch (kornia's ColorJitter) is off by > 0.01: checked."""
    g = torch.Generator().manual_seed(1)
    n = 192
    x = hard_images(n, g)
    lo, hi = torch.tensor([0.0, 0.0, 0.0, -0.5]), torch.tensor([2.0, 2.0, 2.0, 0.5])
    factors = lo + (hi - lo) * torch.rand(n, 4, generator=g)
    order = torch.rand(n, 4, generator=g).argsort(dim=1)
    applied = torch.rand(n, generator=g) < 0.8
    out = color_jitter(x, factors, order, applied)
    ref = torch.stack([tv_ops(x[i], factors[i], order[i].tolist()) if applied[i] else x[i] for i in range(n)])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    shared = color_jitter(x, factors, order[:1].expand(n, 4), applied)
    assert (shared - ref).abs().amax() > 0.01
    torch.testing.assert_close(grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)
    # a disabled op (NaN factor, torchvision's None) is skipped
    only_brightness = factors.clone()
    only_brightness[:, 1:] = math.nan
    torch.testing.assert_close(color_jitter(x, only_brightness, order),
                               (x * factors[:, :1, None, None]).clamp(0, 1), atol=1e-6, rtol=0)


def test_crop_fallback_is_torchvisions_centred_crop():
    """When none of the ten tries fits (scale (1, 1) on an 8 x 64 or 64 x 8 image), the box is torchvision's
    fallback: the largest centred crop with an aspect ratio inside `ratio`."""
    from torchvision.transforms import v2
    for height, width in [(8, 64), (64, 8)]:
        params = SimSiamAugment(crop_scale=(1, 1)).sample_params(50, height, width, torch.Generator().manual_seed(4))
        expected = v2.RandomResizedCrop(32, scale=(1, 1)).make_params([torch.zeros(3, height, width)])
        for key in ('top', 'left', 'height', 'width'):
            assert (params[key] == expected[key]).all(), (height, width, key, expected)


# ---------------------------------------------------------------------------------------------- the module's contract

def test_identity_when_everything_is_disabled():
    """Crop of the whole image (scale (1, 1), ratio (1, 1)), no flip, jitter or grayscale: exactly normalise()."""
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    expected = train_simsiam.normalise(images)
    off = SimSiamAugment(crop_scale=(1, 1), ratio=(1, 1), jitter_p=0, grayscale_p=0, flip_p=0)
    torch.testing.assert_close(off(images), expected, atol=1e-6, rtol=0)
    no_jitter = SimSiamAugment(crop_scale=(1, 1), ratio=(1, 1), jitter=(0, 0, 0, 0), jitter_p=1, grayscale_p=0,
                               flip_p=0)
    torch.testing.assert_close(no_jitter(images), expected, atol=1e-6, rtol=0)
    flipped = SimSiamAugment(crop_scale=(1, 1), ratio=(1, 1), jitter_p=0, grayscale_p=0, flip_p=1)
    torch.testing.assert_close(flipped(images), expected.flip(-1), atol=1e-6, rtol=0)


def test_output_dtype_shape_device_and_refusals():
    aug = SimSiamAugment()
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    out = aug(images)
    assert out.dtype == torch.float32 and out.shape == (8, 3, 32, 32) and out.device == images.device
    assert torch.isfinite(out).all()
    lo = (0 - torch.tensor(CIFAR_MEAN)) / torch.tensor(CIFAR_STD)
    hi = (1 - torch.tensor(CIFAR_MEAN)) / torch.tensor(CIFAR_STD)
    assert (out >= lo.view(1, 3, 1, 1) - 1e-5).all() and (out <= hi.view(1, 3, 1, 1) + 1e-5).all()
    assert SimSiamAugment(size=24)(torch.zeros(2, 3, 40, 48, dtype=torch.uint8)).shape == (2, 3, 24, 24)
    x1, x2 = aug.two_views(images)
    assert x1.shape == x2.shape == (8, 3, 32, 32) and not torch.equal(x1, x2)
    with pytest.raises(TypeError, match='uint8 or float'):
        aug(images.long())
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\)'):
        aug(images[:, :1])
    with pytest.raises(ValueError):
        SimSiamAugment(jitter_p=1.5)
    with pytest.raises(ValueError):
        SimSiamAugment(jitter=(0.4, 0.4, 0.4, 0.7))


def test_reproducible_under_a_seed():
    """The same seed, global or a Generator's, gives the same views; a Generator leaves the global RNG alone."""
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    aug = SimSiamAugment()
    torch.manual_seed(5)
    a = aug.two_views(images)
    torch.manual_seed(5)
    b = aug.two_views(images)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], a[1])
    state = torch.get_rng_state()
    c = aug(images, torch.Generator().manual_seed(7))
    assert torch.equal(c, aug(images, torch.Generator().manual_seed(7)))
    assert not torch.equal(c, aug(images, torch.Generator().manual_seed(8)))
    assert torch.equal(state, torch.get_rng_state())
    # forward is apply(sample_params) on the same draws: the parameters inspected below are the ones used
    params = aug.sample_params(32, 32, 32, torch.Generator().manual_seed(7))
    assert torch.equal(c, aug.apply(images, params))


@pytest.mark.cuda
def test_cuda_matches_cpu_under_the_same_seed(no_tf32):
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    aug = SimSiamAugment()
    cpu = aug(images, torch.Generator().manual_seed(0))
    gpu = aug.to('cuda')(images.cuda(), torch.Generator().manual_seed(0))
    assert gpu.device.type == 'cuda' and gpu.dtype == torch.float32
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------ distributions of the outputs

def coordinate_image():
    """uint8 (3, 32, 32): red = 8 * column, green = 8 * row, blue 0. A bilinear resize of a linear ramp is the ramp,
    so each output pixel tells which source position it read."""
    ramp = torch.arange(32) * 8
    return torch.stack([ramp.expand(32, 32), ramp[:, None].expand(32, 32), torch.zeros(32, 32, dtype=torch.long)]
                       ).to(torch.uint8)


def decode_crops(views):
    """(N, 3, 32, 32) views of coordinate_image() in pixel units of 0..255 -> width, height, left, top, flipped.

    Output pixel i reads source x0 + (i + 0.5) * w / 32 - 0.5, unclamped for 8 <= i <= 23 when w >= 2, so the
    slope between pixels 8 and 23 gives w (negative: flipped) and pixel 8 gives x0. uint8 rounding (torchvision)
    moves a read position by at most 1/16 pixel: the rounded values are exact."""
    def axis(line):                                             # (N, 32) source positions * 8
        slope = (line[:, 23] - line[:, 8]) / 8 / 15
        flipped = slope < 0
        size = (slope.abs() * 32).round()
        first = torch.where(flipped, line[:, 23], line[:, 8]) / 8
        start = (first - (8.5 * size / 32 - 0.5)).round()
        return size, start, flipped
    w, left, flipped = axis(views[:, 0, 16, :].double())
    h, top, upside_down = axis(views[:, 1, :, 16].double())
    assert not upside_down.any()
    assert (left >= 0).all() and (left + w <= 32).all() and (top >= 0).all() and (top + h <= 32).all()
    return w, h, left, top, flipped


def to_pixels(out):
    """Normalised output -> values 0..255."""
    return (out * torch.tensor(CIFAR_STD).view(1, 3, 1, 1) + torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) * 255


def crop_stats(w, h, left, top):
    return dict(area=(w * h / 1024).numpy(), log_ratio=torch.log(w / h).numpy(),
                centre_x=(left + w / 2).numpy(), centre_y=(top + h / 2).numpy())


def torchvision_crops(scale, n):
    """n crops + flips by the training pipeline's own RandomResizedCrop and RandomHorizontalFlip."""
    crop_and_flip = torchvision_pipeline(scale).transforms[:2]
    image = coordinate_image()
    views = torch.stack([crop_and_flip[1](crop_and_flip[0](image)) for _ in range(n)])
    return decode_crops(views.double())


def test_crop_and_flip_distribution_matches_torchvision():
    """Area fraction, log aspect ratio and centre of the crops, decoded from the outputs, against the training
    pipeline's torchvision crops (two-sample KS, 3000 crops each, both recipes); flip rate 0.5. The same test
    rejects the other recipe's scale ((0.08, 1) against (0.2, 1): a wrong crop_scale, or kornia's default scale),
    checked below on the same samples."""
    n = 3000
    torch.manual_seed(10)
    ref = {scale: crop_stats(*torchvision_crops(scale, n)[:4]) for scale in [(0.2, 1.0), (0.08, 1.0)]}
    image = coordinate_image().expand(n, 3, 32, 32)
    for scale, other in [((0.2, 1.0), (0.08, 1.0)), ((0.08, 1.0), (0.2, 1.0))]:
        aug = SimSiamAugment(crop_scale=scale, jitter_p=0, grayscale_p=0)
        w, h, left, top, flipped = decode_crops(to_pixels(aug(image, torch.Generator().manual_seed(11))))
        ours = crop_stats(w, h, left, top)
        for key in ours:
            assert stats.ks_2samp(ours[key], ref[scale][key]).pvalue > P_MIN, (scale, key)
        assert stats.ks_2samp(ours['area'], ref[other]['area']).pvalue < 1e-9, (scale, other)
        assert ours['area'].min() >= 0.85 * scale[0] and ours['area'].max() <= 1    # rounding loses < 15%
        assert abs(flipped.double().mean().item() - 0.5) < 0.04            # 4.5 sigma; p=0 or 1 fails


@pytest.mark.parametrize('op', [0, 1, 2, 3], ids=['brightness', 'contrast', 'saturation', 'hue'])
def test_jitter_rate_and_factor_range(op):
    """One jitter op alone on a constant coloured image, 4000 images: the op applies to 80% of them (RandomApply
    p=0.8) and its factor, read back from the colour, is uniform on torchvision's range ([0.6, 1.4]; hue: a shift
    in [-0.1, 0.1] of a full turn). Rejects additive brightness (kornia's ColorJiggle: the ratio would differ
    between channels), a hue in radians (a 2 pi larger or smaller shift), a wrong range or rate."""
    n = 4000
    colour = torch.tensor([40, 100, 160], dtype=torch.float64)
    images = colour.to(torch.uint8).view(1, 3, 1, 1).expand(n, 3, 32, 32)
    jitter = [0.0] * 4
    jitter[op] = 0.1 if op == 3 else 0.4
    aug = SimSiamAugment(jitter=tuple(jitter), grayscale_p=0)
    out = to_pixels(aug(images, torch.Generator().manual_seed(20 + op))).double()
    assert (out.amax(dim=(2, 3)) - out.amin(dim=(2, 3))).amax() < 1e-3      # still constant images
    rgb = out[:, :, 0, 0]
    if op == 3:
        hue0 = colorsys.rgb_to_hsv(*(colour / 255).tolist())[0]
        hues = torch.tensor([colorsys.rgb_to_hsv(*(c / 255).tolist())[0] for c in rgb])
        factor = torch.remainder(hues - hue0 + 0.5, 1.0) - 0.5
        lo, hi, neutral = -0.1, 0.1, 0.0
        assert (rgb.amax(1) - colour.max()).abs().amax() < 1e-3             # hue keeps value and chroma
    else:
        luma = float(colour @ torch.tensor([0.2989, 0.587, 0.114], dtype=torch.float64))
        base = torch.full((3,), 0.0 if op == 0 else luma)   # brightness scales towards 0, the others towards luma
        ratio = (rgb - base) / (colour - base)                              # brightness: out/in; others: blend
        assert (ratio.amax(1) - ratio.amin(1)).amax() < 1e-4                # one factor for the three channels
        factor, lo, hi, neutral = ratio.mean(1), 0.6, 1.4, 1.0
    applied = (factor - neutral).abs() > 1e-4
    assert abs(applied.double().mean().item() - 0.8) < 0.03                # 4.7 sigma
    f = factor[applied]
    assert f.min() >= lo - 1e-4 and f.max() <= hi + 1e-4
    assert f.min() < lo + 0.01 and f.max() > hi - 0.01                      # the whole range is reached
    assert stats.kstest(f.numpy(), stats.uniform(lo, hi - lo).cdf).pvalue > P_MIN


def test_grayscale_rate_and_weights():
    """RandomGrayscale(0.2): 20% of the views have three equal channels, equal to torchvision's luma."""
    n = 4000
    colour = torch.tensor([40.0, 100.0, 160.0])
    images = colour.to(torch.uint8).view(1, 3, 1, 1).expand(n, 3, 32, 32)
    out = to_pixels(SimSiamAugment(jitter_p=0, grayscale_p=0.2)(images, torch.Generator().manual_seed(30)))
    rgb = out[:, :, 5, 5]
    grey = (rgb.amax(1) - rgb.amin(1)) < 1e-3
    assert abs(grey.double().mean().item() - 0.2) < 0.03                   # 4.7 sigma
    luma = float(colour @ torch.tensor([0.2989, 0.587, 0.114]))
    assert (rgb[grey] - luma).abs().amax() < 1e-3
    assert (rgb[~grey] - colour).abs().amax() < 1e-3


def test_jitter_order_is_drawn_per_image():
    """Each image draws its own order of the four ops, uniform over the 24 permutations (chi-square on 4800
    images); kornia's ColorJitter draws one order per batch and fails here."""
    params = SimSiamAugment().sample_params(4800, 32, 32, torch.Generator().manual_seed(40))
    assert torch.equal(params['order'].sort(dim=1).values, torch.arange(4).expand(4800, 4))
    codes = (params['order'] * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)
    counts = counts[counts > 0]
    assert len(counts) == 24
    assert stats.chisquare(counts.numpy()).pvalue > P_MIN
    assert len(torch.unique(codes[:64])) > 10                            # one batch mixes many orders


def test_whole_pipeline_distribution_matches_torchvision():
    """All steps together on one colourful synthetic image, 1500 views each from SimSiamAugment and from the
    training pipeline (run on the float image, so torchvision's per-step uint8 truncation does not shift it):
    per-view channel means and standard deviations agree (two-sample KS)."""
    n = 1500
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing='ij')
    image = torch.stack([xx, yy, 0.5 + 0.5 * torch.sin(6 * xx + 4 * yy)]).mul(255).round().to(torch.uint8)
    ours = SimSiamAugment()(image.expand(n, 3, 32, 32), torch.Generator().manual_seed(50))
    torch.manual_seed(51)
    reference = torchvision_pipeline((0.2, 1.0))
    theirs = torch.stack([reference(image.float() / 255) for _ in range(n)])
    for stat in (lambda v: v.mean(dim=(2, 3)), lambda v: v.std(dim=(2, 3))):
        a, b = stat(ours), stat(theirs)
        for c in range(3):
            assert stats.ks_2samp(a[:, c].numpy(), b[:, c].numpy()).pvalue > P_MIN


def test_measure_pipelines_reports_every_pipeline():
    """A smoke run of the benchmark helper at a tiny size: every pipeline timed, speed-ups relative to the
    torchvision DataLoader."""
    from studylib.benchmarks import measure_pipelines
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    result = measure_pipelines(images, batch_size=8, workers=0, repeats=1)
    assert set(result['pairs_per_s']) == {'batched', 'kornia_resample', 'kornia_slice', 'torchvision'}
    assert all(v is None or v > 0 for v in result['pairs_per_s'].values())
    assert result['speedup_vs_torchvision']['torchvision'] == 1.0
    assert result['batch_size'] == 8 and result['workers'] == 0 and result['threads'] == 1
