"""Drawing one token per grid position: top-k / top-p filters, classifier-free guidance, the draw itself.

Every sampler draws its randomness the same way, one (B, V) exponential draw per grid position in
raster order (the "exponential race": argmax(p / E) ~ Categorical(p), no host sync), so the cached,
uncached and sliding-window samplers give the same tokens from the same ``torch.Generator``.
The loops that walk a grid (``stage2_prior.sampling``, ``stage2_prior.highres``) import this module;
it imports none of them.
"""

from __future__ import annotations

import functools
import math
import operator
import threading
import warnings
from dataclasses import dataclass
from numbers import Real
from typing import Any, Callable, Sequence, TypeVar, Union

import torch

from stage2_prior.model import GPT, UNCONDITIONAL, needs_class_label
from vqgpt.training.config import cpu_has_fast_bf16

CFG_SCHEDULES = ("constant", "linear")
# The randomness of a draw: one generator for the whole batch (None: torch's global one), or one
# generator per row, so that each sample's tokens depend on its own generator only, not on the
# batch it is drawn in (``vqgpt.workflow.sample_many`` draws 50,000 samples that way on many processes).
Randomness = Union[torch.Generator, Sequence[torch.Generator], None]


MAX_CFG_SCALE = 1e4


@dataclass(frozen=True)
class SamplingConfig:
    """How each token is drawn: temperature, top-k / top-p filters and classifier-free guidance.

    Validated once here; the randomness (a ``torch.Generator`` or a seed) travels beside it, since a
    generator is state and evaluation varies the seed per batch.
    """

    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int | None = None  # sample among the k most likely tokens only
    top_p: float | None = None  # nucleus: the smallest set whose probability reaches top_p
    cfg_scale: float = 1.0  # classifier-free guidance; 1 = off, 0 = unconditional
    cfg_schedule: str = "constant"  # guidance per raster position: one of CFG_SCHEDULES

    def __post_init__(self) -> None:
        for name in ("temperature", "cfg_scale", "top_p"):  # '0.5' or True would pass or fail obscurely below
            value = getattr(self, name)
            if not (value is None and name == "top_p") and (isinstance(value, bool) or not isinstance(value, Real)):
                raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
        for name in ("temperature", "cfg_scale"):  # NaN passes every comparison; inf * 0 logits are NaN
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and not isinstance(self.top_k, (bool, int)) and hasattr(self.top_k, "__index__"):
            try:  # numpy's and torch's integers, as elsewhere
                object.__setattr__(self, "top_k", operator.index(self.top_k))
            except TypeError:  # (a float tensor has __index__ and refuses it): said below
                pass
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ValueError(f"top_k must be an int >= 1 or None, got {self.top_k!r}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:  # also refuses NaN
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0 (1 = no guidance, 0 = unconditional), got {self.cfg_scale}")
        if self.cfg_scale > MAX_CFG_SCALE:  # far past any use; near float32's range the guided logits turn NaN
            raise ValueError(f"cfg_scale must be <= {MAX_CFG_SCALE:g} (scales in use are 1-10), got {self.cfg_scale}")
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {self.cfg_schedule!r}")


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Logits (B, V) with all but the top_k largest per row set to -inf (ties with the k-th are kept)."""
    if top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits (B, V) keeping the smallest most-likely set whose probability reaches top_p (nucleus); rest -inf."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # A token is dropped when the tokens ranked above it already reach top_p; the first always stays.
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= top_p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _exponential(shape: torch.Size, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Exp(1) noise of ``shape`` on ``like``'s device and dtype, drawn on the generator's own device (a CPU
    generator with a prior on a GPU draws there and the noise moves: the same seed, the same noise)."""
    device = like.device if generator is None else generator.device
    return _moved(torch.empty(shape, dtype=like.dtype, device=device).exponential_(generator=generator), like.device)


def _moved(noise: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``noise`` on ``device``; from the CPU to a GPU through pinned memory, so that the copy is queued: from
    pageable memory it would wait for the GPU's stream, once a token."""
    if noise.device.type == "cpu" and device.type == "cuda":
        return noise.pin_memory().to(device, non_blocking=True)
    return noise.to(device)


def exponential_noise(like: torch.Tensor, generator: Randomness) -> torch.Tensor:
    """Exp(1) noise shaped like ``like`` (B, V): from one generator, or row b from ``generator[b]`` alone."""
    if generator is None or isinstance(generator, torch.Generator):
        return _exponential(like.shape, like, generator)
    if len(generator) != like.shape[0]:
        raise ValueError(f"one generator per sample: got {len(generator)} generators for {like.shape[0]} samples")
    devices = {g.device for g in generator}
    if len(devices) == 1:  # drawn there row by row, moved once
        device = devices.pop()
        rows = [torch.empty(like.shape[1:], dtype=like.dtype, device=device).exponential_(generator=g)
                for g in generator]
        return _moved(torch.stack(rows), like.device)
    return torch.stack([_exponential(like.shape[1:], like, g) for g in generator])


class NonFiniteLogits(ValueError):
    """The prior's logits of a position are NaN or inf: its weights (or the guidance) overflowed."""


def _raise_nonfinite(largest: torch.Tensor | None, position: int | None, samples: torch.Tensor | None = None) -> None:
    where = f"at raster position {position}" if position is not None else "at this position"
    if largest is not None:
        bad = (~torch.isfinite(largest)).nonzero().flatten()
        rows = (bad if samples is None else samples.cpu()[bad.cpu()]).tolist()
        where += f" for sample rows {rows[:8]}{' ...' if len(rows) > 8 else ''} (largest {largest[bad[0]].item()})"
    raise NonFiniteLogits(f"the prior produced non-finite logits (NaN or inf) {where}: its weights overflow (a "
                          "diverged or damaged prior?) or the guidance scale does; no code can be drawn")


def check_logits(largest: torch.Tensor, position: int | None = None, samples: torch.Tensor | None = None) -> None:
    """Raise NonFiniteLogits when a row's largest logit ``largest`` (B,) is not finite (a host sync); ``samples``:
    the sample index of each row, for the message (default: row b is sample b)."""
    if not bool(torch.isfinite(largest).all()):
        _raise_nonfinite(largest, position, samples)


class FiniteWatch:
    """The finite-logits check of one sampling call over ``positions`` raster positions: on a CPU each position
    at once (a sync costs nothing there); on an accelerator one flag per position is written on the device
    (three small kernels a token) and ``done`` raises for the first failing one after the last, so that the
    host never waits for a token (the draws after a non-finite position are wasted, not wrong: the call raises)."""

    def __init__(self, device: torch.device, positions: int):
        self.deferred = torch.device(device).type != "cpu"
        self.positions = positions
        self._finite: torch.Tensor | None = None  # on the device: (positions,) bool, True until seen failing

    def see(self, largest: torch.Tensor, position: int, samples: torch.Tensor | None = None) -> None:
        if not self.deferred:
            check_logits(largest, position, samples)
            return
        if self._finite is None:
            self._finite = torch.ones(self.positions, dtype=torch.bool, device=largest.device)
        self._finite[position].copy_(torch.isfinite(largest).all())  # no host-to-device copy, no sync

    def done(self) -> None:
        if self._finite is not None:
            failed = (~self._finite).nonzero().flatten().tolist()  # the call's one sync
            if failed:
                _raise_nonfinite(None, failed[0])


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  generator: Randomness = None, position: int | None = None, watch: FiniteWatch | None = None, *,
                  discard: torch.Tensor | None = None, samples: torch.Tensor | None = None) -> torch.Tensor:
    """Draw one token per row of logits (B, V) -> (B,) long; temperature 0 means greedy (argmax).

    ``generator``: one ``torch.Generator`` for the batch, or a sequence of B, one per row. A row whose
    largest logit is NaN or inf (a NaN or +inf anywhere in it, or -inf everywhere: nothing to draw) is a
    NonFiniteLogits (a ValueError) naming the rows and ``position`` (the raster position drawn, when given),
    where softmax would turn it into NaN and the draw into code 0: raised now, or by ``watch`` (a sampling
    call's FiniteWatch, which on an accelerator raises when the call is done). ``discard``: a (B,) mask of
    rows whose draw the caller throws away (a known cell): not checked; ``samples``: the sample index of
    each row, for the message (default: row b is sample b).
    """
    largest = logits.amax(dim=-1, keepdim=True)  # (B, 1); amax propagates NaN
    checked = largest.reshape(-1) if discard is None else largest.reshape(-1).masked_fill(discard, 0.0)
    if watch is not None and position is not None:
        watch.see(checked, position, samples)
    else:
        check_logits(checked, position, samples)
    if temperature == 0:
        return logits.argmax(dim=-1)
    if temperature != 1.0:
        # From the row's largest, and by at least the dtype's smallest normal number: a tiny temperature
        # then gives 0 and -inf (greedy, ties drawn at random), never inf - inf or 0 / 0 = NaN.
        logits = logits - largest
        logits = logits / max(temperature, torch.finfo(logits.dtype).tiny)
    if top_k:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1)
    noise = exponential_noise(probs, generator)
    # exponential_ may return exactly 0; 0/0 would be NaN and win the argmax.
    return (probs / noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax(dim=-1)


def cfg_scales(cfg_scale: float, schedule: str, num_positions: int) -> list[float]:
    """Guidance scale per raster position: 'constant', or 'linear' rising from ~1 to cfg_scale."""
    if schedule == "constant":
        return [cfg_scale] * num_positions
    if schedule == "linear":
        return [1.0 + (cfg_scale - 1.0) * (t + 1) / num_positions for t in range(num_positions)]
    raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {schedule!r}")


def check_num_samples(num_samples: Any) -> int:
    """``num_samples`` as an int >= 1 (a NumPy or 0-d tensor integer too), else a ValueError: 2.0, True or "2"
    failed deep inside torch."""
    if isinstance(num_samples, bool):
        raise ValueError(f"num_samples must be a whole number >= 1, got {num_samples!r}")
    try:
        count = operator.index(num_samples)
    except TypeError:
        raise ValueError(f"num_samples must be a whole number >= 1, got {num_samples!r}") from None
    if count < 1:
        raise ValueError(f"num_samples must be >= 1, got {count}")
    return count


def check_sampling_args(model: GPT, sampling: SamplingConfig) -> bool:
    """Whether this model can follow ``sampling``; returns whether guidance (a doubled, null-class batch) is needed.

    Warns when bf16 weights are about to decode on a CPU without bf16 matrix units. Checked here, where
    the weights sit on the device that decodes, not when the dtype is set: a pipeline is set to bf16
    on the CPU and then moved to its GPU."""
    if not isinstance(sampling, SamplingConfig):
        raise ValueError(f"sampling must be a SamplingConfig (e.g. SamplingConfig(temperature=0.9)), got "
                         f"{type(sampling).__name__} {sampling!r}")
    weight = model.tok_embeddings.weight
    if weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and not cpu_has_fast_bf16():
        # Measured on such a CPU (GPT-B width, 2 threads, benchmarks/sampling.py): bf16 1.2x float32's
        # tokens/s at batch 1, 0.8x at batch 8, where its emulated elementwise work binds.
        warnings.warn("bfloat16 decoding on this CPU (no bf16 matrix units) is slower than float32 beyond "
                      "batch 1; float32 or int8 decode faster here", stacklevel=2)
    if sampling.cfg_scale == 1.0:
        return False
    if not model.conditional:
        raise ValueError(f"cfg_scale={sampling.cfg_scale} needs a class-conditional prior; this one is unconditional "
                         "(num_classes=0): use cfg_scale=1")
    if model.null_class is None:
        raise ValueError(f"cfg_scale={sampling.cfg_scale} needs a null class: the prior was built with class_dropout=0")
    return True


def resolve_class_labels(model: GPT, class_labels: int | Sequence[int] | torch.Tensor | None,
                         num_samples: int, device: torch.device | None = None) -> torch.Tensor | None:
    """int / sequence / tensor of class indices -> LongTensor (num_samples,), range- and shape-checked.

    The one place a class label is validated; None for an unconditional prior. Class names are the
    pipeline's business (``VQGPTPipeline.class_index``).
    """
    if not model.conditional:
        if class_labels is not None:
            raise ValueError(UNCONDITIONAL)
        return None
    if class_labels is None:
        raise ValueError(needs_class_label(model.num_classes))
    if isinstance(class_labels, (list, tuple)):  # True among ints became class 1 (a bool tensor is refused below)
        flags = [x for x in class_labels
                 if isinstance(x, bool) or str(getattr(x, "dtype", "")) in ("bool", "torch.bool")]  # (numpy, torch)
        if flags:
            raise ValueError(f"a class label is an int index or a str name, got {flags[0]!r}")
    try:
        labels = torch.as_tensor(class_labels)
    except (TypeError, ValueError, RuntimeError) as exc:  # 2**70, text, ragged lists: torch's own words
        raise ValueError(f"class_labels must be class indices (ints in [0, {model.num_classes})), got "
                         f"{class_labels!r:.80} ({exc})") from None
    if labels.numel() and (labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool):
        raise ValueError(f"class_labels must be integer class indices, got {labels.dtype}")  # ([] is float32)
    if labels.dim() > 1:
        raise ValueError(f"class_labels must be one index or a flat sequence of them, got shape {tuple(labels.shape)}")
    labels = labels.to(torch.long).reshape(-1)
    if labels.numel() == 1:
        labels = labels.repeat(num_samples)  # a copy: callers may edit it
    if labels.shape != (num_samples,):
        raise ValueError(f"class_labels must be an int or have {num_samples} entries, got {labels.numel()}")
    n = model.num_classes
    if labels.min() < 0 or labels.max() >= n:
        bad = labels[(labels < 0) | (labels >= n)].unique().tolist()
        raise ValueError(f"class label {', '.join(map(str, bad))} out of range: this prior has {n} classes, "
                         f"so class_labels must be in [0, {n})")
    return labels.to(device) if device is not None else labels


def guided_labels(model: GPT, labels: torch.Tensor | None, guided: bool) -> torch.Tensor | None:
    """Labels of the model batch: [labels, null, ...] (2B,) when guided, else labels."""
    if not guided:
        return labels
    return torch.cat([labels, torch.full_like(labels, model.null_class)])


def code_groups(model: torch.nn.Module) -> tuple[int, int] | None:
    """(D, K) when ``model``'s codes come D per position from D codebooks of K codes each (residual VQ with a
    codebook per depth, set by the pipeline as ``prior.code_groups``): raster position p then holds a code of
    depth p % D, numbered (p % D) * K .. (p % D) * K + K - 1; else None."""
    return getattr(model, "code_groups", None)


def next_token(logits: torch.Tensor, guided: bool, scale: float, sampling: SamplingConfig,
               generator: Randomness, position: int | None = None, watch: FiniteWatch | None = None, *,
               discard: torch.Tensor | None = None, samples: torch.Tensor | None = None,
               groups: tuple[int, int] | None = None) -> torch.Tensor:
    """Logits (B or 2B, V) of one position -> tokens (B,); guided rows are [cond; uncond]. ``position``:
    the raster position drawn, named in the error about non-finite logits; ``watch``: the call's check;
    ``discard``, ``samples``: as for ``sample_logits``; ``groups``: ``code_groups``, whose other depths'
    codes are never drawn at ``position`` (the tokenizer would decode one with the wrong codebook)."""
    if guided:
        cond, uncond = logits.chunk(2)
        logits = uncond + scale * (cond - uncond)
    if groups is not None and position is not None:
        depth, size = groups
        first = position % depth * size
        only = torch.full_like(logits, float("-inf"))
        only[:, first: first + size] = logits[:, first: first + size]
        logits = only
    return sample_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p, generator, position, watch,
                         discard=discard, samples=samples)


