"""The compiled one-token decode step (fixed shapes, compiled once) and weight-only int8 decoding."""

import copy
import types
from pathlib import Path

import pytest
import torch
from prior_helpers import tiny_gpt
from torch._dynamo.utils import counters

from stage2_prior import GPT, GPTConfig, SamplingConfig, blocked, complete, generate
from stage2_prior.decode import DecodeStep, decode_step
from stage2_prior.quantize import Int8Linear, is_quantized, quantize_int8, set_prior_dtype
from vqgpt.cli import main

ROOT = Path(__file__).resolve().parents[1]
GREEDY = SamplingConfig(temperature=0)


def test_static_forward_matches_the_sliced_cache():
    """A tensor start_pos (fixed shapes, whole cache behind a mask) gives the int path's logits."""
    model = tiny_gpt(grid_size=[3, 4])
    torch.manual_seed(1)
    tokens, labels = torch.randint(0, 16, (2, 12)), torch.tensor([0, 2])
    plain, static = model.new_cache(2), model.new_cache(2, zeroed=True)
    with torch.inference_mode():
        model.forward_cached(tokens[:, :3], 0, labels, cache=plain)
        model.forward_cached(tokens[:, :3], 0, labels, cache=static)
        for t in range(3, 8):  # one token at a time: the compiled step's case
            want = model.forward_cached(tokens[:, t - 1: t], t, cache=plain)
            got = model.forward_cached(tokens[:, t - 1: t], torch.tensor([t]), cache=static)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        want = model.forward_cached(tokens[:, 7:10], 8, cache=plain)  # and a chunk
        got = model.forward_cached(tokens[:, 7:10], torch.tensor([8]), cache=static)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="prefix slot"):
            model.forward_cached(tokens[:, :1], torch.tensor([1]), labels, cache=static)


@pytest.mark.slow  # inductor compiles C++ for the step: 20-60 s on a shared 2-core machine
def test_compiled_decode_gives_the_eager_greedy_tokens_and_compiles_once():
    model = tiny_gpt(grid_size=[4, 4], n_layer=1)
    labels = torch.tensor([0, 2])
    eager = generate(model, 2, class_labels=labels, sampling=GREEDY)
    graphs = counters["stats"]["unique_graphs"]
    compiled = generate(model, 2, class_labels=labels, sampling=GREEDY, compile=True)
    assert torch.equal(compiled, eager)
    # 15 positions, one graph: the position is data, not a constant baked into the graph
    assert counters["stats"]["unique_graphs"] - graphs == 1
    again = generate(model, 2, class_labels=labels, sampling=GREEDY, compile=True)  # reuses the step
    assert torch.equal(again, eager)
    assert counters["stats"]["unique_graphs"] - graphs == 1
    # sampled (not greedy) tokens: the same draws from the same generator
    sampling = SamplingConfig(top_k=4)
    assert torch.equal(generate(model, 2, class_labels=labels, sampling=sampling, compile=True,
                                generator=torch.Generator().manual_seed(3)),
                       generate(model, 2, class_labels=labels, sampling=sampling,
                                generator=torch.Generator().manual_seed(3)))


