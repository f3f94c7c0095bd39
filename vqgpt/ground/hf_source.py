"""A Hugging Face dataset as an image source: ``data.source: "hf:DATASET"``, through ``datasets``.

DATASET is a folder written by ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``), or a hub id
(``user/name``) loaded with ``load_dataset`` when online (set ``HF_HUB_OFFLINE=1`` to use only what
is cached). A path that starts with ``/``, ``.`` or ``~`` is always a folder.

Columns: ``data.hf_image_column`` (empty: the first column of ``Image`` type, else a column named
``image`` or ``img``; raw ``binary`` columns are read too) and ``data.hf_label_column`` (empty: the
first ``ClassLabel`` column, else one named ``label``, ``labels`` or ``cls``, else one class; ``none``:
one class). Commands that take no config (encode, reconstruct, eval-tokenizer, eval-bpd, fid-stats,
shard) take them as ``--hf-image-column``, ``--hf-label-column`` and ``--hf-split``. Class names come from
the ``ClassLabel`` names; an integer column's values are their
own class index, a text column's values are numbered in sorted order.

Splits: the train split is ``data.hf_split`` (default ``train``); the eval split is
``validation``, else ``test``, else the train split itself (like a folder: every image again,
with center crops and no flip). A folder holding one saved ``Dataset`` is both splits.

Images are read as their stored bytes and decoded here, with the folder source's resize, crop and
flip; an image that fails to decode is returned as ``Unreadable`` (named ``hf:DATASET SPLIT[ROW]``),
warned about once per process and left out of its batch by the loaders. The dataset is map-style,
so ranks, workers and resume behave exactly as for a folder.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from vqgpt.ground.dataset_base import DataConfig, EncodedImageDataset, _check_index, class_table

PREFIX = "hf:"
IMAGE_COLUMN_NAMES = ("image", "img")
LABEL_COLUMN_NAMES = ("label", "labels", "cls")  # (cls: a webdataset-style dataset's class)
EVAL_SPLITS = ("validation", "test")
NO_LABELS = "none"


# The data.hf_* options and their defaults (DataConfig's); each is also a CLI flag, --hf-image-column, ..., of
# the commands that read an image source but take no config (encode, reconstruct, eval-tokenizer, eval-bpd,
# fid-stats, shard).
HF_OPTIONS = {f.name: f.default for f in dataclasses.fields(DataConfig) if f.name.startswith("hf_")}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _named(key: str, *value: str) -> str:
    """How a message names an hf option (and the ``value`` given): its config key and its flag."""
    return f"data.{key}{''.join(f'={v!r}' for v in value)} ({_flag(key)})"


def hf_choices(cfg: DataConfig) -> dict[str, str]:
    """The hf options of an hf: source that differ from their defaults (none for other sources): with the
    source, they decide which images and classes it gives, so token and tar shards record them (a record
    without them was made with the defaults)."""
    if not cfg.source.startswith(PREFIX):
        return {}
    return {key: getattr(cfg, key) for key, default in HF_OPTIONS.items() if getattr(cfg, key) != default}


def hf_choice_differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The ``hf_choices`` a record (token or tar shards) holds that differ from this run's, in words (a key
    absent from either is its default)."""
    return [f"{_flag(key)} is {stored.get(key, default)!r} there but {wanted.get(key, default)!r} now"
            for key, default in HF_OPTIONS.items() if stored.get(key, default) != wanted.get(key, default)]


def _target(source: str) -> tuple[str, Path | None]:
    """(what follows ``hf:``, the folder it names or None for a hub id)."""
    spec = source.strip()[len(PREFIX):].strip()
    if not spec:
        raise ValueError(f"data.source {source!r} names no dataset: give hf:/path/to/saved_dataset or hf:user/name")
    folder = Path(spec).expanduser()
    if folder.is_dir():
        return spec, folder
    if spec.startswith(("/", ".", "~")) or folder.exists():
        raise FileNotFoundError(f"data.source {source}: no dataset folder {folder} (a folder written by "
                                f"Dataset.save_to_disk, or a hub id user/name)")
    return spec, None


def _load_all(source: str) -> Any:
    """The whole saved dataset (a Dataset or DatasetDict) or, for a hub id, its DatasetDict."""
    import datasets

    spec, folder = _target(source)
    try:
        return datasets.load_from_disk(str(folder)) if folder is not None else datasets.load_dataset(spec)
    except (OSError, ValueError) as exc:  # offline, unknown id, not a saved dataset
        what = f"the folder {folder} is not a dataset written by save_to_disk" if folder is not None else \
            f"the hub dataset {spec!r} could not be loaded (offline? HF_HUB_OFFLINE=1 uses only the local cache)"
        raise FileNotFoundError(f"data.source {source}: {what}: {exc}") from None


def _choose_split(source: str, loaded: Any, train_split: str, split: str) -> tuple[Any, str]:
    """(the dataset of ``split`` "train" | "eval", its name); see the module docstring for the rules."""
    if not hasattr(loaded, "keys"):  # one saved Dataset
        return loaded, "all"
    names = list(loaded.keys())
    if train_split not in names:
        raise ValueError(f"{_named('hf_split', train_split)}: {source} has no such split (its splits: "
                         f"{', '.join(names)})")
    chosen = train_split
    if split == "eval":
        chosen = next((name for name in EVAL_SPLITS if name in names), train_split)
    return loaded[chosen], chosen


