"""Sampling speed of the GPT prior: KV cache vs full recomputation, against the memory-bandwidth bound.

Reference shape (docs/architecture.md, "Tests and benchmarks"): GPT-B width (12 layers, 768, 12 heads), 1024 codes,
a 16x16 grid. A decode step must read every weight once, so steps/s <= bandwidth / weight bytes;
each figure is printed next to that bound. The bandwidth is measured here by summing a large tensor.

    python benchmarks/sampling.py --quick        # batch 1 and 8, a minute or two on 2 cores
    python benchmarks/sampling.py                # batch 1, 8, 16; fp32 and bf16; CFG on and off

Figures on a shared machine are noisy; compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
import time

import torch

from stage2_prior import GPT, GPTConfig, SamplingConfig, count_parameters, generate


def measure_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: best time of summing a large fp32 tensor."""
    x = torch.ones(megabytes * 2**20 // 4)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_ceiling(model: GPT, batch: int, repeats: int = 5) -> float:
    """Steps/s of the decode step's matrix products alone (every linear layer of the model at this
    batch, as the sampler calls them): what the BLAS reaches here, beside the bandwidth bound."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {m.in_features: torch.randn(batch, 1, m.in_features, dtype=m.weight.dtype) for m in layers}

    def chain() -> None:
        for layer in layers:
            layer(inputs[layer.in_features])

    with torch.inference_mode():
        chain()
        return 1.0 / timed(chain, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="batch 1 and 8; full recomputation at batch 1 only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=str, default=None, help="comma-separated batch sizes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")] if args.batches else ([1, 8] if args.quick else [1, 8, 16])
    repeats = 1 if args.quick else 2

    torch.manual_seed(0)
    config = GPTConfig.from_preset("GPT-B", codebook_size=1024, grid_size=[16, 16], num_classes=10)
    model = GPT(config).eval()
    torch.nn.init.normal_(model.output.weight, std=0.02)  # a non-degenerate distribution to sample from
    tokens = config.seq_len
    # A decode step reads every weight except the embedding tables (one row each).
    read_params = count_parameters(model, exclude_embeddings=True)
    bandwidth = measure_bandwidth(256 if args.quick else 512)
    print(f"threads={args.threads}  params={count_parameters(model) / 1e6:.1f}M (read per step "
          f"{read_params / 1e6:.1f}M)  measured read bandwidth={bandwidth / 1e9:.1f} GB/s  "
          f"grid 16x16 = {tokens} tokens")

    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        bound = bandwidth / (read_params * torch.finfo(dtype).bits / 8)  # steps/s
        print(f"\n== weights {str(dtype).replace('torch.', '')}: bandwidth bound {bound:.1f} steps/s "
              f"({read_params * torch.finfo(dtype).bits / 8 / 1e6:.0f} MB per step)")
        generate(model, 1, class_labels=0)  # warm-up
        seconds: dict[tuple[int, bool], float] = {}

        def run(batch: int, cfg: bool) -> float:
            if (batch, cfg) not in seconds:
                labels = torch.arange(batch) % 10
                sampling = SamplingConfig(cfg_scale=4.0 if cfg else 1.0)
                seconds[batch, cfg] = timed(lambda: generate(model, batch, class_labels=labels, sampling=sampling),
                                            repeats)
            return seconds[batch, cfg]

        for batch in batches:
            for cfg in (False, True):
                steps = tokens / run(batch, cfg)
                ceiling = matmul_ceiling(model, batch * (1 + cfg))
                print(f"cached  batch {batch:3d} cfg {'on ' if cfg else 'off'} (model batch {batch * (1 + cfg):3d}): "
                      f"{steps:7.1f} steps/s = {steps * batch:8.1f} tokens/s   {steps / bound:6.1%} of bound   "
                      f"(matmuls alone: {ceiling:6.1f} steps/s = {ceiling / bound:6.1%} of bound; "
                      f"sampler reaches {steps / ceiling:6.1%} of it)")
        for batch in batches[:1] if args.quick else batches:
            ratio = run(batch, True) / run(2 * batch, False)
            print(f"CFG at batch {batch}: time / time of batch {2 * batch} without CFG = {ratio:.2f} (target <= 1)")
        if dtype == torch.float32:
            for batch in batches[:1] if args.quick else batches:
                labels = torch.arange(batch) % 10
                full = timed(lambda: generate(model, batch, class_labels=labels, use_cache=False), 1)
                print(f"full recompute batch {batch:3d}: {tokens / full:7.1f} steps/s   "
                      f"cached/full speed-up {full / run(batch, False):.1f}x")

if __name__ == "__main__":
    main()
