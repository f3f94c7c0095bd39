"""Tokenizer benchmarks: training images/s (fp32 vs bf16) and a same-budget quantizer comparison.

    python benchmarks/tokenizer.py --speed                 # images/s of training steps, fp32 and bf16
    python benchmarks/tokenizer.py --quality --minutes 10 --jobs 2 --threads 1
                                  # train each variant for the same wall time on builtin:photos (two at a
                                  # time, one core each), report held-out PSNR / SSIM / codebook usage

Quality variants (64x64 crops, f=8 -> 8x8 grid, same optimiser and wall time; conv unless named vit):
plain VQ (1024 codes, codebook dim = z_channels, no tricks); l2-normalised 8-dim VQ (LlamaGen);
the same plus k-means init and dead-code restart; FSQ [8,5,5,5] (1000 codes); a full-dim VQ
with EMA updates, k-means init and restart (vector-quantize-pytorch's recipe); and the l2 + restart
quantizer on the ViT encoder/decoder (ViT-VQGAN style, 8x8 patches).

Codebook usage is counted twice: over the fixed held-out grid of crops that `vqgpt reconstruct`
uses (71 crops, 4,544 tokens: too few to hit 1024 codes unless the code distribution is flat), and
over 1,024 seeded random crops of the same held-out photos (65,536 tokens). Each run writes to
OUT/<variant>/ and OUT/<variant>.json; the table and OUT/summary.json gather them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from stage1_vq.evaluate import reconstruct
from stage1_vq.losses import LossConfig
from stage1_vq.model import VQModel, VQModelConfig
from stage1_vq.quantizers import QuantizerConfig
from stage1_vq.train import TokenizerRunConfig, train_tokenizer
from vqgpt.ground.data import DataConfig, build_dataset
from vqgpt.ground.metrics import code_histogram, codebook_stats
from vqgpt.training import TrainConfig

ARCH = dict(channels=32, channel_mult=[1, 2, 2, 4], num_res_blocks=1, attn_resolutions=[8], resolution=64,
            z_channels=64, norm_groups=16)
# Dead-code restart: a code whose EMA hits per step fall below 0.05 is re-seeded from current encoder
# outputs. With 1024 tokens per batch a code averages 1 hit per step; decay 0.9 notices a dead code
# within ~30 steps (0.99 would need ~300, longer than a short run).
RESTART = dict(kmeans_init=True, restart_threshold=0.05, ema_decay=0.9)
# The ViT variant: 8x8 patches -> the same 8x8 grid, 4 blocks of width 128 in encoder and decoder.
VIT_ARCH = dict(architecture="vit", patch_size=8, vit_dim=128, vit_depth=4, vit_heads=4, resolution=64, z_channels=64)
L2_RESTART = QuantizerConfig(kind="vq", codebook_size=1024, codebook_dim=8, l2_norm=True, **RESTART)
VARIANTS = {  # name -> (architecture, quantizer)
    "plain-vq": (ARCH, QuantizerConfig(kind="vq", codebook_size=1024, codebook_dim=None)),
    "l2-lowdim-vq": (ARCH, QuantizerConfig(kind="vq", codebook_size=1024, codebook_dim=8, l2_norm=True)),
    "l2-lowdim-restart-vq": (ARCH, L2_RESTART),
    "fsq": (ARCH, QuantizerConfig(kind="fsq", fsq_levels=[8, 5, 5, 5])),
    "ema-restart-vq": (ARCH, QuantizerConfig(kind="vq", codebook_size=1024, ema=True, **RESTART)),
    "vit-l2-restart-vq": (VIT_ARCH, L2_RESTART),
}
USAGE_CROPS = 1024


def speed(batch: int = 16, steps: int = 5) -> None:
    """Images/s of forward + backward + AdamW for the benchmark architecture, fp32 vs bf16 autocast."""
    model = VQModel(VQModelConfig(**ARCH, quantizer=VARIANTS["l2-lowdim-vq"][1])).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, 64, 64) * 2 - 1
    results = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
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
        results[name] = batch * steps / (time.perf_counter() - t)
        print(f"{name}: {results[name]:.1f} images/s (64x64, batch {batch}, {torch.get_num_threads()} threads)")
    print(f"bf16 / fp32 = {results['bf16'] / results['fp32']:.2f}x")


def heldout_usage(export: Path, crops: int = USAGE_CROPS) -> dict[str, float]:
    """Codebook usage / perplexity over ``crops`` seeded random crops of the held-out photos."""
    model = VQModel.from_pretrained(export).eval()
    heldout = build_dataset(DataConfig(source="builtin:photos", resolution=model.config.resolution), "eval")
    counts = torch.zeros(model.codebook_size, dtype=torch.long)
    with torch.inference_mode():
        for start in range(0, crops, 64):
            batch = torch.stack([heldout.seeded_crop(i) for i in range(start, min(start + 64, crops))])
            counts += code_histogram(model.encode(batch), model.codebook_size)
    return codebook_stats(counts)


def run_variant(name: str, minutes: float, out: Path) -> dict:
    """Train one variant for ``minutes`` of wall time on builtin:photos; its held-out figures."""
    cfg = TokenizerRunConfig(
        model=VQModelConfig(**VARIANTS[name][0], quantizer=VARIANTS[name][1]),
        loss=LossConfig(reconstruction="l1", perceptual="none", perceptual_weight=0.0, gan_weight=0.0),
        data=DataConfig(source="builtin:photos", resolution=64),
        train=TrainConfig(steps=10**9, batch_size=16, lr=1e-3, warmup_steps=100, mixed_precision="bf16",
                          log_every=50, checkpoint_every=0, sample_every=0),
    )
    # a step budget from a short timing run, so each variant gets the same wall time
    probe = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=20, log_every=10))
    t = time.perf_counter()
    train_tokenizer(probe, out / f"{name}-probe")
    per_step = (time.perf_counter() - t) / 20
    steps = max(50, int(minutes * 60 / per_step))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
    t = time.perf_counter()
    export = train_tokenizer(cfg, out / name)
    train_s = time.perf_counter() - t
    m = reconstruct(export, "builtin:photos", out / f"{name}-recon", lpips="none", progress=False)
    many = heldout_usage(export)
    row = {"variant": name, "steps": steps, "train_s": round(train_s), "threads": torch.get_num_threads(),
           "psnr": m["psnr"], "ssim": m["ssim"], "codebook_size": m["codebook_size"],
           "grid_crops": m["num_images"], "grid_usage": m["codebook_usage"], "grid_perplexity": m["perplexity"],
           "random_crops": USAGE_CROPS, "usage": many["usage"], "perplexity": many["perplexity"]}
    (out / f"{name}.json").write_text(json.dumps(row, indent=2) + "\n")
    return row


def quality(minutes: float, out: Path, variants: list[str], jobs: int, threads: int | None) -> None:
    """Run the variants (``jobs`` processes at a time), then print one table against the first."""
    out.mkdir(parents=True, exist_ok=True)
    if jobs <= 1:
        rows = [run_variant(name, minutes, out) for name in variants]
    else:
        # one process per variant, so that each gets its own cores and the same wall time
        waiting, running = list(variants), []
        while waiting or running:
            while waiting and len(running) < jobs:
                name = waiting.pop(0)
                cmd = [sys.executable, __file__, "--run-variant", name, "--minutes", str(minutes),
                       "--out", str(out)] + (["--threads", str(threads)] if threads else [])
                log = open(out / f"{name}.log", "w")
                running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
                print(f"started {name} (log: {out / f'{name}.log'})", flush=True)
            time.sleep(2)
            for item in [r for r in running if r[1].poll() is not None]:
                running.remove(item)
                item[2].close()
                if item[1].returncode != 0:
                    raise SystemExit(f"variant {item[0]} failed (exit {item[1].returncode}); see {out / f'{item[0]}.log'}")
        rows = [json.loads((out / f"{name}.json").read_text()) for name in variants]
    (out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nheld-out builtin:photos, 64x64 -> 8x8 codes, {minutes:g} min of training each; usage over "
          f"{rows[0]['grid_crops']} grid crops and over {USAGE_CROPS} random crops of the held-out photos")
    print(f"{'variant':>22} {'steps':>6} {'PSNR':>9} {'SSIM':>6} {'codes':>6} {'usage (grid)':>13} "
          f"{'usage (random)':>15} {'perplexity':>11}")
    for r in rows:
        print(f"{r['variant']:>22} {r['steps']:>6} {r['psnr']:>6.2f} dB {r['ssim']:>6.3f} {r['codebook_size']:>6} "
              f"{r['grid_usage']:>13.1%} {r['usage']:>15.1%} {r['perplexity']:>11.0f}")
    base = rows[0]
    for r in rows[1:]:
        print(f"{r['variant']} vs {base['variant']}: PSNR {r['psnr'] - base['psnr']:+.2f} dB, "
              f"usage {r['usage']:.0%} vs {base['usage']:.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--minutes", type=float, default=10.0, help="wall time per quality variant")
    parser.add_argument("--out", default="runs/bench_tokenizer")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, first is the baseline (default: {','.join(VARIANTS)})")
    parser.add_argument("--jobs", type=int, default=1, help="quality variants trained at the same time, "
                        "each in its own process (use with --threads so that jobs x threads <= cores)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--run-variant", help=argparse.SUPPRESS)  # one variant, in a process that --jobs started
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.run_variant:
        run_variant(args.run_variant, args.minutes, Path(args.out))
        return
    if not (args.speed or args.quality):
        args.speed = True
    if args.speed:
        speed()
    if args.quality:
        unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
        if unknown:
            parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
        quality(args.minutes, Path(args.out), args.variants.split(","), args.jobs, args.threads)


if __name__ == "__main__":
    main()
