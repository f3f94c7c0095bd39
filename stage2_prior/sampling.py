"""The plain sampler ``generate``: code grids of the prior's trained size, with or without a KV cache.

Token-level pieces (filters, guidance, the exponential-race draw) live in ``stage2_prior.draw``;
larger canvases go to the sliding-window sampler in ``stage2_prior.highres``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from stage2_prior.decode import decode_step
from stage2_prior.eager_step import eager_step
from stage2_prior.draw import (CFG_SCHEDULES, FiniteWatch, SamplingConfig, cfg_scales, check_num_samples,
                               check_sampling_args, code_groups, eval_mode, guided_labels, inference, next_token,
                               resolve_class_labels, sample_logits, top_k_filter, top_p_filter)
from stage2_prior.highres import _check_stride, check_grid_size, generate_highres
from stage2_prior.layers import notice_data_edits
from stage2_prior.model import GPT

# The token-level names were defined here before stage2_prior.draw existed; they stay importable from here.
__all__ = ["CFG_SCHEDULES", "SamplingConfig", "cfg_scales", "check_sampling_args", "eval_mode", "generate",
           "guided_labels", "next_token", "resolve_class_labels", "sample_logits", "top_k_filter", "top_p_filter"]


@inference
def generate(model: GPT, num_samples: int, class_labels: int | Sequence[int] | torch.Tensor | None = None,
             grid_size: Sequence[int] | None = None, sampling: SamplingConfig | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None, progress: bool = False,
             window_stride: int | Sequence[int] | None = None,
             generators: Sequence[torch.Generator] | None = None, compile: bool = False) -> torch.Tensor:
    """Sample code grids -> LongTensor (num_samples, h, w); a grid larger than the trained one is sampled
    with sliding windows (``stage2_prior.highres.generate_highres``, moving ``window_stride`` (rows, columns)
    at a time; None: (1, D), one position of a tokenizer with D codes per position, ``code_groups``, as the
    pipeline draws). ``sampling``: default SamplingConfig().

    ``generators``: one per sample, instead of ``generator``: sample b's noise then comes from
    ``generators[b]`` alone, so its tokens do not depend on the other samples of the batch.

    ``compile``: run the one-token step under torch.compile (``stage2_prior.decode``; CUDA graphs on
    a GPU); the first call compiles (seconds to a minute), later calls with the same batch reuse it."""
    sampling = sampling or SamplingConfig()
    num_samples = check_num_samples(num_samples)
    if compile and not use_cache:
        raise ValueError("compile=True compiles the KV-cache decode step: it needs use_cache=True")
    if generators is not None:
        if generator is not None:
            raise ValueError("give generator (one for the batch) or generators (one per sample), not both")
        if len(generators) != num_samples:
            raise ValueError(f"generators must hold one generator per sample: got {len(generators)} "
                             f"for num_samples={num_samples}")
    noise = generator if generators is None else list(generators)
    h, w = model.grid_size
    window_stride = _check_stride(window_stride, h, w, code_groups(model))  # on the trained grid too: said at once
    if grid_size is not None and check_grid_size(grid_size) != (h, w):
        height, width = check_grid_size(grid_size)
        return generate_highres(model, num_samples, height, width, class_labels=class_labels, sampling=sampling,
                                use_cache=use_cache, window_stride=window_stride, generator=noise,
                                progress=progress, compile=compile)
    guided = check_sampling_args(model, sampling)
    device = model.tok_embeddings.weight.device
    labels = guided_labels(model, resolve_class_labels(model, class_labels, num_samples, device), guided)
    T = h * w
    scales = cfg_scales(sampling.cfg_scale, sampling.cfg_schedule, T)
    batch = 2 * num_samples if guided else num_samples
    notice_data_edits(model)  # before the prepared copies or a compiled step are used
    with eval_mode(model):
        step = decode_step(model) if compile else eager_step(model) if use_cache else None
        if use_cache:
            cache = step.new_cache(batch, 1 + T) if step is not None else model.new_cache(batch, 1 + T)
            logits = model.forward_cached(None, 0, labels, cache=cache)  # (batch, 1, V) predicts token 0
        else:
            seq = torch.zeros(batch, T, dtype=torch.long, device=device)  # the token at t is never read for t
            logits = model(seq[:, :1], labels)
        out = torch.empty(num_samples, T, dtype=torch.long, device=device)  # after the cache, which checks the memory
        watch = FiniteWatch(device, T)
        groups = code_groups(model)
        for t in tqdm(range(T), disable=not progress, desc="sampling"):
            tok = next_token(logits[:, -1], guided, scales[t], sampling, noise, t, watch, groups=groups)  # (B,)
            out[:, t] = tok
            if t == T - 1:
                break
            fed = torch.cat([tok, tok]) if guided else tok
            if step is not None:
                logits = step(fed[:, None], t + 1, cache)
            elif use_cache:
                logits = model.forward_cached(fed[:, None], t + 1, cache=cache)
            else:
                seq[:, t] = fed
                logits = model(seq[:, : t + 2], labels)
        watch.done()
    return out.view(num_samples, h, w)
