"""Read checkpoints of other projects without running code from them.

Pickled checkpoints (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) load with ``torch.load(weights_only=True)``:
only tensors and plain containers are rebuilt, and a pickle that names any other class or function
is refused. Real training checkpoints carry a few harmless extras beside the weights, so these
names, and only these, are allowed and resolved to stand-ins that merely record the pickled data
(the real classes are never imported, so their code cannot run and need not be installed):

- PyTorch Lightning (taming-transformers' ``last.ckpt``): the ``callbacks`` entry is keyed by the
  callback class (``ModelCheckpoint``; Lightning < 1.5) and holds its state; ``hyper_parameters``
  may be an ``AttributeDict`` or omegaconf ``DictConfig``; monitored scores may be numpy scalars.
- LlamaGen (``vq_ds16_c2i.pt``, ``c2i_*.pt``): ``{"model", "optimizer", "steps", "args"}`` (+ "ema"),
  where ``args`` is the training script's ``argparse.Namespace`` (rebuilt as a real Namespace: it
  only holds attributes, and its values are read to configure the import).

Large files are memory-mapped (``mmap=True``) when they use torch's zip format. ``.safetensors``
files are read by safetensors and need none of this.
"""

from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import torch

SAFETENSORS_SUFFIX = ".safetensors"


class UnsafeCheckpointError(pickle.UnpicklingError, ValueError):
    """A pickled checkpoint names a class or function outside the allowlist; nothing from it ran."""

    def __init__(self, path: Path, name: str, detail: str):
        self.path, self.name = path, name
        super().__init__(
            f"{path}: refused to load: the file refers to '{name}', which is not on vqgpt's allowlist of "
            f"harmless classes, so loading it could run code from the file (nothing was executed). "
            f"If you trust the file, convert its weights to .safetensors in an environment of your choice "
            f"and import that instead. (torch: {_unpickler_reason(detail)})")


class InertObject:
    """Stand-in for an allowlisted class of another library: keeps the pickled data, runs nothing."""

    source_name: ClassVar[str] = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "InertObject":
        obj = super().__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<inert stand-in for {self.source_name}>"


def _inert(name: str) -> type[InertObject]:
    return type(name.rsplit(".", 1)[-1], (InertObject,), {"source_name": name, "__module__": __name__})


def _empty_dict(*args: Any) -> dict:
    """Stand-in for collections.defaultdict(factory): a plain dict (pickle fills it by SETITEMS)."""
    return {}


# Full name -> where it occurs. Only names listed here (and in _REAL_NAMES) may appear in a pickle.
_INERT_NAMES = {
    # PyTorch Lightning callbacks: the class object keys `checkpoint["callbacks"]` (Lightning < 1.5).
    **{f"{pkg}.callbacks.{mod}.{cls}": "Lightning callback state" for pkg in ("pytorch_lightning", "lightning.pytorch")
       for mod, cls in (("model_checkpoint", "ModelCheckpoint"), ("early_stopping", "EarlyStopping"),
                        ("lr_monitor", "LearningRateMonitor"), ("progress", "ProgressBar"))},
    # omegaconf containers: Lightning stores `hyper_parameters` as a DictConfig when given one.
    **{f"omegaconf.{name}": "omegaconf hyper-parameters" for name in (
        "dictconfig.DictConfig", "listconfig.ListConfig", "base.ContainerMetadata", "base.Metadata",
        "nodes.AnyNode", "nodes.StringNode", "nodes.IntegerNode", "nodes.FloatNode", "nodes.BooleanNode",
        "nodes.ValueNode")},
    "typing.Any": "omegaconf type metadata",
    # numpy scalars / arrays (e.g. a monitored metric); their bytes are kept, never interpreted.
    **{f"numpy.{core}.multiarray.{name}": "numpy value" for core in ("core", "_core")
       for name in ("scalar", "_reconstruct")},
    "numpy.dtype": "numpy value",
    "numpy.ndarray": "numpy value",
    **{f"numpy.dtypes.{name}DType": "numpy value"
       for name in ("Float64", "Float32", "Float16", "Int64", "Int32", "Bool")},
    # Paths stored by callbacks (dirpath); kept as inert records.
    "pathlib.PosixPath": "Lightning callback state",
    "pathlib.WindowsPath": "Lightning callback state",
}
_REAL_NAMES: dict[str, tuple[Any, str]] = {
    "argparse.Namespace": (argparse.Namespace, "LlamaGen training arguments"),
    # dict subclasses become plain dicts (the unpickler only fills exact dicts).
    "pytorch_lightning.utilities.parsing.AttributeDict": (dict, "Lightning hyper-parameters"),
    "lightning_fabric.utilities.data.AttributeDict": (dict, "Lightning hyper-parameters"),
    "lightning.fabric.utilities.data.AttributeDict": (dict, "Lightning hyper-parameters"),
    "collections.defaultdict": (_empty_dict, "omegaconf resolver cache"),
    # Builtin types appear as values of omegaconf metadata (object_type, element_type).
    **{f"builtins.{t.__name__}": (t, "omegaconf type metadata") for t in (dict, list, tuple, str, int, float, bool)},
}

