"""One optimizer step: the LR schedule, AdamW, the finite check, backward, clipping, and what a
non-finite loss does."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedType

from vqgpt.ground.checkpoint import resolve_resume
from vqgpt.ground.config import ConfigError
from vqgpt.training.config import TrainConfig


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak LR at ``step`` (0 .. steps - 1): linear warmup, then cosine from the peak at
    the first step after warmup down to ``min_lr_ratio`` at the last step."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warn_long_warmup(cfg: TrainConfig) -> None:
    """Warn when ``warmup_steps`` is not below ``steps``: the whole run warms up (the default of 100 with a
    short run), so it never reaches train.lr, and the cosine and min_lr_ratio never apply."""
    if cfg.warmup_steps >= cfg.steps:
        warnings.warn(f"train.warmup_steps={cfg.warmup_steps} is not below train.steps={cfg.steps}: the whole run "
                      f"warms up, its last step at {lr_factor(cfg.steps - 1, cfg):.0%} of train.lr; set "
                      "train.warmup_steps below train.steps for the schedule to reach it", stacklevel=3)


def make_optimizer(params, cfg: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay on tensors of 2 or more dimensions: matrices, convolutions, and the
    embeddings and codebook too (as nanoGPT and LlamaGen decay them); norms and biases (1-d) are exempt."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr if lr is not None else cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             **adamw_kernel(params, cfg.optimizer_impl))


def adamw_kernel(params: list[torch.Tensor], impl: str) -> dict[str, bool]:
    """AdamW's ``fused`` / ``foreach`` keywords for ``train.optimizer_impl`` (auto: fused where torch
    supports every parameter's device and dtype, else foreach).

    torch itself picks the per-parameter loop for CPU tensors; the fused kernel does the whole update
    in one pass per tensor list and is the fastest measured (benchmarks/train_speed.py).
    """
    if impl == "auto":
        impl = "fused" if params and _fused_supported(params) else "foreach"
    if impl == "fused":
        return {"fused": True}
    return {"foreach": impl == "foreach"}


def _fused_supported(params: list[torch.Tensor]) -> bool:
    """True when torch's fused AdamW takes every parameter (floating point, on a supported device)."""
    try:  # a private helper; torch < 2.4 has no fused CPU kernel and may lack it: fall back to foreach
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
        devices = _get_fused_kernels_supported_devices()
    except ImportError:
        return False
    return all(p.is_floating_point() and p.device.type in devices for p in params)


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


def optimizer_step(accelerator: Accelerator, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                   model: torch.nn.Module, cfg: TrainConfig) -> bool:
    """Backward, clip and step one optimizer when ``loss`` is finite on every process, then zero its
    gradients; False when the update was dropped (a non-finite loss or gradient norm).

    Every rank takes the same decision, so DDP's collectives stay matched. Under gradient
    accumulation the prepared optimizer steps, and the norm is clipped, on the syncing micro-batch only.
    """
    finite = all_finite(accelerator, loss)
    if finite:
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            finite = clip_gradients(accelerator, model.parameters(), cfg, optimizer)
        if finite:
            optimizer.step()
    elif accelerator.sync_gradients:
        step_with_earlier_micro_batches(accelerator, optimizer, model, cfg)
    optimizer.zero_grad(set_to_none=True)
    return finite


