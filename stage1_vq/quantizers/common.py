"""What the quantizers share: the output type, the DDP helpers, the lookup and the usage statistics."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

class QuantizerOutput(NamedTuple):
    """z_q (B, D, h, w) quantized latents carrying encoder gradients; indices (B, h, w) int64;
    loss: scalar quantizer loss (0 for FSQ); stats: detached scalars incl. 'usage' and 'perplexity'."""

    z_q: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    stats: dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- distributed helpers


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over all ranks (no-op in a single process)."""
    if _world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank ``src``'s copy (no-op in a single process)."""
    if _world_size() > 1:
        dist.broadcast(tensor, src=src)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors of all ranks along dim 0, in rank order."""
    world = _world_size()
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def mean_over_ranks(local_sum: torch.Tensor, local_count: int) -> torch.Tensor:
    """Mean over every rank's samples, from this rank's sum of ``local_count`` of them (any shape).

    The value is the all-reduced sum over the all-reduced count. Only this rank's part carries a
    gradient, scaled by the world size: DDP averages gradients over ranks, and the average of the
    ranks' parts is then exactly the gradient of the global mean (as with one process).
    """
    world = _world_size()
    if world == 1:
        return local_sum / max(local_count, 1)
    total = all_reduce_sum_(local_sum.detach().clone())
    count = all_reduce_sum_(torch.tensor(float(local_count), device=local_sum.device))
    return (total + world * (local_sum - local_sum.detach())) / count.clamp_min(1.0)


def entropy(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats of distributions along ``dim`` (zero-probability entries add 0)."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim)


# ----------------------------------------------------------------------------- shared pieces


def rotation_trick(z: torch.Tensor, q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Rotation-trick estimator (Fifty et al. 2024): forward value ``q``, gradient into ``z`` (N, D).

    ``z`` is rotated onto ``q``'s direction and rescaled, with the rotation and scale treated as
    constants, so the gradient reaching ``z`` is the output gradient rotated back (not copied, as
    in the straight-through estimator).
    """
    z_norm = z.norm(dim=-1, keepdim=True).clamp_min(eps)
    q_norm = q.norm(dim=-1, keepdim=True).clamp_min(eps)
    u = (z / z_norm).detach()
    q_hat = (q / q_norm).detach()
    w = F.normalize(u + q_hat, dim=-1).detach()
    # Householder-style rotation R = I - 2 w w^T + 2 q_hat u^T applied to z without forming R.
    rotated = z - 2 * (z * w).sum(-1, keepdim=True) * w + 2 * (z * u).sum(-1, keepdim=True) * q_hat
    return rotated * (q_norm / z_norm).detach()


