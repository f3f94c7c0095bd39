"""Stage-2 prior: a decoder-only Llama-style GPT over row-major flattened code grids.

The math follows LlamaGen's class-to-image GPT (``autoregressive/models/gpt.py``) so that its
GPT-B/L/XL/XXL checkpoints load by renaming one key (``cls_embedding.embedding_table.weight`` ->
``class_embedding.weight``; every other parameter keeps LlamaGen's name):

- sequence = [prefix, tok_0, ..., tok_{T-2}]; the prefix is the class embedding (a learned start
  embedding for unconditional priors) and the logits at slot t predict tok_t;
- 2D RoPE on interleaved pairs of each head: the first head_dim/4 pairs rotate with the row, the
  last head_dim/4 with the column, frequencies base^(-4k/head_dim); the prefix slot's rotation is
  all zeros (cos = sin = 0), exactly as in LlamaGen, so the prefix query/key are zero vectors;
- pre-norm blocks with RMSNorm (fp32 statistics), fused ``wqkv`` (GQA via ``n_kv_head``), SwiGLU
  FFN ``w2(silu(w1 x) * w3 x)`` with hidden size ``find_multiple(int(8 dim / 3) [* mult], multiple_of)``;
- weights N(0, 0.02), output head zero-initialised; class dropout replaces labels by the null class
  (row ``num_classes``) during training.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from vqgpt.checkpoint import load_export, save_export
from vqgpt.config import ConfigError, opt

EXPORT_KIND = "gpt_prior"
# One wording for each class-label mistake, wherever it is caught (model, samplers, pipeline, CLI).
UNCONDITIONAL = "this prior is unconditional (num_classes=0): it takes no class label"


def needs_class_label(num_classes: int) -> str:
    """The error text for a class-conditional prior given no class label."""
    return f"this prior is class-conditional ({num_classes} classes): give a class label"


# Architecture presets; LlamaGen's c2i sizes for GPT-B..XXL. Parameter counts (count_parameters)
# with LlamaGen's vocabulary 16384 and 1000 classes + null: GPT-B 110.9M, GPT-L 342.9M,
# GPT-XL 774.7M, GPT-XXL 1411.0M; unconditional with 1024 codes: GPT-B 86.5M, GPT-L 310.4M.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_head=2, dim=32, multiple_of=32),  # CPU tests
    "small": dict(n_layer=6, n_head=8, dim=256),  # CPU demo
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),
}


def find_multiple(n: int, k: int) -> int:
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


def rope_table_2d(grid_size: tuple[int, int], head_dim: int, base: float) -> torch.Tensor:
    """(cos, sin) table (1 + h*w, head_dim // 2, 2): slot 0 = prefix (zeros), slot 1 + r*w + c = cell (r, c)."""
    h, w = grid_size
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))  # (head_dim // 4,)
    rows = torch.outer(torch.arange(h).float(), freqs)  # (h, head_dim // 4)
    cols = torch.outer(torch.arange(w).float(), freqs)  # (w, head_dim // 4)
    angles = torch.cat([rows[:, None].expand(h, w, -1), cols[None].expand(h, w, -1)], dim=-1).flatten(0, 1)
    table = torch.stack([angles.cos(), angles.sin()], dim=-1)  # (h*w, head_dim // 2, 2)
    return torch.cat([torch.zeros(1, half, 2), table])


def rope_multipliers(table: torch.Tensor) -> torch.Tensor:
    """(cos, sin) table (L, D/2, 2) -> per-element multipliers (L, 2, D): [c0 c0 c1 c1 ..], [-s0 s0 -s1 s1 ..]."""
    cos, sin = table.unbind(-1)
    return torch.stack([cos.repeat_interleave(2, dim=-1), torch.stack([-sin, sin], dim=-1).flatten(-2)], dim=1)


