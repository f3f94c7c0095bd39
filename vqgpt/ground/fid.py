"""FID, Inception Score and precision/recall on features of a fixed network, plus reusable reference stats.

The standard network is the FID Inception-v3 (the TF 2015-12-05 graph, ported to PyTorch by
torch-fidelity); the metric formulas are torch-fidelity's too, so figures computed here with those
weights are comparable to published ones (given the same reference set, resolution and sample
count: FID is biased upward for fewer samples; papers use 50k). Where the weights cannot be had (no internet, no local
copy), ``FeatureExtractor.random()`` gives a random-weight conv network: its FID still falls to 0
for identical sets and grows with degradation, but its figures are NOT comparable to any published
FID / IS and should only be compared with each other (the network's name is stored with every set
of statistics to keep them apart).

Reference statistics are an ``.npz`` holding ``mu`` (D,) and ``sigma`` (D, D) like the usual FID
stats files, ``mu_s`` / ``sigma_s`` of the spatial features (sFID) like the ADM evaluator's
reference batches, plus the feature network's name, the image source, and a subset of the raw
features for precision/recall. ``FeatureAccumulator`` sums them a batch at a time, in memory that
does not grow with the number of images (a reference can be ImageNet-train's 1.28M); ``compute_stats``
gives the same for features already in one array. An ADM reference batch (``arr_0``: uint8
(N, H, W, 3) images) is read in batches by ``npz_image_batches``.

sFID (Nash et al. 2021, as the ADM evaluator computes it) compares the first 7 channels of the TF
graph's ``mixed_6/conv`` tensor, a (17, 17) map, flattened in TF's (H, W, C) order: 2023 numbers
per image. ``mixed_6`` is the graph's seventh mixed block (mixed, mixed_1 ... mixed_10 are
Mixed_5b ... Mixed_7c), so ``mixed_6/conv`` is the ReLU output of ``Mixed_6d.branch1x1`` in the
PyTorch port (the TF-to-PyTorch weight maps name ``mixed_6/conv/conv2d_params`` ->
``Mixed_6d.branch1x1.conv``).
"""

from __future__ import annotations

import math
import numbers
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from vqgpt.ground.checkpoint import check_file_place, torch_load_reason
from vqgpt.ground.files import replace_when_whole

INCEPTION_NAME = "inception-v3-fid-2015-12-05"
INCEPTION_FILES = ("weights-inception-2015-12-05-6726825d.pth (torch-fidelity)",
                   "pt_inception-2015-12-05-6726825d.pth (pytorch-fid)")
UNKNOWN_NETWORK = "unknown"
PR_NEIGHBORHOOD = 3          # k of the k-NN manifolds (Kynkäänniemi et al. 2019)
PR_MAX_FEATURES = 10_000     # features kept for precision/recall: its cost grows as N^2
SPATIAL_CHANNELS = 7         # sFID: the first 7 channels of mixed_6/conv (the ADM evaluator's choice)


class FeatureNetworkUnavailable(RuntimeError):
    """The FID feature network could not be loaded (no download possible, no local weights)."""


class Features(NamedTuple):
    pool: torch.Tensor     # (N, D) features for FID and precision/recall
    logits: torch.Tensor   # (N, K) class logits for the Inception Score
    spatial: torch.Tensor  # (N, S) spatial features for sFID (Inception: S = 17 * 17 * 7 = 2023)


