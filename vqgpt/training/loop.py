"""The bookkeeping around each optimizer step: metrics reduced across processes, the metrics log and
the experiment trackers fed from it, graceful interrupts, and the tail every step ends with."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image

from vqgpt.ground.config import ConfigError, to_dict
from vqgpt.training.config import TRACKING_DIR, WANDB_ID_FILE, TrainConfig
from vqgpt.training.replicas import finish_run
from vqgpt.training.run_folder import _flat, share_main_failure


class Throughput:
    """Items per second since the last call (``per_step`` items per optimizer step: every process and
    micro-batch together), for the logged steps: tokens/s of the prior, images/s of the tokenizer."""

    def __init__(self, per_step: int, step: int) -> None:
        self.per_step, self.step, self.time = per_step, step, time.perf_counter()

    def rate(self, step: int) -> float:
        now = time.perf_counter()
        rate = self.per_step * (step - self.step) / max(now - self.time, 1e-9)
        self.step, self.time = step, now
        return rate


class StepMetrics:
    """Sums scalar metrics over one step's micro-batches; ``mean`` averages them over micro-batches
    and processes with a single all-reduce."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, **values: torch.Tensor | float) -> None:
        for key, value in values.items():
            value = torch.as_tensor(value).detach().float().reshape(())
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] = self.counts.get(key, 0) + 1

    def mean(self, accelerator: Accelerator) -> dict[str, float]:
        if not self.sums:
            return {}
        keys = list(self.sums)
        local = torch.stack([self.sums[k].to(accelerator.device) / self.counts[k] for k in keys])
        reduced = accelerator.reduce(local, reduction="mean").tolist()
        return dict(zip(keys, reduced))


class MetricsLog:
    """Appends one JSON object per line to RUN/metrics.jsonl and sends its numbers to the trackers at
    its ``step`` (main process only)."""

    def __init__(self, run_dir: str | Path, accelerator: Accelerator) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.accelerator = accelerator
        self.enabled = accelerator.is_main_process

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (torch.Tensor, float)) else v) for k, v in record.items()}
        clean["time"] = round(time.time(), 3)
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.accelerator.trackers:
            scalars = {k: v for k, v in clean.items() if k not in ("step", "time") and isinstance(v, (int, float))}
            self.accelerator.log(scalars, step=clean.get("step"))


def start_trackers(accelerator: Accelerator, config: Any, run_dir: str | Path, step: int) -> None:
    """Start the trackers of ``train.log_with`` (main process) with the flat resolved run ``config``.

    Called once the run folder is claimed, ``step`` being the steps already done. A resumed run writes
    to the same TensorBoard folder, and events an earlier session logged after ``step`` are purged
    (so a step re-run after a resume shows once); wandb continues the same run (its id is kept in
    RUN/tracking/wandb-run-id), and keeps the first value of a re-run step. A tracker that fails to start
    leaves no RUN/tracking/ it created (so the same command can run again); wandb's failures (no login,
    no network) become a ConfigError naming the ways out, raised on every process alike (else the others
    meet the failure in their first collective: killed by the launcher, or waiting where it does not
    end the group).
    """
    if not accelerator.log_with:
        return
    failure = None
    if accelerator.is_main_process:
        try:
            _start_main_trackers(accelerator, config, run_dir, step)
        except Exception as exc:
            failure = exc
    share_main_failure(failure, accelerator.num_processes)


def _start_main_trackers(accelerator: Accelerator, config: Any, run_dir: str | Path, step: int) -> None:
    tracking = Path(run_dir) / TRACKING_DIR
    created = not tracking.exists()
    tracking.mkdir(parents=True, exist_ok=True)
    init_kwargs: dict[str, dict[str, Any]] = {"tensorboard": {"purge_step": step + 1}}
    if "wandb" in (str(t) for t in accelerator.log_with):
        id_file = tracking / WANDB_ID_FILE
        if step == 0 or not id_file.is_file():
            id_file.write_text(secrets.token_hex(6) + "\n")
        # finish_previous: a run that died of an exception in this process (a notebook) must not take
        # this run's logs (wandb's default outside notebooks returns the still-open previous run).
        init_kwargs["wandb"] = {"id": id_file.read_text().strip(), "resume": "allow", "name": Path(run_dir).name,
                                "reinit": "finish_previous"}
        if "WANDB_DIR" not in os.environ:  # the user's choice wins; otherwise keep the run's files together
            init_kwargs["wandb"]["dir"] = str(tracking)
    # TensorBoard's hparams take only numbers, strings and booleans: lists and None go as JSON text.
    flat = {key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
            for key, value in _flat(to_dict(config)).items()}
    try:
        accelerator.init_trackers(config.train.project_name, config=flat, init_kwargs=init_kwargs)
    except Exception as exc:
        for tracker in accelerator.trackers:  # those that started; the one that failed has nothing to close
            try:
                tracker.finish()
            except Exception:
                pass
        accelerator.trackers = []
        if created:  # what this start wrote would make a rerun of the same command find "a run" in RUN
            shutil.rmtree(tracking, ignore_errors=True)
        if not type(exc).__module__.startswith("wandb"):
            raise
        # wandb's own message (no API key, no network) is a traceback; the ways out are these two
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = os.environ.get("WANDB_DIR") or tracking
        raise ConfigError(f"train.log_with={config.train.log_with}: wandb did not start ({reason}): log in with "
                          f"`wandb login` (or set WANDB_API_KEY), or set WANDB_MODE=offline to keep its logs in "
                          f"{where}/ without an account (or set train.log_with=tensorboard or none)") from None


