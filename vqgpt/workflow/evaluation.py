"""Evaluation of a tokenizer (PSNR, SSIM, LPIPS, rFID, codebook use) and of a prior (FID, IS, precision/recall, class accuracy).

Every evaluation returns a dataclass whose field list *is* the JSON schema (``TOKENIZER_KEYS``,
``PRIOR_KEYS``, ``STATS_KEYS``); ``to_dict()`` gives the one JSON object the CLI prints.

FID figures are comparable to published ones only with the standard Inception weights
(``fid_weights=None`` downloads them; a local path works offline). ``fid_weights="random"`` uses a
random-weight network: useful to compare runs with each other on a machine without the weights,
never to compare with papers. The network used is reported as ``fid_features``.

``eval_prior`` runs on every process ``accelerate launch`` started: each draws and scores its
share of the samples, and each round of batches is gathered and summed in sample order, so the report
does not depend on the process count. ``eval_bits_per_dim``, ``eval_tokenizer`` (``reconstruct``) and
``fid_stats`` split the batches of their images the same way (``readable_rounds``): the one-process
report, bit for bit. Features are summed as they come (``FeatureAccumulator``):
memory does not grow with the number of samples or reference images. A
reference in the ADM evaluator's layout (``arr_0`` images, ``mu`` / ``sigma``, ``mu_s`` /
``sigma_s``) is read as that evaluator reads it: see ``eval_prior``.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from stage2_prior.draw import SamplingConfig, check_sampling_args, code_groups
from vqgpt.workflow.classifier import MNIST_SOURCE, NUM_DIGITS, load_or_train_mnist_classifier, predict
from vqgpt.ground.checkpoint import usable_device
from vqgpt.ground.data import DataConfig, build_dataset, check_source_package, readable_batches
from vqgpt.ground.files import write_json_whole
from vqgpt.training.config import launched_process_state
from vqgpt.training.shares import (ONE_PROCESS, gather_in_order, on_main_process, process_device, readable_rounds,
                                  rounds_total, said_once)
from vqgpt.ground.fid import (
    PR_MAX_FEATURES,
    PR_NEIGHBORHOOD,
    UNKNOWN_NETWORK,
    FeatureAccumulator,
    FeatureExtractor,
    FeatureNetworkUnavailable,
    Features,
    FeatureStats,
    check_finite,
    check_stats_path,
    compute_stats,  # noqa: F401  (whole-array forms, kept importable from here; the evaluations stream)
    extract_features,  # noqa: F401
    frechet_distance,
    inception_score,  # noqa: F401
    load_feature_extractor,
    load_stats,
    npz_image_batches,
    precision_recall,
    read_gaussians,
    save_stats,
    stream_stats,
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
    psnr_by_depth: list[float] | None  # residual VQ: PSNR from the first 1, 2, ..., D codes per position; else None
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
    num_reference: int | None    # None when the reference statistics do not say how many images they summarise
    resolution: int
    cfg_scale: float
    cfg_schedule: str
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int
    prior_dtype: str             # how the prior decoded: float32, bfloat16 or int8 (other draws than float32's)
    compile: bool                # whether its decode step ran under torch.compile (bf16: other draws than eager)
    fid: float
    sfid: float | None           # spatial FID (ADM's sFID); None when the reference has no spatial stats (mu_s)
    inception_score: float
    inception_score_std: float
    precision: float | None      # None when the reference holds no features or images (arr_0)
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
INCEPTION_SPLITS = 10  # the Inception Score's groups of samples, as the field (and torch-fidelity) takes it


def _device(device: str | torch.device | None) -> torch.device:
    # the loaders' and the CLI's check: a device this machine lacks is named, not torch's driver message
    return usable_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


# ----------------------------------------------------------------------------------------- tokenizer


def eval_tokenizer(tokenizer_dir: str | Path, images: str, fid_weights: str | None = None, lpips: str = "vgg",
                   num_images: int | None = None, resolution: int | None = None, batch_size: int = 32,
                   out: str | Path | None = None, device: str | None = None, progress: bool = True,
                   state: Any = None, data_options: dict[str, Any] | None = None) -> TokenizerReport:
    """PSNR / SSIM / LPIPS / rFID / codebook usage and perplexity over the eval split of ``images``.

    ``out``: also keep the reconstructions, grid and metrics.json there (else they are discarded).
    An unreachable default FID network (offline) gives ``rfid=None`` with a warning, like LPIPS.
    ``state`` (``launched_process_state``, as ``vqgpt eval-tokenizer`` passes under ``accelerate launch``): the
    batches are split over its processes (see ``reconstruct``), which must all call this; the rFID features are
    gathered and summed in image order, batch by batch as one process sums them: every process returns the
    one-process report, bit for bit. None: this process does every batch (a call from one process of many
    then waits for no other).
    """
    from stage1_vq.evaluate import BatchRows, reconstruct

    check_source_package(images)  # before the FID network loads (or fails to, offline, with a warning)
    state = state or ONE_PROCESS
    dev = process_device(_device(device), state)
    with said_once(state):
        extractor = _optional_extractor(fid_weights, dev)
    # summed as they come: the eval split may hold 50k images
    real, fake = FeatureAccumulator(keep_features=0, spatial=False), FeatureAccumulator(keep_features=0, spatial=False)
    features = None
    if extractor is not None:
        def take(rows: dict[str, torch.Tensor]) -> None:
            # (gathered on the CPU) back on the extractor's device, where they were summed before: the same sums
            real.update(Features(rows["real"].to(extractor.device), None, None))  # type: ignore[arg-type]
            fake.update(Features(rows["fake"].to(extractor.device), None, None))  # type: ignore[arg-type]

        def blank(height: int, width: int) -> dict[str, torch.Tensor]:
            pool = _blank_rows(extractor, height, width)["pool"]
            return {"real": pool, "fake": pool}

        features = BatchRows(lambda originals, reconstructions: {"real": extractor(originals).pool,
                                                                 "fake": extractor(reconstructions).pool}, take, blank)

    with tempfile.TemporaryDirectory(prefix="vqgpt-eval-") as scratch:
        metrics = reconstruct(tokenizer_dir, images, out if out is not None else scratch, num_images=num_images,
                              resolution=resolution, batch_size=batch_size, lpips=lpips, save_images=out is not None,
                              device=str(dev), progress=progress, rows=features, state=state,
                              data_options=data_options)
    rfid = None
    if extractor is not None:
        with said_once(state):  # every process computes the same figure
            rfid = _rfid(real, fake, extractor.name)
    metrics = {"psnr_by_depth": None, **metrics, "rfid": rfid,  # (reconstruct gives psnr_by_depth for residual VQ)
               "fid_features": extractor.name if extractor is not None else None}
    if set(metrics) != set(TOKENIZER_KEYS):  # reconstruct() changed its keys: keep the JSON schema honest
        extra, missing = sorted(set(metrics) - set(TOKENIZER_KEYS)), sorted(set(TOKENIZER_KEYS) - set(metrics))
        raise RuntimeError(f"reconstruct() metrics do not match TOKENIZER_KEYS: extra {extra}, missing {missing}")
    report = TokenizerReport(**{k: metrics[k] for k in TOKENIZER_KEYS})
    if out is not None and state.is_main_process:  # reconstruct wrote OUT/metrics.json before rFID was known
        write_json_whole(Path(out) / "metrics.json", report.to_dict())
    return report


def _rfid(real: FeatureAccumulator, fake: FeatureAccumulator, network: str) -> float | None:
    if real.count < 2:
        warnings.warn("rFID needs at least 2 images; reporting rfid as null", stacklevel=3)
        return None
    real_stats, fake_stats = real.stats(network), fake.stats(network)
    for stats, which in ((real_stats, "images'"), (fake_stats, "reconstructions'")):
        if not (np.isfinite(stats.mu).all() and np.isfinite(stats.sigma).all()):
            # (a tokenizer whose outputs hold NaN or inf: its PSNR and SSIM are null too; it ended the evaluation)
            warnings.warn(f"rFID: the {which} features are not finite (NaN or inf in the images the feature "
                          "network read); reporting rfid as null", stacklevel=3)
            return None
    return frechet_distance(real_stats, fake_stats, name="rFID")


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
                    progress: bool = True, state: Any = None,
                    data_options: dict[str, Any] | None = None) -> FeatureStats:
    """Feature statistics of the images of ``source`` (deterministic crops, no flips) at ``resolution``.

    Summed a batch at a time (an ImageNet-train reference of 1.28M images would need ~50 GB as one
    array); the same statistics and the same precision/recall subset as ``compute_stats`` of all of them.
    ``state`` (``launched_process_state``) of several processes: each extracts the features of its share of
    the batches (``readable_rounds``); every round's rows are gathered and summed in image order, batch by
    batch as one process sums them, on every process: the same statistics, bit for bit, on each.
    None, or one process: this process does every batch.
    """
    dataset = build_dataset(DataConfig(source=source, resolution=resolution, random_crop=False, hflip=False,
                                       **(data_options or {})), split)
    wanted = len(dataset) if num_images is None else min(num_images, len(dataset))
    desc = f"reference features ({source})"
    if state is None or state.num_processes == 1:
        # a file that fails to decode is left out and the next readable one takes its place, up to num_images
        batches = readable_batches(dataset, batch_size, limit=num_images)
        accumulator = stream_stats(extractor, (images for images, _ in batches), wanted, keep_features,
                                   progress=progress, desc=desc, total=-(-wanted // batch_size))
        return accumulator.stats(extractor.name, source=source, split=split, resolution=resolution)
    accumulator = FeatureAccumulator(wanted, keep_features)
    blank = _blank_rows(extractor, resolution, resolution)
    rounds = readable_rounds(state, dataset, batch_size, limit=num_images)
    for round_ in tqdm(rounds, desc=desc, total=rounds_total(wanted, batch_size, state),
                       disable=not progress or not state.is_main_process):
        rows = extractor(round_.images)._asdict() if round_.images is not None else blank
        rows = gather_in_order(state, round_.image_index(), rows, start=round_.batches[0].start)
        at = 0
        for batch in round_.batches:
            # back on the extractor's device, where one process sums them: the same arithmetic
            accumulator.update(Features(**{key: t[at:at + len(batch)].to(extractor.device)
                                           for key, t in rows.items()}))
            at += len(batch)
    if accumulator.count == 0:
        raise ValueError("no images to extract features from")  # as stream_stats says it
    return accumulator.stats(extractor.name, source=source, split=split, resolution=resolution)


def fid_stats(images: str, out: str | Path, fid_weights: str | None = None, resolution: int = 32,
              split: str = "train", num_images: int | None = None, batch_size: int = 64,
              keep_features: int = PR_MAX_FEATURES, device: str | None = None, progress: bool = True,
              state: Any = None, data_options: dict[str, Any] | None = None) -> StatsReport:
    """Compute reference statistics of ``images`` once and save them as ``.npz`` (mu, sigma, features) for eval-prior.

    ``state`` of the processes of a launch (as for ``eval_tokenizer``; ``vqgpt fid-stats`` passes it): each
    extracts the features of its share of the batches; they are summed in image order (``reference_stats``),
    so the file holds the one-process statistics, bit for bit, and the first process alone writes it.
    """
    check_stats_path(out)  # a bad --out is said before the features are computed, not after
    state = state or ONE_PROCESS
    dev = process_device(_device(device), state)
    extractor = load_feature_extractor(fid_weights, dev)
    stats = reference_stats(extractor, images, resolution, split, num_images, batch_size, keep_features,
                            progress and state.is_main_process, state, data_options)
    path = on_main_process(state, lambda: save_stats(stats, out))
    kept = 0 if stats.features is None else int(stats.features.shape[0])
    return StatsReport(str(path), images, split, resolution, stats.num_images, int(stats.mu.shape[0]), kept, extractor.name)


# ----------------------------------------------------------------------------------------- prior


def _recorded_network(reference: str) -> str:
    """A hint naming the feature network a stats .npz ``reference`` was computed with, when it records one."""
    if not reference.lower().endswith(".npz"):
        return ""
    try:
        if _is_image_batch(reference):
            return ""
        network = load_stats(reference).feature_network
    except (OSError, ValueError, KeyError):
        return ""
    if network == UNKNOWN_NETWORK:
        return ""
    return f"; {reference} was computed with {network!r}: give the --fid-weights its `vqgpt fid-stats` had"


def eval_prior(pipeline_dir: str | Path, reference: str, num_samples: int = 50_000, batch_size: int = 64,
               sampling: SamplingConfig | None = None, seed: int = 0, fid_weights: str | None = None,
               reference_split: str = "train",
               classifier_path: str | Path | None = None, device: str | None = None,
               progress: bool = True, prior_dtype: str = "float32", compile: bool = False) -> PriorReport:
    """FID / sFID / IS / precision / recall of ``num_samples`` samples vs ``reference`` (an image source or a .npz).

    A conditional prior is sampled with class labels 0, 1, ..., K-1, 0, 1, ... (balanced); sample i
    is drawn from its own seed, as ``vqgpt sample --out FOLDER/`` draws it (``sample_many``), in
    batches of ``batch_size`` consecutive indices. Under ``accelerate launch`` batch c is drawn and
    scored by process c % N; after each round of N batches their features are gathered and summed in
    index order, batch by batch as one process sums them, and the first process computes the report,
    which every process returns: the figures do not depend on the process count.

    ``reference``: an image source; a stats .npz of ``vqgpt fid-stats``; or a reference batch of the
    ADM evaluator (``arr_0`` uint8 (N, H, W, 3) images, with or without ``mu``, ``sigma``, ``mu_s``,
    ``sigma_s``). As that evaluator does, the file's statistics are used where present (else they are
    computed from ``arr_0``, which then needs at least 2 images), and precision/recall compare the
    features of every reference image with those of every sample (k=3 manifolds; null with a warning
    for 3 images or fewer); its images are scored by all processes, before sampling. Half a pair of
    statistics (``mu`` without ``sigma``) and non-finite statistics are errors naming the file.
    For builtin:mnist references and a 10-class prior, also the class accuracy of the samples.
    Everything that can fail (weights, reference, classifier) is loaded before sampling starts.
    ``prior_dtype`` and ``compile``: how the prior decodes (``VQGPTPipeline.set_decoding``).
    """
    from vqgpt.workflow import sample_many
    from vqgpt.workflow.pipeline import VQGPTPipeline, sample_generators

    sampling = sampling or SamplingConfig()

    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 for FID, got {num_samples}")
    reference = str(reference)
    state = launched_process_state("each would draw and score every sample")
    dev = process_device(torch.device(device) if device else state.device, state)
    main = state.is_main_process
    pipe = VQGPTPipeline.from_pretrained(pipeline_dir).set_decoding(prior_dtype, compile).to(dev)
    # what the draw would refuse (guidance this prior cannot give, a seed out of range): before the reference
    check_sampling_args(pipe.prior, sampling)
    sample_generators(seed, [])
    try:
        extractor = load_feature_extractor(fid_weights, dev)
    except FeatureNetworkUnavailable as exc:
        raise FeatureNetworkUnavailable(f"{exc}{_recorded_network(reference)}") from None
    height, width = pipe.tokenizer.image_shape(*pipe.prior.config.grid_size)  # rvq: D codes per position in a row
    if height != width and main:
        warnings.warn(f"samples are {height}x{width}; reference images are square crops at {height}", stacklevel=2)

    image_batch = _is_image_batch(reference)
    ref = _reference(extractor, reference, height, reference_split, batch_size, progress and main, state)
    num_classes = pipe.prior.config.num_classes
    digits = _digit_of_class(pipe.classes, num_classes) if ref.source == MNIST_SOURCE else None
    classifier = heldout = None
    if digits is not None:
        classifier, heldout = load_or_train_mnist_classifier(classifier_path, progress=progress and main)
        classifier = classifier.to(dev)
    elif classifier_path is not None and main:  # (it was dropped without a word)
        warnings.warn(f"classifier {classifier_path} is not used: the class accuracy is scored only for a prior of "
                      f"digit classes against {MNIST_SOURCE}", stacklevel=2)

    labels = torch.arange(num_samples) % num_classes if num_classes else None
    grid = pipe.grid_for_pixels(None, None)
    # precision/recall see at most PR_MAX_FEATURES samples (seed 0), all of them against an ADM reference batch:
    # those rows are kept; of the rest only sums (FID, sFID, IS, class accuracy) stay
    summed = FeatureAccumulator(num_samples, None if image_batch else PR_MAX_FEATURES,
                                inception_splits=INCEPTION_SPLITS)
    hits = 0

    def score(batch: range) -> dict[str, torch.Tensor]:
        index = list(batch)
        batch_labels = labels[index] if labels is not None else None
        images = sample_many.draw_images(pipe, index, batch_labels, grid, sampling, seed)  # (B, 3, H, W)
        rows = extractor(images)._asdict()
        if classifier is not None:
            rows["correct"] = (predict(classifier, images) == digits[batch_labels]).to(torch.uint8)
        return rows

    def take(rows: dict[str, torch.Tensor]) -> None:
        nonlocal hits
        if not main:  # only the first process computes the report
            return
        summed.update(Features(*(rows[key] for key in Features._fields)))
        if classifier is not None:
            hits += int(rows["correct"].sum())

    blank = {**_blank_rows(extractor, height, width), **({"correct": torch.zeros(0, dtype=torch.uint8)}
                                                         if classifier is not None else {})}
    _score_in_rounds(state, sample_many.batch_ranges(num_samples, batch_size), score, take, blank,
                     desc="sampling", progress=progress and main)

    report = None
    if main:
        pool = summed.features()
        assert pool is not None
        samples = summed.stats(extractor.name)
        fid = frechet_distance(ref, samples)
        sfid = None
        if ref.spatial_mu is None:
            warnings.warn(f"sFID needs spatial statistics (mu_s, sigma_s) of the reference ({reference}); "
                          "reported as null", stacklevel=2)
        else:
            sfid = frechet_distance(ref.spatial(), samples.spatial(), name="sFID")
        inception = summed.inception_score()
        if num_samples < 2 * INCEPTION_SPLITS:
            warnings.warn(f"the Inception Score averages over {INCEPTION_SPLITS} groups of the samples; with "
                          f"{num_samples} samples some group holds fewer than 2, and a group of one scores 1.0 "
                          f"whatever the model: draw at least {2 * INCEPTION_SPLITS} (the field uses 50,000)",
                          stacklevel=2)
        pr = None
        if ref.features is None or min(len(ref.features), num_samples) <= PR_NEIGHBORHOOD:
            warnings.warn(f"precision/recall need more than {PR_NEIGHBORHOOD} reference features or images (in "
                          f"{reference}) and samples; reported as null", stacklevel=2)
        else:
            # pool is already the subset precision_recall would take of all samples (the same seeded rows)
            pr = precision_recall(ref.features, pool, max_features=None if image_batch else PR_MAX_FEATURES,
                                  device=dev)
        report = PriorReport(
            pipeline=str(pipeline_dir), reference=str(reference), num_samples=num_samples,
            num_reference=ref.num_images or None, resolution=height, cfg_scale=sampling.cfg_scale,
            cfg_schedule=sampling.cfg_schedule, temperature=sampling.temperature, top_k=sampling.top_k,
            top_p=sampling.top_p, seed=seed, prior_dtype=sample_many.decoding_dtype(pipe.prior),
            compile=pipe.compile_decode, fid=fid, sfid=sfid, inception_score=inception.mean,
            inception_score_std=inception.std,
            precision=pr.precision if pr else None, recall=pr.recall if pr else None,
            class_accuracy=hits / num_samples if classifier is not None else None,
            classifier_heldout_accuracy=heldout, fid_features=extractor.name)
    return _from_main_process(state, report)


def _blank_rows(extractor: FeatureExtractor, height: int, width: int) -> dict[str, torch.Tensor]:
    """Features (0, ...) by name: a process's share of a round in which it scores no batch."""
    empty = extractor(torch.zeros(1, 3, height, width))
    return {key: getattr(empty, key)[:0] for key in Features._fields}


