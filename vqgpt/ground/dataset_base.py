"""What every image source shares: ``DataConfig``, the ``ImageDataset`` base class, the
``Unreadable`` stand-in for an item that fails to decode, and the base of sources whose items are
encoded image bytes (tar-shard members, Hugging Face dataset rows).

The sources themselves live in ``data`` (folders, built-ins, and the dispatch on ``source``),
``tar_shards`` and ``hf_source``; this module sits below them all.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from vqgpt.ground.config import opt
from vqgpt.ground.file_index import ROOT_CLASS, clean_source, unicode_twins
from vqgpt.ground.images import check_pixel_limit, crop_aspect, open_rgb, pil_to_tensor

@dataclass
class DataConfig:
    """Where images come from and how they are cropped."""

    source: str = opt("builtin:mnist", "a folder of images (class = sub-folder); wds:SHARDS, tar shards (a brace "
                      "pattern such as /data/train-{000000..000127}.tar, or a folder of .tar files); hf:DATASET, a "
                      "Hugging Face dataset (a save_to_disk folder, or a hub id when online); or builtin:mnist | "
                      "builtin:photos | builtin:textures")
    resolution: int = opt(32, "output images are resolution x resolution")
    resize: bool = opt(True, "resize the shorter side to `resolution` before cropping (a picture longer than 8:1 is "
                             "first cut to 8:1 in the middle; False: crop only; an image smaller than the crop is an "
                             "error)")
    random_crop: bool = opt(True, "train split: random crop (False: center crop; for photos/textures: crops seeded by index)")
    hflip: bool = opt(True, "random horizontal flip, train split only (never for mnist)")
    crops_per_epoch: int = opt(5000, "builtin:photos / textures: number of random crops in one (virtual) train epoch")
    num_workers: int = opt(0, "DataLoader worker processes of `vqgpt encode` over this source (training "
                              "reads train.num_workers)")
    index_dir: str = opt("", "folder and wds: sources: where their file / shard indexes are cached (empty: $VQGPT_CACHE/index, else $XDG_CACHE_HOME/vqgpt/index, else ~/.cache/vqgpt/index)")
    hf_image_column: str = opt("", "hf: source: the image column (empty: the first column of Image type, else one "
                                "named image or img)")
    hf_label_column: str = opt("", "hf: source: the class column (empty: the first ClassLabel column, else one named "
                                "label, labels or cls, else one class; none: one class)")
    hf_split: str = opt("train", "hf: source: the split to train on; the eval split is validation, else test, else "
                        "this one (center crops, no flip)")

    def __post_init__(self) -> None:
        if isinstance(self.source, str):
            # every reader strips it (' builtin:mnist' reads MNIST; a folder named with edge spaces is kept):
            # recorded so too, so that a resume or a pipeline's provenance does not see two sources in one
            self.source = clean_source(self.source)
        if self.resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {self.resolution}")
        check_pixel_limit(self.resolution, self.resolution, f"resolution {self.resolution}", "gives")
        if self.crops_per_epoch < 1:
            raise ValueError(f"crops_per_epoch must be >= 1, got {self.crops_per_epoch}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")


class UnreadableImageWarning(UserWarning):
    """An image file could not be read and was skipped."""


class ImageTooSmallError(ValueError):
    """An image is smaller than the crop and resizing is off."""


class Unreadable(NamedTuple):
    """Returned by a dataset in place of an item whose file failed to decode; the collate functions drop it."""

    path: str
    reason: str


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


def _check_index(index: int, length: int) -> int:
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for a dataset of {length} items")
    return index


# Pillow's format name -> the file extension (webdataset key) its bytes are stored under.
FORMAT_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif",
                     "TIFF": "tiff"}


def image_transform(cfg: DataConfig, split: str) -> Callable:
    """The folder source's crop pipeline on a PIL image: resize the shorter side (``cfg.resize``),
    random crop and flip for the train split, center crop for eval."""
    train = split == "train"
    steps: list[Callable] = []
    if cfg.resize:  # a very long picture is cut to MAX_ASPECT first (it would grow to gigabytes)
        steps.append(crop_aspect)
        steps.append(v2.Resize(cfg.resolution, interpolation=v2.InterpolationMode.BICUBIC, antialias=True))
    steps.append(v2.RandomCrop(cfg.resolution) if train and cfg.random_crop else v2.CenterCrop(cfg.resolution))
    if train and cfg.hflip:
        steps.append(v2.RandomHorizontalFlip(0.5))
    return v2.Compose(steps)


# Integer classes are indices into the class list: one far above the number of classes present (an
# id, a hash) would make that many empty classes, each with its row in the model's class embedding.
MAX_CLASS = 2**31 - 1
SPARSE_CLASSES_FROM = 100_000  # up to this many classes, gaps are allowed (a subset of ImageNet's 1000)
SPARSE_FACTOR = 10  # above it, at most this many classes per class present
INTEGER_CLASSES = ("integer classes are indices 0..N-1 into N classes; renumber them, or store them as class names "
                   "(text classes are numbered in sorted order)")


def warn_unicode_twins(twins: list[tuple[str, str]], where: str) -> None:
    """Warn that ``twins`` (from ``unicode_twins``) are separate classes that print alike; ascii() shows
    the difference."""
    if twins:
        shown = "; ".join(f"{ascii(a)} and {ascii(b)}" for a, b in twins[:3])
        warnings.warn(f"{where}: the classes {shown} are the same letters in two Unicode forms (NFC / NFD), so "
                      "they are separate classes that print alike: rename one to merge them", stacklevel=3)


def class_table(values: list[int | str | None], where: Callable[[int], str],
                names: dict[int, str] | None = None) -> tuple[list[str], np.ndarray]:
    """Class names and one label per item from raw class values.

    Integers are their own class index (classes "0".."max", or the text ``names`` gives an index); an
    integer class that cannot be an index (negative, above ``MAX_CLASS``, or making more than
    ``SPARSE_CLASSES_FROM`` classes and ``SPARSE_FACTOR`` times those present) is an error naming its item;
    text classes are numbered in sorted order; no class at all is the one class ``"default"``.
    Mixing integers, text and missing classes is an error naming one item of each kind.
    """
    kinds: dict[str, int] = {}
    for i, value in enumerate(values):
        kinds.setdefault("none" if value is None else "int" if isinstance(value, int) else "text", i)
    if len(kinds) > 1:
        shown = "; ".join(f"{where(i)} has {'no class' if k == 'none' else k + ' class ' + repr(values[i])}"
                          for k, i in kinds.items())
        raise ValueError(f"classes must be all integers, all names, or all absent: {shown}")
    if not values or "none" in kinds:
        return [ROOT_CLASS], np.zeros(len(values), dtype=np.int64)
    if "int" in kinds:
        try:
            labels = np.asarray(values, dtype=np.int64)
        except OverflowError:  # beyond int64: name the first such value
            first = next(i for i, v in enumerate(values) if not -2**63 <= v < 2**63)  # type: ignore[operator]
            raise ValueError(f"{where(first)} has the class {values[first]}, far too large: "
                             f"{INTEGER_CLASSES}") from None
        if labels.min() < 0:
            first = int(np.flatnonzero(labels < 0)[0])
            raise ValueError(f"{where(first)} has the negative class {values[first]} (a missing label?): "
                             f"classes are indices 0, 1, ...")
        names = names or {}
        count, top = int(labels.max()) + 1, int(labels.argmax())
        if count - 1 > MAX_CLASS:
            raise ValueError(f"{where(top)} has the class {values[top]}, above {MAX_CLASS}: {INTEGER_CLASSES}")
        distinct = len(np.unique(labels))
        if count > max(SPARSE_CLASSES_FROM, SPARSE_FACTOR * distinct, len(names)):
            raise ValueError(f"{where(top)} has the class {values[top]}, but only {distinct} distinct classes "
                             f"occur: {count} classes, nearly all of them empty, would be made; {INTEGER_CLASSES}")
        return [names.get(k, str(k)) for k in range(count)], labels
    classes = sorted(set(values))  # type: ignore[arg-type]
    index = {name: k for k, name in enumerate(classes)}
    twins = unicode_twins(classes)
    if twins:
        warn_unicode_twins(twins, f"{where(values.index(twins[0][0]))} and {where(values.index(twins[0][1]))}")
    return classes, np.asarray([index[v] for v in values], dtype=np.int64)


class EncodedImageDataset(ImageDataset):
    """Items decoded from image bytes: subclasses give ``_bytes(i)``, ``_where(i)`` and ``labels``.

    An item that fails to decode is returned as ``Unreadable`` (named by ``_where``, warned once per
    process); the loaders leave it out of its batch, as for a folder's file.
    """

    labels: np.ndarray  # (N,) int64

    def __init__(self, cfg: DataConfig, split: str) -> None:
        self.source, self.split, self.resolution = cfg.source, split, cfg.resolution
        self.resize = cfg.resize
        self.transform = image_transform(cfg, split)
        self.skipped = []  # nothing is probed up front: a bad item is found when it is first read
        self._warned: set[int] = set()

    def _bytes(self, index: int) -> bytes:
        """The encoded image of item ``index``."""
        raise NotImplementedError

    def _where(self, index: int) -> str:
        """Where item ``index`` is stored, for messages."""
        raise NotImplementedError

    def encoded(self, index: int) -> tuple[bytes, str] | Unreadable:
        """The stored bytes of item ``index`` and the extension of their format (``vqgpt shard`` copies
        them as they are), or ``Unreadable`` when they cannot be read or Pillow cannot decode them. An image in a format
        that shard readers do not take as an image member (PPM, TGA, ...) comes back as a PNG of the RGB
        image this source decodes from it, so that the shards hold the same pixels."""
        index = _check_index(index, len(self))
        try:
            data = self._bytes(index)  # (a row without an image, a shard changed since it was indexed: left out)
            with Image.open(io.BytesIO(data)) as img:
                img.load()  # decoded in full, as training will: a cut-off file is left out here, not copied
                ext = FORMAT_EXTENSIONS.get(img.format or "")
            if ext is not None:
                return data, ext
            buffer = io.BytesIO()
            open_rgb(io.BytesIO(data)).save(buffer, format="PNG")  # type: ignore[arg-type]
            return buffer.getvalue(), "png"
        except Exception as exc:  # not an image
            return Unreadable(self._where(index), f"{type(exc).__name__}: {exc}")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | Unreadable:
        index = _check_index(index, len(self))
        try:
            img = open_rgb(io.BytesIO(self._bytes(index)))  # type: ignore[arg-type]  # Pillow reads file objects
            if not self.resize and min(img.size) < self.resolution:
                raise ImageTooSmallError(f"image {self._where(index)} is {img.size[0]}x{img.size[1]}, smaller than the "
                                         f"{self.resolution}x{self.resolution} crop (data.resize=false); enable "
                                         f"data.resize or lower data.resolution")
            return pil_to_tensor(self.transform(img)), int(self.labels[index])
        except ImageTooSmallError:
            raise
        except Exception as exc:  # any decoding failure: PIL raises many types
            if index not in self._warned:
                self._warned.add(index)
                warnings.warn(f"skipping unreadable image {self._where(index)}: {exc}", UnreadableImageWarning,
                              stacklevel=2)
            return Unreadable(self._where(index), str(exc))