def _image_column(ds: Any, wanted: str, where: str) -> str:
    import datasets

    features = ds.features
    if wanted:
        if wanted not in features:
            raise ValueError(f"{_named('hf_image_column', wanted)}: {where} has no such column (its columns: "
                             f"{', '.join(features)})")
        column = wanted
    else:
        typed = [name for name, f in features.items() if isinstance(f, datasets.Image)]
        column = (typed[0] if typed else None) or next((name for name in IMAGE_COLUMN_NAMES if name in features), None)
        if len(typed) > 1:  # (a mask column before the photos was read without a word)
            warnings.warn(f"{where} has {len(typed)} image columns ({', '.join(typed)}): reading {column!r}, the "
                          f"first; set {_named('hf_image_column')} to read another", stacklevel=2)
        if column is None:
            raise ValueError(f"{where} has no column of Image type and none named {' or '.join(IMAGE_COLUMN_NAMES)} "
                             f"(its columns: {', '.join(features)}): set {_named('hf_image_column')}")
    feature = features[column]
    if not (isinstance(feature, datasets.Image) or getattr(feature, "dtype", None) in ("binary", "large_binary")):
        raise ValueError(f"{_named('hf_image_column')}: the column {column!r} of {where} holds {feature}, not images "
                         f"(an Image or binary column)")
    return column


def _label_column(ds: Any, wanted: str, where: str) -> str | None:
    import datasets

    features = ds.features
    if wanted == NO_LABELS:
        return None
    if wanted:
        if wanted not in features:
            raise ValueError(f"{_named('hf_label_column', wanted)}: {where} has no such column (its columns: "
                             f"{', '.join(features)}; '{NO_LABELS}' for one class)")
        return wanted
    typed = [name for name, f in features.items() if isinstance(f, datasets.ClassLabel)]
    if len(typed) > 1:
        warnings.warn(f"{where} has {len(typed)} ClassLabel columns ({', '.join(typed)}): reading {typed[0]!r}, the "
                      f"first; set {_named('hf_label_column')} to read another ('{NO_LABELS}': one class)",
                      stacklevel=2)
    return (typed[0] if typed else None) or next((name for name in LABEL_COLUMN_NAMES if name in features), None)


def _labels(ds: Any, column: str | None, where: str) -> tuple[list[str], np.ndarray]:
    """Class names and one label per row from ``column`` (None: one class)."""
    if column is None:
        return class_table([None] * len(ds), lambda i: f"{where}[{i}]")
    try:
        return _column_labels(ds, column, where)
    except ValueError as exc:  # (a test split labelled -1, HF's "no label", had no way out)
        raise ValueError(f"{exc}; to read {where} without classes set {_named('hf_label_column')} to "
                         f"'{NO_LABELS}'") from None


def _column_labels(ds: Any, column: str, where: str) -> tuple[list[str], np.ndarray]:
    import datasets

    feature = ds.features[column]
    # through Arrow in one call: reading the column as Python values went row by row through the dataset's
    # formatting (7.6 of 7.9 s at 200,000 rows, on every start of every process)
    values = ds.with_format("arrow")[column].to_pylist()
    if isinstance(feature, datasets.ClassLabel):
        names = dict(enumerate(feature.names))
        classes, labels = class_table(values, lambda i: f"{where}[{i}] column {column!r}", names)
        return (list(feature.names) + classes[len(feature.names):]), labels
    kind = getattr(feature, "dtype", "")
    if not (kind.startswith(("int", "uint")) or kind in ("string", "large_string")):
        raise ValueError(f"{_named('hf_label_column')}: the column {column!r} of {where} holds {feature}, not classes "
                         f"(a ClassLabel, integer or text column; '{NO_LABELS}' for one class)")
    return class_table(values, lambda i: f"{where}[{i}] column {column!r}")


class HFImageDataset(EncodedImageDataset):
    """Rows of a Hugging Face dataset split: image and class columns as configured (module docstring)."""

    def __init__(self, cfg: DataConfig, split: str) -> None:
        import datasets

        super().__init__(cfg, split)
        loaded = _load_all(cfg.source)
        ds, self.split_name = _choose_split(cfg.source, loaded, cfg.hf_split, split)
        where = f"{cfg.source} split {self.split_name!r}"
        if len(ds) == 0:
            raise ValueError(f"{where} has no rows")
        self.image_column = _image_column(ds, cfg.hf_image_column, where)
        self.label_column = _label_column(ds, cfg.hf_label_column, where)
        self.classes, self.labels = _labels(ds, self.label_column, where)
        images = ds.select_columns([self.image_column])
        if isinstance(images.features[self.image_column], datasets.Image):
            images = images.cast_column(self.image_column, datasets.Image(decode=False))  # bytes, decoded here
        self.images = images

    def _bytes(self, index: int) -> bytes:
        value = self.images[index][self.image_column]
        if isinstance(value, dict):  # an Image column: {"bytes": ..., "path": ...}
            if value.get("bytes") is not None:
                return value["bytes"]
            if value.get("path"):
                return Path(value["path"]).read_bytes()
            raise ValueError("the row holds no image (neither bytes nor a path)")
        if value is None:
            raise ValueError("the row holds no image")
        return bytes(value)

    def _where(self, index: int) -> str:
        return f"{self.source} {self.split_name}[{index}]"

    def name(self, index: int) -> str:
        return f"{self.split_name}-{_check_index(index, len(self)):08d}"


def source_identity(source: str) -> dict[str, Any]:
    """What identifies an ``hf:`` source cheaply: a folder's files (path, size, time); for a hub id,
    the fingerprint of each split."""
    spec, folder = _target(source)
    if folder is None:
        loaded = _load_all(source)
        splits = loaded.items() if hasattr(loaded, "items") else [("all", loaded)]
        return {"kind": "hf", "root": source.strip(),
                "fingerprints": {name: ds._fingerprint for name, ds in splits}}  # datasets' content hash
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            stat = path.stat()
            files.append([path.relative_to(folder).as_posix(), stat.st_size, stat.st_mtime_ns])
    return {"kind": "hf", "root": PREFIX + str(folder.resolve()), "files": files}
