"""Stage-2 prior: a decoder-only Llama-style GPT over row-major flattened code grids.

The math follows LlamaGen's class-to-image GPT (``autoregressive/models/gpt.py``) so that its
GPT-B/L/XL/XXL checkpoints load by renaming one key (``cls_embedding.embedding_table.weight`` ->
``class_embedding.weight``; every other parameter keeps LlamaGen's name):

- sequence = [prefix, tok_0, ..., tok_{T-2}]; the prefix is the class embedding (a learned start
  embedding for unconditional priors) and the logits at slot t predict tok_t;
- the blocks (2D RoPE, RMSNorm, attention, SwiGLU, KV cache) live in ``stage2_prior.layers``, the
  architecture (``GPTConfig``, presets) in ``stage2_prior.config``;
- weights N(0, 0.02), output head zero-initialised; class dropout replaces labels by the null class
  (row ``num_classes``) during training.
"""

from __future__ import annotations

import operator

from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from stage2_prior.config import PRESETS, GPTConfig  # noqa: F401 - PRESETS stays importable from here
from stage2_prior.layers import (KVCache, Linear, RMSNorm, TransformerBlock, notice_data_edits, rope_multipliers,
                                  rope_table_2d)
from vqgpt.ground.checkpoint import (load_export, load_export_weights, push_to_hub, resolve_model_dir, save_export,
                                     usable_device)
from vqgpt.ground.config import ConfigError

EXPORT_KIND = "gpt_prior"
# One wording for each class-label mistake, wherever it is caught (model, samplers, pipeline, CLI).
UNCONDITIONAL = "this prior is unconditional (num_classes=0): it takes no class label"


def needs_class_label(num_classes: int) -> str:
    """The error text for a class-conditional prior given no class label."""
    return f"this prior is class-conditional ({num_classes} classes): give a class label"


