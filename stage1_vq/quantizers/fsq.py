"""Finite scalar quantization: bounded channels rounded to a fixed grid of levels."""

from __future__ import annotations

import math

import torch

from stage1_vq.quantizers.common import BaseQuantizer, QuantizerOutput, all_reduce_sum_, code_counts

class FSQ(BaseQuantizer):
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
            counts = code_counts(indices, self.codebook_size)
            if self.training:
                all_reduce_sum_(counts)
            stats = self._step_usage_stats(counts)  # {} when deferred: see finish_step
            z_q = codes.view(b, h, w, self.codebook_dim).permute(0, 3, 1, 2)  # (B, D, h, w)
        return QuantizerOutput(z_q, indices.view(b, h, w), torch.zeros((), device=z.device), stats)
