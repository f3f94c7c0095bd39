"""A folder's file index, built once: the image files under a root (relative paths, the class of
each, size and modification time), stored as one compressed ``.npz`` in a cache folder.

Walking a folder of a million images and opening each one takes minutes, in every process and at
every start. The index is written by the first start and read by every later one (and by every
rank). It is trusted while no directory under the root has changed: adding, removing or renaming
a file changes its directory's modification time, so checking the few directories' times is
enough (no image is opened). A file rewritten in place under the same name is not noticed (its
directory does not change); that is the price of a cheap check, and a file that no longer decodes
is skipped when it is read.

Racy changes: a directory modified within ``RACY_NS`` of the scan that recorded it may have
changed in the same clock tick after it was listed, so such an index is not trusted and is rebuilt
at the next start (like git's "racily clean" entries). A time well after the scan is the clock's
(a skewed network file server, an archive's stored times) and is trusted: any real change sets it
to now, which differs from the stored time.

Where: ``$VQGPT_CACHE/index/``, else ``$XDG_CACHE_HOME/vqgpt/index/``, else ``~/.cache/vqgpt/index/``,
or the folder given as ``data.index_dir``; the file is named by a hash of the resolved root.
It is written to a temporary file and renamed, so that processes building it at once never read
half a file; a missing, damaged or older-format index is rebuilt. Processes that start at once on a
folder without a fresh index (the ranks of a run) take turns through a lock file beside it: the first
scans, the others read its index.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import time
import unicodedata
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from vqgpt.ground.files import umask

# The file types read as images. Defined here, not in vqgpt.ground.images, so that listing a folder (and
# `vqgpt index`) imports no torch.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# bump when the listing rules or the stored arrays change: older files are rebuilt (2: a folder reached
# through a link higher up is listed at its real path, not under the link's name)
INDEX_FORMAT = 2
ROOT_CLASS = "default"  # the class of images directly in the root
RACY_NS = 2_000_000_000  # directory times this close to the scan are not trusted (coarse file-system clocks)
_SEP = "\0"  # joins names in one byte array; the one character no file name can hold


def clean_source(source: str) -> str:
    """An image source as written, less its edge spaces (' builtin:mnist' is MNIST, a YAML value's stray
    space no new folder), unless the text as given names something on disk: a folder 'trail ' is not
    the folder 'trail' beside it."""
    stripped = source.strip()
    if stripped != source and os.path.lexists(os.path.expanduser(source)):
        return source
    return stripped


@dataclass
class FileIndex:
    """The image files under ``root``, sorted by relative path, and what is needed to tell when it is stale."""

    root: Path  # resolved
    paths: list[str]  # (N,) relative posix paths, sorted
    labels: np.ndarray  # (N,) int32: position of each file's class in ``classes``
    classes: list[str]  # sorted first-level sub-folder names (ROOT_CLASS for files in the root)
    sizes: np.ndarray  # (N,) int64 bytes; -1 for a link that points nowhere
    mtimes: np.ndarray  # (N,) int64 ns
    dirs: list[str]  # every directory scanned, relative ("" is the root)
    dir_mtimes: np.ndarray  # (D,) int64 ns, taken before each directory was listed
    scan_ns: int  # wall time when the scan started
    path: Path | None = None  # where it is stored (None: it could not be written)
    reused: bool = False  # read from ``path`` (False: scanned by this call)

    def __len__(self) -> int:
        return len(self.paths)

    def class_counts(self) -> dict[str, int]:
        """Number of files per class, in class order."""
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {name: int(n) for name, n in zip(self.classes, counts)}


def default_index_dir() -> Path:
    """``$VQGPT_CACHE/index``, else ``$XDG_CACHE_HOME/vqgpt/index``, else ``~/.cache/vqgpt/index``."""
    if os.environ.get("VQGPT_CACHE"):
        cache = Path(os.environ["VQGPT_CACHE"])
    elif os.environ.get("XDG_CACHE_HOME"):
        cache = Path(os.environ["XDG_CACHE_HOME"]) / "vqgpt"
    else:
        cache = Path.home() / ".cache" / "vqgpt"
    return cache.expanduser() / "index"


def index_path(root: str | Path, index_dir: str | Path | None = None) -> Path:
    """The index file of folder ``root``: named by its last component and a hash of its resolved path."""
    resolved = Path(root).expanduser().resolve()
    digest = hashlib.sha256(os.fsencode(str(resolved))).hexdigest()[:16]
    folder = Path(index_dir).expanduser() if index_dir else default_index_dir()
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in resolved.name)[:40] or "root"
    return folder / f"{safe}-{digest}.npz"


def _scan_dir(full: str, rel: str) -> tuple[int, list[tuple[str, int, int]], list[tuple[str, str]]]:
    """One directory: (its mtime, [(relative file path, size, mtime)], [(full, relative) sub-directory])."""
    mtime = os.stat(full).st_mtime_ns  # before listing: a change made after the listing shows as a newer time
    files, subdirs = [], []
    prefix = f"{rel}/" if rel else ""
    with os.scandir(full) as entries:
        for entry in entries:
            name = entry.name
            if name.startswith("."):  # hidden files and folders are ignored
                continue
            try:
                is_dir = entry.is_dir()  # follows links
            except OSError:
                is_dir = False
            if is_dir:
                subdirs.append((entry.path, prefix + name))
            elif name.lower().endswith(IMAGE_EXTENSIONS):
                try:
                    info = entry.stat()  # follows links
                except OSError:  # a link that points nowhere: listed, so that it fails (and is named) when read
                    files.append((prefix + name, -1, 0))
                    continue
                if not stat.S_ISREG(info.st_mode):  # a FIFO or device: reading it would wait forever
                    warnings.warn(f"{entry.path} is not a regular file (a pipe, socket or device): left out",
                                  stacklevel=2)
                    continue
                files.append((prefix + name, info.st_size, info.st_mtime_ns))
    return mtime, files, subdirs


def _walked_under_another_name(real: str, rel: str, root: str) -> bool:
    """Whether folder ``real`` (a resolved path), reached as ``rel``, lies under ``root`` at another
    relative path that the walk reaches itself: no link on it (it is resolved), and no hidden folder."""
    if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
        return False
    real_rel = os.path.relpath(real, root).replace(os.sep, "/")
    real_rel = "" if real_rel == "." else real_rel
    return real_rel != rel and not any(part.startswith(".") for part in real_rel.split("/") if part)


def scan_folder(root: str | Path) -> FileIndex:
    """Walk ``root`` (links to folders followed once, hidden entries skipped) without opening any file."""
    root = Path(root).expanduser().resolve()
    scan_ns = time.time_ns()
    files: list[tuple[str, int, int]] = []
    dirs: list[str] = []
    dir_mtimes: list[int] = []
    seen: set[str] = set()
    root_text = str(root)
    level = [(root_text, "")]
    # Directory by directory, a level at a time, in threads: stat() releases the GIL, which pays off
    # on network file systems where each call waits for the server.
    with ThreadPoolExecutor(max_workers=8) as pool:
        while level:
            unique = []
            # a folder reached twice is listed under one path, the same on every file system: its real
            # path when the walk reaches that itself (under the root, no hidden folder on the way; a link
            # may sit higher up than the folder it names), else the first link name
            for full, rel in sorted(level, key=lambda d: (os.path.islink(d[0]), d[1])):
                real = os.path.realpath(full)
                if _walked_under_another_name(real, rel, root_text):
                    continue  # listed where it really is (a link to an ancestor: a cycle, skipped too)
                if real not in seen:  # a second link to the same folder
                    seen.add(real)
                    unique.append((full, rel))
            level = []
            for (_, rel), (mtime, found, subdirs) in zip(unique, pool.map(lambda d: _scan_dir(*d), unique)):
                dirs.append(rel)
                dir_mtimes.append(mtime)
                files += found
                level += subdirs
    files.sort(key=lambda f: f[0])
    paths = [f[0] for f in files]
    class_of = [p.split("/", 1)[0] if "/" in p else ROOT_CLASS for p in paths]
    if any("/" not in p for p in paths) and any(p.startswith(f"{ROOT_CLASS}/") for p in paths):
        warnings.warn(f"{root}: the images directly in it and those in its sub-folder {ROOT_CLASS}/ are one class "
                      f"({ROOT_CLASS!r}, the name of the root's own images): move one of them to keep them apart",
                      stacklevel=2)
    classes = sorted(set(class_of))
    number = {c: i for i, c in enumerate(classes)}
    return FileIndex(root=root, paths=paths, labels=np.array([number[c] for c in class_of], dtype=np.int32),
                     classes=classes, sizes=np.array([f[1] for f in files], dtype=np.int64),
                     mtimes=np.array([f[2] for f in files], dtype=np.int64), dirs=dirs,
                     dir_mtimes=np.array(dir_mtimes, dtype=np.int64), scan_ns=scan_ns)


def _join(names: list[str]) -> np.ndarray:
    # the names' bytes on disk (os.fsencode: what the file system's encoding made of them), so that they
    # read back as the same str under a non-UTF-8 file name encoding (LC_ALL=C without UTF-8 mode) too
    return np.frombuffer(_SEP.encode().join(os.fsencode(name) for name in names), dtype=np.uint8)


def _split(blob: np.ndarray, count: int | None = None) -> list[str]:
    data = blob.tobytes()
    names = [os.fsdecode(name) for name in data.split(_SEP.encode())] if data or count == 1 else []
    if count is not None and len(names) != count:
        raise ValueError(f"expected {count} names, found {len(names)}")
    return names


def save_index(index: FileIndex, path: str | Path) -> None:
    """Write ``index`` to ``path`` atomically (a temporary file in the same folder, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp's 0600 would keep a group-shared cache's index private
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, format=np.int64(INDEX_FORMAT), root=_join([str(index.root)]),
                                paths=_join(index.paths), labels=index.labels, classes=_join(index.classes),
                                sizes=index.sizes, mtimes=index.mtimes, dirs=_join(index.dirs),
                                dir_mtimes=index.dir_mtimes, scan_ns=np.int64(index.scan_ns))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_index(path: str | Path, root: str | Path) -> FileIndex | None:
    """The index stored at ``path`` for folder ``root``, or None when it is missing, damaged, of another
    format or of another folder (whether it is still fresh is ``is_fresh``'s question)."""
    path, root = Path(path), Path(root).expanduser().resolve()
    try:
        with np.load(path, allow_pickle=False) as data:
            if int(data["format"]) != INDEX_FORMAT or _split(data["root"], 1)[0] != str(root):
                return None
            labels, sizes, mtimes = data["labels"], data["sizes"], data["mtimes"]
            count, dir_mtimes = len(labels), data["dir_mtimes"]
            index = FileIndex(root=root, paths=_split(data["paths"], count), labels=labels,
                              classes=_split(data["classes"]), sizes=sizes, mtimes=mtimes,
                              dirs=_split(data["dirs"], len(dir_mtimes)), dir_mtimes=dir_mtimes,
                              scan_ns=int(data["scan_ns"]), path=path, reused=True)
    except Exception:  # missing, damaged or foreign (zip, key, dtype or decoding errors): scan afresh
        return None
    consistent = len(sizes) == len(mtimes) == count and labels.dtype == np.int32 and (
        not count or (int(labels.min()) >= 0 and int(labels.max()) < len(index.classes)))
    return index if consistent else None


