"""PatchGAN discriminator (pix2pix / taming ``NLayerDiscriminator`` layout: one ``main`` Sequential)."""

from __future__ import annotations

import torch
import torch.nn as nn

DISC_NORMS = ("batch", "group", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels), channels)
    if kind == "none":
        return nn.Identity()  # keeps the layer indices (and so the state-dict keys) of the other norms
    raise ValueError(f"discriminator norm must be one of {list(DISC_NORMS)}, got {kind!r}")


def init_weights(module: nn.Module) -> None:
    """N(0, 0.02) conv weights; norm scales N(1, 0.02) and zero shifts (DCGAN / taming init)."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def min_resolution(n_layers: int) -> int:
    """The smallest square image ``PatchDiscriminator(n_layers=n_layers)`` takes: its stride-2 convs halve the side
    ``n_layers`` times and the last two (kernel 4, padding 1) take one each, and a kernel-4 conv needs an
    input side of at least 2; so the side after the halvings must be at least 3."""
    return 3 * 2**n_layers


class PatchDiscriminator(nn.Module):
    """Images (B, C, H, W) -> patch logits (B, 1, H', W'); each logit sees a local receptive field.

    ``n_layers`` stride-2 convs (the last of them stride 1) widen from ``channels`` to at most
    8x``channels``. With ``norm='batch'`` (taming's default) under DDP, convert it with
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` or use ``'group'`` for rank-independent statistics.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"discriminator n_layers must be >= 1, got {n_layers}")
        _norm(norm, channels)  # validates `norm` before building anything
        use_bias = norm != "batch"  # BatchNorm's shift makes a conv bias redundant
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride=stride, padding=1, bias=use_bias),
                _norm(norm, channels * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)  # (B, 1, H', W')
