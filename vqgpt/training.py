"""Pieces both training loops share: the optimisation config, Accelerator set-up, LR schedule,
a resumable batch stream with per-sample seeded augmentation, step metrics reduced across
processes, graceful interrupts, non-finite checks, a check that DDP replicas agree, and the run
folder's guard (one run per folder, no silent replacement, a resume that must match the run).

The loops themselves live in ``stage1_vq/train.py`` and ``stage2_prior/train.py``, each one
readable function from top to bottom.

Distributed contract (DDP through ``accelerate launch``):
- ``train.batch_size`` is per process; the global batch is batch_size x grad_accum x processes.
  Micro-batch i of the seeded global order goes to rank i % processes, so a 2-process run with
  batch_size B sees, step by step, exactly the images a 1-process run with batch_size 2B sees.
- Every process is seeded with seed + rank (dropout, class dropout, restarts differ per rank);
  the sample order depends on ``seed`` alone, and each sample's augmentation on
  (seed, epoch, index) alone, so neither depends on the process count, timing or a resume.
- Metrics are means over all processes and micro-batches of the step; only the main process
  writes files (checkpoint shards and RNG states excepted: every rank saves its own).
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import os
import shutil
import signal
import socket
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    GradientAccumulationPlugin,
    broadcast_object_list,
    set_seed,
)
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, Dataset

from vqgpt.checkpoint import check_checkpoint, list_checkpoints, read_trainer_state, resolve_resume
from vqgpt.config import ConfigError, from_dict, opt, read_yaml, save_config, to_dict
from vqgpt.data import drop_unreadable


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings shared by both stages."""

    steps: int = opt(1000, "optimizer steps to train for")
    batch_size: int = opt(32, "images (or token grids) per process per micro-batch; "
                              "global batch = batch_size x grad_accum x processes")
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step")
    lr: float = opt(1e-4, "peak learning rate")
    min_lr_ratio: float = opt(0.1, "final LR as a fraction of the peak (cosine schedule)")
    warmup_steps: int = opt(100, "linear warmup steps")
    lr_schedule: str = opt("cosine", "cosine | constant (after warmup)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off)")
    mixed_precision: str = opt("no", "no | bf16 | fp16 (fp16 uses loss scaling and needs a GPU; "
                                     "bf16 is ~4x faster on AMX CPUs)")
    grad_checkpointing: bool = opt(False, "recompute activations in the backward pass (less memory, "
                                          "~30% more compute; priors only)")
    ema_decay: float = opt(0.0, "EMA of the weights, exported instead of the raw weights (0 = off)")
    seed: int = opt(0, "random seed: sample order and augmentation use it as is, model-side randomness "
                       "(dropout, ...) uses seed + process rank")
    num_workers: int = opt(0, "DataLoader worker processes")
    log_every: int = opt(10, "write a metrics line every N steps")
    sample_every: int = opt(0, "write an image grid every N steps (0 = only at the end)")
    checkpoint_every: int = opt(500, "write a resume checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = opt(2, "how many recent checkpoints to keep (0 = all)")
    on_nonfinite: str = opt("stop", "stop | skip: what a NaN/inf loss or gradient norm does "
                                    "(stop keeps the last good checkpoint; skip drops that step's update)")
    compile: bool = opt(False, "torch.compile the model")
    cpu: bool = opt(False, "force CPU even when a GPU is present")

    def __post_init__(self) -> None:
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"train.mixed_precision: expected no | bf16 | fp16, got {self.mixed_precision!r}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ConfigError(f"train.lr_schedule: expected cosine | constant, got {self.lr_schedule!r}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ConfigError(f"train.on_nonfinite: expected stop | skip, got {self.on_nonfinite!r}")
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "keep_checkpoints", "sample_every", "num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}: must be >= 0, got {getattr(self, name)}")


def _no_accelerator_device() -> bool:
    """True on a machine without GPUs (or other torch accelerators)."""
    api = getattr(torch, "accelerator", None)
    if api is not None and hasattr(api, "is_available"):
        return not api.is_available()
    return not torch.cuda.is_available()


