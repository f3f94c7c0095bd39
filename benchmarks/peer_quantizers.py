"""vector-quantize-pytorch's quantizers behind vqgpt's quantizer contract, for the same-budget leaderboard.

Benchmark-only (``pip install -e ".[bench]"``; not a vqgpt dependency). Each adapter wraps one
peer module and answers like a vqgpt quantizer: ``forward(z) -> QuantizerOutput(z_q, indices, loss,
stats)`` with 'usage' and 'perplexity' from vqgpt's own bookkeeping (``BaseQuantizer``), so both sides
are measured alike; ``lookup(z)`` and ``codes_from_indices(indices)`` for encode / decode. ``use_peer``
makes ``VQModel`` build the adapter in place of its quantizer, so training (``train_tokenizer``),
export and evaluation run unchanged around it.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn as nn

import stage1_vq.model
from stage1_vq.quantizers import BaseQuantizer, QuantizerConfig, QuantizerOutput, all_reduce_sum_


class PeerQuantizer(BaseQuantizer):
    """One vector-quantize-pytorch module on latents (B, C, h, w); subclasses say how to call it."""

    def __init__(self, peer: nn.Module, codebook_size: int, codebook_dim: int, usage_window: int = 100):
        super().__init__()
        self.peer = peer
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self._init_usage(usage_window)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_q (B, C, h, w), indices (B, h, w), scalar loss) from the peer module."""
        raise NotImplementedError

    def codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, h, w) -> quantized latents (B, C, h, w)."""
        raise NotImplementedError

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        self._check_latents(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            z_q, indices, loss = self.quantize(z.float())
            counts = torch.bincount(indices.flatten(), minlength=self.codebook_size).float()
            if self.training:
                all_reduce_sum_(counts)
            stats = self._step_usage_stats(counts)  # {} when deferred: see finish_step
        return QuantizerOutput(z_q, indices.long(), loss.sum(), stats)

    @torch.no_grad()
    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Code indices (B, h, w); the peer runs in eval mode so that no codebook state moves."""
        was_training = self.peer.training
        self.peer.eval()
        try:
            return self.quantize(z.float())[1].long()
        finally:
            self.peer.train(was_training)


class PeerVQ(PeerQuantizer):
    """``VectorQuantize``: EMA codebook, optional cosine similarity / low-dim projection, k-means, dead codes."""

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z_q, indices, loss = self.peer(z)
        return z_q, indices, loss

    def codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.peer.project_out(self.peer.codebook[indices]).permute(0, 3, 1, 2).contiguous()

    def unquantized(self, z: torch.Tensor) -> torch.Tensor:
        """What the codes approximate, passed on as if it were a code: latents (B, C, h, w) through the
        peer's projection in, its input transform (l2 normalisation for cosine similarity) and projection out."""
        b, c, h, w = z.shape
        x = self.peer._codebook.transform_input(self.peer.project_in(z.flatten(2).transpose(1, 2)))
        return self.peer.project_out(x).transpose(1, 2).reshape(b, c, h, w)


class PeerFSQ(PeerQuantizer):
    """``FSQ``: no loss, no codebook."""

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z_q, indices = self.peer(z)
        return z_q, indices, torch.zeros((), device=z.device)

    def codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.peer.indices_to_codes(indices)


class PeerLFQ(PeerQuantizer):
    """``LFQ``: sign bits with its entropy auxiliary loss."""

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z_q, indices, aux_loss = self.peer(z)
        return z_q, indices, aux_loss

    def codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.peer.indices_to_codes(indices)


def _vq(dim: int, **options: object) -> PeerQuantizer:
    from vector_quantize_pytorch import VectorQuantize

    size = int(options["codebook_size"])  # type: ignore[call-overload]
    return PeerVQ(VectorQuantize(dim=dim, accept_image_fmap=True, **options), size, dim)


def _fsq(levels: list[int]) -> Callable[[int], PeerQuantizer]:
    def build(dim: int) -> PeerQuantizer:
        from vector_quantize_pytorch import FSQ

        peer = FSQ(levels=levels, dim=dim, channel_first=True)
        return PeerFSQ(peer, peer.codebook_size, dim)
    return build


def _lfq(bits: int) -> Callable[[int], PeerQuantizer]:
    def build(dim: int) -> PeerQuantizer:
        from vector_quantize_pytorch import LFQ

        # the README's settings: entropy loss weight 0.1, diversity gamma 1 (inverse temperature 100)
        peer = LFQ(dim=dim, codebook_size=2 ** bits, entropy_loss_weight=0.1, diversity_gamma=1.0)
        return PeerLFQ(peer, 2 ** bits, dim)
    return build


# The README's VectorQuantize recipe: cosine similarity in a low-dim (here 8, as vqgpt's l2 rows)
# projected codebook, k-means init, EMA decay 0.8, commitment weight 1, and a dead-code threshold.
# Its example threshold, 2 EMA hits per step, assumes batches with many more tokens than codes; here a
# batch has 1,024 tokens for 1,024 codes (1 hit per code per step on average), so "-dead2" re-seeds most
# codes every step. The plain rows use 0.05 hits per step, the threshold of vqgpt's restart rows.
VQ_RECIPE = dict(codebook_size=1024, codebook_dim=8, use_cosine_sim=True, kmeans_init=True, decay=0.8,
                 commitment_weight=1.0)
PEERS: dict[str, Callable[[int], PeerQuantizer]] = {
    "vq-cos8": lambda dim: _vq(dim, **VQ_RECIPE, threshold_ema_dead_code=0.05),
    "vq-cos8-dead2": lambda dim: _vq(dim, **VQ_RECIPE, threshold_ema_dead_code=2),
    "vq-kmeans-dead": lambda dim: _vq(dim, codebook_size=1024, kmeans_init=True, decay=0.8, commitment_weight=1.0,
                                      threshold_ema_dead_code=0.05),
    "fsq": _fsq([8, 5, 5, 5]),
    "lfq-10": _lfq(10),
    "lfq-14": _lfq(14),
}


@contextlib.contextmanager
def use_peer(name: str) -> Iterator[None]:
    """While open, every ``VQModel`` built gets the peer quantizer ``name`` on its latent width (the width
    its config's quantizer would have, e.g. 4 channels for a kind 'fsq' config with four levels)."""
    original = stage1_vq.model.build_quantizer

    def build(_cfg: QuantizerConfig, dim: int) -> PeerQuantizer:
        return PEERS[name](dim)

    stage1_vq.model.build_quantizer = build  # type: ignore[assignment]
    try:
        yield
    finally:
        stage1_vq.model.build_quantizer = original
