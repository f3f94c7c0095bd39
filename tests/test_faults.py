"""Nothing lost: atomic checkpoints, SIGTERM -> final checkpoint -> --resume auto, non-finite losses
stop with a clear message (or are skipped), and per-sample seeded augmentation for exact resume."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

import stage1_vq.train as tokenizer_train
import stage2_prior.train as prior_train
from dist_check import make_token_shards, nan_at
from stage1_vq.train import TokenizerRunConfig, train_tokenizer
from stage2_prior.model import GPT
from stage2_prior.train import PriorRunConfig, train_prior
from vqgpt.ground.checkpoint import COMPLETE_MARKER, list_checkpoints, resolve_resume, save_checkpoint
from vqgpt.ground.config import load_config
from vqgpt.training import NonFiniteLoss, StreamPosition, TrainConfig, batch_stream, make_accelerator, make_dataloader

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    return make_token_shards(tmp_path_factory.mktemp("faults") / "tokens")


def prior_config(tokens: Path, *overrides: str) -> PriorRunConfig:
    return load_config(PriorRunConfig, ROOT / "configs/prior/tiny.yaml",
                       ["train.log_every=1", "train.warmup_steps=2", "train.batch_size=8", *overrides, f"tokens={tokens}"])


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- atomic checkpoints


def test_checkpoints_are_atomic_and_only_the_last_k_are_kept(tmp_path):
    accelerator = make_accelerator(TrainConfig(), tmp_path)
    model = accelerator.prepare(torch.nn.Linear(3, 3))
    run = tmp_path / "run"
    for step in (1, 2, 3, 4):
        save_checkpoint(accelerator, run, step, keep=2, extra={"epoch": 0, "batch": step})
    assert [s for s, _ in list_checkpoints(run)] == [3, 4]

    root = run / "checkpoints"
    # debris of crashes: a temporary folder (even one with a marker) and a newer folder without one
    (root / ".tmp-step-00000009").mkdir()
    (root / ".tmp-step-00000009" / COMPLETE_MARKER).write_text("9\n")
    (root / "step-00000010").mkdir()
    (root / "step-00000010" / "model.safetensors").write_bytes(b"half written")
    assert resolve_resume(run, "auto") == root / "step-00000004"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(run, str(root / "step-00000010"))

    # a crash inside save_state leaves the previous checkpoints untouched and nothing new to resume
    real_save_state = accelerator.save_state

    def crash(output_dir, **kwargs):
        real_save_state(output_dir, **kwargs)
        raise OSError("disk full")
    accelerator.save_state = crash
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(accelerator, run, 5, keep=2)
    accelerator.save_state = real_save_state
    assert resolve_resume(run, "auto") == root / "step-00000004"
    assert (root / ".tmp-step-00000005").is_dir()  # the unfinished write, never picked up

    with torch.no_grad():
        model.weight.fill_(7.0)
    save_checkpoint(accelerator, run, 6, keep=2)  # the next save sweeps the debris away
    assert not list(root.glob(".tmp-*"))
    assert [s for s, _ in list_checkpoints(run)] == [4, 6]
    with torch.no_grad():
        model.weight.zero_()
    accelerator.load_state(str(resolve_resume(run, "auto")))
    assert bool((model.weight == 7.0).all())


# ----------------------------------------------------------------------------- interrupts


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_resume_auto_completes(tokens, tmp_path):
    run = tmp_path / "run"
    base = [sys.executable, "-m", "vqgpt", "train-prior", "--config", str(ROOT / "configs/prior/tiny.yaml"),
            "--tokens", str(tokens), "--out", str(run), "--set", "train.batch_size=8", "--set", "train.log_every=1",
            "--set", "train.checkpoint_every=5", "--set", "train.keep_checkpoints=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([*base, "--set", "train.steps=100000"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not list_checkpoints(run) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert list_checkpoints(run), "no checkpoint appeared"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output[-2000:]  # the CLI's exit code for an interrupt
    match = re.search(r"interrupted: checkpoint written at step (\d+)", output)
    assert match, output[-2000:]
    stopped = int(match.group(1))
    (step, ckpt), = list_checkpoints(run)  # keep_checkpoints=1: the interrupt's checkpoint replaced the rest
    assert step == stopped >= 5 and (ckpt / COMPLETE_MARKER).is_file()
    assert read_metrics(run)[-1]["step"] == stopped

    # --resume auto continues from there (here: extended to 5 more steps) and finishes
    done = subprocess.run([*base, "--set", f"train.steps={stopped + 5}", "--resume", "auto"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"resumed from {ckpt} at step {stopped}" in done.stdout + done.stderr
    assert [r["step"] for r in read_metrics(run)][-6:] == list(range(stopped, stopped + 6))
    assert GPT.from_pretrained(run / "export").config.num_classes == 4


# ----------------------------------------------------------------------------- non-finite losses


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tokens, tmp_path, monkeypatch):
    run = tmp_path / "run"
    # micro-batch 12 with grad_accum=2 is in optimizer step 7; a checkpoint was written at step 4
    monkeypatch.setattr(prior_train, "next_token_loss", nan_at(prior_train.next_token_loss, 12, 0))
    cfg = prior_config(tokens, "train.steps=20", "train.grad_accum=2", "train.checkpoint_every=4")
    with pytest.raises(NonFiniteLoss, match=r"non-finite prior loss or gradient norm at step 7; stopping") as info:
        train_prior(cfg, run)
    last = run / "checkpoints" / "step-00000004"
    assert f"the last good checkpoint {last} is intact" in str(info.value)
    assert "train.on_nonfinite=skip" in str(info.value)
    assert resolve_resume(run, "auto") == last and (last / "model.safetensors").is_file()
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert read_metrics(run)[-1]["step"] == 6
    monkeypatch.undo()
    train_prior(cfg, run, resume="auto")  # the intact checkpoint resumes
    assert read_metrics(run)[-1]["step"] == 20


def test_nan_loss_is_skipped_with_on_nonfinite_skip(tokens, tmp_path, monkeypatch):
    monkeypatch.setattr(prior_train, "next_token_loss", nan_at(prior_train.next_token_loss, 2, 0))
    export = train_prior(prior_config(tokens, "train.steps=5", "train.on_nonfinite=skip"), tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    assert [r["skipped"] for r in rows] == [0, 0, 1, 1, 1]
    assert "loss" not in rows[2]  # the skipped step had no finite micro-batch to report
    assert all(torch.isfinite(v).all() for v in GPT.from_pretrained(export).state_dict().values())


def test_the_skipped_count_is_a_run_total_across_a_resume(tokens, tmp_path, monkeypatch):
    monkeypatch.setattr(prior_train, "next_token_loss", nan_at(prior_train.next_token_loss, 2, 0))
    common = ("train.on_nonfinite=skip", "train.checkpoint_every=4")
    train_prior(prior_config(tokens, "train.steps=4", *common), tmp_path / "run")
    monkeypatch.undo()
    train_prior(prior_config(tokens, "train.steps=6", *common), tmp_path / "run", resume="auto")
    assert [r["skipped"] for r in read_metrics(tmp_path / "run")] == [0, 0, 1, 1, 1, 1]


def test_nonfinite_gradient_with_a_finite_loss_also_stops(tokens, tmp_path, monkeypatch):
    inner = prior_train.next_token_loss

    def infinite_gradient(logits, tokens):
        # value 0, gradient d sqrt(|x|)/dx at x=0 = inf: a finite loss whose backward is not
        return inner(logits, tokens) + (logits - logits.detach()).abs().sqrt().sum()
    monkeypatch.setattr(prior_train, "next_token_loss", infinite_gradient)
    with pytest.raises(NonFiniteLoss, match="at step 1;.*no checkpoint was written yet"):
        train_prior(prior_config(tokens, "train.steps=3"), tmp_path / "run")


def test_tokenizer_nan_loss_stops_naming_the_step(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer_train, "generator_loss", nan_at(tokenizer_train.generator_loss, 2, 0, "total"))
    cfg = load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml",
                      ["train.steps=5", "train.batch_size=4", "train.checkpoint_every=2", "loss.disc_start=1"])
    with pytest.raises(NonFiniteLoss, match="non-finite tokenizer loss or gradient norm at step 3; stopping"):
        train_tokenizer(cfg, tmp_path / "run")
    assert resolve_resume(tmp_path / "run", "auto").name == "step-00000002"


# ----------------------------------------------------------------------------- seeded augmentation


class RandomShift(Dataset):
    """Item i -> i + a random draw from torch's global RNG (stands in for a random crop / flip)."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor(float(index)) + torch.rand(())


def test_augmentation_depends_on_seed_epoch_and_index_only(tmp_path):
    cfg = TrainConfig(batch_size=2, seed=3)
    accelerator = make_accelerator(cfg, tmp_path)

    def take(start: StreamPosition, n: int) -> list[torch.Tensor]:
        loader = accelerator.prepare(make_dataloader(RandomShift(), cfg))
        stream = batch_stream(accelerator, loader, start)
        return [next(stream) for _ in range(n)]

    rng = torch.get_rng_state()
    straight = take(StreamPosition(), 10)  # 6 batches per epoch: crosses into epoch 1
    assert torch.equal(rng, torch.get_rng_state())  # neither shuffling nor augmentation touched the global RNG
    torch.manual_seed(1234)  # whatever the model drew in between does not matter either
    resumed = take(StreamPosition(epoch=1, batch=1), 3)
    for a, b in zip(straight[7:], resumed):
        assert torch.equal(a, b)
    # and a new epoch draws new augmentations for the same items
    first = {int(x): float(x) for batch in straight[:6] for x in batch}
    second = {int(x): float(x) for batch in straight[6:] for x in batch}
    common = first.keys() & second.keys()
    assert common and all(first[i] != second[i] for i in common)
