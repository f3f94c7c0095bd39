"""`vqgpt encode`: run a frozen tokenizer once over a dataset and store the codes as token shards.

The shards record what they were made from: the tokenizer's fingerprint, every encode option, and
the source's identity (for a folder, each image file's path, size and modification time, whose
list is kept in ``source-files.json``). A re-run into the same folder resumes an unfinished encode,
or does nothing for a finished one, only when all of these are unchanged; otherwise it stops and
says what changed, so that codes of deleted images are never kept nor new images missed.

Augmentation (``augment``) stores several *views* of each image in its row of the shards (tokens
(N, V, h, w)); the prior then trains on one view per draw (``TokenDataset``):

- ``none``: the center crop (1 view).
- ``flip``: the center crop and its mirror image (2 views).
- ``ten-crop``: LlamaGen's code extraction: the image is center-cropped at ``crop_range`` (1.1)
  times the resolution, and the views are its 4 corner crops and center crop at the resolution,
  then the same 5 crops of its mirror image (10 views, named in meta.json's ``view_names``).

Many processes (``accelerate launch --num_processes N -m vqgpt encode ...``): the dataset's
batches of ``batch_size`` images, [0, B), [B, 2B), ..., are split into N contiguous runs, one per
process, in rank order. Each process writes its own part (``tokens-r000-00000.npy``, ...,
``progress-r000.json``: see vqgpt.ground.tokens) and, once all are done, rank 0 writes meta.json
listing the shards of rank 0, then rank 1, ...: the rows are in dataset order, the order of a
1-process encode. Every image goes through the tokenizer in the same batch whatever the process
count (and after a resume), so its codes do not depend on either. A killed encode resumes on the
same number of processes (each from its own progress file); another number is refused with a
message naming the one to use.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from torch.utils.data import DataLoader, Subset
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from stage1_vq.model import VQModel
from vqgpt.ground.checkpoint import export_fingerprint
from vqgpt.ground.data import (DataConfig, build_dataset, collate_images, describe_file_changes, freeze_before_workers,
                              source_identity)
from vqgpt.ground.hf_source import hf_choice_differences, hf_choices
from vqgpt.ground.images import open_rgb
from vqgpt.ground.tokens import (DEFAULT_SHARD_SIZE, META_FILE, PROGRESS_PATTERN, SOURCE_FILE, TOKEN_FOLDER_PATTERNS,
                                 TokenShardError, TokenShardWriter, clear_token_folder, merge_parts, progress_file,
                                 read_meta, write_json)
from vqgpt.training.config import launch_command, launched_process_state
from vqgpt.training.run_folder import LOCK_NAME, RunLock, share_main_failure
from vqgpt.training.shares import on_main_process

AUGMENTS = ("none", "flip", "ten-crop")
# LlamaGen's extract_codes_c2i default: the ten crops are taken from a center crop 1.1x the resolution
TEN_CROP_RANGE = 1.1
# the largest --crop-range: at 2 each of the ten crops covers a quarter of the center crop's area
MAX_CROP_RANGE = 2.0
_CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right", "center")

# meta.json keys that must match for a re-run to continue the shards in a folder
IDENTITY_KEYS = ("tokenizer_fingerprint", "source", "split", "resolution", "resize", "crops_per_epoch",
                 "augment", "crop_range", "source_identity")

# The fingerprint lives beside the export format it hashes (vqgpt.ground.checkpoint); this name stays importable.
tokenizer_fingerprint = export_fingerprint


def _check_out_dir(out: Path) -> None:
    """``out`` must be (or become) a folder: name an existing file on the way as the culprit. An existing one that
    holds no token shards must hold nothing else an encode does not write: shards went into a tokenizer's
    export, a run folder or the image folder itself (whose images then gained a class of shards)."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                raise TokenShardError(f"--out {out}: {path} is a file, not a folder; token shards are written "
                                      f"into a folder: choose a folder path")
            break
    if out.is_dir() and not (out / META_FILE).exists():
        theirs = sorted(entry.name for entry in out.iterdir() if entry.name != LOCK_NAME
                        and not any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in TOKEN_FOLDER_PATTERNS))
        if theirs:
            shown = ", ".join(theirs[:3]) + (", ..." if len(theirs) > 3 else "")
            raise TokenShardError(f"--out {out} holds files an encode does not write ({shown}): token shards go "
                                  "into a folder of their own; choose a new or empty folder")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _identity_differences(out: Path, stored: dict[str, Any], wanted: dict[str, Any],
                          files: list[list[Any]] | None) -> list[str]:
    """What differs between the shards' recorded identity and this run's, in words."""
    if "source_identity" not in stored:
        return [f"{out / META_FILE} does not record which images were encoded (written by an older vqgpt "
                f"or another tool), so resuming could mix data"]
    diffs = []
    if stored.get("tokenizer_fingerprint") != wanted["tokenizer_fingerprint"]:
        diffs.append(f"the tokenizer changed (fingerprint {stored.get('tokenizer_fingerprint')} there, "
                     f"{wanted['tokenizer_fingerprint']} now)")
    if "augment" not in stored:  # written before --augment: flip_augmented stored mirror images as extra rows
        stored = {**stored, "augment": "flip (as extra rows, older vqgpt)" if stored.get("flip_augmented") else "none"}
    for key in IDENTITY_KEYS:
        if key in ("tokenizer_fingerprint", "source_identity") or stored.get(key) == wanted.get(key):
            continue
        diffs.append(f"{key} is {stored.get(key)!r} there but {wanted.get(key)!r} now")
    diffs += hf_choice_differences(stored, wanted)
    old, new = stored["source_identity"], wanted["source_identity"]
    if old != new and stored.get("source") == wanted["source"]:  # another source is reported above
        change = ""
        if files is not None and (out / SOURCE_FILE).is_file():
            try:
                change = describe_file_changes(json.loads((out / SOURCE_FILE).read_text()), files)
            except (ValueError, TypeError):  # a damaged list: say less, but still refuse
                change = ""
        if change:
            diffs.append(f"{change} since the shards were written")
        else:
            diffs.append(f"the images of {wanted['source']} changed since the shards were written "
                         f"({old.get('num_files')} files then, {new.get('num_files')} now)")
    return diffs