# Models inside an ``eval_mode`` now, by id: [how many holders, the mode the first one found]
_IN_EVAL: dict[int, list] = {}
_IN_EVAL_LOCK = threading.Lock()


class eval_mode:
    """Context manager: model.eval() inside, previous train/eval mode restored after.

    Shared by threads sampling with one model at once: the first to enter notes the model's mode and the
    last to leave restores it. (Each restoring its own, one thread put a train-mode model back in train
    mode while another still sampled with it: dropout in its samples, and the model left in eval mode.)
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __enter__(self) -> None:
        with _IN_EVAL_LOCK:
            held = _IN_EVAL.get(id(self.model))
            if held is None:
                _IN_EVAL[id(self.model)] = [1, self.model.training]
                self.model.eval()
            else:
                held[0] += 1

    def __exit__(self, *exc: object) -> None:
        with _IN_EVAL_LOCK:
            held = _IN_EVAL[id(self.model)]
            held[0] -= 1
            if held[0] == 0:
                del _IN_EVAL[id(self.model)]
                self.model.train(held[1])


_F = TypeVar("_F", bound=Callable[..., Any])


def inference(fn: _F) -> _F:
    """Run ``fn`` under torch.inference_mode, and hand its tensor back as an ordinary one when the caller is
    outside inference mode: an inference tensor refuses in-place edits there (``images.add_(1)``) and
    cannot be saved for backward, which callers of a public function do not expect."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode():
            out = fn(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out.is_inference() and not torch.is_inference_mode_enabled():
            out = out.clone()
        return out

    return run  # type: ignore[return-value]
