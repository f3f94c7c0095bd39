"""The one-token decode step under ``torch.compile``, built once per prior and reused by every sampler.

The step is ``GPT.forward_cached`` with a tensor ``start_pos``: the position is passed as data, not
baked in as a constant, so the step compiles once per batch size, not once per position (on CUDA
with fixed shapes: the whole static KV cache attended behind a mask; on CPU see below). The
prefill (the prefix slot, or a chunk of known cells) stays eager: it runs once per sequence and
its length varies.

On CUDA the step compiles with ``mode="reduce-overhead"`` (a CUDA graph replayed per token); its KV
caches are then kept by the step (one per batch size and length, reused by later calls), because
a CUDA graph reads and writes fixed addresses.

On CPU the caches are the caller's, and the step differs in two ways, both for speed at a few rows
(benchmarks/sampling.py --compile):

- inductor freezes the weights (folds them into the graph as constants). A batch of one multiplies
  float32 ones with inductor's own C++ GEMM template, autotuned against oneDNN/MKL at compile time,
  which read them at the memory bandwidth at one row on the development CPU (2 cores, AVX2); 2 or more
  rows, bfloat16 weights at one row (where the autotuner chose oneDNN, 1.4x slower: ``layers.Linear``)
  and int8 layers at any batch call the blocked AVX2 kernel of ``stage2_prior.blocked`` as an
  opaque op, which ran the GPT-B products at 8 rows 1.7-1.8x faster than the template: the C++ op
  ``vqgpt_native::blocked_linear``, built when a step is first made, over the blocked copies that
  ``attach_blocked_copies`` hands each ``Linear`` before tracing (``Int8Linear`` keeps its own);
  where that op cannot be built, the Python ops ``vqgpt::few_row_linear`` /
  ``vqgpt::blocked_linear``. Frozen weights are a copy made at compile time, so the step recompiles
  (a fresh code object, so nothing stale is reused) when a parameter or buffer has changed: replaced
  or moved (checked whenever ``decode_step`` hands the step out, which the samplers do once per
  call) or edited in place (its version, checked every step).
- the caches go in whole, every step the same shapes (a graph per batch size and cache length): the
  attention is one op (``blocked.compiled_attention_update``, C++ where the products' op builds) that
  writes the step's slot and reads only the slots written so far. Where that op does not take the
  layer (a head size that is not a multiple of 8, another dtype), the graph attends over the whole
  cache behind a mask, as on CUDA. The caches went in as views of the written length, marked dynamic,
  until the attention became one op: slicing and marking 24 views a step, and the guards on their
  symbolic lengths, cost more than they saved.
- dynamo's ~2,000 guards on the prior itself (its modules' hooks, attributes and parameters) are left
  out (``_not_on_the_prior``): the step checks the weights itself (``watch`` and the versions above),
  and evaluating those guards took about a tenth of a GPT-B int8 step at batch 1. A hook added to
  the prior, or a submodule switched to training, after the step was made is not seen by it.
"""

from __future__ import annotations

import itertools
import re
import types
import weakref

import torch

from stage2_prior.layers import KVCache, attach_blocked_copies, attached_copies_in_use
from stage2_prior.model import GPT

# inductor settings of the CPU step (see the module docstring); the autotuning tables stay quiet.
# cpp.min_chunk_size: inductor's elementwise kernels run on one thread below 2 x 4096 elements (its default,
# 512, split the step's RoPE and SwiGLU kernels of 1,536 and 2,048 elements over the threads: a fork and
# join each, twice a layer, for a few microseconds of work; the same results either way).
_FROZEN_CPU = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
               "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False,
               "cpp.min_chunk_size": 4096}

_PRIOR_GUARD = re.compile(r"(\w+\()*model\b")  # a guard on the prior: model..., type(model...), dict(type(model...