def apply_rope(x: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, n, heads, D) by multipliers (n, 2, D), in fp32.

    (x0, x1) -> (x0 c - x1 s, x1 c + x0 s), written as x * [c c] + swap(x) * [-s s]: three kernels
    per call instead of seven (decode steps are overhead-bound), and real arithmetic because inductor
    does not generate code for complex ops.
    """
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0) pairs
    cos, sin = multipliers[:, None].unbind(2)  # (n, 1, D) each
    return torch.addcmul(xf * cos, swapped, sin).type_as(x)


class Linear(nn.Linear):
    """nn.Linear with a faster product for a few rows at CPU inference (KV-cache decoding).

    On the development CPU (MKL, 2 threads) x @ W^T with 1-5 rows ran at 20-40% of memory
    bandwidth (one row: on one thread), the same product as W @ x^T with 2-5 columns at 50-90%;
    one row is padded to two. benchmarks/sampling.py measures the sampler built on it. Training,
    autocast, other dtypes and devices take the usual path; the state dict is nn.Linear's.
    """

    max_rows = 5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if (rows > self.max_rows or x.device.type != "cpu" or x.dtype != torch.float32 or self.bias is not None
                or self.weight.dtype != torch.float32 or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu")):
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, x.shape[-1])
        if rows == 1:
            flat = flat.repeat(2, 1)
        out = (self.weight @ flat.t()).t()[:rows].contiguous()  # (rows, out_features)
        return out.reshape(*x.shape[:-1], self.out_features)


class RMSNorm(nn.Module):
    """LlamaGen's RMSNorm: statistics in fp32, cast back, then the weight (timm's RmsNorm does not upcast)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op, same math
        return F.rms_norm(x.float(), self.weight.shape, None, self.eps).type_as(x) * self.weight


class KVCache:
    """Preallocated keys and values of every layer, each (B, n_kv_head, max_len, head_dim).

    Slots are written before they are read (attention reads slots < start_pos + n only), so the
    storage is left uninitialised.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values
        self.batch_size, _, self.max_len, _ = keys[0].shape

    @classmethod
    def allocate(cls, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> "KVCache":
        shape = (batch_size, n_kv_head, max_len, head_dim)
        return cls([torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layer)],
                   [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layer)])

    def select(self, start: int, stop: int) -> "KVCache":
        """The cache of batch rows [start, stop), sharing storage with this one."""
        return KVCache([k[start:stop] for k in self.keys], [v[start:stop] for v in self.values])


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.n_kv_head = config.n_kv_head or config.n_head
        self.wqkv = Linear(config.dim, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = Linear(config.dim, config.dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.attn_dropout = config.attn_dropout
        self.resid_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None,
                start_pos: int, attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, n, _ = x.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.wqkv(x)  # (B, n, (H + 2K) * D)
        if self.q_norm is None:  # rotate q and k in one op
            qk = apply_rope(qkv[..., : (H + K) * D].view(B, n, H + K, D), rope)
            q, k = qk[:, :, :H], qk[:, :, H:]
        else:
            q = apply_rope(self.q_norm(qkv[..., : H * D].view(B, n, H, D)), rope)
            k = apply_rope(self.k_norm(qkv[..., H * D: (H + K) * D].view(B, n, K, D)), rope)
        v = qkv[..., (H + K) * D:].view(B, n, K, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, n, D)
        if cache is not None:
            k_cache, v_cache = cache
            k_cache[:, :, start_pos: start_pos + n] = k
            v_cache[:, :, start_pos: start_pos + n] = v
            k, v = k_cache[:, :, : start_pos + n], v_cache[:, :, : start_pos + n]
        if K != H:
            k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
        # Causal: plain is_causal when the queries start the sequence; a mask when a chunk follows a
        # cache; nothing for a single query (it may see every cached slot).
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and start_pos == 0 and n > 1,
            dropout_p=self.attn_dropout if self.training else 0.0)  # (B, H, n, D)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, n, H * D)))


class FeedForward(nn.Module):
    """SwiGLU with LlamaGen's names w1 (gate), w3 (up), w2 (down); timm's SwiGLU names them fc1_g/fc1_x/fc2."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.ffn_hidden_dim
        self.w1 = Linear(config.dim, hidden, bias=False)
        self.w3 = Linear(config.dim, hidden, bias=False)
        self.w2 = Linear(hidden, config.dim, bias=False)
        self.ffn_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, config: GPTConfig, drop_path: float):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None,
                start_pos: int, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.drop_path(self.attention(self.attention_norm(x), rope, cache, start_pos, attn_mask))
        return x + self.drop_path(self.feed_forward(self.ffn_norm(x)))


