"""Tokenizer / prior evaluation end to end on tiny random models (offline: random-weight FID features)."""

import json
import math
from typing import Callable

import numpy as np
import pytest
import torch
from baselines import eval_images, label_ignoring_accuracy, mean_image_scores

import vqgpt.workflow.evaluation as evaluation
import vqgpt.workflow.sample_many as sample_many_module
from stage1_vq import QuantizerConfig, VQModel, VQModelConfig
from stage1_vq.evaluate import load_lpips
from stage2_prior import GPT, GPTConfig, SamplingConfig
from vqgpt.workflow.classifier import (
    DEFAULT_STEPS,
    MnistClassifier,
    TrainedClassifier,
    load_classifier,
    predict,
    save_classifier,
)
from vqgpt.workflow.evaluation import (
    PRIOR_KEYS,
    STATS_KEYS,
    TOKENIZER_KEYS,
    eval_prior,
    eval_tokenizer,
    fid_stats,
    sample_class_accuracy,
)
from vqgpt.ground.fid import (
    compute_stats,
    frechet_distance,
    inception_score,
    load_feature_extractor,
    load_stats,
    precision_recall,
)
from vqgpt.ground.metrics import psnr, ssim
from vqgpt.workflow.pipeline import VQGPTPipeline
from vqgpt.workflow.sample_many import draw_images

# The JSON schemas, pinned: changing a key is a breaking change for users' scripts.
EXPECTED_TOKENIZER_KEYS = ("tokenizer", "images", "num_images", "resolution", "grid", "codebook_size", "psnr",
                           "psnr_by_depth", "ssim", "lpips", "rfid", "codebook_usage", "num_tokens", "perplexity",
                           "bits_per_image", "fid_features")
EXPECTED_PRIOR_KEYS = ("pipeline", "reference", "num_samples", "num_reference", "resolution", "cfg_scale",
                       "cfg_schedule", "temperature", "top_k", "top_p", "seed", "prior_dtype", "compile", "fid",
                       "sfid", "inception_score", "inception_score_std", "precision", "recall", "class_accuracy",
                       "classifier_heldout_accuracy", "fid_features")
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


def test_ssim_is_the_standard_definition_as_skimage_computes_it():
    """Wang et al.'s SSIM over the valid windows only (skimage's Gaussian form): a padded border would add
    windows of mirrored pixels and move the figure on small images."""
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(1)
    smooth = torch.nn.functional.interpolate(torch.rand(4, 3, 6, 5, generator=g), size=(32, 24), mode="bilinear")
    images = smooth * 2 - 1
    for noisy in (images + 0.08 * torch.randn(images.shape, generator=g),   # noise, partly clamped
                  images.flip(-1), images * 0.5 + 0.2):                       # structure moved, contrast and mean
        got = ssim(images, noisy)
        for k in range(len(images)):
            a, b = ((t[k].clamp(-1, 1).double().numpy() + 1) / 2 for t in (images, noisy))
            want = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                         data_range=1.0, channel_axis=0)
            assert got[k].item() == pytest.approx(want, abs=1e-6)


