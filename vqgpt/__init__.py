"""vqgpt: VQ tokenizers (stage 1) and GPT priors (stage 2) for autoregressive image generation.

Public names are re-exported lazily (PEP 562) so that importing a stage package first never
cycles through this module.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "VQModel": ("stage1_vq", "VQModel"),
    "VQModelConfig": ("stage1_vq", "VQModelConfig"),
    "GPT": ("stage2_prior", "GPT"),
    "GPTConfig": ("stage2_prior", "GPTConfig"),
    "generate": ("stage2_prior", "generate"),
    "SamplingConfig": ("stage2_prior", "SamplingConfig"),
    "VQGPTPipeline": ("vqgpt.workflow.pipeline", "VQGPTPipeline"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'vqgpt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