def make_accelerator(cfg: TrainConfig, run_dir: str | Path) -> Accelerator:
    """An Accelerator for this run; seeds every process with ``seed + rank``.

    Under ``accelerate launch`` on a machine without GPUs the processes join one gloo group on the
    CPU (the launcher resets ACCELERATE_USE_CPU, and accelerate would otherwise run N unrelated
    single processes); a launch whose process count Accelerate does not see is an error.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    # accelerate keeps device and precision in a process-wide singleton that refuses a change:
    # start each run afresh so one Python process can train with different settings (notebooks,
    # tests, `vqgpt demo`). A live process group is kept; one closed by an earlier run's
    # end_training() is opened again.
    group_alive = torch.distributed.is_available() and torch.distributed.is_initialized()
    AcceleratorState._reset_state(reset_partial_state=not group_alive)
    GradientState._reset_state()
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        # Sync exactly every grad_accum micro-batches: the stream is endless, so an epoch end must
        # not force an early optimizer step (accelerate's default) and shift the step boundaries.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.grad_accum, sync_with_dataloader=False),
        project_dir=str(run_dir),
        cpu=cfg.cpu or (launched > 1 and _no_accelerator_device()),
        # The shuffle depends on (seed, epoch) only -- not on the rank-specific torch seed below --
        # so every rank draws the same global order and takes its own disjoint slice of it.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )
    if accelerator.num_processes != launched:
        raise RuntimeError(f"launched as {launched} processes (WORLD_SIZE) but Accelerate runs "
                           f"{accelerator.num_processes} ({accelerator.distributed_type}): the processes would train "
                           f"independently; check the accelerate launch flags and devices")
    set_seed(cfg.seed, device_specific=True)
    if cfg.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        warnings.warn("train.mixed_precision=fp16 needs a GPU; on the CPU accelerate runs in fp32 "
                      "(use bf16 on CPUs with bf16 units)", stacklevel=2)
    if cfg.mixed_precision == "bf16" and accelerator.device.type == "cpu" and not cpu_has_fast_bf16():
        warnings.warn("train.mixed_precision=bf16 on this CPU is slower than fp32 (it has no bf16 matrix units, "
                      "e.g. AMX or AVX512-BF16): set train.mixed_precision=no", stacklevel=2)
    return accelerator


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """True when a bf16 matrix product beats fp32 on this CPU (AMX / AVX512-BF16 units), measured once.

    Without such units PyTorch emulates bf16 matmuls, tens of times slower than fp32, so bf16 autocast
    is a speed-up on some CPUs and a disaster on others; a 20 ms measurement tells which.
    """
    a = torch.randn(256, 256)
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = a.to(dtype)
        x @ x  # warm-up (kernel selection, packing)
        start = time.perf_counter()
        for _ in range(3):
            x @ x
        seconds[dtype] = time.perf_counter() - start
    return seconds[torch.bfloat16] < seconds[torch.float32]


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


def set_grad_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """Switch the model's ``grad_checkpointing`` attribute on; a clear error if it has none."""
    if not enabled:
        return
    if not hasattr(model, "grad_checkpointing"):
        raise ConfigError(f"train.grad_checkpointing: {type(model).__name__} has no gradient checkpointing "
                          f"option (only the prior supports it)")
    model.grad_checkpointing = True


# ----------------------------------------------------------------------------- data


