"""Stage-1 training: one readable loop that trains a VQ tokenizer (+ optional PatchGAN) with Accelerate.

RUN/ receives config.yaml, metrics.jsonl, samples/step-*.png (original | reconstruction),
checkpoints/step-*/ (resume state) and export/ (the tokenizer: config.json + model.safetensors).
``model.architecture: pixels`` has nothing to train by gradients: its colour palette is fitted by
k-means instead (``fit_palette_run``), into the same run folder files.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast
from tqdm.auto import tqdm

from stage1_vq.discriminator import min_resolution
from stage1_vq.losses import LossConfig, build_discriminator, build_perceptual, discriminator_loss, generator_loss
from stage1_vq.model import VQModel, VQModelConfig
from stage1_vq.palette import PaletteConfig, fit_palette
from vqgpt.ground.checkpoint import read_trainer_state, save_checkpoint
from vqgpt.ground.config import ConfigError, changed_keys, opt, to_dict
from vqgpt.ground.data import DataConfig, Unreadable, build_dataset, folder_overlap
from vqgpt.ground.images import save_grid, side_by_side
from vqgpt.ground.metrics import psnr
from vqgpt.training import (
    GracefulInterrupt,
    MetricsLog,
    RunFolder,
    StepMetrics,
    StreamPosition,
    Throughput,
    TrainConfig,
    after_step,
    batch_stream,
    check_replicas,
    dropped_update,
    finish_run,
    grid_path,
    is_log_step,
    keeps_caller_rng,
    last_grid,
    load_resume,
    log_images,
    make_accelerator,
    make_dataloader,
    make_ema,
    make_optimizer,
    open_run_dir,
    optimizer_step,
    step_with_earlier_micro_batches,
    warn_long_warmup,
    set_grad_checkpointing,
    set_lr,
    start_trackers,
    stream_state,
    unwrap,
)


@dataclass
class TokenizerRunConfig:
    """Everything `vqgpt train-tokenizer` needs: model, losses, data and optimisation."""

    model: VQModelConfig = opt(VQModelConfig, "the tokenizer architecture and quantizer")
    loss: LossConfig = opt(LossConfig, "reconstruction, perceptual, GAN and quantizer losses")
    data: DataConfig = opt(DataConfig, "training images")
    train: TrainConfig = opt(TrainConfig, "optimisation and bookkeeping")
    palette: PaletteConfig = opt(PaletteConfig, "model.architecture 'pixels' only: the k-means fit of its colour "
                                                "palette, which replaces gradient training (of train.* it uses seed, "
                                                "batch_size and keep_checkpoints)")
    disc_lr_ratio: float = opt(1.0, "discriminator LR as a multiple of train.lr, on train.lr's schedule (warmup and "
                                    "decay counted from step 0, not from loss.disc_start)")

    def __post_init__(self) -> None:
        channels = (self.model.in_channels, self.model.out_channels)
        if channels != (3, 3):  # the losses and every image source work in RGB
            raise ValueError(f"model.in_channels and model.out_channels must be 3 to train: images are read as RGB "
                             f"(got {channels[0]} and {channels[1]})")
        if not (math.isfinite(self.disc_lr_ratio) and self.disc_lr_ratio > 0):
            # 0 left the discriminator at its random start while the tokenizer learned to fool it
            raise ConfigError(f"disc_lr_ratio: must be a finite number > 0 (loss.gan_weight=0 trains without a "
                              f"discriminator), got {self.disc_lr_ratio}")
        factor = self.model.downsample_factor
        if self.data.resolution % factor:  # else the first step fails, naming no key
            low = self.data.resolution // factor * factor
            nearest = f"{low} or {low + factor}" if low else f"{factor}"
            raise ConfigError(f"data.resolution: {self.data.resolution} is not a multiple of the tokenizer's "
                              f"downsampling factor {factor} (nearest: {nearest})")
        resolution, depth = self.data.resolution, self.loss.disc_layers
        # (a palette fit trains no GAN, nor does a run that ends before loss.disc_start: a resume that goes past
        # it is checked with its own train.steps)
        gan = (self.loss.gan_weight > 0 and self.model.architecture != "pixels"
               and self.loss.disc_start < self.train.steps)
        if gan and resolution < min_resolution(depth):  # else it fails at loss.disc_start
            fits = max(1, int(math.log2(resolution / 3))) if resolution >= 6 else 0
            hint = f"set loss.disc_layers to {fits} or less" if fits else "raise data.resolution"
            raise ConfigError(f"loss.disc_layers: a PatchGAN of {depth} layers needs images of at least "
                              f"{min_resolution(depth)} px, and data.resolution is {resolution}: {hint}, or "
                              f"train without a discriminator (loss.gan_weight=0)")


def _snapshot_images(cfg: TokenizerRunConfig, n: int = 8) -> torch.Tensor:
    """A fixed batch of held-out images for the periodic reconstruction grids, (n, 3, R, R)."""
    dataset = build_dataset(cfg.data, "eval")
    readable = []
    for i in range(len(dataset)):
        item = dataset[i]
        if not isinstance(item, Unreadable):
            readable.append(item[0])
        if len(readable) == n:
            break
    if not readable:
        raise ValueError(f"no image of {cfg.data.source} could be read (see the warnings naming each file)")
    return torch.stack(readable)


class UsageWindow:
    """The quantizer's recent-usage bookkeeping as resume state: it lives in non-persistent buffers
    (kept out of exports), so without this a resumed run would log a too-low codebook usage until
    the window refills."""

    def __init__(self, quantizer: torch.nn.Module) -> None:
        self.quantizer = quantizer

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"last_hit_step": self.quantizer.last_hit_step.cpu().clone(),
                "usage_step": self.quantizer.usage_step.cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.quantizer.last_hit_step.copy_(state["last_hit_step"])
        self.quantizer.usage_step.copy_(state["usage_step"])


def snapshot_buffers(module: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(buffer, copy) for every buffer of ``module``: its in-forward state (BatchNorm's running stats and
    batch count), tiny next to its parameters, which are not copied. Empty for a module without buffers."""
    return [(buffer, buffer.detach().clone()) for buffer in module.buffers()]


