"""Tokenizer benchmarks: training images/s (fp32 vs bf16) and a same-budget quantizer comparison.

    python benchmarks/tokenizer.py --speed                 # images/s of training steps, fp32 and bf16
    python benchmarks/tokenizer.py --quality --minutes 10  # train each variant for the same wall time on
                                                           # builtin:photos, report held-out PSNR/SSIM/usage

Quality variants (1024 codes, 64x64 crops, f=8 -> 8x8 grid, same architecture and budget):
plain VQ (codebook dim = z_channels, no tricks), l2-normalised 8-dim VQ (LlamaGen), FSQ
[8,5,5,5] (1000 codes), and VQ with EMA updates, k-means init and dead-code restart. Each run writes to runs/bench_tokenizer/<variant>/ and prints one row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from stage1_vq.evaluate import reconstruct
from stage1_vq.losses import LossConfig
from stage1_vq.model import VQModel, VQModelConfig
from stage1_vq.quantizers import QuantizerConfig
from stage1_vq.train import TokenizerRunConfig, train_tokenizer
from vqgpt.data import DataConfig
from vqgpt.training import TrainConfig

ARCH = dict(channels=32, channel_mult=[1, 2, 2, 4], num_res_blocks=1, attn_resolutions=[8], resolution=64,
            z_channels=64, norm_groups=16)
VARIANTS = {
    "plain-vq": QuantizerConfig(kind="vq", codebook_size=1024, codebook_dim=None),
    "l2-lowdim-vq": QuantizerConfig(kind="vq", codebook_size=1024, codebook_dim=8, l2_norm=True),
    "fsq": QuantizerConfig(kind="fsq", fsq_levels=[8, 5, 5, 5]),
    # EMA codebook + k-means init + dead-code restart (vector-quantize-pytorch's recipe)
    "ema-restart-vq": QuantizerConfig(kind="vq", codebook_size=1024, ema=True, kmeans_init=True,
                                      restart_threshold=0.1),
}


def speed(batch: int = 16, steps: int = 5) -> None:
    """Images/s of forward + backward + AdamW for the benchmark architecture, fp32 vs bf16 autocast."""
    model = VQModel(VQModelConfig(**ARCH, quantizer=VARIANTS["l2-lowdim-vq"])).train()
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


def quality(minutes: float, out: Path, variants: list[str]) -> None:
    """Train each variant for ``minutes`` of wall time on builtin:photos; held-out reconstruction figures."""
    rows = []
    for name in variants:
        quantizer = VARIANTS[name]
        # a step budget from a short timing run, so each variant gets the same wall time
        cfg = TokenizerRunConfig(
            model=VQModelConfig(**ARCH, quantizer=quantizer),
            loss=LossConfig(reconstruction="l1", perceptual="none", perceptual_weight=0.0, gan_weight=0.0),
            data=DataConfig(source="builtin:photos", resolution=64),
            train=TrainConfig(steps=10**9, batch_size=16, lr=1e-3, warmup_steps=100, mixed_precision="bf16",
                              log_every=50, checkpoint_every=0, sample_every=0),
        )
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
        rows.append({"variant": name, "steps": steps, "train_s": round(train_s), "psnr": m["psnr"], "ssim": m["ssim"],
                     "codebook_usage": m["codebook_usage"], "perplexity": m["perplexity"],
                     "codebook_size": m["codebook_size"], "held_out_images": m["num_images"]})
        r = rows[-1]
        print(f"{name:>14}: {steps} steps in {train_s:.0f} s | held-out PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.3f}, "
              f"usage {r['codebook_usage']:.1%} of {r['codebook_size']} codes (perplexity {r['perplexity']:.0f})",
              flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    base = rows[0]
    for r in rows[1:]:
        print(f"{r['variant']} vs {base['variant']}: PSNR {r['psnr'] - base['psnr']:+.2f} dB, "
              f"usage {r['codebook_usage']:.0%} vs {base['codebook_usage']:.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--minutes", type=float, default=10.0, help="wall time per quality variant")
    parser.add_argument("--out", default="runs/bench_tokenizer")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, first is the baseline (default: {','.join(VARIANTS)})")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.speed or args.quality):
        args.speed = True
    if args.speed:
        speed()
    if args.quality:
        unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
        if unknown:
            parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
        quality(args.minutes, Path(args.out), args.variants.split(","))


if __name__ == "__main__":
    main()
