"""The endless, resumable batch stream: seeded per-sample augmentation, the stream position and
how it maps onto another process count or batch size on resume."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from vqgpt.ground.checkpoint import read_trainer_state
from vqgpt.ground.data import drop_unreadable, freeze_before_workers
from vqgpt.training.config import TrainConfig


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
        freeze_before_workers(dataloader.num_workers)  # this epoch's workers are forked below
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


def _compile_prefix_as_here(model: torch.nn.Module) -> Any:
    """A load_state_dict pre-hook for ``model``: the keys of a checkpoint written with ``train.compile`` on
    carry torch.compile's '_orig_mod.' and those of one written with it off do not; each is renamed to the
    key this model has, so that train.compile may change on resume (it failed on the key names)."""
    def plain(key: str) -> str:
        return key.replace("_orig_mod.", "")

    def hook(state_dict: dict, prefix: str, *args: Any) -> None:
        if prefix:  # the whole model's keys are seen once, at the top
            return
        wanted = {plain(key): key for key in model.state_dict()}
        for key in list(state_dict):
            here = wanted.get(plain(key))
            if here is not None and here != key:
                state_dict[here] = state_dict.pop(key)
    return hook


def load_resume(accelerator: Accelerator, checkpoint: Path | None, batch_size: int) -> tuple[int, StreamPosition]:
    """Restore ``accelerator.load_state`` from ``checkpoint`` (checked by ``open_run_dir``); (step, stream position)."""
    if checkpoint is None:
        return 0, StreamPosition()
    hooks = [model._register_load_state_dict_pre_hook(_compile_prefix_as_here(model))
             for model in getattr(accelerator, "_models", [])]
    try:
        accelerator.load_state(str(checkpoint))
    finally:
        for hook in hooks:
            hook.remove()
    state = read_trainer_state(checkpoint)
    # load_state restores accelerate's micro-batch counter, which says where accumulation syncs: under
    # another train.grad_accum it synced mid-step (updates of two steps' micro-batches). Each step is
    # grad_accum micro-batches, so the count at a step's start is step * grad_accum.
    accelerator.step = state["step"] * accelerator.gradient_accumulation_steps
    accelerator.print(f"resumed from {checkpoint} at step {state['step']}")
    return state["step"], stream_position_from(state, accelerator, batch_size)