def is_fresh(index: FileIndex) -> bool:
    """True when no directory under the root changed since ``index`` was scanned (one stat per directory)."""
    times = index.dir_mtimes
    if len(times) and bool(((times >= index.scan_ns - RACY_NS) & (times <= index.scan_ns + RACY_NS)).any()):
        return False  # a directory changed right around the scan: it may have changed again unseen
    # (a time far past the scan is the clock's, not a change: a skewed NFS server, an archive's stored
    # times; any real change sets the directory's time to now, which differs from the stored one)
    for rel, mtime in zip(index.dirs, index.dir_mtimes.tolist()):
        try:
            if os.stat(index.root / rel if rel else index.root).st_mtime_ns != mtime:
                return False
        except OSError:  # removed or no longer readable
            return False
    return True


# Indexes that could not be written, by the path they were meant for: kept for this process's life.
_UNSAVED: dict[Path, FileIndex] = {}


def folder_index(root: str | Path, index_dir: str | Path | None = None, refresh: bool = False) -> FileIndex:
    """The index of folder ``root``: read from the cache when still fresh, else scanned and stored there.

    ``index_dir``: where index files live (None or "": ``default_index_dir()``); ``refresh``: scan even
    when a fresh index exists. An index that cannot be written is used from memory with a warning.
    """
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not root_path.is_dir():
        raise ValueError(f"image source is not a folder: {root} (give the folder that holds the images)")
    path = index_path(root_path, index_dir)
    if not refresh:
        index = _stored_fresh(path, root_path)
        if index is not None:
            return index
    with _one_scanner(path):
        if not refresh:  # another process (a rank of the same run) may have scanned it while this one waited
            index = _stored_fresh(path, root_path)
            if index is not None:
                return index
        index = scan_folder(root_path)
        try:
            save_index(index, path)
            index.path = path
            _UNSAVED.pop(path, None)
        except OSError as exc:
            _UNSAVED[path] = index  # this process's next use of the folder neither scans nor warns again
            warnings.warn(f"could not write the file index {path} ({exc}); set data.index_dir (or $VQGPT_CACHE) "
                          f"to a writable folder, or every start scans {root_path} again", stacklevel=2)
    return index


