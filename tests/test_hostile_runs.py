"""Hostile uses of a run folder: a resume that would mix two runs, continue on another tokenizer's codes,
trust a checkpoint with a file missing, or go back past its own step; tracker names that collide with
the trackers' own files and a tracker that cannot start; loss weights that make no sense."""

import json
import shutil
from pathlib import Path

import pytest
import torch

# the same finished 4-step run (checkpoints at steps 2 and 4) and copies of it as the run-integrity tests
from test_run_integrity import finished, prior_config, read_steps, run, snapshot, tokens  # noqa: F401 (fixtures)
from stage1_vq.train import TokenizerRunConfig, train_tokenizer
from stage2_prior.train import train_prior
from vqgpt.cli import main
from vqgpt.ground.checkpoint import CheckpointError, check_checkpoint, list_checkpoints, read_export_meta
from vqgpt.ground.config import ConfigError, load_config
from vqgpt.training import RunFolderError

ROOT = Path(__file__).resolve().parents[1]


def tokenizer_config(*overrides: str) -> TokenizerRunConfig:
    return load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml",
                       ["train.batch_size=4", "train.log_every=1", "train.checkpoint_every=0", *overrides])


# ----------------------------------------------------------------------------- two runs mixed


def test_resume_from_another_runs_checkpoint_into_a_run_is_refused_without_overwrite(run, finished, tokens, tmp_path):
    foreign = finished / "checkpoints/step-00000004"
    before = snapshot(run)
    with pytest.raises(RunFolderError, match=rf"{run} already holds a run .*--overwrite"):
        train_prior(prior_config(tokens, "train.steps=5"), run, resume=str(foreign))
    assert snapshot(run) == before
    # --overwrite replaces the run in --out, then continues the other run's checkpoint there
    train_prior(prior_config(tokens, "train.steps=5"), run, resume=str(foreign), overwrite=True)
    assert read_steps(run) == [5] and [step for step, _ in list_checkpoints(run)] == [5]
    # into an empty folder it was and stays allowed; the other run is untouched
    train_prior(prior_config(tokens, "train.steps=5"), tmp_path / "fresh", resume=str(foreign))
    assert [step for step, _ in list_checkpoints(finished)] == [2, 4]
    # a checkpoint inside --out is not removed by --overwrite
    with pytest.raises(RunFolderError, match="exclude each other"):
        train_prior(prior_config(tokens, "train.steps=6"), run, resume=str(run / "checkpoints/step-00000005"),
                    overwrite=True)


# ----------------------------------------------------------------------------- other codes


def test_overwrite_deletes_the_runs_files_only(run, tokens):
    """--overwrite deleted everything in --out (the user's notes, a data folder), though its help says the
    run's checkpoints, metrics, samples and export; and a folder of the user's was called a run, with a hint
    to pass --overwrite."""
    (run / "NOTES.txt").write_text("the user's")
    (run / "mydata").mkdir()
    before = snapshot(run)
    with pytest.raises(RunFolderError, match=r"--overwrite: .* also holds NOTES.txt, mydata, which no run writes; "
                                             r"--overwrite deletes a run's own files only"):
        train_prior(prior_config(tokens, "train.steps=2"), run, overwrite=True)
    assert snapshot(run) == before and (run / "mydata").is_dir()
    mine = run.parent / "mine"
    mine.mkdir()
    (mine / "NOTES.txt").write_text("the user's")
    with pytest.raises(RunFolderError, match=r"mine holds NOTES.txt, which no run writes: choose another --out"):
        train_prior(prior_config(tokens, "train.steps=2"), mine)
    # without them, --overwrite replaces the run as before
    (run / "NOTES.txt").unlink()
    (run / "mydata").rmdir()
    train_prior(prior_config(tokens, "train.steps=2"), run, overwrite=True)
    assert read_steps(run)[-1] == 2 and [step for step, _ in list_checkpoints(run)] == [2]


