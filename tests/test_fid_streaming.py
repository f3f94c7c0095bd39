"""Feature statistics summed a batch at a time equal those of the whole array, in memory that does not grow.

``FeatureAccumulator`` is what fid-stats, an image-folder reference and eval-prior's samples go
through: an ImageNet-train reference (1.28M images, ~20 KB of Inception features each) must never be
held as one array.
"""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch

import vqgpt.workflow.evaluation as evaluation
from vqgpt.ground.fid import (
    FeatureAccumulator,
    Features,
    _gaussian,
    _subset,
    compute_stats,
    inception_score,
)


def inception_like(n: int, dim: int, seed: int) -> torch.Tensor:
    """(n, dim) float32 rows shaped like Inception pool features: non-negative, mean well away from 0, correlated."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=g) / dim ** 0.5
    return (torch.randn(n, dim, generator=g) @ mixing + 3.0).relu() * 0.2 + 0.1


def fed(pool: torch.Tensor, spatial: torch.Tensor, logits: torch.Tensor, batch: int, **kwargs) -> FeatureAccumulator:
    accumulator = FeatureAccumulator(len(pool), **kwargs)
    for start in range(0, len(pool), batch):
        rows = slice(start, start + batch)
        accumulator.update(Features(pool[rows], logits[rows], spatial[rows]))
    return accumulator


@pytest.mark.parametrize("batch", [1, 7, 64, 250, 1000])  # 7 and 64 leave a last partial batch of 250 rows
def test_streamed_stats_equal_the_whole_array_ones(batch):
    pool, spatial, logits = inception_like(250, 48, seed=0), inception_like(250, 30, seed=1), torch.randn(250, 12) * 4
    whole = compute_stats(pool, "net", keep_features=40, seed=5, spatial=spatial, source="s", split="train",
                          resolution=32)
    summed = fed(pool, spatial, logits, batch, keep_features=40, seed=5).stats("net", "s", "train", 32)
    np.testing.assert_allclose(summed.mu, whole.mu, rtol=1e-12, atol=0)
    np.testing.assert_allclose(summed.sigma, whole.sigma, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(summed.spatial_mu, whole.spatial_mu, rtol=1e-12, atol=0)
    np.testing.assert_allclose(summed.spatial_sigma, whole.spatial_sigma, rtol=1e-9, atol=1e-14)
    assert summed.features.dtype == whole.features.dtype == np.float32
    assert np.array_equal(summed.features, whole.features)  # the same rows, bit for bit
    assert (summed.num_images, summed.feature_network, summed.source, summed.split, summed.resolution) == (
        250, "net", "s", "train", 32)


def test_streamed_gaussian_matches_torch_fidelity_at_inception_scale():
    """2048-d rows at Inception's magnitudes, a partial last batch: sigma within rtol 1e-9 of np.cov."""
    pool = inception_like(3000, 2048, seed=2)
    mu, sigma = _gaussian(pool)
    accumulator = FeatureAccumulator(keep_features=0, spatial=False)
    for part in pool.split(448):
        accumulator.update(Features(part, part[:, :0], part[:, :0]))
    streamed = accumulator.stats("net")
    np.testing.assert_allclose(streamed.mu, mu, rtol=1e-12)
    np.testing.assert_allclose(streamed.sigma, sigma, rtol=1e-9, atol=1e-12 * np.abs(sigma).max())
    assert streamed.features is None


@pytest.mark.parametrize("keep", [None, 0, 10, 250, 1000])
def test_streamed_subset_is_compute_stats_subset(keep):
    pool, spatial, logits = torch.rand(250, 6), torch.rand(250, 3), torch.rand(250, 4)
    summed = fed(pool, spatial, logits, 64, keep_features=keep).stats("net")
    whole = compute_stats(pool, "net", keep_features=keep, spatial=spatial)
    if keep == 0:
        assert summed.features is None and whole.features is None
    else:
        assert np.array_equal(summed.features, whole.features)
        assert np.array_equal(summed.features, _subset(pool, keep, 0).numpy())


@pytest.mark.parametrize("n, batch", [(1003, 64), (9, 2), (5, 5)])  # also fewer rows than splits
def test_streamed_inception_score_equals_torch_fidelity(n, batch):
    logits = torch.randn(n, 17, generator=torch.Generator().manual_seed(n)) * 5
    expected = inception_score(logits)
    got = fed(torch.rand(n, 3), torch.rand(n, 2), logits, batch, keep_features=0, inception_splits=10).inception_score()
    assert got.mean == pytest.approx(expected.mean, rel=1e-10)
    assert got.std == pytest.approx(expected.std, rel=1e-7, abs=1e-12)


def test_announced_counts_are_kept():
    accumulator = FeatureAccumulator(3, keep_features=2)
    with pytest.raises(ValueError, match="more than the 3 feature rows"):
        accumulator.update(Features(torch.rand(4, 2), torch.rand(4, 2), torch.rand(4, 2)))
    with pytest.raises(ValueError, match="number of rows up front"):
        FeatureAccumulator(None, keep_features=2)
    with pytest.raises(ValueError, match="at least 2 images"):
        FeatureAccumulator(keep_features=0).stats("net")


class _Stub(torch.nn.Module):
    """Extractor stand-in: large features for each batch, counting the feature rows still alive (weakrefs)."""

    name = "stub"

    def __init__(self) -> None:
        super().__init__()
        self.alive = 0
        self.most_alive = 0

    def _gone(self, rows: int) -> None:
        self.alive -= rows

    def forward(self, images: torch.Tensor) -> Features:
        n = len(images)
        pool = images.flatten(1).mean(1, keepdim=True) + torch.rand(n, 256)
        out = Features(pool, torch.rand(n, 10), torch.rand(n, 200))
        for t in out:
            weakref.finalize(t, self._gone, n)
            self.alive += n
        self.most_alive = max(self.most_alive, self.alive)
        return out


def test_reference_stats_never_hold_more_than_a_batch_of_features(monkeypatch):
    """A folder of N images: at most about one batch of feature rows alive at a time, and no N-row torch.cat."""
    num, batch = 400, 16
    images = torch.rand(num, 3, 4, 4) * 2 - 1

    class Dataset:
        def __len__(self) -> int:
            return num

    def batches(dataset, batch_size, limit=None):
        for start in range(0, num, batch_size):
            yield images[start:start + batch_size].clone(), torch.zeros(min(batch_size, num - start), dtype=torch.long)

    monkeypatch.setattr(evaluation, "build_dataset", lambda config, split: Dataset())
    monkeypatch.setattr(evaluation, "readable_batches", batches)
    widest = []
    real_cat = torch.cat

    def counting_cat(tensors, *args, **kwargs):
        out = real_cat(tensors, *args, **kwargs)
        widest.append(out.shape[0] if out.ndim else 0)
        return out

    monkeypatch.setattr(torch, "cat", counting_cat)
    stub = _Stub()
    stats = evaluation.reference_stats(stub, "folder", 4, batch_size=batch, keep_features=20, progress=False)
    monkeypatch.undo()

    assert stats.num_images == num and stats.features.shape == (20, 256) and stats.spatial_sigma.shape == (200, 200)
    # 3 tensors per batch: one batch being summed (2 batches while the next is made), never all N rows
    assert stub.most_alive <= 2 * 3 * batch, f"{stub.most_alive} feature rows alive at once for {num} images"
    assert max(widest, default=0) < num, "the features of every image were concatenated"
