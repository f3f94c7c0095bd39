"""Sliding-window sampling and completion on canvases larger than the prior's training grid.

Algorithm (taming-transformers' sliding window, arranged so that KV caches can be reused)
--------------------------------------------------------------------------------------
A prior trained on (h, w) grids fills an (H, W) canvas, H >= h and W >= w, in raster order.
Position (i, j) is predicted from the h x w window whose top-left cell is (r0, c0):

    r0 = clamp(ceil((i - h + 1) / sr) * sr, 0, H - h)
    c0 = clamp(floor((j - w // 2 + sc // 2) / sc) * sc, 0, W - w)

with window strides (sr, sc) = ``window_stride`` (default (1, D): one latent position of D codes, D = 1
unless the prior's tokenizer puts several codes per position, ``draw.code_groups``; a column stride that
is not a multiple of D is refused, since a window starting inside a position shows the prior codes at
columns of other depths than it was trained on). With stride 1 the target sits
in the window's last row (every row above it inside the window is visible; rows below are not
sampled yet, so looking at them would be useless) and in its middle column w // 2 (taming's
placement), clamped at the canvas borders. A stride s > 1 lets the window stand still for s rows
/ columns: the target then moves within the last sr rows and within sc columns around the middle,
trading a little context for sc-fold (sr-fold) cache reuse.

Inside the window every cell gets window-relative coordinates (r - r0, c - c0) and the window is
read in its own raster order, so the prior sees exactly what it saw in training: the sequence
[prefix, window cells before the target]. Cells after the target in window order (right of it in
its row and every row below) are never read, and every cell before it is before (i, j) in canvas
raster order, i.e. already sampled or known.

Reuse: for a fixed window (r0, c0) the sequences of successive targets are prefixes of each other,
because tokens never change once sampled. Each window column c0 therefore keeps a KV cache with
the slots it has computed; a new target feeds only the window cells sampled since (one chunk with
a causal mask), and the logits of its last slot predict the target. A cache restarts when r0
changes. Then the window rows above the current row are all known before the row starts, so the
windows of the row that restart are prefilled together in one batched forward (n_windows * B
sequences) rather than one after another; within the row each target adds only the cells of its
own row. Caches exist for up to ``max_window_caches`` window columns (None: all, about
ceil((W - w) / sc) + 1 caches of batch x n_layer x (1 + h*w) x 2 x dim values); other columns
share one scratch cache, still reused while consecutive targets keep the same window. All samples
and both halves of classifier-free guidance run as one batch. When (H, W) = (h, w) there is one
window, fed one token at a time: exactly ``generate``'s cached loop, with the same draws.

``use_cache=False`` is the naive scheme, one full forward of the window prefix per position.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from stage2_prior.decode import decode_step
from stage2_prior.eager_step import eager_step
from stage2_prior.draw import (FiniteWatch, Randomness, SamplingConfig, cfg_scales, check_num_samples,
                               check_sampling_args, code_groups, eval_mode, guided_labels, inference, next_token,
                               resolve_class_labels)
from stage2_prior.layers import KVCache, notice_data_edits
from stage2_prior.model import GPT


def window_origin(i: int, j: int, canvas: tuple[int, int], window: tuple[int, int],
                  stride: tuple[int, int] = (1, 1)) -> tuple[int, int]:
    """Top-left cell (r0, c0) of the window that predicts canvas cell (i, j) (see module docstring)."""
    (H, W), (h, w), (sr, sc) = canvas, window, stride
    r0 = -((h - 1 - i) // sr) * sr  # ceil((i - h + 1) / sr) * sr
    c0 = ((j - w // 2 + sc // 2) // sc) * sc
    return min(max(r0, 0), H - h), min(max(c0, 0), W - w)


@dataclass
class _WindowCache:
    cache: KVCache | None = None
    origin: tuple[int, int] = (-1, -1)
    filled: int = 0  # slots computed: the prefix and window cells 0 .. filled - 2


def _int_pair(value: object) -> tuple[int, int] | None:
    """One integer for both, or a pair of them (Python, numpy or torch integers) -> (int, int); None for anything
    else (a float, a bool, three numbers, text)."""
    if hasattr(value, "tolist"):  # numpy and torch scalars and arrays
        value = value.tolist()
    items = tuple(value) if isinstance(value, (list, tuple)) else (value, value)
    if len(items) != 2 or any(isinstance(item, bool) for item in items):
        return None
    try:
        return operator.index(items[0]), operator.index(items[1])
    except TypeError:
        return None


def _check_stride(window_stride: int | Sequence[int] | None, h: int, w: int,
                  groups: tuple[int, int] | None = None) -> tuple[int, int]:
    """``window_stride`` as (rows, columns); None: (1, D), one position of the ``code_groups`` (D, K)."""
    depth = groups[0] if groups is not None else 1
    if window_stride is None:
        return 1, depth
    stride = _int_pair(window_stride)
    if stride is None or not (1 <= stride[0] <= h and 1 <= stride[1] <= w):
        raise ValueError(f"window_stride must be an integer or (rows, columns) of integers in 1..{h} (rows) and "
                         f"1..{w} (columns), got {window_stride!r}")
    if stride[1] % depth:
        raise ValueError(f"window_stride {window_stride!r}: this prior's tokenizer puts {depth} codes side by side "
                         f"per position (code_groups {tuple(groups)}), so windows move a multiple of {depth} columns "
                         f"(the default (1, {depth}) moves one position): a window starting inside a position shows "
                         "the prior codes at columns of other depths than it was trained on")
    return stride


def _check_codes(tokens: torch.Tensor) -> None:
    """Code grids (B, H, W) of integers, at least one grid: else a ValueError saying which."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
        raise ValueError(f"tokens must be (B, H, W), got shape {tuple(getattr(tokens, 'shape', ()))}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be integer codes, got {tokens.dtype}")  # 3.7 was read as code 3
    if tokens.shape[0] == 0:  # (failed in a reduction inside torch)
        raise ValueError("tokens hold no grids (B = 0): give at least one")