def quantize(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> the same images rounded to 8 bits, still in [-1, 1] (as saved to PNG)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


class _FidelityInception(nn.Module):
    """torch-fidelity's Inception-v3 on [-1, 1] float images -> (pool (B, 2048), spatial (B, 2023)).

    The network wants uint8 and resizes to 299 itself; the spatial features (TF's ``mixed_6/conv``,
    see the module docstring) are taken by a hook on ``Mixed_6d.branch1x1`` during the same pass.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self._mixed_6_conv: torch.Tensor | None = None
        network.Mixed_6d.branch1x1.register_forward_hook(self._keep_mixed_6_conv)

    def _keep_mixed_6_conv(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._mixed_6_conv = output  # (B, 192, 17, 17), after batch norm and ReLU

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)  # (B, 3, H, W) uint8
        (pool,) = self.network(x)                                          # (B, 2048)
        spatial, self._mixed_6_conv = self._mixed_6_conv, None
        return pool, spatial_features(spatial)                             # (B, 2048), (B, 2023)


def spatial_features(feature_map: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) map -> (B, h * w * 7): its first 7 channels flattened in TF's (h, w, c) order, as ADM's sFID."""
    return feature_map[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)


class _RandomConvNet(nn.Module):
    """Random-weight conv features: (B, 3, H, W) -> (pool (B, 112) averaged at three scales, spatial (B, 112)).

    The spatial features stand in for sFID's: the second stage's map, average-pooled to 4x4 so that
    their size does not depend on the image size, reduced like Inception's (``spatial_features``).
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        stages, in_ch = [], 3
        for i, width in enumerate(widths):
            conv = nn.Conv2d(in_ch, width, 3, stride=1 if i == 0 else 2, padding=1)
            # He init keeps activations O(1) through the stack, so FID figures are not vanishingly small
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            stages.append(nn.Sequential(conv, nn.ReLU()))
            in_ch = width
        self.stages = nn.ModuleList(stages)
        self.dim = sum(widths)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, maps = [], []
        x = images
        for stage in self.stages:
            x = stage(x)                          # (B, C_i, H / 2^i, W / 2^i)
            pooled.append(x.mean(dim=(2, 3)))     # (B, C_i)
            maps.append(x)
        spatial = spatial_features(nn.functional.adaptive_avg_pool2d(maps[1], 4))  # (B, 4 * 4 * 7)
        return torch.cat(pooled, dim=1), spatial  # (B, sum C_i), (B, 112)


class FeatureExtractor(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> Features(pool (B, D), logits (B, K), spatial (B, S)); ``name`` names it.

    ``backbone`` maps [-1, 1] images to (pooled, spatial) features, ``head`` maps the pooled ones to
    class logits (for IS).
    Images are rounded to 8 bits first, so features of a tensor equal those of its saved PNG.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, name: str) -> None:
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.head = head.eval().requires_grad_(False)
        self.name = name

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def train(self, mode: bool = True) -> "FeatureExtractor":
        # a fixed measuring instrument: batch-norm statistics must never switch to batch mode
        return super().train(False)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> Features:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        x = quantize(images.to(self.device))      # (B, 3, H, W)
        pool, spatial = self.backbone(x)          # (B, D), (B, S)
        pool = pool.float()
        return Features(pool, self.head(pool).float(), spatial.float())  # (B, D), (B, K), (B, S)

    @classmethod
    def inception(cls, weights_path: str | Path | None = None) -> "FeatureExtractor":
        """The standard FID Inception-v3: from a local weights file, else downloaded to the torch hub cache."""
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        if weights_path is not None:
            _check_inception_weights(Path(weights_path))
        try:
            network = FeatureExtractorInceptionV3(INCEPTION_NAME, ["2048"], feature_extractor_weights_path=
                                                  None if weights_path is None else str(weights_path))
        except RuntimeError as exc:  # load_state_dict: a file with the checked keys but not the whole network
            if weights_path is None:
                raise
            reason = torch_load_reason(str(exc))[:300]
            raise ValueError(f"{weights_path}: not the whole FID Inception-v3 network ({reason}); expected "
                             f"{' or '.join(INCEPTION_FILES)}") from None
        except OSError as exc:  # URLError is an OSError: no internet
            raise FeatureNetworkUnavailable(
                f"could not download the FID Inception-v3 weights ({exc}). Offline, pass a local copy of "
                f"{' or '.join(INCEPTION_FILES)} (--fid-weights PATH), put torch-fidelity's file into "
                f"{torch.hub.get_dir()}/checkpoints/, or use --fid-weights random (figures then are "
                "not comparable to published FID)") from exc
        # logits_unbiased (torch-fidelity's and torchmetrics' IS input) = pool @ fc.weight.T, no bias
        head = nn.Linear(2048, network.fc.out_features, bias=False)
        head.weight = network.fc.weight
        return cls(_FidelityInception(network), head, INCEPTION_NAME)

    @classmethod
    def random(cls, seed: int = 0, num_logits: int = 10) -> "FeatureExtractor":
        """A random-weight conv network (offline stand-in): figures NOT comparable to published FID / IS."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            backbone = _RandomConvNet()
            head = nn.Linear(backbone.dim, num_logits)
        return cls(backbone, head, f"random-conv-seed{seed}")


def _check_inception_weights(path: Path) -> None:
    """Open a weights file safely (weights_only) and check it is an Inception-v3 FID state dict."""
    if not path.is_file():
        raise FileNotFoundError(f"FID weights file not found: {path} (expected {' or '.join(INCEPTION_FILES)})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # (torch's advice to load it with weights_only=False is not given on: code could run)
        raise ValueError(f"{path}: not a loadable PyTorch weights file ({type(exc).__name__}: "
                         f"{torch_load_reason(str(exc))})") from None
    needed = ("Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.conv.weight", "fc.weight")
    missing = [k for k in needed if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path}: not FID Inception-v3 weights (missing {missing}); expected {' or '.join(INCEPTION_FILES)}")
    if tuple(state["fc.weight"].shape) != (1008, 2048):
        raise ValueError(f"{path}: fc.weight has shape {tuple(state['fc.weight'].shape)}, expected (1008, 2048): "
                         "this is torchvision's ImageNet Inception, not the FID network")


def load_feature_extractor(spec: str | None = None, device: str | torch.device = "cpu") -> FeatureExtractor:
    """``None``/"inception": standard FID network (downloads); "random"/"random:SEED": random stand-in; else a weights path."""
    if spec is None or spec == "inception":
        extractor = FeatureExtractor.inception()
    elif spec == "random" or spec.startswith("random:"):
        seed_text = spec.partition(":")[2] or "0"
        if not seed_text.isdigit() or int(seed_text) >= 2**63:
            raise ValueError(f"--fid-weights {spec!r}: expected 'random' or 'random:SEED' with an integer seed "
                             "from 0 to 2**63 - 1")
        extractor = FeatureExtractor.random(int(seed_text))
    else:
        extractor = FeatureExtractor.inception(spec)
    return extractor.to(device)


def extract_features(extractor: FeatureExtractor, batches: Iterable[torch.Tensor], progress: bool = False,
                     desc: str = "features", total: int | None = None) -> Features:
    """Features of every image in an iterable of (B, 3, H, W) batches in [-1, 1], concatenated on the CPU.

    Holds every image's features (about 20 KB each for Inception): for a large or unknown number of
    images use ``stream_stats``, whose memory does not grow with their number.
    """
    parts = [extractor(images) for images in tqdm(batches, desc=desc, disable=not progress, total=total)]
    if not parts:
        raise ValueError("no images to extract features from")
    return Features(*(torch.cat([getattr(p, key).cpu() for p in parts]) for key in Features._fields))


def npz_image_batches(path: str | Path, batch_size: int) -> tuple[int, Iterator[torch.Tensor]]:
    """An ADM reference / sample batch (uint8 (N, H, W, 3) under ``arr_0``) -> N, its (B, 3, H, W) batches in [-1, 1].

    Read from the archive a batch at a time (the ImageNet reference batches hold gigabytes).
    """
    path = Path(path)
    archive = zipfile.ZipFile(path)
    try:
        member = archive.open("arr_0.npy")
        version = np.lib.format.read_magic(member)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(member)
    except (KeyError, ValueError) as exc:
        archive.close()
        raise ValueError(f"{path}: arr_0 is not a readable array ({exc})") from exc
    if dtype != np.uint8 or fortran_order or len(shape) != 4 or shape[3] != 3 or min(shape[1:3]) < 1:
        archive.close()
        raise ValueError(f"{path}: arr_0 must be uint8 images (N, H, W, 3) as the ADM evaluator reads them, got "
                         f"{dtype} {shape}{' in Fortran order' if fortran_order else ''}")
    num, image_bytes = shape[0], int(np.prod(shape[1:]))

    def batches() -> Iterator[torch.Tensor]:
        with archive, member:
            for start in range(0, num, batch_size):
                count = min(batch_size, num - start)
                try:  # (zipfile checks a member's CRC at its end: a damaged byte shows only there)
                    data = member.read(count * image_bytes)
                except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                    raise ValueError(f"{path}: arr_0 is damaged ({type(exc).__name__}: {exc}): copy the file "
                                     "again") from None
                if len(data) != count * image_bytes:
                    raise ValueError(f"{path}: arr_0 ends after {start + len(data) // image_bytes} of {num} images")
                array = np.frombuffer(data, np.uint8).reshape(count, *shape[1:])
                yield torch.from_numpy(array.copy()).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, H, W)
    return num, batches()


# ----------------------------------------------------------------------------------------- statistics


@dataclass
class FeatureStats:
    """Gaussian statistics of a feature set (what FID compares) and a subset of the features (precision/recall)."""

    mu: np.ndarray                    # (D,) float64
    sigma: np.ndarray                 # (D, D) float64
    num_images: int
    feature_network: str              # FeatureExtractor.name, or "unknown" for foreign stats files
    features: np.ndarray | None = None  # (n <= PR_MAX_FEATURES, D) float32, or None
    source: str = ""
    split: str = ""
    resolution: int = 0
    spatial_mu: np.ndarray | None = None     # (S,) float64: the same of the spatial features (sFID), or None
    spatial_sigma: np.ndarray | None = None  # (S, S)

    def spatial(self) -> "FeatureStats":
        """The statistics of the spatial features, for ``frechet_distance`` (sFID); an error when there are none."""
        if self.spatial_mu is None or self.spatial_sigma is None:
            raise ValueError(f"no spatial statistics (mu_s, sigma_s) in {self.source or 'these statistics'}")
        return FeatureStats(self.spatial_mu, self.spatial_sigma, self.num_images, self.feature_network,
                            source=self.source)


def compute_stats(pool: torch.Tensor, feature_network: str, keep_features: int | None = PR_MAX_FEATURES, seed: int = 0,
                  source: str = "", split: str = "", resolution: int = 0,
                  spatial: torch.Tensor | None = None) -> FeatureStats:
    """Mean (D,) and covariance (D, D) of features (N, D) (and of ``spatial`` (N, S), for sFID).

    Keeps a seeded random subset of ``keep_features`` rows (None: all of them, 0: none).
    """
    if pool.ndim != 2 or pool.shape[0] < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {tuple(pool.shape)}")
    if spatial is not None and spatial.shape[0] != pool.shape[0]:
        raise ValueError(f"{spatial.shape[0]} rows of spatial features for {pool.shape[0]} rows of features")
    mu, sigma = _gaussian(pool)
    spatial_mu, spatial_sigma = _gaussian(spatial) if spatial is not None else (None, None)
    return FeatureStats(mu, sigma, int(pool.shape[0]), feature_network,
                        _subset(pool, keep_features, seed).numpy() if keep_features != 0 else None,
                        source, split, int(resolution), spatial_mu, spatial_sigma)


def _gaussian(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) in float64 (torch-fidelity's; ADM's np.cov alike)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    stats = fid_features_to_statistics(features.detach().double().cpu())
    return np.asarray(stats["mu"], np.float64), np.asarray(stats["sigma"], np.float64)


def _subset(pool: torch.Tensor, count: int | None, seed: int) -> torch.Tensor:
    """At most ``count`` rows of (N, D) (None: all), a fixed random choice, as float32 on the CPU."""
    pool = pool.detach().float().cpu()
    if count is None or pool.shape[0] <= count:
        return pool
    rows = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(seed))[:count]
    return pool[rows.sort().values]


