"""Both trainers under DDP with 2 real processes (gloo on the CPU), the launch guard, and the
example accelerate configs (the FSDP one down to sharding a prior on the CPU).

What "same global batch" means here: 2 processes x batch_size B against 1 process x 2B. The
seeded sampler gives both runs the same global order and accelerate hands micro-batch i of it to
rank i % 2, so every optimizer step averages the gradients of exactly the same 2B samples. With
no rank-local randomness (class dropout 0, k-means init off: its seeds come from rank 0's half of
the latents) the two runs differ only in float summation order; measured: losses agree to ~1e-4
relative (GAN steps, whose adaptive weight is computed per rank) and ~1e-6 otherwise, weights to
~2e-4 absolute. Tolerances below: 2e-3 relative on losses, 2e-3 absolute on weights.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_check import KIND_RUNS, PLAIN_CODEBOOK, make_token_shards, nan_at
from stage1_vq.model import VQModel
from stage1_vq.train import TokenizerRunConfig, train_tokenizer
from stage2_prior.model import GPT
from stage2_prior.train import PriorRunConfig, train_prior
from vqgpt.ground.config import load_config
from vqgpt.training import TrainConfig, make_accelerator

ROOT = Path(__file__).resolve().parents[1]
DIST_CHECK = ROOT / "tests" / "dist_check.py"
BATCH = 4  # per process
TOKENIZER_SET = ["train.steps=6", "train.grad_accum=2", "train.log_every=1", "train.warmup_steps=2",
                 "train.ema_decay=0.9", "loss.disc_start=3", "model.quantizer.kmeans_init=false"]
PRIOR_SET = ["train.steps=6", "train.grad_accum=2", "train.log_every=1", "train.warmup_steps=2",
             "train.ema_decay=0.9", "model.class_dropout=0", "train.on_nonfinite=skip"]
NAN_MICRO_BATCH = 3  # the prior's 4th micro-batch (2nd of step 2) is NaN on one rank: both must skip it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(num_processes: int) -> list[str]:
    """`accelerate launch` with the issue's flags (the venv's script, else the same as a module)."""
    script = Path(sys.executable).parent / "accelerate"
    head = [str(script), "launch"] if script.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    return [*head, "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]


def subprocess_env() -> dict[str, str]:
    # One thread per process: two spinning OpenMP pools on 2 cores make torch many times slower.
    return {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_curves_match(two: list[dict], one: list[dict], keys: list[str], rtol: float) -> None:
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, len(one) + 1))
    for key in keys:
        a = torch.tensor([r[key] for r in two], dtype=torch.float64)
        b = torch.tensor([r[key] for r in one], dtype=torch.float64)
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-6, msg=f"{key}: 2 processes {a} vs 1 process {b}")


@pytest.mark.slow
def test_two_processes_keep_replicas_identical_and_match_one_process(tmp_path, monkeypatch):
    tokens = make_token_shards(tmp_path / "tokens")
    out = tmp_path / "two"
    cmd = [*launch_command(2), str(DIST_CHECK), "--out", str(out), "--tokens", str(tokens), "--expect-processes", "2",
           "--also-kmeans", "--also-kinds", "--prior-nan-micro-batch", str(NAN_MICRO_BATCH), "--nan-rank", "1"]
    for item in [*TOKENIZER_SET, f"train.batch_size={BATCH}"]:
        cmd += ["--tokenizer-set", item]
    for item in [*PRIOR_SET, f"train.batch_size={BATCH}"]:
        cmd += ["--prior-set", item]
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=400)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    # Two ranks of one gloo group, not two independent single processes.
    stages = ("tokenizer", "tokenizer_kmeans", *KIND_RUNS, "prior")
    for stage in stages:
        for rank in (0, 1):
            assert f"rank {rank} of 2 (MULTI_CPU, backend gloo): {stage} done" in log, log[-4000:]
    assert "replica check caught" in log and "MISSED" not in log, log[-4000:]

    # Every rank holds bitwise the same weights, codebook state, discriminator and EMA, for every quantizer kind.
    for stage in stages:
        rank0 = torch.load(out / "states" / f"{stage}-rank0.pt")
        rank1 = torch.load(out / "states" / f"{stage}-rank1.pt")
        assert set(rank0) == ({"model", "ema"} if stage == "prior" else {"model", "disc", "ema"})
        for part in rank0:
            for key, value in rank0[part].items():
                assert torch.equal(value, rank1[part][key]), f"{stage} {part}.{key} differs between ranks"
    codebook = torch.load(out / "states" / "tokenizer_kmeans-rank0.pt")["model"]
    assert bool(codebook["quantize.initialized"])  # k-means ran (and agreed across ranks)

    # Only the main process writes: one metrics line per step, not one per rank.
    two_tok, two_prior = read_metrics(out / "tokenizer"), read_metrics(out / "prior")
    assert len(two_tok) == 6 and len(two_prior) == 6
    assert two_prior[-1]["skipped"] == 1  # the NaN on rank 1 made both ranks skip

    # The same global batch on one process.
    one = tmp_path / "one"
    train_tokenizer(load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml",
                                [*TOKENIZER_SET, f"train.batch_size={2 * BATCH}"]), one / "tokenizer")
    import stage2_prior.train as prior_train

    monkeypatch.setattr(prior_train, "next_token_loss", nan_at(prior_train.next_token_loss, NAN_MICRO_BATCH, 0))
    train_prior(load_config(PriorRunConfig, ROOT / "configs/prior/tiny.yaml",
                            [*PRIOR_SET, f"train.batch_size={2 * BATCH}", f"tokens={tokens}"]), one / "prior")
    one_tok, one_prior = read_metrics(one / "tokenizer"), read_metrics(one / "prior")
    assert_curves_match(two_tok, one_tok, ["loss", "rec_loss", "quant_loss", "gan", "disc_loss"], rtol=2e-3)
    assert_curves_match(two_prior, one_prior, ["loss"], rtol=2e-3)
    assert one_prior[-1]["skipped"] == 1
    assert two_tok[-1]["disc_loss"] > 0  # the GAN trained in both
    # The other quantizer kinds: their losses hold batch means over all ranks (LFQ's codebook entropy,
    # the entropy penalty) and usage counts all-reduced, so they too match one process.
    for name, overrides in KIND_RUNS.items():
        train_tokenizer(load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml",
                                    [*TOKENIZER_SET, *PLAIN_CODEBOOK, *overrides, f"train.batch_size={2 * BATCH}"]),
                        one / name)
        assert_curves_match(read_metrics(out / name), read_metrics(one / name),
                            ["loss", "rec_loss", "quant_loss", "usage", "perplexity"], rtol=2e-3)

    for stage, cls in (("tokenizer", VQModel), ("prior", GPT)):
        two_ema = torch.load(out / "states" / f"{stage}-rank0.pt")["ema"]
        one_ema = cls.from_pretrained(one / stage / "export").state_dict()
        for key, value in one_ema.items():
            torch.testing.assert_close(two_ema[key], value, rtol=0, atol=2e-3, msg=f"{stage} {key}")
        # the 2-process export (rank 0) is what rank 0 held
        exported = cls.from_pretrained(out / stage / "export").state_dict()
        for key, value in exported.items():
            assert torch.equal(value, two_ema[key]), key


def test_a_launch_that_accelerate_does_not_see_is_an_error(tmp_path, monkeypatch):
    """`accelerate launch --multi_gpu` that ends up as N independent single processes must not train."""
    import vqgpt.training.config as training_config

    monkeypatch.setenv("WORLD_SIZE", "2")  # launched as 2 processes ...
    monkeypatch.delenv("LOCAL_RANK", raising=False)  # ... but accelerate finds no distributed set-up
    monkeypatch.setattr(training_config, "_no_accelerator_device", lambda: False)  # as on a machine with a GPU driver issue
    with pytest.raises(RuntimeError, match="launched as 2 processes .* Accelerate runs 1"):
        make_accelerator(TrainConfig(), tmp_path)


# ----------------------------------------------------------------------------- accelerate configs


def launcher_env(config_file: Path, num_processes: int) -> dict[str, str]:
    """The environment `accelerate launch --config_file F` gives its processes (parsed, not run)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "--num_processes",
                                               str(num_processes), "train.py"])
    args, _, _ = _validate_launch_command(args)
    return prepare_multi_gpu_env(args)


