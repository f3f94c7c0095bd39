"""Tokenizer benchmarks: training images/s (fp32 vs bf16) and a same-budget leaderboard of quantizers.

    python benchmarks/tokenizer.py --speed                  # images/s of training steps, fp32 and bf16
    python benchmarks/tokenizer.py --quality --steps 1000 --jobs 2 --threads 1
                                   # every variant trained for the same steps on builtin:photos (two at a
                                   # time, one core each); held-out PSNR / SSIM / LPIPS / usage / perplexity
    python benchmarks/tokenizer.py --quality --quick --jobs 2 --threads 1
                                   # small: 32x32 crops, a smaller network, 60 steps, the main rows
    python benchmarks/tokenizer.py --quality --minutes 10   # same wall time instead of same steps
    python benchmarks/tokenizer.py --quality --quick --steps 500 --seeds 4 --jobs 2 --threads 1 --variants A,B
                                   # each row from 4 seeds, mean ± sd

Rows (64x64 crops, f=8 -> 8x8 grid; --quick: 32x32 crops, f=4 -> 8x8; same optimiser, steps, batches
and data for every row; conv unless named vit). vqgpt's quantizers: plain VQ (1024 codes, codebook dim
= z_channels); l2-normalised 8-dim VQ (LlamaGen); the same plus k-means init and dead-code restart;
a full-dim EMA + k-means + restart VQ, alone and with LlamaGen's entropy penalty (weights 0.03 and 0.05,
temperature 0.07); the l2 8-dim VQ with EMA + k-means + restart (the recipe of the
peer's README, in vqgpt), and the same with the rotation trick for the encoder's gradient; SimVQ; the
l2 8-dim VQ with LlamaGen's entropy penalty; FSQ [8,5,5,5] (1000 codes); LFQ at 2^10 and 2^14 codes (and 2^14 with MAGVIT-2's entropy settings); residual VQ, 2 depths of 1024 codes (two codes per
position: twice the bits of the others); the l2 + restart VQ on the ViT encoder/decoder. Peer rows
("vqp-*") train the same encoder/decoder around vector-quantize-pytorch's ``VectorQuantize`` (its
README's recipe: cosine similarity in an 8-dim projected codebook, k-means init, dead-code threshold;
and a full-dim euclidean one), ``FSQ`` and ``LFQ`` (2^10, 2^14), wrapped in benchmarks/peer_quantizers.py
(``pip install -e ".[bench]"``; a benchmark-only dependency).

Codebook usage is counted twice: over the fixed held-out grid of crops that `vqgpt reconstruct` uses
(71 crops at 64x64: too few tokens to hit 1024 codes unless the code distribution is flat), and over
1,024 seeded random crops of the same held-out photos (65,536 tokens). LPIPS is ST-LPIPS (the trained
shift-tolerant VGG that installs offline with stlpips-pytorch) unless ``--lpips vgg``. images/s: training
images per second of wall time (forward, losses, backward, AdamW), same cores for every row. Each
run writes to OUT/<variant>/ and OUT/<variant>.json (OUT/<variant>-seed<N>... for seeds past 0); the table
and OUT/summary.json gather them. One seed is one draw: at 500 --quick steps a row's PSNR moves by about
1 dB and its usage by a few points from seed to seed, so compare rows with --seeds (mean ± sd; the goals
are checked on the means).

A second table splits each row's held-out error. Latent PSNR decodes the latents that the codebook
approximates, without quantizing them (VQ rows, vqgpt's and the peer's VectorQuantize): latent PSNR minus
PSNR is the quantizer's own loss, the rest is the encoder/decoder's. The colour cast is the mean
reconstruction-minus-original per channel in 8-bit levels. At 500 --quick steps the quantizers lose
0.01-0.1 dB, and much of the spread between seeds is a cast towards the training photos' redder, darker
colours, which the unquantized latents show just as much (taking it off shrinks a row's sd by up to
half). ``--rescore`` recomputes the held-out figures of runs already trained in OUT.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from stage1_vq.evaluate import load_lpips, reconstruct
from stage1_vq.losses import LossConfig, build_perceptual
from stage1_vq.model import VQModel, VQModelConfig
from stage1_vq.quantizers import QuantizerConfig
from stage1_vq.train import TokenizerRunConfig, train_tokenizer
from vqgpt.ground.data import DataConfig, build_dataset
from vqgpt.ground.metrics import code_histogram, codebook_stats, psnr
from vqgpt.training import TrainConfig
from vqgpt.training.config import cpu_has_fast_bf16

ARCH = dict(channels=32, channel_mult=[1, 2, 2, 4], num_res_blocks=1, attn_resolutions=[8], resolution=64,
            z_channels=64, norm_groups=16)
# The ViT variant: 8x8 patches -> the same 8x8 grid, 4 blocks of width 128 in encoder and decoder.
VIT_ARCH = dict(architecture="vit", patch_size=8, vit_dim=128, vit_depth=4, vit_heads=4, resolution=64, z_channels=64)
# --quick: 32x32 crops, f=4 -> the same 8x8 grid (64 tokens per image), about 8x less compute per image.
QUICK_ARCH = dict(channels=16, channel_mult=[1, 2, 4], num_res_blocks=1, attn_resolutions=[], resolution=32,
                  z_channels=32, norm_groups=8)
QUICK_VIT_ARCH = dict(architecture="vit", patch_size=4, vit_dim=64, vit_depth=2, vit_heads=2, resolution=32,
                      z_channels=32)
# Dead-code restart: a code whose EMA hits per step fall below 0.05 is re-seeded from current encoder
# outputs. With 1024 tokens per batch a code averages 1 hit per step; decay 0.9 notices a dead code
# within ~30 steps (0.99 would need ~300, longer than a short run).
RESTART = dict(kmeans_init=True, restart_threshold=0.05, ema_decay=0.9)
L2_LOWDIM = dict(kind="vq", codebook_size=1024, codebook_dim=8, l2_norm=True)


class Variant(NamedTuple):
    """One leaderboard row: the encoder/decoder ('conv' or 'vit'), the quantizer config (for a peer row
    it sets the latent width), and the vector-quantize-pytorch quantizer used instead (peer_quantizers.PEERS)."""

    arch: str
    quantizer: QuantizerConfig
    peer: str | None = None


VARIANTS = {
    "plain-vq": Variant("conv", QuantizerConfig(kind="vq", codebook_size=1024, codebook_dim=None)),
    "l2-lowdim-vq": Variant("conv", QuantizerConfig(**L2_LOWDIM)),
    "l2-lowdim-restart-vq": Variant("conv", QuantizerConfig(**L2_LOWDIM, **RESTART)),
    "ema-restart-vq": Variant("conv", QuantizerConfig(kind="vq", codebook_size=1024, ema=True, **RESTART)),
    "l2-lowdim-ema-restart-vq": Variant("conv", QuantizerConfig(**L2_LOWDIM, ema=True, **RESTART)),
    "l2-lowdim-ema-restart-rot-vq": Variant("conv", QuantizerConfig(**L2_LOWDIM, ema=True, **RESTART,
                                                                     rotation_trick=True)),
    # the sweep around the two rows above (README: none of them reaches both goal-1 figures over 4 seeds)
    "l2-6dim-ema-restart-vq": Variant("conv", QuantizerConfig(**{**L2_LOWDIM, "codebook_dim": 6}, ema=True, **RESTART)),
    "l2-lowdim-ema99-restart-vq": Variant("conv", QuantizerConfig(**L2_LOWDIM, ema=True,
                                                                   **{**RESTART, "ema_decay": 0.99})),
    "l2-16dim-ema-restart-rot-vq": Variant("conv", QuantizerConfig(**{**L2_LOWDIM, "codebook_dim": 16}, ema=True,
                                                                    **RESTART, rotation_trick=True)),
    "l2-32dim-ema-restart-rot-vq": Variant("conv", QuantizerConfig(**{**L2_LOWDIM, "codebook_dim": 32}, ema=True,
                                                                    **RESTART, rotation_trick=True)),
    "ema-restart-rot-vq": Variant("conv", QuantizerConfig(kind="vq", codebook_size=1024, ema=True, **RESTART,
                                                          rotation_trick=True)),
    # the full-dim EMA row with LlamaGen's entropy penalty; its temperature is about the mean squared
    # distance of a latent to its nearest code (0.054 in a trained ema-restart-vq), where LlamaGen's 0.01 is
    # for l2-normalised codes
    "ema-restart-ent03-vq": Variant("conv", QuantizerConfig(kind="vq", codebook_size=1024, ema=True, **RESTART,
                                                            entropy_weight=0.03, entropy_temperature=0.07)),
    "ema-restart-ent05-vq": Variant("conv", QuantizerConfig(kind="vq", codebook_size=1024, ema=True, **RESTART,
                                                            entropy_weight=0.05, entropy_temperature=0.07)),
    "simvq": Variant("conv", QuantizerConfig(kind="vq", codebook_size=1024, simvq=True)),
    "l2-lowdim-entropy-vq": Variant("conv", QuantizerConfig(**L2_LOWDIM, entropy_weight=0.1)),
    "fsq": Variant("conv", QuantizerConfig(kind="fsq", fsq_levels=[8, 5, 5, 5])),
    "lfq-2^10": Variant("conv", QuantizerConfig(kind="lfq", lfq_dim=10)),
    "lfq-2^14": Variant("conv", QuantizerConfig(kind="lfq", lfq_dim=14)),
    # MAGVIT-2's entropy settings (vqgpt's defaults before 0.5 / 0.4): at temperature 0.01 the code
    # probabilities of latents near their codes are one-hot and the entropy losses stop spreading codes.
    "lfq-2^14-magvit2": Variant("conv", QuantizerConfig(kind="lfq", lfq_dim=14, lfq_temperature=0.01,
                                                        lfq_codebook_entropy_weight=0.1)),
    "rvq-2x1024": Variant("conv", QuantizerConfig(kind="rvq", rvq_depth=2, codebook_size=1024, codebook_dim=8,
                                                  **RESTART)),
    "vit-l2-restart-vq": Variant("vit", QuantizerConfig(**L2_LOWDIM, **RESTART)),
    "vqp-vq-cos8": Variant("conv", QuantizerConfig(kind="vq", codebook_size=1024), peer="vq-cos8"),
    "vqp-vq-cos8-dead2": Variant("conv", QuantizerConfig(kind="vq", codebook_size=1024), peer="vq-cos8-dead2"),
    "vqp-vq-kmeans-dead": Variant("conv", QuantizerConfig(kind="vq", codebook_size=1024), peer="vq-kmeans-dead"),
    "vqp-fsq": Variant("conv", QuantizerConfig(kind="fsq", fsq_levels=[8, 5, 5, 5]), peer="fsq"),
    "vqp-lfq-2^10": Variant("conv", QuantizerConfig(kind="lfq", lfq_dim=10), peer="lfq-10"),
    "vqp-lfq-2^14": Variant("conv", QuantizerConfig(kind="lfq", lfq_dim=14), peer="lfq-14"),
}
# vqgpt's learned codebooks of 1024 codes, one code per position
LEARNED_1024 = ("plain-vq", "l2-lowdim-vq", "l2-lowdim-restart-vq", "ema-restart-vq", "l2-lowdim-ema-restart-vq",
                "l2-lowdim-ema-restart-rot-vq", "l2-6dim-ema-restart-vq", "l2-lowdim-ema99-restart-vq",
                "l2-16dim-ema-restart-rot-vq", "l2-32dim-ema-restart-rot-vq", "ema-restart-rot-vq",
                "ema-restart-ent03-vq", "ema-restart-ent05-vq", "simvq",
                "l2-lowdim-entropy-vq", "vit-l2-restart-vq")
# --quick's default rows: each new kind, the learned codebook that follows vector-quantize-pytorch's
# recipe, and one peer row per peer class (vqgpt's FSQ computes what vqp-fsq does, to the digit).
QUICK_VARIANTS = ("l2-lowdim-ema-restart-vq", "simvq", "l2-lowdim-entropy-vq", "lfq-2^10", "lfq-2^14", "rvq-2x1024",
                  "vqp-vq-cos8", "vqp-fsq", "vqp-lfq-2^10", "vqp-lfq-2^14")
USAGE_CROPS = 1024


def architecture(variant: Variant, quick: bool) -> dict:
    """The encoder/decoder keys of ``variant`` at the full or --quick size."""
    if variant.arch == "vit":
        return QUICK_VIT_ARCH if quick else VIT_ARCH
    return QUICK_ARCH if quick else ARCH


def speed(batch: int = 16, steps: int = 5) -> None:
    """Images/s of forward + backward + AdamW for the benchmark architecture, fp32 vs bf16 autocast."""
    model = VQModel(VQModelConfig(**ARCH, quantizer=VARIANTS["l2-lowdim-vq"].quantizer)).train()
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


def heldout_usage(model: VQModel, crops: int = USAGE_CROPS) -> dict[str, float]:
    """Codebook usage / perplexity over ``crops`` seeded random crops of the held-out photos."""
    heldout = build_dataset(DataConfig(source="builtin:photos", resolution=model.config.resolution), "eval")
    counts = torch.zeros(model.codebook_size, dtype=torch.long)
    with torch.inference_mode():
        for start in range(0, crops, 64):
            batch = torch.stack([heldout.seeded_crop(i) for i in range(start, min(start + 64, crops))])
            counts += code_histogram(model.encode(batch), model.codebook_size)
    return codebook_stats(counts)


def latent_psnr(model: VQModel, variant: Variant, images: torch.Tensor) -> float | None:
    """Mean PSNR of ``images`` decoded from the latents the codebook approximates, unquantized.

    Against the row's PSNR it splits the held-out error into the quantizer's own share (latent PSNR
    minus PSNR) and the encoder/decoder's. Defined for the single-codebook VQ rows: vqgpt's (the encoder's
    latents, l2-normalised when the lookup is) and vector-quantize-pytorch's ``VectorQuantize`` (its
    projection and normalisation, peer_quantizers.PeerVQ.unquantized); None for the other kinds."""
    with torch.inference_mode():
        z = model.encode_latents(images)
        if variant.peer is not None:
            if not hasattr(model.quantize, "unquantized"):
                return None
            z = model.quantize.unquantized(z.float())
        elif variant.quantizer.kind != "vq":
            return None
        elif variant.quantizer.l2_norm:
            z = F.normalize(z.float(), dim=1)
        return float(psnr(images, model.decode_latents(z).clamp(-1, 1)).mean())


class ColourCast:
    """The mean per-channel error (reconstruction - original) over the images it sees (all of one size),
    in 8-bit levels, and the PSNR that the reconstructions would have without it: a reconstruction
    tinted towards the training photos' colours shows up here."""

    def __init__(self) -> None:
        self.mse: list[torch.Tensor] = []  # per image
        self.means: list[torch.Tensor] = []  # per image and channel

    def add(self, originals: torch.Tensor, reconstructions: torch.Tensor) -> None:
        error = reconstructions.double().cpu() - originals.double().cpu()  # (B, 3, H, W)
        self.mse.append(error.pow(2).flatten(1).mean(1))
        self.means.append(error.mean((2, 3)))

    def shift(self) -> torch.Tensor:
        """(3,) mean error per channel, in image units ([-1, 1])."""
        return torch.cat(self.means).mean(0)

    def levels(self) -> list[float]:
        """(R, G, B) mean error in levels of 0..255 (images live in [-1, 1]: one level is 2/255)."""
        return (self.shift() * 127.5).tolist()

    def size(self) -> float:
        """The root mean square of the three channels' mean errors, in levels."""
        return float(torch.tensor(self.levels()).pow(2).mean().sqrt())

    def uncast_psnr(self) -> float:
        """Mean PSNR with the cast (the same shift for every image) taken off every reconstruction."""
        s = self.shift()
        mse = torch.cat(self.mse) - (2 * torch.cat(self.means) * s).mean(1) + s.pow(2).mean()
        return float((10 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean())


def perceptual_metric(kind: str) -> tuple[str, torch.nn.Module | None]:
    """(column name, network) of the LPIPS figure: 'stlpips' (ST-LPIPS), 'vgg' (LPIPS-VGG, downloads), 'none'."""
    if kind == "none":
        return "LPIPS", None
    if kind == "stlpips":  # (a missing package is refused, not reported as n/a)
        return "ST-LPIPS", build_perceptual(LossConfig(perceptual="stlpips", perceptual_weight=1.0)).eval()
    return "LPIPS", load_lpips(kind, torch.device("cpu"))


def peer_modules(variant: Variant) -> contextlib.AbstractContextManager:
    """For a peer row, the context in which VQModel builds (and loads) vector-quantize-pytorch's quantizer."""
    if variant.peer is None:
        return contextlib.nullcontext()
    from peer_quantizers import use_peer  # benchmarks/ is on sys.path when this script runs

    return use_peer(variant.peer)


def run_name(name: str, seed: int) -> str:
    """The run folder / json name of ``name`` trained with ``seed`` (seed 0 keeps the bare name)."""
    return name if seed == 0 else f"{name}-seed{seed}"


def run_variant(name: str, out: Path, steps: int | None, minutes: float | None, quick: bool, lpips: str,
                seed: int = 0) -> dict:
    """Train one variant on builtin:photos for ``steps`` (or ``minutes`` of wall time) from ``seed``
    (network init, batch order, crops); its held-out figures."""
    variant = VARIANTS[name]
    run = run_name(name, seed)
    arch = architecture(variant, quick)
    bf16 = torch.cuda.is_available() or cpu_has_fast_bf16()  # bf16 autocast is slower than fp32 without bf16 units
    cfg = TokenizerRunConfig(
        model=VQModelConfig(**arch, quantizer=variant.quantizer),
        loss=LossConfig(reconstruction="l1", perceptual="none", perceptual_weight=0.0, gan_weight=0.0),
        data=DataConfig(source="builtin:photos", resolution=arch["resolution"]),
        train=TrainConfig(steps=steps or 10**9, batch_size=16, lr=1e-3, warmup_steps=20 if quick else 100,
                          mixed_precision="bf16" if bf16 else "no", log_every=25 if quick else 50,
                          checkpoint_every=0, sample_every=0, seed=seed),
    )
    with peer_modules(variant):
        if minutes is not None:  # a step budget from a short timing run, so each variant gets the same wall time
            probe = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=20, log_every=10))
            t = time.perf_counter()
            train_tokenizer(probe, out / f"{run}-probe", overwrite=True)
            steps = max(50, int(minutes * 60 / ((time.perf_counter() - t) / 20)))
        assert steps is not None
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
        t = time.perf_counter()
        export = train_tokenizer(cfg, out / run, overwrite=True)
        train_s = time.perf_counter() - t
        figures = heldout_figures(variant, export, out / f"{run}-recon", lpips)
    row = {"variant": name, "seed": seed, "peer": variant.peer is not None, "steps": steps, "train_s": round(train_s),
           "images_per_s": steps * cfg.train.batch_size / train_s, "threads": torch.get_num_threads(),
           "resolution": arch["resolution"], **figures}
    (out / f"{run}.json").write_text(json.dumps(row, indent=2) + "\n")
    return row


