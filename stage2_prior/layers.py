"""Building blocks of the stage-2 GPT prior (LlamaGen's math and parameter names).

- 2D RoPE on interleaved pairs of each head: the first head_dim/4 pairs rotate with the row, the
  last head_dim/4 with the column, frequencies base^(-4k/head_dim); the prefix slot's rotation is
  all zeros (cos = sin = 0), exactly as in LlamaGen, so the prefix query/key are zero vectors;
- pre-norm blocks with RMSNorm (fp32 statistics), fused ``wqkv`` (GQA via ``n_kv_head``), SwiGLU
  FFN ``w2(silu(w1 x) * w3 x)`` with hidden size ``find_multiple(int(8 dim / 3) [* mult], multiple_of)``;
- a static KV cache (``KVCache``) that ``GPT.forward_cached`` writes slot by slot.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from typing import Iterator

import psutil
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from stage2_prior import blocked, fused
from stage2_prior.config import GPTConfig


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


# Weights prepared for few-row products: id(weight) -> (weakref to it, its (address, version), the copy, the
# weight's content_fingerprint when the copy was made). The copy is (kind, tensor, scales): "blocked" for
# stage2_prior.blocked's kernel (with unit scales), "onednn" for oneDNN's packed product. Kept beside the
# module, not on it (a packed tensor is opaque: no deepcopy, no pickling); an entry goes when its weight does.
_PACKED: dict[int, tuple[weakref.ref, tuple[int, int], tuple[str, torch.Tensor, torch.Tensor | None],
                         torch.Tensor]] = {}
_PACK_ROWS_HINT = 8  # the row count oneDNN tunes its layout for; measured as good from 1 to 64 rows
_packing_works = True  # prepared copies are switched on (set_weight_packing)
_onednn_works = torch.backends.mkldnn.is_available()  # this build can pack for oneDNN


def set_weight_packing(enabled: bool) -> bool:
    """Switch the prepared-weight products of ``Linear`` on or off for this process; returns the previous
    setting. Off, few-row CPU products take the plain path and the prepared copies are dropped, which
    gives back the second copy of the weights that they hold (at 0.4-0.7x the decoding speed of fp32
    on the development CPU, benchmarks/sampling.py --no-packed)."""
    global _packing_works
    previous = _packing_works
    _packing_works = bool(enabled)
    if not _packing_works:
        _PACKED.clear()
    return previous


def _prepare(weight: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor | None] | None:
    """A copy of ``weight`` (out, in) for few-row products: blocked for stage2_prior.blocked's kernel where
    that builds for its dtype (float32, bfloat16) and out is a multiple of 8, else oneDNN-packed (float32),
    else None."""
    global _onednn_works
    if weight.shape[0] % blocked.BLOCK == 0 and blocked.kernel(weight.dtype) is not None:
        ones = torch.ones(weight.shape[0], dtype=torch.bfloat16)
        return "blocked", blocked.block(weight.detach()), ones
    if weight.dtype != torch.float32 or not _onednn_works:
        return None
    try:
        return "onednn", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_ROWS_HINT), None
    except (RuntimeError, AttributeError):  # a build without oneDNN's packed linear: use the plain products
        _onednn_works = False
        return None


def _packed_weight(weight: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor | None] | None:
    """The prepared copy (``_prepare``) of a CPU ``weight``, made on first use and again whenever the weight
    changes (moved, loaded or updated in place); None where none can be made, where packing is switched
    off, or for a weight made under inference_mode (it has no version counter to tell an in-place change)."""
    if not _packing_works or weight.is_inference():
        return None
    key = (weight.data_ptr(), weight._version)
    entry = _PACKED.get(id(weight))
    if entry is not None and entry[0]() is weight and entry[1] == key:
        return entry[2]
    prepared = _prepare(weight)
    if prepared is None:
        return None
    if entry is None or entry[0]() is not weight:
        weakref.finalize(weight, _PACKED.pop, id(weight), None)
    _PACKED[id(weight)] = (weakref.ref(weight), key, prepared, content_fingerprint(weight))
    return prepared


# An edit through ``.data`` (``p.data.mul_(0)``, a hand-written EMA, taming's LitEma.copy_to) changes a
# weight without bumping its version counter, which the prepared copies above and the frozen compiled step
# (stage2_prior.decode) go by: they would go on with the old values. notice_data_edits fingerprints every
# CPU weight once per sampling call (and GPT.forward without gradients, on few rows) and bumps the version
# of those whose content changed since its copy was made or since the last call.
_FINGERPRINTS: "weakref.WeakKeyDictionary[nn.Module, dict[int, tuple[weakref.ref, torch.Tensor]]]" = \
    weakref.WeakKeyDictionary()
_PROBES: dict[tuple[int, torch.dtype], torch.Tensor] = {}


def content_fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """Rows of a floating ``tensor`` times a fixed random vector: one read of it (about what one decode step
    reads), and unlike a plain sum it changes when rows or columns are swapped."""
    rows = tensor.detach().reshape(tensor.shape[0] if tensor.dim() > 1 else 1, -1)
    key = (rows.shape[1], rows.dtype)
    if key not in _PROBES:
        probe = torch.rand(rows.shape[1], generator=torch.Generator().manual_seed(rows.shape[1]))
        _PROBES[key] = probe.to(rows.dtype)
    return torch.mv(rows, _PROBES[key])


def notice_data_edits(model: nn.Module) -> None:
    """Bump the version counter of every floating CPU parameter or buffer of ``model`` whose content
    changed since the last call without it (an edit through ``.data``), so that prepared copies and
    frozen compiled steps are made again from the weights as they are. Called by the samplers; a
    weight made under inference_mode has no version counter and is not followed (as elsewhere)."""
    seen = _FINGERPRINTS.setdefault(model, {})
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.device.type != "cpu" or not tensor.is_floating_point() or tensor.is_inference() or not tensor.numel():
            continue  # CUDA graphs read the weights where they lie: an in-place edit is seen there
        now = content_fingerprint(tensor)
        before = seen.get(id(tensor))
        changed = before is not None and before[0]() is tensor and not torch.equal(before[1], now)
        # a copy made before this model's first sampling call (a forward without gradients): its own record
        packed = _PACKED.get(id(tensor))
        if (packed is not None and packed[0]() is tensor and packed[1] == (tensor.data_ptr(), tensor._version)
                and not torch.equal(packed[3], now)):
            changed = True
        if changed:
            torch.autograd.graph.increment_version(tensor)
        seen[id(tensor)] = (weakref.ref(tensor), now)


class Linear(nn.Linear):
    """nn.Linear with faster products for a few rows at CPU inference (KV-cache decoding).

    The usual x @ W^T runs near the memory bandwidth only for large row counts on the development CPU
    (MKL, 2 threads, AVX2): 44 GB/s of weight reads at 1 row, 13-16 GB/s at 8 rows, which is 60 of
    its 150 GFLOP/s. Up to ``max_packed_rows`` rows of a bias-free float32 or bfloat16 layer in eager
    mode run on a prepared copy of the weight (``_packed_weight``):

    - blocked for ``stage2_prior.blocked``'s AVX2 kernel, where it builds and the output size is a
      multiple of 8. Over the GPT-B layers it ran fp32 1.5x (1 row) to 1.9x (8 rows) faster than the
      oneDNN-packed product below, and bf16 1.9x to 6.5x faster than bf16 F.linear (bf16 is emulated
      on this CPU; on a later one with AVX512-BF16, where the kernel multiplies bf16 pairs in one
      instruction, F.linear took 16.6 / 22.4 ms at 1 / 8 rows, the kernel 5.9 / 6.7); its products
      accumulate in fp32 (bf16 outputs are rounded once at the end);
    - else (float32) reordered for oneDNN: 60-80 GB/s at 1-2 rows and 28 GB/s (112 GFLOP/s) at 8
      rows with the weights in cache.

    A compiled graph gets this product as one opaque op (the C++ op over the copy
    ``attach_blocked_copies`` attached, else ``vqgpt::few_row_linear``), except for one float32 row:
    F.linear there (the compiled decode step freezes the weights, and at one row inductor's own GEMM
    kernels read float32 ones at the bandwidth: ``stage2_prior.decode``). For one bfloat16 row the
    autotuner picked oneDNN's product, and a compiled GPT-B step at batch 1 ran 113 tokens/s (median
    of 6 rounds, interleaved in one process on the AVX512-BF16 CPU) against 162 with the kernel; in
    float32 the template kept its lead (84 against 67). The prepared copy, made at the first such call, lives as
    long as the weight (remade when it changes): decoding on a CPU holds the weights twice. Without
    one, 1-5 fp32 rows run as W @ x^T (one row padded to two), which ran at 50-90% of the bandwidth
    against 20-40%. benchmarks/sampling.py measures the sampler built on it.
    Training, autocast, other dtypes and devices take the usual path; the state dict is nn.Linear's.
    """

    max_rows = 5  # the W @ x^T fallback
    max_packed_rows = 128

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if (rows > self.max_packed_rows or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16)
                or self.weight.dtype != x.dtype or self.bias is not None or torch.is_grad_enabled()
                or torch.is_autocast_enabled("cpu")):
            return F.linear(x, self.weight, self.bias)
        if torch.compiler.is_compiling():
            # one float32 row: inductor's GEMM template on the frozen weight read faster; else the blocked
            # kernel, as the C++ op over the copy that stage2_prior.decode attached before tracing, else as
            # an op that finds the prepared copy itself
            if rows == 1 and x.dtype == torch.float32:
                return F.linear(x, self.weight)
            attached = getattr(self, "_compiled_blocked", None) if _in_decode_step else None
            if attached is None:
                return few_row_linear(x, self.weight)
            out = blocked.compiled_product(x.reshape(rows, x.shape[-1]), *attached)
            return out.to(x.dtype).reshape(*x.shape[:-1], self.weight.shape[0])
        return _few_row_product(x, self.weight)


def _few_row_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``Linear``'s product for a few rows on a CPU (see there)."""
    rows = x.numel() // x.shape[-1]
    flat = x.reshape(rows, x.shape[-1])
    prepared = _packed_weight(weight)
    if prepared is not None:
        kind, copy, scales = prepared
        if kind == "blocked" and x.dtype == torch.bfloat16 and blocked.rounded_kernel() is not None:
            out = blocked.rounded_product(flat, copy, scales)  # (rounded in the kernel, not by a torch call)
        elif kind == "blocked":
            out = blocked.product(flat, copy, scales).to(x.dtype)
        else:
            out = torch.ops.mkldnn._linear_pointwise(flat, copy, None, "none", [], "")
        return out.reshape(*x.shape[:-1], weight.shape[0])
    if rows > Linear.max_rows or x.dtype != torch.float32:
        return F.linear(x, weight)
    if rows == 1:
        flat = flat.repeat(2, 1)
    out = (weight @ flat.t()).t()[:rows].contiguous()  # (rows, out_features)
    return out.reshape(*x.shape[:-1], weight.shape[0])


