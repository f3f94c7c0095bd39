"""End-to-end stage 1: a short run on real digits learns, exports, reconstructs and resumes."""

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from baselines import eval_images, mean_image_scores
from safetensors.torch import load_file

import stage1_vq.train as tokenizer_train
from stage1_vq.evaluate import reconstruct
from stage1_vq.model import VQModel
from stage1_vq.quantizers import VectorQuantizer
from stage1_vq.train import TokenizerRunConfig, train_tokenizer
from vqgpt.ground.checkpoint import list_checkpoints, read_trainer_state
from vqgpt.ground.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(*overrides: str) -> TokenizerRunConfig:
    return load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml",
                       ["train.log_every=5", "train.warmup_steps=5", *overrides])


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_short_run_lowers_reconstruction_loss_and_exports(tmp_path):
    cfg = tiny_config("train.steps=80", "train.checkpoint_every=40", "loss.disc_start=40")
    export = train_tokenizer(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    first, last = rows[0]["rec_loss"], rows[-1]["rec_loss"]
    assert last < 0.6 * first, (first, last)
    assert rows[-1]["disc_loss"] > 0  # the GAN switched on at disc_start
    # the discriminator's mean logits on real and reconstructed images, logged from its first step on
    assert not any("logits_real" in r for r in rows if r["step"] <= 40)
    assert all(math.isfinite(r["logits_real"]) and math.isfinite(r["logits_fake"]) for r in rows if r["step"] > 40)
    assert all(r["images_per_s"] > 0 for r in rows)  # throughput, as the prior logs tokens_per_s
    assert (tmp_path / "run/config.yaml").is_file()
    assert list((tmp_path / "run/samples").glob("*.png"))
    model = VQModel.from_pretrained(export)
    codes = model.encode(torch.zeros(2, 3, 32, 32))
    assert codes.shape == (2, 8, 8)
    metrics = reconstruct(export, "builtin:mnist", tmp_path / "recon", num_images=64, lpips="none", progress=False)
    # clearly better than outputting the mean digit for every input (~12.9 dB on these images)
    baseline = mean_image_scores(eval_images("builtin:mnist", 32, 64)).psnr
    assert metrics["num_images"] == 64 and metrics["psnr"] > baseline + 3, (metrics["psnr"], baseline)
    assert metrics["num_tokens"] == 64 * 8 * 8
    assert (tmp_path / "recon/grid.png").is_file()


def interrupt_at(micro_batch: int, sig: int):
    """A generator-loss wrapper that sends this process ``sig`` during call ``micro_batch`` (0-based)."""
    calls = [0]
    inner = tokenizer_train.generator_loss

    def wrapped(*args, **kwargs):
        if calls[0] == micro_batch:
            os.kill(os.getpid(), sig)
        calls[0] += 1
        return inner(*args, **kwargs)
    return wrapped


def counting(calls: list[int]):
    """A generator-loss wrapper that counts its calls (one per micro-batch)."""
    inner = tokenizer_train.generator_loss

    def wrapped(*args, **kwargs):
        calls[0] += 1
        return inner(*args, **kwargs)
    return wrapped


def assert_same(a, b, where: str) -> None:
    """Bitwise equality of nested checkpoint contents (tensors, dicts, lists, numbers)."""
    if torch.is_tensor(a):
        same = torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
        assert same, f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def checkpoint_contents(folder: Path) -> dict[str, dict]:
    """Generator, discriminator, both optimizers, the weight EMA and the usage window of an accelerate state folder."""
    return {
        "generator": load_file(str(folder / "model.safetensors")),
        "discriminator": load_file(str(folder / "model_1.safetensors")),
        "generator optimizer": torch.load(folder / "optimizer.bin", weights_only=True),
        "discriminator optimizer": torch.load(folder / "optimizer_1.bin", weights_only=True),
        "weight EMA": torch.load(folder / "custom_checkpoint_0.pkl", weights_only=True),
        "codebook usage window": torch.load(folder / "custom_checkpoint_1.pkl", weights_only=True),
    }


# GAN on from step 3, weight EMA, EMA codebook with k-means init (tiny.yaml), dead-code restarts in
# every step (they draw from the global RNG, which resume must restore), two micro-batches per step;
# 8 steps, interrupted in the second micro-batch of step 5.
RESUME_RUN = ["train.steps=8", "train.grad_accum=2", "train.ema_decay=0.9", "loss.disc_start=3",
              "model.quantizer.restart_threshold=1.0", "train.checkpoint_every=0", "train.log_every=1",
              "train.warmup_steps=2"]
STOP_STEP, STOP_MICRO_BATCH = 5, 9


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("tokenizer-resume") / "full"
    # One thread, as the tests themselves run (conftest): bitwise equality needs the same kernels.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_tokenizer(tiny_config(*RESUME_RUN), run)
    finally:
        torch.set_num_threads(threads)
    return run


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_interrupted_and_resumed_run_is_bitwise_the_uninterrupted_run(uninterrupted, tmp_path, monkeypatch, sig):
    """Stopped by a signal mid-run, then resumed with resume='auto': every piece of training state
    ends bitwise equal to an uninterrupted run, and only the remaining steps are trained."""
    part = tmp_path / "part"
    monkeypatch.setattr(tokenizer_train, "generator_loss", interrupt_at(STOP_MICRO_BATCH, sig))
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(tiny_config(*RESUME_RUN), part)
    (step, ckpt), = list_checkpoints(part)
    assert step == STOP_STEP and read_trainer_state(ckpt)["step"] == STOP_STEP
    assert not (part / "export").exists()
    stopped = checkpoint_contents(ckpt)
    assert bool(stopped["generator"]["quantize.initialized"])  # k-means ran before the stop
    assert read_metrics(part)[-1]["disc_loss"] > 0  # and so did the discriminator

    calls, restarts = [0], []
    monkeypatch.setattr(tokenizer_train, "generator_loss", counting(calls))
    restart = VectorQuantizer._restart_dead_codes

    def counted_restart(self, flat):
        restarts.append(restart(self, flat))
        return restarts[-1]

    monkeypatch.setattr(VectorQuantizer, "_restart_dead_codes", counted_restart)
    resumed = train_tokenizer(tiny_config(*RESUME_RUN), part, resume="auto")
    assert calls[0] == (8 - STOP_STEP) * 2  # the steps after the stop, each once: nothing is retrained
    assert sum(float(n) for n in restarts) > 0  # the resumed steps drew from the restored RNG

    full_step, full_ckpt = list_checkpoints(uninterrupted)[-1]
    part_step, part_ckpt = list_checkpoints(part)[-1]
    assert full_step == part_step == 8
    expected, got = checkpoint_contents(full_ckpt), checkpoint_contents(part_ckpt)
    for name in expected:
        assert_same(expected[name], got[name], name)
    # the codebook buffers are among the generator's tensors compared above
    assert {"quantize.cluster_size", "quantize.embed_sum", "quantize.embedding.weight"} <= set(got["generator"])
    assert_same(load_file(str(uninterrupted / "export/model.safetensors")),
                load_file(str(resumed / "model.safetensors")), "export (EMA weights)")
    # the resumed steps log the uninterrupted run's figures, codebook usage (a window of recent steps
    # kept beside the weights in the checkpoint) included
    losses = ("loss", "rec_loss", "gan", "disc_loss", "quant_loss", "psnr", "usage")
    rows_full, rows_part = read_metrics(uninterrupted), read_metrics(part)
    assert [r["step"] for r in rows_part] == list(range(1, 9))
    assert [[r[k] for k in losses] for r in rows_full] == [[r[k] for k in losses] for r in rows_part]


def test_training_leaves_the_callers_accelerator_as_it_was(tmp_path):
    """Accelerate keeps mixed precision and gradient accumulation process-wide. A run replaced them: the
    caller's own Accelerator went on without autocast or accumulation, and one made afterwards with other
    settings was refused."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    short = ("train.steps=1", "train.batch_size=2", "train.sample_every=0", "train.checkpoint_every=0")
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    mine = Accelerator(mixed_precision="bf16", gradient_accumulation_steps=4)
    train_tokenizer(tiny_config(*short), tmp_path / "run")
    assert (mine.mixed_precision, mine.gradient_accumulation_steps) == ("bf16", 4)
    model = mine.prepare(torch.nn.Linear(2, 2))
    syncs = []
    for _ in range(4):
        with mine.accumulate(model):
            syncs.append(mine.sync_gradients)
    assert syncs == [False, False, False, True]
    with mine.autocast():  # (a prepared model hands back float32: a bare layer shows the autocast)
        assert torch.nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.bfloat16
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    train_tokenizer(tiny_config(*short), tmp_path / "run2")
    assert Accelerator(mixed_precision="bf16").mixed_precision == "bf16"  # not refused after a run
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
