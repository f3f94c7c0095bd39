"""The learned codebook: nearest-code lookup with EMA, restarts, k-means init, SimVQ, LlamaGen's entropy penalty."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from stage1_vq.quantizers.common import (BaseQuantizer, QuantizerOutput, all_reduce_sum_, broadcast_,
                                         code_counts, entropy, mean_over_ranks, nearest_code, rotation_trick)

class VQLoss(NamedTuple):
    """A learned codebook's loss (total) and its parts, scalars."""

    total: torch.Tensor
    commitment: torch.Tensor
    codebook_loss: torch.Tensor
    entropy_penalty: torch.Tensor


class VectorQuantizer(BaseQuantizer):
    """Learned codebook (``embedding.weight`` (K, D)) with nearest-neighbour lookup.

    Loss: ||sg(z) - q||^2 (codebook, skipped with EMA) + beta * ||z - sg(q)||^2 (commitment)
    [+ entropy_weight * LlamaGen's entropy penalty]. Options: l2-normalised lookup, EMA codebook,
    dead-code restart, k-means init, rotation trick, SimVQ.

    SimVQ (``simvq=True``): the codebook is a frozen random buffer ``base_codebook`` C (K, D) and
    the code vectors are ``codebook_map(C)`` (a learned Linear D -> D). The codebook loss moves the
    map, and the map moves every code at once, so codes the encoder never picks still follow the
    latents instead of being stranded.
    """

    def __init__(self, codebook_size: int, codebook_dim: int, beta: float = 0.25, l2_norm: bool = False,
                 ema: bool = False, ema_decay: float = 0.99, restart_threshold: float = 0.0,
                 kmeans_init: bool = False, kmeans_iters: int = 10, rotation_trick: bool = False,
                 usage_window: int = 100, ema_eps: float = 1e-5, simvq: bool = False,
                 entropy_weight: float = 0.0, entropy_temperature: float = 0.01):
        super().__init__()
        if simvq and (ema or kmeans_init or restart_threshold > 0):
            raise ValueError("simvq does not combine with ema, kmeans_init or restart_threshold")
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
        self.simvq = simvq
        self.entropy_weight = entropy_weight
        self.entropy_temperature = entropy_temperature

        self._init_usage(usage_window)
        if simvq:
            # Frozen, yet part of the export: the codes are a function of these random vectors.
            self.register_buffer("base_codebook", torch.randn(codebook_size, codebook_dim) * codebook_dim ** -0.5)
            self.codebook_map = nn.Linear(codebook_dim, codebook_dim)
            return
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

    def codebook(self) -> torch.Tensor:
        """The code vectors as used in the lookup (K, D): W(C) for SimVQ, l2-normalised when l2_norm is on."""
        if self.simvq:
            weight = F.linear(self.base_codebook.float(), self.codebook_map.weight.float(),
                              self.codebook_map.bias.float())
        else:
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
            if self.training and self.needs_kmeans_init():
                self._kmeans_init(flat.detach())
            codebook = self.codebook()  # (K, D)
            indices = nearest_code(flat.detach(), codebook.detach())  # (N,)
            quantized = F.embedding(indices, codebook)  # (N, D); gradients reach the codebook
            counts = code_counts(indices, self.codebook_size)  # (K,)
            restarted = torch.zeros((), device=z.device)
            if self.training:
                all_reduce_sum_(counts)  # global histogram: EMA state must agree across ranks
                if self._deferring():  # one micro-batch of a step: see BaseQuantizer
                    self._defer_codebook_update(flat.detach(), indices, counts)
                    self._add_pending_hits(counts)
                    if self._step_updates == "finish":
                        self._finish_pending()  # before the loss terms, where an undeferred forward updates
                else:
                    restarted = self._update_codebook(flat.detach(), indices, counts)

            loss, commitment, codebook_loss, penalty = self.loss_terms(flat, quantized, codebook)
            if self.use_rotation_trick:
                out = rotation_trick(flat, quantized.detach())
            else:
                out = flat + (quantized - flat).detach()  # straight-through estimator
            z_q = out.view(b, h, w, self.codebook_dim).permute(0, 3, 1, 2)  # (B, D, h, w)
            deferred = self._deferring()  # then the step's usage, perplexity and restarts come from finish_step
            stats = {} if deferred else self._usage_stats(counts)
            stats.update(commitment=commitment.detach(), codebook_loss=codebook_loss.detach())
            if not deferred:
                stats["restarted"] = restarted
            stats["entropy_penalty"] = penalty.detach()
        return QuantizerOutput(z_q, indices.view(b, h, w), loss, stats)

    def loss_terms(self, flat: torch.Tensor, quantized: torch.Tensor, codebook: torch.Tensor) -> VQLoss:
        """Loss and its parts for latents (N, D) quantized to ``quantized`` (N, D, carrying the codebook's gradient)."""
        commitment = F.mse_loss(flat, quantized.detach())
        codebook_loss = torch.zeros((), device=flat.device) if self.ema else F.mse_loss(quantized, flat.detach())
        loss = codebook_loss + self.beta * commitment
        penalty = torch.zeros((), device=flat.device)
        if self.entropy_weight > 0:
            penalty = self.entropy_penalty(flat, codebook)
            loss = loss + self.entropy_weight * penalty
        return VQLoss(loss, commitment, codebook_loss, penalty)

    def entropy_penalty(self, flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """LlamaGen's entropy penalty of latents (N, D) against code vectors (K, D), a scalar.

        p(k | z) = softmax(-||z - c_k||^2 / T): mean per-sample entropy of p (low when each latent
        is close to one code) minus the entropy of p's mean over the batch, over all ranks in
        training (high when the codes are used evenly). Gradients reach latents and codes.
        """
        distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)  # (N, K)
        log_probs = torch.log_softmax(-distances / self.entropy_temperature, dim=-1)
        probs = log_probs.exp()
        sample_entropy = -(probs * log_probs).sum(-1).mean()
        mean_probs = mean_over_ranks(probs.sum(0), len(flat)) if self.training else probs.mean(0)  # (K,)
        return sample_entropy - entropy(mean_probs)

    def _finish_pending(self) -> None:
        counts = self._take_pending_hits()
        restarted = self._apply_pending_codebook_update()
        if restarted is None:
            restarted = torch.zeros((), device=counts.device)
        self._finished_stats = {**self._usage_stats(counts), "restarted": restarted}

    def _updates_codebook(self) -> bool:
        return self.ema or self.restart_threshold > 0

    @torch.no_grad()
    def _ema_sums(self, flat: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Sum of the latents (N, D) assigned to each code, over all ranks (K, D)."""
        return all_reduce_sum_(torch.zeros_like(self.embed_sum).index_add_(0, indices, flat))

    @torch.no_grad()
    def _defer_codebook_update(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        """Add one micro-batch's all-reduced counts (K,) and EMA sums to the step's pending update."""
        if not self._updates_codebook():
            return
        pending = getattr(self, "_pending_update", None)
        sums = self._ema_sums(flat, indices) if self.ema else None
        if pending is not None:
            counts = pending[0] + counts
            sums = pending[1] + sums if self.ema else None
        # Restart candidates come from the last micro-batch's latents, as under several processes
        # they come from rank 0's share of the batch.
        self._pending_update = (counts, sums, flat)

    @torch.no_grad()
    def _apply_pending_codebook_update(self) -> torch.Tensor | None:
        """The step's EMA update and restarts from the pending sums, once per step: the number restarted,
        None when nothing is pending (a codebook without EMA or restarts)."""
        pending, self._pending_update = getattr(self, "_pending_update", None), None
        return None if pending is None else self._apply_codebook_update(*pending)

    @torch.no_grad()
    def _update_codebook(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """EMA codebook / usage-count update and dead-code restart; returns the number restarted."""
        if not self._updates_codebook():
            return torch.zeros((), device=flat.device)
        return self._apply_codebook_update(counts, self._ema_sums(flat, indices) if self.ema else None, flat)

    @torch.no_grad()
    def _apply_codebook_update(self, counts: torch.Tensor, sums: torch.Tensor | None,
                               flat: torch.Tensor) -> torch.Tensor:
        """One step's EMA update from its all-reduced counts (K,) and member sums (K, D) (``ema``), and the
        dead-code restart with candidates from ``flat`` (N, D); returns the number restarted.

        A step whose sums are not finite (a NaN or inf latent on any rank: a step the loop then drops or
        stops at) skips the EMA update: the hit counts, member sums and codebook keep their values, as one
        such batch would make its codes NaN for good. The dead-code restart still runs on that step: codes
        dead by the kept counts take a candidate from ``flat`` where that candidate is finite (see
        ``_restart_dead_codes``), so they are re-seeded from the step's finite latents though the step is
        dropped; without ``ema`` the counts take the step's (finite) counts as ever, then the restart runs.
        The sums are all-reduced, so every rank decides alike; torch.where, not an if, so no host sync
        breaks a compiled training step."""
        decay = self.ema_decay
        if self.ema:
            finite = torch.isfinite(sums).all()
            # the same kernels as in-place updates of the buffers (bit for bit), kept only when finite
            cluster_size = self.cluster_size.mul(decay).add_(counts, alpha=1 - decay)
            embed_sum = self.embed_sum.mul(decay).add_(sums, alpha=1 - decay)
            # Laplace smoothing keeps rarely used codes from dividing by ~0.
            total = cluster_size.sum()
            smoothed = (cluster_size + self.ema_eps) / (total + self.codebook_size * self.ema_eps) * total
            weight = self.embedding.weight.data
            weight.copy_(torch.where(finite, embed_sum / smoothed.unsqueeze(1), weight))
            self.cluster_size.copy_(torch.where(finite, cluster_size, self.cluster_size))
            self.embed_sum.copy_(torch.where(finite, embed_sum, self.embed_sum))
        elif self.restart_threshold > 0:
            self.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        if self.restart_threshold > 0:
            return self._restart_dead_codes(flat)
        return torch.zeros((), device=flat.device)

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor) -> torch.Tensor:
        """Re-seed codes whose EMA hit count is below the threshold with current encoder outputs.

        Fixed shapes and no host sync, so a compiled training step stays one graph: every code draws
        a candidate latent (rank 0's draw, broadcast, so all ranks agree) and only the dead ones take
        it, unless it is not finite (a NaN or inf latent: a step the loop drops). Returns the number
        restarted as a tensor."""
        candidates = broadcast_(flat[torch.randint(len(flat), (self.codebook_size,), device=flat.device)])
        # (K,), identical on all ranks: synced counts, broadcast candidates
        dead = (self.cluster_size < self.restart_threshold) & torch.isfinite(candidates).all(1)
        weight = self.embedding.weight.data
        weight.copy_(torch.where(dead.unsqueeze(1), candidates.to(weight.dtype), weight))
        # A revived code starts at the threshold: it is re-seeded again if it stays unused.
        self.cluster_size.masked_fill_(dead, self.restart_threshold)
        if self.ema:
            seeded = candidates.to(self.embed_sum.dtype) * self.restart_threshold
            self.embed_sum.copy_(torch.where(dead.unsqueeze(1), seeded, self.embed_sum))
        return dead.sum().float()

    def needs_kmeans_init(self) -> bool:
        """Whether the codebook still waits for its k-means initialisation.

        Once the buffer says done, a plain Python flag answers: reading the buffer every step would
        sync it to the host and break a compiled training step's graph each time."""
        if not self.kmeans_init or getattr(self, "_kmeans_done", False):
            return False
        self._kmeans_done = bool(self.initialized)
        return not self._kmeans_done

    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor) -> None:
        """Lloyd's k-means over all ranks' latents (N, D); seeds from rank 0, sums all-reduced."""
        # A non-finite batch (a step the loop drops or stops at) seeds nothing: the next training forward
        # tries again. Decided over all ranks; a host sync, but only until the codebook is initialised.
        if all_reduce_sum_((~torch.isfinite(flat).all()).float().reshape(1)).item() > 0:
            return
        k = self.codebook_size
        n = len(flat)
        seeds = torch.randperm(n, device=flat.device)[:k] if n >= k else torch.randint(n, (k,), device=flat.device)
        centroids = broadcast_(flat[seeds].clone())
        counts = torch.zeros(k, device=flat.device)
        for _ in range(self.kmeans_iters):
            assign = nearest_code(flat, centroids)
            sums = all_reduce_sum_(torch.zeros_like(centroids).index_add_(0, assign, flat))
            counts = all_reduce_sum_(code_counts(assign, k))
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
        self._kmeans_done = True
