"""Token shards: the integer code grids stage 2 trains on (the tokenizer never runs at prior training time).

A token folder holds ``tokens-00000.npy`` (uint16 when codebook_size <= 65536, else int32; shape
(N, h, w), or (N, V, h, w) when every image is stored as V views, e.g. itself and its mirror
image), ``labels-00000.npy`` (int64, shape (N,)), ... and ``meta.json`` (``views``: V, 1 when
absent; per shard its file names, ``count`` and ``rows_sha256``, a checksum of evenly spaced rows
that the reader verifies, so a shard replaced by hand is named rather than trained on). Every shard
and ``meta.json`` is written atomically (temporary file + rename) and meta.json is rewritten after
each shard, so an interrupted encode leaves a consistent folder that
``TokenShardWriter.resume`` continues: ``writer.count`` rows are stored, and the caller skips its
first ``writer.items_done`` source items (they differ when the caller skipped unreadable items).
``source-files.json``, written by `vqgpt encode`, lists the image files encoded (path, size,
modification time), so that a re-run can say what changed.

Several processes write one folder as *parts*: ``TokenShardWriter(..., part="r001")`` writes
``tokens-r001-00000.npy``, ... and keeps its progress in ``progress-r001.json`` instead of
meta.json, so that no two processes ever write the same file; ``merge_parts`` then lists the
parts' shards, in the order given, in meta.json.
"""

from __future__ import annotations

import errno
import hashlib
import json
import operator
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from vqgpt.ground.files import write_bytes_whole

META_FILE = "meta.json"
SOURCE_FILE = "source-files.json"
PROGRESS_PATTERN = "progress-*.json"
# 2: adds ``views`` (tokens (N, V, h, w) when V > 1); a version-1 folder reads as one view per image
FORMAT_VERSION = 2
DEFAULT_SHARD_SIZE = 10_000
# meta keys owned by the writer; the caller's meta dict supplies everything else
_WRITER_KEYS = ("format_version", "grid_size", "codebook_size", "dtype", "views", "count", "shards", "complete",
                "items_done", "unreadable")


class TokenShardError(ValueError):
    """Token shards are missing, inconsistent, or made by another tokenizer; the message names the file."""


# The most codes a token shard can hold: codes 0 .. 2**31 - 1 fit int32, the widest storage dtype. A
# tokenizer's or prior's codebook_size (its vocabulary) above this is a config error.
MAX_CODEBOOK_SIZE = int(np.iinfo(np.int32).max) + 1


def token_dtype(codebook_size: int) -> np.dtype:
    """Smallest storage dtype for codes in [0, codebook_size): uint16 up to 65536, else int32 (up to
    ``MAX_CODEBOOK_SIZE``); a size it cannot hold is a ValueError, not codes that wrap around."""
    try:
        size = None if isinstance(codebook_size, bool) else operator.index(codebook_size)
    except TypeError:
        size = None
    if size is None or not 1 <= size <= MAX_CODEBOOK_SIZE:
        raise ValueError(f"codebook_size must be an integer in 1..{MAX_CODEBOOK_SIZE} (2**31: codes are stored "
                         f"as int32 at most), got {codebook_size!r}")
    return np.dtype(np.uint16) if size <= 65536 else np.dtype(np.int32)


def fingerprint_file(path: str | Path) -> str:
    """sha256 of a file's bytes, first 16 hex characters (identifies an exported tokenizer)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


# Rows of a shard covered by its checksum in meta.json (``rows_sha256``): evenly spaced, both ends
# included. Reading them costs the opening check no more than its spot check, yet a shard swapped in
# from another encode (same shape, other codes) cannot match.
CHECKSUM_ROWS = 1024
# Grids of a whole set covered by ``TokenDataset.rows_digest`` (what a prior run records of its rows).
DIGEST_ROWS = 4096


def _checked_rows(count: int, rows: int) -> np.ndarray:
    """``rows`` evenly spaced row numbers in [0, count) (all of them when count <= rows), both ends included."""
    return np.unique(np.linspace(0, count - 1, min(count, rows)).astype(np.int64)) if count else np.zeros(0, np.int64)


def shard_checksum(tokens: np.ndarray, labels: np.ndarray) -> str:
    """sha256 (hex) of the codes and labels of a shard's ``CHECKSUM_ROWS`` checked rows, as stored."""
    rows = _checked_rows(len(tokens), CHECKSUM_ROWS)
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(tokens[rows]).tobytes())
    digest.update(np.ascontiguousarray(labels[rows]).astype("<i8").tobytes())
    return digest.hexdigest()