class _Moments:
    """Running float64 count, mean and covariance of feature rows fed a batch at a time.

    The sums are taken about a fixed shift (the first batch's mean): near the true mean they stay
    small, so ``sum y y^T - n ybar ybar^T`` does not cancel away the digits that a raw second moment
    of positive Inception features would (the result matches np.cov of the whole array to ~1e-12).
    """

    def __init__(self) -> None:
        self.count = 0
        self.shift: torch.Tensor | None = None  # (D,) float64
        self.sum: torch.Tensor | None = None    # (D,) sum of (x - shift)
        self.outer: torch.Tensor | None = None  # (D, D) sum of (x - shift)(x - shift)^T

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.detach().double()  # (B, D)
        if self.shift is None:
            self.shift = rows.mean(0)
            self.sum = torch.zeros_like(self.shift)
            self.outer = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=rows.device)
        assert self.sum is not None and self.outer is not None
        if rows.shape[1] != self.shift.shape[0]:
            raise ValueError(f"feature rows of width {rows.shape[1]} after rows of width {self.shift.shape[0]}")
        centred = rows - self.shift.to(rows.device)
        self.sum += centred.sum(0).to(self.sum.device)
        self.outer += (centred.T @ centred).to(self.outer.device)
        self.count += rows.shape[0]

    def gaussian(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean (D,) and unbiased covariance (D, D), as ``_gaussian`` gives them for all the rows at once."""
        if self.count < 2 or self.shift is None or self.sum is None or self.outer is None:
            raise ValueError(f"need at least 2 feature rows for a covariance, got {self.count}")
        mean_offset = self.sum / self.count
        sigma = (self.outer - torch.outer(self.sum, mean_offset)) / (self.count - 1)
        sigma = (sigma + sigma.T) / 2  # exactly symmetric, as the sum it stands for
        return (self.shift + mean_offset).cpu().numpy(), sigma.cpu().numpy()


class _InceptionScoreSums:
    """The parts of torch-fidelity's Inception Score of N rows of logits, fed in order a batch at a time.

    torch-fidelity shuffles the N rows (numpy seed 2020) and cuts them into ``splits`` chunks; per
    chunk, exp(mean KL(p(y|x) || p(y))), where mean KL = mean of sum p log p - sum q log q with q the
    chunk's mean of p. Only the chunk of each row (from N, known up front), the chunk's sum of p (K,)
    and of sum p log p are kept. The same figures as ``inception_score`` to float64 round-off; where
    a class gets no probability mass in a chunk (q = 0) this gives 0 * log 0 = 0, torch-fidelity NaN.
    """

    def __init__(self, num_rows: int, splits: int = 10) -> None:
        if num_rows < 1:
            raise ValueError(f"the Inception Score needs at least 1 row of logits, got {num_rows}")
        self.num_rows, self.splits = num_rows, max(1, min(splits, num_rows))
        position = np.empty(num_rows, np.int64)
        position[np.random.RandomState(2020).permutation(num_rows)] = np.arange(num_rows)  # row -> place in shuffle
        bounds = np.array([(i + 1) * num_rows // self.splits for i in range(self.splits)])
        self.chunk = torch.from_numpy(np.searchsorted(bounds, position, side="right"))  # (N,) chunk of each row
        self.count = 0
        self.p_sum: torch.Tensor | None = None                                 # (splits, K) float64
        self.negentropy_sum = torch.zeros(self.splits, dtype=torch.float64)    # (splits,)

    def update(self, logits: torch.Tensor) -> None:
        logits = logits.detach().double().cpu()  # (B, K)
        if self.count + len(logits) > self.num_rows:
            raise ValueError(f"more than the {self.num_rows} rows of logits announced")
        chunk = self.chunk[self.count:self.count + len(logits)]
        if self.p_sum is None:
            self.p_sum = torch.zeros(self.splits, logits.shape[1], dtype=torch.float64)
        p = logits.softmax(dim=1)
        self.p_sum.index_add_(0, chunk, p)
        self.negentropy_sum.index_add_(0, chunk, (p * logits.log_softmax(dim=1)).sum(1))
        self.count += len(logits)

    def score(self) -> InceptionScore:
        if self.count != self.num_rows or self.p_sum is None:
            raise ValueError(f"the Inception Score was announced {self.num_rows} rows of logits, got {self.count}")
        sizes = torch.tensor([(i + 1) * self.num_rows // self.splits - i * self.num_rows // self.splits
                              for i in range(self.splits)], dtype=torch.float64)
        q = self.p_sum / sizes[:, None]
        kl = self.negentropy_sum / sizes - torch.special.xlogy(q, q).sum(1)
        scores = kl.exp().numpy()
        return InceptionScore(float(np.mean(scores)), float(np.std(scores)))


class FeatureAccumulator:
    """Statistics of image features fed in order a batch at a time, in memory that does not grow with their number.

    Gives what ``compute_stats`` gives for all the rows at once (``stats``): mu / sigma of the pool
    and of the spatial features (float64 running sums), and the same subset for precision/recall,
    which needs the row count ``num_rows`` up front when it is less than all rows: ``_subset`` picks
    rows ``randperm(N)[:keep_features]``, so the rows to keep are known before they come. With
    ``inception_splits`` (and ``num_rows``) it also gives the Inception Score of the logits.

    When fewer rows come than announced (a reference image that failed to decode, no other to take
    its place), the subset is the announced one's rows that came: slightly fewer than ``keep_features``
    and not the rows a whole-array ``compute_stats`` would pick. The statistics are exact either way.
    """

    def __init__(self, num_rows: int | None = None, keep_features: int | None = PR_MAX_FEATURES, seed: int = 0,
                 spatial: bool = True, inception_splits: int | None = None) -> None:
        self.num_rows, self.keep_features = num_rows, keep_features
        self.count = 0
        self.pool, self.spatial = _Moments(), (_Moments() if spatial else None)
        self.rows: torch.Tensor | None = None  # sorted indices of the rows kept; None: every row
        if keep_features is not None and keep_features != 0:
            if num_rows is None:
                raise ValueError("keeping a subset of the features needs the number of rows up front (num_rows)")
            if num_rows > keep_features:
                self.rows = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))[:keep_features]
                self.rows = self.rows.sort().values
        self.kept: list[torch.Tensor] = []
        self.inception: _InceptionScoreSums | None = None
        if inception_splits is not None:
            if num_rows is None:
                raise ValueError("the Inception Score needs the number of rows up front (num_rows)")
            self.inception = _InceptionScoreSums(num_rows, inception_splits)

    def update(self, features: Features) -> None:
        """Take the next batch of rows: Features(pool (B, D), logits (B, K), spatial (B, S))."""
        pool, count = features.pool, len(features.pool)
        if self.num_rows is not None and self.count + count > self.num_rows:
            raise ValueError(f"more than the {self.num_rows} feature rows announced")
        if count == 0:
            return
        self.pool.update(pool)
        if self.spatial is not None:
            self.spatial.update(features.spatial)
        if self.inception is not None:
            self.inception.update(features.logits)
        if self.keep_features != 0:
            if self.rows is None:
                self.kept.append(pool.detach().float().cpu().clone())
            else:
                lo, hi = torch.searchsorted(self.rows, torch.tensor([self.count, self.count + count])).tolist()
                if hi > lo:  # indexing copies: the batch itself is not kept alive
                    self.kept.append(pool.detach()[(self.rows[lo:hi] - self.count).to(pool.device)].float().cpu())
        self.count += count

    def features(self) -> torch.Tensor | None:
        """The rows kept for precision/recall (n, D) float32 on the CPU, in order; None with keep_features=0."""
        if self.keep_features == 0:
            return None
        if not self.kept:
            return torch.zeros(0, self.pool.shift.shape[0] if self.pool.shift is not None else 0)
        return torch.cat(self.kept)

    def stats(self, feature_network: str, source: str = "", split: str = "", resolution: int = 0) -> FeatureStats:
        """What ``compute_stats`` gives for the rows fed so far (all of them at once)."""
        if self.count < 2:
            raise ValueError(f"need at least 2 images for feature statistics, got {self.count}")
        mu, sigma = self.pool.gaussian()
        spatial_mu, spatial_sigma = self.spatial.gaussian() if self.spatial is not None else (None, None)
        kept = self.features()
        return FeatureStats(mu, sigma, self.count, feature_network, None if kept is None else kept.numpy(),
                            source, split, int(resolution), spatial_mu, spatial_sigma)

    def inception_score(self) -> InceptionScore:
        if self.inception is None:
            raise ValueError("no Inception Score: the accumulator was made without inception_splits")
        return self.inception.score()


def stream_stats(extractor: FeatureExtractor, batches: Iterable[torch.Tensor], num_images: int | None,
                 keep_features: int | None = PR_MAX_FEATURES, seed: int = 0, progress: bool = False,
                 desc: str = "features", total: int | None = None) -> FeatureAccumulator:
    """``extract_features`` + ``compute_stats`` a batch at a time: only the statistics and the kept rows stay.

    ``num_images``: how many images the batches hold (needed when ``keep_features`` is less than that).
    """
    accumulator = FeatureAccumulator(num_images, keep_features, seed)
    for images in tqdm(batches, desc=desc, disable=not progress, total=total):
        accumulator.update(extractor(images))
    if accumulator.count == 0:
        raise ValueError("no images to extract features from")
    return accumulator


def _require_finite(array: np.ndarray, where: str, key: str, consequence: str) -> None:
    """An error naming ``where`` and ``key`` when ``array`` holds NaN or inf values (how many, and ``consequence``)."""
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise ValueError(f"{where}: {key} holds {bad} non-finite value{'s' if bad > 1 else ''} (NaN or inf) of "
                         f"{array.size}: {consequence}")


def check_finite(stats: FeatureStats, where: str) -> FeatureStats:
    """``stats`` when mu, sigma (and mu_s, sigma_s) are finite; else an error naming ``where`` and the key."""
    for key, array in (("mu", stats.mu), ("sigma", stats.sigma), ("mu_s", stats.spatial_mu),
                       ("sigma_s", stats.spatial_sigma)):
        if array is not None:
            _require_finite(array, where, key, "no FID can be computed from them")
    return stats


def check_stats_path(path: str | Path) -> Path:
    """``path`` as a place save_stats can write (checked before the features are computed)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"reference statistics must be saved as .npz, got {path}")
    check_file_place(path)
    if path.is_file() and not _our_stats_file(path):  # one mistyped path replaced a reference batch
        raise ValueError(f"{path} already exists and is no statistics file of vqgpt fid-stats (a reference batch, "
                         "say): it is not replaced; choose another path, or move or delete it")
    return path