def compiled_steps_against_eager(model: GPT, spy_module, spy_name: str, monkeypatch,
                                 tolerance: float = 1e-4, batch: int = 2) -> list[int]:
    """Three compiled decode steps of ``model`` at ``batch`` (1 or 2), each checked against the eager step
    (logits within ``tolerance`` of their range); returns how often ``spy_module.spy_name`` ran during each
    compiled step."""
    tokens = torch.randint(0, 16, (batch, 4), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2])[:batch]
    step = decode_step(model)
    eager_cache, cache = model.new_cache(batch), step.new_cache(batch, model.config.seq_len)
    calls, counts = [], []
    original = getattr(spy_module, spy_name)
    monkeypatch.setattr(spy_module, spy_name, lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    with torch.inference_mode():
        for c in (eager_cache, cache):
            model.forward_cached(None, 0, labels, cache=c)
        for pos in range(1, 4):
            want = model.forward_cached(tokens[:, pos - 1: pos], pos, cache=eager_cache)
            calls.clear()
            got = step(tokens[:, pos - 1: pos], pos, cache)
            counts.append(len(calls))
            spread = (want.amax(-1) - want.amin(-1)).min()
            assert (got - want).abs().max() <= tolerance * spread, pos
    return counts


@pytest.mark.parametrize("native", [True, False], ids=["cpp-op", "python-op"])
def test_compiled_float_step_calls_the_cpp_op_on_the_attached_copies(native, monkeypatch):
    """From 2 rows the compiled step's float products go to vqgpt_native::blocked_linear over the blocked
    copies that the step attached to each Linear before tracing; where that op did not build, to the
    Python op that finds the copy itself. Either way the eager logits."""
    from stage2_prior import layers

    assert blocked.native_linear() is not None  # built here, as on CI
    if not native:
        monkeypatch.setattr(blocked, "_NATIVE", [None])
    model = tiny_gpt(grid_size=[3, 4], n_layer=1)
    decode_step(model)
    linears = [m for m in model.modules() if isinstance(m, layers.Linear)]
    assert all((m._compiled_blocked is not None) == native for m in linears)
    counts = compiled_steps_against_eager(model, layers, "_few_row_product", monkeypatch)
    assert counts == 3 * [0 if native else len(linears)]  # the Python op: one call per layer


def test_one_bf16_row_takes_the_blocked_kernel_and_one_float32_row_the_frozen_weight(monkeypatch):
    """At batch 1 the compiled step multiplies float32 weights with inductor's own kernels on the frozen
    weight, and bfloat16 ones with the blocked kernel (for them the autotuner chose oneDNN, 1.4x slower
    over a GPT-B step). Seen here through the Python op, which runs where the C++ op did not build."""
    from stage2_prior import layers

    for dtype, tolerance in (("float32", 1e-4), ("bfloat16", 1e-2)):
        monkeypatch.setattr(blocked, "_NATIVE", [None])
        model = set_prior_dtype(tiny_gpt(grid_size=[3, 4], n_layer=1), dtype)
        linears = [m for m in model.modules() if isinstance(m, layers.Linear)]
        counts = compiled_steps_against_eager(model, layers, "_few_row_product", monkeypatch, tolerance, batch=1)
        assert counts == 3 * [0 if dtype == "float32" else len(linears)], dtype
        monkeypatch.undo()  # the spy, before the next dtype's


def test_the_cpu_step_is_compiled_with_frozen_weights(monkeypatch):
    """The step's inductor settings (frozen weights, the GEMM autotuning) are in force when it compiles: inductor
    freezes the graph. (Given as torch.compile options instead of a config.patch around each call, which costs
    40 us a step, the graph froze too, but the float32 step at batch 1 ran at half the speed.)"""
    import torch._inductor.freezing as freezing

    frozen = []
    real_freeze = freezing.freeze
    monkeypatch.setattr(freezing, "freeze", lambda *a, **k: frozen.append(1) or real_freeze(*a, **k))
    model = tiny_gpt(grid_size=[2, 3], n_layer=1)
    generate(model, 1, class_labels=torch.tensor([1]), sampling=GREEDY, compile=True)
    assert frozen, "the compiled CPU step did not freeze its weights"


@pytest.mark.parametrize("native", [True, False], ids=["cpp-op", "python-op"])
def test_compiled_step_attends_with_the_cpp_op_where_it_builds(native, monkeypatch):
    """The compiled step's attention (write the slot, attend over the slots written) is the C++ op, with no
    Python in the step; where the C++ ops did not build, the Python op around the same kernel, once per
    layer. Either way the eager logits, in float32 and in bfloat16 (where the compiled step rounds its
    intermediate values less often than the eager one)."""
    assert blocked.native_linear() is not None  # built here, as on CI
    if not native:
        monkeypatch.setattr(blocked, "_NATIVE", [None])
    for dtype in ("float32", "bfloat16"):
        model = set_prior_dtype(tiny_gpt(grid_size=[3, 4], n_layer=2), dtype)
        tolerance = 1e-4 if dtype == "float32" else 1e-2
        counts = compiled_steps_against_eager(model, blocked, "_run_attention", monkeypatch, tolerance)
        assert counts == 3 * [0 if native else 2]


def test_other_compiled_graphs_do_not_take_the_attached_copies():
    """The copies attached for the decode step are remade only when that step recompiles: a caller's own
    compiled forward of the same layers, after an in-place edit of a weight, must see the edited weight."""
    from stage2_prior import layers

    model = tiny_gpt(grid_size=[3, 4], n_layer=1)
    decode_step(model)  # attaches the blocked copies
    linear = model.output
    assert linear._compiled_blocked is not None
    x = torch.randn(2, linear.in_features)
    with torch.no_grad():
        linear.weight.mul_(2)
        got = torch.compile(lambda rows: linear(rows), fullgraph=True)(x)
    torch.testing.assert_close(got, x @ linear.weight.t(), rtol=1e-4, atol=1e-4)
    assert not layers._in_decode_step


@pytest.mark.slow  # three compiles of a one-layer prior
def test_compiled_decode_follows_weight_edits_and_keeps_priors_apart():
    """On a CPU the step freezes the weights into its graph: an in-place edit (an optimizer step,
    load_state_dict) must recompile it, and a second prior of the same shapes gets its own graph (one
    made under inference_mode, whose tensors have no version counter)."""
    model = tiny_gpt(grid_size=[2, 3], n_layer=1)
    with torch.inference_mode():
        other = tiny_gpt(seed=1, grid_size=[2, 3], n_layer=1)
    labels = torch.tensor([0, 2])

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        return (generate(model, 2, class_labels=labels, sampling=GREEDY),
                generate(model, 2, class_labels=labels, sampling=GREEDY, compile=True))

    eager, compiled = both()
    assert torch.equal(compiled, eager)
    with torch.no_grad():
        model.output.weight.copy_(other.output.weight)
    edited, compiled = both()
    assert not torch.equal(edited, eager)  # the edit changes the tokens...
    assert torch.equal(compiled, edited)  # ...and the compiled step follows it
    eager = generate(other, 2, class_labels=labels, sampling=GREEDY)
    assert not torch.equal(eager, edited)
    assert torch.equal(generate(other, 2, class_labels=labels, sampling=GREEDY, compile=True), eager)


def test_compile_wiring_without_a_compiler(monkeypatch):
    """generate / complete route single tokens through the decode step (torch.compile stubbed out:
    the static path runs eagerly), with the eager samplers' tokens; compile needs the cache."""
    import stage2_prior.decode as decode

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    monkeypatch.setattr(decode, "_STEPS", type(decode._STEPS)())
    calls = []
    original = decode.DecodeStep.__call__

    def spy(self, tokens, pos, cache):
        calls.append(pos)
        return original(self, tokens, pos, cache)

    monkeypatch.setattr(decode.DecodeStep, "__call__", spy)
    model = tiny_gpt(grid_size=[3, 4])
    gen = torch.Generator
    want = generate(model, 2, class_labels=1, sampling=SamplingConfig(cfg_scale=2.0), generator=gen().manual_seed(0))
    got = generate(model, 2, class_labels=1, sampling=SamplingConfig(cfg_scale=2.0), generator=gen().manual_seed(0),
                   compile=True)
    assert torch.equal(got, want) and calls == list(range(1, 12))
    canvas = torch.zeros(2, 4, 6, dtype=torch.long)
    want = complete(model, canvas, keep_rows=1, class_labels=0, generator=gen().manual_seed(1))
    got = complete(model, canvas, keep_rows=1, class_labels=0, generator=gen().manual_seed(1), compile=True)
    assert torch.equal(got, want) and len(calls) > 11
    with pytest.raises(ValueError, match="use_cache=True"):
        generate(model, 1, class_labels=0, use_cache=False, compile=True)


# ---------------------------------------------------------------------------------------- int8


def trained_tiny_prior(steps: int = 80) -> tuple[GPT, torch.Tensor, torch.Tensor]:
    """A tiny prior trained on class-dependent diagonal stripes; returns it and held-out (grids, labels).

    Grid of class c with random phase r: code (c * 5 + r + i + 2 j) mod 16 at cell (i, j), so the
    first code is a 4-way guess and every later one is determined: a prior that learned it is confident.
    """
    def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        labels, phase = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 4, (n,), generator=g)
        i, j = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
        return (labels[:, None, None] * 5 + phase[:, None, None] + i + 2 * j) % 16, labels

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", codebook_size=16, grid_size=[4, 4], num_classes=3, dim=64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        grids, labels = data(64, step)
        logits = model(grids.flatten(1), labels)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), grids.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    grids, labels = data(96, 10_000)
    return model.eval(), grids, labels


