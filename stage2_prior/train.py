"""Stage-2 training: one readable loop that fits a GPT prior to token shards with Accelerate.

The prior never runs the tokenizer: it reads the integer grids written by `vqgpt encode`. Sample
grids are decoded to pixels only through a ``decode`` callable handed in by the caller (the top
floor), so this package stays independent of stage 1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from stage2_prior.draw import MAX_CFG_SCALE, SamplingConfig
from stage2_prior.model import EXPORT_KIND, GPT, GPTConfig, checked_code_groups
from stage2_prior.sampling import generate
from vqgpt.ground.checkpoint import read_export_meta, read_trainer_state, save_checkpoint
from vqgpt.ground.config import ConfigError, check_number, opt, to_dict
from vqgpt.ground.images import save_grid
from vqgpt.ground.tokens import TokenDataset, TokenShardError, check_tokenizer_match
from vqgpt.training import (
    GracefulInterrupt,
    MetricsLog,
    StepMetrics,
    Throughput,
    TrainConfig,
    after_step,
    batch_stream,
    check_replicas,
    dropped_update,
    finish_run,
    full_state_dict,
    grid_path,
    is_log_step,
    keeps_caller_rng,
    last_grid,
    load_resume,
    log_images,
    make_accelerator,
    make_dataloader,
    make_ema,
    make_optimizer,
    open_run_dir,
    optimizer_step,
    set_grad_checkpointing,
    set_lr,
    start_trackers,
    stream_state,
    unwrap,
    warn_long_warmup,
)

Decoder = Callable[[torch.Tensor], torch.Tensor]  # (B, h, w) codes -> (B, 3, H, W) images in [-1, 1]


@dataclass
class PriorRunConfig:
    """Everything `vqgpt train-prior` needs. Vocabulary, grid and classes come from the shards."""

    model: GPTConfig = opt(GPTConfig, "the prior's architecture (codebook_size / grid_size / num_classes are taken from the shards)")
    train: TrainConfig = opt(TrainConfig, "optimisation and bookkeeping")
    tokens: str = opt("", "token shard folder written by `vqgpt encode` (the --tokens flag sets it)")
    conditional: bool = opt(True, "condition on the shards' class labels when they have more than one class")
    sample_cfg_scale: float = opt(1.5, "classifier-free guidance scale of the periodic sample grids")
    sample_temperature: float = opt(1.0, "temperature of the periodic sample grids")

    def __post_init__(self) -> None:
        # checked when the config is read, not when the first sample grid is drawn after training
        check_number("sample_temperature", self.sample_temperature, 0)  # 0 = greedy
        check_number("sample_cfg_scale", self.sample_cfg_scale, 0, MAX_CFG_SCALE)  # 1 = no guidance, 0 = uncond.


def model_config_for(cfg: PriorRunConfig, data: TokenDataset) -> GPTConfig:
    """The model config with vocabulary, grid and class count from the shards' metadata: unset ones are
    filled (and said so on stderr), a set one that disagrees is an error naming both values."""
    num_classes = data.num_classes if (cfg.conditional and data.num_classes > 1) else 0
    shards = {"codebook_size": data.codebook_size, "grid_size": list(data.grid_size), "num_classes": num_classes}
    filled = {}
    for key, value in shards.items():
        ours = getattr(cfg.model, key)
        if ours is None:
            filled[key] = value
        elif ours != value:
            why = ""
            if key == "num_classes":
                why = (" (conditional is false)" if not cfg.conditional else
                       f" (they hold {data.num_classes} class)" if data.num_classes <= 1 else
                       "; for an unconditional prior set conditional: false" if ours == 0 else "")
            raise ConfigError(f"model.{key}: the config sets {ours}, but the token shards in {cfg.tokens} give "
                              f"{value}{why}; leave model.{key} out to take the shards' value")
    if filled and os.environ.get("RANK", "0") == "0":  # once, not once per process
        # num_classes=0 with conditional false comes from that setting, not from the shards' labels
        ignored = "num_classes" in filled and not cfg.conditional and data.num_classes > 1
        said = [f"model.{k}={v}" for k, v in filled.items() if not (ignored and k == "num_classes")]
        parts = [f"{', '.join(said)} from the token shards in {cfg.tokens}"] if said else []
        if ignored:
            parts.append(f"model.num_classes=0 as conditional is false (the shards' {data.num_classes} classes "
                         "are not used)")
        print(f"prior: {'; '.join(parts)}", file=sys.stderr)
    return dataclasses.replace(cfg.model, **filled)


def sample_snapshot(model: GPT, decode: Decoder, path: Path, cfg: PriorRunConfig, seed: int = 0,
                    classes: Sequence[str] = ()) -> Path:
    """Write a grid of samples: one row per class (up to 10) for conditional priors, else 4x8. Rows are
    labelled with the class names when ``classes`` names every class, else with the indices. Guidance
    (``cfg.sample_cfg_scale``) needs the null class that ``model.class_dropout`` > 0 trains: without
    one, the grids sample unguided (``train_prior`` says so when it starts)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n_cls = model.config.num_classes
    if n_cls > 0:
        rows = min(n_cls, 10)
        labels = torch.arange(rows).repeat_interleave(8)
    else:
        rows, labels = 4, None
    was_training = model.training
    model.eval()
    sampling = SamplingConfig(temperature=cfg.sample_temperature,
                              cfg_scale=cfg.sample_cfg_scale if model.null_class is not None else 1.0)
    codes = generate(model, rows * 8, class_labels=labels, sampling=sampling, generator=gen)
    model.train(was_training)
    with torch.no_grad():
        images = decode(codes).float().cpu()
    names = list(classes) if len(classes) == n_cls else [str(i) for i in range(n_cls)]
    return save_grid(images, path, nrow=8, row_labels=[name[:24] for name in names[:rows]] if n_cls > 0 else None)


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (B, T, V) against the tokens (B, T) they predict, in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())


