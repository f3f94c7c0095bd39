"""Quantizers that turn latents (B, C, h, w) into codes: a learned codebook (VQ, optionally SimVQ), FSQ, LFQ,
residual VQ.

All follow one contract: ``quantizer(z) -> QuantizerOutput(z_q, indices, loss, stats)`` with
``stats['usage']`` and ``stats['perplexity']`` over the vocabulary of ``codebook_size`` codes
(``BaseQuantizer._recent_hits`` and ``perplexity``), ``quantizer.lookup(z) -> indices`` and
``quantizer.codes_from_indices(indices) -> z_q``. Indices are (B, h, w * codes_per_position): one
per position, except residual VQ's D side by side (see ``rvq``). Quantizer state and statistics
that must agree across DDP ranks (EMA statistics, dead-code restarts, k-means init, usage counts,
the batch-mean code distributions of the entropy losses) are all-reduced / broadcast in training
when ``torch.distributed`` runs with more than one process; everything else is rank-local. That
training state moves once per training forward, or, under gradient accumulation, once per optimizer
step over all its micro-batches (``set_step_updates`` / ``finish_step``, see ``BaseQuantizer``).

Modules: ``config`` (QuantizerConfig), ``common`` (output type, DDP helpers, lookup, usage
statistics), ``vq`` (VectorQuantizer), ``fsq`` (FSQ), ``lfq`` (LFQ), ``rvq`` (ResidualVQ);
``build_quantizer`` here.
"""

from __future__ import annotations

from stage1_vq.quantizers.common import (BaseQuantizer, QuantizerOutput, all_gather_cat, all_reduce_sum_, broadcast_,
                                         entropy, mean_over_ranks, nearest_code, perplexity, rotation_trick)
from stage1_vq.quantizers.config import DEFAULT_VQ_CODEBOOK_SIZE, MAX_LFQ_DIM, QUANTIZER_KINDS, QuantizerConfig
from stage1_vq.quantizers.fsq import FSQ
from stage1_vq.quantizers.lfq import LFQ
from stage1_vq.quantizers.rvq import ResidualVQ
from stage1_vq.quantizers.vq import VectorQuantizer

__all__ = ["BaseQuantizer", "DEFAULT_VQ_CODEBOOK_SIZE", "FSQ", "LFQ", "MAX_LFQ_DIM", "QUANTIZER_KINDS", "Quantizer",
           "QuantizerConfig", "QuantizerOutput", "ResidualVQ", "VectorQuantizer", "all_gather_cat", "all_reduce_sum_",
           "broadcast_", "build_quantizer", "entropy", "mean_over_ranks", "nearest_code", "perplexity",
           "rotation_trick"]


Quantizer = VectorQuantizer | FSQ | LFQ | ResidualVQ


def build_quantizer(cfg: QuantizerConfig, dim: int) -> Quantizer:
    """The quantizer that ``cfg`` describes, working on latents with ``dim`` channels."""
    if cfg.kind in ("vq", "rvq"):
        learned = dict(beta=cfg.beta, ema=cfg.ema, ema_decay=cfg.ema_decay, restart_threshold=cfg.restart_threshold,
                       kmeans_init=cfg.kmeans_init, kmeans_iters=cfg.kmeans_iters, simvq=cfg.simvq,
                       entropy_weight=cfg.entropy_weight, entropy_temperature=cfg.entropy_temperature)
        if cfg.kind == "rvq":
            return ResidualVQ(cfg.rvq_depth, cfg.codebook_size, dim, shared_codebook=cfg.rvq_shared_codebook,
                              l2_norm=cfg.l2_norm, rotation_trick=cfg.rotation_trick, usage_window=cfg.usage_window,
                              **learned)
        return VectorQuantizer(cfg.codebook_size, dim, l2_norm=cfg.l2_norm, rotation_trick=cfg.rotation_trick,
                               usage_window=cfg.usage_window, **learned)
    if cfg.kind == "fsq":
        if dim != len(cfg.fsq_levels):
            raise ValueError(f"fsq works on len(fsq_levels)={len(cfg.fsq_levels)} channels, got dim={dim}")
        return FSQ(cfg.fsq_levels, usage_window=cfg.usage_window)
    if cfg.kind == "lfq":
        if dim != cfg.lfq_dim:
            raise ValueError(f"lfq works on lfq_dim={cfg.lfq_dim} channels, got dim={dim}")
        return LFQ(cfg.lfq_dim, beta=cfg.beta, temperature=cfg.lfq_temperature,
                   sample_entropy_weight=cfg.lfq_sample_entropy_weight,
                   codebook_entropy_weight=cfg.lfq_codebook_entropy_weight, usage_window=cfg.usage_window)
    raise ValueError(f"quantizer kind must be one of {list(QUANTIZER_KINDS)}, got {cfg.kind!r}")