def test_int8_logits_near_fp32_and_greedy_tokens_agree():
    reference, grids, labels = trained_tiny_prior()
    with torch.inference_mode():
        fp32 = reference(grids.flatten(1), labels)  # (96, 16, 16)
        int8 = set_prior_dtype(copy.deepcopy(reference), "int8")
        assert is_quantized(int8) and isinstance(int8.output, Int8Linear)
        assert int8.tok_embeddings.weight.dtype == torch.float32  # only the linear layers are int8
        q = int8(grids.flatten(1), labels)
    # Stated tolerance: every logit within 2% of the fp32 logits' range (per-channel int8 weights
    # round each weight by at most 1/254 of its row's largest; bf16 activations add ~0.4% each).
    spread = (fp32.amax(-1) - fp32.amin(-1)).mean()
    err = (q - fp32).abs().max()
    assert err <= 0.02 * spread, (err, spread)
    # Quality guard: the greedy (argmax) code at each position of held-out grids, and whole greedy
    # samples of every class, agree with fp32 on >= 95% of positions.
    assert (q.argmax(-1) == fp32.argmax(-1)).float().mean() >= 0.95
    prompts = grids[:24, :1]  # greedy completions of 24 first rows
    canvas = torch.cat([prompts, torch.zeros(24, 3, 4, dtype=torch.long)], dim=1)
    want = complete(reference, canvas, keep_rows=1, class_labels=labels[:24], sampling=GREEDY)
    got = complete(int8, canvas, keep_rows=1, class_labels=labels[:24], sampling=GREEDY)
    assert (got[:, 1:] == want[:, 1:]).float().mean() >= 0.95  # the sampled rows only
    with pytest.raises(ValueError, match="already quantised"):
        set_prior_dtype(int8, "float32")
    with pytest.raises(ValueError, match="float32, bfloat16, int8"):
        set_prior_dtype(reference, "int4")


