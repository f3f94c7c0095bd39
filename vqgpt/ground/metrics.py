"""Image-quality and codebook metrics on [-1, 1] images and integer code grids."""

from __future__ import annotations

import math

import torch


def psnr(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (B, 3, H, W) images in [-1, 1] (peak-to-peak 2), shape (B,)."""
    a = images.detach().float().clamp(-1, 1)
    b = reconstructions.detach().float().clamp(-1, 1)
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)


def ssim(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Gaussian window 11, sigma 1.5, on [0, 1] images), shape (B,)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    a = (images.detach().float().clamp(-1, 1) + 1) / 2
    b = (reconstructions.detach().float().clamp(-1, 1) + 1) / 2
    return structural_similarity_index_measure(b, a, data_range=1.0, reduction="none")


def code_histogram(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Counts of each code in an integer tensor of any shape, shape (codebook_size,)."""
    return torch.bincount(indices.detach().flatten().long().cpu(), minlength=codebook_size)[:codebook_size]


def codebook_stats(counts: torch.Tensor) -> dict[str, float]:
    """Usage (share of codes ever hit), perplexity and entropy (bits) from a code histogram."""
    counts = counts.double()
    total = counts.sum().clamp_min(1)
    p = counts / total
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum())
    return {
        "usage": float((counts > 0).double().mean()),
        "perplexity": math.exp(entropy),
        "entropy_bits": entropy / math.log(2),
    }


def bits_per_image(grid_shape: tuple[int, int], codebook_size: int) -> float:
    """Bits needed to store one image's code grid at a fixed code length."""
    return grid_shape[0] * grid_shape[1] * math.log2(codebook_size)
