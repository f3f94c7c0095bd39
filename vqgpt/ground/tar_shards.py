"""Tar shards (the webdataset layout) as a random-access image source: ``data.source: "wds:SHARDS"``.

SHARDS is a brace pattern (``wds:/data/train-{000000..000127}.tar``, expanded with ``braceexpand``
as webdataset does) or a folder, whose ``*.tar`` files are the shards in name order. A sample is
the members that share a key (webdataset's rule: a member's name up to the first dot of its base
name): its image is the member with extension jpg, jpeg, png or webp (bmp, gif, tif and tiff are
read too), its class the ``cls`` member (an integer, or a class name) or else the ``label`` or
``class`` field of the ``json`` member. A sample without an image member is left out.

Classes: integer classes are their own index (``classes`` is "0" .. the largest, each named by the
text ``class`` field of a sample's json when there is one, as ``vqgpt shard`` writes it); class
names are numbered in sorted order (an integer that cannot be an index is refused: see
``class_table``); shards without any class hold the one class "default". Shards
that ``vqgpt shard`` wrote take their classes from the ``classes.json`` beside them, the source's
whole list, so that a class none of whose images could be read keeps its name and its index.

Random access, and what it buys: each shard is indexed once (key -> byte offset and size of the
image member, and the class), by reading its member headers, into one small JSON file per shard in
the folder source's index cache (``data.index_dir``, default ``~/.cache/vqgpt/index``; see
``file_index``). The index records the shard's size and modification time and is rebuilt when
either changes; ``vqgpt shard`` indexes the shards it writes. An item is then one read at a known
offset and a decode, so the source is a map-style dataset and the training machinery treats it
exactly like a folder: accelerate's seeded sampler splits each epoch's shuffled order across
ranks, DataLoader workers split each rank's batches, and every sample is seen once per epoch (the
trainers drop the last incomplete global batch, a different remainder each epoch). Shard
boundaries play no part in the order: a shard is read wherever its samples fall.

Resume granularity: one sample. A checkpoint records how many batches of the epoch were consumed;
the resumed run rebuilds the same shuffled order and starts at the first sample not yet consumed,
with the same per-sample augmentation (``SeededSamples``). Only a resume with another process
count or batch size whose global batch does not divide the samples consumed rounds down (and
warns), as for every source.

Shards must be uncompressed ``.tar`` (a ``.tar.gz`` cannot be read at an offset). Like a folder,
shards have no held-out split: ``"train"`` and ``"eval"`` both hold every sample, eval with
center crops and no flip. A member that fails to decode is returned as ``Unreadable`` named
``SHARD/MEMBER``, warned about once per process and left out of its batch by the loaders.
"""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from braceexpand import braceexpand
from webdataset.tariterators import base_plus_ext

from vqgpt.ground.dataset_base import DataConfig, EncodedImageDataset, _check_index, class_table
from vqgpt.ground.file_index import index_path
from vqgpt.ground.files import umask
from vqgpt.ground.images import IMAGE_EXTENSIONS

PREFIX = "wds:"
IMAGE_KEYS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)  # jpg jpeg png webp bmp gif tif tiff
_COMPRESSED_TARS = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tzst")
INDEX_FORMAT = 4  # bump when the stored fields or the grouping change: older index files are rebuilt (3: class
# names keep their spaces; 4: a sample's members apart, or one twice, are refused)
# ``vqgpt shard`` writes the source's class names beside its shards: a class without a readable image
# has no sample to carry its name, and the classes above the largest one present would be lost
CLASSES_FILE = "classes.json"


