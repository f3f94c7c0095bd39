"""Convolutional encoder/decoder building blocks of the VQGAN family.

Module structure and attribute names follow taming-transformers' ``Encoder``/``Decoder``
(``down[i].block[j]``, ``mid.attn_1``, ``up[i].upsample.conv`` ...) so that their checkpoints
load by ``state_dict`` without renaming. LlamaGen's VQ uses the same math under other names
(``conv_blocks[k].res[j]``, ``mid.0``, its decoder levels listed lowest resolution first);
see ``VQModelConfig`` for how its options map onto ours.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from stage1_vq.norm_silu import kernels, norm_silu
from vqgpt.training.config import cpu_has_fast_bf16


# The layout the conv encoder and decoder run in, chosen per device and dtype, not inherited. Before it
# was chosen the decoder's layout was an accident of the code path (training handed it the quantizer's
# permuted, channels-last view; decoding from indices a contiguous NCHW tensor). Measured with
# benchmarks/train_speed.py's tokenizer training step (2 CPU cores), both conv stacks in each layout:
# - a CPU without bf16 units (AVX2): fp32 the same in either layout (within 5%), bf16 autocast 2.2x
#   faster channels-last (GroupNorm and conv in emulated bf16 are slow NCHW there);
# - a CPU with bf16 units (AVX512-BF16): fp32 1.03-1.1x faster channels-last than NCHW, bf16 autocast
#   1.1x faster NCHW, because channels-last GroupNorm's backward in bf16 took 5x its forward;
# - a CPU with AMX (Intel Xeon, 2 threads): oneDNN's bf16 convolutions 1.4x faster channels-last (NCHW
#   makes them reorder each input), and with the norm and SiLU of the residual blocks fused into one
#   kernel (stage1_vq.norm_silu), where torch's channels-last bf16 GroupNorm was the slow part, the bf16
#   step is faster channels-last: 15.6 against 11.7 images/s NCHW at batch 16 (1.33x; torch's two ops
#   channels-last 11.2), and fp32 7.3 against 6.6 (1.11x). So bf16 runs channels-last wherever that
#   kernel builds, and NCHW on a CPU with bf16 units where it does not (the AVX512-BF16 CPU above was
#   measured before the kernel existed);
# - CUDA: channels-last, the tensor-core layout.
# Float results do not depend on the layout beyond rounding (tests/test_layout.py).
CONV_MEMORY_FORMAT: torch.memory_format | None = None  # None: conv_memory_format chooses; else forced


_FAST_BF16_CPU: list[bool] = []  # cpu_has_fast_bf16(), measured once per process


@torch.compiler.assume_constant_result  # a compiled training step takes the answer as a constant
def _fast_bf16_cpu() -> bool:
    if not _FAST_BF16_CPU:
        _FAST_BF16_CPU.append(cpu_has_fast_bf16())
    return _FAST_BF16_CPU[0]


@torch.compiler.assume_constant_result
def _fused_bf16_norm() -> bool:
    """Whether the fused norm + SiLU kernel of bf16 channels-last maps builds here (stage1_vq.norm_silu)."""
    return kernels(torch.bfloat16) is not None


def conv_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout the conv encoder and decoder run on ``x`` in (see above): NCHW for bf16 (autocast or
    bf16 tensors) on a CPU with bf16 units where the fused norm kernel does not build, channels-last
    otherwise; ``CONV_MEMORY_FORMAT`` overrides."""
    if CONV_MEMORY_FORMAT is not None:
        return CONV_MEMORY_FORMAT
    device = x.device.type
    bf16 = x.dtype == torch.bfloat16 or (
        torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16)
    if device == "cpu" and bf16 and _fast_bf16_cpu() and not _fused_bf16_norm():
        return torch.contiguous_format
    return torch.channels_last


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm as used throughout VQGAN (eps 1e-6, affine)."""
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, conv3x3) x 2, 1x1 shortcut if widths differ."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, norm_groups: int = 32):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, in_channels, H, W) -> (B, out_channels, H, W)
        h = self.conv1(norm_silu(self.norm1, x))
        h = self.conv2(self.dropout(norm_silu(self.norm2, h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections and a residual connection."""

    def __init__(self, channels: int, norm_groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, norm_groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x_norm = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head over all positions; SDPA's default
        # scale 1/sqrt(C) is the scale of the taming/LlamaGen attention.
        q, k, v = (proj(x_norm).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv after asymmetric zero padding (right/bottom)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Padding only right/bottom keeps output pixel (i, j) aligned with input (2i, 2j).
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour interpolation then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """Images (B, in_channels, H, W) -> latents (B, z_channels, H/f, W/f), f = 2**(len(channel_mult)-1)."""

    def __init__(self, in_channels: int, channels: int, channel_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], resolution: int, z_channels: int,
                 dropout: float = 0.0, norm_groups: int = 32):
        super().__init__()
        self.num_levels = len(channel_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, channels, kernel_size=3, padding=1)

        # Attention placement is decided by the nominal `resolution`, not the input size, so one
        # model accepts any image size that the downsampling factor divides.
        current_res = resolution
        in_mult = (1, *channel_mult)
        self.down = nn.ModuleList()
        block_in = channels
        for level, mult in enumerate(channel_mult):
            block_in = channels * in_mult[level]
            block_out = channels * mult
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, dropout, norm_groups))
                block_in = block_out
                if current_res in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in, norm_groups))
            if level != self.num_levels - 1:
                stage.downsample = Downsample(block_in)
                current_res //= 2
            self.down.append(stage)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout, norm_groups)
        self.mid.attn_1 = AttnBlock(block_in, norm_groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout, norm_groups)

        self.norm_out = group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, z_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, channels, H, W)
        for level, stage in enumerate(self.down):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if level != self.num_levels - 1:
                h = stage.downsample(h)  # (B, C_level, H/2**(level+1), W/2**(level+1))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(norm_silu(self.norm_out, h))  # (B, z_channels, H/f, W/f)


class Decoder(nn.Module):
    """Latents (B, z_channels, h, w) -> images (B, out_channels, h*f, w*f); mirror of `Encoder`."""

    def __init__(self, out_channels: int, channels: int, channel_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], resolution: int, z_channels: int,
                 dropout: float = 0.0, norm_groups: int = 32):
        super().__init__()
        self.num_levels = len(channel_mult)
        self.num_res_blocks = num_res_blocks
        block_in = channels * channel_mult[-1]
        current_res = resolution // 2 ** (self.num_levels - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, padding=1)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout, norm_groups)
        self.mid.attn_1 = AttnBlock(block_in, norm_groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout, norm_groups)

        # Built lowest resolution first, stored so that up[level] is the level at 2**level
        # downsampling (taming's order); forward walks it from the top level down.
        stages: list[nn.Module] = []
        for level in reversed(range(self.num_levels)):
            block_out = channels * channel_mult[level]
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, block_out, dropout, norm_groups))
                block_in = block_out
                if current_res in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in, norm_groups))
            if level != 0:
                stage.upsample = Upsample(block_in)
                current_res *= 2
            stages.append(stage)
        self.up = nn.ModuleList(reversed(stages))

        self.norm_out = group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)  # (B, channels * channel_mult[-1], h, w)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(range(self.num_levels)):
            stage = self.up[level]
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if level != 0:
                h = stage.upsample(h)  # spatial size x2
        return self.conv_out(norm_silu(self.norm_out, h))  # (B, out_channels, h*f, w*f)