def _our_stats_file(path: Path) -> bool:
    """Whether ``path`` is an .npz that ``save_stats`` wrote (mu, sigma and feature_network, no images)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {"mu", "sigma", "feature_network"} <= set(data.files) and "arr_0" not in data.files
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return False


def save_stats(stats: FeatureStats, path: str | Path) -> Path:
    """Write statistics as ``.npz`` (mu, sigma, features, and metadata; no pickled objects); an earlier
    file at ``path`` is replaced only once the new one is whole."""
    path = check_stats_path(path)
    check_finite(stats, f"statistics for {path}")  # (of features gone wrong): a file no evaluation could use
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"mu": stats.mu, "sigma": stats.sigma, "num_images": np.int64(stats.num_images),
              "feature_network": np.str_(stats.feature_network), "source": np.str_(stats.source),
              "split": np.str_(stats.split), "resolution": np.int64(stats.resolution)}
    if stats.features is not None:
        arrays["features"] = stats.features.astype(np.float32)
    if stats.spatial_mu is not None and stats.spatial_sigma is not None:
        arrays["mu_s"], arrays["sigma_s"] = stats.spatial_mu, stats.spatial_sigma  # the ADM evaluator's names

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would otherwise append another ".npz"
            np.savez(f, **arrays)

    return replace_when_whole(path, write)  # a failed or killed run leaves the earlier statistics as they were


class StoredGaussians(NamedTuple):
    """The statistics an ``.npz`` holds, each checked: (mean (D,), covariance (D, D)) or None where absent."""

    pool: tuple[np.ndarray, np.ndarray] | None     # mu, sigma (float64)
    spatial: tuple[np.ndarray, np.ndarray] | None  # mu_s, sigma_s (float64)


def _open_npz(path: str | Path) -> tuple[Path, np.lib.npyio.NpzFile]:
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder: give the .npz file of reference statistics or images")
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics file not found: {path}")
    if not zipfile.is_zipfile(path):  # (np.load reads anything else as a pickle, and advises allow_pickle)
        with open(path, "rb") as f:
            npy = f.read(6) == b"\x93NUMPY"
        if not npy:
            raise ValueError(f"{path}: not an .npz archive (numpy's zip of arrays, as np.savez writes it)")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):  # a lone .npy array under an .npz name
        raise ValueError(f"{path}: not an .npz archive (a single {type(data).__name__}): give mu and sigma by name")
    return path, data


def _member(data: np.lib.npyio.NpzFile, path: Path, key: str) -> np.ndarray:
    """``data[key]``, or an error naming the file and key (a pickled object array is never unpickled)."""
    try:
        return data[key]
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise ValueError(f"{path}: {key} is a pickled object array, not numbers") from None
        raise ValueError(f"{path}: {key} is not a readable array ({exc})") from None
    except Exception as exc:
        raise ValueError(f"{path}: {key} is not a readable array ({type(exc).__name__}: {exc})") from None


def _real_array(data: np.lib.npyio.NpzFile, path: Path, key: str) -> np.ndarray:
    """``data[key]`` when it holds real numbers (bool, int or float); else an error naming the file and key."""
    array = _member(data, path, key)
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{path}: {key} holds {array.dtype} values, not real numbers")
    return array


def _numbers(data: np.lib.npyio.NpzFile, path: Path, key: str, dtype: type) -> np.ndarray:
    """``data[key]`` as finite real numbers of ``dtype``; anything else is an error naming the file and key."""
    array = _real_array(data, path, key)
    # (checked before the cast: float64 values over float32's range would read as inf)
    _require_finite(array, str(path), key, "the file is unusable for FID; recompute it")
    return np.asarray(array, dtype)


def _scalar(data: np.lib.npyio.NpzFile, path: Path, key: str, default: Any, kind: type) -> Any:
    """A one-value metadata entry (``num_images``, ``source``, ...) as ``kind`` (int or str), ``default`` when
    absent; a 0-d or one-element array of the right sort, else an error naming the file and key."""
    if key not in data.files:
        return default
    array = _member(data, path, key)
    if array.size != 1:
        raise ValueError(f"{path}: {key} should hold one value, got an array of shape {array.shape}")
    value = array.reshape(()).item()
    if kind is str:
        return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{path}: {key} should be an integer, got {value!r}")
    return int(value)


def read_gaussians(path: str | Path) -> StoredGaussians:
    """The ``mu``/``sigma`` and ``mu_s``/``sigma_s`` pairs of an ``.npz``, where there: shapes checked, finite.

    Half a pair (``mu`` without ``sigma``, say) is an error, as it is to the ADM evaluator.
    """
    path, data = _open_npz(path)
    with data:
        return StoredGaussians(*(_gaussian_pair(data, path, mean, cov) for mean, cov in (("mu", "sigma"),
                                                                                           ("mu_s", "sigma_s"))))


def _gaussian_pair(data: np.lib.npyio.NpzFile, path: Path, mean_key: str,
                   cov_key: str) -> tuple[np.ndarray, np.ndarray] | None:
    there = [key in data.files for key in (mean_key, cov_key)]
    if not any(there):
        return None
    if not all(there):
        held, lacking = (mean_key, cov_key) if there[0] else (cov_key, mean_key)
        raise ValueError(f"{path} holds {held} but not {lacking}: give both or neither")
    mean, cov = _numbers(data, path, mean_key, np.float64), _numbers(data, path, cov_key, np.float64)
    if mean.ndim != 1 or cov.shape != (mean.shape[0], mean.shape[0]):
        raise ValueError(f"{path}: {mean_key} has shape {mean.shape} and {cov_key} {cov.shape}; expected (D,) and "
                         "(D, D)")
    # a covariance is symmetric with variances >= 0 (a negated one gave a negative FID, reported as 0)
    scale = float(np.abs(cov).max()) if cov.size else 0.0
    if cov.size and (not np.allclose(cov, cov.T, rtol=0, atol=1e-6 * scale) or np.diag(cov).min() < -1e-9 * scale):
        raise ValueError(f"{path}: {cov_key} is no covariance matrix (it must be symmetric, with variances >= 0 on "
                         "its diagonal)")
    return mean, cov


def load_stats(path: str | Path) -> FeatureStats:
    """Read statistics written by ``save_stats``, or any ``.npz`` with ``mu`` and ``sigma`` (network 'unknown').

    ``mu_s`` / ``sigma_s`` (sFID), as in the ADM evaluator's reference batches, are read when present.
    Non-finite statistics, pickled arrays and half a pair of statistics are errors naming the file and key.
    """
    path, data = _open_npz(path)
    with data:
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if len(missing) == 2:
            raise ValueError(f"{path}: not FID statistics: missing {missing} (found {sorted(data.files)})")
        pool, spatial = _gaussian_pair(data, path, "mu", "sigma"), _gaussian_pair(data, path, "mu_s", "sigma_s")
        assert pool is not None  # one of the two is there: both are (else _gaussian_pair raised)
        mu, sigma = pool
        text = lambda key, default: _scalar(data, path, key, default, str)  # noqa: E731
        number = lambda key: _scalar(data, path, key, 0, int)  # noqa: E731
        features = None
        if "features" in data.files:  # only precision/recall read them: FID is whole without
            features = _real_array(data, path, "features")
            if features.ndim != 2 or features.shape[1] != mu.shape[0]:  # (before sampling, not after it)
                raise ValueError(f"{path}: features must be rows of the {mu.shape[0]}-d features that mu and sigma "
                                 f"summarise, (N, {mu.shape[0]}); got shape {features.shape}")
            if np.isfinite(features).all():
                features = np.asarray(features, np.float32)
            else:
                warnings.warn(f"{path}: features hold NaN or inf values: left out, so this file gives no "
                              "precision/recall (its mu and sigma are finite and used)", stacklevel=2)
                features = None
        spatial_mu, spatial_sigma = spatial if spatial is not None else (None, None)
        return FeatureStats(mu, sigma, number("num_images"), text("feature_network", UNKNOWN_NETWORK), features,
                            text("source", ""), text("split", ""), number("resolution"), spatial_mu, spatial_sigma)


def check_same_network(a: FeatureStats, b: FeatureStats) -> None:
    """Raise if two sets of statistics come from different feature networks (their FID would be meaningless)."""
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature dimensions differ: {a.mu.shape[0]} ({a.feature_network}) "
                         f"vs {b.mu.shape[0]} ({b.feature_network})")
    if UNKNOWN_NETWORK not in (a.feature_network, b.feature_network) and a.feature_network != b.feature_network:
        raise ValueError(f"statistics from different feature networks: {a.feature_network!r} vs {b.feature_network!r}; "
                         "recompute the reference with the same --fid-weights")


# ----------------------------------------------------------------------------------------- metrics


class InceptionScore(NamedTuple):
    mean: float
    std: float


class PrecisionRecall(NamedTuple):
    precision: float  # share of generated samples inside the real k-NN manifold (fidelity)
    recall: float     # share of real samples inside the generated k-NN manifold (coverage)


def frechet_distance(a: FeatureStats, b: FeatureStats, name: str = "FID") -> float:
    """FID between two sets of statistics (Heusel et al. 2017), as torch-fidelity computes it; ``name``
    (FID, sFID, rFID) is what a warning calls the figure."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    check_same_network(a, b)
    for side, stats in (("first", a), ("second", b)):  # max(0, nan) below would make NaN a perfect 0
        check_finite(stats, f"{name}: the statistics of {stats.source or f'the {side} set'}")
    fewest = min(a.num_images, b.num_images)
    if fewest and fewest < a.mu.shape[0]:
        warnings.warn(f"{name} from {fewest} images with {a.mu.shape[0]}-d features: the covariance is rank-deficient "
                      "and the figure is biased upward; published FID uses 10k-50k images", stacklevel=2)
    value = fid_statistics_to_metric({"mu": a.mu, "sigma": a.sigma}, {"mu": b.mu, "sigma": b.sigma}, verbose=False)
    distance = float(next(iter(value.values())))
    if not math.isfinite(distance):
        raise ValueError(f"{name} came out {distance} from finite statistics ({a.source or 'first set'} vs "
                         f"{b.source or 'second set'}): the covariances are numerically unusable")
    # round-off makes an exact 0 a tiny negative; a clearly negative one is no distance (a covariance that is
    # not positive semi-definite), which max(0, .) reported as a perfect 0
    tolerance = 1e-4 * max(1.0, float(np.trace(a.sigma) + np.trace(b.sigma)))
    if distance < -tolerance:
        raise ValueError(f"{name} came out {distance:.4g} < 0 ({a.source or 'first set'} vs "
                         f"{b.source or 'second set'}): a covariance is not positive semi-definite; recompute the "
                         "statistics")
    return max(0.0, distance)