_in_decode_step = False  # True while a compiled decode step runs (``attached_copies_in_use``)


@contextlib.contextmanager
def attached_copies_in_use() -> Iterator[None]:
    """While in it, compiled graphs take the copies of ``attach_blocked_copies``. stage2_prior.decode runs its
    step in it, and remakes the copies whenever its weights change; any other compiled graph (a
    caller's own torch.compile of the model) is traced outside it and finds each copy itself."""
    global _in_decode_step
    previous, _in_decode_step = _in_decode_step, True
    try:
        yield
    finally:
        _in_decode_step = previous


def attach_blocked_copies(model: nn.Module) -> None:
    """Before a compiled CPU decode step is traced: give each ``Linear`` of ``model`` its blocked copy and
    unit scales (``_packed_weight``, made now if need be) as ``_compiled_blocked``, so that the graph
    calls the kernel's C++ op on them directly (``blocked.native_linear``, where it builds; None
    elsewhere, and for weights without a blocked copy: those take ``few_row_linear``). Called again
    whenever the step recompiles for changed weights, which remakes the copies."""
    native = blocked.native_linear() is not None
    for module in model.modules():
        if isinstance(module, Linear):
            prepared = _packed_weight(module.weight) if native and module.bias is None else None
            module._compiled_blocked = prepared[1:] if prepared is not None and prepared[0] == "blocked" else None