def check_tokenizer_match(meta: dict[str, Any], fingerprint: str, where: str | Path = "token shards") -> None:
    """Raise TokenShardError when ``meta`` was written by a tokenizer with another fingerprint."""
    stored = meta.get("tokenizer_fingerprint")
    if stored != fingerprint:
        raise TokenShardError(f"{where} were encoded by tokenizer {stored!r}, but this tokenizer is {fingerprint!r}; "
                              f"re-run `vqgpt encode` with this tokenizer")


def _atomic_write_bytes(path: Path, write: Any) -> None:
    """Write via ``write(file)`` into a temporary sibling, fsync, then rename over ``path``; on failure the
    temporary file goes, and a full disk is an error naming ``path`` (``vqgpt.ground.files``)."""
    write_bytes_whole(path, write, tmp=path.with_name(path.name + ".tmp"), sync=True)


def _write_meta(directory: Path, meta: dict[str, Any]) -> None:
    _atomic_write_bytes(directory / META_FILE, lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))


def progress_file(part: str) -> str:
    """Name of the file where the writer of ``part`` records its progress (meta.json for no part)."""
    return f"progress-{part}.json" if part else META_FILE


def read_meta(directory: str | Path, part: str = "") -> dict[str, Any]:
    """Read ``meta.json`` of a token folder (or the progress file of ``part``), with clear errors for a
    missing or broken file."""
    path = Path(directory) / progress_file(part)
    if not path.is_file():
        raise TokenShardError(f"no {path.name} in {directory}: not a token folder (create one with `vqgpt encode`)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TokenShardError(f"{path} is not valid JSON: {exc}") from exc
    missing = [k for k in ("grid_size", "codebook_size", "dtype", "count", "shards") if k not in meta]
    if missing:
        raise TokenShardError(f"{path} lacks the keys {missing}")
    return meta


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as JSON atomically (temporary file + rename)."""
    _atomic_write_bytes(Path(path), lambda f: f.write((json.dumps(data) + "\n").encode()))


TOKEN_FOLDER_PATTERNS = ("tokens-*.npy", "labels-*.npy", "*.tmp", PROGRESS_PATTERN, SOURCE_FILE)  # beside META_FILE


def clear_token_folder(directory: str | Path) -> None:
    """Delete the token shards in ``directory`` (meta.json first, so no half-deleted folder looks valid);
    other files are left alone."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    (directory / META_FILE).unlink(missing_ok=True)
    for pattern in TOKEN_FOLDER_PATTERNS:
        for path in directory.glob(pattern):
            if path.is_file():
                path.unlink()


def _check_caller_meta(meta: dict[str, Any]) -> None:
    clash = sorted(set(meta) & set(_WRITER_KEYS))
    if clash:
        raise ValueError(f"meta keys {clash} are set by the writer; leave them out")


def _check_part(part: str) -> None:
    if part and not re.fullmatch(r"[A-Za-z0-9_]+", part):
        raise ValueError(f"part must be letters, digits or '_' (it goes into file names), got {part!r}")


class TokenShardWriter:
    """Append (B, h, w) code grids (or (B, V, h, w): V views of each image) and (B,) labels; writes a
    shard every ``shard_size`` rows.

    ``part``: write the shards of one process among several (see the module docstring); the
    progress goes to ``progress-{part}.json`` and ``merge_parts`` writes meta.json.
    """

    def __init__(self, out_dir: str | Path, grid_size: Sequence[int], codebook_size: int, meta: dict[str, Any],
                 shard_size: int = DEFAULT_SHARD_SIZE, *, views: int = 1, part: str = "",
                 _existing: dict[str, Any] | None = None) -> None:
        self.out_dir = Path(out_dir)
        if len(grid_size) != 2 or min(grid_size) < 1:
            raise ValueError(f"grid_size must be [h, w] with positive sizes, got {list(grid_size)}")
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        _check_caller_meta(meta)
        _check_part(part)
        self.grid_size = [int(grid_size[0]), int(grid_size[1])]
        self.codebook_size = int(codebook_size)
        self.shard_size = shard_size
        self.views = int(views)
        self.part = part
        # one view is stored as (N, h, w), as before views existed
        self.row_shape = tuple(self.grid_size) if self.views == 1 else (self.views, *self.grid_size)
        self.dtype = token_dtype(codebook_size)
        self._state_file = progress_file(part)
        if _existing is None:
            if (self.out_dir / self._state_file).exists():
                raise FileExistsError(f"{self.out_dir} already holds token shards{f' of part {part}' if part else ''}; "
                                      f"resume them with TokenShardWriter.resume or choose another folder")
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.meta = {**meta, "format_version": FORMAT_VERSION, "grid_size": self.grid_size,
                         "codebook_size": self.codebook_size, "dtype": self.dtype.name, "views": self.views,
                         "count": 0, "items_done": 0, "unreadable": [], "shards": [], "complete": False}
            self._write_state()
        else:
            self.meta = _existing
            self.meta.setdefault("items_done", self.meta["count"])  # folders written before items were tracked
            self.meta.setdefault("unreadable", [])
        self._tokens: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._items: list[np.ndarray] = []
        self._buffered = 0
        self._next_item = int(self.meta["items_done"])
        self.closed = False

    @classmethod
    def resume(cls, out_dir: str | Path, grid_size: Sequence[int], codebook_size: int, meta: dict[str, Any],
               shard_size: int = DEFAULT_SHARD_SIZE, *, views: int = 1, part: str = "") -> "TokenShardWriter":
        """Continue the shards in ``out_dir`` (or start them if there are none); ``.count`` rows are already stored."""
        out_dir = Path(out_dir)
        _check_caller_meta(meta)
        _check_part(part)
        if not (out_dir / progress_file(part)).exists():
            return cls(out_dir, grid_size, codebook_size, meta, shard_size, views=views, part=part)
        stored = read_meta(out_dir, part)
        stored.setdefault("views", 1)  # folders written before views existed hold one
        expected = {"grid_size": [int(g) for g in grid_size], "codebook_size": int(codebook_size),
                    "dtype": token_dtype(codebook_size).name, "views": int(views), **meta}
        for key, value in expected.items():
            if key not in stored or stored[key] != json.loads(json.dumps(value)):
                raise TokenShardError(f"cannot resume {out_dir / progress_file(part)}: {key} is {stored.get(key)!r} "
                                      f"there but {value!r} now; encode into a new folder, or delete the old shards "
                                      f"(`vqgpt encode --overwrite`)")
        return cls(out_dir, grid_size, codebook_size, meta, shard_size, views=views, part=part, _existing=stored)

    def _write_state(self) -> None:
        _atomic_write_bytes(self.out_dir / self._state_file,
                            lambda f: f.write((json.dumps(self.meta, indent=2) + "\n").encode()))

    @property
    def count(self) -> int:
        """Items stored in finished shards (buffered items are not counted until their shard is written)."""
        return int(self.meta["count"])

    @property
    def items_done(self) -> int:
        """Source items handled (stored or skipped) up to the last finished shard: where a resume starts."""
        return int(self.meta["items_done"])

    @property
    def unreadable(self) -> list[str]:
        """Names noted with ``note_unreadable`` (kept in meta.json with the next shard)."""
        return list(self.meta["unreadable"])

    def note_unreadable(self, names: Sequence[str]) -> None:
        """Record source items that could not be read (once each; a resume may meet them again)."""
        listed = self.meta["unreadable"]
        known = getattr(self, "_unreadable_known", None)
        if known is None or len(known) != len(listed):  # kept across calls: a set per batch was quadratic
            known = self._unreadable_known = set(listed)
        for name in dict.fromkeys(names):
            if name not in known:
                listed.append(name)
                known.add(name)

    def add(self, indices: torch.Tensor, labels: torch.Tensor,
            items: torch.Tensor | Sequence[int] | None = None) -> None:
        """Buffer codes (B, h, w) — (B, V, h, w) for V views — in [0, codebook_size) and labels (B,);
        flushes full shards.

        ``items`` (B,): the source item each row comes from, non-decreasing (several rows of one
        item share it; skipped items leave gaps). Default: one item per row, numbered on from the last.
        """
        if self.closed:
            raise RuntimeError(f"TokenShardWriter for {self.out_dir} is closed")
        indices = torch.as_tensor(indices).detach().cpu()
        labels = torch.as_tensor(labels).detach().cpu()
        if indices.ndim != 1 + len(self.row_shape) or tuple(indices.shape[1:]) != self.row_shape:
            raise ValueError(f"indices must be (B, {', '.join(map(str, self.row_shape))}), got {tuple(indices.shape)}")
        if labels.shape != (indices.shape[0],):
            raise ValueError(f"labels must be ({indices.shape[0]},), got {tuple(labels.shape)}")
        if indices.is_floating_point() or labels.is_floating_point():
            raise ValueError("indices and labels must be integer tensors")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(f"indices must lie in [0, {self.codebook_size}), got [{int(indices.min())}, {int(indices.max())}]")
        n = indices.shape[0]
        if items is None:
            item_array = np.arange(self._next_item, self._next_item + n, dtype=np.int64)
        else:
            item_array = np.asarray(torch.as_tensor(items).cpu(), dtype=np.int64).reshape(-1)
            if item_array.shape != (n,):
                raise ValueError(f"items must be ({n},), got {tuple(item_array.shape)}")
            if n and (item_array[0] < self._next_item - 1 or (np.diff(item_array) < 0).any()):
                raise ValueError(f"items must be non-decreasing and continue from {self._next_item}, "
                                 f"got {item_array.tolist()[:8]}")
        if n:
            self._next_item = int(item_array[-1]) + 1
        self._tokens.append(indices.numpy().astype(self.dtype))
        self._labels.append(labels.numpy().astype(np.int64))
        self._items.append(item_array)
        self._buffered += n
        while self._buffered >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, n: int) -> None:
        tokens = np.concatenate(self._tokens)
        labels = np.concatenate(self._labels)
        items = np.concatenate(self._items)
        # never split one item's grids across a shard boundary: a resume restarts at an item, and
        # would store the grids before the boundary twice
        cut = n
        while 0 < cut < len(items) and items[cut - 1] == items[cut]:
            cut -= 1
        n = cut or n
        self._tokens, self._labels, self._items = [tokens[n:]], [labels[n:]], [items[n:]]
        self._buffered -= n
        shard = len(self.meta["shards"])
        stem = f"{self.part}-{shard:05d}" if self.part else f"{shard:05d}"
        names = {"tokens": f"tokens-{stem}.npy", "labels": f"labels-{stem}.npy"}
        _atomic_write_bytes(self.out_dir / names["tokens"], lambda f: np.save(f, np.ascontiguousarray(tokens[:n])))
        _atomic_write_bytes(self.out_dir / names["labels"], lambda f: np.save(f, np.ascontiguousarray(labels[:n])))
        # meta last: a crash before this line leaves the shard unlisted, and resume overwrites it
        self.meta["shards"].append({**names, "count": n, "rows_sha256": shard_checksum(tokens[:n], labels[:n])})
        self.meta["count"] += n
        self.meta["items_done"] = int(items[n - 1]) + 1
        self.meta["complete"] = False
        self._write_state()

    def close(self, items_done: int | None = None) -> None:
        """Write the last (partial) shard and mark the folder complete.

        ``items_done``: the number of source items handled in all (default: one past the last item
        stored), so that skipped items at the end count too."""
        if self.closed:
            return
        if self._buffered:
            self._flush(self._buffered)
        self.meta["items_done"] = max(self.items_done, self._next_item, items_done or 0)
        self.meta["complete"] = True
        self._write_state()
        self.closed = True

    def __enter__(self) -> "TokenShardWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()  # on error keep the folder incomplete (resumable), dropping buffered items


