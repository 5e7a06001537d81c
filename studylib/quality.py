"""Restoration fidelity (PSNR). Sample quality lives in digit_net.py."""
import torch


def psnr(a, b):
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2), one value per image: (B,).

    Both sets are clamped to [-1, 1] first, as they are when shown or saved: a chain that overshoots the pixel
    range is judged by the image it produces."""
    mse = (a.float().clamp(-1, 1) - b.float().clamp(-1, 1)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))