def _score_in_rounds(state: Any, batches: list[range], score: Any, take: Any, blank: dict[str, torch.Tensor],
                     desc: str, progress: bool, items: Any = None) -> None:
    """Rows of every batch, handed to ``take`` batch by batch in index order on every process.

    Round r: batch r * N + p is scored by process p (``score(batch)`` -> rows by name), the round's
    rows are gathered, and ``take`` gets them cut back into batches: the batches one process would
    see, in its order, so running sums are the same, bit for bit, for any process count. Only a
    round's rows are held at a time. ``items``: an iterable read alongside ``batches`` (every
    process reads every item, scoring its own), passed to ``score`` as its second argument.
    """
    processes, rank = state.num_processes, state.process_index
    items = iter(items) if items is not None else None
    for first in tqdm(range(0, len(batches), processes), desc=desc, disable=not progress):
        round_batches = batches[first:first + processes]
        rows, index = blank, torch.zeros(0, dtype=torch.long)
        for p, batch in enumerate(round_batches):
            item = next(items) if items is not None else None
            if p == rank:
                rows = score(batch) if items is None else score(batch, item)
                index = torch.tensor(list(batch), dtype=torch.long)
        rows = gather_in_order(state, index, rows, start=round_batches[0].start)
        at = 0
        for batch in round_batches:
            take({key: t[at:at + len(batch)] for key, t in rows.items()})
            at += len(batch)


