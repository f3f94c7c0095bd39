"""The prior's eager CPU kernels (stage2_prior.fused: RoPE with the split of wqkv's output, RMSNorm, SwiGLU, the
bf16 attention's backward): the values and gradients of the torch ops, where they are taken and where not, a prior
training step through them equal to the unfused one, and eager decoding through their forwards."""

import pytest
import torch
import torch.nn.functional as F

import stage2_prior.fused as fused
from stage2_prior.config import GPTConfig
from stage2_prior.layers import apply_rope
from stage2_prior.model import GPT

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("op", ["rope", "norm", "glu"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_kernels_build_here(op, dtype):
    assert fused.kernels(op, dtype) is not None  # x86 with AVX2 or AVX-512, as the development and CI machines


def _relative_errors(got, want):
    return [((g.double() - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want)]


def _tolerance(dtype):
    return 1e-2 if dtype == torch.bfloat16 else 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,K,D,pad", [(8, 8, 64, 0), (4, 2, 16, 0), (3, 1, 6, 5)],
                         ids=["MHA 8 heads of 64", "GQA 4 q / 2 kv heads", "odd heads of 6, padded rows"])
def test_rope_qkv_equals_the_rotation_and_split(dtype, H, K, D, pad):
    """q, k rotated by each slot's multipliers and v split off, and the gradient of wqkv's output, against
    apply_rope in float64; ``pad`` makes the rows a view with a longer stride, as a slice of a wider tensor."""
    gen = torch.Generator().manual_seed(0)
    B, n = 3, 7
    table = torch.randn(n, 2, D, generator=gen)
    full = torch.randn(B, n, (H + 2 * K) * D + pad, generator=gen) * 2
    grads = [torch.randn(B, n, heads, D, generator=gen) for heads in (H, K, K)]
    x = full.to(dtype)[..., : (H + 2 * K) * D].detach().requires_grad_()
    out = fused._RopeQKV.apply(x, table, H, K, D)
    torch.autograd.backward(out, [g.to(dtype) for g in grads])
    x64 = x.detach().double().requires_grad_()
    qk = apply_rope(x64[..., : (H + K) * D].view(B, n, H + K, D), table.double())
    want = [qk[:, :, :H], qk[:, :, H:], x64[..., (H + K) * D:].view(B, n, K, D)]
    torch.autograd.backward(want, [g.to(dtype).double() for g in grads])
    assert all(t.dtype == dtype and t.is_contiguous() for t in out)
    assert max(_relative_errors([*out, x.grad], [*want, x64.grad])) < _tolerance(dtype)


def test_rope_backward_takes_strided_and_missing_gradients():
    """The gradients SDPA hands back are transposed views; an output left unused has no gradient at all."""
    gen = torch.Generator().manual_seed(1)
    B, n, H, K, D = 2, 5, 4, 4, 8
    table = torch.randn(n, 2, D, generator=gen)
    x = torch.randn(B, n, (H + 2 * K) * D, generator=gen, requires_grad=True)
    values = torch.randn(B, K, n, D, generator=gen)
    q, k, v = fused._RopeQKV.apply(x, table, H, K, D)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), values, is_causal=True)
    y.square().sum().backward()  # v unused: no gradient reaches it
    x64 = x.detach().double().requires_grad_()
    qk = apply_rope(x64[..., : (H + K) * D].view(B, n, H + K, D), table.double())
    y64 = F.scaled_dot_product_attention(qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2),
                                         values.double(), is_causal=True)
    y64.square().sum().backward()
    assert x.grad[..., (H + K) * D:].abs().max() == 0
    assert max(_relative_errors([x.grad], [x64.grad])) < 1e-5