def heldout_figures(variant: Variant, export: Path, recon_dir: Path, lpips: str) -> dict:
    """The held-out figures of one trained tokenizer (a peer row's export loads inside ``use_peer``):
    PSNR / SSIM / LPIPS / usage over the grid crops, usage over random crops, latent PSNR, colour cast."""
    lpips_name, lpips_net = perceptual_metric(lpips)
    distances: list[torch.Tensor] = []
    cast = ColourCast()
    originals: list[torch.Tensor] = []

    def on_batch(images: torch.Tensor, reconstructions: torch.Tensor) -> None:
        cast.add(images, reconstructions)
        originals.append(images)
        if lpips_net is not None:
            distances.append(lpips_net(images, reconstructions).flatten().float())

    m = reconstruct(export, "builtin:photos", recon_dir, lpips="none", progress=False, save_images=False,
                    device="cpu", on_batch=on_batch)
    model = VQModel.from_pretrained(export).eval()
    many = heldout_usage(model)
    unquantized = latent_psnr(model, variant, torch.cat(originals))
    return {"psnr": m["psnr"], "ssim": m["ssim"],
            "lpips": float(torch.cat(distances).mean()) if distances else None, "lpips_kind": lpips_name,
            "codebook_size": m["codebook_size"], "codes_per_position": model.codes_per_position,
            "codes": (f"{model.codes_per_position}x{variant.quantizer.codebook_size}" if model.codes_per_position > 1
                      else str(m["codebook_size"])),
            "bits_per_image": m["bits_per_image"], "grid_crops": m["num_images"], "grid_usage": m["codebook_usage"],
            "grid_perplexity": m["perplexity"], "random_crops": USAGE_CROPS, "usage": many["usage"],
            "perplexity": many["perplexity"], "psnr_by_depth": m.get("psnr_by_depth"), "latent_psnr": unquantized,
            "cast": cast.levels(), "cast_size": cast.size(), "uncast_psnr": cast.uncast_psnr()}


