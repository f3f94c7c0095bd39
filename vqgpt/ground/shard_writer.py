"""``vqgpt shard``: any image source written as tar shards in the webdataset layout, for ``wds:``.

Converting a large set takes hours, so an interrupted run is continued, not redone: shards are
written into ``OUT/.partial/``, and each one, once closed, is synced to disk and recorded (name,
size, sha256, where the source's items go on after it) in ``.partial/progress.json``, written
whole after each shard. A re-run of the same command keeps the recorded shards and continues with
the item after the last one; the shard that was being written when the run stopped is not
recorded and is written again. The samples are deterministic (fixed mtime, item index as key), so
the continued set is byte for byte the set one uninterrupted run writes. A re-run with another
source, split, ``--per-shard`` or (for a built-in set) ``--resolution``, or over a source whose
images changed meanwhile, is refused with what differs (a continued set would mix two
conversions); ``overwrite`` deletes the unfinished run's shards and starts over.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image
from tqdm.auto import tqdm

from vqgpt.ground.data import (FolderImageDataset, build_dataset, describe_file_changes, folder_overlap,
                               source_identity)
from vqgpt.ground.dataset_base import DataConfig, EncodedImageDataset, ImageDataset, Unreadable
from vqgpt.ground.files import hold_lock, is_within, write_bytes_whole
from vqgpt.ground.hf_source import hf_choice_differences, hf_choices
from vqgpt.ground.images import tensor_to_pil
from vqgpt.ground.tar_shards import CLASSES_FILE, PREFIX, shard_index, shard_paths

SHARD_NAME = "shard-%06d.tar"
PARTIAL_DIR = ".partial"  # where the shards are written until the last one is closed
PROGRESS_FILE = "progress.json"  # in .partial: what the run converts, and the shards it has closed whole
SOURCE_FILES = "source-files.json"  # in .partial: a folder source's files (path, size, time), to name what changed
LOCK_FILE = ".lock"  # in .partial: held by the run that writes there
# in OUT beside a finished set: the run's record (what it converted, each shard's bytes and digest), so that
# the same command run again finds the set finished and does nothing
SET_RECORD = ".shards.json"
# Version of what a sample holds (key, members, json fields): a vqgpt that writes other bytes must not
# continue an older one's shards. Raise it with any change to what a shard holds.
LAYOUT = 1
_ENTRY_KEYS = {"name", "bytes", "sha256", "samples", "next", "unreadable"}  # what the record says of a shard


class ShardReport(NamedTuple):
    pattern: str  # the data.source that reads the shards back: wds:OUT/shard-{000000..N-1}.tar
    shards: list[Path]
    count: int  # samples written
    classes: list[str]
    unreadable: list[str]  # items left out: their bytes are no image Pillow recognises
    written: bool = True  # False: OUT already held this very set, finished (the same command run again)


def _sample(dataset: ImageDataset, index: int) -> tuple[bytes, str, int] | Unreadable:
    """(stored bytes, their extension, class) of one item: a file's or a row's bytes as they are,
    a built-in's image as PNG; ``Unreadable`` when the bytes are no image Pillow decodes."""
    if isinstance(dataset, FolderImageDataset):
        path = dataset.files[index]
        try:
            data = path.read_bytes()
            # decoded in full, as training will: a file named .png that holds text, or a truncated
            # image, is left out here rather than copied into the shards as an image
            with Image.open(io.BytesIO(data)) as img:
                img.load()
        except Exception as exc:  # unreadable file, or no image: PIL raises many types
            return Unreadable(str(path), f"{type(exc).__name__}: {exc}")
        return data, path.suffix.lower().lstrip("."), int(dataset.labels[index])
    if isinstance(dataset, EncodedImageDataset):
        stored = dataset.encoded(index)
        return stored if isinstance(stored, Unreadable) else (*stored, int(dataset.labels[index]))
    item = dataset[index]
    if isinstance(item, Unreadable):
        return item
    image, label = item
    buffer = io.BytesIO()
    tensor_to_pil(image).save(buffer, format="PNG")
    return buffer.getvalue(), "png", int(label)


def _check_apart(source: str, out: Path) -> None:
    """Refuse an OUT that holds the shards being read (the new set would replace them, and --overwrite
    deleted them before reading) or that is, or lies inside, the image folder being read."""
    if source.startswith(PREFIX):
        inside = [path for path in shard_paths(source) if is_within(path, out)]
        if inside:
            raise ValueError(f"--out {out} holds the shards of the source {source} ({inside[0].name}"
                             f"{', ...' if len(inside) > 1 else ''}): the new set would replace the shards it "
                             "reads; write it into another folder")
    elif (where := folder_overlap(source, out)) in ("is", "is inside"):
        raise ValueError(f"--out {out} {where} the image folder {source}: write the shards into a folder apart "
                         "from the images")