def inception_score(logits: torch.Tensor, splits: int = 10) -> InceptionScore:
    """IS = exp E[KL(p(y|x) || p(y))] from logits (N, K), mean and std over ``splits`` chunks (torch-fidelity)."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    if logits.ndim != 2 or logits.shape[0] < 1:
        raise ValueError(f"expected logits of shape (N, K), got {tuple(logits.shape)}")
    splits = max(1, min(splits, logits.shape[0]))
    out = isc_features_to_metric(logits.detach().cpu(), splits=splits, shuffle=True, rng_seed=2020)
    return InceptionScore(out["inception_score_mean"], out["inception_score_std"])


def precision_recall(real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray,
                     k: int = PR_NEIGHBORHOOD, max_features: int | None = PR_MAX_FEATURES,
                     seed: int = 0, device: str | torch.device = "cpu") -> PrecisionRecall:
    """Improved precision/recall (Kynkäänniemi et al. 2019) of features (N, D) vs (M, D): k-NN manifolds, torch-fidelity.

    A point's radius is the distance to its k-th nearest other point of its set; a sample counts
    toward precision when it lies within the radius of some real point (<=), a real point toward
    recall likewise. That is the ADM evaluator's ``ManifoldEstimator`` with k=3 when
    ``max_features=None`` (every row; else at most that many, a seeded subset of each set).
    ``device``: where the distances are computed (N x M of them: a GPU is much faster for 50k samples).
    """
    from torch_fidelity.metric_prc import prc_features_to_metric

    real_t, fake_t = (_subset(torch.as_tensor(x), max_features, seed).to(device) for x in (real, fake))
    for name, t in (("real", real_t), ("generated", fake_t)):
        if t.ndim != 2 or t.shape[0] <= k:
            raise ValueError(f"precision/recall with k={k} needs more than {k} {name} feature rows, got shape {tuple(t.shape)}")
    if real_t.shape[1] != fake_t.shape[1]:
        raise ValueError(f"feature dimensions differ: real {real_t.shape[1]} vs generated {fake_t.shape[1]}")
    # torch-fidelity's convention: features_1 = generated, features_2 = real; the "part" variant bounds memory
    out = prc_features_to_metric(fake_t, real_t, prc_neighborhood=k, prc_batch_size=4096, save_cpu_ram=True, verbose=False)
    return PrecisionRecall(float(out["precision"]), float(out["recall"]))
