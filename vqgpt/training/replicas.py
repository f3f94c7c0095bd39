"""Processes and their copies of the model: the replica check, gathering FSDP shards, unwrapping,
the EMA, and ending a run."""

from __future__ import annotations

import atexit

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from timm.utils import ModelEmaV3


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
