"""Sampling speed of the GPT prior (KV cache vs full recomputation) against the read and compute bound.

Reference shape (docs/architecture.md, "Tests and benchmarks"): GPT-B width (12 layers, 768, 12 heads), 1024 codes,
a 16x16 grid. The bound a figure is printed against is the slower of two, both measured in the same run,
again after each row's timing (the row prints the bandwidth it is compared at), as a shared host's speed
drifts; each group of rows (``== weights ...``) also prints those of a 512 MB tensor (256 with --quick):
- reads: a decode step reads every weight once plus the KV cache written so far (on average over a
  run, half of the T positions' keys and values, for every layer and every row of the model batch),
  at the read bandwidth measured by summing a tensor of that many bytes: on a CPU whose last-level
  cache keeps part of them from step to step (the Intel development CPU's 300 MB L3 holds bf16 GPT-B's
  171 MB), a larger tensor's rate is the memory's, which the step beats, and shares came out past 100%;
- compute: 2 x (non-embedding parameters) x (model batch) FLOPs per step at the 1024^3 (GPU: 8192^3) matmul rate
  of the weights' dtype, measured here: fp32 for float32 weights, the faster of fp32 and bf16 for
  bfloat16 weights (the same on a CPU without bf16 units; about 2.3x fp32 on one with AVX512-BF16, and
  more on GPUs); for int8 weights fp32 (weight-only int8 multiplies fp32 activations on a CPU), except
  on a CPU where the int8 kernel rounds its rows to 16 bits (AVX512-VNNI) and multiplies int16 x int16,
  32 products an instruction as bf16's dot products: there the same as for bfloat16, a proxy (no int16
  matmul rate is measured); on a GPU the int8 product runs in bf16 (its activations are cast), so
  bfloat16's.
At batch 1 the reads bind; with guidance or larger batches the compute bound can take over.

    python benchmarks/sampling.py --quick        # batch 1 and 8, a minute or two on 2 cores
    python benchmarks/sampling.py                # batch 1, 8, 16; fp32 and bf16; CFG on and off
    python benchmarks/sampling.py --quick --compile   # also the compiled decode step (fp32, int8)
    python benchmarks/sampling.py --decode-only --compile --threads 1   # only the cfg-off rows of each
    python benchmarks/sampling.py --decode-only --compile --cfg --batches 8   # compiled, guidance too
    python benchmarks/sampling.py --device cuda --batches 1,8,64 --decode-only --compile   # on a GPU

Rows: fp32 and bf16 weights; fp32 on the plain MKL products, without the prepared (blocked or
oneDNN-packed) weights ``stage2_prior.layers.Linear`` decodes with on a CPU (``--no-packed`` runs
every row that way);
weight-only int8 (``--prior-dtype int8``: int8 linear weights with per-channel scales, the rest fp32);
with ``--compile``, the same sampler with its one-token step under torch.compile
(``generate(..., compile=True)``; compile time is excluded, printed apart), with ``--cfg`` also with
guidance, timed against twice the batch without it, in turns (the goal: guidance costs no more than that).

On a GPU (``--device cuda``) the same rows run there (bandwidth and matmul rate measured on it, every
timing synchronised), without the CPU-only plain-products row; ``--preset`` picks another shape
(``tiny`` is what the tests run).

Figures on a shared machine are noisy; compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch

from stage2_prior import GPT, GPTConfig, SamplingConfig, blocked, count_parameters, generate, set_weight_packing
from stage2_prior.quantize import Int8Linear, set_prior_dtype
from vqgpt.cli.commands import int_at_least


def measure_bandwidth(megabytes: int = 512, repeats: int = 5, device: str = "cpu") -> float:
    """Read bandwidth in bytes/s: best time of summing a large fp32 tensor."""
    x = torch.ones(megabytes * 2**20 // 4, device=device)
    x.sum()
    return x.numel() * 4 / timed(x.sum, repeats, device)


def peak_matmul_size(device: str | torch.device) -> int:
    """The n of the n^3 matmul whose rate stands for a device's peak: 1024 on a CPU; 8192 on a GPU, which a
    1024^3 product does not fill (an H200 ran it at about a tenth of its 8192^3 bf16 rate)."""
    return 1024 if torch.device(device).type == "cpu" else 8192


def matmul_flops(n: int | None = None, repeats: int = 5, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of an n^3 matmul in ``dtype`` (best of ``repeats``; n: ``peak_matmul_size`` unless given): the
    compute ceiling of the bound."""
    n = n or peak_matmul_size(device)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up
    return 2 * n**3 / timed(lambda: a @ b, repeats, device)