def test_resume_on_shards_of_another_tokenizer_is_refused(tokens, tmp_path):
    codes = Path(shutil.copytree(tokens, tmp_path / "codes"))
    run = tmp_path / "run"
    train_prior(prior_config(codes, "train.steps=2", "train.checkpoint_every=0"), run)
    meta = json.loads((codes / "meta.json").read_text())
    (codes / "meta.json").write_text(json.dumps({**meta, "tokenizer_fingerprint": "another"}))
    before = snapshot(run)
    with pytest.raises(ConfigError, match=r"tokenizer_fingerprint: 'synthetic' -> 'another'"):
        train_prior(prior_config(codes, "train.steps=3"), run, resume="auto")
    assert snapshot(run) == before
    # a checkpoint written before the shards were recorded (an earlier vqgpt's) is judged by the run's export
    manifest = run / "checkpoints/step-00000002/manifest.json"
    assert json.loads(manifest.read_text())["inputs"]["tokenizer_fingerprint"] == "synthetic"
    manifest.unlink()
    with pytest.raises(ConfigError, match=r"tokenizer_fingerprint: 'synthetic' -> 'another' \(recorded in the run's "
                                          r"export\)"):
        train_prior(prior_config(codes, "train.steps=3"), run, resume="auto")
    # without an export it is not judged, and says so; on its own codes it resumes
    export = (run / "export").rename(tmp_path / "export")
    with pytest.warns(UserWarning, match=r"the checkpoint records no inputs \(an earlier vqgpt wrote it\), so whether "
                                         r"the token shards in .* are what the run trained on is not checked"):
        train_prior(prior_config(codes, "train.steps=3"), run, resume="auto")
    shutil.rmtree(run)
    (codes / "meta.json").write_text(json.dumps(meta))
    train_prior(prior_config(codes, "train.steps=2", "train.checkpoint_every=0"), run)
    manifest.unlink()
    train_prior(prior_config(codes, "train.steps=3"), run, resume="auto")
    assert read_steps(run) == [1, 2, 3] and export.is_dir()


# ----------------------------------------------------------------------------- a file missing


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.bin", "random_states_0.pkl"])
def test_a_checkpoint_with_a_missing_file_is_refused_before_anything_changes(run, tokens, name):
    ckpt = run / "checkpoints/step-00000004"
    (ckpt / name).unlink()
    before = snapshot(run)
    with pytest.raises(CheckpointError, match=rf"{ckpt / name}: missing.*nothing from it was run"):
        train_prior(prior_config(tokens, "train.steps=6"), run, resume="auto")
    assert snapshot(run) == before


def test_a_checkpoint_written_before_files_were_listed_is_checked_too(finished, tmp_path):
    ckpt = Path(shutil.copytree(finished / "checkpoints/step-00000004", tmp_path / "step-00000004"))
    assert "random_states_0.pkl" in json.loads((ckpt / "manifest.json").read_text())["files"]
    (ckpt / "manifest.json").unlink()
    assert check_checkpoint(ckpt) == 4
    for name in ("random_states_0.pkl", "optimizer.bin", "model.safetensors"):
        moved = (ckpt / name).rename(tmp_path / name)
        with pytest.raises(CheckpointError, match=rf"{ckpt}.*missing.*nothing from it was run"):
            check_checkpoint(ckpt)
        moved.rename(ckpt / name)


# ----------------------------------------------------------------------------- a stale pipeline


def test_resume_without_tokenizer_refreshes_the_run_pipeline(tmp_path, capsys):
    from stage1_vq.model import VQModel
    from vqgpt.ground.checkpoint import export_fingerprint
    from vqgpt.ground.tokens import TokenShardWriter

    tok = VQModel(tokenizer_config().model).eval()
    tok.save_pretrained(tmp_path / "tok")
    grids = torch.randint(0, tok.codebook_size, (8, 4, 4), generator=torch.Generator().manual_seed(0))
    meta = {"tokenizer_fingerprint": export_fingerprint(tmp_path / "tok"), "source": "test", "num_classes": 2,
            "classes": ["a", "b"]}
    with TokenShardWriter(tmp_path / "codes", [4, 4], tok.codebook_size, meta) as writer:
        writer.add(grids, torch.arange(8) % 2)
    run = tmp_path / "run"
    base = ["train-prior", "--config", str(ROOT / "configs/prior/tiny.yaml"), "--tokens", str(tmp_path / "codes"),
            "--out", str(run), "--set", "train.batch_size=4", "--set", "train.warmup_steps=0",
            "--set", "train.checkpoint_every=0"]
    assert main([*base, "--set", "train.steps=2", "--tokenizer", str(tmp_path / "tok")]) == 0
    capsys.readouterr()
    assert main([*base, "--set", "train.steps=3", "--resume", "auto"]) == 0
    assert f"{run / 'pipeline'}" in capsys.readouterr().out
    pipeline_prior = run / "pipeline/prior/model.safetensors"
    assert pipeline_prior.read_bytes() == (run / "export/model.safetensors").read_bytes()
    assert read_export_meta(run / "pipeline/prior")["extra"]["tokenizer_fingerprint"] == meta["tokenizer_fingerprint"]


