"""Quantizers that turn latents (B, C, h, w) into codes: a learned-codebook VQ and FSQ.

Both follow one contract: ``quantizer(z) -> QuantizerOutput(z_q, indices, loss, stats)`` and
``quantizer.codes_from_indices(indices) -> z_q``. Quantizer state that must agree across DDP ranks
(EMA statistics, dead-code restarts, k-means init) is all-reduced / broadcast when
``torch.distributed`` runs with more than one process; everything else is rank-local.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from vqgpt.ground.config import opt

QUANTIZER_KINDS = ("vq", "fsq")
DEFAULT_VQ_CODEBOOK_SIZE = 1024


@dataclass
class QuantizerConfig:
    """How latents become discrete codes."""

    kind: str = opt("vq", "quantizer: 'vq' (learned codebook) or 'fsq' (finite scalar quantization)")
    codebook_size: int | None = opt(None, "number of codes; null = 1024 for 'vq', prod(fsq_levels) for 'fsq' "
                                          "(a value set for 'fsq' must equal that product)")
    codebook_dim: int | None = opt(None, "channels of the code vectors (quant_conv maps z_channels to it); "
                                         "null = z_channels for 'vq', len(fsq_levels) for 'fsq'")
    l2_norm: bool = opt(False, "vq: l2-normalise latents and codes before the lookup (ViT-VQGAN / LlamaGen)")
    beta: float = opt(0.25, "vq: weight of the commitment loss ||z - sg(q)||^2")
    ema: bool = opt(False, "vq: update the codebook by exponential moving averages instead of a codebook loss")
    ema_decay: float = opt(0.99, "vq: decay of the EMA codebook and of the per-code usage counts")
    restart_threshold: float = opt(0.0, "vq: re-seed a code from current encoder outputs when its EMA hit count "
                                        "per step (summed over ranks) falls below this; 0 = off")
    kmeans_init: bool = opt(False, "vq: initialise the codebook by k-means on the first training batch")
    kmeans_iters: int = opt(10, "vq: Lloyd iterations of the k-means init")
    rotation_trick: bool = opt(False, "vq: pass gradients with the rotation trick (Fifty et al. 2024) "
                                      "instead of the straight-through estimator")
    fsq_levels: list[int] = opt([8, 8, 8, 5, 5, 5], "fsq: number of levels per channel")
    usage_window: int = opt(100, "training steps over which the 'usage' statistic counts a code as used")

    def __post_init__(self) -> None:
        if self.kind not in QUANTIZER_KINDS:
            raise ValueError(f"quantizer kind must be one of {list(QUANTIZER_KINDS)}, got {self.kind!r}")
        if self.usage_window < 1:
            raise ValueError(f"usage_window must be >= 1, got {self.usage_window}")
        if self.codebook_dim is not None and self.codebook_dim < 1:
            raise ValueError(f"codebook_dim must be >= 1 or null, got {self.codebook_dim}")
        if self.kind == "fsq":
            if not self.fsq_levels or any(level < 2 for level in self.fsq_levels):
                raise ValueError(f"fsq_levels must be a non-empty list of integers >= 2, got {self.fsq_levels}")
            if self.codebook_dim is not None and self.codebook_dim != len(self.fsq_levels):
                raise ValueError(f"codebook_dim ({self.codebook_dim}) must equal len(fsq_levels) "
                                 f"({len(self.fsq_levels)}) for kind 'fsq'")
            vq_only = {"l2_norm": self.l2_norm, "ema": self.ema, "kmeans_init": self.kmeans_init,
                       "rotation_trick": self.rotation_trick, "restart_threshold": self.restart_threshold > 0}
            bad = [name for name, on in vq_only.items() if on]
            if bad:
                raise ValueError(f"{', '.join(bad)} only apply to quantizer kind 'vq', not 'fsq'")
            # Derived from the levels; a value the user wrote must agree rather than be replaced.
            size = math.prod(self.fsq_levels)
            if self.codebook_size is not None and self.codebook_size != size:
                raise ValueError(f"codebook_size {self.codebook_size} disagrees with fsq_levels {self.fsq_levels}, "
                                 f"which give {size} codes; leave codebook_size out (or set it to {size})")
            self.codebook_size = size
        else:
            if self.codebook_size is None:
                self.codebook_size = DEFAULT_VQ_CODEBOOK_SIZE
            if self.codebook_size < 2:
                raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
            if not 0.0 < self.ema_decay < 1.0:
                raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
            if self.kmeans_iters < 1:
                raise ValueError(f"kmeans_iters must be >= 1, got {self.kmeans_iters}")
            if self.restart_threshold < 0:
                raise ValueError(f"restart_threshold must be >= 0, got {self.restart_threshold}")

    def latent_dim(self, z_channels: int) -> int:
        """Channels the quantizer works in (the output width of quant_conv)."""
        if self.codebook_dim is not None:
            return self.codebook_dim
        return len(self.fsq_levels) if self.kind == "fsq" else z_channels


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


class _Quantizer(nn.Module):
    """Input checks and usage statistics shared by the quantizers."""

    codebook_size: int
    codebook_dim: int

    def _init_usage(self, usage_window: int) -> None:
        self.usage_window = usage_window
        # Training-only bookkeeping, not part of the model: non-persistent, so exports stay clean.
        never = torch.iinfo(torch.long).min // 2
        self.register_buffer("last_hit_step", torch.full((self.codebook_size,), never), persistent=False)
        self.register_buffer("usage_step", torch.zeros((), dtype=torch.long), persistent=False)

    def _check_latents(self, z: torch.Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.codebook_dim:
            raise ValueError(f"{type(self).__name__} expects latents (B, {self.codebook_dim}, h, w), "
                             f"got shape {tuple(z.shape)}")

    def _usage_stats(self, counts: torch.Tensor) -> dict[str, torch.Tensor]:
        """'usage' (training: fraction of codes hit in the last usage_window steps; eval: in this
        batch) and 'perplexity' (exp entropy of this batch's code histogram) from counts (K,)."""
        probs = counts / counts.sum().clamp_min(1.0)
        perplexity = torch.exp(-(probs * probs.clamp_min(1e-12).log()).sum())
        if self.training:
            self.usage_step += 1
            self.last_hit_step.copy_(torch.where(counts > 0, self.usage_step, self.last_hit_step))
            usage = (self.last_hit_step > self.usage_step - self.usage_window).float().mean()
        else:
            usage = (counts > 0).float().mean()
        return {"usage": usage, "perplexity": perplexity}


# ----------------------------------------------------------------------------- vector quantizer


class VectorQuantizer(_Quantizer):
    """Learned codebook (``embedding.weight`` (K, D)) with nearest-neighbour lookup.

    Loss: ||sg(z) - q||^2 (codebook, skipped with EMA) + beta * ||z - sg(q)||^2 (commitment).
    Options: l2-normalised lookup, EMA codebook, dead-code restart, k-means init, rotation trick.
    """

    def __init__(self, codebook_size: int, codebook_dim: int, beta: float = 0.25, l2_norm: bool = False,
                 ema: bool = False, ema_decay: float = 0.99, restart_threshold: float = 0.0,
                 kmeans_init: bool = False, kmeans_iters: int = 10, rotation_trick: bool = False,
                 usage_window: int = 100, ema_eps: float = 1e-5):
        super().__init__()
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.beta = beta
        self.l2_norm = l2_norm
        self.ema = ema
        self.ema_decay = ema_decay
        self.ema_eps = ema_eps
        self.restart_threshold = restart_threshold
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.use_rotation_trick = rotation_trick

        self.embedding = nn.Embedding(codebook_size, codebook_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)  # taming/LlamaGen init
        if l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, dim=-1)
        if ema:
            self.embedding.weight.requires_grad_(False)  # moved by EMA, never by the optimizer
        # Persistent training state (resume must restore it), registered only when used so that a
        # plain codebook's state_dict is just `embedding.weight`, as in taming checkpoints.
        if ema or restart_threshold > 0:
            self.register_buffer("cluster_size", torch.ones(codebook_size))  # EMA hits per step
        if ema:
            self.register_buffer("embed_sum", self.embedding.weight.detach().clone())  # EMA sum of members
        if kmeans_init:
            self.register_buffer("initialized", torch.tensor(False))
        self._init_usage(usage_window)

    def codebook(self) -> torch.Tensor:
        """The code vectors as used in the lookup (K, D): l2-normalised when l2_norm is on."""
        weight = self.embedding.weight.float()
        return F.normalize(weight, dim=-1) if self.l2_norm else weight

    def _flatten(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, self.codebook_dim)  # (B*h*w, D)
        return F.normalize(flat, dim=-1) if self.l2_norm else flat

    @torch.no_grad()
    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Code indices (B, h, w) of latents z (B, D, h, w), without touching any training state."""
        self._check_latents(z)
        b, _, h, w = z.shape
        return nearest_code(self._flatten(z), self.codebook()).view(b, h, w)

    def codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, h, w) -> quantized latents (B, D, h, w) (equal to forward's z_q values)."""
        return F.embedding(indices, self.codebook()).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        self._check_latents(z)
        b, _, h, w = z.shape
        # The lookup runs in fp32 even under autocast: bf16 distances pick wrong codes.
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = self._flatten(z)  # (N, D)
            if self.training and self.kmeans_init and not bool(self.initialized):
                self._kmeans_init(flat.detach())
            codebook = self.codebook()  # (K, D)
            indices = nearest_code(flat.detach(), codebook.detach())  # (N,)
            quantized = F.embedding(indices, codebook)  # (N, D); gradients reach the codebook
            counts = torch.bincount(indices, minlength=self.codebook_size).float()  # (K,)
            restarted = torch.zeros((), device=z.device)
            if self.training:
                all_reduce_sum_(counts)  # global histogram: EMA state must agree across ranks
                restarted = self._update_codebook(flat.detach(), indices, counts)

            commitment = F.mse_loss(flat, quantized.detach())
            codebook_loss = torch.zeros((), device=z.device) if self.ema else F.mse_loss(quantized, flat.detach())
            loss = codebook_loss + self.beta * commitment
            if self.use_rotation_trick:
                out = rotation_trick(flat, quantized.detach())
            else:
                out = flat + (quantized - flat).detach()  # straight-through estimator
            z_q = out.view(b, h, w, self.codebook_dim).permute(0, 3, 1, 2)  # (B, D, h, w)
            stats = self._usage_stats(counts)
            stats.update(commitment=commitment.detach(), codebook_loss=codebook_loss.detach(), restarted=restarted)
        return QuantizerOutput(z_q, indices.view(b, h, w), loss, stats)

    @torch.no_grad()
    def _update_codebook(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """EMA codebook / usage-count update and dead-code restart; returns the number restarted."""
        decay = self.ema_decay
        if self.ema:
            sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, flat)
            all_reduce_sum_(sums)
            self.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
            self.embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
            # Laplace smoothing keeps rarely used codes from dividing by ~0.
            total = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.ema_eps) / (total + self.codebook_size * self.ema_eps) * total
            self.embedding.weight.data.copy_(self.embed_sum / smoothed.unsqueeze(1))
        elif self.restart_threshold > 0:
            self.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        if self.restart_threshold > 0:
            return self._restart_dead_codes(flat)
        return torch.zeros((), device=flat.device)

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor) -> torch.Tensor:
        """Re-seed codes whose EMA hit count is below the threshold with current encoder outputs."""
        dead = self.cluster_size < self.restart_threshold  # identical on all ranks (synced counts)
        num_dead = int(dead.sum())
        if num_dead == 0:
            return torch.zeros((), device=flat.device)
        local = flat[torch.randint(len(flat), (num_dead,), device=flat.device)]
        candidates = all_gather_cat(local)  # (world * num_dead, D), same on every rank
        choice = broadcast_(torch.randperm(len(candidates), device=flat.device)[:num_dead])
        new_codes = candidates[choice]
        dead_idx = dead.nonzero().squeeze(1)
        self.embedding.weight.data[dead_idx] = new_codes.to(self.embedding.weight.dtype)
        # A revived code starts at the threshold: it is re-seeded again if it stays unused.
        self.cluster_size[dead_idx] = self.restart_threshold
        if self.ema:
            self.embed_sum[dead_idx] = new_codes * self.restart_threshold
        return torch.tensor(float(num_dead), device=flat.device)

    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor) -> None:
        """Lloyd's k-means over all ranks' latents (N, D); seeds from rank 0, sums all-reduced."""
        k = self.codebook_size
        n = len(flat)
        seeds = torch.randperm(n, device=flat.device)[:k] if n >= k else torch.randint(n, (k,), device=flat.device)
        centroids = broadcast_(flat[seeds].clone())
        counts = torch.zeros(k, device=flat.device)
        for _ in range(self.kmeans_iters):
            assign = nearest_code(flat, centroids)
            sums = all_reduce_sum_(torch.zeros_like(centroids).index_add_(0, assign, flat))
            counts = all_reduce_sum_(torch.bincount(assign, minlength=k).float())
            means = sums / counts.clamp_min(1.0).unsqueeze(1)
            if self.l2_norm:
                means = F.normalize(means, dim=-1)
            centroids = torch.where((counts > 0).unsqueeze(1), means, centroids)  # empty clusters stay
        self.embedding.weight.data.copy_(centroids)
        if self.ema:
            self.cluster_size.copy_(counts.clamp_min(1.0))
            self.embed_sum.copy_(centroids * self.cluster_size.unsqueeze(1))
        elif self.restart_threshold > 0:
            self.cluster_size.copy_(counts)
        self.initialized.fill_(True)


