"""Training-step throughput of both stages, and the levers that could speed it up, each measured on/off.

    python benchmarks/train_speed.py [--quick] [--threads N] [--dtypes fp32,bf16] [--no-compile]
    python benchmarks/train_speed.py --convs     # where the tokenizer step's time goes, conv by conv
    python benchmarks/train_speed.py --device cuda --prior-preset GPT-B --prior-batch 32 --dtypes bf16,fp32 \
        --peak-tflops 989 [--stages prior]   # on a GPU: the prior at a real shape, MFU against the published bf16 peak

A step is the project's real one: model forward + loss under autocast, then ``optimizer_step``
(finite check, backward, gradient clipping, AdamW step, zero_grad) from vqgpt.training.optim.
Tokenizer: the conv VQGAN with ch 64 (about 13M parameters), 64 px, batch 16, L1 + quantizer loss
(``generator_loss`` without LPIPS or GAN, so the step times the tokenizer itself). Prior: a GPT of the
given shape over 256 tokens (16x16 grid), batch 8, next-token cross-entropy. Figures are the median
of rounds of timed steps after warm-up steps, as images/s or tokens/s, and the share of the matmul
peak (1024^3 fp32 / bf16 matmul GFLOP/s on a CPU, 8192^3 on a GPU, measured in the same run) reached by the model FLOPs.

Levers: AdamW for-loop (what torch picks for CPU tensors by default) vs foreach vs fused; for fp32,
``train.matmul_precision`` medium (the products and convolutions with bf16 operands and fp32 sums on a CPU with
bf16 units, TF32 on a GPU); on a CPU, the
tokenizer's GroupNorm + SiLU as one kernel (``stage1_vq.norm_silu``) vs the two torch ops, channels-last, and
the prior's RoPE, RMSNorm, SwiGLU and bf16 attention backward by ``stage2_prior.fused``'s kernels vs the torch ops;
torch.compile of the model (graph breaks listed with torch._dynamo.explain); for the tokenizer, the
conv layout ``stage1_vq.modules.conv_memory_format`` chooses for the dtype (channels-last, or NCHW for bf16
on a CPU with bf16 units) vs the other one, forced with ``stage1_vq.modules.CONV_MEMORY_FORMAT``;
SDPA for the prior (confirmed by finding F.scaled_dot_product_attention in the traced step).

``--device cuda`` runs the same steps on a GPU (autocast and the matmul peak on that device, every
timing synchronised); ``--prior-preset`` swaps the prior's default shape for a preset of
``stage2_prior.config`` (GPT-B, GPT-L, ...), ``--peak-tflops`` adds each row's MFU against a published
peak (e.g. the GPU's dense bf16 figure).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator

import stage1_vq.modules as conv_modules
import stage1_vq.norm_silu as fused_norms
import stage2_prior.fused as fused_prior_ops
from stage1_vq.losses import LossConfig, generator_loss
from stage1_vq.model import VQModel, VQModelConfig
from stage1_vq.quantizers import QuantizerConfig
from stage2_prior.model import GPT, GPTConfig, count_parameters
from vqgpt.training import TrainConfig
from vqgpt.training.config import cpu_has_fast_bf16, matmul_precision_applied
from vqgpt.training.optim import make_optimizer, optimizer_step
from vqgpt.cli.commands import int_at_least

from sampling import peak_matmul_size, timed  # benchmarks/ is on sys.path when a script here runs

TOKENIZER_ARCH = dict(channels=64, channel_mult=[1, 2, 2, 4], num_res_blocks=1, attn_resolutions=[8],
                      resolution=64, z_channels=64, norm_groups=32)
QUANTIZER_ARGS = dict(kind="vq", codebook_size=1024, codebook_dim=8, l2_norm=True)
QUANTIZER = QuantizerConfig(**QUANTIZER_ARGS)
# GPT-B is 12 layers x 768; a step of it takes tens of seconds on two shared cores (minutes in bf16
# without bf16 units), so the default is a 6 x 512 model and --quick a 4 x 384 one (same token count).
PRIOR_SHAPE = dict(n_layer=6, n_head=8, dim=512)
QUICK_PRIOR_SHAPE = dict(n_layer=4, n_head=6, dim=384)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_step_seconds(step: Callable[[], None], device: torch.device) -> float:
    """Seconds of one call of ``step``, waited for on ``device``: a compiled step's compile and first run."""
    t = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - t