def test_random_lpips_is_one_fixed_network():
    """`--lpips random` gives the same figure in every run and leaves the caller's RNG alone."""
    g = torch.Generator().manual_seed(0)
    x, y = (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1 for _ in range(2))
    torch.manual_seed(5)
    first = load_lpips("random", torch.device("cpu"))
    drawn = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), drawn)  # building the network drew nothing from the global RNG
    torch.manual_seed(6)
    second = load_lpips("random", torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(first(x, y), second(x, y), rtol=0, atol=0)


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
    assert data["num_tokens"] == 24 * 4 * 4 and data["bits_per_image"] == 16 * 6

    # every figure equals the same metric computed directly on the same 24 held-out digits
    images = eval_images("builtin:mnist", 32, 24)
    model = VQModel.from_pretrained(tokenizer_dir)
    with torch.no_grad():
        codes = model.encode(images)
        recon = model.decode(codes).clamp(-1, 1)
        lpips_net = load_lpips("random", torch.device("cpu"))
        lpips_value = float(lpips_net(images, recon).mean())
    assert data["psnr"] == pytest.approx(float(psnr(images, recon).mean()), rel=1e-5)
    assert data["ssim"] == pytest.approx(float(ssim(images, recon).mean()), rel=1e-5)
    assert data["lpips"] == pytest.approx(lpips_value, rel=1e-4)
    counts = torch.bincount(codes.flatten(), minlength=64).double()
    assert data["codebook_usage"] == pytest.approx(float((counts > 0).double().mean()))
    p = counts[counts > 0] / counts.sum()
    assert data["perplexity"] == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-9)
    extractor = load_feature_extractor("random")
    rfid = frechet_distance(compute_stats(extractor(images).pool, extractor.name, keep_features=0),
                            compute_stats(extractor(recon).pool, extractor.name, keep_features=0))
    assert data["rfid"] == pytest.approx(rfid, rel=1e-4)
    # an untrained tokenizer: its reconstructions are worse than outputting the mean digit every time
    assert data["psnr"] < mean_image_scores(images).psnr
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
    assert data["classifier_heldout_accuracy"] == 0.25

    # the figures equal a direct computation on the same samples: labels 0..9 twice, sample i from its own seed
    pipe = VQGPTPipeline.from_pretrained(pipeline_dir)
    labels = torch.arange(20) % 10
    samples = torch.cat([draw_images(pipe, list(range(i, i + 10)), labels[i:i + 10], pipe.grid_for_pixels(None, None),
                                     SamplingConfig(), 3) for i in (0, 10)])
    extractor = load_feature_extractor("random")
    real = extractor(eval_images("builtin:mnist", 32))
    reference = real.pool
    fake = extractor(samples)
    real_stats = compute_stats(reference, extractor.name, spatial=real.spatial)
    fake_stats = compute_stats(fake.pool, extractor.name, spatial=fake.spatial)
    assert data["fid"] == pytest.approx(frechet_distance(real_stats, fake_stats), rel=1e-4)
    assert data["sfid"] == pytest.approx(frechet_distance(real_stats.spatial(), fake_stats.spatial()), rel=1e-4)
    score = inception_score(fake.logits)
    assert (data["inception_score"], data["inception_score_std"]) == pytest.approx((score.mean, score.std), rel=1e-4)
    pr = precision_recall(reference, fake.pool)
    assert (data["precision"], data["recall"]) == pytest.approx((pr.precision, pr.recall))
    classifier = load_classifier(classifier_path).model
    assert data["class_accuracy"] == pytest.approx(float((predict(classifier, samples) == labels).double().mean()))

    # the same reference as a stats file gives the same figures (same seeds, same samples)
    fid_stats("builtin:mnist", tmp_path / "ref.npz", fid_weights="random", split="eval", device="cpu", progress=False)
    from_file = eval_prior(pipeline_dir, str(tmp_path / "ref.npz"), **common)
    assert from_file.fid == pytest.approx(report.fid, rel=1e-5)
    assert from_file.sfid == pytest.approx(report.sfid, rel=1e-5)
    assert (from_file.precision, from_file.recall, from_file.class_accuracy) == \
        (report.precision, report.recall, report.class_accuracy)


# ----------------------------------------------------------------------------- known answers with stand-ins

# The class names of a 10-class prior in an order other than 0..9: class index i is digit CLASS_DIGITS[i].
CLASS_DIGITS = [3, 1, 4, 0, 5, 9, 2, 6, 8, 7]


