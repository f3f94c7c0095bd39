"""Stage-1 losses as plain functions: reconstruction + perceptual + adaptive-weighted GAN + quantizer.

The training loop calls ``generator_loss`` on the tokenizer step and ``discriminator_loss`` on
the discriminator step; nothing here holds optimizers or switches on an optimizer index.
"""

from __future__ import annotations

import math
import sys
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from stage1_vq.discriminator import DISC_NORMS, PatchDiscriminator
from vqgpt.ground.checkpoint import torch_load_reason
from vqgpt.ground.config import ConfigError, changed_keys, opt

RECONSTRUCTION_LOSSES = ("l1", "l2")
PERCEPTUAL_KINDS = ("lpips-vgg", "lpips-random", "stlpips", "none")
GAN_LOSSES = ("hinge", "non-saturating")


@dataclass
class LossConfig:
    """Weights and kinds of the stage-1 training losses."""

    reconstruction: str = opt("l1", "pixel loss: 'l1' or 'l2'")
    perceptual_weight: float = opt(1.0, "weight of the perceptual loss (0 = off)")
    perceptual: str = opt("lpips-vgg", "perceptual network: 'lpips-vgg' (standard LPIPS; downloads the VGG16 "
                                       "backbone unless perceptual_weights_path is set), 'lpips-random' (random "
                                       "VGG backbone: tests/offline smoke runs), 'stlpips' (shift-tolerant LPIPS, "
                                       "trained weights ship with `pip install \"vqgpt[stlpips]\"`), 'none'")
    perceptual_weights_path: str | None = opt(None, "local weights for 'lpips-vgg' (a torchvision vgg16 or a full "
                                                    "LPIPS state dict, .pth or .safetensors) or 'stlpips'")
    gan_weight: float = opt(0.1, "weight of the generator's adversarial loss (0 = no GAN)")
    gan_loss: str = opt("hinge", "adversarial loss: 'hinge' or 'non-saturating'")
    adaptive_gan_weight: bool = opt(True, "scale the GAN loss by ||grad nll|| / ||grad gan|| at the decoder's last "
                                          "layer (VQGAN)")
    disc_start: int = opt(0, "step at which the adversarial loss starts")
    disc_layers: int = opt(3, "PatchGAN depth: strided conv layers after the first (taming's n_layers; the "
                              "network has disc_layers + 2 convolutions)")
    disc_channels: int = opt(64, "PatchGAN base width")
    disc_norm: str = opt("batch", "PatchGAN norm: 'batch' (taming), 'group' or 'none'")
    codebook_weight: float = opt(1.0, "weight of the quantizer loss")

    def ignored_keys(self) -> list[str]:
        """Keys set away from their defaults that these settings do not read: a weights file for a perceptual
        loss that loads none (or none at all), the discriminator's options without a GAN. A user who sets
        them expects an effect they do not have (a VGG file beside 'lpips-random' trained on random VGG)."""
        off = []
        if self.perceptual in ("lpips-random", "none") or self.perceptual_weight == 0:
            off.append("perceptual_weights_path")
        if self.gan_weight == 0:
            off += ["gan_loss", "adaptive_gan_weight", "disc_start", "disc_layers", "disc_channels", "disc_norm"]
        return changed_keys(self, off)

    def __post_init__(self) -> None:
        choices = {"reconstruction": RECONSTRUCTION_LOSSES, "perceptual": PERCEPTUAL_KINDS,
                   "gan_loss": GAN_LOSSES, "disc_norm": DISC_NORMS}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ConfigError(f"{name}: must be one of {list(valid)}, got {getattr(self, name)!r}")
        for name in ("disc_layers", "disc_channels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.disc_start < 0:  # was read as 0 without a word
            raise ConfigError(f"disc_start: must be >= 0 (the step the adversarial loss starts at), got {self.disc_start}")
        for name in ("perceptual_weight", "gan_weight", "codebook_weight"):
            # a negative weight would train the model to increase that loss; NaN or inf poisons every step
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"loss.{name}: must be a finite number >= 0, got {value}")


class GeneratorLoss(NamedTuple):
    """Scalars of one tokenizer step; ``total`` is what gets backpropagated, the rest are parts for logs.
    ``gan_weight`` is the effective factor applied to ``gan`` (0 before disc_start or without a GAN)."""

    total: torch.Tensor
    reconstruction: torch.Tensor
    perceptual: torch.Tensor
    gan: torch.Tensor
    quantizer: torch.Tensor
    gan_weight: torch.Tensor


