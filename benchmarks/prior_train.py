"""Prior training throughput: tokens/s and model FLOPs utilisation against this machine's matmul peak.

The peak is measured in the same run (a large bf16 / fp32 matmul), so the ratio is visible:

    python benchmarks/prior_train.py [--quick] [--threads N]

FLOPs per token of a training step = 6 * (non-embedding parameters) + 12 * n_layer * dim * seq_len
(forward + backward of the weights, plus attention scores), the usual nanoGPT / PaLM accounting.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from stage2_prior.model import GPT, GPTConfig, count_parameters
from vqgpt.cli.commands import int_at_least


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """Measured FLOP/s of an n x n x n matmul in ``dtype`` (best of ``repeats``)."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def train_throughput(cfg: GPTConfig, batch: int, steps: int, bf16: bool, compile_model: bool) -> tuple[float, float]:
    """(tokens/s, FLOPs per token) of full training steps (forward, backward, AdamW)."""
    torch.manual_seed(0)
    model = GPT(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=False)
    step_model = torch.compile(model) if compile_model else model
    T = cfg.seq_len
    tokens = torch.randint(0, cfg.codebook_size, (batch, T))
    labels = torch.randint(0, max(cfg.num_classes, 1), (batch,)) if cfg.num_classes else None

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = step_model(tokens, labels)
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - t
    n_params = count_parameters(model, exclude_embeddings=True)
    flops_per_token = 6 * n_params + 12 * cfg.n_layer * cfg.dim * T
    return batch * T * steps / elapsed, flops_per_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps, smaller model")
    parser.add_argument("--threads", type=int_at_least(1), default=None)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # A GPT-B-shaped block stack is too slow to train on 2 cores for a benchmark; a 6-layer width-512
    # model keeps the matmuls large enough to be representative.
    cfg = GPTConfig(codebook_size=1024, grid_size=[16, 16], num_classes=10, n_layer=4 if args.quick else 6,
                    n_head=8, dim=512)
    batch, steps = (4, 3) if args.quick else (8, 5)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model: {cfg.n_layer} layers, width {cfg.dim}, "
          f"{count_parameters(cfg) / 1e6:.1f}M parameters, {cfg.seq_len} tokens per sequence, batch {batch}")
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    for name, value in peaks.items():
        print(f"measured {name} matmul peak: {value / 1e12:.3f} TFLOP/s")
    variants = [("fp32", False, False), ("bf16 autocast", True, False)]
    if args.compile:
        variants.append(("bf16 autocast + compile", True, True))
    for name, bf16, comp in variants:
        tok_s, fpt = train_throughput(cfg, batch, steps, bf16, comp)
        achieved = tok_s * fpt
        peak = peaks["bf16" if bf16 else "fp32"]
        print(f"{name:>24}: {tok_s:8.0f} tokens/s | {achieved / 1e12:.3f} TFLOP/s | "
              f"MFU {achieved / peak:.1%} of the {'bf16' if bf16 else 'fp32'} peak"
              + (f" ({achieved / peaks['bf16']:.1%} of bf16 peak)" if not bf16 else ""))


if __name__ == "__main__":
    main()
