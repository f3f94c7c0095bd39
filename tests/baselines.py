"""Trivial baselines that quality assertions must beat by a margin, computed on the same images."""

from typing import NamedTuple

import torch
from torch.utils.data import Subset

from vqgpt.ground.data import DataConfig, build_dataset
from vqgpt.ground.metrics import psnr, ssim


class Scores(NamedTuple):
    psnr: float
    ssim: float


def eval_images(source: str, resolution: int, num_images: int | None = None) -> torch.Tensor:
    """The first ``num_images`` (default: all) eval images of ``source`` as reconstruct() reads them, (N, 3, R, R)."""
    dataset = build_dataset(DataConfig(source=source, resolution=resolution, random_crop=False, hflip=False), "eval")
    subset = Subset(dataset, range(len(dataset) if num_images is None else min(num_images, len(dataset))))
    return torch.stack([subset[i][0] for i in range(len(subset))])


def mean_image_scores(images: torch.Tensor) -> Scores:
    """Mean PSNR / SSIM of a 'tokenizer' that outputs the mean of ``images`` for every input (the best
    constant output under MSE): on the MNIST eval digits about 12.9 dB and 0.48."""
    mean = images.mean(0, keepdim=True).expand_as(images)
    return Scores(float(psnr(images, mean).mean()), float(ssim(images, mean).mean()))


def label_ignoring_accuracy(num_classes: int) -> float:
    """Expected class accuracy of samples that ignore the label they were asked for, with balanced labels."""
    return 1.0 / num_classes