class SeededSamples(Dataset):
    """Wraps a dataset so that item i of epoch e draws its random augmentation from a torch RNG
    seeded with (seed, e, i), leaving the global RNG untouched.

    This makes augmentation independent of when a sample is fetched (accelerate prefetches one
    batch ahead), of the worker and process count, and of a resume: exact resume then only needs
    the model-side RNG states that ``save_state`` stores. Covers datasets that draw from torch's
    RNG (all of vqgpt's); Python's ``random`` and NumPy are not reseeded.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        # An odd-multiplier mix keeps (seed, epoch, index) -> seed collision-free for realistic sizes.
        mixed = (self.seed * 0x9E3779B1 + self.epoch * 0x85EBCA77 + index) & 0x7FFF_FFFF_FFFF_FFFF
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(mixed)
            return self.dataset[index]


def make_dataloader(dataset: Dataset, cfg: TrainConfig) -> DataLoader:
    """Shuffled, drop-last loader of ``cfg.batch_size`` items with seeded per-sample augmentation.

    Its own generator keeps the DataLoader from drawing a worker base seed from the global RNG at
    each epoch (and at a resume), which would shift every later random draw of the model.
    """
    return DataLoader(SeededSamples(dataset, cfg.seed), batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                      num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(cfg.seed),
                      # A file that fails to decode is left out of its batch, never replaced by another.
                      collate_fn=drop_unreadable,
                      # Workers must be re-created each epoch so they see the dataset's new epoch.
                      persistent_workers=False)


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
        if hasattr(dataloader.dataset, "set_epoch"):
            dataloader.dataset.set_epoch(position.epoch)
        loader = accelerator.skip_first_batches(dataloader, position.batch) if position.batch else dataloader
        yielded = False
        for batch in loader:
            yielded = True
            position.batch += 1
            yield batch
        if not yielded and position.batch == 0:
            raise ValueError(f"the data loader yields no batch per process: {len(dataloader.dataset)} items are "
                             f"fewer than train.batch_size x {accelerator.num_processes} processes")
        position.epoch += 1
        position.batch = 0


def stream_state(position: StreamPosition, accelerator: Accelerator, batch_size: int) -> dict[str, int]:
    """The stream position as stored in a checkpoint, with what is needed to map it to another
    process count or batch size on resume."""
    return {"epoch": position.epoch, "batch": position.batch, "processes": accelerator.num_processes,
            "batch_size": batch_size}


def stream_position_from(state: dict[str, Any], accelerator: Accelerator, batch_size: int) -> StreamPosition:
    """The position to resume at: the same samples consumed, even if processes or batch size changed."""
    processes = int(state.get("processes", accelerator.num_processes))
    old_batch_size = int(state.get("batch_size", batch_size))
    samples = int(state["batch"]) * processes * old_batch_size  # consumed in this epoch by all ranks
    per_batch = batch_size * accelerator.num_processes
    if samples % per_batch:
        warnings.warn(f"resuming with {accelerator.num_processes} processes x batch {batch_size} instead of "
                      f"{processes} x {old_batch_size}: the epoch position is rounded down "
                      f"({samples % per_batch} samples are seen again)", stacklevel=2)
    return StreamPosition(int(state["epoch"]), samples // per_batch)


# ----------------------------------------------------------------------------- metrics


class StepMetrics:
    """Sums scalar metrics over one step's micro-batches; ``mean`` averages them over micro-batches
    and processes with a single all-reduce."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, **values: torch.Tensor | float) -> None:
        for key, value in values.items():
            value = torch.as_tensor(value).detach().float().reshape(())
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] = self.counts.get(key, 0) + 1

    def mean(self, accelerator: Accelerator) -> dict[str, float]:
        if not self.sums:
            return {}
        keys = list(self.sums)
        local = torch.stack([self.sums[k].to(accelerator.device) / self.counts[k] for k in keys])
        reduced = accelerator.reduce(local, reduction="mean").tolist()
        return dict(zip(keys, reduced))


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


