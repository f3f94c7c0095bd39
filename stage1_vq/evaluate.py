"""Reconstruction of held-out images by a tokenizer, with PSNR / SSIM / LPIPS / codebook figures."""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from stage1_vq.model import VQModel
from vqgpt.ground.data import DataConfig, build_dataset, readable_batches
from vqgpt.ground.images import save_grid, side_by_side, tensor_to_pil
from vqgpt.ground.metrics import bits_per_image, code_histogram, codebook_stats, psnr, ssim

# the reconstructions reconstruct() writes into OUT/images: 00000.png, 00001.png, ...
_RECONSTRUCTION_NAME = re.compile(r"\d{5,}\.png")


def load_lpips(kind: str, device: torch.device) -> torch.nn.Module | None:
    """'vgg' (standard weights; downloads), 'random' (random backbone, for tests), 'none', or a local weights path."""
    if kind == "none":
        return None
    from stage1_vq.losses import LossConfig, build_perceptual

    cfg = LossConfig()
    if kind == "random":
        cfg = replace(cfg, perceptual="lpips-random")
    elif kind != "vgg":
        if not Path(kind).is_file():  # a path the user gave: a typo is theirs to fix, not a reason to report null
            raise FileNotFoundError(f"--lpips {kind}: no such weights file (give a local LPIPS weights file, "
                                    "or vgg, random, none)")
        cfg = replace(cfg, perceptual="lpips-vgg", perceptual_weights_path=kind)
    try:
        # A fixed seed: the 'random' backbone is the same network in every run (its figures compare
        # across runs, like --fid-weights random), and the caller's RNG stream is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = build_perceptual(cfg)
    except Exception as exc:  # offline machines cannot fetch the VGG weights: report, don't crash
        warnings.warn(f"LPIPS unavailable ({type(exc).__name__}: {exc}); reporting lpips as null. "
                      "Pass --lpips PATH to local weights, or --lpips none.")
        return None
    return net.to(device).eval() if net is not None else None


def _clear_previous_run(out: Path) -> None:
    """Delete what an earlier run wrote into ``out``: its metrics.json (first, so that a run that fails
    midway leaves no figures of other images behind) and its numbered reconstructions in
    ``out/images``; any other file there is the user's and stays."""
    (out / "metrics.json").unlink(missing_ok=True)
    folder = out / "images"
    if folder.is_dir():
        for path in folder.iterdir():
            if _RECONSTRUCTION_NAME.fullmatch(path.name) and path.is_file():
                path.unlink()


@torch.inference_mode()
def reconstruct(tokenizer_dir: str | Path, images: str, out: str | Path, num_images: int | None = None,
                resolution: int | None = None, batch_size: int = 32, lpips: str = "vgg",
                save_images: bool = True, device: str | None = None, progress: bool = True,
                on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> dict:
    """Reconstruct the evaluation images of ``images``; write PNGs + grid + metrics.json; return the metrics.

    ``num_images``: the first that many readable images (an undecodable file is left out and not
    counted). The reconstructions of an earlier run into ``out`` are deleted first, so that the
    folder holds one run's images beside its metrics.json.
    ``on_batch(originals, reconstructions)``, both (B, 3, H, W) in [-1, 1], sees every batch (e.g. rFID features).
    """
    if num_images is not None and num_images < 1:
        raise ValueError(f"--num must be >= 1, got {num_images}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = VQModel.from_pretrained(tokenizer_dir).to(device).eval()
    resolution = resolution or model.config.resolution
    dataset = build_dataset(DataConfig(source=images, resolution=resolution, random_crop=False, hflip=False), "eval")
    batches = readable_batches(dataset, batch_size, limit=num_images)  # --num counts readable images
    wanted = len(dataset) if num_images is None else min(num_images, len(dataset))
    perceptual = load_lpips(lpips, device)
    out = Path(out)
    _clear_previous_run(out)
    (out / "images").mkdir(parents=True, exist_ok=True)

    psnrs, ssims, lpipss = [], [], []
    # residual VQ: PSNR of the reconstruction from the first d of the D codes per position, d < D
    coarse: dict[int, list[torch.Tensor]] = {d: [] for d in range(1, model.codes_per_position)}
    counts = torch.zeros(model.codebook_size, dtype=torch.long)
    grid_pairs = []
    index = 0
    grid_shape = None
    for batch, _labels in tqdm(batches, desc="reconstruct", total=-(-wanted // batch_size),
                               disable=not progress):
        batch = batch.to(device)
        codes = model.encode(batch)                                      # (B, h, w)
        recon = model.decode(codes).clamp(-1, 1)                         # (B, 3, H, W)
        grid_shape = tuple(codes.shape[1:])
        if on_batch is not None:
            on_batch(batch, recon)
        counts += code_histogram(codes, model.codebook_size)
        psnrs.append(psnr(batch, recon).cpu())
        for d in coarse:
            partial = model.decode_latents(model.quantize.codes_from_indices(codes, depths=d)).clamp(-1, 1)
            coarse[d].append(psnr(batch, partial).cpu())
        ssims.append(ssim(batch, recon).cpu())
        if perceptual is not None:
            lpipss.append(perceptual(batch, recon).flatten().float().cpu())
        if len(grid_pairs) < 16:
            grid_pairs.append((batch[: 16 - len(grid_pairs)].cpu(), recon[: 16 - len(grid_pairs)].cpu()))
        if save_images:
            for img in recon.cpu():
                tensor_to_pil(img).save(out / "images" / f"{index:05d}.png")
                index += 1
    if grid_shape is None:
        raise ValueError(f"no images to reconstruct in {images}")
    originals = torch.cat([a for a, _ in grid_pairs])[:16]
    recons = torch.cat([b for _, b in grid_pairs])[:16]
    save_grid(side_by_side(originals, recons), out / "grid.png", nrow=8)
    stats = codebook_stats(counts)
    metrics = {
        "tokenizer": str(tokenizer_dir),
        "images": images,
        "num_images": int(sum(len(p) for p in psnrs)),
        "resolution": resolution,
        "grid": list(grid_shape),
        "codebook_size": model.codebook_size,
        "psnr": float(torch.cat(psnrs).mean()),
        "ssim": float(torch.cat(ssims).mean()),
        "lpips": float(torch.cat(lpipss).mean()) if lpipss else None,
        "codebook_usage": stats["usage"],
        "num_tokens": int(counts.sum()),  # usage counts codes hit among these: few tokens undercount it
        "perplexity": stats["perplexity"],
        # log2 of the codes one grid cell can hold: residual VQ's cells hold one depth's codebook_size each
        "bits_per_image": bits_per_image(grid_shape, model.config.quantizer.codebook_size),
    }
    if coarse:
        metrics["psnr_by_depth"] = [float(torch.cat(coarse[d]).mean()) for d in coarse] + [metrics["psnr"]]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