AVERAGED = ("psnr", "ssim", "lpips", "usage", "perplexity", "grid_usage", "grid_perplexity", "images_per_s",
            "latent_psnr", "cast_size", "uncast_psnr")


def combine(runs: list[dict]) -> list[dict]:
    """One row per variant (in first-seen order): the runs' figures averaged over seeds, with the sample
    standard deviation of each in ``sd`` and the single runs in ``runs``. One seed gives the run itself."""
    by_variant: dict[str, list[dict]] = {}
    for r in runs:
        by_variant.setdefault(r["variant"], []).append(r)
    rows = []
    for group in by_variant.values():
        row = dict(group[0], seeds=len(group), runs=group, sd={})
        row.pop("seed", None)
        for key in AVERAGED:
            values = [r[key] for r in group if r.get(key) is not None]
            if len(values) < len(group):
                continue  # absent in some run (no LPIPS network): keep the first run's value (None)
            t = torch.tensor(values, dtype=torch.float64)
            row[key] = float(t.mean())
            row["sd"][key] = float(t.std()) if len(values) > 1 else 0.0
        if all(r.get("cast") is not None for r in group):
            row["cast"] = torch.tensor([r["cast"] for r in group], dtype=torch.float64).mean(0).tolist()
        rows.append(row)
    return rows