def ceilings(device: str, megabytes: int) -> tuple[float, dict[str, float], float]:
    """(read bandwidth, compute ceiling per weight dtype, bf16 matmul rate), measured now: each group of
    rows measures them again before it runs, because a shared host's speed drifts over a run (the
    bandwidth of the development CPU read from 33 to 61 GB/s within one run), and a row is compared with
    the ceilings of its own minutes. The compute ceiling: fp32 for float32 weights, the faster of fp32
    and bf16 for bfloat16 weights, and for int8 weights fp32, or as bfloat16's where the CPU kernel
    multiplies int16 rows or a GPU multiplies in bf16 (see the module docstring)."""
    bandwidth = measure_bandwidth(megabytes, device=device)
    fp32, bf16 = (matmul_flops(device=device, dtype=dtype) for dtype in (torch.float32, torch.bfloat16))
    # (Int8Linear multiplies fp32 rows on a CPU without VNNI; elsewhere 16-bit ones)
    sixteen_bit_rows = torch.device(device).type != "cpu" or blocked.int8_rounds_rows()
    return bandwidth, {"float32": fp32, "int8": max(fp32, bf16) if sixteen_bit_rows else fp32,
                       "bfloat16": max(fp32, bf16)}, bf16


def now(bandwidth: float, flops: float) -> str:
    """How a group of rows names the ceilings measured before it."""
    return f"  [measured now: {bandwidth / 1e9:.1f} GB/s read, {flops / 1e9:.1f} GFLOP/s]"


def kv_cache_bytes(config: GPTConfig, model_batch: int, element_bytes: int) -> float:
    """Average KV-cache bytes a decode step reads over a run of T tokens: keys and values of T/2 positions."""
    heads = config.n_kv_head or config.n_head
    return 2 * config.n_layer * model_batch * heads * config.head_dim * (config.seq_len / 2) * element_bytes


class Bound:
    """Steps/s bound of a decode step of a model reading ``weight_bytes`` per step, with its KV cache in
    ``cache_bytes`` per element; see the module docstring."""

    def __init__(self, config: GPTConfig, read_params: int, weight_bytes: float, cache_bytes: int,
                 bandwidth: float, flops: float, measured_over: float | None = None) -> None:
        self.config, self.read_params, self.weight_bytes, self.cache_bytes = config, read_params, weight_bytes, cache_bytes
        self.bandwidth, self.flops = bandwidth, flops
        self.measured_over = measured_over  # bytes of the tensor the bandwidth was measured over, if not the group's

    def remeasured(self, device: str, name: str, model_batch: int) -> "Bound":
        """This bound at the ceilings measured now (``name``: the weights' dtype, as ``ceilings`` keys them), the
        bandwidth over a tensor of the bytes a step reads at ``model_batch`` (see the module docstring): each row
        is compared with the ceilings of the seconds beside it, not only of its group's start."""
        step_bytes = self.weight_bytes + kv_cache_bytes(self.config, model_batch, self.cache_bytes)
        megabytes = max(1, math.ceil(step_bytes / 2**20))
        bandwidth, flops, _ = ceilings(device, megabytes)
        return Bound(self.config, self.read_params, self.weight_bytes, self.cache_bytes, bandwidth, flops[name],
                     measured_over=megabytes * 2**20)

    def steps(self, model_batch: int) -> tuple[float, str]:
        """(bound in steps/s, which one binds) at this model batch (twice the samples with guidance)."""
        reads = (self.weight_bytes + kv_cache_bytes(self.config, model_batch, self.cache_bytes)) / self.bandwidth
        compute = 2 * self.read_params * model_batch / self.flops
        return (1 / reads, "reads") if reads >= compute else (1 / compute, "compute")

    def now(self) -> str:
        """What a row prints of its own ceilings (the bandwidth: the reads bind a decode step here)."""
        return f", at {self.bandwidth / 1e9:.1f} GB/s over {self.measured_over / 1e6:.0f} MB"

    def describe(self, model_batch: int) -> str:
        steps, kind = self.steps(model_batch)
        kv = kv_cache_bytes(self.config, model_batch, self.cache_bytes)
        return (f"bound at model batch {model_batch}: {steps:.1f} steps/s ({kind}: {self.weight_bytes / 1e6:.0f} MB "
                f"weights + {kv / 1e6:.0f} MB KV cache per step; compute {2 * self.read_params * model_batch / 1e9:.2f} "
                f"GFLOP per step)")


