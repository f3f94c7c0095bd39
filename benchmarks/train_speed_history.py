"""Training-step throughput of the project as it is against an earlier commit, with each side's defaults.

    python benchmarks/train_speed_history.py --before 9ecdec0 [--threads 2] [--rounds 3] [--dtypes fp32,bf16]
        [--matmul-precision medium]

``benchmarks/train_speed.py`` measures the levers one by one inside today's code; this script answers
"how much faster is a default training step than it was": it checks the earlier commit out into a
temporary git worktree and runs the same step in a fresh interpreter per side and per round, with
that side's packages first on the path, alternating the sides so that both see the same machine
load. Each side builds its step from the interfaces both commits share (``VQModel``,
``generator_loss``, ``GPT``, ``make_optimizer``, ``optimizer_step``) and the defaults of its
``TrainConfig`` (the AdamW kernel, for example) and of its model code (the memory layout):

- tokenizer: the conv VQGAN of train_speed.py (ch 64, about 13M parameters, l2 8-dim codebook), 64 px,
  batch 8, L1 + quantizer loss;
- prior: train_speed.py's default shape (6 layers x 512) over 256 tokens (16x16 codes), batch 8,
  next-token cross-entropy.

Rates are images/s or tokens/s, median over rounds of the median of timed steps after warm-up; the
ratio column is after / before. The default "before" is 9ecdec0, the last commit before the
training-speed work (AdamW's kernel chosen per device, the decoder's layout chosen on purpose rather than
inherited from the quantizer's permuted output, the one-graph tokenizer step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# the same tokenizer and prior on both sides as in train_speed.py
from train_speed import PRIOR_SHAPE, QUANTIZER_ARGS, TOKENIZER_ARCH
from vqgpt.cli.commands import int_at_least
from vqgpt.training.config import MATMUL_PRECISIONS

ROOT = Path(__file__).resolve().parent.parent

# Runs inside each side's interpreter; prints one JSON line {case: rate}.
STEP = r'''
import json, statistics, sys, time
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from stage1_vq.losses import LossConfig, generator_loss
from stage1_vq.model import VQModel, VQModelConfig
from stage1_vq.quantizers import QuantizerConfig
from stage2_prior.model import GPT, GPTConfig
from vqgpt.training import TrainConfig
from vqgpt.training.optim import make_optimizer, optimizer_step

threads, dtypes, warmup, steps = int(sys.argv[1]), sys.argv[2].split(","), int(sys.argv[3]), int(sys.argv[4])
arch, quantizer, shape = (json.loads(a) for a in sys.argv[5:8])
precision = sys.argv[8]
torch.set_num_threads(threads)
accelerator = Accelerator(cpu=True)
if precision != "highest":  # (only asked of the side that has train.matmul_precision)
    from vqgpt.training.config import apply_matmul_precision
    apply_matmul_precision(precision, torch.device("cpu"))

def rate(step, items):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return items / statistics.median(times)

def tokenizer(bf16):
    torch.manual_seed(0)
    model = VQModel(VQModelConfig(**arch, quantizer=QuantizerConfig(**quantizer))).train()
    x = torch.rand(8, 3, 64, 64) * 2 - 1
    tc = TrainConfig(lr=1e-4)
    opt = make_optimizer(model.parameters(), tc)
    loss_cfg = LossConfig(perceptual_weight=0.0)
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
            g = generator_loss(x, out.reconstruction, out.quantizer.loss, None, None, loss_cfg, 0,
                               model.last_layer_weight)
        optimizer_step(accelerator, g.total, opt, model, tc)
    return rate(step, len(x))

def prior(bf16):
    torch.manual_seed(0)
    cfg = GPTConfig(codebook_size=1024, grid_size=[16, 16], num_classes=10, **shape)
    model = GPT(cfg).train()
    tokens = torch.randint(0, 1024, (8, cfg.seq_len))
    labels = torch.randint(0, 10, (8,))
    tc = TrainConfig(lr=1e-4)
    opt = make_optimizer(model.parameters(), tc)
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(tokens, labels)
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        optimizer_step(accelerator, loss, opt, model, tc)
    return rate(step, tokens.numel())

import stage1_vq
out = {"source": stage1_vq.__file__}
for dtype in dtypes:
    out[f"tokenizer {dtype}"] = tokenizer(dtype == "bf16")
    out[f"prior {dtype}"] = prior(dtype == "bf16")
print(json.dumps(out))
'''


def run_side(path: Path, args: argparse.Namespace, precision: str = "highest") -> dict[str, float]:
    """One round of every case in a fresh interpreter with ``path``'s packages first on the path, under
    ``train.matmul_precision`` ``precision``."""
    env = dict(os.environ, PYTHONPATH=str(path), OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run([sys.executable, "-c", STEP, str(args.threads), args.dtypes, str(args.warmup),
                           str(args.steps), json.dumps(TOKENIZER_ARCH), json.dumps(QUANTIZER_ARGS),
                           json.dumps(PRIOR_SHAPE), precision],
                          env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: the step failed in {path}:\n{proc.stderr[-3000:]}")
    rates = json.loads(proc.stdout.strip().splitlines()[-1])
    source = Path(rates.pop("source")).resolve()
    if not source.is_relative_to(path.resolve()):  # an installed copy shadowed the side's tree
        raise SystemExit(f"error: the step imported {source}, not the tree in {path}")
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="9ecdec0", help="the earlier commit (any git revision)")
    parser.add_argument("--threads", type=int_at_least(1), default=2)
    parser.add_argument("--rounds", type=int_at_least(1), default=3, help="interpreters per side, alternating")
    parser.add_argument("--warmup", type=int_at_least(0), default=2)
    parser.add_argument("--steps", type=int_at_least(1), default=5)
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--matmul-precision", default="highest", choices=MATMUL_PRECISIONS,
                        help="train.matmul_precision of the after side (the before side keeps float32 products: "
                        "the setting is newer than the default --before)")
    args = parser.parse_args()
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in ("fp32", "bf16") for d in dtypes):  # (else any other name measured fp32)
        parser.error(f"--dtypes: comma-separated fp32 and bf16, got {args.dtypes!r}")
    args.dtypes = ",".join(dtypes)  # (the step program reads the names as they are)
    with tempfile.TemporaryDirectory(prefix="vqgpt-before-") as tmp:
        before = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(before), args.before],
                       check=True)
        try:
            results: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
            for r in range(args.rounds):
                for side, path in (("before", before), ("after", ROOT)) if r % 2 == 0 else \
                        (("after", ROOT), ("before", before)):
                    results[side].append(run_side(path, args, args.matmul_precision if side == "after" else "highest"))
                    print(f"round {r + 1}/{args.rounds} {side}: " +
                          ", ".join(f"{k} {v:.1f}" for k, v in results[side][-1].items()), flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False)
    print(f"\n{args.threads} threads, before = {args.before}, median of {args.rounds} rounds"
          + (f", after with train.matmul_precision {args.matmul_precision}" if args.matmul_precision != "highest"
             else "") + "\n")
    print("| step | before | after | after / before |\n|---|---|---|---|")
    for case in results["after"][0]:
        b = statistics.median(r[case] for r in results["before"])
        a = statistics.median(r[case] for r in results["after"])
        unit = "img/s" if case.startswith("tokenizer") else "tok/s"
        print(f"| {case} | {b:.1f} {unit} | {a:.1f} {unit} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