def pm(row: dict, key: str, fmt: str) -> str:
    """``row[key]`` formatted, with '± sd' over seeds when the row averages more than one."""
    text = format(row[key], fmt)
    if row.get("seeds", 1) > 1 and key in row.get("sd", {}):
        text += " ± " + format(row["sd"][key], fmt)
    return text


def goals(rows: list[dict]) -> list[str]:
    """The issue's two goals, checked on the rows present (on the means over seeds)."""
    by_name = {r["variant"]: r for r in rows}
    lines = []
    ours = [by_name[n] for n in LEARNED_1024 if n in by_name]
    peers = [r for r in rows if r["peer"] and r["codebook_size"] == 1024]
    if ours and peers:
        full = [r for r in ours if r["usage"] >= 0.97]
        best = max(full or ours, key=lambda r: r["psnr"])
        peer = max(peers, key=lambda r: r["psnr"])
        met = best["usage"] >= 0.97 and best["psnr"] >= peer["psnr"]
        seeds = f" (means over {best['seeds']} seeds ± sd)" if best.get("seeds", 1) > 1 else ""
        lines.append(f"goal 1 {'MET' if met else 'NOT MET'}{seeds}: vqgpt's best learned 1024-code row "
                     f"{'with usage >= 97%' if full else '(none reaches 97% usage)'} is {best['variant']}: usage "
                     f"{pm(best, 'usage', '.1%')}, {pm(best, 'psnr', '.2f')} dB; vector-quantize-pytorch's best "
                     f"1024-code row is {peer['variant']}: {pm(peer, 'psnr', '.2f')} dB (usage {pm(peer, 'usage', '.1%')})")
    if "lfq-2^14" in by_name:
        row = by_name["lfq-2^14"]
        lines.append(f"goal 2 {'MET' if row['usage'] >= 0.90 else 'NOT MET'}: lfq-2^14 uses {pm(row, 'usage', '.1%')} "
                     f"of its 16384 codes "
                     f"over {USAGE_CROPS} held-out crops ({USAGE_CROPS * 64} tokens; goal >= 90%)")
    return lines