def log_images(accelerator: Accelerator, name: str, image: str | Path, step: int) -> None:
    """Send the image file ``image`` (a sample or reconstruction grid) to the trackers as ``name`` at ``step``."""
    if not accelerator.trackers:  # no trackers, or not the main process
        return
    pixels = np.asarray(Image.open(image).convert("RGB"))  # (H, W, 3) uint8
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(name, pixels, global_step=step, dataformats="HWC")
            tracker.writer.flush()
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: wandb.Image(pixels)}, step=step)


_aborted = False  # a GracefulInterrupt took a second signal: the run stopped without its checkpoint


def aborted() -> bool:
    """Whether a run in this process stopped at a second interrupt, without writing its checkpoint."""
    return _aborted


class GracefulInterrupt:
    """Turns the first SIGINT / SIGTERM into a flag the loop checks, so it can checkpoint and exit."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.requested:  # a second Ctrl-C aborts at once
            global _aborted
            _aborted = True
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "GracefulInterrupt":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handler, nothing to restore
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def any_process(self, accelerator: Accelerator) -> bool:
        """True when any process was interrupted (one reduction, so all ranks stop at the same step)."""
        flag = torch.tensor([float(self.requested)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


# How an interrupted run is continued, as said after its checkpoint: a caller that resumes its runs itself
# (vqgpt demo: the same command again) says its own way (``continue_hint``).
_CONTINUE = ["continue with --resume auto"]


@contextmanager
def continue_hint(text: str) -> Iterator[None]:
    """Within it, an interrupted run says ``text`` for how to continue it."""
    _CONTINUE.append(text)
    try:
        yield
    finally:
        _CONTINUE.pop()


def stop_after_interrupt(accelerator: Accelerator, step: int, checkpoint, bar, run_dir: Path) -> None:
    """Write a checkpoint through ``checkpoint()``, close the run and raise KeyboardInterrupt."""
    checkpoint()
    bar.close()
    accelerator.print(f"interrupted: checkpoint written at step {step}; {_CONTINUE[-1]}")
    if (run_dir / "export").is_dir():  # a finished run resumed for more steps: its export is the earlier model
        accelerator.print(f"{run_dir / 'export'} still holds the model this run exported when it last finished; "
                          "it is replaced when the run finishes")
    finish_run(accelerator)
    raise KeyboardInterrupt


def grid_path(run_dir: Path, step: int) -> Path:
    """RUN/samples/step-NNNNNNNN.png: the grid (samples or reconstructions) of the weights after ``step`` steps."""
    return run_dir / "samples" / f"step-{step:08d}.png"


def last_grid(run_dir: Path, step: int, resumed_at: int, cfg: TrainConfig, snapshot: Callable[[], None]) -> None:
    """After the loop: the grid of the last step (``step``; the session began at ``resumed_at``), unless this
    session wrote it already (``after_step`` at a ``sample_every`` step), or trained no step and finds it
    there (the session that finished the run wrote it). It went to the trackers twice, and once more at
    every resume of a finished run; a grid of the same step from an abandoned branch (a resume from an
    earlier checkpoint) is replaced."""
    if step > resumed_at:
        if not (cfg.sample_every and step % cfg.sample_every == 0):
            snapshot()
    elif not grid_path(run_dir, step).is_file():
        snapshot()


def is_log_step(step: int, cfg: TrainConfig) -> bool:
    """True when the step that ends with ``step`` steps done writes a metrics line (the last one always does)."""
    return step % cfg.log_every == 0 or step == cfg.steps


def after_step(accelerator: Accelerator, cfg: TrainConfig, step: int, bar, interrupt: GracefulInterrupt,
               checkpoint: Callable[[], None], snapshot: Callable[[], None], run_dir: Path) -> None:
    """The tail of every optimizer step, ``step`` being the steps done: advance the progress bar, write a
    sample grid every ``sample_every`` and a checkpoint every ``checkpoint_every`` steps (the final ones
    are written after the loop), and stop every process at this step when any was interrupted, unless it
    was the last step: the run then finishes, exporting its model, as it would a moment later."""
    bar.update(1)
    if cfg.sample_every and step % cfg.sample_every == 0:
        snapshot()
    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
        checkpoint()
    if step < cfg.steps and interrupt.any_process(accelerator):
        stop_after_interrupt(accelerator, step, checkpoint, bar, run_dir)
