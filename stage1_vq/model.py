"""VQModel: VQGAN-style tokenizer, images (B, 3, H, W) <-> code grids (B, h, w).

``architecture: conv`` (default) is the convolutional VQGAN encoder/decoder; ``architecture: vit``
swaps in ViT-VQGAN-style transformer ones (``stage1_vq/vit.py``); the quantizer is the same.
``architecture: pixels`` (Image GPT's pixel tokens, ``stage1_vq/palette.py``) has neither: each pixel
is one token, the index of its nearest colour in a fitted palette of ``quantizer.codebook_size`` colours.

State-dict keys follow taming-transformers' VQModel (``encoder.*``, ``decoder.*``, ``quant_conv``,
``post_quant_conv``, ``quantize.embedding.weight``). LlamaGen's VQ-16 is represented exactly by
``channel_mult=[1,1,2,2,4]``, ``attn_resolutions=[resolution // 16]`` (attention only at the
lowest level), ``quantizer.codebook_dim=8``, ``quantizer.l2_norm=true`` after renaming its keys
(``conv_blocks.k.res`` -> ``down.k.block``; decoder ``conv_blocks.k`` -> ``up.{L-1-k}``;
``mid.0/1/2`` -> ``mid.block_1/attn_1/block_2``; drop ``quantize.codebook_used``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

from stage1_vq.modules import Decoder, Encoder, conv_memory_format
from stage1_vq.palette import PaletteQuantizer
from stage1_vq.quantizers import Quantizer, QuantizerConfig, QuantizerOutput, build_quantizer
from stage1_vq.vit import ViTDecoder, ViTEncoder
from vqgpt.ground.checkpoint import (load_export, load_export_weights, push_to_hub, resolve_model_dir, save_export,
                                     usable_device)
from vqgpt.ground.config import ConfigError, changed_keys, check_number, opt

EXPORT_KIND = "vq_tokenizer"
_CONVERT = "(from uint8 0..255: x.float() / 127.5 - 1; from 0..1: x * 2 - 1)"
ARCHITECTURES = ("conv", "vit", "pixels")
# Quantizer options that learn or reshape a codebook: a fitted palette takes none of them.
_LEARNED_OPTIONS = ("l2_norm", "ema", "kmeans_init", "rotation_trick", "simvq")


@dataclass
class VQModelConfig:
    """Architecture of the VQ tokenizer."""

    architecture: str = opt("conv", "'conv' (VQGAN ResNet encoder/decoder), 'vit' (ViT-VQGAN: patches, "
                                    "transformer blocks; uses patch_size and the vit_* keys, not the conv ones) or "
                                    "'pixels' (Image GPT: no encoder/decoder, one token per pixel, the nearest of "
                                    "quantizer.codebook_size palette colours fitted by k-means (the palette section); "
                                    "quantizer.kind stays 'vq' without its learning options; uses only in_channels, "
                                    "resolution and quantizer.codebook_size)")
    in_channels: int = opt(3, "image channels fed to the encoder")
    out_channels: int = opt(3, "image channels produced by the decoder")
    channels: int = opt(128, "conv: base width of the encoder/decoder (multiplied by channel_mult per level)")
    channel_mult: list[int] = opt([1, 1, 2, 2, 4], "conv: width multiplier per level; len-1 stride-2 steps "
                                                   "give the downsampling factor 2**(len-1)")
    num_res_blocks: int = opt(2, "conv: residual blocks per encoder level (the decoder has one more)")
    attn_resolutions: list[int] = opt([16], "conv: feature-map sizes (counted from `resolution`) that get "
                                            "self-attention after each residual block")
    resolution: int = opt(256, "nominal image size (conv: places attention; vit: sets the learned positions); "
                               "any multiple of the downsampling factor can be encoded")
    z_channels: int = opt(256, "channels of the encoder output / decoder input")
    dropout: float = opt(0.0, "conv: dropout inside residual blocks")
    norm_groups: int = opt(32, "conv: GroupNorm groups; every level width must be divisible by it")
    patch_size: int = opt(8, "vit: pixels per patch side, the downsampling factor")
    vit_dim: int = opt(512, "vit: transformer width")
    vit_depth: int = opt(8, "vit: transformer blocks in the encoder and in the decoder")
    vit_heads: int = opt(8, "vit: attention heads")
    vit_mlp_ratio: float = opt(4.0, "vit: MLP hidden width / vit_dim")
    quantizer: QuantizerConfig = opt(QuantizerConfig, "how latents become codes")

    def __post_init__(self) -> None:
        if isinstance(self.quantizer, dict):  # built by hand rather than by the config loader
            self.quantizer = QuantizerConfig(**self.quantizer)
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {list(ARCHITECTURES)}, got {self.architecture!r}")
        if self.z_channels < 1:
            raise ValueError(f"z_channels must be positive, got {self.z_channels}")
        if self.resolution < 1:  # a resolution-0 tokenizer would train and export
            raise ConfigError(f"resolution: must be >= 1, got {self.resolution}")
        check_number("dropout", self.dropout, 0, 1, high_open=True)
        if not math.isfinite(self.vit_mlp_ratio):  # whatever the architecture; vit checks its range
            check_number("vit_mlp_ratio", self.vit_mlp_ratio, 0, low_open=True)
        if self.architecture == "vit":
            self._check_vit()
        elif self.architecture == "pixels":
            self._check_pixels()
        else:
            self._check_conv()

    def ignored_keys(self) -> list[str]:
        """The keys set away from their defaults that this architecture does not read (a conv tokenizer's
        patch_size, a ViT's channel_mult): a user who sets them expects an effect they do not have."""
        conv = ["channels", "channel_mult", "num_res_blocks", "attn_resolutions", "dropout", "norm_groups"]
        vit = ["patch_size", "vit_dim", "vit_depth", "vit_heads", "vit_mlp_ratio"]
        unread = {"conv": vit, "vit": conv, "pixels": conv + vit + ["z_channels"]}[self.architecture]
        return changed_keys(self, unread)

    def _check_pixels(self) -> None:
        q = self.quantizer
        if self.in_channels != self.out_channels:
            raise ValueError(f"architecture 'pixels' decodes the pixels it encodes: out_channels ({self.out_channels}) "
                             f"must equal in_channels ({self.in_channels})")
        if q.kind != "vq":
            raise ValueError(f"architecture 'pixels' quantizes with a fitted colour palette: quantizer.kind must be "
                             f"'vq' (the palette's size is quantizer.codebook_size), got {q.kind!r}")
        learned = [name for name in _LEARNED_OPTIONS if getattr(q, name)]
        learned += [name for name in ("restart_threshold", "entropy_weight") if getattr(q, name) != 0]
        if learned:
            raise ValueError(f"architecture 'pixels': the palette is fitted by k-means, not trained; remove "
                             f"quantizer.{', quantizer.'.join(learned)}")
        if q.codebook_dim not in (None, self.in_channels):
            raise ValueError(f"architecture 'pixels': quantizer.codebook_dim must be null or in_channels "
                             f"({self.in_channels}), the colours' channels; got {q.codebook_dim}")

    def _check_vit(self) -> None:
        if self.patch_size < 1 or self.vit_dim < 1 or self.vit_depth < 1 or self.vit_heads < 1:
            raise ValueError(f"patch_size, vit_dim, vit_depth and vit_heads must be positive, got {self.patch_size}, "
                             f"{self.vit_dim}, {self.vit_depth}, {self.vit_heads}")
        if self.vit_dim % self.vit_heads:
            raise ValueError(f"vit_dim={self.vit_dim} must be divisible by vit_heads={self.vit_heads}")
        check_number("vit_mlp_ratio", self.vit_mlp_ratio, 0, low_open=True)
        if int(self.vit_dim * self.vit_mlp_ratio) < 1:
            raise ConfigError(f"vit_mlp_ratio: leaves the MLP no hidden unit at vit_dim={self.vit_dim}, "
                              f"got {self.vit_mlp_ratio}")
        if self.resolution % self.patch_size:
            raise ValueError(f"resolution {self.resolution} must be a multiple of patch_size {self.patch_size}")

    def _check_conv(self) -> None:
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult must be a non-empty list of positive integers, got {self.channel_mult}")
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if self.channels < 1:
            raise ValueError(f"channels must be positive, got {self.channels}")
        if self.norm_groups < 1:
            raise ConfigError(f"norm_groups: must be >= 1, got {self.norm_groups}")
        widths = sorted({self.channels * m for m in self.channel_mult} | {self.channels})
        bad = [w for w in widths if w % self.norm_groups]
        if bad:
            raise ValueError(f"channels={self.channels} with channel_mult={self.channel_mult} gives widths {bad} "
                             f"not divisible by norm_groups={self.norm_groups}")
        if self.resolution % self.downsample_factor:
            raise ValueError(f"resolution {self.resolution} must be a multiple of the downsampling factor "
                             f"{self.downsample_factor}")
        sizes = self.feature_sizes()
        unused = [r for r in self.attn_resolutions if r not in sizes]
        if unused:
            raise ValueError(f"attn_resolutions {unused} match no feature-map size; with resolution "
                             f"{self.resolution} the sizes are {sizes}")

    @property
    def downsample_factor(self) -> int:
        if self.architecture == "pixels":
            return 1
        if self.architecture == "vit":
            return self.patch_size
        return 2 ** (len(self.channel_mult) - 1)

    def feature_sizes(self) -> list[int]:
        """Feature-map sizes per level, counted from `resolution` (largest first)."""
        return [self.resolution // 2**level for level in range(len(self.channel_mult))]


class VQOutput(NamedTuple):
    """reconstruction (B, 3, H, W); quantizer: the quantizer's output (z_q, indices, loss, stats)."""

    reconstruction: torch.Tensor
    quantizer: QuantizerOutput


class VQModel(nn.Module):
    """Encoder -> quant_conv -> quantize -> post_quant_conv -> decoder; images in [-1, 1].

    ``architecture: pixels`` keeps only ``quantize``, a frozen colour palette (``PaletteQuantizer``).
    """

    def __init__(self, config: VQModelConfig):
        super().__init__()
        self.config = config
        if config.architecture == "pixels":
            # Calling `model.quantize(z)` runs the quantizer, as for the other architectures.
            self.quantize: Quantizer | PaletteQuantizer = PaletteQuantizer(
                config.quantizer.codebook_size, config.in_channels, usage_window=config.quantizer.usage_window)
            return
        latent_dim = config.quantizer.latent_dim(config.z_channels)
        self.encoder: Encoder | ViTEncoder
        self.decoder: Decoder | ViTDecoder
        if config.architecture == "vit":
            arch = dict(patch_size=config.patch_size, dim=config.vit_dim, depth=config.vit_depth,
                        heads=config.vit_heads, mlp_ratio=config.vit_mlp_ratio, z_channels=config.z_channels,
                        grid=config.resolution // config.patch_size)
            self.encoder = ViTEncoder(in_channels=config.in_channels, **arch)
            self.decoder = ViTDecoder(out_channels=config.out_channels, **arch)
        else:
            arch = dict(channels=config.channels, channel_mult=config.channel_mult,
                        num_res_blocks=config.num_res_blocks, attn_resolutions=config.attn_resolutions,
                        resolution=config.resolution, z_channels=config.z_channels, dropout=config.dropout,
                        norm_groups=config.norm_groups)
            self.encoder = Encoder(in_channels=config.in_channels, **arch)
            self.decoder = Decoder(out_channels=config.out_channels, **arch)
        self.quant_conv = nn.Conv2d(config.z_channels, latent_dim, kernel_size=1)
        # Calling `model.quantize(z)` runs the quantizer: it is the submodule (taming's key name).
        self.quantize = build_quantizer(config.quantizer, latent_dim)
        self.post_quant_conv = nn.Conv2d(latent_dim, config.z_channels, kernel_size=1)

    # ------------------------------------------------------------------ properties

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def codebook_size(self) -> int:
        return self.quantize.codebook_size

    @property
    def codebook_dim(self) -> int:
        return self.quantize.codebook_dim

    @property
    def codes_per_position(self) -> int:
        """Codes per latent position, side by side in a row of the code grid (rvq: its depth D; else 1)."""
        return self.quantize.codes_per_position

    @property
    def last_layer_weight(self) -> torch.Tensor:
        """Weight of the decoder's final layer, for the adaptive GAN weight."""
        if self.config.architecture == "pixels":
            raise ValueError("architecture 'pixels' has no decoder to train: its palette is fitted by k-means")
        if isinstance(self.decoder, ViTDecoder):
            return self.decoder.to_pixels.weight
        return self.decoder.conv_out.weight

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        """Code-grid size (H/f, W/f * codes_per_position) of an image of size height x width; ValueError if f
        does not divide it."""
        f = self.downsample_factor
        if height % f or width % f or height < f or width < f:
            def near(n: int) -> str:
                lo, hi = max(f, n // f * f), max(f, -(-n // f) * f)
                return str(lo) if lo == hi else f"{lo} or {hi}"
            raise ValueError(f"image size {height}x{width} is not divisible by the downsampling factor {f}: "
                             f"height and width must be positive multiples of {f} (nearest valid: "
                             f"height {near(height)}, width {near(width)})")
        return height // f, width // f * self.codes_per_position

    def image_shape(self, rows: int, columns: int) -> tuple[int, int]:
        """Pixel size (H, W) that a code grid of rows x columns decodes to (the inverse of ``grid_shape``)."""
        if columns % self.codes_per_position:
            raise ValueError(f"a code grid of this tokenizer has {self.codes_per_position} codes per position side "
                             f"by side, so its width must be a multiple of {self.codes_per_position}, got {columns}")
        return rows * self.downsample_factor, columns // self.codes_per_position * self.downsample_factor

    # ------------------------------------------------------------------ pieces

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C_in, H, W) -> pre-quantization latents z (B, D, H/f, W/f) (after quant_conv)."""
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images (B, {self.config.in_channels}, H, W), got shape {tuple(images.shape)}")
        self.grid_shape(images.shape[-2], images.shape[-1])
        if self.config.architecture == "pixels":
            return images  # the latent of a pixel token is the pixel itself (f = 1)
        if isinstance(self.encoder, Encoder):  # conv: the layout chosen for this device and dtype
            images = images.contiguous(memory_format=conv_memory_format(images))
        return self.quant_conv(self.encoder(images))

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized latents (B, D, h, w) -> images (B, C_out, h*f, w*f)."""
        if self.config.architecture == "pixels":
            return z_q.clamp(-1, 1)  # palette colours are the pixels
        if isinstance(self.decoder, Decoder):  # conv: the layout chosen for this device and dtype, not inherited
            z_q = z_q.contiguous(memory_format=conv_memory_format(z_q))
        return self.decoder(self.post_quant_conv(z_q))

    def codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, h, w * codes_per_position) -> quantized latents z_q (B, D, h, w)."""
        if indices.ndim != 3 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise ValueError(f"expected integer indices (B, h, w), got {indices.dtype} of shape {tuple(indices.shape)}")
        if not indices.shape[1] or not indices.shape[2]:  # (a convolution's error, deep in torch, said it)
            raise ValueError(f"the code grid has no cells: indices of shape {tuple(indices.shape)} (B, h, w) need h "
                             "and w >= 1")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(f"indices must lie in [0, {self.codebook_size}), got range "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        return self.quantize.codes_from_indices(indices.long())

    # ------------------------------------------------------------------ public API

    def forward(self, images: torch.Tensor) -> VQOutput:
        """Images (B, 3, H, W) in [-1, 1] -> VQOutput(reconstruction (B, 3, H, W), quantizer output)."""
        z = self.encode_latents(images)  # (B, D, h, w)
        quantized = self.quantize(z)
        return VQOutput(self.decode_latents(quantized.z_q), quantized)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> code indices (B, H/f, W/f * codes_per_position) int64 (in eval
        mode it changes no state). Residual VQ puts a position's D codes side by side in its row
        (stage1_vq/quantizers/rvq.py). It runs in the module's mode: in train mode (as a training loop
        leaves it) dropout applies, draws from the global RNG and gives other codes each call; call
        ``.eval()`` first (the pipeline does)."""
        self._check_weights_float32()
        if not torch.is_tensor(images) or not images.is_floating_point():
            raise ValueError(f"expected float images in [-1, 1], got {getattr(images, 'dtype', type(images).__name__)} "
                             f"{_CONVERT}")
        if images.numel():
            lo, hi = (float(v) for v in torch.aminmax(images.detach()))
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError("the images hold NaN or inf values")
            if lo < -2 or hi > 2:  # far outside [-1, 1]: another scale, not a resize's overshoot
                raise ValueError(f"expected images in [-1, 1], got values {lo:.4g}..{hi:.4g} {_CONVERT}")
        return self.quantize.lookup(self.encode_latents(images.float()))

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, h, w * codes_per_position) -> images (B, 3, h*f, w*f), roughly in [-1, 1]; in the
        module's mode, as ``encode`` (dropout in train mode)."""
        self._check_weights_float32()
        if not torch.is_tensor(indices):
            raise ValueError(f"expected integer code indices (B, h, w) as a tensor, got {type(indices).__name__}")
        return self.decode_latents(self.codes_from_indices(indices))

    def _check_weights_float32(self) -> None:
        """encode / decode run in float32 (the codebook lookup is float32; autocast may lower the convs)."""
        other = sorted({str(p.dtype) for p in self.parameters() if p.dtype != torch.float32})
        if other:
            raise ValueError(f"this tokenizer's weights are {', '.join(other)}, but it encodes and decodes in float32 "
                             "(its codebook lookup is float32): call .float() on it (autocast lowers the convs)")

    # ------------------------------------------------------------------ export

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config.json + model.safetensors (kind 'vq_tokenizer') into ``directory``; float32 weights
        only (the tokenizer encodes and decodes in float32; a cast copy would lose their precision)."""
        self._check_weights_float32()
        return save_export(directory, EXPORT_KIND, self.config, self)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, map_location: str | torch.device = "cpu", *,
                        revision: str | None = None, subfolder: str | None = None) -> "VQModel":
        """Load an export (a folder, or a Hub id ``owner/name`` at ``revision``) strictly, in eval mode."""
        map_location = usable_device(map_location)
        directory = resolve_model_dir(name_or_path, revision=revision, subfolder=subfolder)
        config, state, _ = load_export(directory, EXPORT_KIND, VQModelConfig)
        with torch.random.fork_rng(devices=[]):  # the random init is overwritten: the caller's RNG stays as it was
            model = cls(config)
        load_export_weights(model, state, directory)
        if isinstance(model.quantize, PaletteQuantizer):  # a hand-edited palette: named here, not a silent encode
            model.quantize.check_palette(str(Path(directory) / "model.safetensors"))
        return model.to(map_location).eval()

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str | None = None) -> str:
        """Upload this tokenizer's export as Hub repository ``repo_id`` (created when missing); returns the commit URL."""
        return push_to_hub(self.save_pretrained, repo_id, private=private, token=token, commit_message=commit_message)