@pytest.mark.slow  # one compile of a one-layer prior
def test_compiled_int8_step_keeps_to_the_eager_int8_logits():
    """Compiled and eager int8 share the blocked kernel where it builds (an op the compiled graph calls):
    their logits then differ only by the rounding of the compiled elementwise work (0.01% of their
    range). Elsewhere the compiled step freezes the int8 weights for inductor's own kernels, which
    round the bf16 products differently from the eager kernel: 0.5%."""
    model = set_prior_dtype(tiny_gpt(grid_size=[3, 4], n_layer=1), "int8")
    tokens, labels = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(0)), torch.tensor([0, 2])
    step = decode_step(model)
    eager_cache, cache = model.new_cache(2), step.new_cache(2, model.config.seq_len)
    with torch.inference_mode():
        for c in (eager_cache, cache):
            model.forward_cached(None, 0, labels, cache=c)
        for pos in range(1, 8):
            want = model.forward_cached(tokens[:, pos - 1: pos], pos, cache=eager_cache)
            got = step(tokens[:, pos - 1: pos], pos, cache)
            spread = (want.amax(-1) - want.amin(-1)).min()
            tolerance = 1e-4 if model.output.weight_blocked is not None else 5e-3
            assert (got - want).abs().max() <= tolerance * spread, pos


@pytest.mark.parametrize("native", [True, False], ids=["cpp-op", "python-op"])
def test_compiled_int8_step_calls_the_cpp_op_where_it_builds(native, monkeypatch):
    """The compiled step's int8 products go to vqgpt_native::blocked_linear (no Python per product); where
    that op did not build, to the Python op around the same kernel. Either way the eager int8 logits."""
    assert blocked.native_linear() is not None  # built here, as on CI
    if not native:
        monkeypatch.setattr(blocked, "_NATIVE", [None])
    model = set_prior_dtype(tiny_gpt(grid_size=[3, 4], n_layer=1), "int8")
    layers = sum(isinstance(m, Int8Linear) for m in model.modules())
    counts = compiled_steps_against_eager(model, blocked, "product", monkeypatch)
    assert counts == 3 * [0 if native else layers]  # the Python op: one call per int8 layer