# ----------------------------------------------------------------------------- FSQ


class FSQ(_Quantizer):
    """Finite scalar quantization (Mentzer et al. 2023): each channel bounded and rounded to L_i levels.

    Codes are the grid points of prod(levels) cells scaled to [-1, 1]; no codebook, no loss, and
    no collapse. Channel values map to an index in mixed radix (first channel least significant).
    """

    def __init__(self, levels: list[int] | tuple[int, ...], usage_window: int = 100, eps: float = 1e-3):
        super().__init__()
        self.levels_list = [int(level) for level in levels]
        self.codebook_size = math.prod(self.levels_list)
        self.codebook_dim = len(self.levels_list)
        self.eps = eps
        levels_t = torch.tensor(self.levels_list, dtype=torch.long)
        basis = torch.cumprod(torch.tensor([1] + self.levels_list[:-1], dtype=torch.long), dim=0)
        # Derived from the config, so kept out of the state_dict.
        self.register_buffer("levels", levels_t, persistent=False)
        self.register_buffer("basis", basis, persistent=False)
        self._init_usage(usage_window)

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash z (..., D) into (-L/2, L/2) per channel, offset for even L so rounding gives L values."""
        levels = self.levels.float()
        half_l = (levels - 1) * (1 + self.eps) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def _half_width(self) -> torch.Tensor:
        return (self.levels // 2).float()

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (..., D) on the normalised grid -> indices (...) int64."""
        digits = (codes * self._half_width() + self._half_width()).round().long()
        return (digits * self.basis).sum(-1)

    def codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, h, w) -> quantized latents (B, D, h, w) in [-1, 1]."""
        digits = (indices.unsqueeze(-1) // self.basis) % self.levels  # (B, h, w, D)
        codes = (digits.float() - self._half_width()) / self._half_width()
        return codes.permute(0, 3, 1, 2).contiguous()

    def _quantize_flat(self, flat: torch.Tensor) -> torch.Tensor:
        bounded = self._bound(flat)
        rounded = bounded + (bounded.round() - bounded).detach()  # round with straight-through gradient
        return rounded / self._half_width()

    @torch.no_grad()
    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Code indices (B, h, w) of latents z (B, D, h, w)."""
        self._check_latents(z)
        b, _, h, w = z.shape
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, self.codebook_dim)
        return self.codes_to_indices(self._quantize_flat(flat)).view(b, h, w)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        self._check_latents(z)
        b, _, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.float().permute(0, 2, 3, 1).reshape(-1, self.codebook_dim)  # (N, D)
            codes = self._quantize_flat(flat)
            indices = self.codes_to_indices(codes.detach())  # (N,)
            counts = torch.bincount(indices, minlength=self.codebook_size).float()
            if self.training:
                all_reduce_sum_(counts)
            stats = self._usage_stats(counts)
            z_q = codes.view(b, h, w, self.codebook_dim).permute(0, 3, 1, 2)  # (B, D, h, w)
        return QuantizerOutput(z_q, indices.view(b, h, w), torch.zeros((), device=z.device), stats)


def build_quantizer(cfg: QuantizerConfig, dim: int) -> VectorQuantizer | FSQ:
    """The quantizer that ``cfg`` describes, working on latents with ``dim`` channels."""
    if cfg.kind == "vq":
        return VectorQuantizer(cfg.codebook_size, dim, beta=cfg.beta, l2_norm=cfg.l2_norm, ema=cfg.ema,
                               ema_decay=cfg.ema_decay, restart_threshold=cfg.restart_threshold,
                               kmeans_init=cfg.kmeans_init, kmeans_iters=cfg.kmeans_iters,
                               rotation_trick=cfg.rotation_trick, usage_window=cfg.usage_window)
    if cfg.kind == "fsq":
        if dim != len(cfg.fsq_levels):
            raise ValueError(f"fsq works on len(fsq_levels)={len(cfg.fsq_levels)} channels, got dim={dim}")
        return FSQ(cfg.fsq_levels, usage_window=cfg.usage_window)
    raise ValueError(f"quantizer kind must be one of {list(QUANTIZER_KINDS)}, got {cfg.kind!r}")