def _from_main_process(state: Any, report: PriorReport | None) -> PriorReport:
    """The first process's report, on every process."""
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        report = broadcast_object_list([report], from_process=0)[0]
    assert report is not None
    return report


def _is_image_batch(reference: str) -> bool:
    """A .npz that holds images under ``arr_0`` (an ADM evaluator reference batch)."""
    if not reference.lower().endswith(".npz") or not Path(reference).is_file():
        return False
    try:
        with np.load(reference, allow_pickle=False) as data:
            return "arr_0" in data.files
    except Exception:  # load_stats says what is wrong with the file
        return False


def _reference(extractor: FeatureExtractor, reference: str, resolution: int, split: str, batch_size: int,
               progress: bool, state: Any = None) -> FeatureStats:
    """Load a stats .npz (checked against the feature network), score an ADM reference batch, or an image source."""
    if not reference.lower().endswith(".npz"):
        return reference_stats(extractor, reference, resolution, split, batch_size=batch_size, progress=progress,
                               state=state)  # under a launch each process extracts its share
    probe = extractor(torch.zeros(2, 3, resolution, resolution))  # fail now, not after sampling
    dim, spatial_dim = probe.pool.shape[1], probe.spatial.shape[1]
    if _is_image_batch(reference):
        ref = _image_batch_stats(extractor, reference, resolution, batch_size, progress, state)
    else:
        ref = load_stats(reference)
        if ref.feature_network not in (extractor.name, UNKNOWN_NETWORK):
            raise ValueError(f"{reference} was computed with feature network {ref.feature_network!r} but this "
                             f"evaluation uses {extractor.name!r}; recompute it with `vqgpt fid-stats` and the same "
                             "--fid-weights")
    if ref.mu.shape[0] != dim:
        raise ValueError(f"{reference} holds {ref.mu.shape[0]}-d statistics but {extractor.name} gives {dim}-d features")
    if ref.spatial_mu is not None and ref.spatial_mu.shape[0] != spatial_dim:
        raise ValueError(f"{reference} holds {ref.spatial_mu.shape[0]}-d spatial statistics (mu_s) but "
                         f"{extractor.name} gives {spatial_dim}-d spatial features")
    if ref.resolution and ref.resolution != resolution:
        warnings.warn(f"{reference} was computed at resolution {ref.resolution}, the samples are {resolution}: "
                      "the FID then also measures the resizing", stacklevel=3)
    # (a stats file is checked as it is read) features gone NaN would give FID 0 or NaN after all the sampling
    return check_finite(ref, f"the reference {reference} (features by {extractor.name})")


