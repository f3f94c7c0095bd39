"""Nothing lost: atomic checkpoints, SIGTERM -> final checkpoint -> --resume auto, non-finite losses
stop with a clear message (or are skipped), and per-sample seeded augmentation for exact resume."""

import json
import os
import re
import shutil
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
from vqgpt.training import (NonFiniteLoss, RunFolderError, StreamPosition, TrainConfig, batch_stream, make_accelerator,
                            make_dataloader)

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
    # a run folder given for a checkpoint, and a path that is not there: told what to give instead
    with pytest.raises(FileNotFoundError, match=f"it is a run folder: give --resume auto with --out {run}, or one of "
                                                f"its checkpoints, e.g. {root / 'step-00000004'}"):
        resolve_resume(tmp_path / "other", str(run))
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder .--resume auto takes the newest"):
        resolve_resume(run, str(tmp_path / "nope"))

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



def test_saving_a_step_again_never_leaves_that_step_without_a_checkpoint(tmp_path, monkeypatch):
    """A resumed finished run, or a Ctrl-C on a checkpoint step, saves the same step again. The old copy was
    deleted before the new one was renamed into place: a stop in between (a second Ctrl-C, a kill) left only
    the hidden temporary copy, so --resume auto refused the run, or silently trained it again from step 0."""
    accelerator = make_accelerator(TrainConfig(), tmp_path)
    model = accelerator.prepare(torch.nn.Linear(3, 3))
    run, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    with torch.no_grad():
        model.weight.fill_(2.0)
    save_checkpoint(accelerator, run, 2, keep=1)
    real_replace = os.replace

    def stop_before_the_new_copy(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise KeyboardInterrupt  # between setting the old copy aside and renaming the new one
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", stop_before_the_new_copy)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, run, 2, keep=1)
    monkeypatch.setattr(os, "replace", real_replace)
    found = resolve_resume(run, "auto")
    assert found is not None and [s for s, _ in list_checkpoints(run)] == [2]
    with torch.no_grad():
        model.weight.zero_()
    accelerator.load_state(str(found))
    assert bool((model.weight == 2.0).all())

    save_checkpoint(accelerator, run, 3, keep=1)  # the next save puts the set-aside copy back, then prunes
    assert [p.name for p in sorted(root.iterdir())] == ["step-00000003"]

    # a stop while the old copy is being deleted, once the new one is in place: the new one is the step's
    with torch.no_grad():
        model.weight.fill_(5.0)
    real_rmtree = shutil.rmtree

    def stop_deleting(path, *args, **kwargs):
        if Path(path).name.startswith(".old-"):
            (Path(path) / "model.safetensors").unlink()  # part-deleted
            raise KeyboardInterrupt
        real_rmtree(path, *args, **kwargs)
    monkeypatch.setattr(shutil, "rmtree", stop_deleting)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, run, 3, keep=1)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert resolve_resume(run, "auto") == root / "step-00000003"
    with torch.no_grad():
        model.weight.zero_()
    accelerator.load_state(str(resolve_resume(run, "auto")))
    assert bool((model.weight == 5.0).all())
    save_checkpoint(accelerator, run, 4, keep=1)
    assert [p.name for p in sorted(root.iterdir())] == ["step-00000004"]



