"""Pieces both training loops share: the optimisation config, Accelerator set-up, LR schedule,
an endless resumable batch stream, JSONL metrics, graceful interrupts and non-finite checks.

The loops themselves live in ``stage1_vq/train.py`` and ``stage2_prior/train.py``, each one
readable function from top to bottom.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed

from vqgpt.config import ConfigError, opt, save_config


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings shared by both stages."""

    steps: int = opt(1000, "optimizer steps to train for")
    batch_size: int = opt(32, "images (or token grids) per process per micro-batch")
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step")
    lr: float = opt(1e-4, "peak learning rate")
    min_lr_ratio: float = opt(0.1, "final LR as a fraction of the peak (cosine schedule)")
    warmup_steps: int = opt(100, "linear warmup steps")
    lr_schedule: str = opt("cosine", "cosine | constant (after warmup)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off)")
    mixed_precision: str = opt("no", "no | bf16 | fp16 (fp16 uses loss scaling; bf16 is ~4x faster on AMX CPUs)")
    ema_decay: float = opt(0.0, "EMA of the weights, exported instead of the raw weights (0 = off)")
    seed: int = opt(0, "random seed (each process adds its rank for data augmentation)")
    num_workers: int = opt(0, "DataLoader worker processes")
    log_every: int = opt(10, "write a metrics line every N steps")
    sample_every: int = opt(0, "write an image grid every N steps (0 = only at the end)")
    checkpoint_every: int = opt(500, "write a resume checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = opt(2, "how many recent checkpoints to keep")
    on_nonfinite: str = opt("stop", "stop | skip: what a NaN/inf loss does")
    compile: bool = opt(False, "torch.compile the model")
    cpu: bool = opt(False, "force CPU even when a GPU is present")

    def __post_init__(self) -> None:
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"train.mixed_precision: expected no | bf16 | fp16, got {self.mixed_precision!r}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ConfigError(f"train.lr_schedule: expected cosine | constant, got {self.lr_schedule!r}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ConfigError(f"train.on_nonfinite: expected stop | skip, got {self.on_nonfinite!r}")
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1, got {getattr(self, name)}")


def make_accelerator(cfg: TrainConfig, run_dir: str | Path) -> Accelerator:
    """An Accelerator for this run; seeds every process (plus its rank, for data augmentation)."""
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        project_dir=str(run_dir),
        cpu=cfg.cpu,
        # Seeded shuffling that depends only on (seed, epoch): exact resume and no overlap across ranks.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(cfg.seed, device_specific=True)
    return accelerator


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak LR at ``step``: linear warmup, then cosine down to ``min_lr_ratio``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(params, cfg: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay on matrices only (norms, biases and embeddings-1d exempt)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr if lr is not None else cfg.lr, betas=(cfg.beta1, cfg.beta2))


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig, peak: float | None = None) -> float:
    """Set the LR of every param group for optimizer step ``step``; returns it.

    Computed from the step alone (no scheduler state), so resume is exact and the schedule does
    not depend on the number of processes (accelerate's prepared schedulers step once per process).
    """
    lr = (peak if peak is not None else cfg.lr) * lr_factor(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


@dataclass
class StreamPosition:
    """Where the endless batch stream stands: epoch and micro-batches consumed in it."""

    epoch: int = 0
    batch: int = 0


def batch_stream(accelerator: Accelerator, dataloader, position: StreamPosition) -> Iterator[Any]:
    """Yield micro-batches forever, epoch after epoch, starting at ``position`` (updated in place)."""
    while True:
        if hasattr(dataloader, "set_epoch"):
            dataloader.set_epoch(position.epoch)
        loader = accelerator.skip_first_batches(dataloader, position.batch) if position.batch else dataloader
        for batch in loader:
            position.batch += 1
            yield batch
        position.epoch += 1
        position.batch = 0


class MetricsLog:
    """Appends one JSON object per line to RUN/metrics.jsonl (main process only)."""

    def __init__(self, run_dir: str | Path, accelerator: Accelerator) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = accelerator.is_main_process

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (torch.Tensor, float)) else v) for k, v in record.items()}
        clean["time"] = round(time.time(), 3)
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")


class GracefulInterrupt:
    """Turns the first SIGINT / SIGTERM into a flag the loop checks, so it can checkpoint and exit."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.requested:  # a second Ctrl-C aborts at once
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "GracefulInterrupt":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handler, nothing to restore
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class NonFiniteLoss(RuntimeError):
    """A NaN or inf loss stopped the run."""


def all_finite(accelerator: Accelerator, *values: torch.Tensor) -> bool:
    """True when every value is finite on every process (one reduction, so all ranks agree)."""
    flag = torch.tensor([float(all(torch.isfinite(v.detach()).all() for v in values))], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() == accelerator.num_processes)


def prepare_run_dir(run_dir: str | Path, config: Any, accelerator: Accelerator) -> Path:
    """Create RUN/ and write the resolved config as RUN/config.yaml (main process)."""
    run_dir = Path(run_dir)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    return run_dir


def unwrap(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP / FSDP / torch.compile wrappers."""
    return accelerator.unwrap_model(model, keep_fp32_wrapper=False)
