"""Sample-quality and restoration measures that need no downloaded weights.

`thumbnail_fd` is an interim, crude sample-quality measure: the Frechet distance between Gaussians fitted to
8x8 average-pooled colour thumbnails (192 numbers per image) of two image sets. It sees colour, layout and
blur, not digit identity; it is only comparable between sets of the same size (the estimate is biased upwards for
small sets). Lower is better, 0 for identical statistics.
"""
import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg


def psnr(a, b):
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2), one value per image: (B,).

    Both sets are clamped to [-1, 1] first, as they are when shown or saved: a chain that overshoots the pixel
    range is judged by the image it produces."""
    mse = (a.float().clamp(-1, 1) - b.float().clamp(-1, 1)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


def frechet_distance(feats_a, feats_b):
    """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)) between Gaussians fitted to two (N, D) arrays."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = linalg.sqrtm(cov_a @ cov_b)
    covmean = np.real(covmean)  # sqrtm of a product of PSD matrices: imaginary parts are round-off
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def thumbnail_features(images):
    """(N, 3, 32, 32) in [-1, 1] -> (N, 192): 4x4 average pooling to 8x8 colour thumbnails.

    Images are clamped to [-1, 1] first, as they are when shown: an undertrained sampler whose pixels overshoot
    is judged by the images it produces, not by how far it overshoots."""
    return F.avg_pool2d(images.float().cpu().clamp(-1, 1), 4).flatten(1).numpy()


def thumbnail_fd(images_a, images_b):
    return frechet_distance(thumbnail_features(images_a), thumbnail_features(images_b))