class GPT(nn.Module):
    """Autoregressive prior over (h, w) code grids flattened row-major, with a class/start prefix."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        config.require_data_fields()
        self.config = config
        self.grid_size = tuple(config.grid_size)
        self.seq_len = config.seq_len
        self.num_classes = config.num_classes
        # Null class row (CFG) only for conditional priors trained with class dropout.
        conditional_with_null = config.num_classes > 0 and config.class_dropout > 0
        self.null_class: int | None = config.num_classes if conditional_with_null else None
        # Recompute each block's activations in backward instead of storing them (large priors).
        self.grad_checkpointing = False
        prefix_rows = 1 if config.num_classes == 0 else config.num_classes + (self.null_class is not None)
        self.class_embedding = nn.Embedding(prefix_rows, config.dim)
        self.tok_embeddings = nn.Embedding(config.codebook_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout) if config.token_dropout > 0 else nn.Identity()
        rates = torch.linspace(0, config.drop_path, config.n_layer).tolist()
        self.layers = nn.ModuleList(TransformerBlock(config, r) for r in rates)
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = Linear(config.dim, config.codebook_size, bias=False)
        # A plain attribute, not a buffer: model.to(bfloat16) must not round the fp32 table.
        self._rope = rope_multipliers(rope_table_2d(self.grid_size, config.head_dim, config.rope_base))
        self.kv_cache: KVCache | None = None
        self.apply(self._init_weights)
        nn.init.zeros_(self.output.weight)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def _apply(self, fn, *args, **kwargs):  # noqa: ANN001, ANN202 - follow .to(device) / .cuda() with the table
        module = super()._apply(fn, *args, **kwargs)
        self._rope = self._rope.to(fn(torch.zeros(())).device)  # device only: the table stays fp32
        return module

    def rope_table(self, device: torch.device) -> torch.Tensor:
        """RoPE multipliers (1 + h*w, 2, head_dim) on ``device`` (moved once, then kept); see apply_rope."""
        if self._rope.device != device:
            self._rope = self._rope.to(device)
        return self._rope

    def prefix_embedding(self, class_labels: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """Class (or start) embedding (B, 1, dim); training replaces labels by the null class at class_dropout."""
        if self.conditional:
            if class_labels is None:
                raise ValueError(needs_class_label(self.num_classes))
            if class_labels.shape != (batch_size,):
                raise ValueError(f"class_labels must have shape ({batch_size},), got {tuple(class_labels.shape)}")
            if self.training and self.null_class is not None:
                drop = torch.rand(batch_size, device=class_labels.device) < self.config.class_dropout
                class_labels = torch.where(drop, self.null_class, class_labels)
            return self.class_embedding(class_labels)[:, None]
        if class_labels is not None:
            raise ValueError(UNCONDITIONAL)
        return self.class_embedding.weight[None].expand(batch_size, 1, -1)

    def forward(self, tokens: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: tokens (B, T<=h*w) long -> logits (B, T, V); logits[:, t] predicts tokens[:, t]."""
        if tokens.dim() != 2 or not 1 <= tokens.shape[1] <= self.seq_len:
            raise ValueError(f"tokens must be (B, T) with 1 <= T <= {self.seq_len} (grid {self.grid_size}), "
                             f"got {tuple(tokens.shape)}")
        B, T = tokens.shape
        # [prefix, tok_0 .. tok_{T-2}]: the last token is only a target
        x = torch.cat([self.prefix_embedding(class_labels, B), self.tok_embeddings(tokens[:, :-1])], dim=1)  # (B, T, C)
        x = self.tok_dropout(x)
        rope = self.rope_table(x.device)[:T]
        checkpointing = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if checkpointing:
                # non-reentrant checkpointing is the mode that works under DDP
                x = torch.utils.checkpoint.checkpoint(layer, x, rope, None, 0, None, use_reentrant=False)
            else:
                x = layer(x, rope, None, 0, None)
        return self.output(self.norm(x)).float()  # (B, T, V)

    # ------------------------------------------------------------------ KV-cache inference

    def setup_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> KVCache:
        """Allocate a static KV cache of 1 + h*w slots (prefix + grid) by default; kept as ``model.kv_cache``."""
        weight = self.tok_embeddings.weight
        self.kv_cache = self.new_cache(batch_size, max_len, dtype or weight.dtype, device or weight.device)
        return self.kv_cache

    def new_cache(self, batch_size: int, max_len: int | None, dtype: torch.dtype,
                  device: torch.device | str) -> KVCache:
        """A detached KV cache (not stored on the model), e.g. one per sliding window."""
        c = self.config
        return KVCache.allocate(c.n_layer, batch_size, c.n_kv_head or c.n_head, max_len or 1 + self.seq_len,
                                c.head_dim, dtype, device)

    def clear_cache(self) -> None:
        self.kv_cache = None

    def forward_cached(self, tokens: torch.Tensor | None, start_pos: int, class_labels: torch.Tensor | None = None,
                       positions: torch.Tensor | None = None, cache: KVCache | None = None,
                       last_only: bool = False) -> torch.Tensor:
        """Incremental forward over cache slots [start_pos, start_pos + n) -> logits (B, n or 1, V).

        Slot 0 holds the prefix and slot s > 0 grid token s - 1; the logits of slot s predict grid
        token s. With start_pos == 0 the prefix (from class_labels) is prepended to ``tokens`` (B, n)
        (which may be None: prefix only). ``positions`` (n, 2) gives each token's (row, col) for RoPE,
        default its own raster cell; sliding windows pass window-relative cells.
        """
        cache = cache if cache is not None else self.kv_cache
        if cache is None:
            raise RuntimeError("no KV cache: call model.setup_cache(batch_size) first or pass cache=")
        parts = [self.prefix_embedding(class_labels, cache.batch_size)] if start_pos == 0 else []
        if start_pos > 0 and class_labels is not None:
            raise ValueError("class_labels are only read at start_pos=0 (the prefix slot)")
        if tokens is not None and tokens.shape[1] > 0:
            parts.append(self.tok_embeddings(tokens))
        if not parts:
            raise ValueError("forward_cached: no tokens given for start_pos > 0")
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # (B, n, dim)
        if x.shape[0] != cache.batch_size:
            raise ValueError(f"batch {x.shape[0]} does not match the cache batch {cache.batch_size}")
        n = x.shape[1]
        if start_pos + n > cache.max_len:
            raise ValueError(f"slots {start_pos}..{start_pos + n - 1} exceed the cache length {cache.max_len}")
        table = self.rope_table(x.device)
        if positions is None:
            rope = table[start_pos: start_pos + n]
        else:
            index = 1 + positions[:, 0] * self.grid_size[1] + positions[:, 1]
            if start_pos == 0:
                index = torch.cat([index.new_zeros(1), index])
            rope = table[index]
        attn_mask = None
        if n > 1 and start_pos > 0:  # a chunk after cached slots: query i sees slots <= start_pos + i
            attn_mask = torch.ones(n, start_pos + n, dtype=torch.bool, device=x.device).tril(start_pos)
        for layer, k, v in zip(self.layers, cache.keys, cache.values):
            x = layer(x, rope, (k, v), start_pos, attn_mask)
        if last_only:
            x = x[:, -1:]
        return self.output(self.norm(x)).float()  # (B, n or 1, V)

    # ------------------------------------------------------------------ export

    def save_pretrained(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write config.json + model.safetensors (kind 'gpt_prior')."""
        return save_export(directory, EXPORT_KIND, self.config, self, extra)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: torch.device | str = "cpu") -> "GPT":
        """Load an export written by ``save_pretrained`` (strict: every key must match)."""
        config, state, _ = load_export(directory, EXPORT_KIND, GPTConfig)
        model = cls(config)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise RuntimeError(f"{directory}: weights do not match the config: {exc}") from None
        return model.to(device).eval()


def count_parameters(model_or_config: GPT | GPTConfig, exclude_embeddings: bool = False) -> int:
    """Number of parameters; ``exclude_embeddings`` drops token/class embeddings (not the output head)."""
    if isinstance(model_or_config, GPTConfig):
        c = model_or_config
        c.require_data_fields(("codebook_size", "num_classes"))  # the grid adds no parameters
        kv = c.n_kv_head or c.n_head
        per_layer = c.dim * (c.n_head + 2 * kv) * c.head_dim + c.dim * c.dim + 3 * c.dim * c.ffn_hidden_dim + 2 * c.dim
        if c.qk_norm:
            per_layer += 2 * c.head_dim
        rows = 1 if c.num_classes == 0 else c.num_classes + (c.class_dropout > 0)
        embeddings = (c.codebook_size + rows) * c.dim
        total = c.n_layer * per_layer + c.dim + c.codebook_size * c.dim + embeddings
        return total - embeddings if exclude_embeddings else total
    total = sum(p.numel() for p in model_or_config.parameters())
    if exclude_embeddings:
        total -= model_or_config.tok_embeddings.weight.numel() + model_or_config.class_embedding.weight.numel()
    return total
