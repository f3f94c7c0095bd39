"""Data benchmarks: start-up time of an image source as it grows, and loader images/s beside the
tokenizer's training images/s at the same resolution, on the same cores.

    python benchmarks/data.py --quick                        # 1,000 and 10,000 files
    python benchmarks/data.py --sizes 1000 10000 100000      # the issue's sizes (~1 GB of temporary files)
    python benchmarks/data.py --dir /fast/disk --keep        # where the synthetic sources go; keep them

Per source (SOURCES: one entry per kind of source) and size N, the script writes N small JPEGs
(64x64 crops of the photos bundled with scikit-image, ~1,000 per class folder) and prints:

- first start: constructing the training dataset when no index exists (the folder is listed and
  every file stat'ed, no image opened), and second start: the same with the index written by the
  first (what every later start and every rank does); each also per file, so growth with N shows.
  The sources are just written, so the listing comes from the OS page cache: a cold disk makes the
  first start slower, not the second (it reads one index file and stats the directories).
- loader images/s at 256x256 (resize + random crop + flip, the train split), through the training
  loader (``make_dataloader``: seeded augmentation, unreadable-file handling), batch 32, with 1 and
  2 worker processes; on the small files and on ImageNet-sized ones (500x375 JPEGs, quality 90).
- the tokenizer's training images/s at 256 on the same cores (forward + L1 + quantizer loss +
  backward + AdamW, no LPIPS or GAN: an upper bound of a real step, so the loader / tokenizer
  ratio printed is a lower bound; fp32, since bf16 autocast runs these 256-pixel convolutions
  about 4x slower on a CPU, --bf16 to see it), for the small benchmark architecture of
  benchmarks/tokenizer.py (the fastest tokenizer, so the hardest ratio) and, with --reference,
  for configs/tokenizer/f16_16384.yaml's model.

Goals (issue 15): the second start of a 100,000-file folder under 2 s, a flat per-file start-up
cost, and a loader at least 3x the tokenizer's images/s.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from PIL import Image

from stage1_vq.model import VQModel, VQModelConfig
from stage1_vq.train import TokenizerRunConfig
from vqgpt.ground.config import load_config
from vqgpt.ground.data import DataConfig, build_dataset
from vqgpt.ground.file_index import RACY_NS
from vqgpt.training import TrainConfig, make_dataloader

ROOT = Path(__file__).resolve().parents[1]
RESOLUTION = 256
BATCH = 32
PER_CLASS = 1000  # files per class folder (ImageNet has ~1,300)


class Source(NamedTuple):
    """A kind of image source: ``make(folder, jpegs, classes)`` writes one and returns its ``data.source``."""

    name: str
    make: Callable[[Path, list[bytes], int], str]


def _jpegs(count: int, width: int, height: int, quality: int, seed: int = 0) -> list[bytes]:
    """``count`` distinct JPEG files' bytes: random crops of the bundled photos, resized to width x height."""
    import skimage.data

    rng = np.random.default_rng(seed)
    photos = [np.asarray(getattr(skimage.data, name)()) for name in ("astronaut", "coffee", "chelsea", "rocket")]
    out = []
    for k in range(count):
        photo = photos[k % len(photos)]
        h, w = photo.shape[:2]
        side = int(rng.integers(min(h, w) // 4, min(h, w) // 2))
        top, left = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
        crop = Image.fromarray(photo[top:top + side, left:left + side]).resize((width, height), Image.BICUBIC)
        buffer = io.BytesIO()
        crop.save(buffer, format="JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out


def make_folder(folder: Path, jpegs: list[bytes], classes: int) -> str:
    """A folder source: the files spread over ``classes`` class folders."""
    per_class = -(-len(jpegs) // classes)
    for c in range(classes):
        (folder / f"class{c:04d}").mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(jpegs):
        (folder / f"class{i // per_class:04d}" / f"img{i:07d}.jpg").write_bytes(data)
    return str(folder)


def make_shards(folder: Path, jpegs: list[bytes], classes: int) -> str:
    """A tar-shard source of the same files, laid out as `vqgpt shard` writes them (jpg, cls, json;
    PER_CLASS samples per shard)."""
    import webdataset

    per_class = -(-len(jpegs) // classes)
    folder.mkdir(parents=True, exist_ok=True)
    with webdataset.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=PER_CLASS, verbose=0, mtime=0) as sink:
        for i, data in enumerate(jpegs):
            label = i // per_class
            sink.write({"__key__": f"{i:08d}", "jpg": data, "cls": label,
                        "json": {"label": label, "class": f"class{label:04d}"}})
    return f"wds:{folder}"


def make_hf(folder: Path, jpegs: list[bytes], classes: int) -> str:
    """A Hugging Face dataset of the same files (an Image and a ClassLabel column), saved to disk."""
    import datasets

    per_class = -(-len(jpegs) // classes)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(
        names=[f"class{c:04d}" for c in range(classes)])})
    rows = {"image": [{"bytes": data, "path": None} for data in jpegs],
            "label": [i // per_class for i in range(len(jpegs))]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(folder))
    return f"hf:{folder}"


SOURCES = [Source("folder", make_folder), Source("tar", make_shards)]
if importlib.util.find_spec("datasets") is not None:  # the hf extra
    SOURCES.append(Source("hf", make_hf))


def start_up(source: str, index_dir: Path) -> tuple[float, int]:
    """(seconds to construct the training dataset, its number of items)."""
    t = time.perf_counter()
    dataset = build_dataset(DataConfig(source=source, resolution=RESOLUTION, index_dir=str(index_dir)), "train")
    return time.perf_counter() - t, len(dataset)


def loader_images_per_s(source: str, index_dir: Path, workers: int, batches: int) -> float:
    """Images/s of the training loader (after one warm-up batch per worker)."""
    dataset = build_dataset(DataConfig(source=source, resolution=RESOLUTION, index_dir=str(index_dir)), "train")
    loader = make_dataloader(dataset, TrainConfig(batch_size=BATCH, num_workers=workers, seed=0))
    it = iter(loader)
    for _ in range(max(1, workers)):
        next(it)
    count, t = 0, time.perf_counter()
    for _ in range(batches):
        images, _ = next(it)
        count += len(images)
    rate = count / (time.perf_counter() - t)
    del it
    return rate


def _benchmark_arch() -> dict:
    spec = importlib.util.spec_from_file_location("tokenizer_bench", Path(__file__).with_name("tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    quantizer = module.VARIANTS["l2-lowdim-vq"][1]
    # attention where that architecture has it: on the lowest feature map (8x8 at 64 px, 32x32 at 256 px)
    arch = {**module.ARCH, "resolution": RESOLUTION, "attn_resolutions": [RESOLUTION // 8]}
    return {"small (benchmarks/tokenizer.py)": VQModelConfig(**arch, quantizer=quantizer)}


def tokenizer_images_per_s(config: VQModelConfig, batch: int, steps: int, bf16: bool = False) -> float:
    """Training images/s at RESOLUTION: forward + L1 + quantizer loss + backward + AdamW (fp32 or bf16 autocast)."""
    torch.manual_seed(0)
    model = VQModel(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, RESOLUTION, RESOLUTION) * 2 - 1

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
            loss = (out.reconstruction.float() - x).abs().mean() + out.quantizer.loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000], help="numbers of files")
    parser.add_argument("--quick", action="store_true", help="sizes 1,000 and 10,000, fewer loader batches")
    parser.add_argument("--dir", default=None, help="where the synthetic sources are written (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic sources")
    parser.add_argument("--batches", type=int, default=None, help="loader batches timed (default 20, quick 8)")
    parser.add_argument("--bf16", action="store_true", help="time the tokenizer under bf16 autocast")
    parser.add_argument("--reference", action="store_true",
                        help="also time configs/tokenizer/f16_16384.yaml's model (minutes per step on a small CPU)")
    args = parser.parse_args()
    sizes = [1000, 10_000] if args.quick else args.sizes
    batches = args.batches or (8 if args.quick else 20)
    work = Path(tempfile.mkdtemp(prefix="vqgpt-bench-data-", dir=args.dir))
    threads = torch.get_num_threads()
    print(f"{threads} threads; sources under {work}")
    small = _jpegs(256, 64, 64, quality=90)
    large = _jpegs(64, 500, 375, quality=90)
    try:
        print(f"\nstart-up ({RESOLUTION}x{RESOLUTION} train split; 64x64 JPEGs, {PER_CLASS} per class folder)")
        print(f"{'source':<8} {'files':>8} {'write s':>8} {'first s':>8} {'us/file':>8} {'second s':>9} "
              f"{'us/file':>8}  second start")
        loader_sources: list[tuple[str, str, str]] = []
        for source_kind in SOURCES:
            for n in sizes:
                folder = work / f"{source_kind.name}-{n}"
                t = time.perf_counter()
                source = source_kind.make(folder, [small[i % len(small)] for i in range(n)], max(1, n // PER_CLASS))
                written = time.perf_counter() - t
                # A folder nobody is writing to: directories changed within RACY_NS of a scan are scanned again.
                time.sleep(RACY_NS / 1e9)
                index_dir = work / f"index-{source_kind.name}-{n}"
                first, count = start_up(source, index_dir)
                second, _ = start_up(source, index_dir)
                reused = _reused(source, index_dir)
                print(f"{source_kind.name:<8} {count:>8,} {written:>8.2f} {first:>8.2f} {first / count * 1e6:>8.1f} "
                      f"{second:>9.3f} {second / count * 1e6:>8.1f}  {_reuse_word(reused)}")
                if n == min(sizes):
                    loader_sources.append((source_kind.name, source, str(index_dir)))
            big = work / f"{source_kind.name}-imagenet-size"
            loader_sources.append((f"{source_kind.name} (500x375)",
                                   source_kind.make(big, [large[i % len(large)] for i in range(512)], 4),
                                   str(work / f"index-{source_kind.name}-big")))

        print(f"\nloader images/s at {RESOLUTION}x{RESOLUTION} (resize + random crop + flip), batch {BATCH}, "
              f"{batches} batches")
        print(f"{'source':<20} {'1 worker':>9} {'2 workers':>10}")
        rates = {}
        for name, source, index_dir in loader_sources:
            rates[name] = {w: loader_images_per_s(source, Path(index_dir), w, batches) for w in (1, 2)}
            print(f"{name:<20} {rates[name][1]:>9.1f} {rates[name][2]:>10.1f}")

        print(f"\ntokenizer training images/s at {RESOLUTION}x{RESOLUTION} ({threads} threads, "
              f"{'bf16 autocast' if args.bf16 else 'fp32'})")
        models = _benchmark_arch()
        if args.reference:
            reference = load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/f16_16384.yaml").model
            models["f16_16384 (configs/tokenizer)"] = reference
        for name, config in models.items():
            tok = tokenizer_images_per_s(config, batch=2, steps=1, bf16=args.bf16)  # seconds per image on a CPU
            worst = min(min(r.values()) for r in rates.values())
            print(f"{name:<32} {tok:>7.2f} images/s; slowest loader above / this = {worst / tok:.1f}x (goal >= 3x)")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _reuse_word(reused: bool | None) -> str:
    return "(no index: the dataset's own Arrow files)" if reused is None else "index reused" if reused else \
        "SCANNED AGAIN"


def _reused(source: str, index_dir: Path) -> bool | None:
    """Whether a start now reads the index (rather than scanning): the second start's case; None for a
    Hugging Face dataset, which keeps no index of ours."""
    from vqgpt.ground.file_index import folder_index

    if source.startswith("hf:"):
        return None
    if source.startswith("wds:"):
        from vqgpt.ground.tar_shards import shard_index_is_fresh, shard_paths

        return all(shard_index_is_fresh(shard, index_dir) for shard in shard_paths(source))
    return folder_index(source, index_dir).reused


if __name__ == "__main__":
    main()