def test_overwrite_refuses_to_delete_the_tokenizer_it_reads(tokens, tmp_path):
    """`train-prior --tokenizer RUN/export --out RUN --overwrite` (a tokenizer run folder reused for the prior)
    deleted the tokenizer with the old run, trained, then failed to write the pipeline: the tokenizer was gone."""
    run = tmp_path / "tc"
    for folder in ("export", "pipeline/tokenizer"):
        (run / folder).mkdir(parents=True)
        (run / folder / "config.json").write_text("{}")
    (run / "config.yaml").write_text("{}\n")
    cfg = prior_config(tokens, "train.steps=1")
    with pytest.raises(RunFolderError, match=rf"--tokenizer {re.escape(str(run / 'export'))} is {re.escape(str(run))}"
                                             r"/export, which --overwrite would delete with the run"):
        train_prior(cfg, run, overwrite=True, tokenizer_dir=run / "export")
    with pytest.raises(RunFolderError, match=r"--tokenizer .*pipeline/tokenizer lies inside .*tc/pipeline, which"):
        train_prior(cfg, run, overwrite=True, tokenizer_dir=run / "pipeline" / "tokenizer")
    assert (run / "export" / "config.json").is_file() and (run / "pipeline/tokenizer/config.json").is_file()
    train_prior(cfg, run, overwrite=True, tokenizer_dir=tmp_path / "elsewhere")  # outside: replaced as asked
    assert not (run / "pipeline").exists()
    # RUN/export a link to the tokenizer: --overwrite removes the link, not the tokenizer, so it goes ahead
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "config.json").write_text("{}")
    shutil.rmtree(run / "export")
    (run / "export").symlink_to(tmp_path / "tok")
    train_prior(cfg, run, overwrite=True, tokenizer_dir=tmp_path / "tok")
    assert (tmp_path / "tok" / "config.json").read_text() == "{}" and not (run / "export").is_symlink()



def test_a_checkpoint_on_a_full_disk_is_one_error_naming_its_folder(tmp_path, monkeypatch):
    """torch's writer says only "[enforce fail at inline_container.cc:672] . unexpected pos 60736 vs 60624" when
    the disk fills (seen on a 600 KB tmpfs), a 30-line traceback; exports already said "No space left"."""
    import errno
    accelerator = make_accelerator(TrainConfig(), tmp_path)
    accelerator.prepare(torch.nn.Linear(3, 3))
    run = tmp_path / "run"
    tmp = run / "checkpoints" / ".tmp-step-00000001"

    def full(output_dir, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 60736 vs 60624")
    monkeypatch.setattr(accelerator, "save_state", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(OSError, match=r"No space left on device: writing the checkpoint failed \(\[enforce fail .*"
                                      r"unexpected pos 60736 vs 60624\); the disk there has 0.0 MB free") as caught:
        save_checkpoint(accelerator, run, 1)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**9, 10**11))
    with pytest.raises(OSError, match="Input/output error: writing the checkpoint failed") as caught:
        save_checkpoint(accelerator, run, 1)
    assert caught.value.errno == errno.EIO

    def bug(output_dir, **kwargs):
        raise RuntimeError("some other failure")
    monkeypatch.setattr(accelerator, "save_state", bug)
    with pytest.raises(RuntimeError, match="some other failure"):  # not a write failure: as it was
        save_checkpoint(accelerator, run, 1)
    assert list_checkpoints(run) == []



def test_a_checkpoint_of_the_other_stage_is_named_as_such(tokens, tmp_path):
    """A tokenizer's checkpoint given to train-prior --resume warned that "an earlier vqgpt wrote it" (it records
    no inputs), then failed on "unknown config key 'model.architecture'", never saying what it was."""
    checkpoint = tmp_path / "tok" / "checkpoints" / "step-00000006"
    checkpoint.mkdir(parents=True)
    config = {"model": {"architecture": "conv"}, "loss": {"gan_weight": 0.0}, "train": {"steps": 6}}
    (checkpoint / "manifest.json").write_text(json.dumps({"files": [], "inputs": {}, "config": config}))
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 6}))
    (checkpoint / COMPLETE_MARKER).write_text("6\n")
    with pytest.raises(RunFolderError, match=r"a checkpoint of a tokenizer run, and this is a prior run: give a "
                                             r"checkpoint of train-prior"):
        train_prior(prior_config(tokens, "train.steps=8"), tmp_path / "prior", resume=str(checkpoint))
    assert not (tmp_path / "prior").exists()


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