def _not_on_the_prior(guards) -> list[bool]:
    """dynamo's guard filter for a CPU step: keep every guard except those on the prior (the ``model``
    argument), which the step checks itself (see the module docstring)."""
    return [_PRIOR_GUARD.match(guard.name) is None for guard in guards]


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
        self.frozen = device.type == "cpu"
        self._compiled = self._compile()
        # what the frozen graphs were built from: identity and storage of every parameter and buffer, and
        # the versions of those that have a version counter (not tensors made under inference_mode)
        self._storage: tuple[tuple[int, int], ...] | None = None
        self._tracked: list[torch.Tensor] = []
        self._versions: tuple[int, ...] | None = None
        self._caches: dict[tuple[int, int, torch.dtype], KVCache] = {}
        self._positions: list[torch.Tensor] = []  # on an accelerator: slot p's 1-element tensor, made once
        self.watch()

    def _compile(self):
        """A compiled ``_decode`` of its own code object: dynamo keeps compiled graphs per code object, so a
        fresh one starts with none (frozen graphs of older weights are dropped with the old one)."""
        fn = types.FunctionType(_decode.__code__.replace(), _decode.__globals__, _decode.__name__)
        if self.frozen:  # the products' C++ op built (or found missing) and the blocked copies attached
            attach_blocked_copies(self.model)
        if self.cuda_graphs:
            # dynamic=False: a new batch size compiles its own static step instead of a symbolic one.
            return torch.compile(fn, mode="reduce-overhead", dynamic=False, fullgraph=True)
        # Static shapes: a new batch size or cache length compiles its own step (GEMM kernels for its row count).
        return torch.compile(fn, dynamic=False, fullgraph=True, options={"guard_filter_fn": _not_on_the_prior})

    def watch(self) -> "DecodeStep":
        """Re-read the prior's parameters and buffers; drop the frozen graphs if one was replaced or moved.
        (Walking the model takes ~0.4 ms for GPT-B, so it runs per lookup; each step reads the versions
        only.) A tensor made under inference_mode has no version counter: an in-place edit of one,
        possible only under inference_mode, goes unseen. Nothing to watch where the weights are not frozen."""
        if not self.frozen:
            return self
        tensors = list(itertools.chain(self.model.parameters(), self.model.buffers()))
        storage = tuple((id(t), t.data_ptr()) for t in tensors)
        if storage != self._storage:
            if self._storage is not None:
                self._compiled = self._compile()
            self._storage, self._versions = storage, None
        self._tracked = [t for t in tensors if not t.is_inference()]
        return self

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

    def _position(self, pos: int, device: torch.device) -> torch.Tensor:
        """Slot ``pos`` as a 1-element long tensor on ``device``. On an accelerator these are made once, on the
        device (from one arange, so no host copy): ``torch.tensor([pos], device=...)`` copies from pageable host
        memory, which waits for the stream each token, so the host could not queue the next step while the
        device ran this one."""
        if device.type == "cpu":
            return torch.tensor([pos], dtype=torch.long)
        if pos >= len(self._positions) or self._positions[pos].device != device:
            count = max(pos + 1, 2 * len(self._positions), 1024)
            self._positions = [p.clone() for p in torch.arange(count, device=device).split(1)]
        return self._positions[pos]

    def __call__(self, tokens: torch.Tensor, pos: int, cache: KVCache) -> torch.Tensor:
        """Logits (B, 1, V) of slot ``pos`` (> 0), feeding tokens (B, 1) there; writes that slot of ``cache``."""
        if pos < 1:
            raise ValueError(f"a decode step writes a slot after the prefix (pos >= 1), got {pos}")
        cache.check_write(pos, 1)
        position = self._position(pos, tokens.device)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs have been read
        if not self.frozen:
            logits = self._compiled(self.model, tokens, position, cache.keys, cache.values)
        else:
            versions = tuple(t._version for t in self._tracked)
            if self._versions is not None and versions != self._versions:
                self._compiled = self._compile()  # edited in place since they were frozen
            self._versions = versions
            with torch._inductor.config.patch(_FROZEN_CPU), attached_copies_in_use():
                logits = self._compiled(self.model, tokens, position, cache.keys, cache.values)
        cache.filled = pos + 1
        # A CUDA graph's output is overwritten by the next replay: hand out a copy.
        return logits.clone() if self.cuda_graphs else logits


def decode_step(model: GPT) -> DecodeStep:
    """The compiled decode step of ``model`` on its current device, built on first use and then reused
    (after ``DecodeStep.watch``: replaced or moved weights drop its frozen graphs)."""
    device = model.tok_embeddings.weight.device
    per_device = _STEPS.setdefault(model, {})
    if str(device) not in per_device:
        per_device[str(device)] = DecodeStep(model, device)
    return per_device[str(device)].watch()