@pytest.mark.parametrize("C", [512, 35], ids=["512 channels", "35 channels (a masked rest)"])
@pytest.mark.parametrize("out", DTYPES, ids=["fp32 out", "bf16 out (under autocast)"])
def test_rms_norm_equals_llamagens(C, out):
    """Against F.rms_norm in float64 over rows of uneven scale, with gradients of x and of the weight (summed over
    the threads' parts: an odd row count splits unevenly)."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 37, C, generator=gen) * torch.linspace(0.1, 30, 37)[:, None]).requires_grad_()
    weight = (torch.rand(C, generator=gen) + 0.5).requires_grad_()
    dy = torch.randn(2, 37, C, generator=gen).to(out)
    y = fused._RMSNorm.apply(x, weight, 1e-5, out)
    y.backward(dy)
    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want = F.rms_norm(x64, (C,), w64, 1e-5)
    want.backward(dy.double())
    assert y.dtype == out and x.grad.dtype == torch.float32
    assert max(_relative_errors([y, x.grad, weight.grad], [want, x64.grad, w64.grad])) < _tolerance(out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_equals_silu_times_up(dtype):
    gen = torch.Generator().manual_seed(0)
    a, b, g = (torch.randn(3, 5, 77, generator=gen) * 4 for _ in range(3))  # (1155 values: a masked rest)
    a, b = (t.to(dtype).requires_grad_() for t in (a, b))
    h = fused._SwiGLU.apply(a, b)
    h.backward(g.to(dtype))
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    want = F.silu(a64) * b64
    want.backward(g.to(dtype).double())
    assert max(_relative_errors([h, a.grad, b.grad], [want, a64.grad, b64.grad])) < _tolerance(dtype)


def _attention_errors(fn, q, k, v, dout):
    """Relative errors of fn's output and gradients against SDPA in float64."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = F.scaled_dot_product_attention(q64, k64, v64, is_causal=True)
    want.backward(dout.double())
    return [((g.double() - w).norm() / w.norm()).item()
            for g, w in zip([out, q.grad, k.grad, v.grad], [want, q64.grad, k64.grad, v64.grad])]


@pytest.mark.parametrize("T,chunk", [(40, None), (37, 3)], ids=["40 tokens", "37 tokens, 3 slices at a time"])
def test_the_attention_backward_is_as_close_to_float64_as_torchs(T, chunk, monkeypatch):
    """bf16 causal attention of heads given as transposed views (as the prior makes them), scores large enough
    that rounding them to bf16 would show: output and gradients no further from float64 than torch's own flash
    attention's (calibrated in the test), also when the scores are held a few slices at a time."""
    if chunk is not None:
        monkeypatch.setattr(fused, "_SCORES_BYTES", chunk * 4 * T * T)
    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = ((torch.randn(2, T, 3, 16, generator=gen) * 3).to(torch.bfloat16).transpose(1, 2) for _ in range(4))
    ours = _attention_errors(fused._CausalAttention.apply, q, k, v, dout)
    torchs = _attention_errors(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v, dout)
    assert all(o <= 1.25 * t + 1e-4 for o, t in zip(ours, torchs)), (ours, torchs)
    assert max(ours) < 2e-2


def test_the_attention_kernel_is_taken_for_bf16_training_only():
    q = torch.randn(2, 2, 8, 16, dtype=torch.bfloat16, requires_grad=True)
    assert fused.causal_attention(q, q, q) is not None
    assert fused.causal_attention(q.float(), q.float(), q.float()) is None  # fp32: torch's flash backward
    assert fused.causal_attention(q[:, :, :1], q[:, :, :1], q[:, :, :1]) is None  # one query
    with torch.no_grad():
        assert fused.causal_attention(q, q, q) is None
    names = _kernel_functions(_prior(), torch.randint(0, 64, (2, 16)), torch.tensor([0, 2]), bf16=True)
    assert "_CausalAttentionBackward" in names
    assert "_CausalAttentionBackward" not in _kernel_functions(_prior(attn_dropout=0.1), torch.randint(0, 64, (2, 16)),
                                                               torch.tensor([0, 2]), bf16=True)


def _prior(**overrides) -> GPT:
    torch.manual_seed(0)
    cfg = dict(codebook_size=64, grid_size=[4, 4], num_classes=3, n_layer=2, n_head=4, dim=64, multiple_of=16)
    return GPT(GPTConfig(**{**cfg, **overrides})).train()