def test_an_interrupt_in_the_last_step_finishes_the_run_and_one_before_says_the_export_is_the_earlier_one(
        tokens, tmp_path, monkeypatch, capsys):
    """Ctrl-C during the last step wrote its checkpoint and stopped without the export, every step trained;
    and a finished run resumed for more steps and interrupted kept its earlier export in RUN/export/ while
    its config.yaml named the new step count, without a word."""
    import vqgpt.training.loop as loop

    monkeypatch.setattr(loop.GracefulInterrupt, "any_process", lambda self, accelerator: True)  # Ctrl-C every step
    try:
        export = train_prior(prior_config(tokens, "train.steps=1"), tmp_path / "run")
    except KeyboardInterrupt:  # (not let through: it would end the whole test session)
        pytest.fail("interrupted in its last step, the run stopped without its export")
    assert GPT.from_pretrained(export).config.num_classes == 4 and read_metrics(tmp_path / "run")[-1]["step"] == 1
    with pytest.raises(KeyboardInterrupt):
        train_prior(prior_config(tokens, "train.steps=3"), tmp_path / "run", resume="auto")
    said = capsys.readouterr().out
    assert "interrupted: checkpoint written at step 2" in said
    assert f"{export} still holds the model this run exported when it last finished" in said


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


def test_a_dropped_last_micro_batch_leaves_the_step_to_the_earlier_ones(tokens, tmp_path, monkeypatch):
    """on_nonfinite=skip under grad_accum drops the bad micro-batch and the step goes on with the others; when
    the bad one was the step's last (the one that applies it), the earlier ones' gradients were cleared and
    no step was made, while the log showed the step's loss. Its step must equal one whose last micro-batch
    added nothing (a loss of 0)."""
    cfg = prior_config(tokens, "train.steps=2", "train.grad_accum=2", "train.on_nonfinite=skip",
                       "train.ema_decay=0", "train.checkpoint_every=0", "train.warmup_steps=0")
    real = prior_train.next_token_loss
    monkeypatch.setattr(prior_train, "next_token_loss", nan_at(real, 1, 0))  # step 1's last micro-batch
    dropped = GPT.from_pretrained(train_prior(cfg, tmp_path / "nan"))
    calls = [0]

    def zero_at_1(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs) * (0.0 if calls[0] == 2 else 1.0)

    monkeypatch.setattr(prior_train, "next_token_loss", zero_at_1)
    zeroed = GPT.from_pretrained(train_prior(cfg, tmp_path / "zero"))
    assert [r["skipped"] for r in read_metrics(tmp_path / "nan")] == [1, 1]
    for (name, a), b in zip(dropped.state_dict().items(), zeroed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_a_last_micro_batch_left_empty_by_an_unreadable_image_leaves_the_step_to_the_earlier_ones(tmp_path):
    """A tokenizer micro-batch whose images all failed to decode is dropped; when it was the step's last, the
    earlier micro-batches' gradients were cleared and no step was made (the log showed a loss)."""
    import numpy as np
    from PIL import Image

    from stage1_vq.model import VQModel
    from vqgpt.ground.config import load_config as load

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / "a.png")
    (images / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 10)
    sets = [f"data.source={images}", f"data.index_dir={tmp_path / 'idx'}", "train.steps=1", "train.batch_size=1",
            "train.grad_accum=2", "loss.gan_weight=0", "model.quantizer.kmeans_init=false", "model.quantizer.ema=false",
            "model.quantizer.restart_threshold=0", "train.warmup_steps=0", "train.log_every=1", "train.seed=0",
            "train.checkpoint_every=0", "train.ema_decay=0"]
    first = {}
    for lr in ("1e-3", "1e-30"):
        cfg = load(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml", [*sets, f"train.lr={lr}"])
        with pytest.warns(UserWarning, match="b.png"):
            first[lr] = VQModel.from_pretrained(train_tokenizer(cfg, tmp_path / f"run-{lr}")).state_dict()
    order = json.loads((tmp_path / "run-1e-3" / "metrics.jsonl").read_text().splitlines()[0])
    assert order["unreadable"] == 1
    assert any(not torch.equal(first["1e-3"][k], first["1e-30"][k]) for k in first["1e-3"])  # a step was made


def test_a_warmup_as_long_as_the_run_is_warned(tokens, tmp_path):
    """train.warmup_steps (default 100) >= train.steps trained the whole run at a few percent of train.lr,
    without a word."""
    cfg = prior_config(tokens, "train.steps=3", "train.warmup_steps=100", "train.checkpoint_every=0")
    with pytest.warns(UserWarning, match=r"train.warmup_steps=100 is not below train.steps=3: the whole run warms "
                                         r"up, its last step at 3% of train.lr"):
        train_prior(cfg, tmp_path / "run")
