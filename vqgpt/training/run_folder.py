"""The run folder's guard: one run per folder (an OS lock), no silent replacement, and a resume that
must match the run it continues."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from vqgpt.ground.checkpoint import (MANIFEST_NAME, check_checkpoint, list_checkpoints, name_listing,
                                    read_checkpoint_config, read_checkpoint_inputs, read_export_meta, resolve_resume)
from vqgpt.ground.config import ConfigError, from_dict, read_yaml, save_config, to_dict
from vqgpt.ground.files import hold_lock, is_within
from vqgpt.training.config import TRACKING_DIR, TrainConfig
from vqgpt.training.optim import lr_factor


LOCK_NAME = ".lock"

# Config keys a resume may change: the run's length (the cosine schedule stretches to the new
# train.steps), bookkeeping, and how a step is laid out on the hardware (the stream position is
# mapped to a new batch size or process count). Any other change (architecture, data, losses,
# optimiser, seed) would continue a different run from this one's state. The README lists these.
RESUMABLE_KEYS = (
    "train.steps", "train.log_every", "train.sample_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.on_nonfinite", "train.num_workers", "train.batch_size", "train.grad_accum", "train.grad_checkpointing",
    "train.compile", "train.cpu", "train.mixed_precision", "train.matmul_precision", "train.optimizer_impl",
    "train.log_with",
    "train.project_name", "data.num_workers",
    "data.index_dir", "sample_cfg_scale", "sample_temperature",
)

# What a run leaves behind before its first checkpoint: `--resume auto` may start such a folder afresh.
_UNSTARTED_RUN = {"config.yaml", "metrics.jsonl", "samples", "checkpoints", TRACKING_DIR}
# Where --overwrite moves the run it replaces until the new one has started (then it is deleted; a start
# that fails before moves it back): a typo in the new run's data source must not cost the old run.
REPLACED_DIR = ".replaced"
# What REPLACED_DIR is renamed to when the new run has started, then deleted: a deletion killed part-way
# leaves this name, which the next command finishes deleting (a half-deleted .replaced read as a whole run).
REMOVING_DIR = ".replaced-removing"
# Everything a run writes into RUN (and all that --overwrite deletes); anything else there is the user's.
_RUN_ENTRIES = _UNSTARTED_RUN | {"export", "pipeline", REPLACED_DIR, REMOVING_DIR}


def _not_a_runs(names: list[str]) -> list[str]:
    """The entries of ``names`` that no run writes (a run's own temporary files, ``.NAME.tmp``, are its)."""
    return [name for name in names if name not in _RUN_ENTRIES
            and not (name.startswith(".") and name.endswith(".tmp") and name[1:-4] in _RUN_ENTRIES)]


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (in use, holds another run, later checkpoints)."""


class RunLock:
    """An exclusive OS lock (flock) on RUN/.lock, held for a run's life; the OS drops it if the process dies.

    The file keeps the holder's PID and host so that a second run can say who holds the folder.
    A run never deletes it; a refused start removes the folder it made, lock and all (``_unmake``), and a
    process that locked the file then deleted finds it gone and locks the new one (``hold_lock``).
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self._fd = hold_lock(self.path, lambda holder: RunFolderError(
            f"{self.path.parent} is in use by {holder} (it holds {self.path}): wait for that run to end or stop "
            f"it, or choose another --out"),
            no_flock=f"{self.path}: no file locking on this platform; do not start two runs in one folder")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def share_main_failure(failure: Exception | None, num_processes: int, result: Any = None) -> Any:
    """After work only the main process does (``failure``: what it raised there, None elsewhere), raise on
    every process: the failure itself on the main one, the same kind and message on the others (which
    would otherwise meet it in their next collective); else return the main process's ``result``."""
    verdict = [None if failure is None else (type(failure), str(failure)), result]
    if num_processes > 1:
        verdict = broadcast_object_list(verdict)
    if failure is not None:
        raise failure
    if verdict[0] is not None:
        raise _like(*verdict[0], "main process")
    return verdict[1]


def share_failures(failure: Exception | None, num_processes: int) -> None:
    """After work every process does its share of (``failure``: what it raised there, or None), raise on every
    process if any failed: its own failure where it happened, the first failed process's kind and message
    on the others. Without it the others wait in their next collective until the launcher stops them, and
    print the lost connection's traceback instead of the reason."""
    verdicts = [None if failure is None else (type(failure), str(failure))]
    if num_processes > 1:
        verdicts = gather_object(verdicts)
    if failure is not None:
        raise failure
    for rank, verdict in enumerate(verdicts):
        if verdict is not None:
            raise _like(*verdict, f"process {rank}")


def _like(kind: type, message: str, where: str) -> Exception:
    """An error of ``kind`` saying ``where: message`` for another process to raise: user errors (ValueError,
    OSError) keep their kind, and so their exit code and one-line message; anything else, a bug, is a
    RuntimeError."""
    if issubclass(kind, (ValueError, OSError)):
        try:
            return kind(f"{where}: {message}")
        except Exception:  # a subclass with another constructor
            pass
    return RuntimeError(f"{where}: {message}")


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _same_value(a: Any, b: Any) -> bool:
    """Equal config values; paths count as equal when they name the same file or folder (codes, codes/,
    ./codes and its absolute path, say)."""
    if a == b:
        return True
    if not (isinstance(a, str) and isinstance(b, str) and a and b):
        return False
    if os.path.normpath(a) == os.path.normpath(b):
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def check_config_unchanged(config: Any, run_config: Path, recorded: dict[str, Any] | None = None,
                           also_resumable: tuple[str, ...] = ()) -> None:
    """Raise ConfigError listing every key (old -> new) outside RESUMABLE_KEYS (and ``also_resumable``)
    where ``config`` differs from the run's resolved config: file ``run_config``, or ``recorded`` (the
    config a checkpoint's manifest holds; ``run_config`` then names that manifest)."""
    try:
        old = _flat(to_dict(from_dict(type(config), recorded if recorded is not None else read_yaml(run_config))))
    except ConfigError as exc:
        raise ConfigError(f"{run_config}: cannot compare it with the requested config: {exc}") from None
    new = _flat(to_dict(config))
    changed = [(key, old.get(key, "(absent)"), new.get(key, "(absent)")) for key in sorted(old.keys() | new.keys())
               if key not in RESUMABLE_KEYS + also_resumable and not _same_value(old.get(key), new.get(key))]
    if changed:
        diff = "; ".join(f"{key}: {a!r} -> {b!r}" for key, a, b in changed)
        raise ConfigError(f"--resume: the requested config changes {diff} (run config {run_config}); a resumed "
                          f"run keeps these: drop the change, or start a new run with --overwrite or another "
                          f"--out (only {', '.join(RESUMABLE_KEYS)} may change on resume)")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines of RUN/metrics.jsonl logged after ``step`` (and a line cut short by a kill), so
    that each step resumed from ``step`` appears once. Rewritten atomically."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or record["step"] <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    if keep != lines:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _exported_inputs(run_dir: Path, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """The tokenizer fingerprint that ``run_dir``'s export (or its pipeline's prior) records, as inputs to
    compare; None when there is no such export or ``inputs`` has no fingerprint."""
    if "tokenizer_fingerprint" not in inputs:
        return None
    for export in (run_dir / "export", run_dir / "pipeline" / "prior"):
        try:
            fingerprint = (read_export_meta(export).get("extra") or {}).get("tokenizer_fingerprint")
        except (OSError, ValueError):  # (none there, or damaged: not one to judge by)
            continue
        if fingerprint:
            return {"tokenizer_fingerprint": fingerprint}
    return None


def _check_inputs(checkpoint: Path, inputs: dict[str, Any] | None, inputs_from: str,
                  legacy_inputs: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """ConfigError naming each recorded input (tokenizer fingerprint, vocabulary, grid, ...) that differs now;
    else the inputs the checkpoint records (None where it records none).
    A checkpoint that records none (an earlier vqgpt's) is judged by the tokenizer fingerprint its run's
    export records, where it has one; else it is not judged, and a warning says so."""
    recorded = in_checkpoint = read_checkpoint_inputs(checkpoint)
    where = "the checkpoint"
    if inputs is None:
        return in_checkpoint
    if recorded is None:
        recorded, where = _exported_inputs(checkpoint.parent.parent, inputs), "the run's export"
        if recorded is None:
            warnings.warn(f"--resume {checkpoint}: the checkpoint records no inputs (an earlier vqgpt wrote it), so "
                          f"whether {inputs_from} are what the run trained on is not checked", stacklevel=2)
            return None
    inputs = {**(legacy_inputs or {}), **inputs}
    changed = [(key, recorded[key], inputs[key]) for key in sorted(recorded.keys() & inputs.keys())
               if recorded[key] != inputs[key]]
    if changed:
        diff = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changed)
        raise ConfigError(f"--resume {checkpoint}: {inputs_from} differ from what the run trained on: {diff} "
                          f"(recorded in {where}); continuing would train it on other data: give it the data "
                          f"it started on, or start a new run with --overwrite or another --out")
    return in_checkpoint


def _stage(config: dict[str, Any]) -> str | None:
    """Which trainer a run config (as a dict) belongs to: a prior's names its token shards, a tokenizer's its losses."""
    return "prior" if "tokens" in config else "tokenizer" if "loss" in config else None


def _check_same_stage(checkpoint: Path, config: Any) -> None:
    """Refuse a checkpoint of the other stage (a tokenizer's given to train-prior, or the reverse): it failed on
    the first config key the other stage lacks, after a warning that it recorded no inputs."""
    recorded = read_checkpoint_config(checkpoint)
    if recorded is None and (checkpoint.parent.parent / "config.yaml").is_file():
        try:
            recorded = read_yaml(checkpoint.parent.parent / "config.yaml")
        except (OSError, ValueError):
            return  # (judged below, with the config checks' own messages)
    theirs = _stage(recorded) if isinstance(recorded, dict) else None
    ours = _stage(to_dict(config)) if dataclasses.is_dataclass(config) else None
    if theirs and ours and theirs != ours:
        raise RunFolderError(f"--resume {checkpoint}: a checkpoint of a {theirs} run, and this is a {ours} run: "
                             f"give a checkpoint of train-{ours}")


def _say_schedule_change(config: Any, recorded: dict[str, Any] | None, step: int) -> None:
    """Say what a changed train.steps does to the LR of the resumed steps: the schedule stretches (or
    shrinks) to the new length, so the LR jumps at the resume (up, after a finished cosine run)."""
    train = getattr(config, "train", None)
    old_steps = ((recorded or {}).get("train") or {}).get("steps")
    if not isinstance(train, TrainConfig) or not isinstance(old_steps, int) or old_steps == train.steps:
        return
    before = lr_factor(step, dataclasses.replace(train, steps=old_steps)) * train.lr
    after = lr_factor(step, train) * train.lr
    if not math.isclose(before, after, rel_tol=1e-3):
        print(f"--resume: train.steps {old_steps} -> {train.steps}: the LR schedule stretches to the new length, "
              f"so the LR of step {step + 1} is {after:.3g} (the old schedule's: {before:.3g})", file=sys.stderr)


def _claim_run_dir(run_dir: Path, config: Any, resume: str | None, overwrite: bool, steps: int | None = None,
                   inputs: dict[str, Any] | None = None, inputs_from: str = "the inputs",
                   legacy_inputs: dict[str, Any] | None = None,
                   reads: dict[str, str | Path] | None = None) -> tuple[Path | None, Path | None]:
    """Main process, lock held: check RUN may be used as asked, then write config.yaml; (the checkpoint to resume,
    the REPLACED_DIR that ``overwrite`` moved the old run into, else None). Every check comes before the first
    change to RUN."""
    if (run_dir / REMOVING_DIR).exists():  # the run an earlier --overwrite replaced, its deletion cut short
        _remove(run_dir / REMOVING_DIR)
    held = sorted(p.name for p in run_dir.iterdir() if p.name not in (LOCK_NAME, "config.yaml"))
    others = _not_a_runs(held)
    if overwrite and others:  # it used to delete them with the run
        raise RunFolderError(f"--overwrite: {run_dir} also holds {name_listing(others)}, which no run writes; "
                             f"--overwrite deletes a run's own files only: move those away, or choose another --out")
    for flag, path in (reads or {}).items() if overwrite else ():
        # a tokenizer export copied in as RUN/export (or a pipeline's tokenizer/) is deleted with the run
        doomed = next((name for name in held if not (run_dir / name).is_symlink()  # (a link goes, not its target)
                       and is_within(Path(path), run_dir / name)), None)
        if doomed is not None:
            where = "is" if Path(path).resolve() == (run_dir / doomed).resolve() else "lies inside"
            raise RunFolderError(f"{flag} {path} {where} {run_dir / doomed}, which --overwrite would delete with the "
                                 f"run: copy it out of {run_dir} first, or choose another --out")
    if REPLACED_DIR in held and not overwrite:  # an --overwrite killed before its new run started
        raise RunFolderError(f"{run_dir / REPLACED_DIR} holds the run that an --overwrite was replacing when it was "
                             f"stopped, before the new run started: move its contents back into {run_dir} to keep "
                             f"that run (then --resume auto continues it), or pass --overwrite to start over")
    checkpoint, step = None, 0
    if resume:
        checkpoint = resolve_resume(run_dir, resume)
    if checkpoint is None:
        if not resume and held and not overwrite:
            if others:  # (not the user's files: --overwrite would refuse them)
                raise RunFolderError(f"{run_dir} holds {name_listing(others)}, which no run writes: choose another "
                                     f"--out (a new or empty folder)")
            raise RunFolderError(f"{run_dir} already holds a run ({name_listing(held)}): pass --resume auto to "
                                 f"continue it, --overwrite to replace it, or choose another --out")
        foreign = [name for name in held if name not in _UNSTARTED_RUN]
        if resume and foreign:
            start_over = "choose another --out" if others else "pass --overwrite to start over, or choose another --out"
            raise RunFolderError(f"--resume auto: {run_dir} holds {name_listing(foreign)} but no complete checkpoint "
                                 f"to resume from: {start_over}")
    else:
        step = check_checkpoint(checkpoint)
        _check_same_stage(checkpoint, config)
        if steps is not None and step > steps:
            raise ConfigError(f"--resume {checkpoint}: the checkpoint is at step {step}, past train.steps={steps}: "
                              f"a run cannot be shortened; set train.steps to {step} or more to continue it, or "
                              f"resume from an earlier checkpoint")
        recorded_inputs = _check_inputs(checkpoint, inputs, inputs_from, legacy_inputs)
        # A checkpoint of another run folder continues that run here: only into an empty folder (or with
        # --overwrite), as a fresh start would, else the two runs' metrics, checkpoints and config would mix.
        if held and not overwrite and not is_within(checkpoint, run_dir):
            raise RunFolderError(f"--resume {checkpoint}: {run_dir} already holds a run ({name_listing(held)}) and the "
                                 f"checkpoint belongs to another run folder: pass --overwrite to replace the run in "
                                 f"{run_dir}, --resume auto to continue it, or choose another --out")
        # the config the checkpoint records, else its run's config file, else RUN's (unless --overwrite is
        # about to replace it); a checkpoint copied out of its run folder once went unchecked
        recorded = read_checkpoint_config(checkpoint)
        references = [checkpoint.parent.parent / "config.yaml"] + ([] if overwrite else [run_dir / "config.yaml"])
        # where the checkpoint knows its token rows by their digest (checked above), their folder may move
        moved = ("tokens",) if any(isinstance((recorded_inputs or {}).get(key), str)
                                   for key in ("rows_digest", "rows_sha256")) else ()
        found = next((reference for reference in references if reference.is_file()), None)
        if recorded is not None:
            check_config_unchanged(config, checkpoint / MANIFEST_NAME, recorded, moved)
        elif found is not None:
            check_config_unchanged(config, found, also_resumable=moved)
            recorded = read_yaml(found)
        else:
            warnings.warn(f"--resume {checkpoint}: neither the checkpoint (written by an earlier vqgpt) nor a "
                          f"config.yaml beside it records the run's config, so the requested one is not compared "
                          f"with it: a model or optimizer setting other than the run's goes unnoticed", stacklevel=3)
        later = [path.name for s, path in list_checkpoints(run_dir) if s > step]
        if later and not overwrite:
            raise RunFolderError(f"--resume {checkpoint}: {run_dir / 'checkpoints'} also holds later checkpoints "
                                 f"({name_listing(later)}) that the resumed run would mix with its own: remove them, "
                                 f"or resume into another --out")
        _say_schedule_change(config, recorded, step)  # (once the resume is sure to go ahead)
    aside = None
    if overwrite and held:
        # Moved aside, not deleted: the new run's own checks (its data, losses, trackers) come later, and
        # one that fails moves the old run back (RunFolder.restore_replaced). A leftover of a start that
        # was killed meanwhile is the run an --overwrite already replaced: it goes now.
        aside = run_dir / REPLACED_DIR
        if REPLACED_DIR in held:
            _remove(aside)
            held.remove(REPLACED_DIR)
        aside.mkdir()
        # Checkpoints first: a crash part-way must not leave old state that --resume auto would pick.
        for name in sorted(held, key=lambda n: n != "checkpoints"):
            os.replace(run_dir / name, aside / name)
        if (run_dir / "config.yaml").is_file():
            os.replace(run_dir / "config.yaml", aside / "config.yaml")
    try:
        save_config(config, run_dir / "config.yaml")
        if resume:
            truncate_metrics(run_dir / "metrics.jsonl", step)
    except BaseException:  # (a full disk): the old run goes back
        RunFolder(run_dir, None, aside).restore_replaced()
        raise
    return checkpoint, aside


@dataclass
class RunFolder:
    """A run folder opened for training: its path and the checkpoint to resume from (None: a fresh start).

    ``replaced``: where ``--overwrite`` moved the run it replaces (main process; None elsewhere and when
    there was none). The trainer calls ``started`` once its setup is through (data, losses, trackers),
    which deletes it; a start that fails or is stopped before gets the old run back (``restore_replaced``)."""

    path: Path
    checkpoint: Path | None
    replaced: Path | None = None

    def started(self) -> None:
        """The new run is under way: the run it replaces goes for good."""
        if self.replaced is not None:
            replaced, self.replaced = self.replaced, None
            removing = replaced.with_name(REMOVING_DIR)  # (a leftover one went when the folder was claimed)
            os.replace(replaced, removing)  # (one step: never a half-deleted REPLACED_DIR)
            _remove(removing)

    def restore_replaced(self) -> None:
        """The new run failed to start: remove what it wrote and move the replaced run back."""
        if self.replaced is None:
            return
        replaced, self.replaced = self.replaced, None
        try:
            for entry in self.path.iterdir():
                if entry.name not in (LOCK_NAME, REPLACED_DIR):
                    _remove(entry)
            for entry in replaced.iterdir():
                os.replace(entry, self.path / entry.name)
            replaced.rmdir()
        except OSError as exc:
            warnings.warn(f"--overwrite: the new run did not start, and the run it was to replace could not be "
                          f"moved back ({exc}): it is in {replaced}", stacklevel=3)


def _unmake(run_dir: Path, made: Path | None) -> None:
    """After a refused start, its lock still held: remove the folders this start made (``made`` and those
    below it, down to RUN) when RUN holds nothing but the lock, so that a refusal leaves no trace; else
    leave everything. (A start that meanwhile opened the lock file finds it gone once it gets the flock,
    and makes the folder again: ``hold_lock``.)"""
    if made is None or not run_dir.is_dir() or any(p.name != LOCK_NAME for p in run_dir.iterdir()):
        return
    try:
        (run_dir / LOCK_NAME).unlink(missing_ok=True)
    except OSError:
        return
    for folder in [run_dir, *run_dir.parents]:
        try:
            folder.rmdir()
        except OSError:  # another process came in meanwhile (its folder now), or 'a/..' of --out a/../b
            if folder.name != "..":
                return
        if folder == made:
            return


@contextmanager
def open_run_dir(out: str | Path, config: Any, accelerator: Accelerator, resume: str | None = None,
                 overwrite: bool = False, *, steps: int | None = None, inputs: dict[str, Any] | None = None,
                 inputs_from: str = "the inputs", legacy_inputs: dict[str, Any] | None = None,
                 reads: dict[str, str | Path] | None = None) -> Iterator[RunFolder]:
    """Lock RUN for the run's life and check it may be used as asked before writing anything in it.

    Without ``resume`` RUN must hold no run (``overwrite`` replaces what it holds: ``RunFolder``); with it the
    checkpoint's files are checked (no code runs), its step must not be past ``steps`` (the run's
    length; None: not checked), the ``inputs`` it records (JSON values of what the run trains on,
    which the loop passes to ``save_checkpoint``; ``inputs_from`` names them in errors) must equal
    these (and ``legacy_inputs``, values an earlier vqgpt recorded under other keys, where it did), and
    the requested config is compared with the run's. A checkpoint of another run folder
    may continue into RUN only when RUN holds no run, or with ``overwrite``, which empties RUN once
    all is checked. Then RUN/config.yaml is written and metrics after the resumed step are dropped. ``reads``:
    the run's input folders by flag (``{"--tokenizer": path}``), which ``overwrite`` refuses to delete.
    Only the main process locks and checks (all processes of one launch share the lock); its verdict
    is broadcast, so every process raises the same error instead of waiting in a collective.
    """
    run_dir = Path(out)
    if resume and overwrite and (resume == "auto" or is_within(Path(resume), run_dir)):
        raise RunFolderError("--resume and --overwrite exclude each other: --resume continues the run in --out, "
                             "--overwrite replaces it (together they take a checkpoint of another run folder only)")
    lock = RunLock(run_dir)
    checkpoint, replaced, failure = None, None, None
    if accelerator.is_main_process:
        made = next((folder for folder in reversed([run_dir, *run_dir.parents]) if not folder.exists()), None)
        held = False
        try:
            if run_dir.exists() and not run_dir.is_dir():
                raise RunFolderError(f"--out {run_dir} is a file, not a run folder")
            run_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            held = True  # (refused as in use: the folder is the other start's, made or not)
            checkpoint, replaced = _claim_run_dir(run_dir, config, resume, overwrite, steps, inputs, inputs_from,
                                                  legacy_inputs, reads)
        except Exception as exc:
            if held:
                _unmake(run_dir, made)  # before the lock goes: no other start holds the folder meanwhile
            lock.release()
            failure = exc
        except BaseException:  # Ctrl-C: a notebook's process lives on and must not keep the folder
            lock.release()
            raise
    checkpoint = share_main_failure(failure, accelerator.num_processes, checkpoint)
    run = RunFolder(run_dir, checkpoint, replaced)
    try:
        yield run
    except BaseException:
        run.restore_replaced()  # (a no-op once the run has started)
        raise
    else:
        run.started()  # a trainer that never said so has finished
    finally:
        lock.release()