def _kernel_functions(model: GPT, tokens, labels, bf16: bool = False) -> set[str]:
    """The names of the autograd functions in the graph of a forward (under bf16 autocast if asked)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(tokens, labels)
    seen, names, todo = set(), set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo += [f for f, _ in fn.next_functions]
    return names


def test_the_kernels_are_taken_in_a_cpu_training_step_only():
    prior = _prior()
    tokens, labels = torch.randint(0, 64, (2, 16)), torch.tensor([0, 2])
    kernels = {"_RopeQKVBackward", "_RMSNormBackward", "_SwiGLUBackward"}
    assert kernels <= _kernel_functions(prior, tokens, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels <= _kernel_functions(prior, tokens, labels)
    previous = fused.set_enabled(False)
    try:
        assert not kernels & _kernel_functions(prior, tokens, labels)
    finally:
        fused.set_enabled(previous)
    # with qk_norm, q and k are normed per head before RoPE: the torch ops rotate them
    assert "_RopeQKVBackward" not in _kernel_functions(_prior(qk_norm=True), tokens, labels)
    with torch.no_grad():  # inference: the torch ops (decoding has its own kernels)
        assert prior(tokens, labels).grad_fn is None
    # under torch.func the torch ops run (the kernels' functions define none of its rules): the same gradient
    prior.eval()  # (no class dropout: both calls see the same labels)
    params = dict(prior.named_parameters())

    def loss(p):
        logits = torch.func.functional_call(prior, p, (tokens, labels))
        return F.cross_entropy(logits.flatten(0, 1), tokens.flatten())

    grads = torch.func.grad(loss)(params)
    loss(params).backward()
    for name, p in params.items():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6)


def _five_steps(on: bool, bf16: bool) -> tuple[list[float], torch.Tensor]:
    """Five AdamW steps of a small prior (GQA, so q, k and v differ in heads) with the kernels on or off: the losses
    and the final weights as one vector."""
    prior = _prior(n_kv_head=2)
    opt = torch.optim.AdamW(prior.parameters(), lr=1e-3)
    tokens, labels = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0)), torch.arange(4) % 3
    losses = []
    previous = fused.set_enabled(on)
    try:
        for _ in range(5):
            torch.manual_seed(1)  # (the same class dropout in every run)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = prior(tokens, labels)
            loss = F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    finally:
        fused.set_enabled(previous)
    return losses, torch.cat([p.detach().flatten() for p in prior.parameters()])


def test_a_fp32_training_run_equals_the_unfused_one():
    (fused_losses, fused_weights), (losses, weights) = _five_steps(True, False), _five_steps(False, False)
    assert fused_losses == pytest.approx(losses, rel=1e-5)
    assert fused_losses[-1] < fused_losses[0]
    # (AdamW moves a weight by up to lr whatever its gradient's size: a rounding difference in a gradient near 0
    # may move it by a small fraction of lr = 1e-3)
    torch.testing.assert_close(fused_weights, weights, rtol=1e-5, atol=1e-5)


def test_a_bf16_training_run_differs_from_the_unfused_one_by_bf16_noise_only():
    """Calibrated in the same test: the kernels' bf16 run is no further from the unfused bf16 run than that one is
    from the fp32 run (bf16's own noise)."""
    fused_losses, fused_weights = _five_steps(True, True)
    losses, weights = _five_steps(False, True)
    fp32_losses, fp32_weights = _five_steps(False, False)
    noise = max(abs(a - b) for a, b in zip(losses, fp32_losses))
    assert max(abs(a - b) for a, b in zip(fused_losses, losses)) <= 2 * noise + 1e-4
    assert (fused_weights - weights).norm() <= 2 * (weights - fp32_weights).norm()
    assert fused_losses[-1] < fused_losses[0]


def _penalty_gradients(fn, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients of a gradient penalty |d(sum((fn(*inputs) * r)^2))/d inputs|^2 (a double backward, through the
    incoming gradients too) w.r.t. the inputs; r a fixed random weighting of the outputs."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    gen = torch.Generator().manual_seed(3)
    total = sum((o.float() * torch.randn(o.shape, generator=gen)).square().sum() for o in outputs)
    grads = torch.autograd.grad(total, inputs, create_graph=True)
    return torch.autograd.grad(sum(g.float().square().sum() for g in grads), inputs)


def test_a_double_backward_gets_the_torch_ops_second_derivatives():
    """A gradient penalty through each kernel (create_graph=True): its backward then runs the torch ops, so the
    second derivatives are theirs, not dropped terms (nor an error)."""
    gen = torch.Generator().manual_seed(0)
    H, K, D, n = 2, 1, 8, 3
    table = torch.randn(n, 2, D, generator=gen)
    qkv = torch.randn(2, n, (H + 2 * K) * D, generator=gen)
    x, weight = torch.randn(2, 3, 16, generator=gen), torch.rand(16, generator=gen) + 0.5
    a, b = torch.randn(40, generator=gen), torch.randn(40, generator=gen)
    cases = [(lambda t: fused._RopeQKV.apply(t, table, H, K, D),
              lambda t: fused._rope_reference(t, table, H, K, D, apply_rope), [qkv]),
             (lambda t, w: fused._RMSNorm.apply(t, w, 1e-5, torch.float32), lambda t, w: F.rms_norm(t, (16,), w, 1e-5),
              [x, weight]),
             (fused._SwiGLU.apply, lambda a, b: F.silu(a) * b, [a, b])]
    # (attention: torch's CPU flash backward has no backward, so neither side can do this; the kernel's function
    # hands the question to torch, and the error is torch's)
    heads = torch.randn(1, 2, 5, 8, generator=gen).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="not implemented"):
        _penalty_gradients(fused._CausalAttention.apply, [heads, heads, heads])
    for kernel, reference, inputs in cases:
        for got, want in zip(_penalty_gradients(kernel, inputs), _penalty_gradients(reference, inputs)):
            assert want.abs().max() > 0
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_a_weight_changed_in_place_after_the_forward_is_an_error():
    x = torch.randn(2, 3, 8, requires_grad=True)
    weight = torch.ones(8, requires_grad=True)
    y = fused.rms_norm(x, weight, 1e-5)
    assert y is not None
    with torch.no_grad():
        weight.mul_(2)  # changed after the forward saved it: autograd's version check, as for the torch ops
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_the_bf16_models_norm_rounds_as_its_torch_ops():
    """A bf16 model's RMSNorm (inference): the kernel rounds where the module's torch ops round (x * rstd to bf16,
    then times the weight), so at most the last bit differs, where rstd itself differs in its last bits."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 200, generator=gen) * 3 + 1).to(torch.bfloat16)
    weight = (torch.rand(200, generator=gen) + 0.5).to(torch.bfloat16)
    with torch.no_grad():
        got = fused.rms_norm(x, weight, 1e-5)
        assert got is not None and got.dtype == torch.bfloat16
        want = F.rms_norm(x.float(), (200,), None, 1e-5).type_as(x) * weight
    assert (got == want).float().mean() > 0.99
    torch.testing.assert_close(got, want, rtol=2**-7, atol=0)
    assert fused.rms_norm(x.requires_grad_(), weight, 1e-5) is None  # recorded by autograd: the torch ops


def _greedy_logits(prior: GPT, steps: int = 6) -> torch.Tensor:
    """The logits of a cached greedy decode of a few tokens (batch 3), stacked."""
    cache = prior.new_cache(3)
    logits = prior.forward_cached(None, 0, torch.tensor([0, 1, 2]), cache=cache)[:, -1]
    out = [logits]
    for pos in range(1, steps):
        logits = prior.forward_cached(logits.argmax(-1, keepdim=True), pos, cache=cache)[:, -1]
        out.append(logits)
    return torch.stack(out).float()


@pytest.mark.parametrize("dtype", DTYPES)
def test_eager_decoding_takes_the_kernels_forwards_and_gives_the_unfused_logits(dtype, monkeypatch):
    prior = _prior(n_kv_head=2).eval()
    with torch.no_grad():
        for p in prior.parameters():  # (a fresh prior's head is zero: its logits would all agree)
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    reference = _greedy_logits(prior) if dtype == torch.bfloat16 else None
    prior.to(dtype)
    calls: dict[str, int] = {}
    for op in ("rope", "glu", "norm"):  # built (and checked, which calls the forwards) before the counting
        assert fused.kernels(op, dtype) is not None
    norm_bf16 = fused._norm_bf16()

    def counted(name, fn):
        def call(*args):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args)
        return call

    for name in ("_rope_forward", "_glu_forward", "_norm_forward"):
        monkeypatch.setattr(fused, name, counted(name, getattr(fused, name)))
    monkeypatch.setattr(fused, "_norm_bf16", lambda: counted("bf16 norm", norm_bf16))
    with torch.no_grad():
        fused_logits = _greedy_logits(prior)
        counts, calls = calls, {}
        previous = fused.set_enabled(False)
        try:
            plain = _greedy_logits(prior)
        finally:
            fused.set_enabled(previous)
    norm = "bf16 norm" if dtype == torch.bfloat16 else "_norm_forward"
    # 6 steps x 2 layers: RoPE and SwiGLU once a layer, the norm twice a layer and once at the end
    assert counts == {"_rope_forward": 12, "_glu_forward": 12, norm: 30} and calls == {}
    if dtype == torch.float32:
        torch.testing.assert_close(fused_logits, plain, rtol=1e-5, atol=1e-5)
    else:  # bf16: no further from the fp32 model than the torch ops' bf16 rounding is
        ours, torchs = ((logits - reference).abs().max().item() for logits in (fused_logits, plain))
        assert ours <= 1.5 * torchs + 1e-3, (ours, torchs)