def test_int8_linear_kernel_and_dequantised_fallback(monkeypatch):
    import stage2_prior.quantize as quantize

    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 24, bias=False)  # an input size the aten kernel takes (a multiple of 16)
    with torch.no_grad():
        linear.weight[3] = 0  # an all-zero row keeps a finite scale
    layer = Int8Linear.from_linear(linear)
    assert layer.weight_int8.dtype == torch.int8 and layer.weight_int8.abs().max() == 127
    assert torch.all(layer.dequantized()[3] == 0)
    # per-channel rounding: each weight within half a step of its row's scale
    step = layer.scales.float()[:, None]
    assert torch.all((layer.dequantized() - linear.weight).abs() <= step / 2 + 1e-6)
    x = torch.randn(3, 5, 48)
    assert layer.weight_blocked is not None  # this CPU builds the blocked kernel (x86, AVX2)
    with torch.inference_mode():
        want = x @ layer.dequantized().t()
        blocked_out = layer(x)  # fp32 accumulation over the rows rounded to 16 bits (AVX512-VNNI) or not
        rows = blocked.rounded_rows(x.flatten(0, 1)).view(x.shape) if blocked.int8_rounds_rows() else x
        exact = (rows.double() @ layer.weight_int8.double().t() * layer.scales.double()).float()
        layer.weight_blocked = None
        kernel = layer(x)  # aten._weight_int8pack_mm, bf16 activations
        monkeypatch.setattr(quantize, "_KERNEL_OK", {("cpu", torch.bfloat16): False})
        fallback = layer(x)
    assert blocked_out.shape == kernel.shape == (3, 5, 24) and blocked_out.dtype == torch.float32
    torch.testing.assert_close(blocked_out, exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(blocked_out, want, rtol=1e-3, atol=1e-3)  # rows rounded by <= 1 / 65534 of the largest
    torch.testing.assert_close(kernel, want, rtol=2e-2, atol=2e-2)  # bf16 activations
    torch.testing.assert_close(fallback, kernel, rtol=1e-2, atol=1e-2)
    # other input sizes never reach the aten kernel (garbage or a crash on AVX-512 CPUs): the dequantised
    # product, even where the kernel is usable
    monkeypatch.setattr(quantize, "_KERNEL_OK", {("cpu", torch.bfloat16): True})
    odd = Int8Linear.from_linear(torch.nn.Linear(40, 24, bias=False))
    odd.weight_blocked = None
    x40 = torch.randn(15, 40)
    with torch.inference_mode():
        dequantised = (torch.nn.functional.linear(x40.bfloat16(), odd.weight_int8.bfloat16()) * odd.scales).float()
        assert torch.equal(odd(x40), dequantised)
    # the blocked copy follows the module: remade on a CPU, dropped elsewhere
    assert copy.deepcopy(layer).to("meta").weight_blocked is None
    assert torch.equal(layer.float().weight_blocked, blocked.block(layer.weight_int8))
    other = Int8Linear.from_linear(torch.nn.Linear(48, 24, bias=False))
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer.weight_blocked, blocked.block(other.weight_int8))
    with pytest.raises(ValueError, match="bias-free"):
        Int8Linear.from_linear(torch.nn.Linear(4, 4))
    model = quantize_int8(tiny_gpt())
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())  # the output head too