def write_shards(source: str, out: str | Path, per_shard: int, split: str = "train",
                 resolution: int = DataConfig.resolution, index_dir: str = "", progress: bool = True,
                 overwrite: bool = False, data_options: dict[str, Any] | None = None) -> ShardReport:
    """Write every item of ``source``'s ``split`` into ``OUT/shard-000000.tar``, ... (``per_shard``
    samples each): key = item index, the image under its format's extension (a folder's file, a
    dataset row's or a shard member's bytes unchanged; a built-in's images as PNG at ``resolution``,
    center-cropped), ``cls`` = class index, ``json`` = {"label", "class" (its name), "name" (the
    item in the source)}; OUT/classes.json lists the source's classes. The shards are indexed for
    ``wds:`` as they are written.

    A run into an OUT where an earlier one was interrupted continues it when the source and options
    are the same, and refuses otherwise (see the module docstring); ``overwrite`` deletes the shards
    already in OUT, finished or not, and writes them from scratch."""
    import webdataset

    if per_shard < 1:
        raise ValueError(f"--per-shard must be >= 1, got {per_shard}")
    if not str(out).strip():  # Path('') is the working folder, whose shard-*.tar --overwrite would delete
        raise ValueError("--out is empty: give the folder for the shards")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder for the shards")
    # deterministic items: center crops, no flip (a folder's or dataset's bytes are copied as stored anyway)
    cfg = DataConfig(source=source, resolution=resolution, random_crop=False, hflip=False, index_dir=index_dir,
                     **(data_options or {}))
    _check_apart(cfg.source, out)
    if not overwrite:
        _refuse_a_finished_set(out)
    dataset = build_dataset(cfg, split)
    wanted, files = _identity(source, split, per_shard, resolution, index_dir, dataset)
    wanted.update(hf_choices(cfg))  # (which columns and split of an hf: source: other shards)
    if not overwrite:
        done = _same_finished_set(out, wanted, source, index_dir)
        if done is not None:
            return done
    # Shards are written into OUT/.partial/ and moved into OUT together once the last one is closed:
    # an interrupted run leaves no shard-*.tar that wds:OUT would read as the whole (smaller) set.
    partial = out / PARTIAL_DIR
    lock = _lock(partial)
    try:
        if overwrite:
            for path in [*out.glob("shard-*.tar"), out / CLASSES_FILE, out / SET_RECORD]:
                path.unlink(missing_ok=True)
        else:
            _refuse_a_finished_set(out, wanted)  # again: a run that held the lock may have finished meanwhile
            finished = _finished_record(partial)
            if finished is not None:  # every shard was written; the run stopped while moving them into OUT
                print(f"{out}: moving the {len(finished['shards']):,} shards of an earlier run, which was stopped "
                      f"while moving them, into {out}", file=sys.stderr)
                shards = _move_into(out, partial, finished["shards"])
                classes = json.loads((out / CLASSES_FILE).read_text(encoding="utf-8"))["classes"]
                return _report(out, shards, sum(entry["samples"] for entry in finished["shards"]), classes,
                               finished["unreadable"], index_dir)
        record = {"identity": wanted, "shards": _kept_shards(partial, wanted, files, overwrite)}
        done = record["shards"]  # each shard closed whole: name, bytes, sha256, samples, next, unreadable
        if not done and files is not None:
            write_bytes_whole(partial / SOURCE_FILES, lambda f: f.write(json.dumps(files).encode()))
        _write_record(partial, record)
        start = done[-1]["next"] if done else 0  # the item after the last sample of the last shard kept
        count = sum(entry["samples"] for entry in done)
        unreadable = [name for entry in done for name in entry["unreadable"]]
        if done:
            print(f"{out}: continuing after {done[-1]['name']} ({len(done):,} shards, {count:,} images written by an "
                  f"earlier run), at item {start:,} of {len(dataset):,}")
        pending: list[tuple[int, str]] = []  # items left out since the last shard was closed
        last = -1  # index of the last sample written

        def closed(name: str) -> None:
            """Record a shard closed whole: synced first, so that a recorded shard survives a power cut."""
            nonlocal pending
            path = Path(name)
            digest = _sha256(path, sync=True)
            done.append({"name": path.name, "bytes": path.stat().st_size, "sha256": digest,
                         "samples": count - sum(entry["samples"] for entry in done), "next": last + 1,
                         "unreadable": [where for index, where in pending if index < last]})
            pending = [(index, where) for index, where in pending if index > last]
            _write_record(partial, record)

        sink = None
        try:
            for index in tqdm(range(start, len(dataset)), total=len(dataset), initial=start, desc="shard", unit="img",
                              disable=not progress):
                sample = _sample(dataset, index)
                if isinstance(sample, Unreadable):
                    unreadable.append(sample.path)
                    pending.append((index, sample.path))
                    continue
                if sink is None:  # opened at the first sample: ShardWriter opens a shard at once, even for none
                    # mtime fixed: the same images give byte-identical shards
                    # the folder's own '%' escaped (the pattern is %-formatted), and absolute (a relative
                    # 'name:...' would be read as a URL scheme)
                    pattern = str(partial.resolve()).replace("%", "%%") + "/" + SHARD_NAME
                    sink = webdataset.ShardWriter(pattern, maxcount=per_shard, verbose=0, mtime=0, post=closed,
                                                  start_shard=len(done))
                data, ext, label = sample
                sink.write({"__key__": f"{index:08d}", ext: data, "cls": label,
                            "json": {"label": label, "class": dataset.classes[label], "name": dataset.name(index)}})
                last = index
                count += 1
        except BaseException:
            if sink is not None:  # the shard being written is cut short: closed, but never recorded as whole
                sink.post = None
                try:
                    sink.close()
                except Exception:  # (a full disk, say): the failure that stopped the run is the one to report
                    pass
            raise
        if sink is not None:
            sink.close()  # closes and records the last shard
        if not count:
            _clear(partial)
            try:
                partial.rmdir()
            except OSError:  # a run started just now made its lock file here: that run owns the folder
                pass
            raise ValueError(f"no readable image in {source} ({len(unreadable)} left out)")
        # the whole class list, beside the shards: a class without a readable image has no sample to name it
        # (ensure_ascii: a folder name that is no UTF-8, a lone surrogate in Python, is written escaped)
        (partial / CLASSES_FILE).write_text(json.dumps({"classes": list(dataset.classes)}) + "\n", encoding="utf-8")
        # Recorded as finished before the first shard moves: a run stopped while moving them leaves some in
        # OUT, and the next run moves the rest (the set in OUT is whole only once classes.json, last, is there).
        record.update(finished=True, unreadable=unreadable)
        _write_record(partial, record)
        shards = _move_into(out, partial, done)
    finally:
        if lock is not None:
            os.close(lock)  # closing the descriptor drops the flock
    return _report(out, shards, count, list(dataset.classes), unreadable, index_dir)


