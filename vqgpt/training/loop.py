"""The bookkeeping around each optimizer step: metrics reduced across processes, the metrics log,
graceful interrupts, and the tail every step ends with."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator

from vqgpt.training.config import TrainConfig
from vqgpt.training.replicas import finish_run


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
    """Appends one JSON object per line to RUN/metrics.jsonl (main process only)."""

    def __init__(self, run_dir: str | Path, accelerator: Accelerator) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = accelerator.is_main_process

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (torch.Tensor, float)) else v) for k, v in record.items()}
        clean["time"] = round(time.time(), 3)
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")


class GracefulInterrupt:
    """Turns the first SIGINT / SIGTERM into a flag the loop checks, so it can checkpoint and exit."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.requested:  # a second Ctrl-C aborts at once
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


def stop_after_interrupt(accelerator: Accelerator, step: int, checkpoint, bar) -> None:
    """Write a checkpoint through ``checkpoint()``, close the run and raise KeyboardInterrupt."""
    checkpoint()
    bar.close()
    accelerator.print(f"interrupted: checkpoint written at step {step}; continue with --resume auto")
    finish_run(accelerator)
    raise KeyboardInterrupt


def is_log_step(step: int, cfg: TrainConfig) -> bool:
    """True when the step that ends with ``step`` steps done writes a metrics line (the last one always does)."""
    return step % cfg.log_every == 0 or step == cfg.steps


def after_step(accelerator: Accelerator, cfg: TrainConfig, step: int, bar, interrupt: GracefulInterrupt,
               checkpoint: Callable[[], None], snapshot: Callable[[], None]) -> None:
    """The tail of every optimizer step, ``step`` being the steps done: advance the progress bar, write a
    sample grid every ``sample_every`` and a checkpoint every ``checkpoint_every`` steps (the final ones
    are written after the loop), and stop every process at this step when any was interrupted."""
    bar.update(1)
    if cfg.sample_every and step % cfg.sample_every == 0:
        snapshot()
    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
        checkpoint()
    if interrupt.any_process(accelerator):
        stop_after_interrupt(accelerator, step, checkpoint, bar)