def _image_batch_stats(extractor: FeatureExtractor, path: str, resolution: int, batch_size: int, progress: bool,
                       state: Any) -> FeatureStats:
    """An ADM reference batch -> its statistics: ``mu``/``sigma``, ``mu_s``/``sigma_s`` from the file where there,
    else from the features of ``arr_0``; every image's features kept for precision/recall.

    The images are scored like the samples: batch c by process c % N, gathered and summed in order.
    With the file's ``mu``/``sigma``, ``arr_0`` may hold fewer than 2 images (no precision/recall then).
    """
    state = state or launched_process_state("each would score every reference image")
    stored = read_gaussians(path)  # finite, whole pairs: checked before any image is scored
    num, batches = npz_image_batches(path, batch_size)
    if stored.pool is None and num < 2:
        for _ in batches:  # (at most one image) the end of the archive: closes it
            pass
        raise ValueError(f"{path}: arr_0 holds {num} image{'' if num == 1 else 's'}; FID needs at least 2 (or the "
                         "file's mu and sigma)")
    summed = FeatureAccumulator(num, keep_features=None)  # ADM's precision/recall: every reference image
    sizes = []

    def read() -> Any:
        for images in batches:
            sizes.append(tuple(images.shape[2:]))
            yield images

    items = read()
    _score_in_rounds(state, [range(start, min(start + batch_size, num)) for start in range(0, num, batch_size)],
                     lambda batch, images: extractor(images)._asdict(), lambda rows: summed.update(Features(**rows)),
                     _blank_rows(extractor, resolution, resolution), desc=f"reference features ({path})",
                     progress=progress, items=items)
    for _ in items:  # the end of the archive: closes it
        pass
    size = sizes[-1] if sizes else None
    image_size = int(size[0]) if size is not None and size[0] == size[1] else 0
    if size is not None and not image_size:  # (a square one of another size is said by the caller)
        warnings.warn(f"{path}: the reference images are {size[0]}x{size[1]} pixels, the samples {resolution}x"
                      f"{resolution}: the FID then also measures the difference in shape", stacklevel=3)
    if summed.count >= 2:
        ref = summed.stats(extractor.name, source=path, resolution=image_size)
    else:  # the file's mu/sigma (checked above) with no images to speak of: how many they summed is unknown
        assert stored.pool is not None
        kept = summed.features() if summed.count else None
        ref = FeatureStats(*stored.pool, num_images=0, feature_network=UNKNOWN_NETWORK,
                           features=None if kept is None else kept.numpy(), source=path, resolution=image_size)
    if stored.pool is not None:  # the file's statistics win, as in the ADM evaluator (made with TF's Inception)
        ref.mu, ref.sigma = stored.pool
        ref.feature_network = UNKNOWN_NETWORK
    if stored.spatial is not None:
        ref.spatial_mu, ref.spatial_sigma = stored.spatial
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