@torch.no_grad()
def restore_buffers(snapshot: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Put the buffers of ``snapshot_buffers`` back as they were, in place: the module and its DDP wrapper
    keep holding the same tensors."""
    for buffer, saved in snapshot:
        buffer.copy_(saved)


@keeps_caller_rng
def train_tokenizer(cfg: TokenizerRunConfig, out: str | Path, resume: str | None = None,
                    overwrite: bool = False) -> Path:
    """Train a tokenizer into RUN=``out``; returns RUN/export. ``resume``: None, 'auto' or a checkpoint path;
    ``overwrite``: replace what RUN holds (without it, or ``resume``, a RUN holding a run is an error)."""
    where = folder_overlap(cfg.data.source, out)
    if where is not None:  # its sample grids became images of a class 'run'; --overwrite would delete the images
        raise ConfigError(f"--out {out} {where} the image folder data.source={cfg.data.source}: the run's sample "
                          "grids would be read as images of a class of its own; choose an --out outside it")
    tc = cfg.train
    accelerator = make_accelerator(tc, out)
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ConfigError("the tokenizer trains with DDP (configs/accelerate/multi_gpu.yaml); FSDP is for large priors")
    # a pixel tokenizer's fit ignores train.steps: its checkpoint's step is the k-means iterations + 1
    steps = None if cfg.model.architecture == "pixels" else tc.steps
    with open_run_dir(out, cfg, accelerator, resume, overwrite, steps=steps) as run:
        if accelerator.is_main_process and cfg.data.resolution != cfg.model.resolution:
            # the export records model.resolution only: what encode / reconstruct use when not told a size
            warnings.warn(f"data.resolution={cfg.data.resolution} differs from model.resolution="
                          f"{cfg.model.resolution}: encode, reconstruct and eval-tokenizer default to "
                          f"model.resolution, a size this run does not train at; set model.resolution="
                          f"{cfg.data.resolution} to make it the default, or pass --resolution to them", stacklevel=2)
        if accelerator.is_main_process and (ignored := cfg.model.ignored_keys()):
            warnings.warn(f"model.architecture={cfg.model.architecture} does not read "
                          f"{', '.join('model.' + key for key in ignored)}: setting them changes nothing", stacklevel=2)
        if accelerator.is_main_process and (ignored := cfg.loss.ignored_keys()):
            why = (f"loss.perceptual={cfg.loss.perceptual}, loss.perceptual_weight={cfg.loss.perceptual_weight:g}, "
                   f"loss.gan_weight={cfg.loss.gan_weight:g}")
            warnings.warn(f"{why}: {', '.join('loss.' + key for key in ignored)} "
                          f"{'is' if len(ignored) == 1 else 'are'} not read, so setting "
                          f"{'it' if len(ignored) == 1 else 'them'} changes nothing", stacklevel=2)
        ignored = _unread_by_a_palette(cfg) if cfg.model.architecture == "pixels" else []
        if accelerator.is_main_process and ignored:
            warnings.warn(f"model.architecture=pixels fits a palette by k-means, nothing by gradients: "
                          f"{', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} not read, so setting "
                          f"{'it' if len(ignored) == 1 else 'them'} changes nothing", stacklevel=2)
        if accelerator.is_main_process and (ignored := cfg.model.quantizer.ignored_keys()):
            warnings.warn(f"model.quantizer.kind={cfg.model.quantizer.kind} does not read "
                          f"{', '.join('model.quantizer.' + key for key in ignored)}: setting "
                          f"{'it' if len(ignored) == 1 else 'them'} changes nothing", stacklevel=2)
        if (accelerator.is_main_process and cfg.model.architecture != "pixels" and cfg.loss.gan_weight > 0
                and cfg.loss.disc_start >= tc.steps):
            warnings.warn(f"loss.disc_start={cfg.loss.disc_start} is not before train.steps={tc.steps}: this run "
                          f"trains no step with the adversarial loss (a later resume with more train.steps "
                          f"would); set loss.gan_weight=0 to train without a discriminator", stacklevel=2)
        if cfg.model.architecture == "pixels":
            return fit_palette_run(cfg, accelerator, run)
        if accelerator.is_main_process:
            warn_long_warmup(tc)
        run_dir = run.path
        is_main = accelerator.is_main_process

        # ---- data
        dataset = build_dataset(cfg.data, "train")
        loader = make_dataloader(dataset, tc)
        if len(loader) < accelerator.num_processes:
            raise ConfigError(f"train.batch_size={tc.batch_size} x {accelerator.num_processes} processes is larger "
                              f"than the {len(dataset)} training images of {cfg.data.source}")
        snapshot = _snapshot_images(cfg)

        # ---- models, losses, optimisers
        model = VQModel(cfg.model)
        set_grad_checkpointing(model, tc.grad_checkpointing)
        use_gan = cfg.loss.gan_weight > 0
        disc = build_discriminator(cfg.loss) if use_gan else None
        if use_gan and cfg.loss.disc_norm == "batch" and accelerator.num_processes > 1:
            if accelerator.device.type == "cpu":
                warnings.warn("loss.disc_norm=batch with several CPU processes: BatchNorm statistics stay per process "
                              "(SyncBatchNorm needs GPUs); loss.disc_norm=group avoids the question", stacklevel=2)
            else:  # batch statistics over the global batch, as one process would compute them
                disc = torch.nn.SyncBatchNorm.convert_sync_batchnorm(disc)
        perceptual = build_perceptual(cfg.loss)
        opt_g = make_optimizer(model.parameters(), tc)
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
        ema = make_ema(accelerator, model, tc.ema_decay)
        quantizer = unwrap(accelerator, model).quantize
        accelerator.register_for_checkpointing(UsageWindow(quantizer))
        # With grad_accum > 1 the quantizer's training bookkeeping (EMA codebook, restarts, usage window,
        # the histogram behind 'perplexity') runs once per optimizer step over all its micro-batches, as
        # for one batch of batch_size x grad_accum (see BaseQuantizer); its step statistics are logged once.
        defer_quantizer = tc.grad_accum > 1

        # ---- resume
        step, position = load_resume(accelerator, run.checkpoint, tc.batch_size)
        resumed_at = step
        start_trackers(accelerator, cfg, run_dir, step)
        run.started()  # (after every check of the setup: --overwrite's old run goes only now)

        log = MetricsLog(run_dir, accelerator)
        bar = tqdm(total=tc.steps, initial=step, disable=not is_main, desc="tokenizer", dynamic_ncols=True)
        batches = batch_stream(accelerator, loader, position)

        def replicas() -> dict[str, torch.nn.Module | None]:
            return {"model": unwrap(accelerator, model), "disc": unwrap(accelerator, disc) if use_gan else None,
                    "ema": ema.module if ema is not None else None}

        def checkpoint() -> None:
            check_replicas(accelerator, replicas())
            save_checkpoint(accelerator, run_dir, step, tc.keep_checkpoints,
                            extra={**stream_state(position, accelerator, tc.batch_size), "skipped": skipped,
                                   "unreadable": unreadable}, config=to_dict(cfg))

        def snapshot_grid() -> None:
            if is_main:
                net = ema.module if ema is not None else unwrap(accelerator, model)
                was_training = net.training
                net.eval()
                with torch.no_grad(), accelerator.autocast():
                    recon = net(snapshot.to(accelerator.device)).reconstruction.float().cpu()
                net.train(was_training)
                grid = save_grid(side_by_side(snapshot, recon), grid_path(run_dir, step), nrow=8)
                log_images(accelerator, "reconstructions", grid, step)

        model.train()
        # dropped updates; items left out because their file failed to decode (run totals, kept across resumes)
        resumed = read_trainer_state(run.checkpoint) if run.checkpoint is not None else {}
        skipped, unreadable = int(resumed.get("skipped", 0)), int(resumed.get("unreadable", 0))
        throughput = Throughput(tc.batch_size * tc.grad_accum * accelerator.num_processes, step)  # images
        with GracefulInterrupt() as interrupt, bar:  # the bar closes on every way out, errors too
            while step < tc.steps:
                gan_on = use_gan and step >= cfg.loss.disc_start
                log_now = is_log_step(step + 1, tc)
                lr = set_lr(opt_g, step, tc)
                if use_gan:
                    set_lr(opt_d, step, tc, peak=tc.lr * cfg.disc_lr_ratio)
                metrics = StepMetrics()
                # One optimizer step = grad_accum micro-batches through both models together.
                for micro_batch in range(tc.grad_accum):
                    if defer_quantizer:  # the last micro-batch's forward applies the step's quantizer update
                        quantizer.set_step_updates("finish" if micro_batch == tc.grad_accum - 1 else "defer")
                    images, _labels = next(batches)
                    # Undecodable files are left out of their (full-size: drop_last) batch. One sum gives
                    # every rank the count and says whether some rank got no image at all: then every rank
                    # drops this micro-batch like a non-finite one, so none waits in a collective alone.
                    lost, empty = accelerator.reduce(torch.tensor([tc.batch_size - len(images), float(len(images) == 0)],
                                                                  device=accelerator.device), reduction="sum").tolist()
                    unreadable += int(lost)
                    if empty:
                        with accelerator.accumulate(*([model, disc] if use_gan else [model])):
                            for optimizer, net in [(opt_g, model), (opt_d, disc)] if use_gan else [(opt_g, model)]:
                                if accelerator.sync_gradients:  # the step, with its earlier micro-batches'
                                    step_with_earlier_micro_batches(accelerator, optimizer, net, tc)
                                optimizer.zero_grad(set_to_none=True)  # acts on the syncing micro-batch only
                        continue
                    # The discriminator's forwards in train mode (the generator's GAN term, then its own step
                    # on real and fake) update its BatchNorm running stats before the finite decision; a
                    # dropped micro-batch puts them back, as a NaN reconstruction would leave them NaN for good
                    # (and every later checkpoint and export refused). The decision is all ranks', so every
                    # rank restores alike. Nothing to keep with loss.disc_norm=group (no buffers).
                    disc_buffers = snapshot_buffers(disc_frozen) if gan_on else []
                    with accelerator.accumulate(*([model, disc] if use_gan else [model])):
                        # -- generator / tokenizer
                        with accelerator.autocast():
                            out = model(images)                      # reconstruction (B,3,H,W)
                            logits_fake = None
                            if gan_on:
                                disc_frozen.requires_grad_(False)
                                logits_fake = disc_frozen(out.reconstruction)
                            g = generator_loss(images, out.reconstruction, out.quantizer.loss, logits_fake,
                                               perceptual, cfg.loss, step, unwrap(accelerator, model).last_layer_weight)
                        finite = optimizer_step(accelerator, g.total, opt_g, model, tc)
                        # -- discriminator, on the same images and only after a good generator update
                        d_loss, d_logits = torch.zeros((), device=accelerator.device), {}
                        if use_gan:
                            disc_frozen.requires_grad_(True)
                            if gan_on and finite:
                                with accelerator.autocast():
                                    real, fake = disc(images), disc(out.reconstruction.detach())
                                    d_loss = discriminator_loss(real, fake, cfg.loss)
                                # taming's logits_real / logits_fake: how far apart the discriminator tells them
                                d_logits = {"logits_real": real.detach().mean(), "logits_fake": fake.detach().mean()}
                                finite = optimizer_step(accelerator, d_loss, opt_d, disc, tc)
                            elif gan_on:
                                # a dropped generator update drops the discriminator's too, as optimizer_step
                                # does for the generator: on the syncing micro-batch the step is made from its
                                # earlier micro-batches' gradients, which are then cleared (else they would
                                # join the next step's)
                                if accelerator.sync_gradients:
                                    step_with_earlier_micro_batches(accelerator, opt_d, disc, tc)
                                opt_d.zero_grad(set_to_none=True)
                    if finite:
                        metrics.add(loss=g.total, rec_loss=g.reconstruction, perceptual=g.perceptual, gan=g.gan,
                                    gan_weight=g.gan_weight, quant_loss=g.quantizer, disc_loss=d_loss, **d_logits)
                        if log_now:
                            # every quantizer statistic: usage and perplexity (from all ranks' codes), and
                            # the kind's own (per-depth usage/error of rvq, the entropies of lfq, restarts);
                            # under grad_accum > 1 the step's usage, perplexity and restarts come below
                            metrics.add(psnr=psnr(images, out.reconstruction).mean(), **out.quantizer.stats)
                    else:
                        restore_buffers(disc_buffers)
                        skipped += dropped_update(accelerator, tc, "tokenizer loss or gradient norm", step + 1, run_dir)
                if defer_quantizer:
                    # The step's quantizer statistics, over every micro-batch whose forward ran (the update
                    # happens in the forward, before the finite check, as with grad_accum 1); applies the
                    # step here if its last micro-batch was empty, so nothing stays pending at a checkpoint.
                    step_stats = quantizer.finish_step()
                    if log_now:
                        metrics.add(**step_stats)
                step += 1
                if ema is not None:
                    ema.update(unwrap(accelerator, model), step=step)
                if log_now:
                    record = {"step": step, "lr": lr, **metrics.mean(accelerator),
                              "images_per_s": throughput.rate(step),
                              "skipped": skipped, "unreadable": unreadable}
                    log.write(record)
                    bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}",
                                    psnr=f"{record.get('psnr', float('nan')):.2f}",
                                    usage=f"{record.get('usage', float('nan')):.0%}")
                after_step(accelerator, tc, step, bar, interrupt, checkpoint, snapshot_grid, run_dir)
        bar.close()
        quantizer.set_step_updates("every_forward")
        checkpoint()
        last_grid(run_dir, step, resumed_at, tc, snapshot_grid)

        export_dir = run_dir / "export"
        if is_main:
            final = ema.module if ema is not None else unwrap(accelerator, model)
            final.save_pretrained(export_dir)
            accelerator.print(f"tokenizer exported to {export_dir}")
        finish_run(accelerator)
        return export_dir


# what a pixel tokenizer's palette fit reads of train (the rest is gradient training's) and of the quantizer
_PALETTE_READS = {"train": ("batch_size", "seed", "keep_checkpoints", "mixed_precision", "cpu", "log_with",
                            "project_name"),
                  "quantizer": ("kind", "codebook_size")}


def _unread_by_a_palette(cfg: TokenizerRunConfig) -> list[str]:
    """The loss, train and quantizer keys set away from their defaults that a palette fit does not read (less the
    quantizer keys its kind does not read either, which ``QuantizerConfig.ignored_keys`` names already)."""
    sections = {"loss": cfg.loss, "train": cfg.train, "model.quantizer": cfg.model.quantizer}
    said = set(cfg.model.quantizer.ignored_keys())  # (named by the quantizer kind's own warning)
    unread = []
    for name, section in sections.items():
        reads = _PALETTE_READS.get(name.rsplit(".", 1)[-1], ())
        keys = [f.name for f in dataclasses.fields(section)
                if f.name not in reads and not (section is cfg.model.quantizer and f.name in said)]
        unread += [f"{name}.{key}" for key in changed_keys(section, keys)]
    return unread


def fit_palette_run(cfg: TokenizerRunConfig, accelerator: Accelerator, run: RunFolder) -> Path:
    """``architecture: pixels``: fit the palette by k-means into RUN (metrics.jsonl: the distortion after the
    init, step 1, and each Lloyd iteration; then held-out PSNR / usage), checkpoint it once (so ``--resume
    auto`` finds a finished run, and re-exports it) and export it; returns RUN/export."""
    run_dir, tc = run.path, cfg.train
    model = VQModel(cfg.model).to(accelerator.device).eval()
    accelerator.register_for_checkpointing(model)  # the palette is the whole state
    step, _ = load_resume(accelerator, run.checkpoint, tc.batch_size)
    start_trackers(accelerator, cfg, run_dir, step)
    done = cfg.palette.iterations + 1
    if step < done:
        log = MetricsLog(run_dir, accelerator)

        def log_distortion(iteration: int, distortion: float) -> None:
            if iteration + 1 < done:  # the last one goes with the held-out figures below
                log.write({"step": iteration + 1, "distortion": distortion})

        if accelerator.is_main_process:  # one process fits; the others get its palette
            fit = fit_palette(cfg.data, model.codebook_size, cfg.palette, seed=tc.seed, batch_size=tc.batch_size,
                              on_iteration=log_distortion)
            model.quantize.palette.copy_(fit.palette)
        model.quantize.palette.copy_(broadcast(model.quantize.palette.contiguous(), from_process=0))
        if accelerator.is_main_process:
            snapshot = _snapshot_images(cfg).to(accelerator.device)
            out = model(snapshot)
            log.write({"step": done, "distortion": fit.distortion[-1],
                       "psnr": psnr(snapshot, out.reconstruction).mean(), **out.quantizer.stats,
                       "sample_pixels": fit.num_pixels,
                       "sample_usage": float((fit.counts > 0).float().mean())})
            save_grid(side_by_side(snapshot.cpu(), out.reconstruction.cpu()),
                      run_dir / "samples" / f"step-{done:08d}.png", nrow=8)
        run.started()  # the fit read its data: --overwrite's old run goes before the new checkpoint comes
        save_checkpoint(accelerator, run_dir, done, tc.keep_checkpoints,
                        extra=stream_state(StreamPosition(), accelerator, tc.batch_size), config=to_dict(cfg))
    export_dir = run_dir / "export"
    if accelerator.is_main_process:
        model.save_pretrained(export_dir)
        accelerator.print(f"tokenizer (a palette of {model.codebook_size} colours) exported to {export_dir}")
    finish_run(accelerator)
    return export_dir