def merge_parts(out_dir: str | Path, parts: Sequence[str], grid_size: Sequence[int], codebook_size: int,
                meta: dict[str, Any], views: int = 1) -> dict[str, Any]:
    """Write meta.json listing the finished shards of ``parts`` (``TokenShardWriter(part=...)``), in the
    order given; it is complete when every part is (the parts' progress files are then deleted).

    A part not started yet adds nothing. Returns the meta written.
    """
    out_dir = Path(out_dir)
    _check_caller_meta(meta)
    merged: dict[str, Any] = {**meta, "format_version": FORMAT_VERSION, "grid_size": [int(g) for g in grid_size],
                              "codebook_size": int(codebook_size), "dtype": token_dtype(codebook_size).name,
                              "views": int(views), "count": 0, "items_done": 0, "unreadable": [], "shards": [],
                              "complete": True}
    for part in parts:
        _check_part(part)
        if not (out_dir / progress_file(part)).exists():
            merged["complete"] = False
            continue
        state = read_meta(out_dir, part)
        for key in ("grid_size", "codebook_size", "dtype", "views"):
            if state.get(key, 1 if key == "views" else None) != merged[key]:
                raise TokenShardError(f"{out_dir / progress_file(part)}: {key} is {state.get(key)!r} there but "
                                      f"{merged[key]!r} in the other parts; delete the shards "
                                      f"(`vqgpt encode --overwrite`)")
        merged["shards"] += state["shards"]
        merged["count"] += int(state["count"])
        merged["items_done"] += int(state.get("items_done", state["count"]))
        merged["unreadable"] += state.get("unreadable", [])
        merged["complete"] = merged["complete"] and bool(state.get("complete"))
    _write_meta(out_dir, merged)
    if merged["complete"]:  # meta.json now holds all they said
        for part in parts:
            (out_dir / progress_file(part)).unlink(missing_ok=True)
    return merged


