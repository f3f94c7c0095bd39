"""Splitting batches of work over the processes of an ``accelerate launch``, with the results of one process.

Evaluation commands (``vqgpt eval-prior``, ``eval-bpd``, ``eval-tokenizer``, ``reconstruct``, ``fid-stats``)
hand batch r * N + p to process p, gather each round's per-item rows in item order, and add them up
batch by batch as one process would: the figures do not depend on the process count, bit for bit.
``state`` is what ``vqgpt.training.config.launched_process_state`` returns (or ``ONE_PROCESS``).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any, Callable, Iterator, NamedTuple

import torch

from vqgpt.ground.data import collate_images, readable_batches, warn_left_out
from vqgpt.training.run_folder import share_main_failure


def gather_in_order(state: Any, indices: torch.Tensor, rows: dict[str, torch.Tensor],
                     start: int = 0) -> dict[str, torch.Tensor]:
    """Rows (n_r, ...) of sample ``indices`` (n_r,) on every process -> all rows in index order, on every process.

    The gathered indices must be ``start``, start + 1, ... once each. The shares differ in size by up
    to a batch: each is padded to the longest for the gather (index -1 marks the padding) and trimmed
    after it. The rows come back on the CPU for any process count, so that sums of them agree bit for bit.
    """
    rows = {key: t.cpu() for key, t in rows.items()}
    if state.num_processes > 1:
        from accelerate.utils import gather, pad_across_processes

        def everyone(t: torch.Tensor, pad: int = 0) -> torch.Tensor:
            return gather(pad_across_processes(t.contiguous().to(state.device), pad_index=pad)).cpu()

        indices = everyone(indices, pad=-1)
        keep = indices >= 0
        indices = indices[keep]
        rows = {key: everyone(t)[keep] for key, t in rows.items()}
    order = indices.argsort()
    if not torch.equal(indices[order], torch.arange(start, start + len(indices))):
        raise RuntimeError(f"gathered sample indices are not {start}..{start + len(indices) - 1} once each")
    return {key: t[order] for key, t in rows.items()}


class Round(NamedTuple):
    """One round of ``readable_rounds``: the batches of up to N loader batches, one per process."""

    batches: list[range]          # its batches that hold images, in order: the numbers (0, 1, ...) of their images
    first: int                    # number of batches[0] among all the batches that hold images
    mine: int | None              # which of ``batches`` this process read; None when it read none with images
    images: torch.Tensor | None   # that batch's images (B, 3, R, R) and labels (B,); None with ``mine``
    labels: torch.Tensor | None

    def image_index(self) -> torch.Tensor:
        """Numbers of this process's images (B,), for ``gather_in_order``; empty when it has none."""
        return torch.tensor(list(self.batches[self.mine]) if self.mine is not None else [], dtype=torch.long)

    def batch_index(self) -> torch.Tensor:
        """Number of this process's batch (1,), for ``gather_in_order`` of one row per batch; empty when none."""
        return torch.tensor([self.first + self.mine] if self.mine is not None else [], dtype=torch.long)


# the state of a single process that is not under accelerate launch (Python API callers that give none)
ONE_PROCESS = SimpleNamespace(num_processes=1, process_index=0, is_main_process=True)


