"""Tokenizer / prior evaluation end to end on tiny random models (offline: random-weight FID features)."""

import json
import math

import numpy as np
import pytest
import torch

from stage1_vq import QuantizerConfig, VQModel, VQModelConfig
from stage2_prior import GPT, GPTConfig
from vqgpt.classifier import DEFAULT_STEPS, MnistClassifier, TrainedClassifier, save_classifier
from vqgpt.evaluation import (
    PRIOR_KEYS,
    STATS_KEYS,
    TOKENIZER_KEYS,
    eval_prior,
    eval_tokenizer,
    fid_stats,
    sample_class_accuracy,
)
from vqgpt.fid import load_stats
from vqgpt.metrics import psnr, ssim
from vqgpt.pipeline import VQGPTPipeline

# The JSON schemas, pinned: changing a key is a breaking change for users' scripts.
EXPECTED_TOKENIZER_KEYS = ("tokenizer", "images", "num_images", "resolution", "grid", "codebook_size", "psnr", "ssim",
                           "lpips", "rfid", "codebook_usage", "num_tokens", "perplexity", "bits_per_image", "fid_features")
EXPECTED_PRIOR_KEYS = ("pipeline", "reference", "num_samples", "num_reference", "resolution", "cfg_scale",
                       "temperature", "top_k", "top_p", "seed", "fid", "inception_score", "inception_score_std",
                       "precision", "recall", "class_accuracy", "classifier_heldout_accuracy", "fid_features")
EXPECTED_STATS_KEYS = ("path", "source", "split", "resolution", "num_images", "feature_dim", "num_features_kept",
                       "fid_features")


def test_json_schemas_are_stable():
    assert TOKENIZER_KEYS == EXPECTED_TOKENIZER_KEYS
    assert PRIOR_KEYS == EXPECTED_PRIOR_KEYS
    assert STATS_KEYS == EXPECTED_STATS_KEYS


def test_psnr_and_ssim_on_known_pairs():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 16, 16, generator=g) - 0.5          # in [-0.5, 0.5]: no clamping below
    shifted = images + 0.1                                        # MSE = 0.01 on a peak-to-peak range of 2
    assert torch.allclose(psnr(images, shifted), torch.full((3,), 10 * math.log10(4 / 0.01)), atol=1e-4)
    assert torch.allclose(ssim(images, images), torch.ones(3), atol=1e-6)
    assert (ssim(images, -images) < 0.1).all()
    assert (ssim(images, shifted) < 1).all() and (ssim(images, shifted) > ssim(images, -images)).all()