def _recorded_code_groups(checkpoint: Path, export_dir: Path, codebook_size: int) -> tuple[int, int] | None:
    """The ``code_groups`` a run recorded: in its checkpoint, else (a checkpoint of an earlier vqgpt) in the
    export its last finish wrote. A resume without --tokenizer knows them only so: it exported the prior
    without them, and a bare ``GPT.from_pretrained`` + ``generate`` drew codes from other depths' codebooks.
    Checked as ``GPT.from_pretrained`` checks an export's: a value that does not fit the codebook is refused,
    naming where it was read (it was taken as it was, and an unreadable export as none, without a word).
    Checkpoints record the key even without groups (null), so only an earlier vqgpt's are looked up in the
    export."""
    advice = ": pass --tokenizer with the run's tokenizer, whose code groups are then used"
    state = read_trainer_state(checkpoint)
    if "code_groups" in state:  # (null: none; a checkpoint before the key recorded only groups it had)
        groups = state["code_groups"]
        return None if groups is None else checked_code_groups(groups, codebook_size, f"{checkpoint}: code_groups",
                                                                 advice)
    config = export_dir / "config.json"
    if not config.is_file():
        return None
    try:
        extra = read_export_meta(export_dir, EXPORT_KIND).get("extra", {})
    except (OSError, ValueError) as exc:
        warnings.warn(f"the checkpoint {checkpoint} records no code groups, and the run's last export "
                      f"{export_dir} cannot be read for them ({exc}): a tokenizer with a codebook per depth "
                      "(residual VQ) needs them; pass --tokenizer to take them from it", stacklevel=3)
        return None
    groups = extra.get("code_groups") if isinstance(extra, dict) else None
    return None if groups is None else checked_code_groups(groups, codebook_size, f"{config}: extra.code_groups",
                                                             advice)