def view_names(augment: str) -> list[str]:
    """Names of the views ``augment`` stores per image, in storage order."""
    if augment == "none":
        return ["image"]
    if augment == "flip":
        return ["image", "flipped"]
    if augment == "ten-crop":
        # torchvision's ten_crop: the five crops of the image, then the five of its mirror image
        return [*_CORNERS, *(f"flipped {c}" for c in _CORNERS)]
    raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")


def ten_crop_size(resolution: int, crop_range: float = TEN_CROP_RANGE) -> int:
    """Side of the center crop the ten crops of ``resolution`` pixels are taken from.

    ``crop_range`` is a ratio of sides, in [1, MAX_CROP_RANGE]: beyond 2 each corner crop sees less
    than a quarter of the image, and every image is loaded crop_range² times larger than needed.
    """
    if not math.isfinite(crop_range) or not 1 <= crop_range <= MAX_CROP_RANGE:
        raise ValueError(f"--crop-range must be between 1 and {MAX_CROP_RANGE:g} (the side of the center crop the "
                         f"ten crops are taken from, as a multiple of the resolution; LlamaGen uses "
                         f"{TEN_CROP_RANGE:g}), got {crop_range}")
    return int(resolution * crop_range)


def make_views(images: torch.Tensor, augment: str, resolution: int) -> list[torch.Tensor]:
    """The views of a batch, each (B, 3, R, R): ``images`` (B, 3, S, S) are center crops at the
    resolution (none, flip) or at ``ten_crop_size`` (ten-crop)."""
    if augment == "none":
        return [images]
    if augment == "flip":
        return [images, torch.flip(images, dims=[3])]
    if augment == "ten-crop":
        return [crop.contiguous() for crop in TF.ten_crop(images, [resolution, resolution])]
    raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")


def _process_state() -> PartialState:
    """This process's rank among those ``accelerate launch`` started (one when run plainly)."""
    return launched_process_state("the processes would each encode everything")


