"""Stage 1: the VQ tokenizer (images <-> integer code grids), its quantizers, discriminator and losses."""

from stage1_vq.discriminator import PatchDiscriminator
from stage1_vq.losses import (
    GeneratorLoss,
    LossConfig,
    PerceptualLoss,
    adaptive_weight,
    build_discriminator,
    build_perceptual,
    discriminator_loss,
    generator_loss,
)
from stage1_vq.model import VQModel, VQModelConfig, VQOutput
from stage1_vq.quantizers import FSQ, LFQ, QuantizerConfig, QuantizerOutput, ResidualVQ, VectorQuantizer, build_quantizer

__all__ = [
    "FSQ",
    "GeneratorLoss",
    "LFQ",
    "LossConfig",
    "PatchDiscriminator",
    "PerceptualLoss",
    "QuantizerConfig",
    "QuantizerOutput",
    "ResidualVQ",
    "VQModel",
    "VQModelConfig",
    "VQOutput",
    "VectorQuantizer",
    "adaptive_weight",
    "build_discriminator",
    "build_perceptual",
    "build_quantizer",
    "discriminator_loss",
    "generator_loss",
]