def check_grid_size(grid_size: int | Sequence[int]) -> tuple[int, int]:
    """A requested code grid (rows, columns), or one integer for a square one -> (int, int), each >= 1."""
    size = _int_pair(grid_size)
    if size is None or min(size) < 1:
        raise ValueError(f"grid_size must be (rows, columns) of integers >= 1 (or one integer), got {grid_size!r}")
    return size


@inference
def complete(model: GPT, tokens: torch.Tensor, known_mask: torch.Tensor | None = None, keep_rows: int | None = None,
             class_labels: int | Sequence[int] | torch.Tensor | None = None, sampling: SamplingConfig | None = None,
             use_cache: bool = True, window_stride: int | Sequence[int] | None = None,
             max_window_caches: int | None = None, generator: Randomness = None, progress: bool = False,
             compile: bool = False) -> torch.Tensor:
    """Sample the unknown cells of tokens (B, H, W) in raster order -> (B, H, W); known cells are kept.

    Known cells: ``known_mask`` (B, H, W) or (H, W) bool, or the top ``keep_rows`` rows. Values at
    unknown cells are ignored (may be -1). ``sampling`` as in ``generate``; ``window_stride``
    (rows, cols) and ``max_window_caches`` as in the module docstring. ``generator``: one for the batch,
    or one per row (``stage2_prior.draw.Randomness``). ``compile``: feed single cells through the
    compiled decode step (``stage2_prior.decode``); chunks (prefills) stay eager. On a GPU the step's
    caches here belong to the windows, so it runs compiled without a CUDA graph.
    """
    _check_codes(tokens)
    B, H, W = tokens.shape
    h, w = model.grid_size
    if H < h or W < w:
        raise ValueError(f"canvas {H}x{W} is smaller than the prior's grid {h}x{w}")
    groups = code_groups(model)
    if groups is not None and W % groups[0]:  # position p holds depth p % D: each row must hold whole positions
        raise ValueError(f"canvas width {W} is not a multiple of the {groups[0]} codes per position of this prior's "
                         f"tokenizer (code_groups {tuple(groups)}): a row would end inside a position, and the codes "
                         f"of the next row would come from the wrong depths")
    if (known_mask is None) == (keep_rows is None):
        raise ValueError("pass exactly one of known_mask and keep_rows")
    device = model.tok_embeddings.weight.device
    if keep_rows is not None:
        rows = _int_pair(keep_rows)
        if rows is None:  # (2.5 failed as a slice index)
            raise ValueError(f"keep_rows must be an integer, got {keep_rows!r}")
        keep_rows = rows[0]
        if not 0 <= keep_rows <= H:
            raise ValueError(f"keep_rows must be in [0, {H}], got {keep_rows}")
        known_mask = torch.zeros(H, W, dtype=torch.bool)
        known_mask[:keep_rows] = True
    known_mask = torch.as_tensor(known_mask).to(device=device, dtype=torch.bool)
    if known_mask.shape == (H, W):
        known_mask = known_mask.expand(B, H, W)
    if known_mask.shape != (B, H, W):
        raise ValueError(f"known_mask must be (B, H, W)={(B, H, W)} or (H, W), got {tuple(known_mask.shape)}")
    tokens = tokens.to(device=device, dtype=torch.long)
    known_values = tokens[known_mask]
    if known_values.numel() and (known_values.min() < 0 or known_values.max() >= model.config.codebook_size):
        raise ValueError(f"known tokens must be in [0, {model.config.codebook_size})")
    stride = _check_stride(window_stride, h, w, groups)
    if max_window_caches is not None and max_window_caches < 0:
        raise ValueError(f"max_window_caches must be >= 0 or None, got {max_window_caches}")
    sampling = sampling or SamplingConfig()
    if compile and not use_cache:
        raise ValueError("compile=True compiles the KV-cache decode step: it needs use_cache=True")
    guided = check_sampling_args(model, sampling)
    labels = guided_labels(model, resolve_class_labels(model, class_labels, B, device), guided)
    notice_data_edits(model)  # before the prepared copies or a compiled step are used
    scales = cfg_scales(sampling.cfg_scale, sampling.cfg_schedule, H * W)
    batch = 2 * B if guided else B
    canvas = torch.where(known_mask, tokens, 0)  # (B, H, W)
    todo = (~known_mask.flatten(1).all(0)).nonzero().flatten().tolist()  # cells some sample still needs
    rows: dict[int, list[int]] = {}
    for pos in todo:
        rows.setdefault(pos // W, []).append(pos % W)
    any_known = bool(known_mask.any())
    per_sample = generator is not None and not isinstance(generator, torch.Generator)  # one per row
    capacity = max_window_caches if max_window_caches is not None else W
    pool: dict[int, _WindowCache] = {}  # window column c0 -> its cache
    scratch = _WindowCache()  # shared by window columns beyond the capacity

    def new_cache(batch_size: int) -> KVCache:
        return model.new_cache(batch_size, 1 + h * w, zeroed=compile)

    def window_cache(r0: int, c0: int) -> _WindowCache:
        entry = pool.get(c0)
        if entry is None and len(pool) < capacity:
            entry = pool[c0] = _WindowCache()
        entry = entry or scratch
        if entry.cache is None:
            entry.cache = new_cache(batch)
        if entry.origin != (r0, c0):
            entry.origin, entry.filled = (r0, c0), 0
        return entry

    def prefill_rows_above(i: int, r0: int, columns: list[int]) -> None:
        # The window rows above row i are complete before row i starts: compute them for every
        # window of the row that starts afresh in one batched forward, instead of one by one.
        fresh, free = [], capacity - len(pool)
        for c0 in columns:
            if c0 in pool:
                if pool[c0].origin != (r0, c0):
                    fresh.append(c0)
            elif free > 0:
                fresh.append(c0)
                free -= 1
        if not fresh:
            return
        n = (i - r0) * w  # window cells above row i; the last one is fed with the first target
        parts = []
        for c0 in fresh:
            cells = canvas[:, r0:i, c0: c0 + w].reshape(B, n)[:, : n - 1]
            parts += [cells, cells] if guided else [cells]
        big = new_cache(len(fresh) * batch)
        model.forward_cached(torch.cat(parts), 0, None if labels is None else labels.repeat(len(fresh)),
                             cache=big, last_only=True)
        for k, c0 in enumerate(fresh):
            entry = pool.setdefault(c0, _WindowCache())
            entry.cache, entry.origin, entry.filled = big.select(k * batch, (k + 1) * batch), (r0, c0), n

    watch = FiniteWatch(device, H * W)
    groups = code_groups(model)
    with eval_mode(model), tqdm(total=len(todo), disable=not progress, desc="sampling") as bar:
        step = decode_step(model) if compile else eager_step(model) if use_cache else None
        for i, columns in rows.items():
            r0 = window_origin(i, 0, (H, W), (h, w), stride)[0]
            origins = [window_origin(i, j, (H, W), (h, w), stride)[1] for j in columns]
            if use_cache and i > r0:
                prefill_rows_above(i, r0, list(dict.fromkeys(origins)))
            for j, c0 in zip(columns, origins):
                p = (i - r0) * w + (j - c0)  # target's index in window raster order
                if use_cache:
                    entry = window_cache(r0, c0)
                    first = entry.filled  # first slot to compute; slot s > 0 holds window cell s - 1
                    lo = max(first - 1, 0)
                    if p - lo == 1:
                        fed = canvas[:, r0 + lo // w, c0 + lo % w][:, None]
                    else:
                        fed = canvas[:, r0: r0 + h, c0: c0 + w].reshape(B, h * w)[:, lo:p]  # (B, p - lo)
                    fed = torch.cat([fed, fed]) if guided else fed
                    if step is not None and first > 0 and fed.shape[1] == 1:
                        logits = step(fed, first, entry.cache)[:, -1]
                    else:
                        logits = model.forward_cached(fed, first, labels if first == 0 else None,
                                                      cache=entry.cache, last_only=True)[:, -1]
                    entry.filled = p + 1
                else:
                    fed = canvas[:, r0: r0 + h, c0: c0 + w].reshape(B, h * w)[:, : p + 1]  # cell p is not read
                    fed = torch.cat([fed, fed]) if guided else fed
                    logits = model(fed, labels)[:, -1]
                need = ~known_mask[:, i, j]
                if per_sample and any_known and not bool(need.all()):
                    # Draw only for the samples that need this cell: a per-sample generator then advances
                    # at its own sample's unknown cells alone, so the sample does not depend on its batch.
                    b = need.nonzero().flatten()
                    logits = torch.cat([logits[b], logits[b + B]]) if guided else logits[b]
                    canvas[b, i, j] = next_token(logits, guided, scales[i * W + j], sampling,
                                                 [generator[k] for k in b.tolist()], i * W + j, watch, samples=b,
                                                 groups=groups)
                    bar.update()
                    continue
                tok = next_token(logits, guided, scales[i * W + j], sampling, generator, i * W + j, watch,
                                 discard=known_mask[:, i, j] if any_known else None, groups=groups)
                if any_known:
                    tok = torch.where(known_mask[:, i, j], canvas[:, i, j], tok)
                canvas[:, i, j] = tok
                bar.update()
    watch.done()
    return canvas


def generate_highres(model: GPT, num_samples: int, height: int, width: int,
                     class_labels: int | Sequence[int] | torch.Tensor | None = None,
                     sampling: SamplingConfig | None = None, use_cache: bool = True,
                     window_stride: int | Sequence[int] | None = None, max_window_caches: int | None = None,
                     generator: Randomness = None, progress: bool = False, compile: bool = False) -> torch.Tensor:
    """Sample (num_samples, height, width) code grids with sliding windows of the training grid size."""
    num_samples = check_num_samples(num_samples)
    height, width = check_grid_size((height, width))  # (5.5 failed inside torch.zeros)
    device = model.tok_embeddings.weight.device
    empty = torch.zeros(num_samples, height, width, dtype=torch.long, device=device)
    return complete(model, empty, keep_rows=0, class_labels=class_labels, sampling=sampling, use_cache=use_cache,
                    window_stride=window_stride, max_window_caches=max_window_caches, generator=generator,
                    progress=progress, compile=compile)


def extend(model: GPT, tokens: torch.Tensor, height: int, width: int, **options: object) -> torch.Tensor:
    """Grow grids tokens (B, h', w') to the right/down to (B, height, width); the originals stay top-left.

    ``options``: ``complete``'s keyword arguments (class_labels, sampling, generator, ...)."""
    _check_codes(tokens)  # (float codes were cut to integers here, which complete refuses)
    height, width = check_grid_size((height, width))
    B, h0, w0 = tokens.shape
    if height < h0 or width < w0:
        raise ValueError(f"cannot extend a {h0}x{w0} grid to a smaller {height}x{width}")
    canvas = torch.full((B, height, width), -1, dtype=torch.long, device=tokens.device)
    canvas[:, :h0, :w0] = tokens
    known = torch.zeros(height, width, dtype=torch.bool)
    known[:h0, :w0] = True
    return complete(model, canvas, known_mask=known, **options)  # type: ignore[arg-type]