def process_slice(total: int, batch_size: int, processes: int, rank: int) -> tuple[int, int]:
    """[start, stop) of the items process ``rank`` encodes: a contiguous run of whole batches."""
    batches = -(-total // batch_size)
    first, last = rank * batches // processes, (rank + 1) * batches // processes
    return min(first * batch_size, total), min(last * batch_size, total)


def _stored_any(out: Path) -> bool:
    """Whether the unfinished encode in ``out`` stored any shard (its meta.json or a process's progress file
    counts a finished one, or a shard file is there)."""
    if any(out.glob("tokens-*.npy")):
        return True
    for path in [out / META_FILE, *out.glob(PROGRESS_PATTERN)]:
        try:
            state = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            return True  # unreadable: not known to be empty
        if not isinstance(state, dict) or state.get("shards") or state.get("count") or state.get("items_done"):
            return True
    return False


def _check_same_split(out: Path, total: int, batch_size: int, processes: int, recorded: Any) -> None:
    """Refuse to continue an encode on several processes with another ``batch_size`` than the one its meta.json
    ``recorded`` (None from an earlier vqgpt: the shares its processes recorded tell): each process's progress
    is tied to its share, a run of whole batches (``process_slice``) that another batch size moves."""
    if isinstance(recorded, int):
        moved = recorded != batch_size
    else:
        shares = [(read_meta(out, part_name(rank)), process_slice(total, batch_size, processes, rank))
                  for rank in range(processes) if (out / progress_file(part_name(rank))).is_file()]
        moved = any([state.get("start"), state.get("stop")] != list(share) for state, share in shares)
    if moved:
        was, again = ((f"--batch-size {recorded}", f"--batch-size {recorded}") if isinstance(recorded, int)
                      else ("another --batch-size", "the --batch-size it was started with (the default is 64)"))
        raise TokenShardError(
            f"cannot continue the token shards in {out}: the unfinished encode was started with {was} (each of "
            f"its {processes} processes encodes a run of whole batches); resume it with {again}, or pass "
            f"--overwrite to encode again")


def _identity_of(data: DataConfig, state: PartialState) -> tuple[dict[str, Any], list[list[Any]] | None]:
    """(``source_identity`` of the images with a digest of its file list in place of the list, the list) on
    the first process; the others get the identity alone, and None. The list stats every image of a folder:
    done by every process, that was N times a million stats against one file server, at each start."""
    kept: dict[str, Any] = {}

    def identify() -> dict[str, Any]:
        identity = source_identity(data.source, data.index_dir)
        files = kept["files"] = identity.pop("files", None)
        if files is not None:  # meta.json keeps a digest; the list itself goes to source-files.json
            identity["num_files"] = len(files)
            identity["digest"] = hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]
        return identity

    return on_main_process(state, identify), kept.get("files")


def part_name(rank: int) -> str:
    """File-name tag of the shards process ``rank`` writes (``tokens-r000-00000.npy``)."""
    return f"r{rank:03d}"


