"""The training floor: what both training loops share, one module per concern.

- ``config``: ``TrainConfig`` and the Accelerator it sets up (devices, precision, per-rank seeds);
- ``optim``: LR schedule, AdamW, and ``optimizer_step`` (finite check -> backward -> clip -> step -> zero);
- ``stream``: the endless, resumable batch stream with per-sample seeded augmentation;
- ``loop``: step metrics reduced across processes, the metrics log and the trackers (``train.log_with``),
  interrupts, ``after_step``;
- ``replicas``: the DDP replica check, FSDP gathering, unwrapping, the EMA, ending a run;
- ``run_folder``: the run folder's guard (one run per folder, no silent replacement, a resume that
  must match the run);
- ``shares``: evaluation's batches split over the processes, gathered back in order (the one-process
  figures, bit for bit).

The loops themselves live in ``stage1_vq/train.py`` and ``stage2_prior/train.py``, each one
readable function from top to bottom; this floor imports only the ground floor (``vqgpt.ground``).

Distributed contract (DDP through ``accelerate launch``):
- ``train.batch_size`` is per process; the global batch is batch_size x grad_accum x processes.
  Micro-batch i of the seeded global order goes to rank i % processes, so a 2-process run with
  batch_size B sees, step by step, exactly the images a 1-process run with batch_size 2B sees.
- Every process is seeded with seed + rank (dropout, class dropout, restarts differ per rank);
  the sample order depends on ``seed`` alone, and each sample's augmentation on
  (seed, epoch, index) alone, so neither depends on the process count, timing or a resume.
- Metrics are means over all processes and micro-batches of the step; only the main process
  writes files (checkpoint shards and RNG states excepted: every rank saves its own).
"""

from vqgpt.training.config import (TRACKING_DIR, TrainConfig, cpu_has_fast_bf16, keeps_caller_rng, make_accelerator,
                                  tracker_names)
from vqgpt.training.loop import (
    GracefulInterrupt,
    MetricsLog,
    StepMetrics,
    Throughput,
    after_step,
    grid_path,
    is_log_step,
    last_grid,
    log_images,
    start_trackers,
    stop_after_interrupt,
)
from vqgpt.training.optim import (
    NonFiniteLoss,
    all_finite,
    clip_gradients,
    dropped_update,
    lr_factor,
    make_optimizer,
    nonfinite_message,
    optimizer_step,
    set_grad_checkpointing,
    set_lr,
    step_with_earlier_micro_batches,
    warn_long_warmup,
)
from vqgpt.training.replicas import check_replicas, finish_run, full_state_dict, make_ema, unwrap
from vqgpt.training.run_folder import (
    LOCK_NAME,
    RESUMABLE_KEYS,
    RunFolder,
    RunFolderError,
    RunLock,
    check_config_unchanged,
    open_run_dir,
    truncate_metrics,
)
from vqgpt.training.shares import ONE_PROCESS, Round, gather_in_order, on_main_process, readable_rounds, rounds_total
from vqgpt.training.stream import (
    SeededSamples,
    StreamPosition,
    batch_stream,
    load_resume,
    make_dataloader,
    stream_position_from,
    stream_state,
)

__all__ = [
    "ONE_PROCESS", "Round", "gather_in_order", "on_main_process", "readable_rounds", "rounds_total",
    "LOCK_NAME", "RESUMABLE_KEYS", "TRACKING_DIR", "GracefulInterrupt", "MetricsLog", "NonFiniteLoss", "RunFolder", "RunFolderError",
    "RunLock", "SeededSamples", "StepMetrics", "StreamPosition", "Throughput", "TrainConfig", "after_step",
    "all_finite", "batch_stream", "check_config_unchanged", "check_replicas", "clip_gradients", "cpu_has_fast_bf16",
    "dropped_update", "finish_run", "full_state_dict", "grid_path", "is_log_step", "last_grid", "load_resume",
    "log_images", "lr_factor", "keeps_caller_rng", "make_accelerator",
    "make_dataloader", "make_ema", "make_optimizer", "nonfinite_message", "open_run_dir", "optimizer_step",
    "set_grad_checkpointing", "set_lr", "start_trackers", "step_with_earlier_micro_batches", "stop_after_interrupt",
    "stream_position_from", "stream_state",
    "tracker_names", "truncate_metrics", "unwrap", "warn_long_warmup",
]
