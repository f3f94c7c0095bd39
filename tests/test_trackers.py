"""Experiment trackers (train.log_with): both stages feed TensorBoard (and wandb, offline) with the
metrics.jsonl scalars and the sample / reconstruction grids; a resume continues the same TensorBoard
run; a bad value or a missing package is a clear error before training."""

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch
from dist_check import make_token_shards
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stage1_vq.train import TokenizerRunConfig, train_tokenizer
from stage2_prior.train import PriorRunConfig, train_prior
from vqgpt.ground.checkpoint import list_checkpoints
from vqgpt.ground.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def prior_config(tokens: Path, *overrides: str) -> PriorRunConfig:
    return load_config(PriorRunConfig, ROOT / "configs/prior/tiny.yaml",
                       ["train.log_every=1", "train.warmup_steps=2", "train.batch_size=8", "train.steps=4",
                        "train.checkpoint_every=2", *overrides, f"tokens={tokens}"])


def decode(codes: torch.Tensor) -> torch.Tensor:
    """A stand-in tokenizer: codes (B, h, w) of a 32-code book -> grey images (B, 3, h, w) in [-1, 1]."""
    return (codes.float() / 31 * 2 - 1)[:, None].expand(-1, 3, -1, -1)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def events(run: Path, project: str = "vqgpt") -> EventAccumulator:
    folder = run / "tracking" / project
    assert list(folder.glob("events.out.tfevents.*")), f"no event file in {folder}"
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def assert_scalars_match(acc: EventAccumulator, rows: list[dict], keys: tuple[str, ...]) -> None:
    """Each key's events hold exactly metrics.jsonl's steps and values (float32 in the event file)."""
    for key in keys:
        logged = {e.step: e.value for e in acc.Scalars(key)}
        wanted = {r["step"]: r[key] for r in rows}
        assert sorted(logged) == sorted(wanted), (key, sorted(logged), sorted(wanted))
        for step, value in wanted.items():
            assert logged[step] == pytest.approx(value, rel=1e-6, abs=1e-7), (key, step)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    return make_token_shards(tmp_path_factory.mktemp("trackers") / "tokens")  # 64 grids 4x4, 4 classes


def test_prior_run_logs_scalars_and_samples_to_tensorboard_and_resumes_in_the_same_folder(tokens, tmp_path):
    run = tmp_path / "run"
    train_prior(prior_config(tokens, "train.log_with=tensorboard", "train.sample_every=2"), run, decode=decode)
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    acc = events(run)
    assert_scalars_match(acc, rows, ("loss", "lr", "tokens_per_s", "skipped"))
    assert [e.step for e in acc.Images("samples")] == [2, 4]  # the last step's grid once (it was logged twice)
    assert acc.Images("samples")[0].width > 0

    # Resume from step 2 (the later checkpoint removed) logging every 2nd step: the first session's
    # steps 3 and 4 must leave the event record, as they left metrics.jsonl.
    shutil.rmtree(list_checkpoints(run)[-1][1])
    train_prior(prior_config(tokens, "train.log_with=tensorboard", "train.sample_every=2", "train.log_every=2"),
                run, resume="auto", decode=decode)
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 4]
    assert len(list((run / "tracking/vqgpt").glob("events.out.tfevents.*"))) == 2  # one folder, two sessions
    assert_scalars_match(events(run), rows, ("loss", "lr"))
    assert [e.step for e in events(run).Images("samples")] == [2, 4]
    # resuming the finished run trains nothing and logs nothing again (its last grid went in once per resume)
    train_prior(prior_config(tokens, "train.log_with=tensorboard", "train.sample_every=2", "train.log_every=2"),
                run, resume="auto", decode=decode)
    assert [e.step for e in events(run).Images("samples")] == [2, 4]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-00000002.png", "step-00000004.png"]


def test_resume_auto_restarts_a_run_killed_before_its_first_checkpoint(tokens, tmp_path):
    """RUN/tracking/ is part of what such a run leaves; the fresh start hides the dead session's events."""
    run = tmp_path / "run"
    train_prior(prior_config(tokens, "train.log_with=tensorboard", "train.steps=3", "train.checkpoint_every=0"), run)
    for name in ("checkpoints", "export"):  # as if killed before step 3's checkpoint
        shutil.rmtree(run / name)
    train_prior(prior_config(tokens, "train.log_with=tensorboard", "train.steps=2", "train.checkpoint_every=0"), run,
                resume="auto")
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    assert_scalars_match(events(run), rows, ("loss",))