# ----------------------------------------------------------------------------------------- likelihood


@dataclass
class BitsPerDimReport(_Report):
    """``vqgpt eval-bpd``: the prior's negative log-likelihood of held-out images' codes.

    ``bits_per_dim`` is the bits of all of an image's codes over its 3 x H x W sub-pixels, as Image GPT
    counts them: for pixel tokens (one token per RGB pixel) that is ``bits_per_token / 3``. It measures
    the codes, not the pixels: for a lossy tokenizer (VQ, or a palette of K colours) it is no pixel
    likelihood, and Image GPT's figures on a 512-colour palette differ from 8-bit ones the same way.
    """

    pipeline: str
    images: str
    split: str
    num_images: int
    resolution: list[int]         # H, W
    grid: list[int]               # code rows, columns
    codebook_size: int
    class_conditional: bool       # a conditional prior is given each image's own class
    nll_per_token: float          # nats
    bits_per_token: float
    bits_per_pixel: float         # bits of an image's codes / (H x W): bits_per_token for pixel tokens
    bits_per_dim: float           # bits of an image's codes / (3 x H x W)
    uniform_bits_per_dim: float   # a prior that spreads its mass evenly: log2(codes a position may hold) per token


BITS_PER_DIM_KEYS = tuple(f.name for f in fields(BitsPerDimReport))