def encode_dataset(tokenizer_dir: str | Path, data: DataConfig, out: str | Path, batch_size: int = 64,
                   flip: bool = False, split: str = "train", device: str | None = None,
                   progress: bool = True, overwrite: bool = False, shard_size: int = DEFAULT_SHARD_SIZE,
                   augment: str = "none", crop_range: float = TEN_CROP_RANGE) -> Path:
    """Encode every readable image of ``data`` into shards under ``out``, with the views ``augment``
    names (none | flip | ten-crop; ``flip=True`` is the older spelling of ``augment="flip"``).

    Deterministic: images are center-cropped, never randomly augmented, so an interrupted encode
    resumes where it stopped and gives the same shards. A re-run into ``out`` continues (or, when
    finished, leaves alone) shards of the same source, tokenizer and options, and refuses any other;
    ``overwrite`` deletes the old shards first. A file that fails to decode is skipped (and listed
    under ``unreadable`` in meta.json), never replaced by another image. Under ``accelerate launch``
    each process encodes its own run of batches (see the module docstring).
    """
    if flip and augment not in ("none", "flip"):
        raise ValueError(f"flip=True asks for augment 'flip', but augment is {augment!r}: give one of them")
    augment = "flip" if flip else augment
    names = view_names(augment)
    # --crop-range is checked whatever the augment, before the tokenizer loads; ten-crop loads the
    # images as center crops that much larger than the resolution, then crops them ten ways
    crop_size = ten_crop_size(data.resolution, crop_range)
    load_size = crop_size if augment == "ten-crop" else data.resolution
    out = Path(out)
    _check_out_dir(out)
    created = not out.exists()  # a folder this run makes is removed again if nothing can be encoded
    state = _process_state()
    processes, rank, is_main = state.num_processes, state.process_index, state.is_main_process
    progress = progress and is_main
    device = torch.device(device) if device else state.device
    model = VQModel.from_pretrained(tokenizer_dir).to(device).eval()
    data = dataclasses.replace(data, random_crop=False, hflip=False)

    # One encode at a time in --out (all processes of one launch share the lock): a second one, or an
    # --overwrite, would delete or interleave this one's shards while both report success.
    lock, failure = RunLock(out), None
    if is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except Exception as exc:
            failure = exc
    share_main_failure(failure, processes)
    try:
        identity, files = _identity_of(data, state)
        wanted = {
            "tokenizer_fingerprint": export_fingerprint(tokenizer_dir),
            "source": identity.get("root", data.source),
            "split": split,
            "resolution": data.resolution,
            "resize": data.resize,
            "crops_per_epoch": data.crops_per_epoch,
            "augment": augment,
            **({"crop_range": crop_range} if augment == "ten-crop" else {}),
            "view_names": names,
            "source_identity": identity,
            **hf_choices(data),  # (an hf: source's columns and split; none at their defaults, as before they were)
        }

        # Every process reads the folder and comes to the same decision before rank 0 changes anything.
        restart = False  # an unfinished encode on another process count that stored nothing: started over
        stored: dict[str, Any] = {}
        if not overwrite and (out / META_FILE).exists():
            try:
                stored = read_meta(out)
            except TokenShardError as exc:
                raise TokenShardError(f"{exc}; pass --overwrite to delete these shards and encode again") from None
            diffs = _identity_differences(out, stored, wanted, files)
            if diffs:
                raise TokenShardError(f"cannot continue the token shards in {out}: {'; '.join(diffs)}. Pass "
                                      f"--overwrite to delete them and encode again, or choose another --out")
            if stored.get("complete") and stored.get("count", 1):  # an older vqgpt finished empty encodes: redo them
                if progress:
                    print(f"{out}: already holds the finished encode of {data.source} by this tokenizer with these "
                          f"options ({stored['count']} images); nothing to do")
                if is_main:
                    _say_readable_now(out, data.source, stored.get("unreadable", []))
                return out
            started = int(stored.get("processes", 1))
            if started != processes and not _stored_any(out):  # nothing to lose: start over on this many
                restart = True
                if progress:
                    print(f"{out}: the unfinished encode there (started on {started} process"
                          f"{'' if started == 1 else 'es'}) stored no shard yet; starting over on {processes}")
            elif started != processes:
                # each process's progress is tied to its run of batches; another split would mix them up
                how = "a plain `vqgpt encode`" if started == 1 else f"`{launch_command(started)} encode`"
                raise TokenShardError(
                    f"cannot continue the token shards in {out}: the unfinished encode was started on "
                    f"{started} process{'' if started == 1 else 'es'} and this run has {processes}; resume it on "
                    f"{started} ({how} with the same flags), or pass --overwrite to encode again")
        state.wait_for_everyone()
        dataset = build_dataset(dataclasses.replace(data, resolution=load_size), split)
        h, w = model.grid_shape(data.resolution, data.resolution)
        total = len(dataset)
        if processes > 1 and not (overwrite or restart):
            _check_same_split(out, total, batch_size, processes, stored.get("batch_size"))
            state.wait_for_everyone()  # every process has read the parts before rank 0 may clear them
        if (overwrite or restart) and is_main:  # after the data and the size are found good: a typo must not cost
            clear_token_folder(out)              # the shards
        meta = {**wanted, "classes": list(dataset.classes), "num_classes": len(dataset.classes),
                "skipped_at_scan": [_relative(p, data.source) for p in dataset.skipped]}
        parts = [part_name(r) for r in range(processes)] if processes > 1 else [""]
        if processes > 1:
            meta["processes"] = processes
        # meta.json of several processes also records the batch size, which sets each one's share (read by
        # _check_same_split; not in the parts' own meta, which a resume compares key by key)
        merged_meta = {**meta, "batch_size": batch_size}
        if is_main and not (out / META_FILE).exists():  # (out was made before it was locked)
            if files is not None:
                write_json(out / SOURCE_FILE, files)
            if processes > 1:  # an unfinished meta.json, so that a re-run checks identity and process count
                merge_parts(out, parts, (h, w), model.codebook_size, merged_meta, views=len(names))
        files = None  # not kept through the encode: 240 MB of Python objects at a million files
        state.wait_for_everyone()

        start, stop = process_slice(total, batch_size, processes, rank)
        part_meta = {**meta, "rank": rank, "start": start, "stop": stop} if processes > 1 else meta
        writer = TokenShardWriter.resume(out, grid_size=(h, w), codebook_size=model.codebook_size, meta=part_meta,
                                         shard_size=shard_size, views=len(names), part=parts[rank])
        first = start + writer.items_done
        if first > start and progress:
            print(f"{out}: resuming an unfinished encode at image {first} of {total}")
        # Restart at the batch holding `first`: batches stay [kB, (k+1)B) of the whole dataset, so every
        # image meets the same batch-mates (same kernels, same codes) whatever the resume point or
        # process count; the few images already stored are encoded again and dropped.
        aligned = first - first % batch_size if first < stop else stop
        loader = DataLoader(Subset(dataset, range(aligned, stop)), batch_size=batch_size, shuffle=False,
                            num_workers=data.num_workers, collate_fn=collate_images)
        freeze_before_workers(data.num_workers)
        bar = tqdm(total=stop - start, initial=first - start, unit="img", disable=not progress,
                   desc="encode" if processes == 1 else f"encode (rank 0 of {processes})")
        position = aligned
        with torch.inference_mode():
            for batch in loader:
                writer.note_unreadable([_relative(p, data.source) for p in batch.unreadable])
                items = position + batch.kept                                     # (B',) dataset index of each image
                keep = items >= first
                if keep.any():
                    images = batch.images.to(device)
                    views = [model.encode(view) for view in make_views(images, augment, data.resolution)]
                    codes = views[0] if len(views) == 1 else torch.stack(views, 1)  # (B', h, w) or (B', V, h, w)
                    writer.add(codes[keep.to(codes.device)].cpu(), batch.labels[keep], items=items[keep] - start)
                bar.update(max(0, min(position + batch.size, stop) - max(position, first)))
                position += batch.size
        writer.close(items_done=stop - start)
        bar.close()
        finished = writer.meta
        if processes > 1:
            state.wait_for_everyone()
            if is_main:
                merge_parts(out, parts, (h, w), model.codebook_size, merged_meta, views=len(names))
            state.wait_for_everyone()  # every process returns with the folder finished
            finished = read_meta(out)
        unreadable = finished["unreadable"]
        if finished["complete"] and not finished["count"]:
            _no_image_encoded(out, data.source, split, total, unreadable, created, state)
        if unreadable and progress:
            print(f"skipped {_plural(len(unreadable), 'image')} that failed to decode "
                  f"(listed under 'unreadable' in {out / META_FILE})")
        return out
    finally:
        if is_main:
            try:
                if created and all(p.name == LOCK_NAME for p in out.iterdir()):  # this run made it, and wrote nothing
                    (out / LOCK_NAME).unlink(missing_ok=True)  # while held: no other encode holds it meanwhile
                    try:
                        out.rmdir()
                    except OSError:  # an encode starting now made its lock file there: its folder now
                        pass
            finally:
                lock.release()


