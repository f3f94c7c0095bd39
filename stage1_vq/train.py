"""Stage-1 training: one readable loop that trains a VQ tokenizer (+ optional PatchGAN) with Accelerate.

RUN/ receives config.yaml, metrics.jsonl, samples/step-*.png (original | reconstruction),
checkpoints/step-*/ (resume state) and export/ (the tokenizer: config.json + model.safetensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from stage1_vq.losses import LossConfig, build_discriminator, build_perceptual, discriminator_loss, generator_loss
from stage1_vq.model import VQModel, VQModelConfig
from vqgpt.checkpoint import read_trainer_state, resolve_resume, save_checkpoint
from vqgpt.config import opt
from vqgpt.data import DataConfig, build_dataset
from vqgpt.images import save_grid, side_by_side
from vqgpt.metrics import psnr
from vqgpt.training import (
    GracefulInterrupt,
    MetricsLog,
    NonFiniteLoss,
    StreamPosition,
    TrainConfig,
    all_finite,
    batch_stream,
    make_accelerator,
    make_optimizer,
    prepare_run_dir,
    set_lr,
    unwrap,
)


@dataclass
class TokenizerRunConfig:
    """Everything `vqgpt train-tokenizer` needs: model, losses, data and optimisation."""

    model: VQModelConfig = opt(VQModelConfig, "the tokenizer architecture and quantizer")
    loss: LossConfig = opt(LossConfig, "reconstruction, perceptual, GAN and quantizer losses")
    data: DataConfig = opt(DataConfig, "training images")
    train: TrainConfig = opt(TrainConfig, "optimisation and bookkeeping")
    disc_lr_ratio: float = opt(1.0, "discriminator LR as a multiple of train.lr")


def _snapshot_images(cfg: TokenizerRunConfig, n: int = 8) -> torch.Tensor:
    """A fixed batch of held-out images for the periodic reconstruction grids, (n, 3, R, R)."""
    dataset = build_dataset(cfg.data, "eval")
    return torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])


def train_tokenizer(cfg: TokenizerRunConfig, out: str | Path, resume: str | None = None) -> Path:
    """Train a tokenizer into RUN=``out``; returns RUN/export. ``resume``: None, 'auto' or a checkpoint path."""
    tc = cfg.train
    accelerator = make_accelerator(tc, out)
    run_dir = prepare_run_dir(out, cfg, accelerator)
    is_main = accelerator.is_main_process

    # ---- data
    dataset = build_dataset(cfg.data, "train")
    loader = DataLoader(dataset, batch_size=tc.batch_size, shuffle=True, drop_last=True,
                        num_workers=tc.num_workers, persistent_workers=tc.num_workers > 0)
    snapshot = _snapshot_images(cfg)

    # ---- models, losses, optimisers
    model = VQModel(cfg.model)
    use_gan = cfg.loss.gan_weight > 0
    disc = build_discriminator(cfg.loss) if use_gan else None
    perceptual = build_perceptual(cfg.loss)
    opt_g = make_optimizer(model.parameters(), tc)
    ema = ModelEmaV3(model, decay=tc.ema_decay) if tc.ema_decay > 0 else None
    if tc.compile:
        model = torch.compile(model)
    if use_gan:
        opt_d = make_optimizer(disc.parameters(), tc, lr=tc.lr * cfg.disc_lr_ratio)
        model, disc, opt_g, opt_d, loader = accelerator.prepare(model, disc, opt_g, opt_d, loader)
        # The generator's GAN term goes through the bare discriminator with frozen weights, so
        # it neither writes discriminator gradients nor engages DDP's reducer for that pass.
        disc_frozen = unwrap(accelerator, disc)
    else:
        model, opt_g, loader = accelerator.prepare(model, opt_g, loader)
    if perceptual is not None:
        perceptual = perceptual.to(accelerator.device).eval().requires_grad_(False)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)

    # ---- resume
    step, position = 0, StreamPosition()
    ckpt = resolve_resume(run_dir, resume)
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        state = read_trainer_state(ckpt)
        step, position = state["step"], StreamPosition(state["epoch"], state["batch"])
        accelerator.print(f"resumed from {ckpt} at step {step}")

    log = MetricsLog(run_dir, accelerator)
    bar = tqdm(total=tc.steps, initial=step, disable=not is_main, desc="tokenizer", dynamic_ncols=True)
    batches = batch_stream(accelerator, loader, position)

    def checkpoint() -> None:
        save_checkpoint(accelerator, run_dir, step, tc.keep_checkpoints,
                        extra={"epoch": position.epoch, "batch": position.batch})

    def snapshot_grid() -> None:
        if is_main:
            net = ema.module if ema is not None else unwrap(accelerator, model)
            was_training = net.training
            net.eval()
            with torch.no_grad(), accelerator.autocast():
                recon = net(snapshot.to(accelerator.device)).reconstruction.float().cpu()
            net.train(was_training)
            save_grid(side_by_side(snapshot, recon), run_dir / "samples" / f"step-{step:08d}.png", nrow=8)

    model.train()
    with GracefulInterrupt() as interrupt:
        while step < tc.steps:
            gan_on = use_gan and step >= cfg.loss.disc_start
            lr = set_lr(opt_g, step, tc)
            if use_gan:
                set_lr(opt_d, step, tc, peak=tc.lr * cfg.disc_lr_ratio)
            # One optimizer step = grad_accum micro-batches through both models together.
            for _ in range(tc.grad_accum):
                images, _labels = next(batches)
                with accelerator.accumulate(*( [model, disc] if use_gan else [model] )):
                    # -- generator / tokenizer
                    with accelerator.autocast():
                        out = model(images)                      # reconstruction (B,3,H,W)
                        logits_fake = None
                        if gan_on:
                            disc_frozen.requires_grad_(False)
                            logits_fake = disc_frozen(out.reconstruction)
                        g = generator_loss(images, out.reconstruction, out.quantizer.loss, logits_fake,
                                           perceptual, cfg.loss, step, unwrap(accelerator, model).last_layer_weight)
                    finite = all_finite(accelerator, g.total)
                    if finite:
                        accelerator.backward(g.total)
                        if accelerator.sync_gradients and tc.grad_clip > 0:
                            accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip)
                        opt_g.step()
                    opt_g.zero_grad(set_to_none=True)
                    # -- discriminator
                    d_loss = torch.zeros((), device=accelerator.device)
                    if use_gan:
                        disc_frozen.requires_grad_(True)
                        if gan_on and finite:
                            with accelerator.autocast():
                                d_loss = discriminator_loss(disc(images), disc(out.reconstruction.detach()), cfg.loss)
                            accelerator.backward(d_loss)
                            if accelerator.sync_gradients and tc.grad_clip > 0:
                                accelerator.clip_grad_norm_(disc.parameters(), tc.grad_clip)
                            opt_d.step()
                        opt_d.zero_grad(set_to_none=True)
                if not finite:
                    if tc.on_nonfinite == "stop":
                        last = resolve_resume(run_dir, "auto")
                        raise NonFiniteLoss(f"non-finite tokenizer loss at step {step}; stopping. "
                                            f"Last good checkpoint: {last or 'none yet'}")
                    accelerator.print(f"warning: non-finite loss at step {step}, micro-batch skipped")
            step += 1
            if ema is not None:
                ema.update(unwrap(accelerator, model), step=step)

            if step % tc.log_every == 0 or step == tc.steps:
                stats = out.quantizer.stats
                record = {
                    "step": step, "lr": lr,
                    "loss": accelerator.reduce(g.total.detach(), "mean"),
                    "rec_loss": accelerator.reduce(g.reconstruction.detach(), "mean"),
                    "perceptual": accelerator.reduce(g.perceptual.detach(), "mean"),
                    "gan": accelerator.reduce(g.gan.detach(), "mean"),
                    "gan_weight": g.gan_weight.detach(),
                    "quant_loss": accelerator.reduce(g.quantizer.detach(), "mean"),
                    "disc_loss": accelerator.reduce(d_loss.detach(), "mean"),
                    "psnr": accelerator.reduce(psnr(images, out.reconstruction).mean(), "mean"),
                    "usage": stats["usage"].detach(), "perplexity": stats["perplexity"].detach(),
                }
                log.write(record)
                bar.set_postfix(loss=f"{float(record['loss']):.4f}", psnr=f"{float(record['psnr']):.2f}",
                                usage=f"{float(record['usage']):.0%}")
            bar.update(1)
            if tc.sample_every and step % tc.sample_every == 0:
                snapshot_grid()
            if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < tc.steps:
                checkpoint()
            stop = torch.tensor([float(interrupt.requested)], device=accelerator.device)
            if accelerator.reduce(stop, "sum").item() > 0:
                checkpoint()
                bar.close()
                accelerator.print(f"interrupted: checkpoint written at step {step}; continue with --resume auto")
                accelerator.end_training()
                raise KeyboardInterrupt
    bar.close()
    checkpoint()
    snapshot_grid()

    export_dir = run_dir / "export"
    if is_main:
        final = ema.module if ema is not None else unwrap(accelerator, model)
        final.save_pretrained(export_dir)
        accelerator.print(f"tokenizer exported to {export_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return export_dir
