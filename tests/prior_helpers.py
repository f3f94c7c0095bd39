"""Small builders shared by the prior's test files."""

import torch

from stage2_prior import GPT, GPTConfig


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    """A tiny prior with a random (not zero) output head, so that logits depend on the input."""
    torch.manual_seed(seed)
    kwargs = dict(codebook_size=16, grid_size=[3, 4], num_classes=3)
    kwargs.update(overrides)
    model = GPT(GPTConfig.from_preset("tiny", **kwargs)).eval()
    torch.nn.init.normal_(model.output.weight, std=0.5)
    return model


def seeded(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