def timed(fn, repeats: int, device: str | torch.device = "cpu") -> float:
    """Best wall time of ``repeats`` calls of ``fn``, each waited for on ``device``."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_ceiling(model: GPT, batch: int, repeats: int = 5) -> float:
    """Steps/s of the decode step's matrix products alone (every linear layer of the model at this
    batch, as the sampler calls them): what the BLAS reaches here, beside the bandwidth bound."""
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Int8Linear))]
    device = model.norm.weight.device
    inputs = {m.in_features: torch.randn(batch, 1, m.in_features, device=device,
                                         dtype=getattr(m, "weight", model.norm.weight).dtype)
              for m in layers}

    def chain() -> None:
        for layer in layers:
            layer(inputs[layer.in_features])

    with torch.inference_mode():
        chain()
        return 1.0 / timed(chain, repeats, device)


def sampling_timer(prior: GPT, repeats: int, device: str | torch.device, compiled: bool = False,
                   warm_up: bool = False):
    """``run(batch, cfg)``: the best time of sampling ``batch`` grids, with guidance (scale 4, a model batch
    of 2 x batch) or without, measured once per (batch, cfg); ``warm_up``: after a first, untimed call.
    ``compiled``: the decode step under torch.compile (the first call compiles it; its time, compile
    included, is printed apart)."""
    seconds: dict[tuple[int, bool], float] = {}

    def once(batch: int, cfg: bool, repeats: int = 1) -> float:
        """The best time of ``repeats`` calls, measured now (``run`` keeps its first answer)."""
        labels = torch.arange(batch) % 10
        sampling = SamplingConfig(cfg_scale=4.0 if cfg else 1.0)
        return timed(lambda: generate(prior, batch, class_labels=labels, sampling=sampling, compile=compiled),
                     repeats, device)

    def run(batch: int, cfg: bool) -> float:
        if (batch, cfg) not in seconds:
            if warm_up:
                first = once(batch, cfg)
                if compiled:
                    print(f"  (first call at batch {batch}{' with CFG' if cfg else ''}, compile included: "
                          f"{first:.1f} s)")
            seconds[batch, cfg] = once(batch, cfg, repeats)
        return seconds[batch, cfg]

    run.once = once
    return run


def print_cfg_ratio(run, batch: int, pairs: int = 3) -> None:
    """Guidance at ``batch`` against twice the batch without it (``run``: a ``sampling_timer``): ``pairs`` calls
    of each in turns, the best of each, so that both are timed in the same minutes of a shared host (timed
    minutes apart, as the rows are, the ratio swung by up to 1.2 with the host's speed)."""
    run(batch, True), run(2 * batch, False)  # (each compiled and warmed up, if it was not already)
    guided, doubled = float("inf"), float("inf")
    for _ in range(pairs):
        guided = min(guided, run.once(batch, True))
        doubled = min(doubled, run.once(2 * batch, False))
    print(f"CFG at batch {batch}: time / time of batch {2 * batch} without CFG = {guided / doubled:.2f} (target <= 1; "
          f"{pairs} calls of each in turns, best of each)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="batch 1 and 8; full recomputation at batch 1 only")
    parser.add_argument("--threads", type=int_at_least(1), default=2)
    parser.add_argument("--batches", type=str, default=None, help="comma-separated batch sizes")
    parser.add_argument("--no-int8", dest="int8", action="store_false", help="skip the weight-only int8 rows")
    parser.add_argument("--decode-only", action="store_true",
                        help="only cached sampling without CFG, one row per weight kind and batch (fp32, bf16, "
                             "int8, and compiled with --compile): no CFG, full-recompute or matmul-ceiling rows")
    parser.add_argument("--compile", action="store_true",
                        help="add rows with the decode step under torch.compile (fp32, int8, and bf16 with "
                             "--decode-only; CFG off unless --cfg; "
                             "each batch size compiles once, a minute or more on a CPU)")
    parser.add_argument("--cfg", action="store_true",
                        help="with --compile: the compiled rows also with guidance (scale 4, a doubled model batch), "
                             "and its time against twice the batch without (compiles those batch sizes too)")
    parser.add_argument("--no-packed", dest="packed", action="store_false",
                        help="float and bf16 products without the prepared (blocked or oneDNN-packed) weights of "
                             "stage2_prior.layers.Linear (the plain MKL path, for a before/after comparison)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (--threads is for the CPU)")
    parser.add_argument("--preset", default="GPT-B", help="the prior's shape (stage2_prior.config presets)")
    args = parser.parse_args(argv)
    # (mistakes said now, not after the bandwidth and matmul measurements, or as a traceback)
    if args.cfg and not args.compile:
        parser.error("--cfg adds guidance to the compiled rows: give it with --compile (the eager rows have CFG "
                     "unless --decode-only)")
    try:
        batches = [int(b) for b in args.batches.split(",")] if args.batches else ([1, 8] if args.quick else [1, 8, 16])
    except ValueError:
        parser.error(f"--batches: comma-separated positive integers, got {args.batches!r}")
    if any(b < 1 for b in batches):
        parser.error(f"--batches: every batch size must be >= 1, got {args.batches!r}")
    try:
        kind = torch.device(args.device).type
    except RuntimeError:
        parser.error(f"--device: not a device name: {args.device!r} (cpu, cuda, cuda:1, ...)")
    if kind == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    try:
        config = GPTConfig.from_preset(args.preset, codebook_size=1024, grid_size=[16, 16], num_classes=10)
    except ValueError as exc:
        parser.error(f"--preset: {exc}")
    device = args.device
    torch.set_num_threads(args.threads)
    set_weight_packing(args.packed)
    repeats = 1 if args.quick else 2

    torch.manual_seed(0)
    model = GPT(config).eval().to(device)
    torch.nn.init.normal_(model.output.weight, std=0.02)  # a non-degenerate distribution to sample from
    tokens = config.seq_len
    # A decode step reads every weight except the embedding tables (one row each).
    read_params = count_parameters(model, exclude_embeddings=True)
    megabytes = 256 if args.quick else 512
    bandwidth, flops, bf16_flops = ceilings(device, megabytes)
    where = f"device={device}" if torch.device(device).type != "cpu" else f"threads={args.threads}"
    print(f"{args.preset}  {where}  params={count_parameters(model) / 1e6:.1f}M (read per step "
          f"{read_params / 1e6:.1f}M)  measured read bandwidth={bandwidth / 1e9:.1f} GB/s  "
          f"matmul fp32 {flops['float32'] / 1e9:.1f} GFLOP/s, bf16 {bf16_flops / 1e9:.1f}  grid 16x16 = {tokens} tokens")

    for dtype in () if args.decode_only else (torch.float32, torch.bfloat16):
        model.to(dtype)
        element = torch.finfo(dtype).bits // 8
        name = str(dtype).replace("torch.", "")
        bandwidth, flops, _ = ceilings(device, megabytes)
        bound = Bound(config, read_params, read_params * element, element, bandwidth, flops[name])
        print(f"\n== weights {name}: {bound.describe(1)}{now(bandwidth, flops[name])}")
        generate(model, 1, class_labels=0)  # warm-up
        run = sampling_timer(model, repeats, device)

        for batch in batches:
            for cfg in (False, True):
                steps = tokens / run(batch, cfg)
                model_batch = batch * (1 + cfg)
                row_bound = bound.remeasured(device, name, model_batch)  # (after a compile)
                ceiling = matmul_ceiling(model, model_batch)
                limit, kind = row_bound.steps(model_batch)
                print(f"cached  batch {batch:3d} cfg {'on ' if cfg else 'off'} (model batch {model_batch:3d}): "
                      f"{steps:7.1f} steps/s = {steps * batch:8.1f} tokens/s   {steps / limit:6.1%} of bound "
                      f"({limit:.1f}, {kind}{row_bound.now()})   (matmuls alone: {ceiling:6.1f} steps/s = "
                      f"{ceiling / limit:6.1%} of "
                      f"bound; sampler reaches {steps / ceiling:6.1%} of it)")
        for batch in batches[:1] if args.quick else batches:
            print_cfg_ratio(run, batch)
        if dtype == torch.float32:
            for batch in batches[:1] if args.quick else batches:
                labels = torch.arange(batch) % 10
                full = timed(lambda: generate(model, batch, class_labels=labels, use_cache=False), 1, device)
                print(f"full recompute batch {batch:3d}: {tokens / full:7.1f} steps/s   "
                      f"cached/full speed-up {full / run(batch, False):.1f}x")

    model.to(torch.float32)
    extra_rows(model, args, batches, repeats, megabytes, read_params)


def int8_read_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step of a weight-only int8 prior reads: int8 weights, their scales, the other
    non-embedding weights (norms) at their dtype."""
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    total = sum(m.weight_int8.numel() + m.scales.numel() * m.scales.element_size() for m in int8)
    embeddings = {id(model.tok_embeddings.weight), id(model.class_embedding.weight)}
    return total + sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in embeddings)


def extra_rows(model: GPT, args: argparse.Namespace, batches: list[int], repeats: int, megabytes: int,
               read_params: int) -> None:
    """Rows for fp32 without packed weights, weight-only int8 and (with --compile) the compiled decode
    step, CFG off (and on with --cfg); each group of rows against the ceilings measured just before it."""
    tokens = model.config.seq_len
    # (weights, prior, compiled, packed): packed=False runs float32 on the plain MKL products
    kinds = [("float32", model, False, True), ("bfloat16", copy.deepcopy(model).to(torch.bfloat16), False, True)] \
        if args.decode_only else []
    device = model.norm.weight.device
    if args.packed and device.type == "cpu":  # the packed weights are a CPU path
        kinds.append(("float32", model, False, False))
    if args.int8:
        kinds.append(("int8", set_prior_dtype(copy.deepcopy(model), "int8"), False, True))
    if args.compile:
        others = {name: prior for name, prior, _, _ in kinds if name != "float32"}
        kinds.append(("float32", model, True, True))
        kinds += [(name, others[name], True, True) for name in ("bfloat16", "int8") if name in others]
    for name, prior, compiled, packed in kinds:
        read = int8_read_bytes(prior) if name == "int8" else read_params * torch.finfo(getattr(torch, name)).bits // 8
        bandwidth, flops, _ = ceilings(device, megabytes)
        bound = Bound(model.config, read_params, read, prior.tok_embeddings.weight.element_size(), bandwidth,
                      flops[name])
        how = ", compiled decode step" if compiled else ("" if packed else ", plain products (no packed weights)")
        print(f"\n== weights {name}{how}: {bound.describe(1)}{now(bandwidth, flops[name])}")
        set_weight_packing(packed and args.packed)
        run = sampling_timer(prior, repeats, device, compiled, warm_up=True)

        guided = compiled and args.cfg
        for batch in batches:
            for cfg in (False, True) if guided else (False,):
                steps = tokens / run(batch, cfg)
                model_batch = batch * (1 + cfg)
                row_bound = bound.remeasured(device, name, model_batch)  # (after a compile)
                limit, kind = row_bound.steps(model_batch)
                line = (f"cached  batch {batch:3d} cfg {'on ' if cfg else 'off'} (model batch {model_batch:3d}): "
                        f"{steps:7.1f} steps/s = {steps * batch:8.1f} tokens/s   {steps / limit:6.1%} of bound "
                        f"({limit:.1f}, {kind}{row_bound.now()})")
                if not args.decode_only:
                    ceiling = matmul_ceiling(prior, model_batch)
                    line += f"   (matmuls alone: {ceiling:6.1f} steps/s = {ceiling / limit:6.1%} of bound)"
                print(line, flush=True)
        for batch in batches if guided else ():
            print_cfg_ratio(run, batch)
    set_weight_packing(args.packed)


if __name__ == "__main__":
    main()