def matmul_gflops(dtype: torch.dtype, n: int | None = None, repeats: int = 5, device: str = "cpu") -> float:
    """Measured GFLOP/s of an n^3 matmul in ``dtype`` (best of ``repeats``) on ``device``; n: 1024 on a CPU,
    8192 on a GPU (``sampling.peak_matmul_size``)."""
    n = n or peak_matmul_size(device)
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b  # warm-up
    return 2 * n**3 / timed(lambda: a @ b, repeats, device) / 1e9


def median_rate(step: Callable[[], None], items: int, warmup: int, steps: int, rounds: int,
                device: torch.device = torch.device("cpu")) -> float:
    """Median over ``rounds`` of items/s of ``steps`` calls of ``step`` (after ``warmup`` calls)."""
    for _ in range(warmup):
        step()
    rates = []
    for _ in range(rounds):
        sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        rates.append(items * steps / (time.perf_counter() - t))
    return statistics.median(rates)


def under_precision(step: Callable[[], None], precision: str, device: torch.device) -> Callable[[], None]:
    """``step`` run under ``train.matmul_precision`` ``precision`` (as a run would set it), torch's settings put
    back after each call."""
    def run() -> None:
        with matmul_precision_applied(precision, device):
            step()
    return run


def tokenizer_step(accelerator: Accelerator, impl: str, bf16: bool, layout: torch.memory_format | None,
                   compiled: bool, batch: int, fused_norm: bool = True) -> tuple[Callable[[], None], torch.nn.Module]:
    """One tokenizer training step with the given levers on the accelerator's device, the convs in ``layout``
    (None: the layout ``conv_memory_format`` chooses), the residual blocks' norm and SiLU by the fused kernel
    where it applies (``stage1_vq.norm_silu``) or, ``fused_norm`` False, as two torch ops; returns (step,
    eager model)."""
    torch.manual_seed(0)
    device = accelerator.device
    model = VQModel(VQModelConfig(**TOKENIZER_ARCH, quantizer=QUANTIZER)).train().to(device)
    x = torch.rand(batch, 3, 64, 64, device=device) * 2 - 1
    tc = TrainConfig(lr=1e-4, optimizer_impl=impl)
    opt = make_optimizer(model.parameters(), tc)
    run = torch.compile(model) if compiled else model
    loss_cfg = LossConfig(perceptual_weight=0.0)

    def step() -> None:
        previous, conv_modules.CONV_MEMORY_FORMAT = conv_modules.CONV_MEMORY_FORMAT, layout
        usable = fused_norms._usable
        if not fused_norm:
            fused_norms._usable = lambda norm, x: False
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = run(x)
                g = generator_loss(x, out.reconstruction, out.quantizer.loss, None, None, loss_cfg, 0,
                                   model.last_layer_weight)
            optimizer_step(accelerator, g.total, opt, model, tc)
        finally:
            conv_modules.CONV_MEMORY_FORMAT = previous
            fused_norms._usable = usable
    return step, model


