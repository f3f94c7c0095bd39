"""The optimisation config both stages share, and the Accelerator it sets up (devices, precision, seeds)."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, ParamSpec, TypeVar

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import (DataLoaderConfiguration, GradientAccumulationPlugin, ProjectConfiguration,
                               parse_flag_from_env, set_seed)

from vqgpt.ground.config import ConfigError, check_number, opt

P = ParamSpec("P")
R = TypeVar("R")

# Tracker files (tensorboard event files, wandb's offline run) live in this sub-folder of the run folder.
TRACKING_DIR = "tracking"
# What the trackers keep beside the TensorBoard folder RUN/tracking/<project_name>/: wandb's run id and
# (without $WANDB_DIR) wandb's own folder. A project of either name would write into them.
WANDB_ID_FILE = "wandb-run-id"
TRACKER_FILES = (WANDB_ID_FILE, "wandb")
# What each train.log_with value starts; every tracker's Python package has the tracker's name.
_LOG_WITH = {"none": (), "tensorboard": ("tensorboard",), "wandb": ("wandb",), "all": ("tensorboard", "wandb")}


MATMUL_PRECISIONS = ("highest", "high", "medium")  # train.matmul_precision (torch.set_float32_matmul_precision's names)


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
    weight_decay: float = opt(0.0, "AdamW (decoupled) weight decay, on weights of 2+ dimensions (embeddings and the "
                                   "codebook too); norms and biases never decay")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off; a NaN/inf norm is still caught)")
    mixed_precision: str = opt("no", "no | bf16 | fp16 (fp16 uses loss scaling and needs a GPU; "
                                     "bf16 is ~4x faster on AMX CPUs)")
    matmul_precision: str = opt("highest", "highest | high | medium: how float32 matrix products run (mixed_precision "
                                           "no, and the fp32 parts under it), as torch.set_float32_matmul_precision "
                                           "names it. highest: float32; high: TF32 on NVIDIA GPUs (Ampere and "
                                           "later), float32 on a CPU; medium: also, on a CPU, oneDNN's products and "
                                           "convolutions in bf16 with fp32 sums (AMX CPUs: 1.3-1.8x faster fp32 "
                                           "steps), TF32 on a GPU. Weights, activations and optimizer stay float32")
    grad_checkpointing: bool = opt(False, "recompute activations in the backward pass (less memory, "
                                          "~30% more compute; priors only)")
    ema_decay: float = opt(0.0, "EMA of the weights, exported instead of the raw weights (0 = off)")
    seed: int = opt(0, "random seed: sample order and augmentation use it as is, model-side randomness "
                       "(dropout, ...) uses seed + process rank")
    num_workers: int = opt(0, "DataLoader worker processes")
    log_every: int = opt(10, "write a metrics line every N steps")
    sample_every: int = opt(0, "write an image grid every N steps (0 = only at the end); a prior's grids need "
                               "a tokenizer to decode them (train-prior --tokenizer), else none are written")
    checkpoint_every: int = opt(500, "write a resume checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = opt(2, "how many recent checkpoints to keep (0 = all)")
    on_nonfinite: str = opt("stop", "stop | skip: what a NaN/inf loss or gradient norm does "
                                    "(stop keeps the last good checkpoint; skip drops that step's update; "
                                    "under grad_accum, that micro-batch's, and the step goes on with the others; "
                                    "under FSDP a dropped last micro-batch drops the step)")
    compile: bool = opt(False, "torch.compile the model")
    optimizer_impl: str = opt("auto", "AdamW kernel: auto (fused where torch has it for the device, else foreach) | "
                                      "fused | foreach | for-loop (torch's per-parameter loop)")
    cpu: bool = opt(False, "force CPU even when a GPU is present")
    log_with: str = opt("none", "experiment trackers fed through Accelerate: none | tensorboard | wandb | all (both); "
                                "they get every metrics.jsonl line and the sample grids. TensorBoard event files go "
                                "to RUN/tracking/<project_name>/, wandb's files to RUN/tracking/wandb/ (or $WANDB_DIR); "
                                "needs pip install \"vqgpt[tracking]\"")
    project_name: str = opt("vqgpt", "tracker project: the wandb project, and the TensorBoard folder "
                                     "RUN/tracking/<project_name>/")

    def __post_init__(self) -> None:
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"train.mixed_precision: expected no | bf16 | fp16, got {self.mixed_precision!r}")
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise ConfigError(f"train.matmul_precision: expected {' | '.join(MATMUL_PRECISIONS)}, "
                              f"got {self.matmul_precision!r}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ConfigError(f"train.lr_schedule: expected cosine | constant, got {self.lr_schedule!r}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ConfigError(f"train.on_nonfinite: expected stop | skip, got {self.on_nonfinite!r}")
        if self.optimizer_impl not in ("auto", "fused", "foreach", "for-loop"):
            raise ConfigError(f"train.optimizer_impl: expected auto | fused | foreach | for-loop, "
                              f"got {self.optimizer_impl!r}")
        if self.log_with not in _LOG_WITH:
            raise ConfigError(f"train.log_with: expected {' | '.join(_LOG_WITH)}, got {self.log_with!r}")
        if not self.project_name or any(c in self.project_name for c in "/\\") or self.project_name in (".", ".."):
            raise ConfigError(f"train.project_name: expected a plain name (it names a folder), got {self.project_name!r}")
        if self.project_name in TRACKER_FILES:
            raise ConfigError(f"train.project_name: {self.project_name!r} is reserved (RUN/{TRACKING_DIR}/"
                              f"{self.project_name} holds the trackers' own files): choose another name")
        if not 0 <= self.seed <= 2**32 - 1:  # else accelerate's set_seed refused it without naming the key
            raise ConfigError(f"train.seed: must be in [0, 2**32 - 1] (the seeds numpy takes), got {self.seed}")
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "keep_checkpoints", "sample_every", "num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}: must be >= 0, got {getattr(self, name)}")
        # finite as well as in range: NaN passes `x < 0` and inf `x >= 0` (an inf lr or weight decay is a NaN step)
        check_number("train.lr", self.lr, 0, low_open=True)
        check_number("train.min_lr_ratio", self.min_lr_ratio, 0, 1)
        for name in ("beta1", "beta2", "ema_decay"):  # ema_decay 0 = off
            check_number(f"train.{name}", getattr(self, name), 0, 1, high_open=True)
        for name in ("weight_decay", "grad_clip"):  # grad_clip 0 = off
            check_number(f"train.{name}", getattr(self, name), 0)
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps: must be >= 0, got {self.warmup_steps}")


def _no_accelerator_device() -> bool:
    """True on a machine without GPUs (or other torch accelerators)."""
    api = getattr(torch, "accelerator", None)
    if api is not None and hasattr(api, "is_available"):
        return not api.is_available()
    return not torch.cuda.is_available()


def launch_command(processes: int) -> str:
    """The command that starts ``processes`` processes of a vqgpt command on this machine: on one without
    GPUs ``accelerate launch --num_processes N`` alone starts a single process; --multi_gpu with
    ACCELERATE_USE_CPU=1 starts N of them on the CPU (gloo)."""
    if _no_accelerator_device():
        return f"ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {processes} -m vqgpt"
    return f"accelerate launch --num_processes {processes} -m vqgpt"


def tracker_names(cfg: TrainConfig) -> list[str]:
    """The trackers ``train.log_with`` starts; ConfigError when one's package is not installed."""
    names = list(_LOG_WITH[cfg.log_with])
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        # Accelerate would silently drop a tracker whose package is missing: say so before training.
        raise ConfigError(f"train.log_with={cfg.log_with}: the {' and '.join(missing)} "
                          f"{'package is' if len(missing) == 1 else 'packages are'} not installed: "
                          f"pip install \"vqgpt[tracking]\" (or set train.log_with=none)")
    return names