# ----------------------------------------------------------------------------- perceptual


class PerceptualLoss(nn.Module):
    """A frozen perceptual distance: (x, y) images (B, 3, H, W) in [-1, 1] -> distances (B,).

    Stays in eval mode (its dropout off) even when a parent module is put in train mode.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "PerceptualLoss":
        super().train(False)
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(x.contiguous(), y.contiguous()).reshape(x.shape[0], -1).mean(1)  # (B,)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    key = "loss.perceptual_weights_path"
    if path.is_dir():
        raise IsADirectoryError(f"{key}: {path} is a folder: give the weights file (.pth or .safetensors)")
    if not path.is_file():
        raise FileNotFoundError(f"{key}: {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # a text file gave KeyError, random bytes SafetensorError: torch's own words
        said = torch_load_reason(str(exc))  # (without its advice to load the file with weights_only=False)
        raise ConfigError(f"{key}: {path} cannot be read as weights ({type(exc).__name__}: {said[:200]}): give "
                          f"torchvision vgg16 weights or an LPIPS-VGG state dict (.pth or .safetensors)") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{key}: {path} holds no state dict")
    return state


def _load_local_lpips(path: Path) -> nn.Module:
    """LPIPS-VGG whose backbone (and maybe linear heads) come from a local file, not a download."""
    import lpips

    model = lpips.LPIPS(pretrained=True, net="vgg", pnet_rand=True, verbose=False)
    state = _read_state_dict(path)
    own = model.state_dict()
    if any(k.startswith("features.") for k in state):
        # torchvision vgg16: `features.{i}.*` lives at `net.slice{s}.{i}.*` in LPIPS.
        mapped = {}
        for key in own:
            if key.startswith("net."):
                source = "features." + key.split(".", 2)[2]
                if source not in state:
                    raise ValueError(f"{path}: torchvision vgg16 weights lack {source!r}")
                mapped[key] = state[source]
        model.load_state_dict({**own, **mapped}, strict=True)
    elif any(k.startswith("net.slice") for k in state):
        # Full LPIPS state dict (lpips package or taming's vgg_lpips): `lins.*` alias `lin*` and
        # the scaling buffers are constants, so either may be absent.
        optional = {k for k in own if k.startswith(("lins.", "scaling_layer."))}
        unknown = sorted(set(state) - set(own))
        missing = sorted(set(own) - set(state) - optional)
        if unknown or missing:
            raise ValueError(f"{path}: not an LPIPS-VGG state dict (unknown keys {unknown[:5]}, missing {missing[:5]})")
        model.load_state_dict({**own, **state}, strict=True)
    else:
        raise ValueError(f"{path}: expected torchvision vgg16 weights (features.*) or an LPIPS-VGG state dict "
                         f"(net.slice*, lin*), found keys like {sorted(state)[:5]}")
    return model


def _import_stlpips():
    """Import stlpips_pytorch, which imports IPython (for a debugging hook) without declaring it."""
    stubbed = False
    try:
        import IPython  # noqa: F401
    except ImportError:
        stub = types.ModuleType("IPython")
        stub.embed = lambda *args, **kwargs: None  # type: ignore[attr-defined]
        sys.modules["IPython"] = stub
        stubbed = True
    try:
        from stlpips_pytorch import stlpips
    except ImportError as exc:
        raise ConfigError(f"loss.perceptual=stlpips needs the stlpips-pytorch package ({exc}): "
                          "pip install \"vqgpt[stlpips]\"") from exc
    finally:
        if stubbed:
            del sys.modules["IPython"]  # nobody else should mistake the stub for IPython
    return stlpips


def build_perceptual(cfg: LossConfig) -> PerceptualLoss | None:
    """The frozen perceptual network that ``cfg`` names, or None when it is off."""
    with warnings.catch_warnings():
        # lpips / stlpips call torchvision with the deprecated `pretrained=` argument.
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        return _build_perceptual(cfg)


def _build_perceptual(cfg: LossConfig) -> PerceptualLoss | None:
    if cfg.perceptual == "none" or cfg.perceptual_weight == 0:
        return None
    if cfg.perceptual == "stlpips":
        stlpips = _import_stlpips()
        net = stlpips.LPIPS(net="vgg", variant="shift_tolerant", model_path=cfg.perceptual_weights_path, verbose=False)
        return PerceptualLoss(net)
    import lpips

    if cfg.perceptual == "lpips-random":
        # Trained linear heads ship inside the lpips package; only the backbone is random.
        return PerceptualLoss(lpips.LPIPS(pretrained=True, net="vgg", pnet_rand=True, verbose=False))
    if cfg.perceptual_weights_path:
        return PerceptualLoss(_load_local_lpips(Path(cfg.perceptual_weights_path)))
    try:
        net = lpips.LPIPS(net="vgg", verbose=False)  # torchvision downloads the ImageNet VGG16
    except Exception as exc:  # network errors come in many types: a config to change, so one line, not a traceback
        raise ConfigError(f"loss.perceptual 'lpips-vgg' could not load the VGG16 backbone ({exc}). Offline, set "
                           "loss.perceptual_weights_path to a local vgg16/LPIPS file, or use 'stlpips' "
                           "(trained, installs from PyPI) or 'lpips-random' (smoke tests only)") from exc
    return PerceptualLoss(net)


def build_discriminator(cfg: LossConfig, in_channels: int = 3) -> PatchDiscriminator:
    """The PatchGAN discriminator that ``cfg`` describes."""
    return PatchDiscriminator(in_channels, cfg.disc_channels, cfg.disc_layers, cfg.disc_norm)


# ----------------------------------------------------------------------------- losses


def adaptive_weight(nll_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer_weight: torch.Tensor) -> torch.Tensor:
    """||d nll / d W|| / ||d gan / d W|| at the decoder's last layer W, clamped to [0, 1e4], detached.

    Returns 0 where no gradient exists (under no_grad, or losses not attached to a graph).
    """
    if not (torch.is_grad_enabled() and nll_loss.requires_grad and gan_loss.requires_grad):
        return torch.zeros((), device=nll_loss.device)
    try:
        nll_grad, = torch.autograd.grad(nll_loss, last_layer_weight, retain_graph=True)
        gan_grad, = torch.autograd.grad(gan_loss, last_layer_weight, retain_graph=True)
    except RuntimeError as exc:
        if "not have been used in the graph" in str(exc):
            raise ValueError("last_layer_weight is not in the graph of the losses: pass model.last_layer_weight "
                             "of the model that produced the reconstruction") from exc
        raise
    weight = nll_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(0.0, 1e4).detach()


def _generator_adversarial(logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "hinge":
        return -logits_fake.mean()
    return F.softplus(-logits_fake).mean()  # non-saturating: -log sigmoid(D(G(z)))


def generator_loss(images: torch.Tensor, reconstruction: torch.Tensor, quantizer_loss: torch.Tensor,
                   logits_fake: torch.Tensor | None, perceptual: nn.Module | None, cfg: LossConfig,
                   step: int, last_layer_weight: torch.Tensor) -> GeneratorLoss:
    """Tokenizer loss of images / reconstruction (B, 3, H, W); logits_fake = D(reconstruction) or None."""
    diff = reconstruction.float() - images.float()
    rec = diff.abs().mean() if cfg.reconstruction == "l1" else diff.pow(2).mean()
    zero = torch.zeros((), device=images.device)
    if perceptual is not None and cfg.perceptual_weight > 0:
        perc = perceptual(images, reconstruction).float().mean()
    else:
        perc = zero
    nll = rec + cfg.perceptual_weight * perc

    gan = _generator_adversarial(logits_fake.float(), cfg.gan_loss) if logits_fake is not None else zero
    gan_weight = zero
    if logits_fake is not None and cfg.gan_weight > 0 and step >= cfg.disc_start:
        scale = adaptive_weight(nll, gan, last_layer_weight) if cfg.adaptive_gan_weight else torch.ones_like(zero)
        gan_weight = cfg.gan_weight * scale
    total = nll + gan_weight * gan + cfg.codebook_weight * quantizer_loss
    return GeneratorLoss(total, rec.detach(), perc.detach(), gan.detach(), quantizer_loss.detach(), gan_weight)


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Discriminator loss from patch logits of real images and (detached) reconstructions."""
    real, fake = logits_real.float(), logits_fake.float()
    if cfg.gan_loss == "hinge":
        return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
