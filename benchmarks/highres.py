"""Sliding-window sampling speed: cached windows vs the naive one-forward-per-token scheme.

A small prior (6 layers, width 256, 1024 codes) trained on an h x w grid samples a 2h x 2w canvas.
Naive: every position runs one full forward of its window prefix. Cached: ``generate_highres``
reuses each window's KV cache while the window stands still (see ``stage2_prior.highres``); a
window stride > 1 lets it stand still longer.

    python benchmarks/highres.py --quick     # 8x8 grid -> 16x16 canvas
    python benchmarks/highres.py             # 16x16 grid -> 32x32 canvas

Figures on a shared machine are noisy; compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
import time

import torch

from stage2_prior import GPT, GPTConfig, SamplingConfig
from stage2_prior.highres import generate_highres
from vqgpt.cli.commands import int_at_least


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8x8 trained grid, 16x16 canvas")
    parser.add_argument("--threads", type=int_at_least(1), default=2)
    parser.add_argument("--batch", type=int_at_least(1), default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    grid = 8 if args.quick else 16
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("small", codebook_size=1024, grid_size=[grid, grid], num_classes=10)).eval()
    torch.nn.init.normal_(model.output.weight, std=0.02)
    H = W = 2 * grid
    labels = torch.arange(args.batch) % 10
    print(f"threads={args.threads}  'small' prior on a {grid}x{grid} grid -> {H}x{W} canvas, batch {args.batch}")
    generate_highres(model, 1, grid, grid + 1, class_labels=0)  # warm-up

    def run(dtype: torch.dtype = torch.float32, **knobs) -> tuple[float, torch.Tensor]:
        model.to(dtype)
        t0 = time.perf_counter()
        out = generate_highres(model, args.batch, H, W, class_labels=labels,
                               generator=torch.Generator().manual_seed(0), **knobs)
        return time.perf_counter() - t0, out

    tokens = args.batch * H * W
    naive_s, naive_out = run(use_cache=False)
    print(f"naive one forward per token          : {tokens / naive_s:8.1f} tokens/s")
    settings = [("cached, stride (1, 1) (taming)", dict(window_stride=1)),
                (f"cached, stride (1, {grid // 4})", dict(window_stride=(1, grid // 4))),
                (f"cached, stride ({grid // 4}, {grid // 4})", dict(window_stride=grid // 4)),
                ("cached, stride (1, 1), CFG 4.0", dict(window_stride=1, sampling=SamplingConfig(cfg_scale=4.0))),
                ("cached, stride (1, 1), bf16 weights", dict(window_stride=1, dtype=torch.bfloat16))]
    for name, knobs in settings:
        seconds, out = run(**knobs)
        same = f"same samples as naive: {torch.equal(out, naive_out)}" if knobs == dict(window_stride=1) else ""
        print(f"{name:37s}: {tokens / seconds:8.1f} tokens/s   {naive_s / seconds:5.1f}x naive   {same}")


if __name__ == "__main__":
    main()
