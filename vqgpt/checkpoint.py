"""Exports (config.json + model.safetensors) and atomic resume checkpoints.

An export is what users share and load: the model's config dataclass as JSON plus its weights,
loaded strictly. A resume checkpoint is an ``accelerator.save_state`` folder under
RUN/checkpoints/, written to a temporary name and renamed once complete, so that an interrupted
write is never picked up by ``--resume auto``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

from vqgpt.config import ConfigError, from_dict, to_dict

T = TypeVar("T")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CHECKPOINT_PREFIX = "step-"
COMPLETE_MARKER = "COMPLETE"


def save_export(directory: str | Path, kind: str, config: Any, model: torch.nn.Module,
                extra: dict[str, Any] | None = None) -> Path:
    """Write ``config.json`` ({kind, config, extra}) and ``model.safetensors`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Unwrap DDP / torch.compile wrappers so keys carry no 'module.' / '_orig_mod.' prefix.
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    model = getattr(model, "_orig_mod", model)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # safetensors refuses aliased tensors: store each storage once (tied weights are re-tied on load).
    seen: dict[tuple[int, int], str] = {}
    for k in list(state):
        t = state[k]
        ident = (t.untyped_storage().data_ptr(), t.storage_offset())
        if ident in seen and state[seen[ident]].shape == t.shape:
            state[k] = t.clone()
        seen[ident] = k
    tmp = directory / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"kind": kind})
    os.replace(tmp, directory / WEIGHTS_NAME)
    meta = {"kind": kind, "config": to_dict(config), "extra": extra or {}}
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def read_export_meta(directory: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Read ``config.json`` of an export, checking its kind; errors name the folder."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a vqgpt export: {CONFIG_NAME} is missing")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON: {exc}") from exc
    if kind is not None and meta.get("kind") != kind:
        raise ConfigError(f"{path}: expected an export of kind '{kind}', found '{meta.get('kind')}'")
    return meta


def load_export(directory: str | Path, kind: str, config_cls: type[T]) -> tuple[T, dict[str, torch.Tensor], dict]:
    """Return (config, state_dict, extra) of an export; load the weights with strict=True."""
    directory = Path(directory)
    meta = read_export_meta(directory, kind)
    try:
        config = from_dict(config_cls, meta["config"])
    except ConfigError as exc:
        raise ConfigError(f"{directory / CONFIG_NAME}: {exc}") from None
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{directory}: {WEIGHTS_NAME} is missing")
    return config, load_file(str(weights)), meta.get("extra", {})


# ----------------------------------------------------------------------------- resume checkpoints


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, path), oldest first."""
    root = checkpoint_dir(run_dir)
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", p.name)
            if m and p.is_dir() and (p / COMPLETE_MARKER).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(run_dir: str | Path, resume: str | None) -> Path | None:
    """``None`` -> None; ``'auto'`` -> newest complete checkpoint or None; else that folder."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder (no {COMPLETE_MARKER} file)")
    return path


def _fsync(path: Path) -> None:
    """Flush one file or folder entry to disk (best effort: some filesystems refuse folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root``, so a rename never publishes data that is
    still only in the page cache (a power loss would leave empty files behind a COMPLETE marker)."""
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        _fsync(path)
    _fsync(root)


def _remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint so that no crash mid-way leaves a folder that still looks complete."""
    trash = path.with_name(f".del-{path.name}")
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)  # atomic: from here on --resume auto no longer sees it
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(accelerator, run_dir: str | Path, step: int, keep: int = 3,
                    extra: dict[str, Any] | None = None) -> Path:
    """Atomically write ``accelerator.save_state`` to RUN/checkpoints/step-N; keep the last ``keep`` (0 = all).

    Every process writes its part (model and optimizer on the main process or in shards, RNG
    states per rank) into a hidden temporary folder; the main process then adds
    ``trainer_state.json`` and the COMPLETE marker, flushes the files and renames the folder.
    A crash at any point leaves either the previous checkpoints or the new one, never a partial
    folder that ``--resume auto`` would pick. For several machines RUN must be on a shared filesystem.
    """
    root = checkpoint_dir(run_dir)
    final = root / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = root / f".tmp-{CHECKPOINT_PREFIX}{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for debris in list(root.glob(".tmp-*")) + list(root.glob(".del-*")):  # left by an earlier crash
            shutil.rmtree(debris, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **(extra or {})}) + "\n")
        (tmp / COMPLETE_MARKER).write_text(f"{step}\n")
        _fsync_tree(tmp)
        if final.exists():
            _remove_checkpoint(final)
        os.replace(tmp, final)
        _fsync(root)
        if keep > 0:
            for _, old in list_checkpoints(run_dir)[:-keep]:
                _remove_checkpoint(old)
    accelerator.wait_for_everyone()
    return final


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """The small JSON (step, ...) stored beside an accelerate state."""
    return json.loads((Path(path) / "trainer_state.json").read_text())