def tiny_tokenizer() -> VQModel:
    torch.manual_seed(0)
    config = VQModelConfig(channels=32, channel_mult=[1, 2, 2, 2], num_res_blocks=1, attn_resolutions=[],
                           resolution=32, z_channels=16, quantizer=QuantizerConfig(codebook_size=64))
    return VQModel(config).eval()  # downsampling 8: a 4x4 code grid for 32x32 images


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return tiny_tokenizer().save_pretrained(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    tiny_tokenizer().save_pretrained(root / "tokenizer")
    torch.manual_seed(1)
    prior = GPT(GPTConfig(codebook_size=64, grid_size=[4, 4], num_classes=10, n_layer=1, n_head=2, dim=32, multiple_of=32))
    prior.save_pretrained(root / "prior", extra={"classes": [str(d) for d in range(10)]})
    return root


@pytest.fixture(scope="module")
def classifier_path(tmp_path_factory):
    # an untrained classifier stored under the default recipe: tests the plumbing, not the accuracy
    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("clf") / "mnist.safetensors"
    return save_classifier(path, TrainedClassifier(MnistClassifier().eval(), 0.25), steps=DEFAULT_STEPS, seed=0)


def test_eval_tokenizer_reports_every_metric(tokenizer_dir, tmp_path):
    report = eval_tokenizer(tokenizer_dir, "builtin:mnist", fid_weights="random", lpips="random", num_images=24,
                            batch_size=8, device="cpu", progress=False, out=tmp_path / "out")
    data = json.loads(json.dumps(report.to_dict()))
    assert tuple(data) == TOKENIZER_KEYS
    assert data["num_images"] == 24 and data["grid"] == [4, 4] and data["codebook_size"] == 64
    assert data["fid_features"] == "random-conv-seed0"
    # an untrained tokenizer reconstructs badly: a clearly positive rFID
    assert data["rfid"] > 0.01 and math.isfinite(data["rfid"])
    for key in ("psnr", "ssim", "lpips", "codebook_usage", "perplexity"):
        assert isinstance(data[key], float) and math.isfinite(data[key]), key
    assert 0 < data["codebook_usage"] <= 1 and 1 <= data["perplexity"] <= 64
    assert len(list((tmp_path / "out" / "images").iterdir())) == 24
    skipped = eval_tokenizer(tokenizer_dir, "builtin:mnist", fid_weights="none", lpips="none", num_images=8,
                             device="cpu", progress=False)
    assert skipped.rfid is None and skipped.fid_features is None and skipped.lpips is None
    assert tuple(skipped.to_dict()) == TOKENIZER_KEYS


def test_fid_stats_writes_reusable_reference(tmp_path):
    report = fid_stats("builtin:mnist", tmp_path / "ref.npz", fid_weights="random", split="eval", num_images=40,
                       batch_size=16, keep_features=30, device="cpu", progress=False)
    assert tuple(report.to_dict()) == STATS_KEYS
    assert (report.num_images, report.feature_dim, report.num_features_kept) == (40, 112, 30)
    stats = load_stats(tmp_path / "ref.npz")
    assert stats.num_images == 40 and stats.source == "builtin:mnist" and stats.split == "eval"
    assert stats.feature_network == report.fid_features == "random-conv-seed0"
    again = load_stats(fid_stats("builtin:mnist", tmp_path / "again.npz", fid_weights="random", split="eval",
                                 num_images=40, device="cpu", progress=False).path)
    np.testing.assert_allclose(again.mu, stats.mu, rtol=1e-6, atol=1e-7)  # deterministic images and network


def test_eval_prior_end_to_end(pipeline_dir, classifier_path, tmp_path):
    common = dict(num_samples=20, batch_size=10, fid_weights="random", reference_split="eval", seed=3,
                  classifier_path=classifier_path, device="cpu", progress=False)
    report = eval_prior(pipeline_dir, "builtin:mnist", **common)
    data = json.loads(json.dumps(report.to_dict()))
    assert tuple(data) == PRIOR_KEYS
    assert data["num_samples"] == 20 and data["num_reference"] == 500 and data["resolution"] == 32
    assert data["fid"] > 0.01 and data["inception_score"] >= 1.0
    assert 0 <= data["precision"] <= 1 and 0 <= data["recall"] <= 1
    assert data["class_accuracy"] is not None and 0 <= data["class_accuracy"] <= 1
    assert data["classifier_heldout_accuracy"] == 0.25
    # the same reference as a stats file gives the same figures (same seeds, same samples)
    fid_stats("builtin:mnist", tmp_path / "ref.npz", fid_weights="random", split="eval", device="cpu", progress=False)
    from_file = eval_prior(pipeline_dir, str(tmp_path / "ref.npz"), **common)
    assert from_file.fid == pytest.approx(report.fid, rel=1e-5)
    assert (from_file.precision, from_file.recall, from_file.class_accuracy) == \
        (report.precision, report.recall, report.class_accuracy)


def test_eval_prior_refuses_a_reference_of_another_network_before_sampling(pipeline_dir, tmp_path, monkeypatch):
    fid_stats("builtin:mnist", tmp_path / "ref.npz", fid_weights="random:1", split="eval", num_images=16,
              device="cpu", progress=False)

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before checking the reference")

    monkeypatch.setattr(VQGPTPipeline, "generate", no_sampling)
    with pytest.raises(ValueError, match="random-conv-seed1.*random-conv-seed0"):
        eval_prior(pipeline_dir, str(tmp_path / "ref.npz"), num_samples=4, fid_weights="random", device="cpu",
                   progress=False)
    with pytest.raises(FileNotFoundError, match="nothere.npz"):
        eval_prior(pipeline_dir, str(tmp_path / "nothere.npz"), num_samples=4, fid_weights="random", device="cpu",
                   progress=False)


def test_sample_class_accuracy(pipeline_dir, classifier_path):
    pipe = VQGPTPipeline.from_pretrained(pipeline_dir)
    report = sample_class_accuracy(pipe, num_per_class=2, seed=0, batch_size=8, classifier_path=classifier_path)
    assert report.num_samples == 20 and len(report.per_class) == 10
    assert report.class_accuracy == pytest.approx(sum(report.per_class) / 10)
    assert all(a in (0.0, 0.5, 1.0) for a in report.per_class)
    assert report.classifier_heldout_accuracy == 0.25
    again = sample_class_accuracy(pipe, num_per_class=2, seed=0, batch_size=8, classifier_path=classifier_path)
    assert again.per_class == report.per_class  # seeded sampling


def test_unconditional_prior_has_no_class_accuracy(tmp_path):
    tiny_tokenizer().save_pretrained(tmp_path / "pipe" / "tokenizer")
    torch.manual_seed(3)
    GPT(GPTConfig(codebook_size=64, grid_size=[4, 4], num_classes=0, n_layer=1, n_head=2, dim=32,
                  multiple_of=32)).save_pretrained(tmp_path / "pipe" / "prior")
    report = eval_prior(tmp_path / "pipe", "builtin:mnist", num_samples=8, batch_size=8, fid_weights="random",
                        reference_split="eval", device="cpu", progress=False)
    assert report.class_accuracy is None and report.classifier_heldout_accuracy is None
    assert report.fid > 0 and report.precision is not None
    with pytest.raises(ValueError, match="10 MNIST digit classes"):
        sample_class_accuracy(VQGPTPipeline.from_pretrained(tmp_path / "pipe"), num_per_class=1)
