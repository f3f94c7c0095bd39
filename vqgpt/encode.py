"""`vqgpt encode`: run a frozen tokenizer once over a dataset and store the codes as token shards."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from stage1_vq.model import VQModel
from vqgpt.checkpoint import WEIGHTS_NAME
from vqgpt.data import DataConfig, build_dataset
from vqgpt.tokens import TokenShardWriter, fingerprint_file


def tokenizer_fingerprint(tokenizer_dir: str | Path) -> str:
    """Identity of a tokenizer export: a hash of its weights file."""
    return fingerprint_file(Path(tokenizer_dir) / WEIGHTS_NAME)


def encode_dataset(tokenizer_dir: str | Path, data: DataConfig, out: str | Path, batch_size: int = 64,
                   flip: bool = False, split: str = "train", device: str | None = None,
                   progress: bool = True) -> Path:
    """Encode every image of ``data`` (and its mirror image with ``flip``) into shards under ``out``.

    Deterministic: images are center-cropped, never randomly augmented, so an interrupted encode
    resumes where it stopped (items already stored are skipped) and gives the same shards.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = VQModel.from_pretrained(tokenizer_dir).to(device).eval()
    data = dataclasses.replace(data, random_crop=False, hflip=False)
    dataset = build_dataset(data, split)
    h = w = data.resolution // model.downsample_factor
    meta = {
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer_dir),
        "source": data.source,
        "resolution": data.resolution,
        "split": split,
        "classes": list(dataset.classes),
        "num_classes": len(dataset.classes),
        "flip_augmented": flip,
    }
    writer = TokenShardWriter.resume(out, grid_size=(h, w), codebook_size=model.codebook_size, meta=meta)
    per_item = 2 if flip else 1
    done_items = writer.count // per_item  # a flipped pair is written together, so counts stay even
    total = len(dataset)
    remaining = Subset(dataset, range(done_items, total))
    loader = DataLoader(remaining, batch_size=batch_size, shuffle=False, num_workers=data.num_workers)
    bar = tqdm(total=total, initial=done_items, desc="encode", unit="img", disable=not progress)
    with torch.inference_mode():
        for images, labels in loader:
            images = images.to(device)
            codes = model.encode(images)                                  # (B, h, w)
            if flip:
                codes_flip = model.encode(torch.flip(images, dims=[3]))
                # interleave (orig, mirrored) per image so that a resume boundary never splits a pair
                codes = torch.stack([codes, codes_flip], 1).flatten(0, 1)
                labels = labels.repeat_interleave(2)
            writer.add(codes.cpu(), labels)
            bar.update(len(images))
    writer.close()
    bar.close()
    return Path(out)
