"""Evaluation of a tokenizer (PSNR, SSIM, LPIPS, rFID, codebook use) and of a prior (FID, IS, precision/recall, class accuracy).

Every evaluation returns a dataclass whose field list *is* the JSON schema (``TOKENIZER_KEYS``,
``PRIOR_KEYS``, ``STATS_KEYS``); ``to_dict()`` gives the one JSON object the CLI prints.

FID figures are comparable to published ones only with the standard Inception weights
(``fid_weights=None`` downloads them; a local path works offline). ``fid_weights="random"`` uses a
random-weight network: useful to compare runs with each other on a machine without the weights,
never to compare with papers. The network used is reported as ``fid_features``.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset
from tqdm.auto import tqdm

from stage2_prior.draw import SamplingConfig
from vqgpt.workflow.classifier import MNIST_SOURCE, NUM_DIGITS, load_or_train_mnist_classifier, predict
from vqgpt.ground.data import DataConfig, build_dataset, readable_batches
from vqgpt.ground.fid import (
    PR_MAX_FEATURES,
    PR_NEIGHBORHOOD,
    UNKNOWN_NETWORK,
    FeatureExtractor,
    FeatureNetworkUnavailable,
    FeatureStats,
    compute_stats,
    extract_features,
    frechet_distance,
    inception_score,
    load_feature_extractor,
    load_stats,
    precision_recall,
    save_stats,
)


class _Report:
    def to_dict(self) -> dict[str, Any]:
        """The JSON object: keys in field order, None -> null."""
        return asdict(self)  # type: ignore[call-overload]


@dataclass
class TokenizerReport(_Report):
    """``vqgpt eval-tokenizer``: reconstruction quality on the eval split of ``images``."""

    tokenizer: str
    images: str
    num_images: int
    resolution: int
    grid: list[int]
    codebook_size: int
    psnr: float
    ssim: float
    lpips: float | None          # None when no LPIPS network could be loaded
    rfid: float | None           # FID(originals, reconstructions); None without a feature network
    codebook_usage: float        # share of codes hit among num_tokens: undercounts when tokens are few
    num_tokens: int
    perplexity: float
    bits_per_image: float
    fid_features: str | None     # feature network behind rfid


@dataclass
class PriorReport(_Report):
    """``vqgpt eval-prior``: samples of a pipeline against reference images or statistics."""

    pipeline: str
    reference: str
    num_samples: int
    num_reference: int
    resolution: int
    cfg_scale: float
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int
    fid: float
    inception_score: float
    inception_score_std: float
    precision: float | None      # None when the reference stats file holds no features
    recall: float | None
    class_accuracy: float | None  # builtin:mnist with a 10-class prior only
    classifier_heldout_accuracy: float | None
    fid_features: str


@dataclass
class StatsReport(_Report):
    """``vqgpt fid-stats``: what was written."""

    path: str
    source: str
    split: str
    resolution: int
    num_images: int
    feature_dim: int
    num_features_kept: int
    fid_features: str


@dataclass
class ClassAccuracyReport(_Report):
    """Share of conditional samples that the MNIST classifier assigns to the requested digit."""

    class_accuracy: float
    per_class: list[float]       # accuracy for digit 0..9
    num_samples: int
    cfg_scale: float
    classifier_heldout_accuracy: float


TOKENIZER_KEYS = tuple(f.name for f in fields(TokenizerReport))
PRIOR_KEYS = tuple(f.name for f in fields(PriorReport))
STATS_KEYS = tuple(f.name for f in fields(StatsReport))


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


# ----------------------------------------------------------------------------------------- tokenizer


def eval_tokenizer(tokenizer_dir: str | Path, images: str, fid_weights: str | None = None, lpips: str = "vgg",
                   num_images: int | None = None, resolution: int | None = None, batch_size: int = 32,
                   out: str | Path | None = None, device: str | None = None, progress: bool = True) -> TokenizerReport:
    """PSNR / SSIM / LPIPS / rFID / codebook usage and perplexity over the eval split of ``images``.

    ``out``: also keep the reconstructions, grid and metrics.json there (else they are discarded).
    An unreachable default FID network (offline) gives ``rfid=None`` with a warning, like LPIPS.
    """
    from stage1_vq.evaluate import reconstruct

    dev = _device(device)
    extractor = _optional_extractor(fid_weights, dev)
    real, fake = [], []

    def collect(originals: torch.Tensor, reconstructions: torch.Tensor) -> None:
        real.append(extractor(originals).pool.cpu())
        fake.append(extractor(reconstructions).pool.cpu())

    with tempfile.TemporaryDirectory(prefix="vqgpt-eval-") as scratch:
        metrics = reconstruct(tokenizer_dir, images, out if out is not None else scratch, num_images=num_images,
                              resolution=resolution, batch_size=batch_size, lpips=lpips, save_images=out is not None,
                              device=str(dev), progress=progress, on_batch=collect if extractor is not None else None)
    rfid = None
    if extractor is not None:
        if sum(len(r) for r in real) < 2:
            warnings.warn("rFID needs at least 2 images; reporting rfid as null", stacklevel=2)
        else:
            rfid = frechet_distance(compute_stats(torch.cat(real), extractor.name, keep_features=0),
                                    compute_stats(torch.cat(fake), extractor.name, keep_features=0))
    metrics = {**metrics, "rfid": rfid, "fid_features": extractor.name if extractor is not None else None}
    if set(metrics) != set(TOKENIZER_KEYS):  # reconstruct() changed its keys: keep the JSON schema honest
        extra, missing = sorted(set(metrics) - set(TOKENIZER_KEYS)), sorted(set(TOKENIZER_KEYS) - set(metrics))
        raise RuntimeError(f"reconstruct() metrics do not match TOKENIZER_KEYS: extra {extra}, missing {missing}")
    return TokenizerReport(**{k: metrics[k] for k in TOKENIZER_KEYS})


def _optional_extractor(fid_weights: str | None, device: torch.device) -> FeatureExtractor | None:
    """The feature network, or None (with a warning) when the default one cannot be downloaded."""
    if fid_weights == "none":
        return None
    try:
        return load_feature_extractor(fid_weights, device)
    except FeatureNetworkUnavailable as exc:
        warnings.warn(f"{exc}; reporting rfid as null", stacklevel=3)
        return None


# ----------------------------------------------------------------------------------------- reference statistics


def reference_stats(extractor: FeatureExtractor, source: str, resolution: int, split: str = "train",
                    num_images: int | None = None, batch_size: int = 64, keep_features: int = PR_MAX_FEATURES,
                    progress: bool = True) -> FeatureStats:
    """Feature statistics of the images of ``source`` (deterministic crops, no flips) at ``resolution``."""
    dataset = build_dataset(DataConfig(source=source, resolution=resolution, random_crop=False, hflip=False), split)
    if num_images is not None:
        dataset = Subset(dataset, range(min(num_images, len(dataset))))
    batches = readable_batches(dataset, batch_size)  # a file that fails to decode is left out, not replaced
    features = extract_features(extractor, (images for images, _ in batches), progress=progress,
                                desc=f"reference features ({source})", total=-(-len(dataset) // batch_size))
    return compute_stats(features.pool, extractor.name, keep_features=keep_features, source=source, split=split,
                         resolution=resolution)


def fid_stats(images: str, out: str | Path, fid_weights: str | None = None, resolution: int = 32,
              split: str = "train", num_images: int | None = None, batch_size: int = 64,
              keep_features: int = PR_MAX_FEATURES, device: str | None = None, progress: bool = True) -> StatsReport:
    """Compute reference statistics of ``images`` once and save them as ``.npz`` (mu, sigma, features) for eval-prior."""
    extractor = load_feature_extractor(fid_weights, _device(device))
    stats = reference_stats(extractor, images, resolution, split, num_images, batch_size, keep_features, progress)
    path = save_stats(stats, out)
    kept = 0 if stats.features is None else int(stats.features.shape[0])
    return StatsReport(str(path), images, split, resolution, stats.num_images, int(stats.mu.shape[0]), kept, extractor.name)


# ----------------------------------------------------------------------------------------- prior


def eval_prior(pipeline_dir: str | Path, reference: str, num_samples: int = 50_000, batch_size: int = 64,
               sampling: SamplingConfig | None = None, seed: int = 0, fid_weights: str | None = None,
               reference_split: str = "train",
               classifier_path: str | Path | None = None, device: str | None = None,
               progress: bool = True) -> PriorReport:
    """FID / IS / precision / recall of ``num_samples`` samples vs ``reference`` (an image source or a stats .npz).

    A conditional prior is sampled with class labels 0, 1, ..., K-1, 0, 1, ... (balanced). For
    builtin:mnist references and a 10-class prior, also the class accuracy of the samples.
    Everything that can fail (weights, reference, classifier) is loaded before sampling starts.
    Batch i is drawn with seed ``seed + i``.
    """
    from vqgpt.workflow.pipeline import VQGPTPipeline

    sampling = sampling or SamplingConfig()

    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 for FID, got {num_samples}")
    reference = str(reference)
    dev = _device(device)
    pipe = VQGPTPipeline.from_pretrained(pipeline_dir).to(dev)
    extractor = load_feature_extractor(fid_weights, dev)
    height, width = pipe.tokenizer.image_shape(*pipe.prior.config.grid_size)  # rvq: D codes per position in a row
    if height != width:
        warnings.warn(f"samples are {height}x{width}; reference images are square crops at {height}", stacklevel=2)

    ref = _reference(extractor, reference, height, reference_split, batch_size, progress)
    num_classes = pipe.prior.config.num_classes
    digits = _digit_of_class(pipe.classes, num_classes) if ref.source == MNIST_SOURCE else None
    classifier = heldout = None
    if digits is not None:
        classifier, heldout = load_or_train_mnist_classifier(classifier_path, progress=progress)
        classifier = classifier.to(dev)

    labels = torch.arange(num_samples) % num_classes if num_classes else None
    pools, logits, correct = [], [], []
    starts = range(0, num_samples, batch_size)
    for i, start in enumerate(tqdm(starts, desc="sampling", disable=not progress)):
        batch_labels = labels[start:start + batch_size] if labels is not None else None
        images = pipe.generate(min(batch_size, num_samples - start), class_labels=batch_labels, sampling=sampling,
                               seed=seed + i)  # (B, 3, H, W)
        out = extractor(images)
        pools.append(out.pool.cpu())
        logits.append(out.logits.cpu())
        if classifier is not None:
            correct.append(predict(classifier, images) == digits[batch_labels])

    pool = torch.cat(pools)
    fid = frechet_distance(ref, compute_stats(pool, extractor.name, keep_features=0))
    score = inception_score(torch.cat(logits))
    pr = None
    if ref.features is None or min(len(ref.features), len(pool)) <= PR_NEIGHBORHOOD:
        warnings.warn(f"precision/recall need more than {PR_NEIGHBORHOOD} reference features (in {reference}) and "
                      "samples; reported as null", stacklevel=2)
    else:
        pr = precision_recall(ref.features, pool)
    return PriorReport(
        pipeline=str(pipeline_dir), reference=str(reference), num_samples=num_samples, num_reference=ref.num_images,
        resolution=height, cfg_scale=sampling.cfg_scale, temperature=sampling.temperature, top_k=sampling.top_k,
        top_p=sampling.top_p, seed=seed,
        fid=fid, inception_score=score.mean, inception_score_std=score.std,
        precision=pr.precision if pr else None, recall=pr.recall if pr else None,
        class_accuracy=float(torch.cat(correct).double().mean()) if correct else None,
        classifier_heldout_accuracy=heldout, fid_features=extractor.name)


def _reference(extractor: FeatureExtractor, reference: str, resolution: int, split: str, batch_size: int,
               progress: bool) -> FeatureStats:
    """Load a stats .npz (checked against the feature network) or compute stats of an image source."""
    if not reference.endswith(".npz"):
        return reference_stats(extractor, reference, resolution, split, batch_size=batch_size, progress=progress)
    ref = load_stats(reference)
    if ref.feature_network not in (extractor.name, UNKNOWN_NETWORK):
        raise ValueError(f"{reference} was computed with feature network {ref.feature_network!r} but this evaluation "
                         f"uses {extractor.name!r}; recompute it with `vqgpt fid-stats` and the same --fid-weights")
    dim = extractor(torch.zeros(2, 3, resolution, resolution)).pool.shape[1]  # fail now, not after sampling
    if ref.mu.shape[0] != dim:
        raise ValueError(f"{reference} holds {ref.mu.shape[0]}-d statistics but {extractor.name} gives {dim}-d features")
    if ref.resolution and ref.resolution != resolution:
        warnings.warn(f"{reference} was computed at resolution {ref.resolution}, the samples are {resolution}: "
                      "the FID then also measures the resizing", stacklevel=3)
    return ref


def _digit_of_class(classes: list[str], num_classes: int) -> torch.Tensor | None:
    """Digit (0-9) of each prior class for a 10-class MNIST prior, else None."""
    if num_classes != NUM_DIGITS:
        return None
    names = list(classes) or [str(d) for d in range(NUM_DIGITS)]
    if sorted(names) != [str(d) for d in range(NUM_DIGITS)]:
        return None
    return torch.tensor([int(n) for n in names])


def sample_class_accuracy(pipeline: Any, num_per_class: int = 10, sampling: SamplingConfig | None = None,
                          seed: int = 0, batch_size: int = 100, classifier_path: str | Path | None = None,
                          progress: bool = False) -> ClassAccuracyReport:
    """Sample ``num_per_class`` images of each digit from a 10-class MNIST pipeline and score them with the classifier."""
    sampling = sampling or SamplingConfig()
    digits = _digit_of_class(pipeline.classes, pipeline.prior.config.num_classes)
    if digits is None:
        raise ValueError(f"class accuracy needs a prior with the 10 MNIST digit classes, got "
                         f"num_classes={pipeline.prior.config.num_classes}, classes={pipeline.classes}")
    if num_per_class < 1:
        raise ValueError(f"num_per_class must be >= 1, got {num_per_class}")
    classifier, heldout = load_or_train_mnist_classifier(classifier_path, progress=progress)
    classifier = classifier.to(pipeline.device)
    labels = torch.arange(NUM_DIGITS).repeat_interleave(num_per_class)
    correct = []
    for i, start in enumerate(range(0, len(labels), batch_size)):
        batch_labels = labels[start:start + batch_size]
        images = pipeline.generate(len(batch_labels), class_labels=batch_labels, sampling=sampling, seed=seed + i)
        correct.append(predict(classifier, images) == digits[batch_labels])
    hits, asked = torch.cat(correct).double(), digits[labels]
    per_class = [float(hits[asked == d].mean()) for d in range(NUM_DIGITS)]
    return ClassAccuracyReport(float(hits.mean()), per_class, len(labels), sampling.cfg_scale, heldout)