# ----------------------------------------------------------------------------- faults


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

    def any_process(self, accelerator: Accelerator) -> bool:
        """True when any process was interrupted (one reduction, so all ranks stop at the same step)."""
        flag = torch.tensor([float(self.requested)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def stop_after_interrupt(accelerator: Accelerator, step: int, checkpoint, bar) -> None:
    """Write a checkpoint through ``checkpoint()``, close the run and raise KeyboardInterrupt."""
    checkpoint()
    bar.close()
    accelerator.print(f"interrupted: checkpoint written at step {step}; continue with --resume auto")
    finish_run(accelerator)
    raise KeyboardInterrupt


class NonFiniteLoss(RuntimeError):
    """A NaN or inf loss (or gradient norm) stopped the run."""


def all_finite(accelerator: Accelerator, *values: torch.Tensor) -> bool:
    """True when every value is finite on every process (one reduction, so all ranks agree)."""
    flag = torch.tensor([float(all(torch.isfinite(v.detach()).all() for v in values))], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() == accelerator.num_processes)


def clip_gradients(accelerator: Accelerator, parameters, cfg: TrainConfig) -> bool:
    """Clip the (synchronised) gradient norm to ``cfg.grad_clip``; False when that norm is not finite.

    Under fp16 the loss scaler owns overflow handling (it skips such steps and lowers the scale),
    so a non-finite norm there is not an error.
    """
    if cfg.grad_clip <= 0:
        return True
    norm = accelerator.clip_grad_norm_(parameters, cfg.grad_clip)
    if accelerator.scaler is not None or norm is None:
        return True
    return bool(torch.isfinite(torch.as_tensor(norm)).all())


def nonfinite_message(what: str, step: int, run_dir: str | Path) -> str:
    """The error text of a non-finite loss: names the step, the last good checkpoint and the way out."""
    last = resolve_resume(run_dir, "auto")
    where = f"the last good checkpoint {last} is intact (--resume auto continues from it)" if last else \
        "no checkpoint was written yet"
    return (f"non-finite {what} at step {step}; stopping: {where}. Lower train.lr, raise train.warmup_steps or "
            f"set train.on_nonfinite=skip to drop such steps")


# ----------------------------------------------------------------------------- distributed


def _fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """Three float64 numbers that change when any element of ``tensor`` changes."""
    t = tensor.detach().double().flatten()
    weights = 1.0 + torch.arange(t.numel(), device=t.device, dtype=torch.float64).remainder(13)
    return torch.stack([t.sum(), (t * t).sum(), (t * weights).sum()])


def check_replicas(accelerator: Accelerator, modules: dict[str, torch.nn.Module | None]) -> None:
    """Raise RuntimeError naming the first tensor (parameter or buffer) that differs between processes.

    DDP keeps replicas equal only if every rank applies the same update; anything rank-local that
    writes into the weights (an EMA built before the broadcast, a codebook update that is not
    all-reduced) would make them drift silently. Bitwise equality is expected and checked.
    """
    if accelerator.num_processes == 1 or accelerator.distributed_type == DistributedType.FSDP:
        return  # FSDP ranks hold different shards by design
    names, prints = [], []
    for prefix, module in modules.items():
        if module is None:
            continue
        for name, tensor in list(module.state_dict(keep_vars=False).items()):
            if torch.is_tensor(tensor) and tensor.numel():
                names.append(f"{prefix}.{name}")
                prints.append(_fingerprint(tensor).to(accelerator.device))
    local = torch.stack(prints)                                        # (N, 3)
    everyone = accelerator.gather(local[None]).view(accelerator.num_processes, *local.shape)  # (P, N, 3)
    differs = (everyone != everyone[:1]).flatten(2).any(-1).any(0)    # (N,)
    if bool(differs.any()):
        bad = [names[i] for i in differs.nonzero().flatten().tolist()]
        raise RuntimeError(f"processes hold different weights for {len(bad)} tensors, e.g. {bad[:5]}: "
                           f"a rank-local update is not synchronised")


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU state dict with sharded (FSDP2 DTensor) entries gathered; call it on every process."""
    state = {}
    for key, value in module.state_dict().items():
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        state[key] = value.detach().cpu()
    return state


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def finish_run(accelerator: Accelerator) -> None:
    """End a run: close the trackers, keep the process group for a later run in this process.

    ``accelerator.end_training()`` would also destroy the process group, and a second trainer
    called in the same launched script (tokenizer, then prior) would then find none; it is
    destroyed once at interpreter exit instead.
    """
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.wait_for_everyone()
    if not getattr(finish_run, "_registered", False):
        atexit.register(_destroy_process_group)
        finish_run._registered = True  # type: ignore[attr-defined]


def unwrap(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP / FSDP / torch.compile wrappers (its mixed-precision forward kept)."""
    # keep_fp32_wrapper=False would strip the autocast wrapper off the live model's forward.
    return accelerator.unwrap_model(model, keep_fp32_wrapper=True, keep_torch_compile=False)


def make_ema(accelerator: Accelerator, model: torch.nn.Module, decay: float):
    """EMA of the prepared model's weights (registered for checkpointing), or None when decay is 0.

    Made after ``prepare``: DDP has broadcast rank 0's weights (and buffers such as a codebook) by
    then, so every rank's EMA starts equal even though the init before prepare is rank-local.
    """
    if decay <= 0:
        return None
    ema = ModelEmaV3(unwrap(accelerator, model), decay=decay)
    accelerator.register_for_checkpointing(ema)
    return ema


def load_resume(accelerator: Accelerator, checkpoint: Path | None, batch_size: int) -> tuple[int, StreamPosition]:
    """Restore ``accelerator.load_state`` from ``checkpoint`` (checked by ``open_run_dir``); (step, stream position)."""
    if checkpoint is None:
        return 0, StreamPosition()
    accelerator.load_state(str(checkpoint))
    state = read_trainer_state(checkpoint)
    accelerator.print(f"resumed from {checkpoint} at step {state['step']}")
    return state["step"], stream_position_from(state, accelerator, batch_size)


# ----------------------------------------------------------------------------- the run folder

LOCK_NAME = ".lock"

# Config keys a resume may change: the run's length (the cosine schedule stretches to the new
# train.steps), bookkeeping, and how a step is laid out on the hardware (the stream position is
# mapped to a new batch size or process count). Any other change (architecture, data, losses,
# optimiser, seed) would continue a different run from this one's state. The README lists these.
RESUMABLE_KEYS = (
    "train.steps", "train.log_every", "train.sample_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.on_nonfinite", "train.num_workers", "train.batch_size", "train.grad_accum", "train.grad_checkpointing",
    "train.compile", "train.cpu", "train.mixed_precision", "data.num_workers", "sample_cfg_scale",
    "sample_temperature",
)

# What a run leaves behind before its first checkpoint: `--resume auto` may start such a folder afresh.
_UNSTARTED_RUN = {"config.yaml", "metrics.jsonl", "samples", "checkpoints"}


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (in use, holds another run, later checkpoints)."""


class RunLock:
    """An exclusive OS lock (flock) on RUN/.lock, held for a run's life; the OS drops it if the process dies.

    The file keeps the holder's PID and host so that a second run can say who holds the folder.
    It is never deleted: deleting a lock file lets two processes lock two different files.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): run without the guard rather than not at all
            warnings.warn(f"{self.path}: no file locking on this platform; do not start two runs in one folder",
                          stacklevel=2)
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunFolderError(f"{self.path.parent} is in use by {holder} (it holds {self.path}): wait for that "
                                 f"run to end or stop it, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _listing(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_config_unchanged(config: Any, run_config: Path) -> None:
    """Raise ConfigError listing every key (old -> new) outside RESUMABLE_KEYS where ``config``
    differs from the run's resolved config file ``run_config``."""
    try:
        old = _flat(to_dict(from_dict(type(config), read_yaml(run_config))))
    except ConfigError as exc:
        raise ConfigError(f"{run_config}: cannot compare it with the requested config: {exc}") from None
    new = _flat(to_dict(config))
    changed = [(key, old.get(key, "(absent)"), new.get(key, "(absent)")) for key in sorted(old.keys() | new.keys())
               if key not in RESUMABLE_KEYS and old.get(key) != new.get(key)]
    if changed:
        diff = "; ".join(f"{key}: {a!r} -> {b!r}" for key, a, b in changed)
        raise ConfigError(f"--resume: the requested config changes {diff} (run config {run_config}); a resumed "
                          f"run keeps these: drop the change, or start a new run with --overwrite or another "
                          f"--out (only {', '.join(RESUMABLE_KEYS)} may change on resume)")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines of RUN/metrics.jsonl logged after ``step`` (and a line cut short by a kill), so
    that each step resumed from ``step`` appears once. Rewritten atomically."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or record["step"] <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    if keep != lines:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _claim_run_dir(run_dir: Path, config: Any, resume: str | None, overwrite: bool) -> Path | None:
    """Main process, lock held: check RUN may be used as asked, then write config.yaml; the checkpoint to resume."""
    held = sorted(p.name for p in run_dir.iterdir() if p.name not in (LOCK_NAME, "config.yaml"))
    checkpoint, step = None, 0
    if not resume:
        if held and not overwrite:
            raise RunFolderError(f"{run_dir} already holds a run ({_listing(held)}): pass --resume auto to continue "
                                 f"it, --overwrite to replace it, or choose another --out")
        # Checkpoints first: a crash part-way must not leave old state that --resume auto would pick.
        for name in sorted(held, key=lambda n: n != "checkpoints"):
            _remove(run_dir / name)
    else:
        checkpoint = resolve_resume(run_dir, resume)
        if checkpoint is None:
            foreign = [name for name in held if name not in _UNSTARTED_RUN]
            if foreign:
                raise RunFolderError(f"--resume auto: {run_dir} holds {_listing(foreign)} but no complete checkpoint "
                                     f"to resume from: pass --overwrite to start over, or choose another --out")
        else:
            step = check_checkpoint(checkpoint)
            for reference in (checkpoint.parent.parent / "config.yaml", run_dir / "config.yaml"):
                if reference.is_file():
                    check_config_unchanged(config, reference)
                    break
            later = [path.name for s, path in list_checkpoints(run_dir) if s > step]
            if later:
                raise RunFolderError(f"--resume {checkpoint}: {run_dir / 'checkpoints'} also holds later checkpoints "
                                     f"({_listing(later)}) that the resumed run would mix with its own: remove them, "
                                     f"or resume into another --out")
    save_config(config, run_dir / "config.yaml")
    if resume:
        truncate_metrics(run_dir / "metrics.jsonl", step)
    return checkpoint


@dataclass
class RunFolder:
    """A run folder opened for training: its path and the checkpoint to resume from (None: a fresh start)."""

    path: Path
    checkpoint: Path | None


@contextmanager
def open_run_dir(out: str | Path, config: Any, accelerator: Accelerator, resume: str | None = None,
                 overwrite: bool = False) -> Iterator[RunFolder]:
    """Lock RUN for the run's life and check it may be used as asked before writing anything in it.

    Without ``resume`` RUN must hold no run (``overwrite`` removes what it holds, first); with it the
    checkpoint's files are checked (no code runs) and the requested config is compared with the
    run's; then RUN/config.yaml is written and metrics after the resumed step are dropped. Only the
    main process locks and checks (all processes of one launch share the lock); its verdict is
    broadcast, so every process raises the same error instead of waiting in a collective.
    """
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite exclude each other: --resume continues the run in --out, "
                             "--overwrite replaces it")
    run_dir = Path(out)
    lock = RunLock(run_dir)
    checkpoint, failure = None, None
    if accelerator.is_main_process:
        try:
            if run_dir.exists() and not run_dir.is_dir():
                raise RunFolderError(f"--out {run_dir} is a file, not a run folder")
            run_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            checkpoint = _claim_run_dir(run_dir, config, resume, overwrite)
        except Exception as exc:
            lock.release()
            failure = exc
        except BaseException:  # Ctrl-C: a notebook's process lives on and must not keep the folder
            lock.release()
            raise
    verdict = broadcast_object_list([None if failure is None else (type(failure), str(failure)), checkpoint])
    if failure is not None:
        raise failure
    if verdict[0] is not None:
        kind, message = verdict[0]
        raise (kind if issubclass(kind, ValueError) else RuntimeError)(f"main process: {message}")
    try:
        yield RunFolder(run_dir, verdict[1])
    finally:
        lock.release()