def _stored_fresh(path: Path, root: Path) -> FileIndex | None:
    """The index stored at ``path`` (or kept by this process, where it could not be written), when fresh."""
    index = load_index(path, root)
    if index is None:  # not on disk: an index this process could not write there, when still fresh
        index = _UNSAVED.get(path)
    return index if index is not None and is_fresh(index) else None


@contextmanager
def _one_scanner(path: Path) -> Iterator[None]:
    """Held while the folder of index ``path`` is scanned: the processes that start at once on a folder
    without a fresh index (the ranks of a run, each walking a million files on the same file server)
    wait for the first one's index instead of each scanning. An OS lock (flock) on a ``.lock`` file beside
    the index, dropped when the process ends however it ends; without flock (Windows) or where the cache
    folder cannot take the file, each process scans, as it did before."""
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def unicode_twins(names: list[str]) -> list[tuple[str, str]]:
    """Pairs of class names that are the same letters in two Unicode forms (NFC and NFD: macOS writes a
    folder 'café' as 'cafe' + a combining accent, so folders copied from two systems can hold both)."""
    first: dict[str, str] = {}
    twins = []
    for name in names:
        key = unicodedata.normalize("NFC", name)
        if key in first:
            twins.append((first[key], name))
        else:
            first[key] = name
    return twins