def _finished_record(partial: Path) -> dict[str, Any] | None:
    """The record of a run that wrote every shard into ``partial`` and was stopped while moving them; None
    when there is none (or it cannot be read: then the run's own checks say so)."""
    try:
        record = json.loads((partial / PROGRESS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("finished") is True else None


def _move_into(out: Path, partial: Path, entries: list[dict[str, Any]]) -> list[Path]:
    """Move the recorded shards from ``partial`` into ``out`` (those an interrupted move left there too),
    classes.json last, then empty ``partial``; the shards' paths in OUT."""
    shards = []
    for entry in entries:
        source, target = partial / entry["name"], out / entry["name"]
        if source.exists():
            os.replace(source, target)
        elif not (target.is_file() and target.stat().st_size == entry["bytes"]):
            raise ValueError(f"cannot finish moving the shards of {partial} into {out}: {entry['name']} is in neither "
                             f"(or not whole): pass --overwrite to write the shards again")
        shards.append(target)
    if (partial / CLASSES_FILE).exists():
        os.replace(partial / CLASSES_FILE, out / CLASSES_FILE)
    if (partial / PROGRESS_FILE).exists():  # kept beside the set: the same command again finds it finished
        os.replace(partial / PROGRESS_FILE, out / SET_RECORD)
    _clear(partial)
    try:
        partial.rmdir()
    except OSError:  # a run started just now made its lock file here: that run owns the folder
        pass
    return shards


def _report(out: Path, shards: list[Path], count: int, classes: list[str], unreadable: list[str],
            index_dir: str) -> ShardReport:
    """Index the shards in OUT for wds: and say what was written."""
    for shard in shards:
        shard_index(shard, index_dir or None)
    # braces in OUT's path are escaped: braceexpand reads \{ as a literal brace, so wds:PATTERN reads OUT's shards back
    folder = "".join("\\" + c if c in "\\{}" else c for c in str(out.resolve()))
    pattern = f"{PREFIX}{folder}/shard-{{000000..{len(shards) - 1:06d}}}.tar"
    return ShardReport(pattern, shards, count, classes, unreadable)


def _refuse_a_finished_set(out: Path, wanted: dict[str, Any] | None = None) -> None:
    """Refuse an OUT that holds shards, unless they are an interrupted move's (finished by this run) or, before
    the source is read (``wanted`` None), a finished set whose record ``_same_finished_set`` compares then."""
    if _finished_record(out / PARTIAL_DIR) is not None:  # a run stopped while moving its shards: finished below
        return
    existing = sorted(out.glob("shard-*.tar")) if out.is_dir() else []
    if existing and not (wanted is None and _set_record(out) is not None):
        raise ValueError(f"--out {out} already holds {len(existing)} shards ({existing[0].name}, ...): delete them, "
                         f"choose another folder, or pass --overwrite to write them again")


def _set_record(out: Path) -> dict[str, Any] | None:
    """The record a finished run left beside its shards in OUT; None when there is none or it cannot be read."""
    try:
        record = json.loads((out / SET_RECORD).read_text(encoding="utf-8"))
        return record if isinstance(record, dict) and isinstance(record.get("shards"), list) else None
    except (OSError, ValueError):
        return None


def _same_finished_set(out: Path, wanted: dict[str, Any], source: str, index_dir: str) -> ShardReport | None:
    """The report of the finished set in OUT when it is this very conversion, whole (the same command run
    again: nothing to do); None when OUT holds no finished set; an error naming what differs otherwise."""
    record = _set_record(out)
    if record is None or _finished_record(out / PARTIAL_DIR) is not None or not any(out.glob("shard-*.tar")):
        return None
    entries = record["shards"]
    diffs = _differences(record.get("identity") or {}, wanted, out, None)
    whole = all((out / entry["name"]).is_file() and (out / entry["name"]).stat().st_size == entry["bytes"]
                for entry in entries)
    extra = sorted({p.name for p in out.glob("shard-*.tar")} - {entry["name"] for entry in entries})
    if diffs or not whole or extra or not (out / CLASSES_FILE).is_file():
        why = "; ".join(diffs) if diffs else "its shards are not those its record lists"
        raise ValueError(f"--out {out} already holds {len(entries)} finished shards of another conversion ({why}): "
                         f"delete them, choose another folder, or pass --overwrite to write them again")
    count = sum(entry["samples"] for entry in entries)
    print(f"{out}: already holds the {len(entries):,} finished shards of {source} ({count:,} images) with these "
          f"options; nothing to do", file=sys.stderr)
    classes = json.loads((out / CLASSES_FILE).read_text(encoding="utf-8"))["classes"]
    return _report(out, [out / entry["name"] for entry in entries], count, classes, record.get("unreadable", []),
                   index_dir)._replace(written=False)


def _identity(source: str, split: str, per_shard: int, resolution: int, index_dir: str,
              dataset: ImageDataset) -> tuple[dict[str, Any], list[list[Any]] | None]:
    """What decides the shards' bytes, which must be the same for a re-run to continue them: the
    source's images in their order (for a folder, each file's path, size and time, as ``vqgpt
    encode`` checks them), the split, --per-shard, --resolution where images are re-encoded (a
    built-in set's), and the sample layout. Also the folder's file list, kept to name what changed."""
    found = source_identity(source, index_dir)
    files = found.pop("files", None)
    if files is not None:  # the record keeps a digest; the list goes to SOURCE_FILES
        found["num_files"] = len(files)
        found["digest"] = hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]
    copied = isinstance(dataset, (FolderImageDataset, EncodedImageDataset))  # stored bytes, at any resolution
    return {"layout": LAYOUT, "source": found.get("root", source), "split": split, "per_shard": per_shard,
            "resolution": None if copied else resolution, "source_identity": found}, files


def _lock(partial: Path) -> int | None:
    """Make ``partial`` and hold the lock on its .lock (as a run folder's is held): two runs into one OUT
    would write the same shards and record. None where there is no flock."""
    path = partial / LOCK_FILE
    return hold_lock(path, lambda holder: ValueError(
        f"{partial.parent} is in use by {holder}, another `vqgpt shard` into it (it holds {path}): wait for that "
        f"run to end or stop it, or choose another folder"),
        no_flock=f"{partial}: no file locking on this platform; do not start two `vqgpt shard` runs into "
                 f"{partial.parent}")


def _kept_shards(partial: Path, wanted: dict[str, Any], files: list[list[Any]] | None,
                 overwrite: bool) -> list[dict[str, Any]]:
    """The records of the shards an interrupted run closed whole in ``partial`` that this run keeps (none
    with ``overwrite``); everything else in ``partial`` but its lock is deleted."""
    record_path = partial / PROGRESS_FILE
    leftovers = [path for path in partial.iterdir() if path.name != LOCK_FILE]
    kept: list[dict[str, Any]] = []
    if not overwrite and record_path.exists():
        try:
            stored = json.loads(record_path.read_text(encoding="utf-8"))
            identity, entries = stored["identity"], stored["shards"]
            for entry in entries:
                missing = _ENTRY_KEYS - set(entry)
                if missing:
                    raise KeyError(f"a shard's entry lacks {sorted(missing)}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot continue the unfinished run in {partial}: its record {record_path} cannot be "
                             f"read ({type(exc).__name__}: {exc}); pass --overwrite to delete its shards and start "
                             f"over") from None
        diffs = _differences(identity, wanted, partial, files)
        if diffs and entries:
            written = sum(entry["samples"] for entry in entries)
            raise ValueError(f"cannot continue the unfinished run in {partial} ({len(entries):,} shards, {written:,} "
                             f"images written): {'; '.join(diffs)}. Run it again as it was to continue it, pass "
                             f"--overwrite to delete its shards and start over, or choose another folder")
        if diffs:  # nothing of it was kept anyway
            print(f"{partial}: starting over: the unfinished run there had closed no shard ({'; '.join(diffs)})",
                  file=sys.stderr)
        for entry in entries if not diffs else []:
            path = partial / entry["name"]
            size = path.stat().st_size if path.is_file() else None
            if size != entry["bytes"]:
                print(f"{path} is {'missing' if size is None else f'{size:,} bytes'}, but {entry['bytes']:,} bytes "
                      f"were recorded: writing it again, and the shards after it", file=sys.stderr)
                break
            kept.append(entry)
        if kept and _sha256(partial / kept[-1]["name"]) != kept[-1]["sha256"]:  # the last one closed, checked whole
            print(f"{partial / kept[-1]['name']} does not hold the bytes recorded: writing it again", file=sys.stderr)
            kept.pop()
    elif not overwrite and leftovers:
        print(f"{partial}: starting over: it holds no record of a shard closed whole (left by an older vqgpt, or "
              f"by a run stopped before its first shard was closed)", file=sys.stderr)
    keep = {entry["name"] for entry in kept} | ({PROGRESS_FILE, SOURCE_FILES} if kept else set())
    for path in leftovers:
        if path.name not in keep:  # the shard cut short by the interruption, among others
            _remove(path)
    return kept


def _differences(stored: dict[str, Any], wanted: dict[str, Any], partial: Path,
                 files: list[list[Any]] | None) -> list[str]:
    """What differs between the unfinished run's identity and this run's, in words."""
    if stored.get("layout") != wanted["layout"]:
        return [f"its shards were written by another vqgpt version (sample layout {stored.get('layout')} there, "
                f"{wanted['layout']} now)"]
    diffs = []
    for key, name in (("source", "the source"), ("split", "--split"), ("per_shard", "--per-shard"),
                      ("resolution", "--resolution")):
        if stored.get(key) != wanted[key] and not (key == "resolution" and stored.get("source") != wanted["source"]):
            diffs.append(f"{name} is {stored.get(key)!r} there but {wanted[key]!r} now")
    diffs += hf_choice_differences(stored, wanted)
    if stored.get("source") == wanted["source"] and stored.get("source_identity") != wanted["source_identity"]:
        change = ""
        if files is not None and (partial / SOURCE_FILES).is_file():
            try:
                change = describe_file_changes(json.loads((partial / SOURCE_FILES).read_text()), files)
            except (OSError, ValueError, TypeError):  # a damaged list: say less, but still refuse
                change = ""
        diffs.append(f"{change or 'the images of ' + wanted['source'] + ' changed'} since that run began")
    return diffs


def _write_record(partial: Path, record: dict[str, Any]) -> None:
    """The progress record, written whole and synced: a re-run trusts what it lists."""
    write_bytes_whole(partial / PROGRESS_FILE, lambda f: f.write(json.dumps(record).encode()), sync=True)


def _sha256(path: Path, sync: bool = False) -> str:
    """The file's sha256; ``sync``: flushed to disk first."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if sync:
            os.fsync(f.fileno())
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _clear(partial: Path) -> None:
    """Delete what a run wrote into ``partial``, its lock file last (held until the caller closes it)."""
    for path in partial.iterdir():
        if path.name != LOCK_FILE:
            _remove(path)
    (partial / LOCK_FILE).unlink(missing_ok=True)
