"""Exports (config.json + model.safetensors) and atomic resume checkpoints.

An export is what users share and load: the model's config dataclass as JSON plus its weights,
loaded strictly. A resume checkpoint is an ``accelerator.save_state`` folder under
RUN/checkpoints/, written to a temporary name and renamed once complete, so that an interrupted
write is never picked up by ``--resume auto``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vqgpt.ground.config import ConfigError, from_dict, to_dict
from vqgpt.ground.files import check_can_make_file, write_error
from vqgpt.ground.tokens import fingerprint_file, plain_file_name

T = TypeVar("T")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CHECKPOINT_PREFIX = "step-"
COMPLETE_MARKER = "COMPLETE"
# Beside trainer_state.json: what a checkpoint is made of (the files save_state wrote, so that a missing
# one is noticed before anything loads) and what it was trained on (``inputs``, checked on resume).
MANIFEST_NAME = "manifest.json"
ASIDE_PREFIX = ".old-"  # a checkpoint set aside while a save of the same step puts its new copy in place

# Config fields that exports written before they existed lack; each default is what those older
# exports meant (38751fb added the ViT option: older tokenizers are all conv, and the vit_* fields
# are unused by a conv model; the SimVQ, entropy-penalty, LFQ and residual-VQ keys came later too:
# their defaults are "off", and the lfq_* / rvq_* keys are unused by the older kinds vq and fsq).
# Every other field must be present in config.json: a silent default for, say, z_channels would
# only surface later as a weight size-mismatch traceback.
EXPORT_FIELDS_WITH_DEFAULTS: dict[str, tuple[str, ...]] = {
    "vq_tokenizer": ("architecture", "patch_size", "vit_dim", "vit_depth", "vit_heads", "vit_mlp_ratio",
                     "quantizer.simvq", "quantizer.entropy_weight", "quantizer.entropy_temperature",
                     "quantizer.lfq_dim", "quantizer.lfq_temperature", "quantizer.lfq_sample_entropy_weight",
                     "quantizer.lfq_codebook_entropy_weight", "quantizer.rvq_depth", "quantizer.rvq_shared_codebook"),
}


# The sections of an export's config.json; read_export_meta refuses any other top-level key.
EXPORT_SECTIONS = ("kind", "config", "extra")


class NonFiniteWeights(ValueError):
    """An export or checkpoint was about to be written with NaN or inf weights; the message names them."""


def save_export(directory: str | Path, kind: str, config: Any, model: torch.nn.Module,
                extra: dict[str, Any] | None = None) -> Path:
    """Write ``config.json`` ({kind, config, extra}) and ``model.safetensors`` into ``directory``."""
    directory = Path(directory)
    if extra is not None and not isinstance(extra, dict):  # (written, it made an export that does not load)
        raise ValueError(f"extra must be a dict of JSON values, got {type(extra).__name__} {extra!r}")
    try:  # before anything is written: an object json cannot write left an empty folder
        json.dumps(extra or {}, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"extra must hold JSON values (str, numbers, bools, None, lists, dicts): {exc}") from None
    # Unwrapped so that keys carry no 'module.' / '_orig_mod.' prefix.
    state = {k: v.detach().contiguous().cpu() for k, v in _bare_module(model).state_dict().items()}
    broken = nonfinite_tensors(state)
    if broken:  # loading refuses such an export anyway: better no export than one that looks finished
        raise NonFiniteWeights(f"{directory}: refusing to export weights holding NaN or inf values: "
                               f"{name_listing(broken)} (a diverged run?); nothing was written")
    directory.mkdir(parents=True, exist_ok=True)
    # safetensors refuses aliased tensors: store each storage once (tied weights are re-tied on load).
    seen: dict[tuple[int, int], str] = {}
    for k in list(state):
        t = state[k]
        ident = (t.untyped_storage().data_ptr(), t.storage_offset())
        if ident in seen and state[seen[ident]].shape == t.shape:
            state[k] = t.clone()
        seen[ident] = k
    meta = {"kind": kind, "config": to_dict(config), "extra": extra or {}}

    def write_weights(tmp: Path) -> None:
        save_file(state, str(tmp), metadata={"kind": kind})
        # safetensors creates the file 0600: give it the folder's read/write bits (what the umask left), as
        # config.json gets, so that a shared export is readable by those who can read its folder
        os.chmod(tmp, stat.S_IMODE(directory.stat().st_mode) & 0o666)

    _write_export_files(directory, write_weights, lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
    return directory


def _write_export_files(directory: Path, write_weights: Callable[[Path], object],
                        write_config: Callable[[Path], object]) -> None:
    """Write an export's two files as ``.tmp`` siblings, then put them in place: the weights, then
    ``config.json``. A failed or interrupted write (a full disk, a Ctrl-C) leaves the export as it was, without
    the partial files, and a failure is raised as ``write_error`` says. Between the two renames a kill leaves new
    weights beside an older config; the ``config.json.tmp`` left behind tells ``read_export_meta`` so
    (``_check_whole``)."""
    weights_tmp, config_tmp = (directory / (name + ".tmp") for name in (WEIGHTS_NAME, CONFIG_NAME))
    writing = weights_tmp
    try:
        write_weights(weights_tmp)
        writing = config_tmp
        write_config(config_tmp)
    except BaseException as exc:  # a Ctrl-C too: no partial .tmp file is left beside the export
        for tmp in {weights_tmp, writing}:
            tmp.unlink(missing_ok=True)
        if not isinstance(exc, Exception):
            raise
        failure = write_error(exc, directory / writing.name.removesuffix(".tmp"))
        if failure is None or failure is exc:
            raise
        raise failure from None
    os.replace(weights_tmp, directory / WEIGHTS_NAME)
    os.replace(config_tmp, directory / CONFIG_NAME)


def _check_whole(directory: Path) -> None:
    """Refuse an export whose save was killed between its two files (see ``_write_export_files``)."""
    if (directory / (CONFIG_NAME + ".tmp")).is_file() and not (directory / (WEIGHTS_NAME + ".tmp")).exists():
        raise ConfigError(f"{directory}: a save of this export was interrupted after it replaced {WEIGHTS_NAME} "
                          f"and before it replaced {CONFIG_NAME} (it left {CONFIG_NAME}.tmp), so the two files "
                          "come from different saves: save or copy the export again")


def copy_export(source: str | Path, directory: str | Path) -> Path:
    """Copy the export in ``source`` (its ``config.json`` and ``model.safetensors``, nothing else that its
    folder holds) into ``directory``, replacing an export there the way ``save_export`` does."""
    source, directory = Path(source), Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_export_files(directory, lambda tmp: shutil.copy2(source / WEIGHTS_NAME, tmp),
                        lambda tmp: shutil.copy2(source / CONFIG_NAME, tmp))
    return directory


def export_stamp(directory: str | Path) -> tuple | None:
    """Identity of an export's two files as they are on disk now (inode, size, modification time), or None
    when one cannot be read: a file rewritten or replaced since (a resumed run's new export) changes it."""
    try:
        return tuple((s.st_ino, s.st_size, s.st_mtime_ns)
                     for s in (os.stat(Path(directory) / name) for name in (CONFIG_NAME, WEIGHTS_NAME)))
    except OSError:
        return None


def read_export_meta(directory: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Read ``config.json`` of an export, checking its kind and layout; errors name the file."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        hint = ""
        if (directory / "tokenizer").is_dir() and (directory / "prior").is_dir():
            part = {"vq_tokenizer": "tokenizer", "gpt_prior": "prior"}.get(kind or "")
            hint = (f"; it is a pipeline folder: give its {part}/ ({directory / part})" if part else
                    f"; it is a pipeline folder: give {directory / 'tokenizer'} or {directory / 'prior'}")
        elif (directory / "export" / CONFIG_NAME).is_file():
            hint = f"; it looks like a run folder: its export is {directory / 'export'}"
        raise FileNotFoundError(f"{directory} is not a vqgpt export: {CONFIG_NAME} is missing{hint}")
    _check_whole(directory)
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise ConfigError(f"{path}: expected a JSON object with 'kind' and 'config', found {type(meta).__name__}")
    unknown = sorted(set(meta) - set(EXPORT_SECTIONS))
    if unknown:  # a misspelt section ('extras': {'classes': ...}) would otherwise be dropped without a word
        raise ConfigError(f"{path}: unknown top-level key(s) {name_listing(unknown)}; an export's {CONFIG_NAME} "
                          f"holds only {', '.join(repr(k) for k in EXPORT_SECTIONS)}")
    if kind is not None and meta.get("kind") != kind:
        raise ConfigError(f"{path}: expected an export of kind '{kind}', found '{meta.get('kind')}'")
    if not isinstance(meta.get("config"), dict):
        raise ConfigError(f"{path}: the 'config' section is missing or not an object; re-export the model")
    if not isinstance(meta.get("extra", {}), dict):
        raise ConfigError(f"{path}: the 'extra' section is not an object")
    return meta


def read_export_config(directory: str | Path, kind: str, config_cls: type[T]) -> T:
    """The config of an export, loaded strictly: every field must be in ``config.json`` (no silent defaults)."""
    return _strict_config(read_export_meta(directory, kind), Path(directory) / CONFIG_NAME, kind, config_cls)


def _strict_config(meta: dict[str, Any], path: Path, kind: str, config_cls: type[T]) -> T:
    try:
        return from_dict(config_cls, meta["config"], require_all=True,
                         optional=EXPORT_FIELDS_WITH_DEFAULTS.get(kind, ()))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file; a missing, truncated or garbled file is one error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent}: {path.name} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{path}: not a readable safetensors file ({exc}); "
                          f"it may be truncated or damaged: copy or export it again") from None


