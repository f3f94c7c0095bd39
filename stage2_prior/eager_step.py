"""The one-token decode step without torch.compile, on a CPU: the prior's kernels called in a row, not through its
modules.

An eager decode step of GPT-B runs some 260 small calls (61 products, 25 norms, 12 RoPEs, attentions and
SwiGLUs, the residual adds). Through the modules each of them also paid for ``nn.Module.__call__``, the checks of
``layers.Linear.forward`` (device, dtype, grad and autocast state, compiling or not), the lookup of its prepared
weight and the checks of the ``fused`` functions: about 10 us a product, against 1-2 us for the kernel call of a
small weight. At batch 8 in bfloat16 that was a quarter of the step. ``EagerStep`` makes those decisions once per
sampling call, when ``eager_step`` builds it (the sampler's loop holds the model still: no training, no new
weights), and keeps, per layer, the kernels and prepared weights the modules would pick; a step then calls them
directly. The values are those of ``GPT.forward_cached`` bit for bit: the same kernels on the same operands.

It applies where every piece has its kernel: a CPU prior of the library's own blocks (exact types, so a subclass or
a wrapped layer keeps its own forward), without QK-norm, in eval mode, with no forward hooks, float32 or bfloat16
activations (int8 weights with float32 activations), and the ``fused`` and attention kernels built. Elsewhere
``eager_step`` gives None and the samplers call ``forward_cached``. A step itself goes back to ``forward_cached``
when gradients or CPU autocast are on, or for more rows than the products' few-row path takes.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from stage2_prior import blocked, fused
from stage2_prior.layers import (Attention, FeedForward, KVCache, Linear, RMSNorm, TransformerBlock,
                                 _few_row_product, _packed_weight)
from stage2_prior.model import GPT
from stage2_prior.quantize import Int8Linear

Product = Callable[[torch.Tensor], torch.Tensor]


def _product(module: nn.Module, dtype: torch.dtype) -> Product | None:
    """x (rows, in) -> (rows, out), as ``module`` computes it for a few rows of ``dtype`` at inference on a CPU."""
    if type(module) is Linear and module.bias is None and module.weight.dtype == dtype:
        prepared = _packed_weight(module.weight)
        if prepared is not None and prepared[0] == "blocked":
            _, copy, scales = prepared
            if dtype == torch.bfloat16 and blocked.rounded_kernel() is not None:
                return blocked.bound_product(copy, scales, rounded=True)
            if dtype == torch.float32:
                return blocked.bound_product(copy, scales)
        return functools.partial(_few_row_product, weight=module.weight)
    if type(module) is Int8Linear and dtype == torch.float32 and module.weight_blocked is not None:
        scales = module.scales if module.scales.dtype == torch.bfloat16 else module.scales.to(torch.bfloat16)
        return blocked.bound_product(module.weight_blocked, scales)
    if type(module) is Int8Linear:
        return module.forward
    return None


def _norm_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
    if type(module) is not RMSNorm or module.weight.dtype != dtype or not module.weight.is_contiguous():
        return None
    return module.weight.detach()


def _hooked(model: nn.Module) -> bool:
    """Whether a forward hook (global or on any module of ``model``) would see the modules' calls."""
    from torch.nn.modules import module as hooks

    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class EagerStep:
    """``GPT.forward_cached`` for one new token per sequence by the kernels: ``step(tokens (B, 1), pos, cache) ->
    (B, 1, V)`` (the interface of ``stage2_prior.decode.DecodeStep``). Made by ``eager_step``."""

    def __init__(self, model: GPT, dtype: torch.dtype, ops: tuple, layers: list[tuple], head: tuple):
        self.model, self.dtype = model, dtype
        self.norm, self.rope, self.glu = ops
        self.layers, self.head = layers, head
        attention = model.layers[0].attention
        self.heads = attention.n_head, attention.n_kv_head, attention.head_dim
        self.eps = model.config.norm_eps
        self._attend: dict[tuple, Callable] = {}

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return self.model.new_cache(batch_size, max_len)

    def _attention(self, tokens: torch.Tensor, cache: KVCache):
        """The attention call for this batch and cache (``blocked.bound_attention``), or None where the kernel does not
        take the cache (another dtype, device or shape, slots that are not contiguous rows, layers laid out apart):
        forward_cached then takes the step, and says what is wrong with a cache it cannot take."""
        H, K, D = self.heads
        k, v = cache.keys[0], cache.values[0]
        if not (k.dtype == v.dtype == self.dtype and k.device.type == "cpu" and len(cache.keys) == len(self.layers)
                and k.dim() == 4 and k.shape[0] == tokens.shape[0] and k.shape[1] == K and k.shape[3] == D):
            return None
        shape, strides = k.shape, k.stride() + v.stride()
        if (strides[2:4] != (D, 1) or strides[6:] != (D, 1)
                or any(a.shape != shape or b.shape != shape or a.stride() + b.stride() != strides
                       or a.dtype != k.dtype or b.dtype != k.dtype for a, b in zip(cache.keys, cache.values))):
            return None
        key = tokens.shape[0], strides
        if key not in self._attend:
            self._attend[key] = blocked.bound_attention(self.dtype, tokens.shape[0], H, K, D,
                                                        (strides[0], strides[1], strides[4], strides[5]))
        return self._attend[key]

    def __call__(self, tokens: torch.Tensor, pos: int, cache: KVCache) -> torch.Tensor:
        """Logits (B, 1, V) of slot ``pos`` (> 0), feeding tokens (B, 1) there; writes that slot of ``cache``."""
        model = self.model
        if pos < 1:
            raise ValueError(f"a decode step writes a slot after the prefix (pos >= 1), got {pos}")
        attend = None
        if (tokens.dim() == 2 and tokens.shape[1] == 1 and tokens.shape[0] <= Linear.max_packed_rows
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")):
            attend = self._attention(tokens, cache)
        if attend is None:  # (a batch other than the cache's among them)
            return model.forward_cached(tokens, pos, cache=cache)
        cache.check_write(pos, 1)
        table = model.rope_table(tokens.device)
        if pos >= len(table):
            return model.forward_cached(tokens, pos, cache=cache)  # (its error, for slots past the grid)
        try:
            x = F.embedding(tokens[:, 0], model.tok_embeddings.weight)  # (B, dim)
        except IndexError:
            return model.forward_cached(tokens, pos, cache=cache)  # (its error, naming the range)
        rope = table[pos: pos + 1]
        B, (H, K, D), eps, norm = x.shape[0], self.heads, self.eps, self.norm
        for (norm1, wqkv, wo, norm2, w1, w3, w2), k_cache, v_cache in zip(self.layers, cache.keys, cache.values):
            q, k, v = self.rope(wqkv(norm(x, norm1, eps)).view(B, 1, -1), rope, H, K, D)  # (B, 1, heads, D)
            y = attend(q, k, v, k_cache, v_cache, pos)  # (B, H, 1, D); k and v written to slot pos
            x = x + wo(y.view(B, H * D))
            h = norm(x, norm2, eps)
            x = x + w2(self.glu(w1(h), w3(h)))
        final, output = self.head
        logits = output(norm(x, final, eps)).float()
        cache.filled = pos + 1
        return logits[:, None]


def eager_step(model: GPT) -> EagerStep | None:
    """The kernels' decode step of ``model`` as it is now (see the module docstring), or None where it does not apply.
    Made once per sampling call, inside its ``eval_mode``: it keeps the prepared weights of that moment."""
    weight = model.tok_embeddings.weight
    dtype = torch.float32 if any(type(m) is Int8Linear for m in model.modules()) else weight.dtype
    if (type(model) is not GPT or weight.device.type != "cpu" or weight.dtype != dtype or model.training
            or any(m.training for m in model.modules()) or _hooked(model) or not len(model.layers)):
        return None
    tok = model.tok_embeddings
    if type(tok) is not nn.Embedding or tok.padding_idx is not None or tok.max_norm is not None:
        return None
    ops = fused.decode_kernels(dtype)
    if ops is None or blocked.attention_kernel(dtype) is None:
        return None
    layers = []
    for block in model.layers:
        attention, ffn = block.attention, block.feed_forward
        if (type(block) is not TransformerBlock or type(attention) is not Attention or type(ffn) is not FeedForward
                or attention.q_norm is not None or attention.head_dim % 8 or attention.head_dim > 256):
            return None
        layer = (_norm_weight(block.attention_norm, dtype), _product(attention.wqkv, dtype),
                 _product(attention.wo, dtype), _norm_weight(block.ffn_norm, dtype), _product(ffn.w1, dtype),
                 _product(ffn.w3, dtype), _product(ffn.w2, dtype))
        if any(part is None for part in layer):
            return None
        layers.append(layer)
    head = _norm_weight(model.norm, dtype), _product(model.output, dtype)
    if any(part is None for part in head):
        return None
    return EagerStep(model, dtype, ops, layers, head)
