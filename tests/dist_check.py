"""Run both trainers for a few steps under `accelerate launch` and dump every rank's weights.

Used by tests/test_distributed.py (2 gloo processes on CPU); also a manual check on GPUs:

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no --main_process_port 29511 \\
        tests/dist_check.py --out /tmp/dist --tokens TOKENS --expect-processes 2

Each rank writes OUT/states/{tokenizer,prior}-rank{R}.pt with the state dicts of the model, the
discriminator and the EMA weights *of that rank*, recorded by wrapping the constructors the
trainers call, so that the test compares what every process actually holds (not rank 0's export).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import stage1_vq.train as tokenizer_train  # noqa: E402
import stage2_prior.train as prior_train  # noqa: E402
import vqgpt.training.replicas as replicas  # noqa: E402
from stage1_vq.losses import build_discriminator  # noqa: E402
from stage1_vq.model import VQModel  # noqa: E402
from timm.utils import ModelEmaV3  # noqa: E402
from stage1_vq.train import TokenizerRunConfig, train_tokenizer  # noqa: E402
from stage2_prior.train import PriorRunConfig, train_prior  # noqa: E402
from vqgpt.ground.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# --also-kinds: further tokenizers, one per quantizer kind / option whose state or losses cross ranks
# (the main run covers the EMA codebook with restarts, --also-kmeans the k-means init).
KIND_RUNS = {
    "tokenizer_lfq": ["model.quantizer.kind=lfq", "model.quantizer.lfq_dim=6", "model.quantizer.codebook_size=null"],
    "tokenizer_simvq": ["model.quantizer.simvq=true", "model.quantizer.entropy_weight=0.1"],
    "tokenizer_rvq": ["model.quantizer.kind=rvq", "model.quantizer.rvq_depth=2", "model.quantizer.ema=true"],
}
PLAIN_CODEBOOK = ["model.quantizer.ema=false", "model.quantizer.kmeans_init=false",
                  "model.quantizer.restart_threshold=0", "train.steps=3"]


def make_token_shards(out: str | Path, n: int = 64, grid: tuple[int, int] = (4, 4), codebook_size: int = 32,
                      num_classes: int = 4, seed: int = 0, shard_size: int | None = None) -> Path:
    """Learnable synthetic token grids (a class-dependent ramp, 20% of the codes random) as shards."""
    from vqgpt.ground.tokens import TokenShardWriter

    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    ramp = (torch.arange(grid[0] * grid[1]).view(1, *grid) + 5 * labels.view(-1, 1, 1)) % codebook_size
    noise = torch.randint(0, codebook_size, (n, *grid), generator=g)
    grids = torch.where(torch.rand(n, *grid, generator=g) < 0.8, ramp, noise)
    meta = {"tokenizer_fingerprint": "synthetic", "source": "synthetic", "num_classes": num_classes,
            "classes": [str(i) for i in range(num_classes)], "flip_augmented": False}
    with TokenShardWriter(out, list(grid), codebook_size, meta, shard_size=shard_size or max(1, n // 2)) as writer:
        writer.add(grids, labels)
    return Path(out)


def recording(factory, bucket: list):
    """Wrap a class or factory so that every object it builds is also appended to ``bucket``."""
    def build(*args, **kwargs):
        obj = factory(*args, **kwargs)
        bucket.append(obj)
        return obj
    return build


def nan_at(loss_fn, micro_batch: int, rank: int, field: str | None = None):
    """Wrap a loss function so that call number ``micro_batch`` (0-based) on ``rank`` returns NaN."""
    calls = [0]

    def wrapped(*args, **kwargs):
        out = loss_fn(*args, **kwargs)
        hit = calls[0] == micro_batch and int(os.environ.get("RANK", "0")) == rank
        calls[0] += 1
        if not hit:
            return out
        return out._replace(**{field: getattr(out, field) * float("nan")}) if field else out * float("nan")
    return wrapped


def world_size() -> int:
    from accelerate import PartialState

    return PartialState().num_processes


def dump(path: Path, objects: dict[str, list]) -> None:
    state = {}
    for name, found in objects.items():
        if found:
            module = found[0].module if name == "ema" else found[0]
            state[name] = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", default=None, help="token shards: run the prior too")
    p.add_argument("--skip-tokenizer", action="store_true")
    p.add_argument("--tokenizer-set", action="append", default=[])
    p.add_argument("--prior-set", action="append", default=[])
    p.add_argument("--also-kmeans", action="store_true",
                   help="train a second tokenizer with k-means init (its replicas are compared, not its losses)")
    p.add_argument("--also-kinds", action="store_true",
                   help=f"train 3 steps of a tokenizer per entry of KIND_RUNS ({', '.join(KIND_RUNS)})")
    p.add_argument("--expect-processes", type=int, default=None)
    p.add_argument("--prior-nan-micro-batch", type=int, default=None, help="inject a NaN prior loss at this call")
    p.add_argument("--nan-rank", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)

    def report(stage: str) -> int:
        from accelerate import PartialState

        state = PartialState()  # set up by the trainer's Accelerator
        print(f"rank {state.process_index} of {state.num_processes} ({state.distributed_type.value}, "
              f"backend {state.backend}): {stage} done", flush=True)
        if args.expect_processes is not None and state.num_processes != args.expect_processes:
            raise SystemExit(f"expected {args.expect_processes} processes, found {state.num_processes}")
        return state.process_index

    def tokenizer_run(name: str, overrides: list[str]) -> None:
        found = {"model": [], "disc": [], "ema": []}
        tokenizer_train.VQModel = recording(VQModel, found["model"])
        tokenizer_train.build_discriminator = recording(build_discriminator, found["disc"])
        replicas.ModelEmaV3 = recording(ModelEmaV3, found["ema"])
        cfg = load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml", overrides)
        train_tokenizer(cfg, out / name)
        dump(out / "states" / f"{name}-rank{report(name)}.pt", found)

    if not args.skip_tokenizer:
        tokenizer_run("tokenizer", args.tokenizer_set)
        if args.also_kmeans:
            tokenizer_run("tokenizer_kmeans", [*args.tokenizer_set, "model.quantizer.kmeans_init=true"])
        if args.also_kinds:
            for name, overrides in KIND_RUNS.items():
                tokenizer_run(name, [*args.tokenizer_set, *PLAIN_CODEBOOK, *overrides])

    if args.tokens:
        found = {"model": [], "ema": []}
        prior_train.GPT = recording(prior_train.GPT, found["model"])
        replicas.ModelEmaV3 = recording(ModelEmaV3, found["ema"])
        if args.prior_nan_micro_batch is not None:
            prior_train.next_token_loss = nan_at(prior_train.next_token_loss, args.prior_nan_micro_batch,
                                                 args.nan_rank)
        cfg = load_config(PriorRunConfig, ROOT / "configs/prior/tiny.yaml", [*args.prior_set, f"tokens={args.tokens}"])
        train_prior(cfg, out / "prior")
        rank = report("prior")
        dump(out / "states" / f"prior-rank{rank}.pt", found)
        # The replica check must be able to fail: perturb one weight on the last rank only.
        from accelerate import Accelerator

        from vqgpt.training import check_replicas

        probe = found["model"][0]
        if rank == world_size() - 1:
            with torch.no_grad():
                next(probe.parameters()).view(-1)[0] += 1e-3
        try:
            check_replicas(Accelerator(), {"model": probe})
            print(f"rank {rank}: replica check MISSED a perturbed weight", flush=True)
        except RuntimeError as exc:
            print(f"rank {rank}: replica check caught: {exc}", flush=True)


if __name__ == "__main__":
    main()