def test_cli_prior_dtype_int8_and_compile(tmp_path, monkeypatch):
    from stage1_vq.model import VQModel
    from stage1_vq.train import TokenizerRunConfig
    from vqgpt.ground.config import load_config
    from vqgpt.workflow.pipeline import VQGPTPipeline

    torch.manual_seed(0)
    tok = VQModel(load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml").model).eval()
    prior = GPT(GPTConfig(codebook_size=tok.codebook_size, grid_size=[4, 4], num_classes=3, n_layer=1, n_head=2,
                          dim=32, multiple_of=16)).eval()
    VQGPTPipeline(tok, prior, classes=["a", "b", "c"]).save_pretrained(tmp_path / "pipe")
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # the wiring, not the compiler
    seen = {}
    original = VQGPTPipeline.generate

    def spy(self, *args, **kwargs):
        seen.update(int8=is_quantized(self.prior), compile=self.compile_decode,
                    tokenizer=next(self.tokenizer.parameters()).dtype)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(VQGPTPipeline, "generate", spy)
    assert main(["sample", "--pipeline", str(tmp_path / "pipe"), "--num", "2", "--class-label", "a",
                 "--prior-dtype", "int8", "--compile", "--out", str(tmp_path / "s.png")]) == 0
    assert seen == {"int8": True, "compile": True, "tokenizer": torch.float32}
    assert (tmp_path / "s.png").is_file()
    # eval-prior hands both to eval_prior (stopped right there: its sampling is tested elsewhere)
    import vqgpt.workflow.evaluation as evaluation

    def stop(*args, **kwargs):
        seen.update(eval_prior=(kwargs["prior_dtype"], kwargs["compile"]))
        raise ValueError("stop")

    monkeypatch.setattr(evaluation, "eval_prior", stop)
    assert main(["eval-prior", "--pipeline", str(tmp_path / "pipe"), "--reference", "builtin:mnist",
                 "--prior-dtype", "int8", "--compile"]) == 2
    assert seen["eval_prior"] == ("int8", True)
    with pytest.raises(SystemExit, match="2"):  # argparse names the flag and its choices
        main(["sample", "--pipeline", str(tmp_path / "pipe"), "--prior-dtype", "int4",
              "--out", str(tmp_path / "x.png")])


def test_many_samples_decode_as_the_pipeline_says(tmp_path, monkeypatch):
    """`sample --out DIR/` and eval-prior draw through sample_many.draw_images: it must follow
    set_decoding's compile, and a folder sampled with int8 weights is not resumed with float ones."""
    import stage2_prior.decode as decode
    from stage1_vq.model import VQModel
    from stage1_vq.train import TokenizerRunConfig
    from vqgpt.ground.config import load_config
    from vqgpt.workflow.pipeline import VQGPTPipeline
    from vqgpt.workflow.sample_many import sample_many

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # the wiring, not the compiler
    monkeypatch.setattr(decode, "_STEPS", type(decode._STEPS)())
    calls = []
    original = decode.DecodeStep.__call__
    monkeypatch.setattr(decode.DecodeStep, "__call__", lambda self, *a: calls.append(a[1]) or original(self, *a))
    torch.manual_seed(0)
    tok = VQModel(load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml").model).eval()
    prior = GPT(GPTConfig(codebook_size=tok.codebook_size, grid_size=[2, 2], num_classes=0, n_layer=1, n_head=2,
                          dim=32, multiple_of=16)).eval()
    float_pipe = VQGPTPipeline(tok, copy.deepcopy(prior))
    pipe = VQGPTPipeline(tok, prior).set_decoding(prior_dtype="int8", compile=True)  # quantises `prior` in place
    sample_many(pipe, 2, out=tmp_path / "s", batch_size=2, progress=False)
    assert calls == [1, 2, 3]  # the three tokens after the first went through the decode step
    with pytest.raises(ValueError, match="prior_dtype"):
        sample_many(float_pipe, 2, out=tmp_path / "s", batch_size=2, progress=False)


@pytest.mark.parametrize("fast_bf16", [False, True])
def test_bf16_decoding_warns_on_a_cpu_without_bf16_units(monkeypatch, recwarn, fast_bf16):
    from stage2_prior import draw
    monkeypatch.setattr(draw, "cpu_has_fast_bf16", lambda: fast_bf16)
    model = set_prior_dtype(tiny_gpt(), "bfloat16")
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    # setting the dtype does not warn: the weights may still move to a GPU before they decode
    assert not [w for w in recwarn if "bfloat16 decoding" in str(w.message)]
    generate(model, 2, class_labels=[0, 1])
    complete(model, torch.zeros(1, 3, 4, dtype=torch.long), keep_rows=1, class_labels=[0])
    slow = [w for w in recwarn if "bfloat16 decoding on this CPU" in str(w.message)]
    assert len(slow) == (0 if fast_bf16 else 2)
    generate(tiny_gpt(), 2, class_labels=[0, 1])  # float32 weights never warn
    assert len([w for w in recwarn if "bfloat16 decoding" in str(w.message)]) == len(slow)


def test_accelerator_positions_are_made_once_on_the_device():
    """The compiled step's position tensors on an accelerator come from one arange on the device and are
    reused: ``torch.tensor([pos], device=...)`` each token copied from pageable memory, which waits for the
    GPU's stream, so the host could not queue a step ahead (1.1-1.4x steps/s on an H200, README). Checked on
    the meta device, which stands for any device that is not the CPU."""
    step = types.SimpleNamespace(_positions=[])
    meta = torch.device("meta")
    made = [DecodeStep._position(step, pos, meta) for pos in range(3)]
    assert all(t.device == meta and t.shape == (1,) and t.dtype == torch.long for t in made)
    assert len(step._positions) >= 1024  # made at once, not one per token
    assert all(DecodeStep._position(step, pos, meta) is t for pos, t in enumerate(made))
    assert DecodeStep._position(step, 5000, meta) is step._positions[5000]  # a longer grid: grown
    assert torch.equal(DecodeStep._position(step, 7, torch.device("cpu")), torch.tensor([7]))
