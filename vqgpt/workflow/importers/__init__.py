"""Import pretrained models of other projects into vqgpt exports, key by key.

- ``import_taming``: a taming-transformers VQGAN (``last.ckpt`` + its YAML) -> a tokenizer export.
- ``import_llamagen_vq``: a LlamaGen VQ tokenizer (``vq_ds16_c2i.pt``) -> a tokenizer export.
- ``import_llamagen_gpt``: a LlamaGen class-to-image GPT (``c2i_B_256.pt``) + a tokenizer export
  -> a pipeline folder (``tokenizer/`` + ``prior/``).

A converter maps every source key to a vqgpt key or drops it for a stated reason (training-only
state such as a discriminator); anything else fails, listing the unmapped source keys and the
unfilled target keys together. Checkpoints are read by ``safe_load.load_checkpoint``: pickles with
``weights_only=True`` and an allowlist of inert stand-ins, never executing code from the file.

This module holds the shared key-mapping machinery; the import functions load lazily.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import torch
import torch.nn as nn

from vqgpt.ground.checkpoint import nonfinite_tensors

_LAZY = {
    "import_taming": "vqgpt.workflow.importers.taming",
    "taming_config": "vqgpt.workflow.importers.taming",
    "import_llamagen_vq": "vqgpt.workflow.importers.llamagen",
    "import_llamagen_gpt": "vqgpt.workflow.importers.llamagen",
    "load_checkpoint": "vqgpt.workflow.importers.safe_load",
    "UnsafeCheckpointError": "vqgpt.workflow.importers.safe_load",
}

__all__ = ["Drop", "ImportResult", "KeyMismatchError", "build_from_state", "check_weights", "remap_state_dict",
           "strip_wrapper_prefix", "target_shapes", *_LAZY]

# Errors list at most this many keys per set (with the total), so a wholesale mismatch stays readable.
MAX_LISTED_KEYS = 40
# One-line errors (bad dtypes, NaN weights) name at most this many tensors.
MAX_LISTED_ONE_LINE = 5


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vqgpt.workflow.importers' has no attribute {name!r}")


@dataclass(frozen=True)
class Drop:
    """A source key deliberately not imported: ``group`` names the kind of key, ``reason`` says why."""

    group: str
    reason: str


class ImportResult(NamedTuple):
    """out: the folder written; weights: which entry of the checkpoint was read (e.g. 'state_dict',
    'ema'); num_tensors: tensors imported; dropped: {group: 'reason (N tensors)'} of skipped keys."""

    out: Path
    weights: str
    num_tensors: int
    dropped: dict[str, str]


class KeyMismatchError(ValueError):
    """The source checkpoint and the target model do not correspond key for key."""

    def __init__(self, what: str, unmapped: list[str], missing: list[str], mismatched: list[str]):
        self.unmapped, self.missing, self.mismatched = unmapped, missing, mismatched
        lines = [f"{what}: the checkpoint does not match the target model key for key"]
        for title, keys in (("source keys with no target", unmapped), ("target keys not filled", missing),
                            ("shape mismatches", mismatched)):
            if keys:
                shown = ", ".join(keys[:MAX_LISTED_KEYS])
                more = f", ... and {len(keys) - MAX_LISTED_KEYS} more" if len(keys) > MAX_LISTED_KEYS else ""
                lines.append(f"  {title} ({len(keys)}): {shown}{more}")
        super().__init__("\n".join(lines))


Renamer = Callable[[str], "str | Drop | None"]


def remap_state_dict(source: Mapping[str, torch.Tensor], rename: Renamer, expected: Mapping[str, torch.Size],
                     what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Map every source key through ``rename`` (target name, ``Drop`` or None = no rule) onto
    ``expected``; return (state, {group: 'reason (N tensors)'}) or raise ``KeyMismatchError``
    listing unmapped source keys, unfilled target keys and shape mismatches together. The mapped
    tensors must then pass ``check_weights`` (every target of an import is a float weight or buffer);
    dropped ones are not read."""
    state: dict[str, torch.Tensor] = {}
    drops: dict[Drop, int] = {}
    unmapped, mismatched = [], []
    origin: dict[str, str] = {}
    for key, tensor in source.items():
        target = rename(key)
        if isinstance(target, Drop):
            drops[target] = drops.get(target, 0) + 1
            continue
        if target is None or target not in expected:
            unmapped.append(key if target in (None, key) else f"{key} (-> {target})")
            continue
        if target in origin:
            unmapped.append(f"{key} (-> {target}, already filled by {origin[target]})")
            continue
        if not isinstance(tensor, torch.Tensor):
            mismatched.append(f"{key}: not a tensor ({type(tensor).__name__})")
            continue
        if tuple(tensor.shape) != tuple(expected[target]):
            name = key if key == target else f"{key} -> {target}"
            mismatched.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[target])}")
        origin[target] = key
        state[target] = tensor
    missing = [k for k in expected if k not in origin]
    if unmapped or missing or mismatched:
        raise KeyMismatchError(what, sorted(unmapped), sorted(missing), mismatched)
    check_weights({key: state[target] for target, key in origin.items()}, what)
    dropped = {d.group: f"{d.reason} ({n} tensors)" for d, n in drops.items()}
    return state, dropped


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED_ONE_LINE])
    more = f", ... and {len(items) - MAX_LISTED_ONE_LINE} more" if len(items) > MAX_LISTED_ONE_LINE else ""
    return f"{len(items)} tensor{'s' if len(items) != 1 else ''}: {shown}{more}"


def check_weights(source: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse weights that would import into a broken model: tensors that are not floating-point
    (e.g. saved with ``.long()``) and tensors holding NaN or inf; the error names the source keys."""
    not_float = [f"{k} ({t.dtype})" for k, t in source.items() if not t.is_floating_point()]
    if not_float:
        raise ValueError(f"{what}: expected floating-point weights, found other types in {_listed(not_float)}")
    broken = nonfinite_tensors(dict(source))
    if broken:
        raise ValueError(f"{what}: NaN or inf values in {_listed(broken)}; refusing to import broken weights")


def _empty_model(model_cls: Callable[[Any], nn.Module], config: Any) -> nn.Module:
    # Parameters on the meta device (no memory, no random init); buffers and other tensors built in
    # __init__ (e.g. RoPE tables) stay real, so constructors that compute with tensors still work.
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return model_cls(config)


def target_shapes(model_cls: Callable[[Any], nn.Module], config: Any) -> dict[str, torch.Size]:
    """Keys and shapes of ``model_cls(config).state_dict()``, without allocating its parameters."""
    return {k: v.shape for k, v in _empty_model(model_cls, config).state_dict().items()}


def build_from_state(model_cls: Callable[[Any], nn.Module], config: Any,
                     state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A model holding ``state`` as float32 weights (strict), built without a random-init pass.

    Meant for exporting: float32 tensors are adopted as they are (memory-mapped ones stay mapped).
    """
    model = _empty_model(model_cls, config)
    targets = model.state_dict()
    # load_state_dict would report a dtype clash once per tensor, each with a long message: name them in one line.
    clashes = [f"{k} ({v.dtype})" for k, v in state.items()
               if k in targets and targets[k].is_floating_point() and not v.is_floating_point()]
    if clashes:
        raise ValueError(f"{type(model).__name__}: expected floating-point weights, found other types in "
                         f"{_listed(clashes)}")
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model


def strip_wrapper_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop a 'module.' (DDP/DeepSpeed) or '_orig_mod.' (torch.compile) prefix shared by every key."""
    state = dict(state)
    changed = True
    while changed and state:
        changed = False
        for prefix in ("module.", "_orig_mod."):
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state
