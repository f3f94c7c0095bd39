"""``vqgpt shard``: any image source written as tar shards in the webdataset layout, for ``wds:``."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import NamedTuple

from PIL import Image
from tqdm.auto import tqdm

from vqgpt.ground.data import FolderImageDataset, build_dataset
from vqgpt.ground.dataset_base import DataConfig, EncodedImageDataset, ImageDataset, Unreadable
from vqgpt.ground.images import tensor_to_pil
from vqgpt.ground.tar_shards import CLASSES_FILE, PREFIX, shard_index

SHARD_NAME = "shard-%06d.tar"
PARTIAL_DIR = ".partial"  # where the shards are written until the last one is closed


class ShardReport(NamedTuple):
    pattern: str  # the data.source that reads the shards back: wds:OUT/shard-{000000..N-1}.tar
    shards: list[Path]
    count: int  # samples written
    classes: list[str]
    unreadable: list[str]  # items left out: their bytes are no image Pillow recognises


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


def write_shards(source: str, out: str | Path, per_shard: int, split: str = "train",
                 resolution: int = DataConfig.resolution, index_dir: str = "", progress: bool = True) -> ShardReport:
    """Write every item of ``source``'s ``split`` into ``OUT/shard-000000.tar``, ... (``per_shard``
    samples each): key = item index, the image under its format's extension (a folder's file, a
    dataset row's or a shard member's bytes unchanged; a built-in's images as PNG at ``resolution``,
    center-cropped), ``cls`` = class index, ``json`` = {"label", "class" (its name), "name" (the
    item in the source)}; OUT/classes.json lists the source's classes. The shards are indexed for
    ``wds:`` as they are written."""
    import webdataset

    if per_shard < 1:
        raise ValueError(f"--per-shard must be >= 1, got {per_shard}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder for the shards")
    existing = sorted(out.glob("shard-*.tar")) if out.is_dir() else []
    if existing:
        raise ValueError(f"--out {out} already holds {len(existing)} shards ({existing[0].name}, ...): delete them "
                         f"or choose another folder")
    # deterministic items: center crops, no flip (a folder's or dataset's bytes are copied as stored anyway)
    cfg = DataConfig(source=source, resolution=resolution, random_crop=False, hflip=False, index_dir=index_dir)
    dataset = build_dataset(cfg, split)
    # Shards are written into OUT/.partial/ and moved into OUT together once the last one is closed:
    # an interrupted run leaves no shard-*.tar that wds:OUT would read as the whole (smaller) set.
    partial = out / PARTIAL_DIR
    if partial.exists():  # an interrupted earlier run's: it never made a shard of OUT
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    written: list[Path] = []
    unreadable: list[str] = []
    count = 0
    # mtime fixed: the same images give byte-identical shards
    with webdataset.ShardWriter(str(partial / SHARD_NAME), maxcount=per_shard, verbose=0, mtime=0,
                                post=lambda name: written.append(Path(name))) as sink:
        for index in tqdm(range(len(dataset)), desc="shard", unit="img", disable=not progress):
            sample = _sample(dataset, index)
            if isinstance(sample, Unreadable):
                unreadable.append(sample.path)
                continue
            data, ext, label = sample
            sink.write({"__key__": f"{index:08d}", ext: data, "cls": label,
                        "json": {"label": label, "class": dataset.classes[label], "name": dataset.name(index)}})
            count += 1
    if not count:  # ShardWriter opens its first shard before any sample: nothing readable was written
        shutil.rmtree(partial)
        raise ValueError(f"no readable image in {source} ({len(unreadable)} left out)")
    # the whole class list, beside the shards: a class without a readable image has no sample to name it
    (partial / CLASSES_FILE).write_text(json.dumps({"classes": list(dataset.classes)}, ensure_ascii=False) + "\n",
                                        encoding="utf-8")
    os.replace(partial / CLASSES_FILE, out / CLASSES_FILE)
    shards = []
    for shard in written:
        shards.append(out / shard.name)
        os.replace(shard, shards[-1])
    partial.rmdir()
    for shard in shards:
        shard_index(shard, index_dir or None)
    last = len(shards) - 1
    pattern = f"{PREFIX}{out.resolve()}/shard-{{000000..{last:06d}}}.tar"
    return ShardReport(pattern, shards, count, list(dataset.classes), unreadable)