def step_with_earlier_micro_batches(accelerator: Accelerator, optimizer: torch.optim.Optimizer,
                                    model: torch.nn.Module, cfg: TrainConfig) -> bool:
    """The step's last micro-batch (the syncing one) was dropped: step with the gradients its earlier
    micro-batches accumulated, if any, as a dropped earlier micro-batch leaves the step to the others; the
    caller then zeroes them. Their gradients were never synchronised (DDP syncs in the last backward, which
    did not run): averaged over the processes here. Under FSDP (sharded gradients) the step is dropped.
    Whether it stepped; every process decides alike (the same micro-batches were dropped on all)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params or accelerator.distributed_type == DistributedType.FSDP:
        return False
    if accelerator.num_processes > 1:
        for p in params:
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(accelerator.num_processes)
    if not clip_gradients(accelerator, params, cfg, optimizer):
        return False
    optimizer.step()
    return True


def dropped_update(accelerator: Accelerator, cfg: TrainConfig, what: str, step: int, run_dir: str | Path) -> int:
    """What a dropped update of step ``step`` does: raise NonFiniteLoss (``on_nonfinite: stop``) or say
    so and return 1 for the run's count of skipped updates (``skip``)."""
    if cfg.on_nonfinite == "stop":
        raise NonFiniteLoss(nonfinite_message(what, step, run_dir))
    accelerator.print(f"warning: non-finite loss or gradient norm in step {step}; update skipped")
    return 1


class NonFiniteLoss(RuntimeError):
    """A NaN or inf loss (or gradient norm) stopped the run."""


def all_finite(accelerator: Accelerator, *values: torch.Tensor) -> bool:
    """True when every value is finite on every process (one reduction, so all ranks agree)."""
    flag = torch.tensor([float(all(torch.isfinite(v.detach()).all() for v in values))], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() == accelerator.num_processes)


def clip_gradients(accelerator: Accelerator, parameters, cfg: TrainConfig, optimizer: Any = None) -> bool:
    """Clip the (synchronised) gradient norm to ``cfg.grad_clip``; False when that norm is not finite.

    ``grad_clip`` 0 clips nothing, yet the norm is still computed (clipped to inf: the gradients are
    multiplied by 1), the same way, so that a NaN or inf gradient drops the update there too.
    Under fp16 the loss scaler owns overflow handling (it skips such steps and lowers the scale),
    so a non-finite norm there is not an error. ``optimizer``: the one that steps ``parameters``. Only
    its gradients are unscaled: accelerate's clip unscales every prepared optimizer's, and a second
    optimizer (the discriminator's) holding gradients of earlier micro-batches had them unscaled now
    and again at its own clip (divided by the loss scale twice: lost).
    """
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    if accelerator.scaler is not None and cfg.grad_clip <= 0:
        return True  # nothing to clip, and the scaler's step skips a non-finite update itself
    prepared = getattr(accelerator, "_optimizers", None)
    if accelerator.scaler is not None and isinstance(prepared, list) and any(opt is optimizer for opt in prepared):
        accelerator._optimizers = [optimizer]
        try:
            norm = accelerator.clip_grad_norm_(parameters, max_norm)
        finally:
            accelerator._optimizers = prepared
        return True
    norm = accelerator.clip_grad_norm_(parameters, max_norm)
    if accelerator.scaler is not None or norm is None:
        return True
    return bool(torch.isfinite(torch.as_tensor(norm)).all())


def nonfinite_message(what: str, step: int, run_dir: str | Path) -> str:
    """The error text of a non-finite loss: names the step, the last good checkpoint and the ways out."""
    last = resolve_resume(run_dir, "auto")
    if last is None:  # nothing to resume: the same command may run again with any settings
        return (f"non-finite {what} at step {step}; stopping: no checkpoint was written yet. Ways out: run again "
                f"(--resume auto or --overwrite starts this folder afresh) with a lower train.lr, a higher "
                f"train.warmup_steps, or train.on_nonfinite=skip to drop such steps")
    # A resume refuses a changed train.lr or train.warmup_steps (RESUMABLE_KEYS): only on_nonfinite may change.
    return (f"non-finite {what} at step {step}; stopping: the last good checkpoint {last} is intact (--resume auto "
            f"continues from it with this run's settings, and may meet the same step again). Ways out: resume "
            f"with --set train.on_nonfinite=skip to drop such steps, or start a new run (another --out, or "
            f"--overwrite) with a lower train.lr or a higher train.warmup_steps: a resume keeps those")
