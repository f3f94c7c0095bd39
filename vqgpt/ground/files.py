"""Writing a file whole or not at all, and write failures that say which file and why.

A result file (a sample grid, FID statistics, a token shard, an export's weights) is written into a
temporary sibling and renamed over its path once whole, so an earlier file stays as it was when the
write fails: the disk fills, a file size limit (``ulimit -f``) is reached, the process is killed. The
temporary file is removed on failure, so a full disk is not kept full by it.

Libraries report the same failures in their own ways: numpy's ``tofile`` as an OSError without an
errno ("288000 requested and 202688 written"), safetensors as a ``SafetensorError`` that quotes the
OS error in its text. ``write_error`` turns each into an OSError with the errno and the file's path,
which the CLI prints as one line (exit 2 for a full disk, a size limit, a read-only file system).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import socket
import stat
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Callable

_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")  # how Rust (safetensors) quotes an OS error


def umask() -> int:
    """The process's umask: read from /proc on Linux (setting it to read it would briefly change it for
    every thread), else set and restored. Files of a shared cache get 0o666 & ~umask(), as open() gives:
    mkstemp and safetensors create theirs 0600, private to their writer."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def is_within(path: str | Path, folder: str | Path) -> bool:
    """True when ``path`` is ``folder`` or lies under it, links resolved (neither need exist; no ~ expansion)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def check_can_make_file(folder: Path, what: str) -> None:
    """Refuse (a ValueError starting with ``what``) an existing ``folder`` in which no file can be made, by
    making and removing an empty one: ``os.access`` says yes to root almost everywhere, while /proc and
    /sys refuse only the attempt, which would otherwise come after the work whose result it was to hold."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".vqgpt-write-check-")
    except OSError as exc:
        raise ValueError(f"{what}: no file can be made in {folder} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def write_error(exc: BaseException, path: Path) -> OSError | None:
    """``exc``, raised while writing ``path``, as an OSError naming ``path`` with its errno; None when
    ``exc`` is no write failure (a bug, an interrupt: left to propagate as it is)."""
    code = None
    if isinstance(exc, OSError):
        code = exc.errno
        if code is None and "requested and" in str(exc) and "written" in str(exc):
            # numpy's short write: the OS took less than asked, which a regular file does only when the disk
            # is full or the file size limit is reached; which of the two, a second write would have said
            return OSError(errno.ENOSPC, f"short write ({exc}): the disk is full or a file size limit "
                                         "(ulimit -f) was reached", str(path))
    elif type(exc).__name__ == "SafetensorError":
        found = _OS_ERROR_IN_TEXT.search(str(exc))
        code = int(found.group(1)) if found else None
    if code is None:
        return exc if isinstance(exc, OSError) else None
    if isinstance(exc, OSError) and exc.filename is not None:
        return exc  # it names its file already
    return OSError(code, os.strerror(code), str(path))


class _Writes:
    """A file seen only through ``write``: numpy then writes arrays in chunks through it, and a failure is
    Python's OSError with its errno, not ``tofile``'s short-write message."""

    def __init__(self, f: BinaryIO):
        self._f = f

    def write(self, data: Any) -> int:
        return self._f.write(data)


def replace_when_whole(path: str | Path, write: Callable[[Path], Any], tmp: Path | None = None) -> Path:
    """Write ``path`` by ``write(tmp)`` (``tmp`` default: ``.NAME.tmp`` beside it), then rename ``tmp`` over
    ``path``. On failure ``tmp`` is removed and a write failure is raised as ``write_error`` says."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp") if tmp is None else tmp
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # (a folder of that name, say: the error below names it)
        failure = write_error(exc, path) if isinstance(exc, Exception) else None
        if failure is None or failure is exc:
            raise
        raise failure from None
    return path


def write_text_whole(path: str | Path, text: str) -> Path:
    """``replace_when_whole`` for a text file (a metrics.json, a report): never left cut off."""
    return replace_when_whole(path, lambda tmp: tmp.write_text(text))


def finite_or_null(value: Any, key: str = "", unusable: list[str] | None = None) -> Any:
    """``value`` with each NaN / inf float (nested in dicts and lists too) made None, as strict JSON needs (it has
    no NaN or Infinity); their keys, with the value, go to ``unusable`` when given."""
    if isinstance(value, float) and not math.isfinite(value):
        if unusable is not None:
            unusable.append(f"{key} ({value})")
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v, f"{key}.{k}" if key else str(k), unusable) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v, f"{key}[{i}]", unusable) for i, v in enumerate(value)]
    return value


def write_json_whole(path: str | Path, document: Any) -> Path:
    """``write_text_whole`` of ``document`` as indented strict JSON: a figure that is NaN or infinite is null, as
    the commands' --json output prints it (json.dumps wrote NaN, which jq, JavaScript and strict parsers refuse)."""
    return write_text_whole(path, json.dumps(finite_or_null(document), indent=2, allow_nan=False) + "\n")


def write_bytes_whole(path: str | Path, write: Callable[[BinaryIO], Any], tmp: Path | None = None,
                      sync: bool = False) -> Path:
    """``replace_when_whole`` for a writer of an open binary file (``np.save``, ``f.write``); ``sync``: fsync
    before the rename, so that the new file survives a power cut as a whole."""
    def into(target: Path) -> None:
        with open(target, "wb") as f:
            write(_Writes(f))
            f.flush()
            if sync:
                os.fsync(f.fileno())

    return replace_when_whole(path, into, tmp)


def _not_a_folder(path: Path) -> bool:
    """Whether something other than a folder is at ``path`` (one stat: no gap to race through)."""
    try:
        return not stat.S_ISDIR(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def hold_lock(path: Path, busy: Callable[[str], Exception], no_flock: str) -> int | None:
    """Hold an exclusive OS lock (flock) on ``path`` (made, with its folder, when missing) and write this
    process's PID and host into it, so that the next one to try can say who holds it. Returns the
    descriptor: closing it drops the lock, as the process's death does. Raises ``busy(holder)`` when another
    process holds it. A lock file (or its folder) that its holder deletes when done (the shard writer, a
    refused start) may go between the mkdir, the open and the flock here: the one then on disk is locked
    instead. Where the platform has no flock (Windows), warns ``no_flock`` and returns None: the work goes
    on without the guard rather than not at all."""
    try:
        import fcntl
    except ImportError:
        path.parent.mkdir(parents=True, exist_ok=True)
        warnings.warn(no_flock, stacklevel=3)
        return None
    for attempt in range(20):
        if attempt:  # a race lost to holders that finish as fast as this one tries (a loaded machine): a pause
            time.sleep(0.001 * attempt)  # that grows (0.19 s in all), so that one of them is through meanwhile
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except (FileNotFoundError, FileExistsError) as exc:  # its folder removed (by a finishing holder) meanwhile
            if isinstance(exc, FileExistsError) and _not_a_folder(path.parent):  # a file where it goes: no race
                raise
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise busy(holder) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
            return fd
        os.close(fd)  # deleted after it was opened here: lock the one there now
    raise OSError(errno.EAGAIN, "it is deleted and made again as fast as it is opened: cannot lock it", str(path))
