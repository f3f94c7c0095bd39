"""Show larger-than-trained generation: small models on builtin:textures, then a canvas of 4x the area.

    python benchmarks/textures_canvas.py [--out runs/textures] [--tokenizer-steps 800] [--prior-steps 1500]

Trains a tokenizer on 64x64 texture crops (f=8 -> 8x8 codes), encodes them, trains a class-conditional
prior on the 8x8 grids, and samples 16x16-code canvases (128x128 pixels, 4x the trained area) for each
texture with sliding windows. Prints the PNG paths and tokens/s of the cached sliding-window sampler
against the naive one-forward-per-token scheme.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
import yaml

from stage1_vq.losses import LossConfig
from stage1_vq.model import VQModelConfig
from stage1_vq.quantizers import QuantizerConfig
from stage1_vq.train import TokenizerRunConfig, train_tokenizer
from stage2_prior.highres import generate_highres
from stage2_prior.model import GPTConfig
from stage2_prior.train import PriorRunConfig, train_prior
from vqgpt.ground.data import DataConfig
from vqgpt.workflow.encode import encode_dataset, tokenizer_fingerprint
from vqgpt.ground.images import save_grid
from vqgpt.workflow.pipeline import VQGPTPipeline
from vqgpt.training import TrainConfig
from vqgpt.cli.commands import int_at_least


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/textures")
    parser.add_argument("--tokenizer-steps", type=int_at_least(1), default=800)
    parser.add_argument("--prior-steps", type=int_at_least(1), default=1500)
    parser.add_argument("--quantizer", choices=["fsq", "vq"], default="fsq")
    args = parser.parse_args()
    out = Path(args.out)
    earlier = out / "tokenizer_run" / "config.yaml"  # the runs in --out are continued: of this --quantizer only
    if earlier.is_file():
        kind = (yaml.safe_load(earlier.read_text()).get("model") or {}).get("quantizer", {}).get("kind")
        if kind != args.quantizer:
            parser.error(f"--out {out} holds the runs of --quantizer {kind}; give another --out for --quantizer "
                         f"{args.quantizer}")
    # FSQ by default: on these low-contrast textures an EMA codebook collapsed towards the mean grey in
    # a short CPU run (flat reconstructions); FSQ has no codebook to collapse.
    quantizer = (QuantizerConfig(kind="fsq", fsq_levels=[8, 5, 5, 5]) if args.quantizer == "fsq" else
                 QuantizerConfig(kind="vq", codebook_size=512, ema=True, kmeans_init=True, restart_threshold=0.1))

    data = DataConfig(source="builtin:textures", resolution=64, crops_per_epoch=4000)
    tok_cfg = TokenizerRunConfig(
        model=VQModelConfig(channels=16, channel_mult=[1, 2, 2, 4], num_res_blocks=1, attn_resolutions=[8],
                            resolution=64, z_channels=32, norm_groups=8,
                            quantizer=quantizer),
        loss=LossConfig(reconstruction="l1", perceptual="none", perceptual_weight=0.0, gan_weight=0.0),
        data=data,
        train=TrainConfig(steps=args.tokenizer_steps, batch_size=16, lr=2e-3, beta1=0.5, beta2=0.9, warmup_steps=50,
                          mixed_precision="bf16", log_every=25, checkpoint_every=0),
    )
    t = time.perf_counter()
    tok_dir = train_tokenizer(tok_cfg, out / "tokenizer_run", resume="auto")
    print(f"tokenizer: {time.perf_counter() - t:.0f} s")
    tokens = encode_dataset(tok_dir, dataclasses.replace(data, random_crop=True), out / "tokens", flip=True)
    prior_cfg = PriorRunConfig(
        model=GPTConfig(n_layer=4, n_head=4, dim=128, multiple_of=64, class_dropout=0.1, dropout=0.1),
        train=TrainConfig(steps=args.prior_steps, batch_size=64, lr=1e-3, warmup_steps=100, weight_decay=0.05,
                          mixed_precision="bf16", log_every=25, checkpoint_every=0),
        tokens=str(tokens),
    )
    from stage1_vq.model import VQModel

    tokenizer = VQModel.from_pretrained(tok_dir)
    t = time.perf_counter()
    prior_dir = train_prior(prior_cfg, out / "prior_run", resume="auto", decode=tokenizer.decode,
                            tokenizer_fingerprint=tokenizer_fingerprint(tok_dir))
    print(f"prior: {time.perf_counter() - t:.0f} s")
    pipe = VQGPTPipeline.from_parts(tok_dir, prior_dir)
    classes = pipe.classes
    h, w = pipe.prior.config.grid_size
    f = pipe.downsample_factor

    trained = pipe.generate(len(classes) * 2, class_labels=torch.arange(len(classes)).repeat_interleave(2), seed=0)
    save_grid(trained, out / "trained_size.png", nrow=2)
    labels = torch.arange(len(classes))
    rates = {}
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(0)
        t = time.perf_counter()
        codes = generate_highres(pipe.prior, len(classes), 2 * h, 2 * w, class_labels=labels, use_cache=use_cache,
                                 generator=gen)
        rates["cached" if use_cache else "naive"] = codes.numel() / (time.perf_counter() - t)
        if use_cache:
            canvas = pipe.tokenizer.decode(codes)
    path = save_grid(canvas, out / "canvas_4x_area.png", nrow=len(classes))
    print(f"classes (one canvas each, left to right): {classes}")
    print(f"trained size {h * f}x{w * f} px: {out / 'trained_size.png'}")
    print(f"canvas {2 * h * f}x{2 * w * f} px (4x the trained area): {path}")
    print(f"sliding-window sampling: cached {rates['cached']:.0f} tokens/s vs naive one-forward-per-token "
          f"{rates['naive']:.0f} tokens/s ({rates['cached'] / rates['naive']:.1f}x)")


if __name__ == "__main__":
    main()