@keeps_caller_rng
def train_prior(cfg: PriorRunConfig, out: str | Path, resume: str | None = None,
                decode: Decoder | None = None, tokenizer_fingerprint: str | None = None,
                overwrite: bool = False, tokenizer_dir: str | Path | None = None,
                code_groups: tuple[int, int] | None = None) -> Path:
    """Train a prior on ``cfg.tokens`` into RUN=``out``; returns RUN/export. ``resume``: None, 'auto' or a
    checkpoint path; ``overwrite``: replace what RUN holds (without it, or ``resume``, a RUN holding a run
    is an error; it refuses to delete ``cfg.tokens`` or ``tokenizer_dir``, the tokenizer the caller reads).
    ``code_groups``: the tokenizer's (``stage2_prior.draw.code_groups``), for the sample grids drawn on the way."""
    tc = cfg.train
    if not cfg.tokens:
        raise ConfigError("tokens: no token shard folder given (use --tokens DIR)")
    data = TokenDataset(cfg.tokens)
    if tokenizer_fingerprint is not None:
        check_tokenizer_match(data.meta, tokenizer_fingerprint)
    model_cfg = model_config_for(cfg, data)
    cfg = dataclasses.replace(cfg, model=model_cfg)
    accelerator = make_accelerator(tc, out)
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if fsdp and tc.ema_decay > 0:
        raise ConfigError("train.ema_decay: EMA weights are not supported with FSDP; set train.ema_decay=0")
    # What the codes are: recorded in every checkpoint, so that a resume on shards another tokenizer
    # wrote in the same folder is refused instead of continuing on codes that mean something else.
    if len(data) == 0:  # before the run folder is touched
        raise TokenShardError(f"{cfg.tokens}: the token shards hold no grids (meta.json count 0): encode some images")
    # The rows themselves too (count, views, and a digest of evenly spaced rows in order): shards re-encoded
    # into the same folder were resumed on, the run's position applied to other data; with the digest
    # recorded the folder itself may move (--tokens another path), or be re-cut into other shards (an encode
    # on another number of processes), and the resume still knows it is the same data.
    shards = {"tokenizer_fingerprint": data.meta.get("tokenizer_fingerprint"), "codebook_size": data.codebook_size,
              "grid_size": list(data.grid_size), "classes": list(data.meta.get("classes", [])),
              "count": len(data), "views": int(data.meta.get("views", 1)), "rows_digest": data.rows_digest()}
    # Checkpoints written before rows_digest know the rows by a digest of the shards' checksums instead.
    sums = [shard.get("rows_sha256") for shard in data.meta.get("shards", [])]
    legacy = {"rows_sha256": hashlib.sha256("".join(sums).encode()).hexdigest()
              if all(isinstance(x, str) for x in sums) else None}
    reads = {"--tokens": cfg.tokens, **({"--tokenizer": tokenizer_dir} if tokenizer_dir else {})}
    with open_run_dir(out, cfg, accelerator, resume, overwrite, steps=tc.steps, inputs=shards,
                      inputs_from=f"the token shards in {cfg.tokens}", legacy_inputs=legacy, reads=reads) as run:
        run_dir = run.path
        is_main = accelerator.is_main_process

        loader = make_dataloader(data, tc)
        if len(loader) < accelerator.num_processes:
            raise ConfigError(f"train.batch_size={tc.batch_size} x {accelerator.num_processes} processes is larger "
                              f"than the {len(data)} grids in {cfg.tokens}")
        if code_groups is None and run.checkpoint is not None:  # a resume without the tokenizer: as recorded
            code_groups = _recorded_code_groups(run.checkpoint, run_dir / "export", model_cfg.codebook_size)
        model = GPT(model_cfg)
        model.code_groups = code_groups  # (the sample grids draw each code from its depth's codebook)
        set_grad_checkpointing(model, tc.grad_checkpointing)
        optimizer = make_optimizer(model.parameters(), tc)
        if accelerator.is_main_process:
            warn_long_warmup(tc)
        if tc.compile:
            model = torch.compile(model)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        ema = make_ema(accelerator, model, tc.ema_decay)

        step, position = load_resume(accelerator, run.checkpoint, tc.batch_size)
        resumed_at = step
        start_trackers(accelerator, cfg, run_dir, step)
        run.started()  # (after every check of the setup: --overwrite's old run goes only now)

        log = MetricsLog(run_dir, accelerator)
        bar = tqdm(total=tc.steps, initial=step, disable=not is_main, desc="prior", dynamic_ncols=True)
        batches = batch_stream(accelerator, loader, position)
        # Class dropout (labels -> null class at model.class_dropout, for guidance) happens inside the
        # model in train mode, drawn from torch's RNG, which save_state/load_state restore.
        conditional = model_cfg.num_classes > 0
        classes = list(data.meta.get("classes", [])) if conditional else []
        if is_main and decode is not None and conditional and model_cfg.class_dropout == 0 \
                and cfg.sample_cfg_scale != 1:
            warnings.warn(f"sample_cfg_scale={cfg.sample_cfg_scale}: model.class_dropout=0 trains no null class to "
                          f"guide with, so the sample grids are drawn without guidance (and sampling this prior "
                          f"takes --cfg-scale 1 only)", stacklevel=2)

        def checkpoint() -> None:
            check_replicas(accelerator, {"model": unwrap(accelerator, model), "ema": ema.module if ema else None})
            save_checkpoint(accelerator, run_dir, step, tc.keep_checkpoints,
                            extra={**stream_state(position, accelerator, tc.batch_size), "skipped": skipped,
                                   "code_groups": None if code_groups is None else list(code_groups)},
                            inputs=shards, config=to_dict(cfg))

        def snapshot() -> None:
            # Under FSDP only all processes together hold the weights; sample from the export instead.
            if is_main and decode is not None and not fsdp:
                net = ema.module if ema is not None else unwrap(accelerator, model)
                grid = sample_snapshot(net, decode, grid_path(run_dir, step), cfg, classes=classes)
                log_images(accelerator, "samples", grid, step)

        model.train()
        throughput = Throughput(tc.batch_size * tc.grad_accum * accelerator.num_processes
                                * data.grid_size[0] * data.grid_size[1], step)  # tokens
        # dropped updates (a run total, kept across resumes)
        skipped = int(read_trainer_state(run.checkpoint).get("skipped", 0)) if run.checkpoint is not None else 0
        with GracefulInterrupt() as interrupt, bar:  # the bar closes on every way out, errors too
            while step < tc.steps:
                lr = set_lr(optimizer, step, tc)
                metrics = StepMetrics()
                for _ in range(tc.grad_accum):
                    grids, labels = next(batches)
                    tokens = grids.flatten(1)                                   # (B, T)
                    with accelerator.accumulate(model):
                        with accelerator.autocast():
                            logits = model(tokens, labels if conditional else None)  # (B, T, V)
                            loss = next_token_loss(logits, tokens)
                        finite = optimizer_step(accelerator, loss, optimizer, model, tc)
                    if finite:
                        metrics.add(loss=loss)
                    else:
                        skipped += dropped_update(accelerator, tc, "prior loss or gradient norm", step + 1, run_dir)
                step += 1
                if ema is not None:
                    ema.update(unwrap(accelerator, model), step=step)
                if is_log_step(step, tc):
                    tok_s = throughput.rate(step)
                    means = metrics.mean(accelerator)
                    log.write({"step": step, "lr": lr, **means, "tokens_per_s": tok_s, "skipped": skipped})
                    bar.set_postfix(loss=f"{means.get('loss', float('nan')):.4f}", tok_s=f"{tok_s:,.0f}")
                after_step(accelerator, tc, step, bar, interrupt, checkpoint, snapshot, run_dir)
        bar.close()
        checkpoint()
        last_grid(run_dir, step, resumed_at, tc, snapshot)

        export_dir = run_dir / "export"
        final = ema.module if ema is not None else unwrap(accelerator, model)
        if fsdp:  # gather the shards (every process takes part) into a plain model
            state = full_state_dict(final)
            final = GPT(model_cfg)
            final.load_state_dict(state)
        if code_groups is not None:  # recorded in the export: the bare prior samples as a pipeline does
            final.code_groups = code_groups
        if is_main:
            # an unconditional prior names no class (the shards' classes are not its)
            final.save_pretrained(export_dir, extra={"tokenizer_fingerprint": data.meta.get("tokenizer_fingerprint"),
                                                     "classes": classes})
            accelerator.print(f"prior exported to {export_dir}")
        finish_run(accelerator)
        return export_dir