def readable_rounds(state: Any, dataset: Any, batch_size: int, limit: int | None = None,
                     indices: list[int] | None = None,
                     unreadable_indices: list[int] | None = None) -> Iterator[Round]:
    """The batches ``readable_batches`` gives (same images, same batches, cut at ``limit`` alike, the same
    ``indices``, ``unreadable_indices`` and warning), split over the processes of ``state``.

    One process: ``readable_batches`` itself, a round per batch. N processes: round r holds loader batches
    r * N .. r * N + N - 1 and process p decodes batch r * N + p alone; which items each found readable is
    shared (a small object gather), so that every process cuts the round at ``limit`` as one process would
    and knows the number of every image; the first process warns about the files left out. Rounds whose
    batches are all unreadable are skipped (readable_batches yields no empty batch).
    """
    if state.num_processes == 1:
        taken = 0
        batches = readable_batches(dataset, batch_size, limit=limit, indices=indices,
                                   unreadable_indices=unreadable_indices)
        for number, (images, labels) in enumerate(batches):
            yield Round([range(taken, taken + len(labels))], number, 0, images, labels)
            taken += len(labels)
        return
    from accelerate.utils import gather_object
    from torch.utils.data import DataLoader

    size = batch_size if limit is None else min(batch_size, limit)  # the loader batches readable_batches reads
    if size < 1:
        raise ValueError(f"batch_size and the image limit must be >= 1, got {batch_size} and {limit}")
    processes, rank = state.num_processes, state.process_index
    loader_batches = -(-len(dataset) // size)
    own = [list(range(k * size, min(k * size + size, len(dataset)))) for k in range(rank, loader_batches, processes)]
    # read lazily, one batch a round (num_workers=0): the loop below stops at the limit
    reads = iter(DataLoader(dataset, batch_sampler=own, num_workers=0, collate_fn=collate_images))
    dropped: list[str] = []
    taken = number = 0
    for first in range(0, loader_batches, processes):
        # a file's warning is held until the batch proves to be one that one process would have read too (a batch
        # past the --num cut is read here, as every process reads before the round's counts are known)
        with warnings.catch_warnings(record=True) as held:
            warnings.simplefilter("always")
            read = next(reads) if first + rank < loader_batches else None
        found = None if read is None else (own[first // processes][0], read.kept.tolist(), read.size, read.unreadable)
        batches, mine, images, labels = [], None, None, None
        for p, seen in enumerate(gather_object([found])):  # every process's find, in loader order
            if seen is None or (limit is not None and taken >= limit):
                break  # past the dataset's end, or past the batch that reached the limit: one process stops there
            if p == rank:
                for caught in held:
                    warnings.warn_explicit(caught.message, caught.category, caught.filename, caught.lineno)
            start, kept, items, unreadable = seen
            dropped += unreadable
            if unreadable_indices is not None:
                readable = set(kept)
                unreadable_indices.extend(start + k for k in range(items) if k not in readable)
            if limit is not None:
                kept = kept[:limit - taken]
            if indices is not None:
                indices.extend(start + k for k in kept)
            if kept:
                if p == rank:
                    mine, images, labels = len(batches), read.images[:len(kept)], read.labels[:len(kept)]
                batches.append(range(taken, taken + len(kept)))
                taken += len(kept)
        if batches:
            yield Round(batches, number, mine, images, labels)
        number += len(batches)
        if limit is not None and taken >= limit:
            break
    if dropped and state.is_main_process:  # readable_batches' warning, once
        warn_left_out(dropped)


@contextmanager
def said_once(state: Any) -> Iterator[None]:
    """Warnings inside are shown by the first process only: what every process computes alike (a network that
    could not be loaded, a figure from too few images) is said once, not once per process."""
    with warnings.catch_warnings():
        if not state.is_main_process:
            warnings.simplefilter("ignore")
        yield


def rounds_total(wanted: int, batch_size: int, state: Any) -> int:
    """Rounds of ``readable_rounds`` when no file is unreadable: the progress bar's length."""
    return -(-(-(-wanted // batch_size)) // state.num_processes)


def on_main_process(state: Any, work: Callable[[], Any]) -> Any:
    """``work()`` done by the first process alone; its result on every process, or its error raised on every
    process (``share_main_failure``): the others neither wait forever for a process that failed nor go on as if
    it had not."""
    failure, result = None, None
    if state.is_main_process:
        try:
            result = work()
        except Exception as exc:  # shared with the other processes, then raised here
            failure = exc
    return share_main_failure(failure, state.num_processes, result)


def process_device(device: torch.device, state: Any) -> torch.device:
    """``device``, or this process's own device of that kind under a launch: "--device cuda" on 8 processes puts
    each on its own GPU, not all on cuda:0."""
    return state.device if state.num_processes > 1 and device.type == state.device.type else device