def shard_paths(source: str) -> list[Path]:
    """The shard files of a ``wds:`` source, in order (a brace pattern, or every ``*.tar`` of a folder)."""
    spec = source.strip()[len(PREFIX):].strip()
    if not spec:
        raise ValueError(f"data.source {source!r} names no shards: give wds:/path/shard-{{000000..000009}}.tar "
                         f"or wds:/folder/of/tars")
    folder = Path(spec).expanduser()
    if folder.is_file():  # likewise one shard whose path holds braces
        return [folder]
    if folder.is_dir():  # before brace expansion: a folder named run{a,b} is that folder
        files = [p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file()]
        shards = sorted(p for p in files if p.suffix.lower() == ".tar")  # (.TAR too)
        # compressed shards were left out without a word beside plain ones
        packed = sorted(p.name for p in files if p.name.lower().endswith(_COMPRESSED_TARS))
        if packed:
            raise ValueError(f"data.source {source}: the folder {folder} holds compressed tar files "
                             f"({', '.join(packed[:3])}{', ...' if len(packed) > 3 else ''}), which cannot be read at "
                             f"an offset: decompress them to .tar")
        if not shards:
            raise ValueError(f"data.source {source}: the folder {folder} holds no .tar files")
        return shards
    shards = list(dict.fromkeys(Path(p).expanduser() for p in braceexpand(spec)))  # repeats read once
    missing = [p for p in shards if not p.is_file()]
    if missing:
        shown = ", ".join(map(str, missing[:3])) + (", ..." if len(missing) > 3 else "")
        glob = " (wds: expands braces, such as shard-{000000..000009}.tar, not * or ?: for every .tar in a " \
            "folder give wds:FOLDER)" if any(c in spec for c in "*?[") else ""
        raise FileNotFoundError(f"data.source {source}: {len(missing)} of {len(shards)} shard files not found "
                                f"({shown}){glob}")
    return shards


def listed_classes(shards: list[Path]) -> list[str] | None:
    """The class names ``vqgpt shard`` listed beside ``shards`` (FOLDER/classes.json), when they all lie
    in one folder that holds that file; else None."""
    folders = {shard.parent for shard in shards}
    path = next(iter(folders)) / CLASSES_FILE
    if len(folders) != 1 or not path.is_file():
        return None
    try:
        classes = json.loads(path.read_text(encoding="utf-8")).get("classes")
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"{path}: not the class list vqgpt shard writes ({exc}); repair or delete it") from None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"{path}: 'classes' must be a non-empty list of class names; repair or delete it")
    return classes


def _agreeing(listed: list[str], labels: np.ndarray, names: dict[int, str], path: Path) -> list[str]:
    """``listed`` (classes.json), once the samples' labels and the names they carry agree with it."""
    if len(labels) and int(labels.max()) >= len(listed):
        raise ValueError(f"{path} lists {len(listed)} classes, but a sample has the class {int(labels.max())}: "
                         f"the file belongs to other shards; delete it")
    wrong = [k for k, name in names.items() if listed[k] != name]
    if wrong:
        k = wrong[0]
        raise ValueError(f"{path} names class {k} {listed[k]!r}, but its samples say {names[k]!r}: the file "
                         f"belongs to other shards; delete it")
    return list(listed)


def _class_value(text: str) -> int | str:
    """A class as stored: the text of an integer is that integer, anything else a class name, less a final
    line end only: 'cat ' and 'cat' are two classes, as two folders so named are."""
    try:
        return int(text.strip())
    except ValueError:
        return text.removesuffix("\n").removesuffix("\r")


def _sample_class(cls: bytes | None, meta: bytes | None, where: str) -> tuple[int | str | None, str | None]:
    """(class, class name from the json, if it gives one) of one sample's cls / json members."""
    fields: dict[str, Any] = {}
    if meta is not None:
        try:
            fields = json.loads(meta)
        except ValueError as exc:
            raise ValueError(f"{where}.json is not valid JSON ({exc})") from None
        if not isinstance(fields, dict):
            fields = {}
    named = fields.get("class")
    name = named if isinstance(named, str) else None
    if cls is not None:
        value = _class_value(cls.decode("utf-8", errors="replace"))
        if value == "":
            raise ValueError(f"{where}.cls is empty: give the class index or name")
        return value, name
    for field in ("label", "class"):
        value = fields.get(field)
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, str)):
            return _class_value(str(value)), name
        raise ValueError(f"{where}.json: the {field!r} field is {type(value).__name__}, not an integer or a name")
    return None, None


BLOCK = 512  # tar header and data alignment
REGULAR = (b"0", b"\0", b"7")  # entry types whose data is a file's bytes
NO_DATA_KINDS = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, fifos


class _Unusual(Exception):
    """A tar entry the fast header reader leaves to tarfile."""


class TruncatedShard(ValueError):
    """A shard that ends inside a member: an interrupted copy or write (tarfile would refuse it too)."""


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # base-256 (GNU): members of 8 GiB and more
        raise _Unusual("base-256 number")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise _Unusual(f"bad number {field!r}") from None


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key] = value
        pos += length
    return records


