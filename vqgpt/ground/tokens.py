"""Token shards: the integer code grids stage 2 trains on (the tokenizer never runs at prior training time).

A token folder holds ``tokens-00000.npy`` (uint16 when codebook_size <= 65536, else int32; shape
(N, h, w)), ``labels-00000.npy`` (int64, shape (N,)), ... and ``meta.json``. Every shard and
``meta.json`` is written atomically (temporary file + rename) and meta.json is rewritten after each
shard, so an interrupted encode leaves a consistent folder that ``TokenShardWriter.resume``
continues: ``writer.count`` grids are stored, and the caller skips its first ``writer.items_done``
source items (they differ when the caller skipped unreadable items or stores two grids per item).
``source-files.json``, written by `vqgpt encode`, lists the image files encoded (path, size,
modification time), so that a re-run can say what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

META_FILE = "meta.json"
SOURCE_FILE = "source-files.json"
FORMAT_VERSION = 1
DEFAULT_SHARD_SIZE = 10_000
# meta keys owned by the writer; the caller's meta dict supplies everything else
_WRITER_KEYS = ("format_version", "grid_size", "codebook_size", "dtype", "count", "shards", "complete",
                "items_done", "unreadable")


class TokenShardError(ValueError):
    """Token shards are missing, inconsistent, or made by another tokenizer; the message names the file."""


def token_dtype(codebook_size: int) -> np.dtype:
    """Smallest storage dtype for codes in [0, codebook_size): uint16 up to 65536, else int32."""
    return np.dtype(np.uint16) if codebook_size <= 65536 else np.dtype(np.int32)


def fingerprint_file(path: str | Path) -> str:
    """sha256 of a file's bytes, first 16 hex characters (identifies an exported tokenizer)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def check_tokenizer_match(meta: dict[str, Any], fingerprint: str, where: str | Path = "token shards") -> None:
    """Raise TokenShardError when ``meta`` was written by a tokenizer with another fingerprint."""
    stored = meta.get("tokenizer_fingerprint")
    if stored != fingerprint:
        raise TokenShardError(f"{where} were encoded by tokenizer {stored!r}, but this tokenizer is {fingerprint!r}; "
                              f"re-run `vqgpt encode` with this tokenizer")


def _atomic_write_bytes(path: Path, write: Any) -> None:
    """Write via ``write(file)`` into a temporary sibling, fsync, then rename over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_meta(directory: Path, meta: dict[str, Any]) -> None:
    _atomic_write_bytes(directory / META_FILE, lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))


def read_meta(directory: str | Path) -> dict[str, Any]:
    """Read ``meta.json`` of a token folder, with clear errors for a missing or broken file."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise TokenShardError(f"no {META_FILE} in {directory}: not a token folder (create one with `vqgpt encode`)")
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