def chosen_layout(device: torch.device, bf16: bool) -> torch.memory_format:
    """The conv layout ``conv_memory_format`` chooses for the tokenizer on ``device`` (bf16 autocast or fp32)."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return conv_modules.conv_memory_format(torch.zeros(1, 3, 8, 8, device=device))


LAYOUT_NAMES = {torch.channels_last: "channels-last", torch.contiguous_format: "NCHW"}


def prior_config(shape: dict | str) -> GPTConfig:
    """The benchmark's prior: 1024 codes on a 16x16 grid, 10 classes, with this shape (a dict of GPTConfig
    fields, or a preset name)."""
    data = dict(codebook_size=1024, grid_size=[16, 16], num_classes=10)
    return GPTConfig.from_preset(shape, **data) if isinstance(shape, str) else GPTConfig(**data, **shape)


def prior_step(accelerator: Accelerator, shape: dict | str, impl: str, bf16: bool, compiled: bool,
               batch: int, fused_ops: bool = True) -> tuple[Callable[[], None], GPT, GPTConfig]:
    """One prior training step with the given levers on the accelerator's device, RoPE, RMSNorm, SwiGLU and bf16
    attention's backward by the kernels of ``stage2_prior.fused`` where they apply or, ``fused_ops`` False, by the
    torch ops; returns (step, eager model, config)."""
    torch.manual_seed(0)
    device = accelerator.device
    cfg = prior_config(shape)
    model = GPT(cfg).train().to(device)
    tokens = torch.randint(0, cfg.codebook_size, (batch, cfg.seq_len), device=device)
    labels = torch.randint(0, cfg.num_classes, (batch,), device=device)
    tc = TrainConfig(lr=1e-4, optimizer_impl=impl)
    opt = make_optimizer(model.parameters(), tc)
    run = torch.compile(model) if compiled else model

    def step() -> None:
        previous = fused_prior_ops.set_enabled(fused_ops)
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = run(tokens, labels)
                loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
            optimizer_step(accelerator, loss, opt, model, tc)
        finally:
            fused_prior_ops.set_enabled(previous)
    return step, model, cfg


def graph_breaks(model: torch.nn.Module, *inputs) -> list[str]:
    """The reasons torch._dynamo gives for breaking the forward graph of ``model`` (empty: one graph)."""
    import torch._dynamo
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(*inputs)
    return [str(b.reason).splitlines()[0] for b in explained.break_reasons] or []


def uses_sdpa(model: GPT, cfg: GPTConfig) -> bool:
    """True when the prior's forward calls F.scaled_dot_product_attention (found by intercepting it)."""
    called = []
    original = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        called.append(True)
        return original(*args, **kwargs)
    F.scaled_dot_product_attention = spy
    try:
        device = model.tok_embeddings.weight.device
        with torch.no_grad():
            model(torch.zeros(1, cfg.seq_len, dtype=torch.long, device=device),
                  torch.zeros(1, dtype=torch.long, device=device))
    finally:
        F.scaled_dot_product_attention = original
    return bool(called)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller prior, tokenizer batch 4, one step per round, "
                                                             "no tokenizer compile (~5 min on 2 cores)")
    parser.add_argument("--threads", type=int_at_least(1), default=None)
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--stages", default="tokenizer,prior",
                        help="comma-separated: tokenizer, prior (a GPU run at a real prior shape may leave out "
                        "the tokenizer)")
    parser.add_argument("--convs", action="store_true", help="only where the fp32 tokenizer step's time goes: the "
                        "convolutions' share of it, and each conv shape forward / backward in NCHW and NHWC (CPU)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (--threads is for the CPU)")
    parser.add_argument("--prior-preset", default=None,
                        help="the prior's shape as a preset of stage2_prior.config (GPT-B, GPT-L, ...; default a "
                             "6 x 512 model, 4 x 384 with --quick)")
    parser.add_argument("--prior-batch", type=int_at_least(1), default=8)
    parser.add_argument("--tokenizer-batch", type=int_at_least(1), default=None, help="default 16 (4 with --quick)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="a published peak (e.g. the GPU's dense bf16 TFLOP/s): adds each row's MFU against it")
    args = parser.parse_args(argv)
    # (mistakes said now, not after the first rows were measured, nor a CPU run under the GPU's name)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in ("fp32", "bf16") for d in dtypes):
        parser.error(f"--dtypes: comma-separated fp32 and bf16, got {args.dtypes!r}")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if not stages or any(s not in ("tokenizer", "prior") for s in stages):
        parser.error(f"--stages: comma-separated tokenizer and prior, got {args.stages!r}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device: not a device name: {args.device!r} (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    on_cpu = device.type == "cpu"
    if args.convs and not on_cpu:
        parser.error("--convs measures the CPU's convolutions (NCHW against NHWC): leave out --device")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.convs:
        conv_breakdown(Accelerator(cpu=True), args.tokenizer_batch or (4 if args.quick else 16),
                       matmul_gflops(torch.float32))
        return
    warmup, steps, rounds = (1, 1, 3) if args.quick else (2, 5, 3)
    shape = args.prior_preset or (QUICK_PRIOR_SHAPE if args.quick else PRIOR_SHAPE)
    if on_cpu:
        accelerator = Accelerator(cpu=True)
    else:
        if device.index is not None:
            torch.cuda.set_device(device)
        accelerator = Accelerator()
    device = accelerator.device
    peak = {dtype: matmul_gflops(getattr(torch, name), device=device)
            for dtype, name in (("fp32", "float32"), ("bf16", "bfloat16"))}
    where = f"{torch.get_num_threads()} threads, fast bf16 units: {cpu_has_fast_bf16()}" if on_cpu else f"device {device}"
    print(f"torch {torch.__version__}, {where}; matmul {peak_matmul_size(device)}^3: fp32 {peak['fp32']:.1f} GFLOP/s, "
          f"bf16 {peak['bf16']:.1f} GFLOP/s" + (f"; published peak {args.peak_tflops} TFLOP/s" if args.peak_tflops else ""))
    if on_cpu and not cpu_has_fast_bf16() and "bf16" in dtypes:
        print("note: this CPU has no bf16 matrix units; bf16 rows are honest here but not representative")

    rows: list[tuple[str, str, str, float, float, float | None]] = []

    def record(stage: str, dtype: str, lever: str, rate: float, flops_per_item: float) -> None:
        share = rate * flops_per_item / (peak[dtype] * 1e9)
        mfu = rate * flops_per_item / (args.peak_tflops * 1e12) if args.peak_tflops else None
        rows.append((stage, dtype, lever, rate, share, mfu))
        unit = "images/s" if stage == "tokenizer" else "tokens/s"
        print(f"  {stage:9s} {dtype:4s} {lever:38s} {rate:9.1f} {unit}  {100 * share:5.1f}% of matmul peak"
              + (f"  MFU {100 * mfu:.1f}%" if mfu is not None else ""), flush=True)

    slow_bf16 = on_cpu and not cpu_has_fast_bf16()
    tok_model = prior_model = None
    if "tokenizer" in stages:
        # -- tokenizer
        # --quick: batch 4 (a batch-16 step takes ~20 s on two loaded cores); per-image rates stay comparable.
        tok_batch = args.tokenizer_batch or (4 if args.quick else 16)
        _, tok_model = tokenizer_step(accelerator, "for-loop", False, None, False, tok_batch)
        n_tok = sum(p.numel() for p in tok_model.parameters())
        # Training FLOPs per image ~ 3x the forward's multiply-adds x 2, counted from the conv/linear shapes.
        macs = _forward_macs(tok_model, torch.rand(1, 3, 64, 64, device=device))
        tok_flops = 6 * macs
        print(f"\ntokenizer: {n_tok / 1e6:.1f}M parameters, 64x64, batch {tok_batch}, "
              f"{tok_flops / 1e9:.2f} GFLOP per training image")
        for dtype in dtypes:
            bf16 = dtype == "bf16"
            # bf16 without bf16 units is ~50x slower per matmul: a smaller batch, one step, one round.
            b, (w, s, r) = (2, (1, 1, 1)) if (bf16 and slow_bf16) else (tok_batch, (warmup, steps, rounds))
            tag = f", batch {b}" if b != tok_batch else ""
            impls = ("for-loop", "fused") if args.quick or (bf16 and slow_bf16) else ("for-loop", "foreach", "fused")
            chosen = chosen_layout(device, bf16)
            other = torch.contiguous_format if chosen == torch.channels_last else torch.channels_last
            for impl in impls:
                step, _ = tokenizer_step(accelerator, impl, bf16, None, False, b)
                record("tokenizer", dtype, f"AdamW {impl}, {LAYOUT_NAMES[chosen]} (chosen){tag}",
                       median_rate(step, b, w, s, r, device), tok_flops)
            step, _ = tokenizer_step(accelerator, "fused", bf16, other, False, b)
            record("tokenizer", dtype, f"AdamW fused, {LAYOUT_NAMES[other]} (forced){tag}",
                   median_rate(step, b, w, s, r, device), tok_flops)
            if dtype == "fp32":  # float32 products and convolutions with bf16 operands (TF32 on a GPU)
                step, _ = tokenizer_step(accelerator, "fused", bf16, None, False, b)
                record("tokenizer", dtype, f"AdamW fused, matmul_precision medium{tag}",
                       median_rate(under_precision(step, "medium", device), b, w, s, r, device), tok_flops)
            if on_cpu:  # the fused norm + SiLU kernel's share: channels-last with the two torch ops instead
                step, _ = tokenizer_step(accelerator, "fused", bf16, torch.channels_last, False, b, fused_norm=False)
                record("tokenizer", dtype, f"AdamW fused, channels-last, unfused norm{tag}",
                       median_rate(step, b, w, s, r, device), tok_flops)
            # Compiling the 13M tokenizer takes minutes on two cores: not in --quick.
            if not args.no_compile and not args.quick and not (bf16 and slow_bf16):
                step, _ = tokenizer_step(accelerator, "fused", bf16, None, True, b)
                print(f"  (tokenizer compile + first step: {first_step_seconds(step, device):.0f} s)")
                record("tokenizer", dtype, f"AdamW fused, {LAYOUT_NAMES[chosen]} (chosen), compiled",
                       median_rate(step, b, w, s, r, device), tok_flops)

    if "prior" in stages:
        # -- prior
        prior_batch = args.prior_batch
        _, prior_model, cfg = prior_step(accelerator, shape, "for-loop", False, False, prior_batch)
        n_params = count_parameters(prior_model, exclude_embeddings=True)
        prior_flops = 6 * n_params + 12 * cfg.n_layer * cfg.dim * cfg.seq_len
        print(f"\nprior: {cfg.n_layer} layers x {cfg.dim}, {count_parameters(cfg) / 1e6:.1f}M parameters, "
              f"{cfg.seq_len} tokens, batch {prior_batch}; SDPA in forward: {uses_sdpa(prior_model, cfg)}")
        for dtype in dtypes:
            bf16 = dtype == "bf16"
            b, (w, s, r) = (1, (1, 1, 1)) if (bf16 and slow_bf16) else (prior_batch, (warmup, steps, rounds))
            tag = f", batch {b}" if b != prior_batch else ""
            for impl in ("for-loop", "foreach", "fused"):
                step, _, _ = prior_step(accelerator, shape, impl, bf16, False, b)
                record("prior", dtype, f"AdamW {impl}{tag}", median_rate(step, b * cfg.seq_len, w, s, r, device),
                       prior_flops)
            if dtype == "fp32":
                step, _, _ = prior_step(accelerator, shape, "fused", bf16, False, b)
                record("prior", dtype, f"AdamW fused, matmul_precision medium{tag}",
                       median_rate(under_precision(step, "medium", device), b * cfg.seq_len, w, s, r, device),
                       prior_flops)
            if on_cpu:  # the share of stage2_prior.fused's kernels: RoPE, RMSNorm, SwiGLU and (bf16) attention's
                #         backward by torch's ops instead
                step, _, _ = prior_step(accelerator, shape, "fused", bf16, False, b, fused_ops=False)
                record("prior", dtype, f"AdamW fused, unfused RoPE/RMSNorm/SwiGLU, torch attention{tag}",
                       median_rate(step, b * cfg.seq_len, w, s, r, device), prior_flops)
            if not args.no_compile and not (bf16 and slow_bf16):
                step, _, _ = prior_step(accelerator, shape, "fused", bf16, True, b)
                print(f"  (prior compile + first step: {first_step_seconds(step, device):.0f} s)")
                record("prior", dtype, "AdamW fused, compiled", median_rate(step, b * cfg.seq_len, w, s, r, device),
                       prior_flops)

    print("\nAdamW step alone (ms, median of 10, fp32 parameters with gradients set):")
    for name, model in (("tokenizer", tok_model), ("prior", prior_model)):
        if model is not None:
            times = {impl: adamw_ms(model, impl) for impl in ("for-loop", "foreach", "fused")}
            print(f"  {name:9s} " + ", ".join(f"{k} {v:.1f} ms" for k, v in times.items()))

    if not args.no_compile:
        print("\ngraph breaks (torch._dynamo.explain of the forward):")
        zeros = dict(dtype=torch.long, device=device)
        if tok_model is not None:
            images = torch.rand(2, 3, 64, 64, device=device) * 2 - 1
            print(f"  tokenizer: {graph_breaks(tok_model, images) or 'none'}")
        if prior_model is not None:
            inputs = torch.zeros(2, cfg.seq_len, **zeros), torch.zeros(2, **zeros)
            print(f"  prior:     {graph_breaks(prior_model, *inputs) or 'none'}")

    mfu_head = " MFU (published peak) |" if args.peak_tflops else ""
    print(f"\n| stage | dtype | lever | throughput | x first row | % matmul peak |{mfu_head}\n"
          f"|---|---|---|---|---|---|{'---|' if mfu_head else ''}")
    base = {}
    for stage, dtype, lever, rate, share, mfu in rows:
        base.setdefault((stage, dtype), rate)
        unit = "img/s" if stage == "tokenizer" else "tok/s"
        print(f"| {stage} | {dtype} | {lever} | {rate:.1f} {unit} | {rate / base[(stage, dtype)]:.2f}x | {100 * share:.1f}% |"
              + (f" {100 * mfu:.1f}% |" if mfu is not None else ""))


CONV_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution", "aten::convolution",
            "aten::thnn_conv2d", "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward")


def conv_breakdown(accelerator: Accelerator, batch: int, peak: float) -> None:
    """Where the fp32 tokenizer step's time goes: the convolutions' share of the profiled step, then each
    conv shape of the model timed alone, forward and forward + backward, in NCHW and NHWC."""
    step, model = tokenizer_step(accelerator, "fused", False, None, False, batch)
    for _ in range(2):
        step()
    t = time.perf_counter()
    for _ in range(2):
        step()
    step_ms = (time.perf_counter() - t) / 2 * 1e3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if e.key in CONV_OPS)
    print(f"tokenizer fp32 step, batch {batch}: {step_ms:.0f} ms ({batch / step_ms * 1e3:.2f} images/s); "
          f"convolutions (forward and backward) take {conv / total:.1%} of the profiled CPU time, so removing "
          f"everything else would speed the step up at most {total / conv:.2f}x. matmul peak {peak:.0f} GFLOP/s")

    shapes: dict[tuple, int] = {}  # (in, out, kernel, stride, padding, H, W, first layer) -> calls per step

    def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor], _output: torch.Tensor) -> None:
        x = inputs[0]
        key = (module.in_channels, module.out_channels, module.kernel_size[0], module.stride[0], module.padding[0],
               x.shape[2], x.shape[3], not x.requires_grad)
        shapes[key] = shapes.get(key, 0) + 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    model(torch.rand(batch, 3, 64, 64))  # with gradients, as in training: only conv_in's input has none
    for h in handles:
        h.remove()
    print(f"\n{'conv (batch ' + str(batch) + ')':>30} {'calls':>5}   NCHW fwd / fwd+bwd ms  (GFLOP/s)     "
          f"NHWC fwd / fwd+bwd ms  (GFLOP/s)")
    sums = {"NCHW": 0.0, "NHWC": 0.0, "best": 0.0}
    for (cin, cout, k, stride, pad, h, w, first), calls in sorted(shapes.items(), key=lambda kv: -kv[0][5]):
        conv_layer = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=pad)
        out_hw = ((h + 2 * pad - k) // stride + 1) * ((w + 2 * pad - k) // stride + 1)
        flop = 2 * batch * cin * cout * k * k * out_hw
        cells = []
        both = {}
        for name, fmt in (("NCHW", torch.contiguous_format), ("NHWC", torch.channels_last)):
            layer = conv_layer.to(memory_format=fmt)
            inp = torch.randn(batch, cin, h, w).contiguous(memory_format=fmt).requires_grad_(not first)
            grad = torch.randn_like(layer(inp))  # (and the forward's warm-up)
            fwd = timed(lambda: layer(inp), 3) * 1e3
            layer(inp).backward(grad)  # warm-up
            both[name] = timed(lambda: layer(inp).backward(grad), 3) * 1e3
            passes = 2 if first else 3  # forward, weight gradient (and input gradient)
            cells.append(f"{fwd:6.1f} / {both[name]:6.1f}  ({flop / fwd / 1e6:4.0f} / {passes * flop / both[name] / 1e6:4.0f})")
            sums[name] += calls * both[name]
        sums["best"] += calls * min(both.values())
        print(f"{f'{cin}->{cout} {k}x{k}/{stride} at {h}x{w}':>30} {calls:>5}   {cells[0]}     {cells[1]}")
    print(f"all convs, forward + backward, per step: NCHW {sums['NCHW']:.0f} ms, NHWC {sums['NHWC']:.0f} ms, the faster "
          f"layout per layer {sums['best']:.0f} ms (the profiled step: {step_ms:.0f} ms)")


def adamw_ms(model: torch.nn.Module, impl: str, repeats: int = 10) -> float:
    """Median milliseconds of one AdamW step (``make_optimizer`` with ``impl``) over ``model``'s parameters."""
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = make_optimizer(params, TrainConfig(lr=1e-4, weight_decay=0.01, optimizer_impl=impl))
    opt.step()
    device = params[0].device
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        opt.step()
        sync(device)
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def _forward_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of the conv and linear layers in one forward of ``x`` (hooks on the output shapes)."""
    total = 0

    def hook(module: torch.nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            total += output.numel() * (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, torch.nn.Linear):
            total += output.numel() * module.in_features
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total


if __name__ == "__main__":
    main()
