"""The one-token decode step under ``torch.compile``, built once per prior and reused by every sampler.

The step is ``GPT.forward_cached`` with a tensor ``start_pos``: fixed shapes (the whole static KV
cache is attended behind a mask) and the position passed as data, so it compiles once per batch
size and cache length, not once per position. The prefill (the prefix slot, or a chunk of known
cells) stays eager: it runs once per sequence and its length varies.

On CUDA the step compiles with ``mode="reduce-overhead"`` (a CUDA graph replayed per token); its KV
caches are then kept by the step (one per batch size and length, reused by later calls), because
a CUDA graph reads and writes fixed addresses. On CPU, inductor's default mode; caches are the
caller's.
"""

from __future__ import annotations

import weakref

import torch

from stage2_prior.layers import KVCache
from stage2_prior.model import GPT

_STEPS: "weakref.WeakKeyDictionary[GPT, dict[str, DecodeStep]]" = weakref.WeakKeyDictionary()


def _decode(model: GPT, tokens: torch.Tensor, pos: torch.Tensor, keys: list[torch.Tensor],
            values: list[torch.Tensor]) -> torch.Tensor:
    return model.forward_cached(tokens, pos, cache=KVCache(keys, values))


class DecodeStep:
    """Compiled ``forward_cached`` for one new token per sequence: ``step(tokens (B, 1), pos, cache) -> (B, 1, V)``."""

    def __init__(self, model: GPT, device: torch.device):
        self._model = weakref.ref(model)  # held by the model's entry in _STEPS: no cycle keeping it alive
        self.device = device
        self.cuda_graphs = device.type == "cuda"
        mode = "reduce-overhead" if self.cuda_graphs else None
        # dynamic=False: a new batch size compiles its own static step instead of a symbolic one.
        self._compiled = torch.compile(_decode, mode=mode, dynamic=False, fullgraph=True)
        self._caches: dict[tuple[int, int, torch.dtype], KVCache] = {}

    @property
    def model(self) -> GPT:
        model = self._model()
        if model is None:
            raise RuntimeError("the prior of this decode step no longer exists")
        return model

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A zeroed cache for this step (kept and reused under CUDA graphs: see the module docstring)."""
        dtype = self.model.tok_embeddings.weight.dtype
        if not self.cuda_graphs:
            return self.model.new_cache(batch_size, max_len, zeroed=True)
        key = (batch_size, max_len, dtype)
        if key not in self._caches:
            cache = self.model.new_cache(batch_size, max_len, zeroed=True)
            for t in (*cache.keys, *cache.values):
                torch._dynamo.mark_static_address(t)  # written in place by the graph: a fixed address
            self._caches[key] = cache
        return self._caches[key]

    def __call__(self, tokens: torch.Tensor, pos: int, cache: KVCache) -> torch.Tensor:
        """Logits (B, 1, V) of slot ``pos`` (> 0), feeding tokens (B, 1) there; writes that slot of ``cache``."""
        position = torch.tensor([pos], dtype=torch.long, device=tokens.device)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs have been read
        logits = self._compiled(self.model, tokens, position, cache.keys, cache.values)
        # A CUDA graph's output is overwritten by the next replay: hand out a copy.
        return logits.clone() if self.cuda_graphs else logits


def decode_step(model: GPT) -> DecodeStep:
    """The compiled decode step of ``model`` on its current device, built on first use and then reused."""
    device = model.tok_embeddings.weight.device
    per_device = _STEPS.setdefault(model, {})
    if str(device) not in per_device:
        per_device[str(device)] = DecodeStep(model, device)
    return per_device[str(device)]
