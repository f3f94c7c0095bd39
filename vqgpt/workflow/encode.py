"""`vqgpt encode`: run a frozen tokenizer once over a dataset and store the codes as token shards.

The shards record what they were made from: the tokenizer's fingerprint, every encode option, and
the source's identity (for a folder, each image file's path, size and modification time, whose
list is kept in ``source-files.json``). A re-run into the same folder resumes an unfinished encode,
or does nothing for a finished one, only when all of these are unchanged; otherwise it stops and
says what changed, so that codes of deleted images are never kept nor new images missed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from stage1_vq.model import VQModel
from vqgpt.ground.checkpoint import export_fingerprint
from vqgpt.ground.data import DataConfig, build_dataset, collate_images, source_identity
from vqgpt.ground.tokens import (DEFAULT_SHARD_SIZE, META_FILE, SOURCE_FILE, TokenShardError, TokenShardWriter,
                          clear_token_folder, read_meta, write_json)

# meta.json keys that must match for a re-run to continue the shards in a folder
IDENTITY_KEYS = ("tokenizer_fingerprint", "source", "split", "resolution", "resize", "crops_per_epoch",
                 "flip_augmented", "source_identity")

# The fingerprint lives beside the export format it hashes (vqgpt.ground.checkpoint); this name stays importable.
tokenizer_fingerprint = export_fingerprint


def _check_out_dir(out: Path) -> None:
    """``out`` must be (or become) a folder: name an existing file on the way as the culprit."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                raise TokenShardError(f"--out {out}: {path} is a file, not a folder; token shards are written "
                                      f"into a folder: choose a folder path")
            return


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _describe_file_changes(old: list[list[Any]], new: list[list[Any]]) -> str:
    """'3 files added (a.png, ...), 1 removed (b.png), 1 modified (c.png)' between two file lists
    (modified: another size or modification time)."""
    before = {name: (size, mtime) for name, size, mtime in old}
    after = {name: (size, mtime) for name, size, mtime in new}
    parts = []
    for what, names in (("added", [n for n in after if n not in before]),
                        ("removed", [n for n in before if n not in after]),
                        ("modified", [n for n in after if n in before and after[n] != before[n]])):
        if names:
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            parts.append(f"{_plural(len(names), 'file') if not parts else len(names)} {what} ({shown})")
    return ", ".join(parts)


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
    for key in IDENTITY_KEYS:
        if key in ("tokenizer_fingerprint", "source_identity") or stored.get(key) == wanted[key]:
            continue
        diffs.append(f"{key} is {stored.get(key)!r} there but {wanted[key]!r} now")
    old, new = stored["source_identity"], wanted["source_identity"]
    if old != new and stored.get("source") == wanted["source"]:  # another source is reported above
        change = ""
        if files is not None and (out / SOURCE_FILE).is_file():
            try:
                change = _describe_file_changes(json.loads((out / SOURCE_FILE).read_text()), files)
            except (ValueError, TypeError):  # a damaged list: say less, but still refuse
                change = ""
        if change:
            diffs.append(f"{change} since the shards were written")
        else:
            diffs.append(f"the images of {wanted['source']} changed since the shards were written "
                         f"({old.get('num_files')} files then, {new.get('num_files')} now)")
    return diffs