def clear_token_folder(directory: str | Path) -> None:
    """Delete the token shards in ``directory`` (meta.json first, so no half-deleted folder looks valid);
    other files are left alone."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    (directory / META_FILE).unlink(missing_ok=True)
    for pattern in ("tokens-*.npy", "labels-*.npy", "*.tmp", SOURCE_FILE):
        for path in directory.glob(pattern):
            if path.is_file():
                path.unlink()


def _check_caller_meta(meta: dict[str, Any]) -> None:
    clash = sorted(set(meta) & set(_WRITER_KEYS))
    if clash:
        raise ValueError(f"meta keys {clash} are set by the writer; leave them out")


class TokenShardWriter:
    """Append (B, h, w) code grids and (B,) labels; writes a shard every ``shard_size`` items."""

    def __init__(self, out_dir: str | Path, grid_size: Sequence[int], codebook_size: int, meta: dict[str, Any],
                 shard_size: int = DEFAULT_SHARD_SIZE, *, _existing: dict[str, Any] | None = None) -> None:
        self.out_dir = Path(out_dir)
        if len(grid_size) != 2 or min(grid_size) < 1:
            raise ValueError(f"grid_size must be [h, w] with positive sizes, got {list(grid_size)}")
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        _check_caller_meta(meta)
        self.grid_size = [int(grid_size[0]), int(grid_size[1])]
        self.codebook_size = int(codebook_size)
        self.shard_size = shard_size
        self.dtype = token_dtype(codebook_size)
        if _existing is None:
            if (self.out_dir / META_FILE).exists():
                raise FileExistsError(f"{self.out_dir} already holds token shards; resume them with "
                                      f"TokenShardWriter.resume or choose another folder")
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.meta = {**meta, "format_version": FORMAT_VERSION, "grid_size": self.grid_size,
                         "codebook_size": self.codebook_size, "dtype": self.dtype.name, "count": 0,
                         "items_done": 0, "unreadable": [], "shards": [], "complete": False}
            _write_meta(self.out_dir, self.meta)
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
               shard_size: int = DEFAULT_SHARD_SIZE) -> "TokenShardWriter":
        """Continue the shards in ``out_dir`` (or start them if there are none); ``.count`` items are already stored."""
        out_dir = Path(out_dir)
        _check_caller_meta(meta)
        if not (out_dir / META_FILE).exists():
            return cls(out_dir, grid_size, codebook_size, meta, shard_size)
        stored = read_meta(out_dir)
        expected = {"grid_size": [int(g) for g in grid_size], "codebook_size": int(codebook_size),
                    "dtype": token_dtype(codebook_size).name, **meta}
        for key, value in expected.items():
            if key not in stored or stored[key] != json.loads(json.dumps(value)):
                raise TokenShardError(f"cannot resume {out_dir / META_FILE}: {key} is {stored.get(key)!r} there "
                                      f"but {value!r} now; encode into a new folder, or delete the old shards "
                                      f"(`vqgpt encode --overwrite`)")
        return cls(out_dir, grid_size, codebook_size, meta, shard_size, _existing=stored)

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
        known = set(self.meta["unreadable"])
        self.meta["unreadable"] += [n for n in dict.fromkeys(names) if n not in known]

    def add(self, indices: torch.Tensor, labels: torch.Tensor,
            items: torch.Tensor | Sequence[int] | None = None) -> None:
        """Buffer codes (B, h, w) in [0, codebook_size) and labels (B,); flushes full shards.

        ``items`` (B,): the source item each grid comes from, non-decreasing (several grids of one
        item, e.g. an image and its mirror image, share it; skipped items leave gaps). Default: one
        item per grid, numbered on from the last.
        """
        if self.closed:
            raise RuntimeError(f"TokenShardWriter for {self.out_dir} is closed")
        indices = torch.as_tensor(indices).detach().cpu()
        labels = torch.as_tensor(labels).detach().cpu()
        if indices.ndim != 3 or list(indices.shape[1:]) != self.grid_size:
            raise ValueError(f"indices must be (B, {self.grid_size[0]}, {self.grid_size[1]}), got {tuple(indices.shape)}")
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
        names = {"tokens": f"tokens-{shard:05d}.npy", "labels": f"labels-{shard:05d}.npy"}
        _atomic_write_bytes(self.out_dir / names["tokens"], lambda f: np.save(f, np.ascontiguousarray(tokens[:n])))
        _atomic_write_bytes(self.out_dir / names["labels"], lambda f: np.save(f, np.ascontiguousarray(labels[:n])))
        # meta last: a crash before this line leaves the shard unlisted, and resume overwrites it
        self.meta["shards"].append({**names, "count": n})
        self.meta["count"] += n
        self.meta["items_done"] = int(items[n - 1]) + 1
        self.meta["complete"] = False
        _write_meta(self.out_dir, self.meta)

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
        _write_meta(self.out_dir, self.meta)
        self.closed = True

    def __enter__(self) -> "TokenShardWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()  # on error keep the folder incomplete (resumable), dropping buffered items


class TokenDataset(Dataset):
    """Memory-mapped token shards: item i -> (codes (h, w) int64, label int)."""

    def __init__(self, directory: str | Path, allow_incomplete: bool = False, check_samples: int = 1024) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise TokenShardError(f"token folder not found: {directory}")
        self.meta = read_meta(self.directory)
        meta_path = self.directory / META_FILE
        if not self.meta.get("complete", True) and not allow_incomplete:
            raise TokenShardError(f"{meta_path}: the encode that wrote it did not finish ({self.meta['count']} items stored); "
                                  f"re-run `vqgpt encode` to resume it")
        self.grid_size = [int(g) for g in self.meta["grid_size"]]
        self.codebook_size = int(self.meta["codebook_size"])
        self.classes = list(self.meta.get("classes") or [])
        self.num_classes = int(self.meta.get("num_classes") or len(self.classes))
        dtype = np.dtype(self.meta["dtype"])
        shards = self.meta["shards"]
        self._files = [(self.directory / s["tokens"], self.directory / s["labels"]) for s in shards]
        counts = [int(s["count"]) for s in shards]
        if sum(counts) != int(self.meta["count"]):
            raise TokenShardError(f"{meta_path}: shard counts add up to {sum(counts)}, but count is {self.meta['count']}")
        self._offsets = np.cumsum([0] + counts)
        self._arrays: list[tuple[np.ndarray, np.ndarray]] | None = None
        for (tokens_path, labels_path), (tokens, labels), count in zip(self._files, self._open(), counts):
            if tokens.dtype != dtype or tokens.shape != (count, *self.grid_size):
                raise TokenShardError(f"{tokens_path}: expected {dtype.name} of shape {(count, *self.grid_size)}, "
                                      f"found {tokens.dtype.name} of shape {tokens.shape}")
            if labels.shape != (count,) or labels.dtype.kind not in "iu":
                raise TokenShardError(f"{labels_path}: expected integer labels of shape ({count},), "
                                      f"found {labels.dtype.name} of shape {labels.shape}")
            # spot check (evenly spaced rows) rather than reading every shard in full
            rows = np.unique(np.linspace(0, count - 1, min(count, check_samples)).astype(np.int64)) if count else []
            if len(rows):
                top = int(np.asarray(tokens[rows]).max())
                if top >= self.codebook_size:
                    raise TokenShardError(f"{tokens_path}: token value {top} >= codebook_size {self.codebook_size}")
                sample = np.asarray(labels[rows])
                if sample.min() < 0 or (self.num_classes and sample.max() >= self.num_classes):
                    raise TokenShardError(f"{labels_path}: label out of range [0, {self.num_classes}): "
                                          f"[{sample.min()}, {sample.max()}]")

    def _open(self) -> list[tuple[np.ndarray, np.ndarray]]:
        if self._arrays is None:
            arrays = []
            for tokens_path, labels_path in self._files:
                for path in (tokens_path, labels_path):
                    if not path.is_file():
                        raise TokenShardError(f"shard file missing: {path} (listed in {self.directory / META_FILE})")
                try:
                    arrays.append((np.load(tokens_path, mmap_mode="r"), np.load(labels_path, mmap_mode="r")))
                except ValueError as exc:
                    raise TokenShardError(f"cannot read shard {tokens_path} / {labels_path}: {exc}") from exc
            self._arrays = arrays
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        # memory maps are reopened in each DataLoader worker rather than pickled (which would copy them)
        state = dict(self.__dict__)
        state["_arrays"] = None
        return state

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} token grids in {self.directory}")
        shard = int(np.searchsorted(self._offsets, index, side="right")) - 1
        row = index - int(self._offsets[shard])
        tokens, labels = self._open()[shard]
        return torch.from_numpy(np.asarray(tokens[row], dtype=np.int64)), int(labels[row])

    def check_tokenizer(self, fingerprint: str) -> None:
        """Raise TokenShardError unless these shards were made by the tokenizer with ``fingerprint``."""
        check_tokenizer_match(self.meta, fingerprint, where=f"token shards in {self.directory}")

    def load_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every grid in memory: codes (N, h, w) int64 and labels (N,) int64 (for small token sets)."""
        arrays = self._open()
        if not arrays:
            return torch.empty(0, *self.grid_size, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
        tokens = np.concatenate([np.asarray(t, dtype=np.int64) for t, _ in arrays])
        labels = np.concatenate([np.asarray(l, dtype=np.int64) for _, l in arrays])
        return torch.from_numpy(tokens), torch.from_numpy(labels)