def nearest_code(x: torch.Tensor, codebook: torch.Tensor, max_elements: int = 1 << 26) -> torch.Tensor:
    """Index of the nearest codebook row (squared L2) for each row of x (N, D) -> (N,) int64."""
    code_sq = codebook.pow(2).sum(-1)  # ||x||^2 is constant per row and does not change the argmin
    rows = max(1, max_elements // codebook.shape[0])  # bound the (rows, K) distance matrix
    out = [(code_sq - 2 * chunk @ codebook.t()).argmin(-1) for chunk in x.split(rows)]
    return torch.cat(out) if out else x.new_zeros(0, dtype=torch.long)


def code_counts(indices: torch.Tensor, size: int) -> torch.Tensor:
    """Histogram (size,) float of integer ``indices`` in [0, size).

    A scatter-add into a fixed-size tensor rather than ``torch.bincount``: bincount's output shape
    depends on the data, which breaks a ``torch.compile`` graph in every training step."""
    flat = indices.reshape(-1)
    return torch.zeros(size, device=flat.device).index_add_(0, flat, torch.ones(flat.shape, device=flat.device))


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code histogram ``counts`` (K,): the number of equally used codes it equals."""
    probs = counts / counts.sum().clamp_min(1.0)
    return torch.exp(-(probs * probs.clamp_min(1e-12).log()).sum())


STEP_UPDATES = ("every_forward", "defer", "finish")


class BaseQuantizer(nn.Module):
    """Input checks, usage statistics and the once-per-step training bookkeeping shared by the quantizers.

    Training bookkeeping (the EMA codebook sums and counts, dead-code restarts, the usage window, the
    step's code histogram for 'perplexity') runs once per optimizer step. By default every training
    forward is one step. A loop that accumulates gradients over micro-batches sets
    ``set_step_updates('defer')`` for all but the last micro-batch of a step and ``'finish'`` for the
    last: the deferred forwards only add their (all-reduced) counts and EMA sums to the step's
    pending ones, and the finishing forward adds its own and then applies the whole step's update at
    the point where an undeferred forward applies its own, so a step of micro-batches updates the
    quantizer exactly as one forward of their concatenation would (restart candidates excepted: they
    come from the last micro-batch, as under several processes they come from rank 0's share; k-means
    init runs on the first micro-batch). ``finish_step()`` then returns the step's statistics
    ('usage', 'perplexity', 'restarted', rvq's per-depth ones), which deferred forwards leave out of
    their own stats; it also applies a step whose finishing forward did not run (an empty last
    micro-batch). Pending state lives in plain attributes, never in a state_dict, and is empty
    between steps.
    """

    codebook_size: int  # the vocabulary: indices lie in [0, codebook_size)
    codebook_dim: int
    codes_per_position: int = 1  # indices per latent position (rvq: its depth, side by side in a row)
    _step_updates: str = "every_forward"

    def set_step_updates(self, when: str) -> None:
        """When training forwards apply the step's bookkeeping: 'every_forward' (each forward is a step,
        the default), 'defer' (add to the step's pending sums only) or 'finish' (add, then apply the
        step's update in this forward: the last micro-batch of a step). See the class doc."""
        if when not in STEP_UPDATES:
            raise ValueError(f"step updates must be one of {list(STEP_UPDATES)}, got {when!r}")
        self._step_updates = when

    def _deferring(self) -> bool:
        """Whether this forward adds to the step's pending bookkeeping instead of being a step itself."""
        return self.training and self._step_updates != "every_forward"

    def finish_step(self) -> dict[str, torch.Tensor]:
        """The statistics of the step that the last finishing forward applied ('usage' over the last
        usage_window steps, 'perplexity' of the whole step's code histogram, ...; {} when no deferred
        forward ran), applying the pending step first if no finishing forward did. Clears them."""
        if getattr(self, "_pending_hits", None) is not None:
            self._finish_pending()
        stats = getattr(self, "_finished_stats", {})
        self._finished_stats = {}
        return stats

    def _add_pending_hits(self, counts: torch.Tensor) -> None:
        """Add one micro-batch's all-reduced code histogram to the step's."""
        pending = getattr(self, "_pending_hits", None)
        self._pending_hits = counts if pending is None else pending + counts

    def _take_pending_hits(self) -> torch.Tensor:
        counts, self._pending_hits = self._pending_hits, None
        return counts

    def _finish_pending(self) -> None:
        """Apply the pending step (here: the usage window) and keep its statistics for ``finish_step``."""
        self._finished_stats = self._usage_stats(self._take_pending_hits())

    def _step_usage_stats(self, counts: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training forward's usage statistics: this forward's (one step), or none when deferred (the
        counts join the step's, applied here when this forward finishes the step)."""
        if not self._deferring():
            return self._usage_stats(counts)
        self._add_pending_hits(counts)
        if self._step_updates == "finish":
            self._finish_pending()
        return {}

    def _init_usage(self, usage_window: int, shape: tuple[int, ...] | None = None) -> None:
        self.usage_window = usage_window
        # Training-only bookkeeping, not part of the model: non-persistent, so exports stay clean.
        never = torch.iinfo(torch.long).min // 2
        self.register_buffer("last_hit_step", torch.full(shape or (self.codebook_size,), never), persistent=False)
        self.register_buffer("usage_step", torch.zeros((), dtype=torch.long), persistent=False)

    def _check_latents(self, z: torch.Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.codebook_dim:
            raise ValueError(f"{type(self).__name__} expects latents (B, {self.codebook_dim}, h, w), "
                             f"got shape {tuple(z.shape)}")

    def _recent_hits(self, counts: torch.Tensor) -> torch.Tensor:
        """Which codes count as used, shaped like ``counts``: in training, hit within the last
        usage_window steps (this call is one step); in eval, hit in this batch."""
        if not self.training:
            return counts > 0
        self.usage_step += 1
        self.last_hit_step.copy_(torch.where(counts > 0, self.usage_step, self.last_hit_step))
        return self.last_hit_step > self.usage_step - self.usage_window

    def _usage_stats(self, counts: torch.Tensor) -> dict[str, torch.Tensor]:
        """'usage' (training: fraction of codes hit in the last usage_window steps; eval: in this
        batch) and 'perplexity' (exp entropy of this batch's code histogram) from counts (K,)."""
        return {"usage": self._recent_hits(counts).float().mean(), "perplexity": perplexity(counts)}