def load_export(directory: str | Path, kind: str, config_cls: type[T]) -> tuple[T, dict[str, torch.Tensor], dict]:
    """Return (config, state_dict, extra) of an export; the caller loads the weights with strict=True."""
    directory = Path(directory)
    meta = read_export_meta(directory, kind)
    config = _strict_config(meta, directory / CONFIG_NAME, kind, config_cls)
    return config, load_weights(directory / WEIGHTS_NAME), meta.get("extra", {})


def load_export_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], directory: str | Path) -> None:
    """``model.load_state_dict(state, strict=True)``; a mismatch (weights saved for another config, say) is a
    ConfigError naming the export, not a bare RuntimeError."""
    expected = model.state_dict()
    other_kind = [f"{key} ({tensor.dtype}, the model's is {expected[key].dtype})" for key, tensor in state.items()
                  if key in expected and tensor.is_floating_point() != expected[key].is_floating_point()]
    if other_kind:  # load_state_dict would cast them without a word
        raise ConfigError(f"{directory}: {WEIGHTS_NAME} holds tensors of another kind than the model's: "
                          f"{name_listing(other_kind)}")
    broken = nonfinite_tensors(state)
    if broken:  # one NaN spreads through every product: the prior then samples code 0 everywhere
        raise ConfigError(f"{directory}: NaN or inf values in {WEIGHTS_NAME}: {name_listing(broken)}; "
                          "these weights are damaged (a diverged run?): export a checkpoint from before it")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"{directory}: the weights in {WEIGHTS_NAME} do not match {CONFIG_NAME}: {exc}") from None