def _no_image_encoded(out: Path, source: str, split: str, total: int, unreadable: list[str], created: bool,
                      state: PartialState) -> None:
    """Raise for an encode that stored no image: delete its empty shards (and ``out`` if this run made
    it), so that no folder claims to be a complete encode of nothing (the prior's training would
    fail on it far from the cause)."""
    state.wait_for_everyone()  # every process has read the finished meta.json before rank 0 deletes it
    if state.is_main_process:
        clear_token_folder(out)
        if created:
            try:
                out.rmdir()  # only when empty: other files are left alone
            except OSError:
                pass
    if unreadable:
        shown = ", ".join(unreadable[:3]) + (", ..." if len(unreadable) > 3 else "")
        raise ValueError(f"no image of {source} ({split} split) could be read: {_plural(len(unreadable), 'item')} "
                         f"failed to decode ({shown}); nothing was encoded into {out}. Check that --data holds "
                         f"images (a name ending .png or .jpg is no proof: the file may hold text or be truncated)")
    raise ValueError(f"{source} has no images in its {split} split ({total} items): nothing was encoded into {out}; "
                     f"check --data and --split")


def _say_readable_now(out: Path, source: str, unreadable: list[str], checked: int = 100) -> None:
    """Warn when files of a folder that the finished encode in ``out`` left out can be read now (a file's
    permissions mended: a chmod changes neither its size nor its time, so the source's identity stays the
    same and nothing else would tell); the first ``checked`` of them are opened."""
    root = Path(source).expanduser()
    if not root.is_dir():
        return
    now = []
    for name in unreadable[:checked]:
        try:
            open_rgb(root / name)
            now.append(name)
        except Exception:  # still unreadable (or gone): as recorded
            pass
    if now:
        shown = ", ".join(now[:3]) + (", ..." if len(now) > 3 else "")
        warnings.warn(f"{_plural(len(now), 'image')} that the encode in {out} left out as unreadable can be read "
                      f"now ({shown}); pass --overwrite to encode again with them", stacklevel=3)


def _relative(path: str, source: str) -> str:
    """``path`` relative to the source folder (how meta.json names files)."""
    try:
        return Path(path).relative_to(Path(source).expanduser()).as_posix()
    except ValueError:
        return str(path)