def encode_dataset(tokenizer_dir: str | Path, data: DataConfig, out: str | Path, batch_size: int = 64,
                   flip: bool = False, split: str = "train", device: str | None = None,
                   progress: bool = True, overwrite: bool = False, shard_size: int = DEFAULT_SHARD_SIZE) -> Path:
    """Encode every readable image of ``data`` (and its mirror image with ``flip``) into shards under ``out``.

    Deterministic: images are center-cropped, never randomly augmented, so an interrupted encode
    resumes where it stopped and gives the same shards. A re-run into ``out`` continues (or, when
    finished, leaves alone) shards of the same source, tokenizer and options, and refuses any other;
    ``overwrite`` deletes the old shards first. A file that fails to decode is skipped (and listed
    under ``unreadable`` in meta.json), never replaced by another image.
    """
    out = Path(out)
    _check_out_dir(out)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = VQModel.from_pretrained(tokenizer_dir).to(device).eval()
    data = dataclasses.replace(data, random_crop=False, hflip=False)

    identity = source_identity(data.source)
    files = identity.pop("files", None)
    if files is not None:  # meta.json keeps a digest; the list itself goes to source-files.json
        identity["num_files"] = len(files)
        identity["digest"] = hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]
    wanted = {
        "tokenizer_fingerprint": export_fingerprint(tokenizer_dir),
        "source": identity.get("root", data.source),
        "split": split,
        "resolution": data.resolution,
        "resize": data.resize,
        "crops_per_epoch": data.crops_per_epoch,
        "flip_augmented": flip,
        "source_identity": identity,
    }

    if overwrite:
        clear_token_folder(out)
    elif (out / META_FILE).exists():
        try:
            stored = read_meta(out)
        except TokenShardError as exc:
            raise TokenShardError(f"{exc}; pass --overwrite to delete these shards and encode again") from None
        diffs = _identity_differences(out, stored, wanted, files)
        if diffs:
            raise TokenShardError(f"cannot continue the token shards in {out}: {'; '.join(diffs)}. Pass --overwrite "
                                  f"to delete them and encode again, or choose another --out")
        if stored.get("complete"):
            if progress:
                print(f"{out}: already holds the finished encode of {data.source} by this tokenizer with these "
                      f"options ({stored['count']} grids); nothing to do")
            return out

    dataset = build_dataset(data, split)
    h = w = data.resolution // model.downsample_factor
    meta = {**wanted, "classes": list(dataset.classes), "num_classes": len(dataset.classes),
            "skipped_at_scan": [_relative(p, data.source) for p in dataset.skipped]}
    if not (out / META_FILE).exists() and files is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / SOURCE_FILE, files)
    writer = TokenShardWriter.resume(out, grid_size=(h, w), codebook_size=model.codebook_size, meta=meta,
                                     shard_size=shard_size)
    done = writer.items_done
    total = len(dataset)
    if done and progress:
        print(f"{out}: resuming an unfinished encode at image {done} of {total}")
    loader = DataLoader(Subset(dataset, range(done, total)), batch_size=batch_size, shuffle=False,
                        num_workers=data.num_workers, collate_fn=collate_images)
    bar = tqdm(total=total, initial=done, desc="encode", unit="img", disable=not progress)
    start = done
    with torch.inference_mode():
        for batch in loader:
            writer.note_unreadable([_relative(p, data.source) for p in batch.unreadable])
            if len(batch.labels):
                images = batch.images.to(device)
                items = start + batch.kept                                    # (B',) source item of each grid
                codes = model.encode(images)                                  # (B', h, w)
                labels = batch.labels
                if flip:
                    codes_flip = model.encode(torch.flip(images, dims=[3]))
                    # interleave (orig, mirrored) per image: both grids belong to one item
                    codes = torch.stack([codes, codes_flip], 1).flatten(0, 1)
                    labels = labels.repeat_interleave(2)
                    items = items.repeat_interleave(2)
                writer.add(codes.cpu(), labels, items=items)
            start += batch.size
            bar.update(batch.size)
    writer.close(items_done=total)
    bar.close()
    if writer.unreadable and progress:
        print(f"skipped {_plural(len(writer.unreadable), 'image')} that failed to decode "
              f"(listed under 'unreadable' in {out / META_FILE})")
    return out


def _relative(path: str, source: str) -> str:
    """``path`` relative to the source folder (how meta.json names files)."""
    try:
        return Path(path).relative_to(Path(source).expanduser()).as_posix()
    except ValueError:
        return str(path)