class DigitOracle(torch.nn.Module):
    """A 'classifier' that knows the digit of every builtin:mnist eval image (and nothing else)."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # predict() asks for a parameter's device
        self.images = eval_images("builtin:mnist", 32).flatten(1)              # (500, 3*32*32)
        self.digits = torch.arange(10).repeat_interleave(50)                     # eval split: 50 per digit, in order

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        match = (images.flatten(1)[:, None] == self.images[None]).all(-1)     # (B, 500)
        assert bool(match.any(1).all()), "the oracle only knows the eval digits"
        return torch.nn.functional.one_hot(self.digits[match.float().argmax(1)], 10).float()  # (B, 10) logits


def stand_in_generator(digit_of: Callable[[int, int], int]):
    """A VQGPTPipeline.generate stand-in that returns real eval digits: sample n (counted over all
    calls) asked for class index c is the next unused eval image of digit ``digit_of(c, n)``."""
    used = [0] * 10
    calls = [0]

    def generate(self, num_samples, class_labels=None, **kwargs):
        images = eval_images("builtin:mnist", 32)
        out = []
        for label in torch.as_tensor(class_labels).tolist():
            digit = digit_of(label, calls[0])
            out.append(images[digit * 50 + used[digit] % 50])
            used[digit] += 1
            calls[0] += 1
        return torch.stack(out)
    return generate


@pytest.fixture(scope="module")
def shuffled_pipeline_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shuffled")
    tiny_tokenizer().save_pretrained(root / "tokenizer")
    prior = GPT(GPTConfig(codebook_size=64, grid_size=[4, 4], num_classes=10, n_layer=1, n_head=2, dim=32,
                          multiple_of=32))
    prior.save_pretrained(root / "prior", extra={"classes": [str(d) for d in CLASS_DIGITS]})
    return root


@pytest.mark.parametrize("kind", ["faithful", "wrong digit", "label-ignoring", "only zeros"])
def test_eval_prior_known_answers(shuffled_pipeline_dir, monkeypatch, kind):
    """Samples that are the reference digits themselves: FID 0, precision = recall = 1; the class
    accuracy is 1 when each sample is the digit asked for, 0 when it is another digit, and what a
    label-ignoring prior scores (here exactly 1/10) when labels are ignored. Samples that are only
    the reference's zeros: precise (every sample is a real digit) but with a low recall."""
    digit_of = {"faithful": lambda label, n: CLASS_DIGITS[label],
                "wrong digit": lambda label, n: (CLASS_DIGITS[label] + 1) % 10,
                "label-ignoring": lambda label, n: n // 50,       # the eval digits in their stored order
                "only zeros": lambda label, n: 0}[kind]
    stand_in = stand_in_generator(digit_of)
    monkeypatch.setattr(sample_many_module, "draw_images",
                        lambda pipe, index, labels, *args: stand_in(pipe, len(index), class_labels=labels))
    monkeypatch.setattr(evaluation, "load_or_train_mnist_classifier", lambda *a, **k: (DigitOracle(), 0.99))
    report = eval_prior(shuffled_pipeline_dir, "builtin:mnist", num_samples=500, batch_size=100, fid_weights="random",
                        reference_split="eval", device="cpu", progress=False)
    assert report.classifier_heldout_accuracy == 0.99
    asked = torch.tensor(CLASS_DIGITS)[torch.arange(500) % 10]
    if kind == "only zeros":
        # FID far from the ~0 of the identical set below; every sample is a real digit, few digits are covered
        assert report.fid > 0.1 and report.precision == 1.0 and report.recall < 0.5, report
        assert report.class_accuracy == pytest.approx(0.1)  # the zeros asked for
        return
    # the other three draw each eval digit exactly once: the sample set is the reference set
    assert report.fid == pytest.approx(0.0, abs=1e-6)
    assert report.precision == 1.0 and report.recall == 1.0
    expected = {"faithful": 1.0, "wrong digit": 0.0,
                "label-ignoring": float((asked == torch.arange(500) // 50).double().mean())}[kind]
    assert report.class_accuracy == pytest.approx(expected)
    if kind == "label-ignoring":
        assert report.class_accuracy == pytest.approx(label_ignoring_accuracy(10))  # balanced labels: exactly 1/10


def test_sample_class_accuracy_known_answers(shuffled_pipeline_dir, monkeypatch):
    monkeypatch.setattr(evaluation, "load_or_train_mnist_classifier", lambda *a, **k: (DigitOracle(), 0.99))
    pipe = VQGPTPipeline.from_pretrained(shuffled_pipeline_dir)
    monkeypatch.setattr(VQGPTPipeline, "generate", stand_in_generator(lambda label, n: CLASS_DIGITS[label]))
    right = sample_class_accuracy(pipe, num_per_class=3, batch_size=7)
    assert right.class_accuracy == 1.0 and right.per_class == [1.0] * 10 and right.num_samples == 30
    # per_class is indexed by digit: digit 4 (class index 2) always drawn as a 9, the rest right
    monkeypatch.setattr(VQGPTPipeline, "generate",
                        stand_in_generator(lambda label, n: 9 if CLASS_DIGITS[label] == 4 else CLASS_DIGITS[label]))
    one_wrong = sample_class_accuracy(pipe, num_per_class=3, batch_size=7)
    assert one_wrong.per_class == [1.0] * 4 + [0.0] + [1.0] * 5 and one_wrong.class_accuracy == pytest.approx(0.9)


def test_eval_prior_refuses_a_reference_of_another_network_before_sampling(pipeline_dir, tmp_path, monkeypatch):
    fid_stats("builtin:mnist", tmp_path / "ref.npz", fid_weights="random:1", split="eval", num_images=16,
              device="cpu", progress=False)

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before checking the reference")

    monkeypatch.setattr(sample_many_module, "draw_images", no_sampling)
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