def checked_code_groups(groups: Any, codebook_size: int, where: str, advice: str = "") -> tuple[int, int]:
    """Recorded ``code_groups`` (``stage2_prior.draw.code_groups``) as a tuple, or a ConfigError naming
    ``where`` (the file and key that held them) unless they are [depth, codes per depth] that multiply to
    ``codebook_size``; ``advice``: what to do then, after the reason."""
    if not (isinstance(groups, (list, tuple)) and len(groups) == 2 and all(type(g) is int and g >= 1 for g in groups)
            and groups[0] * groups[1] == codebook_size):
        raise ConfigError(f"{where} must be [depth, codes per depth] with depth x codes = codebook_size "
                          f"{codebook_size}, got {groups!r}{advice}")
    return groups[0], groups[1]


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
            if not torch.is_tensor(class_labels) or class_labels.dtype.is_floating_point or \
                    class_labels.dtype == torch.bool:
                raise ValueError(f"class_labels must be an integer tensor of shape ({batch_size},), got "
                                 f"{getattr(class_labels, 'dtype', type(class_labels).__name__)}")
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
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be integer codes, got {tokens.dtype}")
        B, T = tokens.shape
        if not torch.is_grad_enabled() and tokens.device.type == "cpu" and B * T <= Linear.max_packed_rows:
            notice_data_edits(self)  # (few rows run on prepared copies of the weights, which an edit through .data
            #                          leaves as they were)
        # [prefix, tok_0 .. tok_{T-2}]: the last token is only a target
        try:  # (ranges are not checked ahead: that would wait on the device at every training step)
            x = torch.cat([self.prefix_embedding(class_labels, B), self.tok_embeddings(tokens[:, :-1])], dim=1)
        except IndexError:  # (B, T, C)
            raise ValueError(f"tokens must lie in [0, {self.config.codebook_size})"
                             + (f" and class_labels in [0, {self.num_classes})" if self.conditional else "")) from None
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

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None, zeroed: bool = False) -> KVCache:
        """A static KV cache for ``forward_cached``: 1 + h*w slots (prefix + grid) by default, the token
        embedding's dtype and device unless given; ``zeroed`` for a tensor ``start_pos`` (see KVCache)."""
        c, weight = self.config, self.tok_embeddings.weight
        if max_len is not None and max_len < 1:  # (0 was taken as unset)
            raise ValueError(f"max_len must be >= 1 (None: 1 + h*w = {1 + self.seq_len}), got {max_len}")
        return KVCache.allocate(c.n_layer, batch_size, c.n_kv_head or c.n_head, max_len or 1 + self.seq_len,
                                c.head_dim, dtype or weight.dtype, device or weight.device, zeroed=zeroed)

    def forward_cached(self, tokens: torch.Tensor | None, start_pos: int | torch.Tensor,
                       class_labels: torch.Tensor | None = None, *, cache: KVCache,
                       positions: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """Incremental forward over slots [start_pos, start_pos + n) of ``cache`` -> logits (B, n or 1, V).

        Slot 0 holds the prefix and slot s > 0 grid token s - 1; the logits of slot s predict grid
        token s. With start_pos == 0 the prefix (from class_labels) is prepended to ``tokens`` (B, n)
        (which may be None: prefix only). ``cache`` comes from ``new_cache`` and holds the slots before
        start_pos. ``positions`` (n, 2) gives each token's (row, col) for RoPE, default its own raster
        cell; sliding windows pass window-relative cells. A start_pos past ``cache.filled`` (the slots
        written so far) is refused.

        ``start_pos`` as a 1-element long tensor (> 0, on the model's device) is the fixed-shape form
        a compiled decode step uses (``stage2_prior.decode``): every shape is the same at every slot and
        the position is data, not a constant, so the step compiles once; it attends over the whole
        cache behind a mask, so the cache must come from ``new_cache(..., zeroed=True)``. Nothing is
        range-checked on this path (it would sync with the device).
        """
        # Checked before the prefix is built: it takes the cache's batch, the tokens bring their own.
        if tokens is not None and tokens.shape[0] != cache.batch_size:
            raise ValueError(f"batch {tokens.shape[0]} does not match the cache batch {cache.batch_size}")
        if isinstance(start_pos, torch.Tensor):
            if class_labels is not None:
                raise ValueError("class_labels are only read at start_pos=0 (the prefix slot)")
            return self._forward_static(tokens, start_pos, cache, positions)
        given = start_pos
        try:
            start_pos = -1 if isinstance(start_pos, bool) else operator.index(start_pos)
        except TypeError:
            start_pos = -1
        if start_pos < 0:
            raise ValueError(f"start_pos must be a slot index >= 0 (or a 1-element long tensor), got {given!r}")
        if start_pos > 0 and class_labels is not None:
            raise ValueError("class_labels are only read at start_pos=0 (the prefix slot)")
        if tokens is not None and (tokens.dim() != 2 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool):
            raise ValueError(f"tokens must be integer codes (B, n), got {tokens.dtype} {tuple(tokens.shape)}")
        n = (start_pos == 0) + (0 if tokens is None else tokens.shape[1])
        if n == 0:
            raise ValueError("forward_cached: no tokens given for start_pos > 0")
        cache.check_write(start_pos, n)
        try:  # (as in forward: ranges are not checked ahead, which would wait on the device at every decode step)
            parts = [self.prefix_embedding(class_labels, cache.batch_size)] if start_pos == 0 else []
            if tokens is not None and tokens.shape[1] > 0:
                parts.append(self.tok_embeddings(tokens))
        except IndexError:
            raise ValueError(f"tokens must lie in [0, {self.config.codebook_size})"
                             + (f" and class_labels in [0, {self.num_classes})" if self.conditional else "")) from None
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # (B, n, dim)
        table = self.rope_table(x.device)
        if positions is None:
            if start_pos + n > len(table):  # (raster slots past the grid have no rotation)
                raise ValueError(f"slots {start_pos}..{start_pos + n - 1} run past the prior's {len(table)} slots "
                                 f"(prefix + {self.grid_size[0]}x{self.grid_size[1]} grid); give positions for more")
            rope = table[start_pos: start_pos + n]
        else:
            index = 1 + positions[:, 0] * self.grid_size[1] + positions[:, 1]
            if start_pos == 0:
                index = torch.cat([index.new_zeros(1), index])
            rope = table[index]
        attn_mask = None
        if n > 1 and start_pos > 0:  # a chunk after cached slots: query i sees slots <= start_pos + i
            attn_mask = torch.ones(n, start_pos + n, dtype=torch.bool, device=x.device).tril(start_pos)
        logits = self._cached_layers(x, rope, cache, start_pos, attn_mask, last_only)
        cache.filled = start_pos + n
        return logits

    def _forward_static(self, tokens: torch.Tensor | None, start_pos: torch.Tensor, cache: KVCache,
                        positions: torch.Tensor | None) -> torch.Tensor:
        """``forward_cached`` with a tensor start_pos: fixed shapes, no host sync (see there)."""
        if tokens is None or tokens.shape[1] == 0:
            raise ValueError("forward_cached with a tensor start_pos takes tokens (B, n >= 1) after the prefix slot")
        x = self.tok_embeddings(tokens)  # (B, n, dim)
        n = x.shape[1]
        slots = start_pos + torch.arange(n, device=x.device)  # (n,)
        table = self.rope_table(x.device)
        if positions is None:
            rope = table[slots]
        else:
            rope = table[1 + positions[:, 0] * self.grid_size[1] + positions[:, 1]]
        # query i sees slots <= start_pos + i; later slots hold zeros or stale values
        attn_mask = torch.arange(cache.max_len, device=x.device) <= slots[:, None]  # (n, max_len)
        return self._cached_layers(x, rope, cache, start_pos, attn_mask)

    def _cached_layers(self, x: torch.Tensor, rope: torch.Tensor, cache: KVCache, start_pos: int | torch.Tensor,
                       attn_mask: torch.Tensor | None, last_only: bool = False) -> torch.Tensor:
        """Embedded inputs (B, n, dim) through every block (reading and writing ``cache``) and the head -> logits."""
        for layer, k, v in zip(self.layers, cache.keys, cache.values):
            x = layer(x, rope, (k, v), start_pos, attn_mask)
        if last_only:
            x = x[:, -1:]
        return self.output(self.norm(x)).float()  # (B, n or 1, V)

    # ------------------------------------------------------------------ export

    def save_pretrained(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write config.json + model.safetensors (kind 'gpt_prior'); float32 weights only: an int8 prior is
        refused (no export kind holds its int8 weights and scales: it would not load again), and so is one cast
        to another float type."""
        from stage2_prior.quantize import is_quantized  # (the int8 option, loaded where it is used)

        if is_quantized(self):
            raise ValueError("this prior holds int8 weights (quantized for decoding), which an export cannot hold: "
                             "save it before quantizing, or load the float export again")
        other = sorted({str(p.dtype) for p in self.parameters() if p.dtype != torch.float32})
        if other:  # as the pipeline's save: a cast for decoding would become the export's weights unnoticed
            raise ValueError(f"this prior's weights are {', '.join(other)} (cast for decoding?), and an export holds "
                             "float32 ones: save it before casting, or call .float() first to save the rounded values")
        groups = getattr(self, "code_groups", None)  # (residual VQ with a codebook per depth: draw.code_groups)
        if groups is not None:
            extra = {**(extra or {}), "code_groups": [int(g) for g in groups]}
        return save_export(directory, EXPORT_KIND, self.config, self, extra)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: torch.device | str = "cpu", *,
                        revision: str | None = None, subfolder: str | None = None) -> "GPT":
        """Load an export (a folder, or a Hub id ``owner/name`` at ``revision``); every key must match."""
        device = usable_device(device)
        directory = resolve_model_dir(name_or_path, revision=revision, subfolder=subfolder)
        config, state, extra = load_export(directory, EXPORT_KIND, GPTConfig)
        try:
            config.require_data_fields()
        except ConfigError as exc:  # a hand-edited null: name the file
            raise ConfigError(f"{Path(directory) / 'config.json'}: {exc}") from None
        with torch.random.fork_rng(devices=[]):  # the random init is overwritten: the caller's RNG stays as it was
            model = cls(config)
        load_export_weights(model, state, directory)
        groups = extra.get("code_groups") if isinstance(extra, dict) else None
        if groups is not None:  # a bare prior samples each position from its own depth's codes, as a pipeline does
            model.code_groups = checked_code_groups(groups, config.codebook_size,
                                                    f"{Path(directory) / 'config.json'}: extra.code_groups")
        return model.to(device).eval()

    def push_to_hub(self, repo_id: str, *, extra: dict[str, Any] | None = None, private: bool | None = None,
                    token: str | None = None, commit_message: str | None = None) -> str:
        """Upload this prior's export (with ``extra``) as Hub repository ``repo_id``; returns the commit URL."""
        return push_to_hub(lambda folder: self.save_pretrained(folder, extra=extra), repo_id, private=private,
                           token=token, commit_message=commit_message)


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
