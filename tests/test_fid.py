"""FID / IS / precision-recall and reference statistics, offline (random-weight features, random Inception weights)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vqgpt.ground.fid import (
    INCEPTION_NAME,
    FeatureExtractor,
    FeatureStats,
    compute_stats,
    extract_features,
    frechet_distance,
    inception_score,
    load_feature_extractor,
    load_stats,
    precision_recall,
    quantize,
    save_stats,
)


def smooth_images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """(n, 3, size, size) in [-1, 1] with some spatial structure (blurred noise)."""
    g = torch.Generator().manual_seed(seed)
    return F.avg_pool2d(torch.rand(n, 3, size, size, generator=g) * 2 - 1, 3, 1, 1)


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return FeatureExtractor.random(seed=0)


def stats_of(extractor: FeatureExtractor, images: torch.Tensor) -> FeatureStats:
    return compute_stats(extractor(images).pool, extractor.name)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(extractor):
    images = smooth_images(200, seed=0)
    reference = stats_of(extractor, images)
    assert frechet_distance(reference, reference) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(reference, stats_of(extractor, images.clone())) == pytest.approx(0.0, abs=1e-6)
    g = torch.Generator().manual_seed(1)
    fids = [frechet_distance(reference, stats_of(extractor, (images + s * torch.randn(images.shape, generator=g)).clamp(-1, 1)))
            for s in (0.1, 0.2, 0.4)]
    assert fids[0] > 1e-3
    assert fids[0] < fids[1] < fids[2]
    # another draw of the same distribution is far closer than a visibly noisy copy
    assert frechet_distance(reference, stats_of(extractor, smooth_images(200, seed=5))) < fids[1]


def test_fid_matches_the_closed_form_for_gaussian_stats():
    d = 4
    mu_a, mu_b = np.zeros(d), np.array([1.0, 2.0, 0.0, 0.0])
    a = FeatureStats(mu_a, np.eye(d) * 4.0, 100, "net")
    b = FeatureStats(mu_b, np.eye(d) * 1.0, 100, "net")
    # ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2) = 5 + d * (4 + 1 - 2 * 2)
    assert frechet_distance(a, b) == pytest.approx(5.0 + d * 1.0, rel=1e-9)


def test_fid_refuses_stats_of_different_networks():
    a = FeatureStats(np.zeros(3), np.eye(3), 10, "random-conv-seed0")
    with pytest.raises(ValueError, match="different feature networks"):
        frechet_distance(a, FeatureStats(np.zeros(3), np.eye(3), 10, INCEPTION_NAME))
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(a, FeatureStats(np.zeros(4), np.eye(4), 10, "random-conv-seed0"))
    # foreign stats files carry no network name: allowed
    assert frechet_distance(a, FeatureStats(np.zeros(3), np.eye(3), 10, "unknown")) == pytest.approx(0.0, abs=1e-9)


def test_precision_recall_on_toy_data():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 8, generator=g)
    same = precision_recall(real, real.clone())
    assert same.precision == 1.0 and same.recall == 1.0
    far = precision_recall(real, real + 100.0)
    assert far.precision == 0.0 and far.recall == 0.0
    # mode collapse: samples all near one real point are precise (inside the real manifold) but cover little
    collapsed = real[0] + 0.01 * torch.randn(300, 8, generator=g)
    pr = precision_recall(real, collapsed)
    assert pr.precision > 0.9 and pr.recall < 0.1
    # another draw of the same distribution: both high
    other = precision_recall(real, torch.randn(300, 8, generator=g))
    assert other.precision > 0.6 and other.recall > 0.6


def test_precision_recall_rejects_bad_input():
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(torch.randn(3, 4), torch.randn(10, 4))
    with pytest.raises(ValueError, match="dimensions differ"):
        precision_recall(torch.randn(10, 4), torch.randn(10, 5))


def test_inception_score_bounds():
    uniform = inception_score(torch.zeros(100, 10))
    assert uniform.mean == pytest.approx(1.0, abs=1e-9) and uniform.std == pytest.approx(0.0, abs=1e-9)
    # confident and evenly spread over 10 classes: IS = 10 (one split holds every class equally)
    confident = inception_score(torch.eye(10).repeat(10, 1) * 100.0, splits=1)
    assert confident.mean == pytest.approx(10.0, rel=1e-6)
    # confident but all the same class: no diversity, IS = 1
    assert inception_score(torch.eye(10)[[3] * 50] * 100.0, splits=1).mean == pytest.approx(1.0, abs=1e-6)


def test_features_see_8_bit_images_and_random_network_is_seeded(extractor):
    images = smooth_images(4, seed=2)
    levels = (quantize(images) + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)       # 256 levels, as a saved PNG
    assert torch.equal(quantize(quantize(images)), quantize(images))
    out = extractor(quantize(images))
    assert torch.equal(out.pool, extractor(images).pool)
    assert out.pool.shape == (4, 112) and out.logits.shape == (4, 10)
    state = torch.get_rng_state()
    again = FeatureExtractor.random(seed=0)
    assert torch.equal(torch.get_rng_state(), state), "building the random network must not move the global RNG"
    assert torch.equal(again(images).pool, out.pool)
    assert not torch.equal(FeatureExtractor.random(seed=1)(images).pool, out.pool)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        extractor(images[:, :1])


def test_extract_features_concatenates_batches(extractor):
    images = smooth_images(10, seed=3)
    features = extract_features(extractor, images.split(4))
    assert features.pool.shape == (10, 112)
    assert torch.allclose(features.pool, extractor(images).pool, atol=1e-5)
    with pytest.raises(ValueError, match="no images"):
        extract_features(extractor, [])


def test_stats_round_trip_through_npz(tmp_path, extractor):
    pool = extractor(smooth_images(50, seed=4)).pool
    stats = compute_stats(pool, extractor.name, keep_features=20, source="builtin:mnist", split="eval", resolution=32)
    assert stats.features.shape == (20, 112)
    path = save_stats(stats, tmp_path / "ref.npz")
    loaded = load_stats(path)
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    np.testing.assert_array_equal(loaded.features, stats.features)
    assert (loaded.num_images, loaded.feature_network, loaded.source, loaded.split, loaded.resolution) == \
        (50, extractor.name, "builtin:mnist", "eval", 32)
    with np.load(path, allow_pickle=False) as raw:  # the usual FID stats keys, readable by other tools
        assert raw["mu"].shape == (112,) and raw["sigma"].shape == (112, 112)
    with pytest.warns(UserWarning, match="rank-deficient"):  # 50 images, 112-d features
        assert frechet_distance(loaded, stats) == pytest.approx(0.0, abs=1e-6)
    with pytest.warns(UserWarning, match="^sFID from 50 images"):  # eval-prior warns once per figure, by name
        frechet_distance(loaded, stats, name="sFID")


def test_foreign_and_broken_stats_files(tmp_path):
    np.savez(tmp_path / "foreign.npz", mu=np.zeros(3, np.float32), sigma=np.eye(3, dtype=np.float32))
    foreign = load_stats(tmp_path / "foreign.npz")
    assert foreign.feature_network == "unknown" and foreign.features is None and foreign.mu.dtype == np.float64
    np.savez(tmp_path / "bad.npz", m=np.zeros(3))
    with pytest.raises(ValueError, match=r"bad\.npz.*missing \['mu', 'sigma'\]"):
        load_stats(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"junk\.npz"):
        load_stats(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_stats(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match=r"\.npz"):
        save_stats(foreign, tmp_path / "stats.txt")


def test_inception_loads_from_a_local_weights_file(tmp_path):
    # Same architecture and key names as the FID Inception (pytorch-fid / torch-fidelity files), random weights.
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    state = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False).state_dict()
    path = tmp_path / "pt_inception-random.pth"
    torch.save(state, path)
    extractor = load_feature_extractor(str(path))
    assert extractor.name == INCEPTION_NAME
    out = extractor(smooth_images(2, seed=0))
    assert out.pool.shape == (2, 2048) and out.logits.shape == (2, 1008)
    assert torch.isfinite(out.pool).all()
    # logits are the "unbiased" ones (no fc bias), as torch-fidelity's IS uses
    assert torch.allclose(out.logits, out.pool @ state["fc.weight"].T, atol=1e-3)


def test_bad_weights_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_feature_extractor(str(tmp_path / "nothere.pth"))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth: not FID Inception-v3 weights"):
        load_feature_extractor(str(tmp_path / "other.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk\.pth: not a loadable"):
        load_feature_extractor(str(tmp_path / "junk.pth"))
    with pytest.raises(ValueError, match="random:SEED"):
        load_feature_extractor("random:x")
    assert load_feature_extractor("random:3").name == "random-conv-seed3"
    assert math.isfinite(float(load_feature_extractor("random")(smooth_images(1, 0)).pool.sum()))
