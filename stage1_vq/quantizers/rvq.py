"""Residual VQ: D learned codebooks in a row, each quantizing what the depths before it left.

Codes for stage 2 (the documented flattening)
---------------------------------------------
A latent position gets D codes. The tokenizer hands them out as one integer grid (B, h, w*D): the D
codes of position (i, j) sit side by side in row i, columns j*D .. j*D + D - 1, depth 0 first. Read
in raster order that is position by position, depth by depth, so the prior, the token shards, the
samplers and the sliding windows take it as an ordinary (h, w*D) grid and need no depth head. The
cost: the prior's sequences are D times longer (attention D^2 times the cost per image, a KV cache
D times larger). A sliding window that should keep whole positions moves D columns at a time.

The prior's vocabulary is ``codebook_size``: with one codebook shared by every depth that is K (the
codes per depth); with one codebook per depth it is D * K, depth d's codes numbered d*K .. d*K + K - 1,
so each token names its codebook. Decoding sums, per position, the code vectors its D tokens name,
each looked up in the codebook its value belongs to: every grid of integers in [0, codebook_size)
decodes, whatever the column it sits in. A pipeline's samplers therefore draw at column c only codes of
depth c % D (``stage2_prior.draw.code_groups``): a prior is free to put mass on another depth's codes,
which would decode as a vector of the wrong scale.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from stage1_vq.quantizers.common import (BaseQuantizer, QuantizerOutput, all_reduce_sum_, code_counts, nearest_code,
                                         perplexity, rotation_trick)
from stage1_vq.quantizers.vq import VectorQuantizer


class ResidualVQ(BaseQuantizer):
    """Residual VQ (RQ-VAE, Lee et al. 2022): z ~ q_0 + ... + q_{D-1}, q_d the nearest code to z - q_0 - ... - q_{d-1}.

    Each depth is a ``VectorQuantizer`` (``layers[d]``; one shared layer with ``shared_codebook``),
    so its options apply per depth: EMA updates, dead-code restarts and k-means init run on that
    depth's residuals (a shared codebook is updated once per step from all depths' residuals, and
    k-means-initialised on them), SimVQ and the entropy penalty per depth. ``l2_norm`` normalises the
    latents and the first depth's codes only: the residuals after it are not unit vectors.

    Loss: the sum over depths of each depth's loss, whose commitment term ||r_d - sg(q_d)||^2 equals
    ||z - sg(q_0 + ... + q_d)||^2 (RQ-VAE's). The output is q_0 + ... + q_{D-1} with one
    straight-through (or rotation-trick) gradient into z. Stats: 'usage' / 'perplexity' over the
    vocabulary (shared: a code counts as used at any depth), and per depth ``usage_d{d}``,
    ``perplexity_d{d}`` and ``error_d{d}``: the squared error of z against q_0 + ... + q_d relative to
    z's mean square (what the depths so far fail to reconstruct). Index layout: see the module doc.
    """

    def __init__(self, depth: int, codebook_size: int, codebook_dim: int, shared_codebook: bool = False,
                 l2_norm: bool = False, rotation_trick: bool = False, usage_window: int = 100, **vq_options: object):
        super().__init__()
        if depth < 1:
            raise ValueError(f"rvq depth must be >= 1, got {depth}")
        if shared_codebook and l2_norm:
            raise ValueError("a shared rvq codebook cannot be l2-normalised: residuals are not unit vectors")
        self.depth = depth
        self.codes_per_position = depth
        self.shared_codebook = shared_codebook
        self.depth_codebook_size = codebook_size
        self.codebook_size = codebook_size if shared_codebook else depth * codebook_size
        self.codebook_dim = codebook_dim
        self.l2_norm = l2_norm
        self.use_rotation_trick = rotation_trick
        self.layers = nn.ModuleList(
            VectorQuantizer(codebook_size, codebook_dim, l2_norm=l2_norm and d == 0, usage_window=usage_window,
                            **vq_options)  # type: ignore[arg-type]
            for d in range(1 if shared_codebook else depth))
        # usage is tracked per (depth, code), the vocabulary's figure derived from it
        self._init_usage(usage_window, shape=(depth, codebook_size))

    def layer(self, d: int) -> VectorQuantizer:
        """The learned codebook of depth ``d``."""
        return self.layers[0 if self.shared_codebook else d]

    def _flatten(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, self.codebook_dim)  # (B*h*w, C)
        return F.normalize(flat, dim=-1) if self.l2_norm else flat

    def _to_grid(self, per_depth: list[torch.Tensor], b: int, h: int, w: int) -> torch.Tensor:
        """Per-depth indices D x (N,) in [0, K) -> the vocabulary's (B, h, w*D) grid (see the module doc)."""
        codes = torch.stack(per_depth, dim=-1)  # (N, D)
        if not self.shared_codebook:
            codes = codes + torch.arange(self.depth, device=codes.device) * self.depth_codebook_size
        return codes.view(b, h, w * self.depth)

    def code_table(self) -> torch.Tensor:
        """Every code vector by its token value (codebook_size, C): the shared codebook or the depths' in a row."""
        return torch.cat([layer.codebook() for layer in self.layers])

    @torch.no_grad()
    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Code grid (B, h, w*D) of latents z (B, C, h, w), without touching any training state."""
        self._check_latents(z)
        b, _, h, w = z.shape
        residual = self._flatten(z)
        per_depth = []
        for d in range(self.depth):
            codebook = self.layer(d).codebook()
            indices = nearest_code(residual, codebook)
            residual = residual - codebook[indices]
            per_depth.append(indices)
        return self._to_grid(per_depth, b, h, w)

    def codes_from_indices(self, indices: torch.Tensor, depths: int | None = None) -> torch.Tensor:
        """Code grid (B, h, w*D) -> quantized latents (B, C, h, w), the sum of each position's code vectors;
        ``depths``: sum only the first that many (a coarser reconstruction), default all D."""
        b, h, columns = indices.shape
        if columns % self.depth:
            raise ValueError(f"rvq codes come as (B, h, w*{self.depth}): {self.depth} per position side by side, "
                             f"but the grid has {columns} columns")
        used = self.depth if depths is None else depths
        if not 1 <= used <= self.depth:
            raise ValueError(f"depths must be in 1..{self.depth}, got {depths}")
        vectors = F.embedding(indices.view(b, h, columns // self.depth, self.depth)[..., :used], self.code_table())
        return vectors.sum(3).permute(0, 3, 1, 2).contiguous()  # (B, h, w, used, C) -> (B, C, h, w)

    @torch.no_grad()
    def _init_shared_codebook(self, flat: torch.Tensor) -> None:
        """k-means of the shared codebook over every depth's residuals: first on the latents, then on the
        residuals that codebook leaves at depths 0..D-1 (one codebook must serve every scale)."""
        layer = self.layers[0]
        layer._kmeans_init(flat)
        residuals, residual = [flat], flat
        codebook = layer.codebook()
        for _ in range(self.depth - 1):
            residual = residual - codebook[nearest_code(residual, codebook)]
            residuals.append(residual)
        layer._kmeans_init(torch.cat(residuals))

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        self._check_latents(z)
        b, _, h, w = z.shape
        zero = torch.zeros((), device=z.device)
        # The lookups run in fp32 even under autocast: bf16 distances pick wrong codes.
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = self._flatten(z)  # (N, C)
            shared = self.layers[0]
            if self.training and self.shared_codebook and shared.needs_kmeans_init():
                self._init_shared_codebook(flat.detach())
            residual, total = flat, torch.zeros_like(flat)
            per_depth, residuals, errors = [], [], []
            loss, commitment, codebook_loss, penalty = zero, zero, zero, zero
            for d in range(self.depth):
                layer = self.layer(d)
                if self.training and not self.shared_codebook and layer.needs_kmeans_init():
                    layer._kmeans_init(residual.detach())  # on this depth's residuals, the depths before set
                codebook = layer.codebook()  # (K, C)
                indices = nearest_code(residual.detach(), codebook.detach())  # (N,)
                quantized = F.embedding(indices, codebook)  # (N, C); gradients reach the codebook
                terms = layer.loss_terms(residual, quantized, codebook)
                loss, commitment = loss + terms.total, commitment + terms.commitment
                codebook_loss, penalty = codebook_loss + terms.codebook_loss, penalty + terms.entropy_penalty
                per_depth.append(indices)
                residuals.append(residual.detach())
                residual = residual - quantized.detach()
                total = total + quantized.detach()
                errors.append(residual.detach().pow(2).mean())
            counts = torch.stack([code_counts(i, self.depth_codebook_size) for i in per_depth])
            restarted = zero
            if self.training:
                all_reduce_sum_(counts)  # (D, K), global: EMA state must agree across ranks
                # after every lookup, so that each depth's codes were chosen by one codebook state
                if self._deferring():  # one micro-batch of a step: see BaseQuantizer
                    if self.shared_codebook:
                        shared._defer_codebook_update(torch.cat(residuals), torch.cat(per_depth), counts.sum(0))
                    else:
                        for d, layer in enumerate(self.layers):
                            layer._defer_codebook_update(residuals[d], per_depth[d], counts[d])
                    self._add_pending_hits(counts)
                    if self._step_updates == "finish":
                        self._finish_pending()
                elif self.shared_codebook:
                    restarted = shared._update_codebook(torch.cat(residuals), torch.cat(per_depth), counts.sum(0))
                else:
                    for d, layer in enumerate(self.layers):
                        restarted = restarted + layer._update_codebook(residuals[d], per_depth[d], counts[d])
            if self.use_rotation_trick:
                out = rotation_trick(flat, total)
            else:
                out = flat + (total - flat).detach()  # straight-through estimator
            z_q = out.view(b, h, w, self.codebook_dim).permute(0, 3, 1, 2)  # (B, C, h, w)
            deferred = self._deferring()  # then the step's usage, perplexity and restarts come from finish_step
            errors = torch.stack(errors) / flat.detach().pow(2).mean().clamp_min(1e-12)
            usage = {} if deferred else self._usage_stats(counts)
            stats = {key: usage[key] for key in ("usage", "perplexity") if key in usage}
            for d in range(self.depth):
                stats.update({key: usage[key] for key in (f"usage_d{d}", f"perplexity_d{d}") if key in usage})
                stats[f"error_d{d}"] = errors[d]
            stats.update(commitment=commitment.detach(), codebook_loss=codebook_loss.detach())
            if not deferred:
                stats["restarted"] = restarted
            stats["entropy_penalty"] = penalty.detach()
        return QuantizerOutput(z_q, self._to_grid(per_depth, b, h, w), loss, stats)

    def _finish_pending(self) -> None:
        counts = self._take_pending_hits()
        restarted = torch.zeros((), device=counts.device)
        for layer in self.layers:
            layer_restarted = layer._apply_pending_codebook_update()
            if layer_restarted is not None:
                restarted = restarted + layer_restarted
        self._finished_stats = {**self._usage_stats(counts), "restarted": restarted}

    def _usage_stats(self, counts: torch.Tensor) -> dict[str, torch.Tensor]:
        """Usage and perplexity over the vocabulary and per depth, from counts (D, K)."""
        hits = self._recent_hits(counts)  # (D, K)
        if self.shared_codebook:  # one vocabulary of K codes: used at any depth
            stats = {"usage": hits.any(0).float().mean(), "perplexity": perplexity(counts.sum(0))}
        else:  # the depths' codes side by side
            stats = {"usage": hits.float().mean(), "perplexity": perplexity(counts.flatten())}
        for d in range(self.depth):
            stats[f"usage_d{d}"] = hits[d].float().mean()
            stats[f"perplexity_d{d}"] = perplexity(counts[d])
        return stats