def print_table(rows: list[dict]) -> None:
    """The rows side by side, and the goals."""
    lp = next((r["lpips_kind"] for r in rows), "LPIPS")
    seeds = rows[0].get("seeds", 1)
    steps = sorted({r["steps"] for r in rows})  # (one count, or --minutes: the same wall time, own counts)
    trained = f"{steps[0]} steps" if len(steps) == 1 else f"{steps[0]} to {steps[-1]} steps (column 'steps')"
    print(f"\nheld-out builtin:photos, {rows[0]['resolution']}x{rows[0]['resolution']} crops -> 8x8 positions, "
          f"{trained} of batch 16 each; usage over {rows[0]['grid_crops']} grid crops and over "
          f"{USAGE_CROPS} random crops of the held-out photos; vqp = vector-quantize-pytorch"
          + (f"; mean ± sd over {seeds} seeds" if seeds > 1 else ""))
    wide = 7 if seeds > 1 else 0  # room for the '± sd' parts
    print(f"{'variant':>28} {'codes':>7} {'bits':>5} {'PSNR':>{9 + wide}} {'SSIM':>6} {lp:>8} {'usage (grid)':>13} "
          f"{'usage (random)':>{15 + wide}} {'perplexity':>11} {'img/s':>6}"
          + (f" {'steps':>6}" if len(steps) > 1 else ""))
    for r in rows:
        bits = r["bits_per_image"] / 64
        lpips = "n/a" if r["lpips"] is None else f"{r['lpips']:.4f}"
        print(f"{r['variant']:>28} {r['codes']:>7} {bits:>5.1f} {pm(r, 'psnr', '.2f'):>{6 + wide}} dB "
              f"{r['ssim']:>6.3f} {lpips:>8} {r['grid_usage']:>13.1%} {pm(r, 'usage', '.1%'):>{15 + wide}} "
              f"{r['perplexity']:>11.0f} {r['images_per_s']:>6.1f}" + (f" {r['steps']:>6}" if len(steps) > 1 else ""))
    print("bits: per position (log2 of the codes; residual VQ: summed over its codes)")
    print_error_split(rows, wide)
    for line in goals(rows):
        print(line)