@torch.inference_mode()
def eval_bits_per_dim(pipeline_dir: str | Path, images: str, split: str = "eval", num_images: int | None = None,
                      batch_size: int = 64, device: str | None = None, progress: bool = True,
                      state: Any = None, data_options: dict[str, Any] | None = None) -> BitsPerDimReport:
    """Held-out NLL of the codes of ``images`` (``split``, center crops at the prior's trained size) under the
    pipeline's prior, in nats and bits per token and in bits per dim (see ``BitsPerDimReport``).

    ``state`` of the processes of a launch (as for ``eval_tokenizer``; ``vqgpt eval-bpd`` passes it): the
    batches are split over them (``readable_rounds``: each decodes, encodes and scores its own) and the
    per-batch NLL sums are added in batch order on every process, as one process adds them: the report is the
    one-process report, bit for bit, on every process.
    """
    from vqgpt.workflow.pipeline import VQGPTPipeline

    state = state or ONE_PROCESS
    dev = process_device(_device(device), state)
    pipe = VQGPTPipeline.from_pretrained(pipeline_dir).to(dev)
    height, width = pipe.trained_pixels()
    if height != width:
        raise ValueError(f"the prior was trained on {height}x{width} images, but image sources give square crops")
    grid = tuple(pipe.prior.config.grid_size)
    dataset = build_dataset(DataConfig(source=images, resolution=height, random_crop=False, hflip=False,
                                       **(data_options or {})), split)
    class_of = None
    if pipe.prior.conditional and pipe.classes:  # the source's class names -> the prior's, by exact name:
        # a folder '0' or 'index:1' is not scored as the class a typed label '0' or 'index:1' would pick
        unknown = [name for name in dataset.classes if name not in pipe.classes]
        if unknown:
            raise ValueError(f"{images}: its class{'es' if len(unknown) > 1 else ''} {unknown[:10]} "
                             f"{'are' if len(unknown) > 1 else 'is'} not among this prior's classes {pipe.classes[:20]}")
        class_of = torch.tensor([pipe.classes.index(name) for name in dataset.classes])
    elif pipe.prior.conditional:  # a prior whose classes have no names: folders named by index (0, 1, ...)
        try:
            class_of = torch.tensor([pipe.class_index(name) for name in dataset.classes])
        except ValueError as exc:
            raise ValueError(f"{images}: its classes {dataset.classes[:10]} are not this class-conditional prior's: "
                             f"{exc}") from None
    wanted = len(dataset) if num_images is None else min(num_images, len(dataset))
    # residual VQ with a codebook per depth: position p holds one of depth p % D's K codes, and the samplers
    # draw it from those alone (stage2_prior.draw.code_groups); scored over the whole vocabulary, the NLL
    # counted the mass the prior puts on codes that can never stand there (about 1 bit per token here)
    groups = code_groups(pipe.prior)
    if groups is not None:
        depth, per_depth = groups
        positions = torch.arange(grid[0] * grid[1], device=dev)
        foreign = torch.arange(pipe.prior.config.codebook_size, device=dev) // per_depth != positions[:, None] % depth
    total_nats, tokens, count = 0.0, 0, 0
    # unreadable files replaced by the next ones; under accelerate launch each process scores its share of the
    # batches, and every batch's NLL sum is added in batch order, as one process adds them: the same figures
    rounds = readable_rounds(state, dataset, batch_size, limit=num_images)
    for round_ in tqdm(rounds, desc="bits per dim", total=rounds_total(wanted, batch_size, state),
                       disable=not progress or not state.is_main_process):
        nats, numel = torch.zeros(0), torch.zeros(0, dtype=torch.long)  # one row per batch; none without a batch
        if round_.images is not None:
            codes = pipe.tokenizer.encode(round_.images.to(dev)).flatten(1)  # (B, h*w)
            labels = class_of[round_.labels].to(dev) if class_of is not None else None
            logits = pipe.prior(codes, labels)  # (B, T, V)
            if groups is not None:
                logits = logits.masked_fill(foreign, float("-inf"))  # (T, V): another depth's codes
            nats = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), codes.flatten(),
                                                     reduction="sum").reshape(1)
            numel = torch.tensor([codes.numel()])
        sums = gather_in_order(state, round_.batch_index(), {"nats": nats, "tokens": numel}, start=round_.first)
        for batch_nats, batch_tokens in zip(sums["nats"].tolist(), sums["tokens"].tolist()):
            total_nats += batch_nats
            tokens += batch_tokens
        count += sum(len(batch) for batch in round_.batches)
    if count == 0:
        raise ValueError(f"no readable images in the {split} split of {images}")
    bits_per_token = total_nats / tokens / float(np.log(2.0))
    dims = 3 * height * width  # sub-pixels per image
    per_image_tokens = tokens // count
    return BitsPerDimReport(
        pipeline=str(pipeline_dir), images=images, split=split, num_images=count, resolution=[height, width],
        grid=list(grid), codebook_size=pipe.tokenizer.codebook_size, class_conditional=class_of is not None,
        nll_per_token=total_nats / tokens, bits_per_token=bits_per_token,
        bits_per_pixel=bits_per_token * per_image_tokens / (height * width),
        bits_per_dim=bits_per_token * per_image_tokens / dims,
        uniform_bits_per_dim=float(np.log2(pipe.prior.config.codebook_size if groups is None else groups[1]))
        * per_image_tokens / dims)