def launched_process_state(consequence: str) -> PartialState:
    """This process's rank among those ``accelerate launch`` started (one when run plainly), for work
    that needs ranks and barriers but no Accelerator (encoding, sampling).

    As in training, on a machine without GPUs the launched processes join one gloo group on the CPU;
    a launch whose process count accelerate does not see is an error ending with ``consequence``.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or (launched > 1 and _no_accelerator_device())
    state = PartialState(cpu=cpu)
    if state.num_processes != launched:
        raise RuntimeError(f"launched as {launched} processes (WORLD_SIZE) but Accelerate runs {state.num_processes}: "
                           f"{consequence}; check the accelerate launch flags")
    return state


def keeps_caller_rng(train: Callable[P, R]) -> Callable[P, R]:
    """Decorate a training entry point so that the caller's global RNGs (Python's, NumPy's, torch's CPU
    and initialised CUDA generators) are as they were when it returns or raises: the run seeds them
    itself (``make_accelerator``), and a notebook that seeded, trained and then drew numbers got the
    run's seed 0 draws whatever seed it chose. The run's results do not depend on the caller's state.

    Accelerate's process-wide settings (AcceleratorState, GradientState: mixed precision, gradient
    accumulation) and torch's float32 product precision (``train.matmul_precision``), which the run replaces
    with its own, are put back too: an Accelerator the caller
    made before went on with the run's settings (its autocast and accumulation silently off), and
    one made after with other settings was refused."""
    @functools.wraps(train)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        saved = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
                 torch.cuda.get_rng_state_all() if cuda else None)
        shared = [(state._shared_state, dict(state._shared_state)) for state in (AcceleratorState, GradientState)]
        precision = float32_precision()
        try:
            return train(*args, **kwargs)
        finally:
            set_float32_precision(*precision)
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])
            if saved[3] is not None:
                torch.cuda.set_rng_state_all(saved[3])
            for state, before in shared:  # in place: the caller's objects share these very dicts
                state.clear()
                state.update(before)
    return run


def make_accelerator(cfg: TrainConfig, run_dir: str | Path) -> Accelerator:
    """An Accelerator for this run; seeds every process with ``seed + rank``.

    The trackers of ``train.log_with`` are set up (their files under RUN/tracking/) but not started:
    ``start_trackers`` does that once the run folder is claimed.

    Under ``accelerate launch`` on a machine without GPUs the processes join one gloo group on the
    CPU (the launcher resets ACCELERATE_USE_CPU, and accelerate would otherwise run N unrelated
    single processes); a launch whose process count Accelerate does not see is an error.
    """
    trackers = tracker_names(cfg)
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
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(Path(run_dir) / TRACKING_DIR)),
        log_with=trackers or None,
        cpu=cfg.cpu or (launched > 1 and _no_accelerator_device()),
        # The shuffle depends on (seed, epoch) only -- not on the rank-specific torch seed below --
        # so every rank draws the same global order and takes its own disjoint slice of it.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )
    if accelerator.num_processes != launched:
        raise RuntimeError(f"launched as {launched} processes (WORLD_SIZE) but Accelerate runs "
                           f"{accelerator.num_processes} ({accelerator.distributed_type}): the processes would train "
                           f"independently; check the accelerate launch flags and devices")
    if cfg.seed + accelerator.num_processes - 1 > 2**32 - 1:  # each process seeds with seed + its rank
        raise ConfigError(f"train.seed: {cfg.seed} + the rank of each of {accelerator.num_processes} processes must "
                          f"stay within 2**32 - 1: choose a seed of at most {2**32 - accelerator.num_processes}")
    set_seed(cfg.seed, device_specific=True)
    apply_matmul_precision(cfg.matmul_precision, accelerator.device)
    if cfg.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        warnings.warn("train.mixed_precision=fp16 needs a GPU; on the CPU accelerate runs in fp32 "
                      "(use bf16 on CPUs with bf16 units)", stacklevel=2)
    if cfg.mixed_precision == "bf16" and accelerator.device.type == "cpu" and not cpu_has_fast_bf16():
        warnings.warn("train.mixed_precision=bf16 on this CPU is slower than fp32 (it has no bf16 matrix units, "
                      "e.g. AMX or AVX512-BF16): set train.mixed_precision=no", stacklevel=2)
    return accelerator


def float32_precision() -> tuple[str, str]:
    """torch's process-wide float32 product settings, for ``set_float32_precision``: the matmul precision and
    oneDNN's convolution precision."""
    return torch.get_float32_matmul_precision(), torch.backends.mkldnn.conv.fp32_precision