@pytest.mark.slow
def test_under_accelerate_launch_the_pipeline_is_announced_once_by_the_process_that_wrote_it(tmp_path):
    """The other process returns before the write, and used to say 'written' too, maybe before it was."""
    import subprocess

    from stage1_vq.model import VQModel
    from test_distributed import launch_command, subprocess_env
    from vqgpt.ground.checkpoint import export_fingerprint
    from vqgpt.ground.tokens import TokenShardWriter
    from vqgpt.workflow.pipeline import VQGPTPipeline

    tok = VQModel(tokenizer_config().model)
    tok.save_pretrained(tmp_path / "tok")
    meta = {"tokenizer_fingerprint": export_fingerprint(tmp_path / "tok"), "source": "test", "num_classes": 2,
            "classes": ["a", "b"]}
    grids = torch.randint(0, tok.codebook_size, (8, 4, 4), generator=torch.Generator().manual_seed(0))
    with TokenShardWriter(tmp_path / "codes", [4, 4], tok.codebook_size, meta) as writer:
        writer.add(grids, torch.arange(8) % 2)
    cmd = [*launch_command(2), "-m", "vqgpt", "train-prior", "--config", str(ROOT / "configs/prior/tiny.yaml"),
           "--tokens", str(tmp_path / "codes"), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "run"),
           "--set", "train.steps=2", "--set", "train.batch_size=2", "--set", "train.checkpoint_every=0"]
    done = subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("pipeline (tokenizer + prior) written to") == 1, done.stdout[-3000:]
    VQGPTPipeline.from_pretrained(tmp_path / "run" / "pipeline")


# ----------------------------------------------------------------------------- trackers


@pytest.mark.parametrize("name", ["wandb", "wandb-run-id"])
def test_project_names_of_tracker_files_are_refused(tokens, name):
    with pytest.raises(ConfigError, match=rf"train.project_name: '{name}' is reserved"):
        prior_config(tokens, "train.log_with=tensorboard", f"train.project_name={name}")


def test_wandb_without_login_is_one_clear_error_and_the_rerun_works(tokens, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")

    def no_login(*args, **kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])")
    monkeypatch.setattr(wandb, "init", no_login)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = tmp_path / "run"
    cfg = prior_config(tokens, "train.log_with=wandb", "train.steps=1", "train.checkpoint_every=0")
    with pytest.raises(ConfigError, match=r"train.log_with=wandb: wandb did not start \(api_key not configured.*"
                                          r"`wandb login`.*WANDB_MODE=offline"):
        train_prior(cfg, run)
    monkeypatch.undo()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    train_prior(cfg, run)  # the same command: the failed start left nothing that blocks it
    wandb.teardown()
    assert read_steps(run) == [1]


# ----------------------------------------------------------------------------- loss weights


@pytest.mark.parametrize("key", ["codebook_weight", "gan_weight", "perceptual_weight"])
@pytest.mark.parametrize("value", ["-5", "nan", "inf"])
def test_loss_weights_must_be_finite_and_not_negative(key, value):
    with pytest.raises(ConfigError, match=rf"loss.{key}: must be a finite number >= 0, got {float(value)}"):
        tokenizer_config(f"loss.{key}={value}")


# ----------------------------------------------------------------------------- going back


def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(run, tokens, tmp_path):
    before = snapshot(run)
    with pytest.raises(ConfigError, match=r"is at step 4, past train.steps=2"):
        train_prior(prior_config(tokens, "train.steps=2"), run, resume="auto")
    assert snapshot(run) == before
    tok_run = tmp_path / "tok"
    train_tokenizer(tokenizer_config("train.steps=2"), tok_run)
    with pytest.raises(ConfigError, match=r"is at step 2, past train.steps=1"):
        train_tokenizer(tokenizer_config("train.steps=1"), tok_run, resume="auto")
    train_tokenizer(tokenizer_config("train.steps=2"), tok_run, resume="auto")  # the same length re-exports


def test_a_tracker_that_fails_on_the_main_process_stops_every_process(tokens, tmp_path):
    """Under accelerate launch only the main process starts trackers: every process stops with its
    error (without the broadcast the others die in their first collective, killed by the launcher)."""
    pytest.importorskip("wandb")
    import subprocess

    from test_distributed import launch_command, subprocess_env

    env = {k: v for k, v in subprocess_env().items() if k not in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR")}
    env["HOME"] = str(tmp_path / "home")  # no ~/.netrc: wandb has no login, and says so without the network
    cmd = [*launch_command(2), "-m", "vqgpt", "train-prior", "--config", str(ROOT / "configs/prior/tiny.yaml"),
           "--set", "train.steps=2", "--set", "train.batch_size=8", "--set", "train.log_with=wandb",
           "--tokens", str(tokens), "--out", str(tmp_path / "run")]
    try:
        done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the other process kept waiting after the main process failed to start wandb")  # a hang
    assert done.returncode != 0
    assert "error: train.log_with=wandb: wandb did not start" in done.stderr  # the main process
    assert "error: main process: train.log_with=wandb: wandb did not start" in done.stderr  # the other one