def _fast_members(shard: Path) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of the regular files of an uncompressed tar, from its headers alone.

    tarfile gives the same about 5x slower (it parses every field of every header into a TarInfo):
    minutes for an ImageNet's shards. This reads ustar, GNU long names and PAX path / size records;
    anything else (a checksum that does not match, sparse files, other entry types) raises
    ``_Unusual`` and the shard is read with tarfile instead.
    """
    members = []
    long_name: str | None = None
    pax: dict[bytes, bytes] = {}
    with open(shard, "rb") as f:
        end = os.fstat(f.fileno()).st_size
        pos = 0
        while True:
            f.seek(pos)
            block = f.read(BLOCK)
            if len(block) < BLOCK and pos == 0:
                raise _Unusual("shorter than one header")
            if len(block) < BLOCK and any(block):  # (a cut inside the closing zero blocks loses nothing)
                after = f" after {members[-1][0]}" if members else ""
                raise TruncatedShard(f"shard {shard} is truncated: it ends inside the header at byte {pos}{after} "
                                     f"({len(block)} of {BLOCK} bytes); copy or write it again")
            # end of archive: the zero blocks, or the end of the file right after a member (tarfile
            # reads such a file without a word, and so does GNU tar)
            if not block or not any(block):
                return members
            if _octal(block[148:156]) != sum(block[:148]) + 8 * 32 + sum(block[156:]):
                raise _Unusual(f"header checksum at byte {pos}")
            size, kind, data_at = _octal(block[124:136]), block[156:157], pos + BLOCK
            if b"size" in pax:
                size = int(pax[b"size"])
            pos = data_at + -(-size // BLOCK) * BLOCK
            if kind not in NO_DATA_KINDS and pos > end:  # its data (or their padding) runs past the end
                name = pax[b"path"].decode("utf-8", "replace") if b"path" in pax else long_name \
                    or block[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
                raise TruncatedShard(f"shard {shard} is truncated: the member {name!r} at byte {data_at - BLOCK} "
                                     f"needs {size} bytes of data (padded to {pos - data_at}) but the file ends "
                                     f"{end - data_at} bytes after its header; copy or write it again")
            if kind in (b"L", b"x", b"K", b"g"):
                f.seek(data_at)
                data = f.read(size)
                if kind == b"L":
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                elif kind == b"x":
                    pax = _pax_records(data)
                elif kind == b"g" and {b"path", b"size"} & _pax_records(data).keys():
                    raise _Unusual("global PAX path or size")
                continue
            if kind in REGULAR:
                name = block[:100].split(b"\0", 1)[0]
                if block[257:262] == b"ustar" and block[345:346] != b"\0":
                    name = block[345:500].split(b"\0", 1)[0] + b"/" + name
                if b"path" in pax:
                    members.append((pax[b"path"].decode("utf-8", "surrogateescape"), data_at, size))
                else:
                    members.append((long_name or name.decode("utf-8", "surrogateescape"), data_at, size))
            elif kind in NO_DATA_KINDS:
                pos = data_at  # as tarfile reads them: their size field never counts
            else:
                raise _Unusual(f"entry type {kind!r}")
            long_name, pax = None, {}


def _tarfile_members(shard: Path) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of the regular files of an uncompressed tar, through tarfile."""
    try:
        # "r:" refuses compression: offsets must be offsets into the file as stored
        with tarfile.open(shard, mode="r:") as tar:
            members = [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
    except tarfile.ReadError as exc:
        hint = " (compressed shards cannot be read at an offset: decompress them to .tar)" \
            if "compress" in str(exc) or shard.suffix != ".tar" else ""
        raise ValueError(f"shard {shard} is not a readable uncompressed tar file: {exc}{hint}") from None
    end = shard.stat().st_size
    for name, offset, size in members:
        if offset + size > end:
            raise TruncatedShard(f"shard {shard} is truncated: the data of its member {name!r} run past the end "
                                 f"of the file ({offset + size - end} of {size} bytes missing); copy or write it "
                                 f"again")
    return members


def _refuse_split_samples(shard: Path, samples: list[tuple[str, dict[str, Any]]]) -> None:
    """Refuse a key that comes back where one of its runs has no image: its members were written apart (a
    tar of a folder in directory order, or `tar cf x.tar *.jpg *.cls`), and each image would lose its class
    to a sample without an image. A whole sample (image and all) under a key seen before is a sample of its
    own, as webdataset reads it."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for key, entry in samples:
        runs.setdefault(key, []).append(entry)
    split = next((key for key, entries in runs.items() if len(entries) > 1
                  and any("image" not in entry for entry in entries)), None)
    if split is not None:
        raise ValueError(f"shard {shard}: the members of the sample {split!r} are not together (other samples' "
                         f"members come between them): a sample is a run of consecutive members with one key, as "
                         f"webdataset reads them; write the tar with its members in name order (tar --sort=name, "
                         f"or `vqgpt shard`)")


def scan_shard(shard: Path) -> dict[str, Any]:
    """Index one shard by reading its member headers (and its small cls / json members)."""
    stat = shard.stat()
    try:
        members = _fast_members(shard)
    except TruncatedShard:
        raise
    except (_Unusual, ValueError, UnicodeDecodeError):  # not plain ustar / GNU / PAX: tarfile knows more
        members = _tarfile_members(shard)
    # A sample is a run of consecutive members with one key (webdataset's grouping): a key that comes
    # back after another key's members starts another sample, it does not add to the first one.
    # A member twice in one sample is refused, as webdataset refuses it (the first image took the last class).
    samples: list[tuple[str, dict[str, Any]]] = []
    with open(shard, "rb") as f:
        for name, offset, size in members:
            base, ext = base_plus_ext(name)
            if base is None:
                continue
            if not samples or samples[-1][0] != base:
                samples.append((base, {}))
            entry = samples[-1][1]
            ext = ext.lower()
            if ext in entry.get("image_exts", ()) if ext in IMAGE_KEYS else ext in ("cls", "json") and ext in entry:
                raise ValueError(f"shard {shard}: the sample {base!r} holds two {ext!r} members ({name}); "
                                 f"webdataset refuses such a shard too: write it again with one member per name")
            if ext in IMAGE_KEYS:
                entry.setdefault("image_exts", set()).add(ext)
            if ext in IMAGE_KEYS and "image" not in entry:
                entry["image"] = (name, offset, size)
            elif ext in ("cls", "json"):
                f.seek(offset)
                entry[ext] = f.read(size)
                if len(entry[ext]) != size:
                    raise TruncatedShard(f"shard {shard} is truncated: its member {name!r} holds {len(entry[ext])} "
                                         f"of {size} bytes; copy or write it again")
    _refuse_split_samples(shard, samples)
    rows, without_image = [], []
    for key, entry in samples:
        if "image" not in entry:
            without_image.append(key)
            continue
        label, name = _sample_class(entry.get("cls"), entry.get("json"), f"{shard}/{key}")
        rows.append([key, *entry["image"], label, name])
    return {"format": INDEX_FORMAT, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "samples": rows,
            "without_image": without_image}


def _read_index(path: Path, stat: os.stat_result) -> dict[str, Any] | None:
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if (isinstance(index, dict) and index.get("format") == INDEX_FORMAT and index.get("size") == stat.st_size
            and index.get("mtime_ns") == stat.st_mtime_ns):
        return index
    return None


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file: ranks indexing at once never see half a file. The
    file takes the umask's mode, as a folder's index does (mkstemp's 0600 kept a group-shared cache's shard
    indexes private, and every other user of the group indexed each shard again on every start)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def shard_index_path(shard: Path, index_dir: str | Path | None = None) -> Path:
    """Where the index of ``shard`` is cached (named like a folder's index, as a .json file)."""
    return index_path(shard, index_dir).with_suffix(".json")


def shard_index_is_fresh(shard: Path, index_dir: str | Path | None = None) -> bool:
    """Whether ``shard`` has a saved index that matches it (the next start reads instead of scanning)."""
    return _read_index(shard_index_path(shard, index_dir), shard.stat()) is not None


def shard_index(shard: Path, index_dir: str | Path | None = None) -> dict[str, Any]:
    """The index of ``shard``: read from its cache file when that matches the shard's size and
    mtime, else built (reading member headers only) and saved for the next start."""
    stat = shard.stat()
    path = shard_index_path(shard, index_dir)
    index = _read_index(path, stat)
    if index is not None:
        return index
    index = scan_shard(shard)
    try:
        _write_atomically(path, json.dumps(index, separators=(",", ":")))
    except OSError as exc:  # still usable; the next start indexes again
        warnings.warn(f"could not save the index of {shard} to {path} ({exc}); set data.index_dir to a "
                      f"writable folder", stacklevel=2)
    return index


class TarShardDataset(EncodedImageDataset):
    """Samples of tar shards, read by offset; class from ``cls`` / ``json`` (see the module docstring)."""

    def __init__(self, cfg: DataConfig, split: str) -> None:
        super().__init__(cfg, split)
        self.shards = shard_paths(cfg.source)
        # Ranks starting at once each begin with their own share of the shards, so that a first
        # start indexes every shard about once and later ranks read what another just saved.
        rank, world = int(os.environ.get("RANK", 0)), max(1, int(os.environ.get("WORLD_SIZE", 1)))
        start = rank % world * len(self.shards) // world
        order = [*range(start, len(self.shards)), *range(start)]
        with ThreadPoolExecutor(max_workers=min(8, len(self.shards))) as pool:  # headers: I/O bound
            built = dict(zip(order, pool.map(lambda k: shard_index(self.shards[k], cfg.index_dir), order)))
        indexes = [built[k] for k in range(len(self.shards))]
        shard_of, members, offsets, sizes, values = [], [], [], [], []
        names: dict[int, str] = {}
        for k, (shard, index) in enumerate(zip(self.shards, indexes)):
            if index["without_image"]:
                warnings.warn(f"{shard}: {len(index['without_image'])} samples have no image member "
                              f"({', '.join(IMAGE_KEYS)}) and are left out, e.g. {index['without_image'][0]!r}",
                              stacklevel=3)
            for _key, member, offset, size, label, name in index["samples"]:
                shard_of.append(k)
                members.append(member.encode("utf-8", "surrogateescape"))  # (a name not in UTF-8 kept as is)
                offsets.append(offset)
                sizes.append(size)
                values.append(label)
                if name is not None and isinstance(label, int):
                    names.setdefault(label, name)
        if not offsets:
            raise ValueError(f"data.source {cfg.source}: no image members ({', '.join(IMAGE_KEYS)}) in "
                             f"{len(self.shards)} shard{'s' if len(self.shards) > 1 else ''}")
        # numpy arrays rather than lists of Python objects: DataLoader workers share them without copies
        self.shard_of = np.asarray(shard_of, dtype=np.int32)
        self.members = np.asarray(members, dtype=bytes)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.classes, self.labels = class_table(values, lambda i: self._where(i), names)
        listed = listed_classes(self.shards)
        if listed is not None and all(isinstance(v, int) for v in values):
            self.classes = _agreeing(listed, self.labels, names, self.shards[0].parent / CLASSES_FILE)

    def _bytes(self, index: int) -> bytes:
        with open(self.shards[self.shard_of[index]], "rb") as f:
            f.seek(int(self.offsets[index]))
            data = f.read(int(self.sizes[index]))
        if len(data) != self.sizes[index]:
            raise OSError(f"the shard ends inside this member ({len(data)} of {self.sizes[index]} bytes): it changed "
                          f"since it was indexed")
        return data

    def _member(self, index: int) -> str:
        return self.members[index].decode("utf-8", "surrogateescape")

    def _where(self, index: int) -> str:
        return f"{self.shards[self.shard_of[index]]}/{self._member(index)}"

    def name(self, index: int) -> str:
        index = _check_index(index, len(self))
        return f"{self.shards[self.shard_of[index]].stem}/{self._member(index)}"


def source_identity(source: str) -> dict[str, Any]:
    """What identifies a ``wds:`` source cheaply: every shard's path, size and modification time."""
    files = []
    for shard in shard_paths(source):
        stat = shard.stat()
        files.append([str(shard.resolve()), stat.st_size, stat.st_mtime_ns])
    spec = source.strip()[len(PREFIX):].strip()
    return {"kind": "tar", "root": PREFIX + (spec if spec.startswith("/") else str(Path(spec).expanduser().absolute())),
            "files": files}