@torch.library.custom_op("vqgpt::few_row_linear", mutates_args=())
def few_row_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``_few_row_product`` as one op that a compiled graph calls as is (the prepared copy stays outside it)."""
    return _few_row_product(x, weight)


@few_row_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class RMSNorm(nn.Module):
    """LlamaGen's RMSNorm: statistics in fp32, cast back, then the weight (timm's RmsNorm does not upcast)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fused.rms_norm(x, self.weight, self.eps)  # (eager on a CPU)
        if y is not None:
            return y
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op, same math
        return F.rms_norm(x.float(), self.weight.shape, None, self.eps).type_as(x) * self.weight


def free_memory(device: torch.device) -> int | None:
    """Bytes that ``device`` can still give: the host's available memory for the CPU, the GPU's free memory
    plus what torch's caching allocator holds unused for CUDA; None where that cannot be told."""
    if device.type == "cpu":
        return psutil.virtual_memory().available
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return None


def check_fits(nbytes: int, device: torch.device, what: str) -> None:
    """A MemoryError naming ``what`` when ``nbytes`` exceed what ``device`` has free. Without it the CPU
    allocator hands out untouched pages it cannot back (the kernel kills the process once sampling writes
    them), and a GPU fails mid-batch with torch's generic message."""
    free = free_memory(device)
    if free is not None and nbytes > free:
        raise MemoryError(f"{what} needs {nbytes / 2**30:,.1f} GiB, and {device} has {free / 2**30:,.1f} GiB free: "
                          "draw fewer samples per call (guidance doubles the rows)")