# What each allowlisted name appears for (documentation and tests).
ALLOWED_GLOBALS: dict[str, str] = {**_INERT_NAMES, **{k: why for k, (_, why) in _REAL_NAMES.items()}}


def _safe_globals() -> list[tuple[Any, str]]:
    pairs = [(_inert(name), name) for name in _INERT_NAMES]
    pairs += [(obj, name) for name, (obj, _) in _REAL_NAMES.items()]
    return pairs


_SAFE_GLOBALS = _safe_globals()


def _unpickler_reason(message: str) -> str:
    """The specific line of torch's weights_only refusal (skipping its generic advice to disable it)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    specific = [line for line in lines if re.search(r"GLOBAL|unrecognized function|Can only|Unsupported", line)]
    return (specific or lines or ["no detail"])[0].replace("WeightsUnpickler error: ", "")


def _offending_name(message: str) -> str | None:
    """The class/function named in torch's weights_only refusal (builtins shown with their module)."""
    for pattern in (r"GLOBAL ([\w.]+)", r"unrecognized function ([\w.<> ]+)", r"but got (<[^>]*>|[\w.]+)"):
        match = re.search(pattern, message)
        if match:
            name = match.group(1).strip()
            return name if "." in name or name.startswith("<") else f"builtins.{name}"
    return None


def load_checkpoint(path: str | Path, mmap: bool = True) -> Any:
    """Load a pickled checkpoint safely (allowlist, never executing code) or a .safetensors file, on CPU.

    Raises ``UnsafeCheckpointError`` naming the class/function if the pickle refers to anything else,
    and ``ValueError`` naming the file if it is damaged (e.g. truncated) or not a checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint {path} is a folder: expected a checkpoint file (a .ckpt, .pt, .pth, "
                                f".bin or {SAFETENSORS_SUFFIX} file), such as one inside it")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # SafetensorError: truncated, damaged or not a safetensors file at all
            raise ValueError(f"{path}: not a readable safetensors checkpoint (safetensors: {exc})") from None
    # Only torch's zip format can be memory-mapped; older files are read whole.
    use_mmap = mmap and zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as exc:
        name = _offending_name(str(exc))
        if name is None:  # not a refused global: a damaged file or an opcode torch never writes
            reason = _unpickler_reason(str(exc))
            raise ValueError(f"{path}: not a readable PyTorch checkpoint (torch: {reason})") from None
        raise UnsafeCheckpointError(path, name, str(exc)) from None
    except Exception as exc:  # damaged or foreign files fail in many ways; always name the file
        raise ValueError(f"{path}: not a readable PyTorch checkpoint: {type(exc).__name__}: {exc}") from None


def is_state_dict(obj: Any) -> bool:
    """True for a non-empty mapping of names to tensors."""
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def find_state_dict(checkpoint: Any, candidates: Sequence[str], path: str | Path,
                    weights: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """(state_dict, entry) from a loaded checkpoint: entry ``weights`` if given, else the first of
    ``candidates`` present, else the checkpoint itself when it is a bare state dict ('<whole file>')."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path}: expected a dict of weights, got {type(checkpoint).__name__}")
    entries = [k for k, v in checkpoint.items() if is_state_dict(v)]
    if weights is not None:
        if weights not in checkpoint:
            raise ValueError(f"{path}: no entry '{weights}' (entries holding weights: {entries or 'none'}; "
                           f"all top-level keys: {list(checkpoint)[:20]})")
        if not is_state_dict(checkpoint[weights]):
            raise ValueError(f"{path}: entry '{weights}' is not a dict of tensors")
        return dict(checkpoint[weights]), weights
    for key in candidates:
        if key in checkpoint and is_state_dict(checkpoint[key]):
            return dict(checkpoint[key]), key
    if is_state_dict(checkpoint):
        return dict(checkpoint), "<whole file>"
    raise ValueError(f"{path}: no model weights found: expected an entry named one of {list(candidates)} "
                     f"or a bare state dict (top-level keys: {list(checkpoint)[:20]})")
