"""Stage 2 training: learns synthetic token grids, exports, resumes exactly (EMA on, grad_accum > 1,
across an epoch boundary, with class dropout and dropout drawing from the RNG), mixed precision."""

import json
import os
import signal
import warnings
from pathlib import Path

import pytest
import torch

import stage2_prior.train as prior_train
from dist_check import make_token_shards, recording
from stage2_prior.layers import TransformerBlock
from stage2_prior.model import GPT
from stage2_prior.train import PriorRunConfig, train_prior
from vqgpt.ground.checkpoint import list_checkpoints, read_trainer_state
from vqgpt.ground.config import ConfigError, load_config
from vqgpt.training import set_grad_checkpointing

ROOT = Path(__file__).resolve().parents[1]


def prior_config(tokens: Path, *overrides: str) -> PriorRunConfig:
    return load_config(PriorRunConfig, ROOT / "configs/prior/tiny.yaml",
                       ["train.log_every=1", "train.warmup_steps=2", "train.batch_size=8", *overrides, f"tokens={tokens}"])


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    return make_token_shards(tmp_path_factory.mktemp("prior") / "tokens")  # 64 grids 4x4, 4 classes


def test_short_run_learns_the_grids_and_exports(tokens, tmp_path):
    export = train_prior(prior_config(tokens, "train.steps=40", "train.checkpoint_every=20"), tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 40
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"], (rows[0]["loss"], rows[-1]["loss"])
    model = GPT.from_pretrained(export)
    assert model.config.codebook_size == 32 and list(model.config.grid_size) == [4, 4]
    assert model.config.num_classes == 4  # taken from the shards
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [20, 40]


def interrupt_at(micro_batch: int):
    """A loss wrapper that sends this process SIGTERM during call ``micro_batch`` (0-based)."""
    calls = [0]
    inner = prior_train.next_token_loss

    def wrapped(logits, tokens):
        if calls[0] == micro_batch:
            os.kill(os.getpid(), signal.SIGTERM)
        calls[0] += 1
        return inner(logits, tokens)
    return wrapped


def test_interrupted_and_resumed_run_ends_with_the_same_weights(tokens, tmp_path, monkeypatch):
    """EMA on, grad_accum=3, class dropout and dropout on (RNG), interrupted mid-epoch."""
    # 64 grids / batch 8 = 8 micro-batches per epoch, not a multiple of grad_accum=3: steps straddle
    # epoch ends (30 micro-batches = 3.75 epochs).
    common = ["train.steps=10", "train.grad_accum=3", "train.ema_decay=0.8", "model.class_dropout=0.25",
              "model.dropout=0.1", "train.checkpoint_every=0", "train.keep_checkpoints=5"]
    full = train_prior(prior_config(tokens, *common), tmp_path / "full")

    part = tmp_path / "part"
    # SIGTERM during step 6 (micro-batch 17): the run finishes that step, checkpoints and stops.
    monkeypatch.setattr(prior_train, "next_token_loss", interrupt_at(17))
    with pytest.raises(KeyboardInterrupt):
        train_prior(prior_config(tokens, *common), part)
    (step, ckpt), = list_checkpoints(part)
    assert step == 6
    assert read_trainer_state(ckpt) == {"step": 6, "epoch": 2, "batch": 2, "processes": 1, "batch_size": 8,
                                        "skipped": 0, "code_groups": None}  # (none: a resume reads no export for them)
    assert not (part / "export").exists()
    monkeypatch.undo()
    resumed = train_prior(prior_config(tokens, *common), part, resume="auto")

    a, b = GPT.from_pretrained(full).state_dict(), GPT.from_pretrained(resumed).state_dict()  # EMA weights
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the raw weights and the optimizer too: the final checkpoints hold the same model
    from safetensors.torch import load_file

    raw_full = load_file(str(list_checkpoints(tmp_path / "full")[-1][1] / "model.safetensors"))
    raw_part = load_file(str(list_checkpoints(part)[-1][1] / "model.safetensors"))
    for key in raw_full:
        assert torch.equal(raw_full[key], raw_part[key]), key
    # exactly one optimizer update per step, also across epoch ends (no early sync at an epoch end)
    for run in (tmp_path / "full", part):
        optimizer = torch.load(list_checkpoints(run)[-1][1] / "optimizer.bin", weights_only=True)
        assert {int(s["step"]) for s in optimizer["state"].values()} == {10}
    # and the logged losses of the resumed steps are the uninterrupted run's
    assert [r["loss"] for r in read_metrics(tmp_path / "full")][6:] == [r["loss"] for r in read_metrics(part)][6:]


def test_bf16_and_fp16_runs(tokens, tmp_path):
    """bf16 autocast trains (fast on AMX CPUs); fp16 falls back to fp32 on a CPU with a warning."""
    train_prior(prior_config(tokens, "train.steps=4", "train.mixed_precision=bf16"), tmp_path / "bf16")
    rows = read_metrics(tmp_path / "bf16")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows) and rows[-1]["loss"] < rows[0]["loss"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_prior(prior_config(tokens, "train.steps=2", "train.mixed_precision=fp16"), tmp_path / "fp16")
    assert any("fp16 needs a GPU" in str(w.message) for w in caught)
    assert (tmp_path / "fp16/export/model.safetensors").is_file()


def test_grad_checkpointing_option(tokens, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="train.grad_checkpointing: Linear"):
        set_grad_checkpointing(torch.nn.Linear(2, 2), True)
    # forward calls of each block in training mode with gradients on (the recomputation in the
    # backward pass included: it calls forward directly, without the module's hooks)
    calls: dict[torch.nn.Module, int] = {}
    forward = TransformerBlock.forward

    def counting(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            calls[self] = calls.get(self, 0) + 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(TransformerBlock, "forward", counting)
    runs = {}
    for name, checkpointing in (("plain", False), ("ckpt", True)):
        built = []
        monkeypatch.setattr(prior_train, "GPT", recording(GPT, built))
        cfg = prior_config(tokens, "train.steps=3", f"train.grad_checkpointing={str(checkpointing).lower()}")
        calls.clear()
        runs[name] = train_prior(cfg, tmp_path / name)
        model, = built
        assert model.grad_checkpointing is checkpointing
        # checkpointing runs each block's forward again in the backward pass: twice per micro-batch
        micro_batches = cfg.train.steps * cfg.train.grad_accum
        assert [calls.get(layer, 0) for layer in model.layers] == \
            [micro_batches * (2 if checkpointing else 1)] * len(model.layers), name
    a, b = GPT.from_pretrained(runs["plain"]).state_dict(), GPT.from_pretrained(runs["ckpt"]).state_dict()
    for key in a:  # recomputation changes memory, not results
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_sample_grids_without_a_null_class_and_with_class_names(tmp_path, monkeypatch):
    """class_dropout=0 trained every step, then the last sample grid asked for guidance the prior cannot
    give: an error, and no export. The grids' rows were labelled 0, 1, ... whatever the classes' names."""
    tokens = make_token_shards(tmp_path / "tokens")
    meta_path = tokens / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["classes"] = ["zeta", "alpha", "10", "9"]
    meta_path.write_text(json.dumps(meta))
    labels = []
    monkeypatch.setattr(prior_train, "save_grid", lambda images, path, nrow, row_labels: labels.append(row_labels))

    def decode(codes):
        return torch.zeros(codes.shape[0], 3, 8, 8)

    cfg = prior_config(tokens, "train.steps=2", "train.sample_every=2", "model.class_dropout=0", "sample_cfg_scale=2")
    with pytest.warns(UserWarning, match="sample_cfg_scale=2.0: model.class_dropout=0 trains no null class"):
        export = train_prior(cfg, tmp_path / "run", decode=decode)
    assert export.is_dir() and labels and all(rows == ["zeta", "alpha", "10", "9"] for rows in labels)
    # an unconditional prior names no class
    export = train_prior(prior_config(tokens, "train.steps=1", "conditional=false"), tmp_path / "uncond")
    assert json.loads((export / "config.json").read_text()).get("classes", []) == []


def test_a_resume_under_another_grad_accum_continues_the_same_optimisation(tokens, tmp_path):
    """batch 8 x 1 resumed as 4 x 2 (the README's way to keep the optimisation): accelerate's micro-batch
    counter came back from the checkpoint, so after an odd step the new accumulation synced on the first
    micro-batch of each step (updates of two steps' halves)."""
    # no RNG in the step; a constant LR, which the longer second session does not stretch
    fixed = ["model.class_dropout=0", "train.warmup_steps=0", "train.lr_schedule=constant", "train.checkpoint_every=5"]
    whole = train_prior(prior_config(tokens, *fixed, "train.steps=7"), tmp_path / "whole")
    train_prior(prior_config(tokens, *fixed, "train.steps=5"), tmp_path / "split")
    resumed = train_prior(prior_config(tokens, *fixed, "train.steps=7", "train.batch_size=4", "train.grad_accum=2"),
                          tmp_path / "split", resume="auto")
    a, b = GPT.from_pretrained(whole).state_dict(), GPT.from_pretrained(resumed).state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4  # float rounding (the bug: 5e-3)


def test_train_compile_may_change_on_resume(tokens, tmp_path):
    """The README lets train.compile change on resume, but the checkpoints of a compiled run carry
    torch.compile's '_orig_mod.' key prefix: either way round the resume failed on the key names."""
    base = ["model.class_dropout=0", "train.lr_schedule=constant", "train.checkpoint_every=2"]
    for first, then in (("true", "false"), ("false", "true")):
        run = tmp_path / f"compile-{first}"
        train_prior(prior_config(tokens, *base, "train.steps=2", f"train.compile={first}"), run)
        export = train_prior(prior_config(tokens, *base, "train.steps=3", f"train.compile={then}"), run, resume="auto")
        assert [step for step, _ in list_checkpoints(run)] == [2, 3] and (export / "model.safetensors").is_file()


def test_a_checkpoint_carries_its_config_for_the_resume_check(tokens, tmp_path):
    """A checkpoint copied out of its run folder (or a run whose config.yaml is gone) was resumed with any
    change: other heads over the same weights, another LR. The checkpoint now records its run's config."""
    import shutil

    base = ["train.steps=4", "train.checkpoint_every=2"]
    train_prior(prior_config(tokens, *base), tmp_path / "run")
    saved = tmp_path / "saved" / "step-00000002"
    shutil.copytree(tmp_path / "run" / "checkpoints" / "step-00000002", saved)
    with pytest.raises(ConfigError, match=r"model.n_head: 2 -> 4.*train.lr: 0.003 -> 0.03.*manifest.json"):
        train_prior(prior_config(tokens, *base, "model.n_head=4", "train.lr=0.03"), tmp_path / "new", resume=str(saved))
    assert not (tmp_path / "new" / "metrics.jsonl").exists()
    train_prior(prior_config(tokens, *base), tmp_path / "new", resume=str(saved))  # the same config continues
    # a checkpoint of an earlier vqgpt records no config: with no config.yaml beside it, a warning says so
    manifest = saved / "manifest.json"
    manifest.write_text(json.dumps({k: v for k, v in json.loads(manifest.read_text()).items() if k != "config"}))
    with pytest.warns(UserWarning, match="records the run's config, so the requested one is not compared"):
        train_prior(prior_config(tokens, *base), tmp_path / "newer", resume=str(saved))


def test_the_resume_knows_the_token_rows_not_the_folder_name(tmp_path):
    """Shards re-encoded into the run's token folder were resumed on (the run's position applied to other
    data), while the same shards moved to another folder were refused."""
    import shutil

    tokens = make_token_shards(tmp_path / "tokens")
    base = ["train.steps=4", "train.checkpoint_every=2"]
    train_prior(prior_config(tokens, *base, "train.steps=2"), tmp_path / "run")
    shutil.copytree(tokens, tmp_path / "moved")
    train_prior(prior_config(tmp_path / "moved", *base, "train.steps=3"), tmp_path / "run", resume="auto")
    # the same rows cut into other shards (an encode on another number of processes): the same data
    recut = make_token_shards(tmp_path / "recut", shard_size=20)
    assert len(json.loads((recut / "meta.json").read_text())["shards"]) == 4
    train_prior(prior_config(recut, *base, "train.steps=4"), tmp_path / "run", resume="auto")
    shutil.rmtree(tokens)
    make_token_shards(tokens, seed=1)  # other grids, the same count, vocabulary, grid and classes
    with pytest.raises(ConfigError, match=r"rows_digest: '[0-9a-f]+' -> '[0-9a-f]+'"):
        train_prior(prior_config(tokens, *base, "train.steps=5"), tmp_path / "run", resume="auto")


def test_a_checkpoint_that_knows_its_rows_by_the_shard_checksums_still_checks_them(tmp_path):
    """Checkpoints written before rows_digest record rows_sha256, a digest of the shards' checksums: shards
    re-encoded in place were resumed on once those were no longer compared."""
    import hashlib
    import shutil

    tokens = make_token_shards(tmp_path / "tokens")
    base = ["train.steps=4", "train.checkpoint_every=2"]
    train_prior(prior_config(tokens, *base, "train.steps=2"), tmp_path / "run")

    def as_written_before():
        manifest = max((tmp_path / "run" / "checkpoints").glob("*/manifest.json"))
        record = json.loads(manifest.read_text())
        sums = [shard["rows_sha256"] for shard in json.loads((tokens / "meta.json").read_text())["shards"]]
        record["inputs"]["rows_sha256"] = hashlib.sha256("".join(sums).encode()).hexdigest()
        del record["inputs"]["rows_digest"]
        manifest.write_text(json.dumps(record))

    as_written_before()
    shutil.copytree(tokens, tmp_path / "moved")  # the same shards elsewhere: still known
    train_prior(prior_config(tmp_path / "moved", *base, "train.steps=3"), tmp_path / "run", resume="auto")
    shutil.rmtree(tmp_path / "moved")
    as_written_before()
    shutil.rmtree(tokens)
    make_token_shards(tokens, seed=1)  # other grids, the same count, vocabulary, grid and classes
    with pytest.raises(ConfigError, match=r"rows_sha256: '[0-9a-f]+' -> '[0-9a-f]+'"):
        train_prior(prior_config(tokens, *base), tmp_path / "run", resume="auto")


def test_a_longer_resumed_run_says_where_its_lr_goes(tokens, tmp_path, capsys):
    """train.steps raised on resume stretches the cosine schedule: the LR jumped back up without a word."""
    train_prior(prior_config(tokens, "train.steps=4", "train.checkpoint_every=4"), tmp_path / "run")
    capsys.readouterr()
    train_prior(prior_config(tokens, "train.steps=8", "train.checkpoint_every=4"), tmp_path / "run", resume="auto")
    rows = read_metrics(tmp_path / "run")
    said = capsys.readouterr().err
    assert f"train.steps 4 -> 8: the LR schedule stretches to the new length, so the LR of step 5 is " \
           f"{rows[4]['lr']:.3g}" in said, said