def nonfinite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """The floating-point tensors of ``state`` that hold NaN or inf, each as 'key (n of N values)'."""
    broken = []
    for key, tensor in state.items():
        if tensor.is_floating_point():
            finite = torch.isfinite(tensor)
            if not bool(finite.all()):
                broken.append(f"{key} ({finite.numel() - int(finite.sum())} of {finite.numel()} values)")
    return broken


def export_fingerprint(directory: str | Path) -> str:
    """Identity of an export: a hash of its weights file (token shards and priors record their tokenizer's)."""
    return fingerprint_file(Path(directory) / WEIGHTS_NAME)


# ----------------------------------------------------------------------------- Hugging Face Hub


def is_hub_id(text: str) -> bool:
    """Whether ``text`` is written like a Hugging Face Hub model id ``owner/name``."""
    if text.count("/") != 1:
        return False
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as the environment says now."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in (
        "1", "ON", "YES", "TRUE")


def resolve_model_dir(name_or_path: str | Path, revision: str | None = None, subfolder: str | None = None) -> Path:
    """A local folder as is; a Hub id ``owner/name`` -> its snapshot folder in the standard Hub cache.

    The snapshot is downloaded (only ``subfolder`` when given) unless it is cached; with
    HF_HUB_OFFLINE set, only the cache is read. ``revision`` (a branch, tag or commit) is for Hub ids.
    Anything else is a FileNotFoundError that says what was looked for.
    """
    text = str(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub ids, but {text} is a local folder")
        return path / subfolder if subfolder else path
    if path.exists():
        raise FileNotFoundError(f"{text} is a file: give a folder or a Hugging Face Hub id (owner/name)")
    if isinstance(name_or_path, Path) or not is_hub_id(text):
        raise FileNotFoundError(f"{text}: no such folder (nor a Hugging Face Hub id, which is written owner/name)")
    root = _hub_snapshot(text, revision, subfolder)
    folder = root / subfolder if subfolder else root
    if not folder.is_dir():
        raise FileNotFoundError(hub_part_missing(text, revision, subfolder))
    return folder


def hub_part_missing(repo_id: str, revision: str | None, part: str) -> str:
    """The message for a folder ``part`` missing from the snapshot of Hub repository ``repo_id``. Offline, the
    snapshot is what the cache holds, which may be only the parts downloaded so far (``subfolder=``)."""
    if hub_offline():
        from huggingface_hub import constants

        return (f"Hub repository {repo_id}{_at(revision)}: its folder {part}/ is not in the local cache "
                f"({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set: download it once with HF_HUB_OFFLINE "
                "unset (or the repository has no such folder)")
    return f"Hub repository {repo_id}{_at(revision)} has no folder {part}/"


def _at(revision: str | None) -> str:
    return f" (revision {revision})" if revision else ""


def _hub_snapshot(repo_id: str, revision: str | None, subfolder: str | None) -> Path:
    """snapshot_download with its errors turned into one FileNotFoundError line each."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = hub_offline()
    what = f"{repo_id}: no such local folder, and Hub repository {repo_id}{_at(revision)}"
    try:
        folder = snapshot_download(repo_id, revision=revision, local_files_only=offline,
                                   allow_patterns=[f"{subfolder}/*"] if subfolder else None)
    except RevisionNotFoundError:
        raise FileNotFoundError(f"Hub repository {repo_id} has no revision {revision!r}") from None
    except GatedRepoError:
        raise FileNotFoundError(f"{what} is gated: accept its terms on the Hub and log in "
                                "(`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{what} does not exist (or is private: log in with `hf auth login` "
                                "or set HF_TOKEN)") from None
    except LocalEntryNotFoundError as exc:
        if offline:
            raise FileNotFoundError(f"{what} is not in the local cache ({constants.HF_HUB_CACHE}) and "
                                    "HF_HUB_OFFLINE is set: download it once with HF_HUB_OFFLINE unset") from None
        raise FileNotFoundError(f"{what} could not be downloaded and is not in the local cache "
                                f"({constants.HF_HUB_CACHE}): {str(exc).splitlines()[0]}") from None
    except HfHubHTTPError as exc:
        raise FileNotFoundError(f"{what} could not be read: {str(exc).splitlines()[0]}") from None
    return Path(folder)


def push_to_hub(save: Callable[[Path], object], repo_id: str, *, private: bool | None = None,
                token: str | None = None, commit_message: str | None = None) -> str:
    """Write a model with ``save(folder)`` into a temporary folder and upload it as Hub repository ``repo_id``.

    The repository is created when missing; returns the URL of the commit.
    """
    import tempfile

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vqgpt-push-") as tmp:
        save(Path(tmp))
        commit = api.upload_folder(repo_id=repo_id, folder_path=tmp,
                                   commit_message=commit_message or "Upload with vqgpt")
    return str(getattr(commit, "commit_url", commit))


# ----------------------------------------------------------------------------- resume checkpoints


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, path), oldest first. A step's copy set aside by a save of the same
    step that stopped before its new copy was in place (``save_checkpoint``) stands for that step."""
    root = checkpoint_dir(run_dir)
    found: dict[int, Path] = {}
    if root.is_dir():
        for p in sorted(root.iterdir(), key=lambda p: not p.name.startswith(ASIDE_PREFIX)):  # set aside first
            m = re.fullmatch(rf"(?:{re.escape(ASIDE_PREFIX)})?{CHECKPOINT_PREFIX}(\d+)", p.name)
            if m and p.is_dir() and (p / COMPLETE_MARKER).is_file():
                found[int(m.group(1))] = p  # the step's own folder, where there is one, comes last
    return sorted(found.items())


def resolve_resume(run_dir: str | Path, resume: str | None) -> Path | None:
    """``None`` -> None; ``'auto'`` -> newest complete checkpoint or None; else that folder."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / COMPLETE_MARKER).is_file():
        if not path.exists():
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint folder (--resume auto takes the newest "
                                    f"complete one of --out {run_dir})")
        inside = list_checkpoints(path)
        hint = (f"; it is a run folder: give --resume auto with --out {resume}, or one of its checkpoints, e.g. "
                f"{inside[-1][1]}") if inside else ""
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder (no {COMPLETE_MARKER} file)"
                                + hint)
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


# what torch's checkpoint writer raises when a write fails (a full disk gave "unexpected pos 60736 vs 60624" and,
# in another run, "basic_ios::clear: iostream error"), as a RuntimeError without an errno
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed", "unexpected pos", "iostream error", "file write failed")


def _checkpoint_write_error(exc: Exception, folder: Path) -> OSError | None:
    """``exc``, raised while writing the checkpoint ``folder``, as an OSError naming it (ENOSPC where the disk
    there has under 64 MB left); None when it is no write failure."""
    failure = write_error(exc, folder)
    if failure is not None or not isinstance(exc, RuntimeError):
        return failure
    said = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if not any(text in said for text in _TORCH_WRITE_FAILURES):
        return None
    try:
        free = shutil.disk_usage(folder.parent).free
    except OSError:
        return None
    code = errno.ENOSPC if free < 64 * 2**20 else errno.EIO
    return OSError(code, f"{os.strerror(code)}: writing the checkpoint failed ({said}); the disk there has "
                         f"{free / 2**20:.1f} MB free", str(folder))


def save_checkpoint(accelerator, run_dir: str | Path, step: int, keep: int = 3,
                    extra: dict[str, Any] | None = None, inputs: dict[str, Any] | None = None,
                    config: dict[str, Any] | None = None) -> Path:
    """Atomically write ``accelerator.save_state`` to RUN/checkpoints/step-N; keep the last ``keep`` (0 = all).

    Every process writes its part (model and optimizer on the main process or in shards, RNG
    states per rank) into a hidden temporary folder; the main process then adds
    ``trainer_state.json`` (``step`` and ``extra``), ``manifest.json`` (the files save_state wrote,
    ``inputs``: what the run trains on, JSON values, and ``config``: the run's resolved config, which
    a resume compares with its own wherever the checkpoint is) and the COMPLETE marker, flushes the files
    and renames the folder.
    A crash at any point leaves either the previous checkpoints or the new one, never a partial
    folder that ``--resume auto`` would pick. For several machines RUN must be on a shared filesystem.
    """
    root = checkpoint_dir(run_dir)
    final = root / f"{CHECKPOINT_PREFIX}{step:08d}"
    _refuse_nonfinite_state(accelerator, final)
    tmp = root / f".tmp-{CHECKPOINT_PREFIX}{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for aside in root.glob(f"{ASIDE_PREFIX}*"):  # a save of the same step stopped between its two renames
            kept = root / aside.name[len(ASIDE_PREFIX):]
            if not kept.exists() and (aside / COMPLETE_MARKER).is_file():
                os.replace(aside, kept)  # that step's only checkpoint: back in its place
        for debris in [*root.glob(".tmp-*"), *root.glob(".del-*"), *root.glob(f"{ASIDE_PREFIX}*")]:
            shutil.rmtree(debris, ignore_errors=True)  # left by an earlier crash
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files = sorted(p.name for p in tmp.iterdir())  # every rank's part is there after the barrier
            manifest = {"files": files, "inputs": inputs or {}, **({"config": config} if config is not None else {})}
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest) + "\n")
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **(extra or {})}) + "\n")
            (tmp / COMPLETE_MARKER).write_text(f"{step}\n")
    except Exception as exc:  # a full disk: torch's writer says "unexpected pos ..."; name the folder instead
        failure = _checkpoint_write_error(exc, tmp)
        if failure is None or failure is exc:
            raise
        raise failure from None
    if accelerator.is_main_process:
        _fsync_tree(tmp)
        aside = final.with_name(f"{ASIDE_PREFIX}{final.name}")
        if final.exists():
            # The same step again (a resumed finished run, a Ctrl-C on a checkpoint step): the old copy is set
            # aside, not deleted, until the new one is in place, so that a stop between leaves one to resume.
            os.replace(final, aside)
        os.replace(tmp, final)
        _fsync(root)
        if aside.exists():
            (aside / COMPLETE_MARKER).unlink(missing_ok=True)  # first: a part-deleted copy never looks whole
            shutil.rmtree(aside, ignore_errors=True)
        if keep > 0:
            for _, old in list_checkpoints(run_dir)[:-keep]:
                _remove_checkpoint(old)
    accelerator.wait_for_everyone()
    return final


def _bare_module(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` without its DDP (or an EMA's) ``.module`` wrappers and torch.compile's ``_orig_mod``."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def _saved_tensors(accelerator) -> list[tuple[str, torch.Tensor]]:
    """(name, this process's local tensor) of every floating-point tensor that ``save_state`` saves of the
    prepared models, the modules registered for checkpointing (an EMA) and the optimizers' states."""
    named = []
    modules = [(f"model {i}", m) for i, m in enumerate(getattr(accelerator, "_models", []))]
    modules += [(f"{type(m).__name__} (registered for checkpointing)", m)
                for m in getattr(accelerator, "_custom_objects", []) if isinstance(m, torch.nn.Module)]
    for label, module in modules:
        for prefix, sub in _bare_module(module).named_modules():
            tensors = [(name, p) for name, p in sub._parameters.items()]
            tensors += [(name, b) for name, b in sub._buffers.items() if name not in sub._non_persistent_buffers_set]
            named += [(f"{label}: {prefix + '.' if prefix else ''}{name}", t) for name, t in tensors if t is not None]
    for i, optimizer in enumerate(getattr(accelerator, "_optimizers", [])):
        for j, state in enumerate(optimizer.state.values()):
            named += [(f"optimizer {i}: state {key!r} of parameter {j}", t) for key, t in state.items()
                      if torch.is_tensor(t)]
    local = [(name, t.to_local() if hasattr(t, "to_local") else t) for name, t in named]  # FSDP2 shards
    return [(name, t.detach()) for name, t in local if t.is_floating_point() and t.numel()]


def _refuse_nonfinite_state(accelerator, target: Path) -> None:
    """Raise NonFiniteWeights, on every process alike, when a tensor that a checkpoint at ``target`` would hold
    is NaN or inf on any process: ``--resume auto`` would pick such a checkpoint as the last good one."""
    named = _saved_tensors(accelerator)
    device = accelerator.device
    if named:  # one flag per tensor, read back once
        flags = torch.stack([torch.isfinite(t).all().to(device) for _, t in named])
    else:
        flags = torch.ones(0, dtype=torch.bool, device=device)
    local_bad = (~flags).nonzero().flatten().tolist()
    bad_anywhere = accelerator.reduce(torch.tensor([float(len(local_bad))], device=device), reduction="sum")
    if bad_anywhere.item() == 0:
        return
    first = (f"{named[local_bad[0]][0]} ({len(local_bad)} tensors in all)" if local_bad
             else "a tensor of another process")
    raise NonFiniteWeights(f"{target}: refusing to write a checkpoint holding NaN or inf values, first in {first}; "
                           f"the checkpoints written before it are left as they were")


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """The small JSON (step, ...) stored beside an accelerate state."""
    return json.loads((Path(path) / "trainer_state.json").read_text())


def read_checkpoint_inputs(path: str | Path) -> dict[str, Any] | None:
    """What the checkpoint's run trained on, as its manifest records it; None for a checkpoint written
    before manifests were (or one whose manifest records nothing)."""
    manifest = Path(path) / MANIFEST_NAME
    if not manifest.is_file():
        return None
    inputs = json.loads(manifest.read_text()).get("inputs")
    return inputs if isinstance(inputs, dict) and inputs else None


def read_checkpoint_config(path: str | Path) -> dict[str, Any] | None:
    """The run config the checkpoint was written under, as its manifest records it; None for a checkpoint
    written before manifests recorded it."""
    manifest = Path(path) / MANIFEST_NAME
    if not manifest.is_file():
        return None
    config = json.loads(manifest.read_text()).get("config")
    return config if isinstance(config, dict) else None


class CheckpointError(ValueError):
    """A file of a resume checkpoint is damaged, unexpected or unsafe to load; the message names it."""


def _state_safe_globals() -> list[Any]:
    """What accelerate's pickled state files may refer to beyond tensors and plain containers: the
    numpy RNG state (an array, its dtype) and the ``codecs.encode`` its bytes are pickled through."""
    import codecs

    import numpy as np

    core = getattr(np, "_core", None) or np.core
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype, codecs.encode]
    if hasattr(np, "dtypes"):
        allowed.append(np.dtypes.UInt32DType)
    return allowed


def torch_load_reason(message: str) -> str:
    """The specific line of torch's weights_only refusal, without its generic advice."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    specific = [line for line in lines if re.search(r"GLOBAL|Unsupported|unrecognized|Can only", line)]
    return (specific or lines or ["no detail"])[0].replace("WeightsUnpickler error: ", "")


def _refuse(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: {why}; nothing from it was run. Resume from another checkpoint "
                           f"(--resume PATH) or start the run over (--overwrite)")


def _check_pickle(path: Path, data: bytes | None = None) -> None:
    """Unpickle a state file (or bytes of one) with torch's weights_only loader: code never runs."""
    import io
    import zipfile

    source: Any = io.BytesIO(data) if data is not None else path
    mmap = data is None and zipfile.is_zipfile(path)  # map the tensors, do not read them
    try:
        with torch.serialization.safe_globals(_state_safe_globals()):
            torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # refused globals, damaged zips and truncated pickles fail in many ways
        raise _refuse(path, f"not a safe PyTorch state file ({torch_load_reason(str(exc))})") from None


# What torch.distributed.checkpoint (FSDP's sharded state) pickles into its `.metadata` file.
_DCP_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch.serialization", "_get_layout"),
      ("torch", "Size"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")}


def _check_sharded_state(folder: Path) -> None:
    """Check a torch.distributed.checkpoint folder (FSDP's sharded model or optimizer state).

    DCP reads `.metadata` with plain ``pickle`` and each non-tensor entry with
    ``torch.load(weights_only=False)``: the metadata is read here through an allowlist of DCP's own
    classes, and every non-tensor entry through the weights_only loader. Tensor entries DCP itself
    reads with weights_only=True.
    """
    import pickle

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    class MetadataUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
            if (module, name) not in _DCP_METADATA_GLOBALS and not is_dtype:
                raise pickle.UnpicklingError(f"refers to {module}.{name}")
            return super().find_class(module, name)

    meta_path = folder / ".metadata"
    try:
        with meta_path.open("rb") as f:
            metadata = MetadataUnpickler(f).load()
        storage, entries = metadata.storage_data, metadata.state_dict_metadata
    except Exception as exc:
        raise _refuse(meta_path, f"not a safe sharded-state index ({exc})") from None
    for index, info in storage.items():
        if not isinstance(entries.get(index.fqn), BytesStorageMetadata):
            continue
        data_path = folder / info.relative_path
        if info.transform_descriptors or data_path.parent != folder or not data_path.is_file():
            raise _refuse(data_path, f"entry '{index.fqn}' cannot be checked (missing or encoded data)")
        with data_path.open("rb") as f:
            f.seek(info.offset)
            blob = f.read(info.length)
        try:
            _check_pickle(data_path, blob)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc} (entry '{index.fqn}')") from None


def name_listing(names: list[str], limit: int = 6) -> str:
    """The first ``limit`` names, then how many more: a readable list in an error."""
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def usable_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device, or a ValueError saying why this machine cannot use it (a CUDA
    index it lacks, no CUDA at all, no such device type), before any weights move there."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"not a torch device: {device!r} (e.g. 'cpu', 'cuda', 'cuda:1')") from None
    if dev.type == "meta":  # accepted, it failed later: "Tensor.item() cannot be called on meta tensors"
        raise ValueError(f"{device}: the meta device holds shapes, not numbers: nothing can run or be saved there "
                         "(e.g. 'cpu', 'cuda')")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise ValueError(f"{device}: this machine has no CUDA device that torch can use")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{device}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    else:  # mps, xpu, ...: where torch has a module that can tell (a plugin's device such as xla is left to it)
        available = getattr(getattr(torch, dev.type, None), "is_available", None)
        if dev.type != "cpu" and callable(available) and not available():
            raise ValueError(f"{device}: this machine has no {dev.type} device that torch can use")
    return dev


def check_file_place(path: Path, label: str = "", what: str = "") -> None:
    """Refuse, before long work, a file ``path`` that could not be written: a folder there, or a nearest
    existing ancestor that is a file or not writable (missing folders are made when writing). ``label``
    names the option in the message (e.g. ``"--npz "``), ``what`` the kind of file (e.g. ``"classifier"``)."""
    if path.is_dir():
        raise ValueError(f"{label}{path} is a folder, not a file: give a file path ending in {path.suffix or '.npz'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{label}{path}: {parent} is a file, not a folder"
                         + (f", so no {what} can be written there; give another path" if what else ""))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{label}{path}: no permission to write in {parent}")
    check_can_make_file(parent, f"{label}{path}")


def _files_every_checkpoint_holds(names: set[str], state: dict[str, Any]) -> list[str]:
    """For a checkpoint without a manifest: the files any vqgpt checkpoint of its kind holds. A random
    state per process; model weights and optimizer state together (accelerate's names, plain or FSDP
    folders), or, with neither, the palette of a pixel tokenizer (custom_checkpoint_0.pkl). A folder
    whose trainer state lacks the stream position every vqgpt loop records is not judged."""
    processes = state.get("processes")
    if not isinstance(processes, int) or isinstance(processes, bool):
        return []
    required = [f"random_states_{rank}.pkl" for rank in range(processes)]
    has_model = any(re.fullmatch(r"model(_\d+)?\.safetensors|pytorch_model(_fsdp)?(_\d+)?(\.bin)?", n) for n in names)
    has_optimizer = any(re.fullmatch(r"optimizer(_\d+)?(\.bin)?", n) for n in names)
    if has_optimizer and not has_model:
        required.append(WEIGHTS_NAME)
    elif has_model and not has_optimizer:
        required.append("optimizer.bin")
    elif not has_model:
        required.append("custom_checkpoint_0.pkl")
    return required


def check_checkpoint(path: str | Path) -> int:
    """Check every file of a resume checkpoint before anything loads it; returns its step.

    ``accelerator.load_state`` unpickles some files with ``weights_only=False`` (the EMA weights in
    ``custom_checkpoint_*.pkl``; FSDP's sharded state): a forged folder could run code. Each file is
    read here by a loader that cannot run code (JSON, safetensors, torch's weights_only unpickler with
    the numpy RNG types added); once it passes, the bytes refer to nothing else, so accelerate's load
    of the same bytes cannot do more. An unknown file is refused too, and so is a missing one: every file
    the manifest lists (for older checkpoints, those any checkpoint holds), so that a resume never fails
    half-way or silently continues without, say, its RNG state. Raises CheckpointError naming the file.
    """
    from safetensors import safe_open

    path = Path(path)
    state_path = path / "trainer_state.json"
    try:
        state = json.loads(state_path.read_bytes())
        step = state["step"]
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError("'step' is not an integer")
    except FileNotFoundError:
        raise CheckpointError(f"{state_path} is missing: {path} is not a complete vqgpt checkpoint") from None
    except Exception as exc:
        raise _refuse(state_path, f"not a trainer state (JSON with an integer 'step'): {exc}") from None
    names = {item.name for item in path.iterdir()}
    manifest_path = path / MANIFEST_NAME
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_bytes())
            required = manifest["files"]
            if not (isinstance(required, list) and all(plain_file_name(name) for name in required)
                    and isinstance(manifest.get("inputs", {}), dict)):
                raise ValueError("'files' is not a list of file names, or 'inputs' not a mapping")
        except Exception as exc:
            raise _refuse(manifest_path, f"not a checkpoint manifest (JSON with the list 'files'): {exc}") from None
        why = f"{MANIFEST_NAME} lists it among the files this checkpoint was written with"
    else:  # written before checkpoints had a manifest: what every vqgpt checkpoint holds
        required = _files_every_checkpoint_holds(names, state)
        why = "a checkpoint of this kind holds it"
    missing = [name for name in required if name not in names]
    if missing:
        more = f"; also missing: {name_listing(missing[1:])}" if missing[1:] else ""
        raise _refuse(path / missing[0], f"missing ({why}{more})")
    for item in sorted(path.iterdir()):
        if item.name in ("trainer_state.json", MANIFEST_NAME):
            continue
        if item.is_dir():
            if not (item / ".metadata").is_file():
                raise _refuse(item, "unexpected folder in a resume checkpoint")
            for part in item.iterdir():
                if part.name != ".metadata" and part.suffix != ".distcp":
                    raise _refuse(part, "unexpected file in a sharded state folder")
            _check_sharded_state(item)
        elif item.name == COMPLETE_MARKER:
            if item.read_bytes().strip() != str(step).encode():
                raise _refuse(item, f"the marker does not hold the checkpoint's step {step}")
        elif item.suffix == ".safetensors":
            try:
                with safe_open(str(item), framework="pt") as f:
                    f.keys()
            except Exception as exc:
                raise _refuse(item, f"not a readable safetensors file ({exc})") from None
        elif item.suffix in (".bin", ".pkl", ".pt", ".pth"):
            _check_pickle(item)
        else:
            raise _refuse(item, "unexpected file in a resume checkpoint")
    return step