def set_float32_precision(matmul: str, conv: str) -> None:
    torch.set_float32_matmul_precision(matmul)
    torch.backends.mkldnn.conv.fp32_precision = conv


def apply_matmul_precision(precision: str, device: torch.device) -> None:
    """``train.matmul_precision`` for this process: torch.set_float32_matmul_precision (from 'high' CUDA's float32
    matmuls in TF32, cuDNN's convolutions being TF32 already by torch's default; at 'medium' oneDNN's CPU matmuls
    in bf16), and at 'medium' oneDNN's float32 convolutions in bf16 too ('none', torch's default, otherwise).
    On a CPU without bf16 units 'medium' gains nothing: a warning says so."""
    set_float32_precision(precision, "bf16" if precision == "medium" else "none")
    if precision == "medium" and device.type == "cpu" and not cpu_has_fast_bf16():
        warnings.warn("train.matmul_precision=medium runs float32 products in bf16 on CPUs with bf16 units (AMX, "
                      "AVX512-BF16); this one has none, so it gains nothing here: set train.matmul_precision=highest",
                      stacklevel=3)


@contextlib.contextmanager
def matmul_precision_applied(precision: str, device: torch.device) -> Iterator[None]:
    """``apply_matmul_precision`` for the duration of the block, torch's settings as they were after it (a step
    timed or checked under the setting, outside a run)."""
    before = float32_precision()
    apply_matmul_precision(precision, device)
    try:
        yield
    finally:
        set_float32_precision(*before)


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """True when a bf16 matrix product beats fp32 on this CPU (AMX / AVX512-BF16 units), measured once.

    Without such units PyTorch emulates bf16 matmuls, tens of times slower than fp32, so bf16 autocast
    is a speed-up on some CPUs and a disaster on others; a few ms of measurement tell which. The two
    dtypes are timed in turns, best of three: one timing each once answered False on a CPU where bf16
    runs twice as fast (a shared host; its first bf16 call also builds oneDNN's kernel).
    """
    a = torch.randn(256, 256)
    operands = {dtype: a.to(dtype) for dtype in (torch.float32, torch.bfloat16)}
    seconds = {dtype: float("inf") for dtype in operands}
    for x in operands.values():  # warm-up (kernel selection, packing)
        x @ x
        x @ x
    for _ in range(3):
        for dtype, x in operands.items():
            start = time.perf_counter()
            for _ in range(3):
                x @ x
            seconds[dtype] = min(seconds[dtype], time.perf_counter() - start)
    return seconds[torch.bfloat16] < seconds[torch.float32]
