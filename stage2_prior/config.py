"""Architecture of the stage-2 GPT prior: ``GPTConfig`` and LlamaGen's model sizes as presets.

A config of its own so that the layers (``stage2_prior.layers``) and the model
(``stage2_prior.model``) both build from it without importing each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from vqgpt.ground.config import ConfigError, opt
from vqgpt.ground.tokens import MAX_CODEBOOK_SIZE

# Architecture presets; LlamaGen's c2i sizes for GPT-B..XXL. Parameter counts (count_parameters)
# with LlamaGen's vocabulary 16384 and 1000 classes + null: GPT-B 110.9M, GPT-L 342.9M,
# GPT-XL 774.7M, GPT-XXL 1411.0M; unconditional with 1024 codes: GPT-B 86.5M, GPT-L 310.4M.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_head=2, dim=32, multiple_of=32),  # CPU tests
    "small": dict(n_layer=6, n_head=8, dim=256),  # CPU benchmarks (benchmarks/highres.py)
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),
}



def find_multiple(n: int, k: int) -> int:
    """n rounded up to a multiple of k."""
    return n if n % k == 0 else n + k - n % k


@dataclass
class GPTConfig:
    # Unset (null) = taken from the token shards by train-prior; a value set that disagrees with them is an error.
    codebook_size: int | None = opt(None, "vocabulary: number of codes of the tokenizer; null = the token shards' "
                                          "(a model needs it set)")
    grid_size: list[int] | None = opt(None, "(h, w) code grid the prior is trained on; null = the token shards' "
                                            "(a model needs it set)")
    num_classes: int | None = opt(None, "number of classes; 0 = unconditional (a learned start embedding is the "
                                        "prefix); null = the token shards' class count when `conditional` and "
                                        "above 1, else 0 (a model needs it set)")
    class_dropout: float = opt(0.1, "training probability of replacing a label by the null class (for CFG); "
                                    ">0 adds the null row")
    n_layer: int = opt(12, "transformer blocks")
    n_head: int = opt(12, "attention heads")
    n_kv_head: int | None = opt(None, "key/value heads (grouped-query attention); None = n_head")
    dim: int = opt(768, "model width")
    multiple_of: int = opt(256, "SwiGLU hidden size is rounded up to a multiple of this")
    ffn_dim_multiplier: float | None = opt(None, "optional factor on the SwiGLU hidden size int(8*dim/3)")
    rope_base: float = opt(10000.0, "2D RoPE frequency base")
    norm_eps: float = opt(1e-5, "RMSNorm epsilon")
    qk_norm: bool = opt(False, "RMS-normalise queries and keys per head before RoPE (not in LlamaGen)")
    dropout: float = opt(0.0, "dropout after the attention output projection and after the FFN")
    attn_dropout: float = opt(0.0, "dropout on attention weights")
    token_dropout: float = opt(0.0, "dropout on the input embeddings (prefix included)")
    drop_path: float = opt(0.0, "stochastic depth, rising linearly from 0 to this over the blocks")

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"{key}: {why}, got {getattr(self, key)!r}")

        if self.grid_size is not None:
            if len(self.grid_size) != 2 or min(self.grid_size) < 1:
                raise bad("grid_size", "expected two positive integers (h, w)")
            self.grid_size = [int(s) for s in self.grid_size]
        for key in ("codebook_size", "n_layer", "n_head", "dim", "multiple_of"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise bad(key, "must be positive")
        if self.codebook_size is not None and self.codebook_size > MAX_CODEBOOK_SIZE:
            raise bad("codebook_size", f"must be at most {MAX_CODEBOOK_SIZE} (2**31, the codes a token shard "
                                       "can store)")
        if self.num_classes is not None and self.num_classes < 0:
            raise bad("num_classes", "must be >= 0")
        for key in ("class_dropout", "dropout", "attn_dropout", "token_dropout", "drop_path"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise bad(key, "must be in [0, 1)")
        if self.dim % self.n_head:
            raise bad("dim", f"must be divisible by n_head={self.n_head}")
        if self.head_dim % 4:
            raise bad("dim", f"head size dim/n_head={self.head_dim} must be divisible by 4 for 2D RoPE")
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            raise bad("n_kv_head", f"must divide n_head={self.n_head}")
        # caught here, not as a non-finite loss at step 1 or a shape error deep in the model
        if not (isinstance(self.rope_base, (int, float)) and 0 < self.rope_base < math.inf):
            raise bad("rope_base", "must be a finite number > 0")
        if not (isinstance(self.norm_eps, (int, float)) and 0 <= self.norm_eps < math.inf):
            raise bad("norm_eps", "must be a finite number >= 0")
        if self.ffn_dim_multiplier is not None:
            if not (isinstance(self.ffn_dim_multiplier, (int, float)) and 0 < self.ffn_dim_multiplier < math.inf):
                raise bad("ffn_dim_multiplier", "must be a finite number > 0 (or null)")
            if self.ffn_hidden_dim < 1:
                raise bad("ffn_dim_multiplier", f"leaves the SwiGLU no hidden unit at dim={self.dim}")

    def require_data_fields(self, keys: tuple[str, ...] = ("codebook_size", "grid_size", "num_classes")) -> None:
        """Raise unless ``keys`` are set (train-prior takes them from the token shards)."""
        unset = [key for key in keys if getattr(self, key) is None]
        if unset:
            raise ConfigError(f"{', '.join(unset)}: not set; a GPT needs them (train-prior takes them from the "
                              "token shards)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def seq_len(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def ffn_hidden_dim(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "GPTConfig":
        """A preset's architecture (``PRESETS``) with any field overridden by keyword."""
        if name not in PRESETS:
            raise ConfigError(f"unknown GPT preset '{name}' (known: {', '.join(PRESETS)})")
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ConfigError(f"unknown GPTConfig key(s) {unknown} (valid: {', '.join(sorted(valid))})")
        return cls(**{**PRESETS[name], **overrides})