def test_tokenizer_run_logs_scalars_and_reconstructions_to_tensorboard(tmp_path):
    cfg = load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml",
                      ["train.steps=4", "train.log_every=2", "train.warmup_steps=2", "train.batch_size=8",
                       "train.checkpoint_every=0", "train.log_with=tensorboard", "train.project_name=tok",
                       "train.sample_every=2"])
    train_tokenizer(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    acc = events(tmp_path / "run", "tok")
    assert_scalars_match(acc, rows, ("loss", "rec_loss", "psnr", "usage", "lr"))
    assert [e.step for e in acc.Images("reconstructions")] == [2, 4]  # the last once (it was logged twice)


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline wandb run file (LevelDB log format: 32 KiB blocks of
    [crc32 u32, length u16, kind u8] + data records, after wandb's 7-byte file header)."""
    from wandb.proto import wandb_internal_pb2

    raw, pos, part, rows = run_file.read_bytes(), 7, b"", []
    block = 32768
    while pos + 7 <= len(raw):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # block padding
            pos += left
            continue
        part += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            part = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_all_feeds_wandb_offline_and_tensorboard(tokens, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)  # the run's files then go to RUN/tracking/wandb/
    run = tmp_path / "run"
    train_prior(prior_config(tokens, "train.log_with=all", "train.project_name=demo"), run, decode=decode)
    # run.finish() returns before wandb's service process has written out the run file; its teardown waits.
    wandb.teardown()
    rows = read_metrics(run)
    assert_scalars_match(events(run, "demo"), rows, ("loss",))
    run_file, = (run / "tracking/wandb").glob("offline-run-*/run-*.wandb")
    history = [h for h in wandb_history(run_file) if "loss" in h]
    assert {h["_step"]: h["loss"] for h in history} == pytest.approx({r["step"]: r["loss"] for r in rows})
    assert any(h.get("samples/_type") == "image-file" and h["_step"] == 4 for h in wandb_history(run_file))
    assert list(run_file.parent.glob("files/media/images/samples_4_*.png"))
    assert (run / "tracking/wandb-run-id").read_text().strip() == run_file.stem.removeprefix("run-")

    # a resume continues the same wandb run (same id), in a new session
    shutil.rmtree(list_checkpoints(run)[-1][1])
    train_prior(prior_config(tokens, "train.log_with=wandb", "train.project_name=demo"), run, resume="auto")
    wandb.teardown()
    sessions = sorted((run / "tracking/wandb").glob("offline-run-*/run-*.wandb"))
    assert len(sessions) == 2 and {f.name for f in sessions} == {run_file.name}
    assert [h["_step"] for h in wandb_history(sessions[-1]) if "loss" in h] == [3, 4]


def test_bad_value_and_missing_package_are_config_errors(tokens, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"train.log_with: expected none \| tensorboard \| wandb \| all, got 'tb'"):
        prior_config(tokens, "train.log_with=tb")
    with pytest.raises(ConfigError, match="train.project_name"):
        prior_config(tokens, "train.project_name=a/b")
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(ConfigError, match=r'train.log_with=all: the tensorboard package is not installed: '
                                          r'pip install "vqgpt\[tracking\]"'):
        train_prior(prior_config(tokens, "train.log_with=all"), tmp_path / "run")
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"train.log_with=all: the tensorboard and wandb packages are not installed"):
        train_prior(prior_config(tokens, "train.log_with=all"), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before the run folder was touched


def test_a_resume_from_an_earlier_checkpoint_logs_its_own_last_grid(tokens, tmp_path):
    """Resumed from step 2 of a finished 4-step run (the step-4 checkpoint removed), the session's last grid
    was not written because the abandoned branch's step-4 grid file was there: the trackers, whose record
    after step 2 the resume drops, were left with no grid of step 4."""
    run = tmp_path / "run"
    cfg = prior_config(tokens, "train.log_with=tensorboard", "train.sample_every=1000")
    train_prior(cfg, run, decode=decode)
    assert [e.step for e in events(run).Images("samples")] == [4]
    shutil.rmtree(list_checkpoints(run)[-1][1])
    train_prior(cfg, run, resume="auto", decode=decode)
    assert [e.step for e in events(run).Images("samples")] == [4]