def print_error_split(rows: list[dict], wide: int) -> None:
    """Where each row's held-out error comes from: the quantizer (latent PSNR - PSNR) or the
    encoder/decoder, and how far its reconstructions are tinted (the colour cast)."""
    rows = [r for r in rows if r.get("uncast_psnr") is not None]  # runs written before these figures: left out
    if not rows:
        return
    print("\nwhere the held-out error comes from: latent PSNR decodes the latents the codebook approximates, "
          "unquantized (VQ rows); cast = mean reconstruction - original per channel, in 8-bit levels; "
          "PSNR w/o cast: the same reconstructions with that mean shift taken off")
    print(f"{'variant':>28} {'PSNR':>{9 + wide}} {'latent PSNR':>{12 + wide}} {'quantizer':>9} "
          f"{'cast R/G/B':>17} {'|cast|':>{6 + wide}} {'PSNR w/o cast':>{14 + wide}}")
    for r in rows:
        latent = "n/a" if r.get("latent_psnr") is None else pm(r, "latent_psnr", ".2f") + " dB"
        loss = "n/a" if r.get("latent_psnr") is None else f"{r['latent_psnr'] - r['psnr']:.2f} dB"
        tint = "/".join(f"{c:+.1f}" for c in r["cast"])
        print(f"{r['variant']:>28} {pm(r, 'psnr', '.2f'):>{6 + wide}} dB {latent:>{12 + wide}} {loss:>9} "
              f"{tint:>17} {pm(r, 'cast_size', '.1f'):>{6 + wide}} {pm(r, 'uncast_psnr', '.2f'):>{11 + wide}} dB")