def _meta_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _meta_number(meta: dict[str, Any], key: str, path: Path, low: int = 1) -> int:
    """meta.json's ``key`` as a whole number >= ``low``, else a TokenShardError naming the file and key."""
    value = meta.get(key)
    if not _meta_int(value) or value < low:
        raise TokenShardError(f"{path}: {key} must be a whole number >= {low}, got {value!r}")
    return value


def plain_file_name(name: Any) -> bool:
    """Whether ``name`` is a file name in a folder itself (text, not a path into another folder)."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


class TokenDataset(Dataset):
    """Memory-mapped token shards: item i -> (codes (h, w) int64, label int).

    When the shards hold V > 1 views of each image (``vqgpt encode --augment flip|ten-crop``), an
    item is one of them, drawn from torch's RNG at each access; inside ``SeededSamples`` (the
    training stream) that RNG is seeded by (seed, epoch, index), so the choice is reproducible and
    a resumed run draws the same views. ``len`` counts images, not views.
    """

    def __init__(self, directory: str | Path, allow_incomplete: bool = False, check_samples: int = 1024) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise TokenShardError(f"token folder not found: {directory}")
        self.meta = read_meta(self.directory)
        meta_path = self.directory / META_FILE
        if not self.meta.get("complete", True) and not allow_incomplete:
            raise TokenShardError(f"{meta_path}: the encode that wrote it did not finish ({self.meta['count']} items stored); "
                                  f"re-run `vqgpt encode` to resume it")
        meta = self.meta
        grid = meta["grid_size"]
        if not (isinstance(grid, list) and len(grid) == 2 and all(_meta_int(g) for g in grid)):
            raise TokenShardError(f"{meta_path}: grid_size must be two whole numbers [h, w], got {grid!r}")
        self.grid_size = [int(g) for g in grid]
        self.codebook_size = _meta_number(meta, "codebook_size", meta_path)
        self.classes = list(meta.get("classes") or [])
        if not all(isinstance(c, str) for c in self.classes):
            raise TokenShardError(f"{meta_path}: classes must be a list of names, got {meta.get('classes')!r}")
        self.num_classes = (_meta_number(meta, "num_classes", meta_path, low=0) if meta.get("num_classes") is not None
                            else len(self.classes))
        if self.classes and len(self.classes) != self.num_classes:
            raise TokenShardError(f"{meta_path}: {len(self.classes)} class names but num_classes "
                                  f"{self.num_classes}: the file was edited; encode again")
        self.views = _meta_number(meta, "views", meta_path) if "views" in meta else 1  # absent: before views
        row_shape = tuple(self.grid_size) if self.views == 1 else (self.views, *self.grid_size)
        try:
            dtype = np.dtype(meta["dtype"])
        except TypeError:
            raise TokenShardError(f"{meta_path}: dtype {meta['dtype']!r} is no numpy type") from None
        if dtype.kind not in "iu" or dtype.itemsize < token_dtype(self.codebook_size).itemsize:
            raise TokenShardError(f"{meta_path}: dtype {dtype.name} cannot hold codebook_size {self.codebook_size} "
                                  f"codes (expected {token_dtype(self.codebook_size).name})")
        shards = meta["shards"]
        if not isinstance(shards, list) or not all(isinstance(x, dict) and {"tokens", "labels", "count"} <= x.keys()
                                                   for x in shards):
            raise TokenShardError(f"{meta_path}: shards must be a list of {{tokens, labels, count}} entries")
        bad = [name for x in shards for name in (x["tokens"], x["labels"]) if not plain_file_name(name)]
        if bad:
            raise TokenShardError(f"{meta_path}: shard file {bad[0]!r} is no file name in this folder")
        self._files = [(self.directory / x["tokens"], self.directory / x["labels"]) for x in shards]
        if not all(_meta_int(x["count"]) and x["count"] >= 0 for x in shards):
            raise TokenShardError(f"{meta_path}: each shard's count must be a whole number >= 0")
        counts = [int(x["count"]) for x in shards]
        if sum(counts) != int(self.meta["count"]):
            raise TokenShardError(f"{meta_path}: shard counts add up to {sum(counts)}, but count is {self.meta['count']}")
        self._offsets = np.cumsum([0] + counts)
        self._arrays: list[tuple[np.ndarray, np.ndarray]] | None = None
        for shard, (tokens_path, labels_path), (tokens, labels), count in zip(shards, self._files, self._open(),
                                                                              counts):
            if tokens.dtype != dtype or tokens.shape != (count, *row_shape):
                raise TokenShardError(f"{tokens_path}: expected {dtype.name} of shape {(count, *row_shape)}, "
                                      f"found {tokens.dtype.name} of shape {tokens.shape}")
            if labels.shape != (count,) or labels.dtype.kind not in "iu":
                raise TokenShardError(f"{labels_path}: expected integer labels of shape ({count},), "
                                      f"found {labels.dtype.name} of shape {labels.shape}")
            # spot check (evenly spaced rows) rather than reading every shard in full
            rows = _checked_rows(count, check_samples)
            if len(rows):
                top = int(np.asarray(tokens[rows]).max())
                if top >= self.codebook_size:
                    raise TokenShardError(f"{tokens_path}: token value {top} >= codebook_size {self.codebook_size}")
                sample = np.asarray(labels[rows])
                if sample.min() < 0 or (self.num_classes and sample.max() >= self.num_classes):
                    raise TokenShardError(f"{labels_path}: label out of range [0, {self.num_classes}): "
                                          f"[{sample.min()}, {sample.max()}]")
            stored = shard.get("rows_sha256")  # absent in folders written before checksums
            if stored is not None and stored != shard_checksum(tokens, labels):
                raise TokenShardError(f"{tokens_path} / {labels_path.name}: the codes or labels differ from those "
                                      f"written by the encode ({META_FILE}'s rows_sha256): the shard was replaced "
                                      f"or edited since; encode again")

    def _open(self) -> list[tuple[np.ndarray, np.ndarray]]:
        if self._arrays is None:
            arrays = []
            for tokens_path, labels_path in self._files:
                for path in (tokens_path, labels_path):
                    if not path.is_file():
                        raise TokenShardError(f"shard file missing: {path} (listed in {self.directory / META_FILE})")
                try:
                    # the codes memory-mapped (each map holds a file open), the small labels read whole
                    arrays.append((np.load(tokens_path, mmap_mode="r"), np.load(labels_path)))
                except (ValueError, EOFError, OSError) as exc:  # an empty file: EOFError
                    hint = (f" ({len(self._files)} shards stay open while training: raise the limit, ulimit -n)"
                            if isinstance(exc, OSError) and exc.errno == errno.EMFILE else "")
                    raise TokenShardError(f"cannot read shard {tokens_path} / {labels_path}: {exc}{hint}") from exc
            self._arrays = arrays
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        # memory maps are reopened in each DataLoader worker rather than pickled (which would copy them)
        state = dict(self.__dict__)
        state["_arrays"] = None
        return state

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _locate(self, index: int) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(tokens, labels, row) of the shard holding grid ``index`` (negative counts from the end), and
        that shard's number."""
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} token grids in {self.directory}")
        shard = int(np.searchsorted(self._offsets, index, side="right")) - 1
        tokens, labels = self._open()[shard]
        return tokens, labels, index - int(self._offsets[shard]), shard

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        tokens, labels, row, shard = self._locate(index)
        index = int(self._offsets[shard]) + row  # as counted from the start
        if self.views == 1:  # no draw: one-view shards leave torch's RNG exactly as before views existed
            codes = tokens[row]
        else:
            codes = tokens[row, int(torch.randint(self.views, ()))]
        codes, label = np.asarray(codes, dtype=np.int64), int(labels[row])
        # every row read is checked (the opening check samples rows): a bad value is named here, not as an
        # index error deep inside the model (a device-side assert on a GPU)
        if codes.max() >= self.codebook_size or codes.min() < 0:
            raise TokenShardError(f"{self._files[shard][0]}: grid {index} holds a token outside "
                                  f"[0, {self.codebook_size}): {int(codes.min())}..{int(codes.max())}")
        if label < 0 or (self.num_classes and label >= self.num_classes):
            raise TokenShardError(f"{self._files[shard][1]}: grid {index} has label {label}, outside "
                                  f"[0, {self.num_classes})")
        return torch.from_numpy(codes), label

    def rows_digest(self) -> str:
        """sha256 (hex) of the codes (every view) and labels of ``DIGEST_ROWS`` evenly spaced grids of the whole
        set, in order. Unlike the shards' checksums it does not depend on where the shards were cut, so it
        knows the same rows written by an encode on another number of processes."""
        digest = hashlib.sha256()
        for index in _checked_rows(len(self), DIGEST_ROWS):
            tokens, labels, row, _ = self._locate(int(index))
            digest.update(np.asarray(tokens[row], dtype="<i8").tobytes())
            digest.update(np.asarray(labels[row], dtype="<i8").tobytes())
        return digest.hexdigest()

    def all_views(self, index: int) -> torch.Tensor:
        """Every stored view of image ``index``: codes (V, h, w) int64."""
        tokens, _, row, _ = self._locate(index)
        return torch.from_numpy(np.asarray(tokens[row], dtype=np.int64)).reshape(self.views, *self.grid_size)

    def check_tokenizer(self, fingerprint: str) -> None:
        """Raise TokenShardError unless these shards were made by the tokenizer with ``fingerprint``."""
        check_tokenizer_match(self.meta, fingerprint, where=f"token shards in {self.directory}")

    def load_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every grid in memory: codes (N*V, h, w) int64 and labels (N*V,) int64 (for small token sets);
        with V views the V grids of an image are consecutive, in the order of ``meta["view_names"]``."""
        arrays = self._open()
        if not arrays:
            return torch.empty(0, *self.grid_size, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
        tokens = np.concatenate([np.asarray(t, dtype=np.int64) for t, _ in arrays]).reshape(-1, *self.grid_size)
        labels = np.concatenate([np.asarray(l, dtype=np.int64) for _, l in arrays]).repeat(self.views)
        return torch.from_numpy(tokens), torch.from_numpy(labels)
