"""Quality guard of weight-only int8 decoding (``--prior-dtype int8``) on a trained prior: int8 against fp32.

    vqgpt demo --out runs/demo                                    # a trained 10-digit pipeline
    python benchmarks/int8_guard.py --pipeline runs/demo/pipeline [--per-class 20]

Prints, for the same class labels and seeds:
- greedy agreement, free-running: both priors decode greedily (temperature 0) and the share of grid
  positions where their codes are equal (one early difference changes everything after it, so this
  is the strict figure);
- greedy agreement, teacher-forced: int8's argmax against fp32's at every position of fp32's own
  greedy sequences (each prediction judged on the same context);
- the class accuracy of guided samples (the demo's cfg scale) scored by the MNIST classifier, for both.
The two agreement figures are also printed for a bf16 copy of the prior, as a yardstick: a greedy
decode flips wherever two codes' logits nearly tie, whatever the rounding that tips them.
Goals (issue 16): >= 95% greedy agreement, class accuracy within 2 points of fp32.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from stage2_prior import SamplingConfig, generate
from vqgpt.workflow.evaluation import sample_class_accuracy
from vqgpt.cli.commands import int_at_least
from vqgpt.workflow.pipeline import VQGPTPipeline


@torch.inference_mode()
def teacher_forced_argmax(prior: torch.nn.Module, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Argmax prediction (B, T) of ``prior`` at every position of the given code grids (B, h, w)."""
    tokens = codes.flatten(1)
    return prior(tokens, labels).argmax(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default="runs/demo/pipeline")
    parser.add_argument("--per-class", type=int_at_least(1), default=20, help="samples per digit for each figure")
    parser.add_argument("--cfg-scale", type=float, default=2.0, help="guidance of the class-accuracy samples "
                                                                     "(2.0: the demo's)")
    parser.add_argument("--threads", type=int_at_least(1), default=None)
    args = parser.parse_args()
    if not (Path(args.pipeline) / "prior").is_dir():
        parser.error(f"--pipeline {args.pipeline}: no pipeline folder there (vqgpt demo --out runs/demo writes "
                     "runs/demo/pipeline)")
    if args.threads:
        torch.set_num_threads(args.threads)
    fp32 = VQGPTPipeline.from_pretrained(args.pipeline)
    int8 = VQGPTPipeline.from_pretrained(args.pipeline).set_decoding(prior_dtype="int8")
    bf16 = VQGPTPipeline.from_pretrained(args.pipeline).set_decoding(prior_dtype="bfloat16")
    labels = torch.arange(10).repeat_interleave(args.per_class)
    greedy = SamplingConfig(temperature=0.0)
    codes = {name: generate(pipe.prior, len(labels), class_labels=labels, sampling=greedy)
             for name, pipe in (("fp32", fp32), ("int8", int8), ("bf16", bf16))}
    reference = teacher_forced_argmax(fp32.prior, codes["fp32"], labels)
    print(f"{len(labels)} greedy grids of {codes['fp32'][0].numel()} codes; agreement with fp32 (share of positions):")
    for name, pipe in (("int8", int8), ("bf16", bf16)):
        free = (codes["fp32"] == codes[name]).double().mean().item()
        forced = (teacher_forced_argmax(pipe.prior, codes["fp32"], labels) == reference).double().mean().item()
        print(f"  {name}: free-running {free:.2%}, teacher-forced {forced:.2%}")

    scale = args.cfg_scale
    guided = SamplingConfig(cfg_scale=scale)
    accuracy = {name: sample_class_accuracy(pipe, num_per_class=args.per_class, sampling=guided).class_accuracy
                for name, pipe in (("fp32", fp32), ("int8", int8))}
    print(f"class accuracy at cfg {scale}: fp32 {accuracy['fp32']:.1%}, int8 {accuracy['int8']:.1%} "
          f"({100 * (accuracy['int8'] - accuracy['fp32']):+.1f} points)")


if __name__ == "__main__":
    main()