@pytest.mark.parametrize("name, kind, processes", [("single_gpu", "NO", 1), ("multi_gpu", "MULTI_GPU", 8),
                                                   ("multi_node", "MULTI_GPU", 16), ("fsdp", "FSDP", 8)])
def test_accelerate_configs_load(name, kind, processes):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "configs/accelerate" / f"{name}.yaml"))  # unknown keys raise
    assert config.distributed_type.value == kind
    assert config.num_processes == processes
    assert config.mixed_precision == "bf16"


def test_fsdp_config_shards_a_prior_on_the_cpu(monkeypatch):
    """configs/accelerate/fsdp.yaml -> the launcher's FSDP settings -> FSDP2 over the prior's blocks.

    accelerate itself runs FSDP on GPUs only (on a CPU it falls back to DDP), so the sharding is
    applied here with torch's fully_shard, as accelerate's FSDP2 path does, in a 1-process gloo group.
    """
    import torch.distributed as dist
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from stage2_prior.model import GPTConfig
    from vqgpt.training import full_state_dict

    env = launcher_env(ROOT / "configs/accelerate/fsdp.yaml", 1)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    for key, value in env.items():
        if key.startswith("FSDP_"):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.transformer_cls_names_to_wrap == ["TransformerBlock"]

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, dim=64, codebook_size=32, grid_size=[4, 4], num_classes=3))
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    units = [m for m in model.modules() if type(m).__name__ in plugin.transformer_cls_names_to_wrap]
    assert len(units) == 2  # the config's wrap class names the prior's blocks

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        for unit in units:
            fully_shard(unit)
        fully_shard(model)
        assert isinstance(model, FSDPModule) and all(isinstance(u, FSDPModule) for u in units)
        state = full_state_dict(model)  # what the prior's export gathers under FSDP
        assert state.keys() == reference.keys()
        for key in reference:
            assert torch.equal(state[key], reference[key]), key
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        tokens = torch.randint(0, 32, (4, 16))
        loss = torch.nn.functional.cross_entropy(model(tokens, torch.tensor([0, 1, 2, 0])).flatten(0, 1),
                                                 tokens.flatten())
        loss.backward()
        optimizer.step()
        moved = full_state_dict(model)
        assert not torch.equal(moved["layers.0.attention.wqkv.weight"], reference["layers.0.attention.wqkv.weight"])
    finally:
        dist.destroy_process_group()
