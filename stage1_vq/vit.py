"""ViT encoder/decoder of the tokenizer (ViT-VQGAN style): patchify, transformer blocks, unpatchify.

One token per patch, so the code grid is (H/p, W/p) for patch size p. The blocks are timm's
``vision_transformer.Block`` (pre-norm attention + MLP, fused scaled-dot-product attention).
Positions are learned for the configured grid and resampled (bicubic) for other image sizes, so a
tokenizer trained at 256 pixels still encodes and decodes larger images, as the conv one does.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block, init_weights_vit_timm


def _position_embedding(pos_embed: nn.Parameter, grid: int, h: int, w: int) -> torch.Tensor:
    """Learned positions (1, grid*grid, dim) for an (h, w) token grid -> (1, h*w, dim)."""
    if (h, w) == (grid, grid):
        return pos_embed
    return resample_abs_pos_embed(pos_embed, new_size=[h, w], old_size=[grid, grid], num_prefix_tokens=0)


def _blocks(dim: int, depth: int, heads: int, mlp_ratio: float) -> nn.Sequential:
    return nn.Sequential(*[Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth)])


class ViTEncoder(nn.Module):
    """Images (B, C, H, W) -> latents (B, z_channels, H/p, W/p)."""

    def __init__(self, in_channels: int, patch_size: int, dim: int, depth: int, heads: int, mlp_ratio: float,
                 z_channels: int, grid: int):
        super().__init__()
        self.grid = grid
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, dim))
        self.blocks = _blocks(dim, depth, heads, mlp_ratio)
        self.norm = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, z_channels)
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(init_weights_vit_timm)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)  # (B, dim, h, w)
        b, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2) + _position_embedding(self.pos_embed, self.grid, h, w)  # (B, h*w, dim)
        x = self.proj_out(self.norm(self.blocks(x)))  # (B, h*w, z)
        return x.transpose(1, 2).reshape(b, -1, h, w)


class ViTDecoder(nn.Module):
    """Latents (B, z_channels, h, w) -> images (B, C, h*p, w*p)."""

    def __init__(self, out_channels: int, patch_size: int, dim: int, depth: int, heads: int, mlp_ratio: float,
                 z_channels: int, grid: int):
        super().__init__()
        self.grid = grid
        self.patch_size = patch_size
        self.proj_in = nn.Linear(z_channels, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, dim))
        self.blocks = _blocks(dim, depth, heads, mlp_ratio)
        self.norm = nn.LayerNorm(dim)
        self.to_pixels = nn.Linear(dim, out_channels * patch_size * patch_size)
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(init_weights_vit_timm)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, _, h, w = z.shape
        x = self.proj_in(z.flatten(2).transpose(1, 2)) + _position_embedding(self.pos_embed, self.grid, h, w)
        x = self.to_pixels(self.norm(self.blocks(x)))  # (B, h*w, C*p*p)
        # pixel_shuffle expects channel c*p*p + i*p + j for pixel (i, j) of channel c
        return F.pixel_shuffle(x.transpose(1, 2).reshape(b, -1, h, w), self.patch_size)  # (B, C, h*p, w*p)