class KVCache:
    """Preallocated keys and values of every layer, each (B, n_kv_head, max_len, head_dim).

    Slots are written before they are read (attention reads slots < start_pos + n only), so the
    storage is left uninitialised, unless ``zeroed``: the fixed-shape step of a compiled decoder
    attends over every slot behind a mask, and a masked slot must still hold finite numbers
    (0 * NaN is NaN). ``filled`` counts the slots written so far (a write at start_pos leaves
    start_pos + n of them: later ones are stale), so that a write past them, which would attend
    over slots never written, is refused; None where that is not known (a cache made from bare
    tensors), and then nothing is checked.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], filled: int | None = None):
        self.keys, self.values, self.filled = keys, values, filled
        self.batch_size, _, self.max_len, _ = keys[0].shape

    def check_write(self, start_pos: int, n: int) -> None:
        """A ValueError unless slots [start_pos, start_pos + n) can be written next: within the cache, and
        not past the slots written so far."""
        if start_pos + n > self.max_len:
            raise ValueError(f"slots {start_pos}..{start_pos + n - 1} exceed the cache length {self.max_len}")
        if self.filled is not None and start_pos > self.filled:
            raise ValueError(f"start_pos {start_pos} is past the {self.filled} slot(s) written to this cache so far: "
                             f"slots {self.filled}..{start_pos - 1} would be attended over unwritten (feed them "
                             f"first, from start_pos {self.filled})")

    @classmethod
    def allocate(cls, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, zeroed: bool = False) -> "KVCache":
        shape = (batch_size, n_kv_head, max_len, head_dim)
        check_fits(2 * n_layer * batch_size * n_kv_head * max_len * head_dim * dtype.itemsize, torch.device(device),
                   f"a KV cache of {batch_size:,} rows x {max_len:,} positions ({n_layer} layers, {dtype})")
        new = torch.zeros if zeroed else torch.empty
        return cls([new(shape, dtype=dtype, device=device) for _ in range(n_layer)],
                   [new(shape, dtype=dtype, device=device) for _ in range(n_layer)], filled=0)

    def select(self, start: int, stop: int) -> "KVCache":
        """The cache of batch rows [start, stop), sharing storage with this one (and its ``filled`` as it is now:
        each then counts its own writes)."""
        return KVCache([k[start:stop] for k in self.keys], [v[start:stop] for v in self.values], self.filled)


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

    def _project(self, y: torch.Tensor) -> torch.Tensor:
        """The heads' outputs (B, H, n, D) -> wo's output (B, n, dim), after the residual dropout."""
        B, H, n, D = y.shape
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, n, H * D)))

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None,
                start_pos: int | torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, n, _ = x.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.wqkv(x)  # (B, n, (H + 2K) * D)
        if self.q_norm is None:  # rotate q and k in one op (one kernel with the split, in a CPU training step)
            q, k, v = fused.rope_qkv(qkv, rope, H, K, D, apply_rope)
        else:
            q = apply_rope(self.q_norm(qkv[..., : H * D].view(B, n, H, D)), rope)
            k = apply_rope(self.k_norm(qkv[..., H * D: (H + K) * D].view(B, n, K, D)), rope)
            v = qkv[..., (H + K) * D:].view(B, n, K, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, n, D)
        static = isinstance(start_pos, torch.Tensor)
        if cache is not None:
            k_cache, v_cache = cache
            if (static and n == 1 and not self.training and torch.compiler.is_compiling()
                    and blocked.attention_usable(q, k_cache, v_cache)):
                # a compiled decode step: write this slot and attend over slots [0, start_pos] in one op
                y = blocked.compiled_attention_update(q, k, v, k_cache, v_cache, start_pos)
                return self._project(y)
            if (not static and n == 1 and not self.training and not torch.compiler.is_compiling()
                    and k.dtype == v.dtype == k_cache.dtype and blocked.attention_usable(q, k_cache, v_cache)):
                # an eager decode step: the kernel writes this slot and attends over slots [0, start_pos]
                y = blocked.attend_and_write(q, k, v, k_cache, v_cache, start_pos)
                return self._project(y)
            if static:
                # Fixed shapes for a compiled step: write slots start_pos + [0, n) in place and attend
                # over the whole cache; attn_mask hides the slots not written yet.
                slots = start_pos + torch.arange(n, device=start_pos.device)
                k_cache.index_copy_(2, slots, k.to(k_cache.dtype))
                v_cache.index_copy_(2, slots, v.to(v_cache.dtype))
                k, v = k_cache, v_cache
            else:
                k_cache[:, :, start_pos: start_pos + n] = k
                v_cache[:, :, start_pos: start_pos + n] = v
                k, v = k_cache[:, :, : start_pos + n], v_cache[:, :, : start_pos + n]
        if cache is not None and n == 1 and not self.training and blocked.attention_usable(q, k, v):
            # one query over the cache (a decode step): slots [0, start_pos], keys and values read once
            y = blocked.decode_attention(q, k, v, (int(start_pos) if static else start_pos) + 1)
            return self._project(y)
        if K != H:
            k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
        if cache is None and (self.attn_dropout == 0 or not self.training):
            y = fused.causal_attention(q, k, v)  # (a bf16 training step on a CPU: its backward done faster)
            if y is not None:
                return self._project(y)
        # Causal: plain is_causal when the queries start the sequence; a mask when a chunk follows a
        # cache (always on the static path); nothing for a single query (it may see every cached slot).
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=not static and attn_mask is None and start_pos == 0 and n > 1,
            dropout_p=self.attn_dropout if self.training else 0.0)  # (B, H, n, D)
        return self._project(y)


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
        return self.ffn_dropout(self.w2(fused.swiglu(self.w1(x), self.w3(x))))


class TransformerBlock(nn.Module):
    def __init__(self, config: GPTConfig, drop_path: float):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None,
                start_pos: int | torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.drop_path(self.attention(self.attention_norm(x), rope, cache, start_pos, attn_mask))
        return x + self.drop_path(self.feed_forward(self.ffn_norm(x)))