def quality(out: Path, variants: list[str], jobs: int, threads: int | None, steps: int | None,
            minutes: float | None, quick: bool, lpips: str, seeds: int = 1) -> None:
    """Run the variants, each from seeds 0..seeds-1 (``jobs`` processes at a time), then print one table."""
    out.mkdir(parents=True, exist_ok=True)
    todo = [(name, seed) for name in variants for seed in range(seeds)]
    if jobs <= 1:
        runs = [run_variant(name, out, steps, minutes, quick, lpips, seed) for name, seed in todo]
    else:
        # one process per run, so that each gets its own cores and the same conditions
        budget = ["--steps", str(steps)] if minutes is None else ["--minutes", str(minutes)]
        waiting, running = list(todo), []
        while waiting or running:
            while waiting and len(running) < jobs:
                name, seed = waiting.pop(0)
                run = run_name(name, seed)
                cmd = [sys.executable, __file__, "--run-variant", name, "--seed", str(seed), *budget, "--out", str(out),
                       "--lpips", lpips, *(["--quick"] if quick else []), *(["--threads", str(threads)] if threads else [])]
                log = open(out / f"{run}.log", "w")
                running.append((run, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
                print(f"started {run} (log: {out / f'{run}.log'})", flush=True)
            time.sleep(2)
            for item in [r for r in running if r[1].poll() is not None]:
                running.remove(item)
                item[2].close()
                if item[1].returncode != 0:
                    raise SystemExit(f"run {item[0]} failed (exit {item[1].returncode}); see {out / f'{item[0]}.log'}")
        runs = [json.loads((out / f"{run_name(name, seed)}.json").read_text()) for name, seed in todo]
    summarize(out, runs)


def foreign_files(out: Path, variants: list[str], seeds: int) -> list[str]:
    """What in ``out`` a --quality run would replace though no run of this benchmark wrote it: a run folder
    (trained with overwrite) without its config.yaml, a summary.json that is no table of rows."""
    found = []
    for name in variants:
        for seed in range(seeds):
            run = run_name(name, seed)
            for folder in (out / run, out / f"{run}-probe"):
                if folder.is_file() or (folder.is_dir() and any(folder.iterdir())
                                        and not (folder / "config.yaml").is_file()):
                    found.append(str(folder))
    summary = out / "summary.json"
    if summary.exists():
        try:
            rows = json.loads(summary.read_text())
            ours = isinstance(rows, list) and all(isinstance(r, dict) and "variant" in r for r in rows)
        except (OSError, ValueError):
            ours = False
        if not ours:
            found.append(str(summary))
    return found


def summarize(out: Path, runs: list[dict]) -> None:
    """Average the runs over seeds into OUT/summary.json and print the table."""
    rows = combine(runs)
    (out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    print_table(rows)


def rescore(out: Path, variants: list[str], seeds: int, lpips: str) -> None:
    """Recompute the held-out figures of runs already trained in OUT (their json keeps the training
    figures), e.g. runs written before a figure was added; then the table."""
    runs = []
    for name in variants:
        for seed in range(seeds):
            run = run_name(name, seed)
            path = out / f"{run}.json"
            if not path.exists():
                raise SystemExit(f"{path} not found: run {name} (seed {seed}) has not been trained in {out}")
            with peer_modules(VARIANTS[name]):
                figures = heldout_figures(VARIANTS[name], out / run / "export", out / f"{run}-recon", lpips)
            row = {**json.loads(path.read_text()), **figures}
            path.write_text(json.dumps(row, indent=2) + "\n")
            runs.append(row)
            print(f"rescored {run}", flush=True)
    summarize(out, runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--quick", action="store_true", help="32x32 crops, a smaller network, 60 steps per row "
                        "(unless --steps / --minutes say otherwise), the QUICK_VARIANTS rows: a few minutes with "
                        "--jobs 2 --threads 1 on 2 cores")
    parser.add_argument("--steps", type=int, default=None, help="training steps per row (default 1000; --quick 60)")
    parser.add_argument("--minutes", type=float, default=None, help="same wall time per row instead of same steps")
    parser.add_argument("--lpips", default="stlpips", help="stlpips (default, works offline; "
                        "pip install -e \".[stlpips]\"), vgg, a weights path, or none")
    parser.add_argument("--out", default="runs/bench_tokenizer")
    parser.add_argument("--variants", default=None, help=f"comma-separated (default: all of {','.join(VARIANTS)}; "
                        f"--quick: {','.join(QUICK_VARIANTS)}); vqp-* rows need `pip install -e \".[bench]\"`")
    parser.add_argument("--jobs", type=int, default=1, help="quality variants trained at the same time, "
                        "each in its own process (use with --threads so that jobs x threads <= cores)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--table", action="store_true", help="print the table of OUT/summary.json and exit")
    parser.add_argument("--rescore", action="store_true", help="with --quality: recompute the held-out figures of "
                        "the --variants x --seeds runs already in OUT (LPIPS with --lpips) instead of training them")
    parser.add_argument("--seeds", type=int, default=1, help="train every row from seeds 0..N-1 and print the mean "
                        "± sd (at 500 quick steps one seed's PSNR varies by about 1 dB and its usage by a few points)")
    parser.add_argument("--run-variant", help=argparse.SUPPRESS)  # one variant, in a process that --jobs started
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # its seed
    args = parser.parse_args()
    if args.steps is not None and args.minutes is not None:
        parser.error("give --steps or --minutes, not both")
    steps = None if args.minutes is not None else (args.steps or (60 if args.quick else 1000))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rescore and not args.quality:
        parser.error("--rescore recomputes --quality runs: give it with --quality")
    if args.table:
        summary = Path(args.out) / "summary.json"
        if not summary.is_file():
            parser.error(f"--table: {summary} not found (a --quality run into --out {args.out} writes it)")
        print_table(json.loads(summary.read_text()))
        return
    if args.run_variant:
        run_variant(args.run_variant, Path(args.out), steps, args.minutes, args.quick, args.lpips, args.seed)
        return
    if not (args.speed or args.quality):
        args.speed = True
    variants = args.variants.split(",") if args.variants else list(QUICK_VARIANTS if args.quick else VARIANTS)
    if args.quality:  # every mistake said before the speed rows or the first row trains
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
        # missing packages are said before the first row trains, not after the rows before theirs
        peers = [v for v in variants if VARIANTS[v].peer is not None]
        if peers and importlib.util.find_spec("vector_quantize_pytorch") is None:
            parser.error(f"the rows {', '.join(peers)} need vector-quantize-pytorch: pip install -e \".[bench]\" "
                         "(or leave them out of --variants)")
        if args.lpips == "stlpips" and importlib.util.find_spec("stlpips_pytorch") is None:
            parser.error('--lpips stlpips needs stlpips-pytorch: pip install -e ".[stlpips]" (or pass --lpips none)')
        if args.seeds < 1:
            parser.error(f"--seeds must be >= 1, got {args.seeds}")
        foreign = [] if args.rescore else foreign_files(Path(args.out), variants, args.seeds)
        if foreign:
            parser.error(f"--out {args.out} holds what no run of this benchmark wrote, which the run would replace: "
                         f"{', '.join(foreign)}; choose another --out")
    if args.speed:
        speed()
    if args.quality:
        if args.rescore:
            rescore(Path(args.out), variants, args.seeds, args.lpips)
        else:
            quality(Path(args.out), variants, args.jobs, args.threads, steps, args.minutes, args.quick, args.lpips,
                    args.seeds)


if __name__ == "__main__":
    main()
