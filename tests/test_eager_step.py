"""The eager decode step that calls the prior's kernels directly (stage2_prior.eager_step)."""

import pytest
import torch

from prior_helpers import seeded, tiny_gpt
from stage2_prior import GPT, SamplingConfig, complete, generate
from stage2_prior import eager_step as eager
from stage2_prior import fused
from stage2_prior import sampling
from stage2_prior.layers import Linear
from stage2_prior.quantize import set_prior_dtype

KINDS = ["float32", "bfloat16", "int8"]


def _prior(kind: str, **overrides) -> GPT:
    model = tiny_gpt(grid_size=[3, 4], n_layer=2, n_kv_head=1, **overrides)
    return set_prior_dtype(model, kind).eval()


def _steps(model: GPT, step, tokens: torch.Tensor, labels: torch.Tensor):
    """Logits of slots 1..n fed ``tokens`` (B, n) one at a time, by ``step`` (None: forward_cached), and the cache."""
    with torch.inference_mode():
        cache = model.new_cache(tokens.shape[0])
        model.forward_cached(None, 0, labels, cache=cache)
        out = []
        for pos in range(1, tokens.shape[1] + 1):
            fed = tokens[:, pos - 1: pos]
            out.append(step(fed, pos, cache) if step is not None else model.forward_cached(fed, pos, cache=cache))
            assert cache.filled == pos + 1
    return torch.cat(out, 1), cache


@pytest.mark.parametrize("kind", KINDS)
def test_the_eager_step_gives_forward_cached_bit_for_bit(kind):
    """float32, bfloat16 and int8 priors (grouped KV heads): the step's logits and the cache slots it writes are
    forward_cached's, exactly (the same kernels on the same operands)."""
    model = _prior(kind)
    with torch.inference_mode():
        step = eager.eager_step(model)
    assert step is not None
    tokens = torch.randint(0, 16, (3, 11), generator=seeded(0))
    labels = torch.tensor([0, 1, 2])
    want, want_cache = _steps(model, None, tokens, labels)
    got, got_cache = _steps(model, step, tokens, labels)
    assert got.shape == want.shape == (3, 11, 16) and got.dtype == torch.float32
    assert torch.equal(got, want)
    for a, b in zip(got_cache.keys + got_cache.values, want_cache.keys + want_cache.values):
        assert torch.equal(a[:, :, :12], b[:, :, :12])


@pytest.mark.parametrize("kind", KINDS)
def test_samplers_decode_through_the_eager_step_with_the_same_tokens(kind, monkeypatch):
    """generate and complete call forward_cached for their prefills only and take the eager step for every
    one-token step, with guidance too; the tokens are those of the module path (the step switched off)."""
    model = _prior(kind)
    calls = []
    real = GPT.forward_cached
    monkeypatch.setattr(GPT, "forward_cached", lambda self, *a, **k: calls.append(a[1]) or real(self, *a, **k))
    guided = SamplingConfig(cfg_scale=2.0, top_k=8)
    fast = generate(model, 2, class_labels=[0, 2], sampling=guided, generator=seeded(3))
    assert calls == [0]  # the prefix; the 11 steps after it took the eager step
    known = torch.zeros(2, 3, 4, dtype=torch.bool)
    known[:, 0] = True
    calls.clear()
    completed = complete(model, fast, known, class_labels=[0, 2], generator=seeded(4))
    assert calls == [0]  # one prefill of the known row, then steps
    monkeypatch.setattr(sampling, "eager_step", lambda model: None)
    assert torch.equal(generate(model, 2, class_labels=[0, 2], sampling=guided, generator=seeded(3)), fast)
    monkeypatch.setattr(eager, "EagerStep", lambda *a: None)  # (complete builds it through eager_step)
    calls.clear()
    assert torch.equal(complete(model, fast, known, class_labels=[0, 2], generator=seeded(4)), completed)
    assert len(calls) > 1


def test_the_eager_step_is_not_made_where_the_modules_would_differ():
    """A forward hook (on a module or global), QK-norm, a subclassed layer, a model in training mode or the fused
    kernels switched off: no eager step (the samplers then call the modules); the hook sees every step of a
    sampling call."""
    model = _prior("float32")
    seen = []
    handle = model.layers[1].feed_forward.w2.register_forward_hook(lambda *a: seen.append(1))
    with torch.inference_mode():
        assert eager.eager_step(model) is None
    generate(model, 1, class_labels=[1], generator=seeded(0))
    assert len(seen) == 12  # the prefix and 11 steps
    handle.remove()
    global_handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert eager.eager_step(model) is None
    finally:
        global_handle.remove()
    assert eager.eager_step(model) is not None
    assert eager.eager_step(_prior("float32", qk_norm=True)) is None

    class Scaled(Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    wrapped = _prior("float32")
    old = wrapped.layers[0].attention.wo
    wrapped.layers[0].attention.wo = Scaled(old.in_features, old.out_features, bias=False)
    assert eager.eager_step(wrapped) is None
    assert eager.eager_step(_prior("float32").train()) is None
    previous = fused.set_enabled(False)  # the fused kernels switched off: the modules' torch ops
    try:
        assert eager.eager_step(model) is None
    finally:
        fused.set_enabled(previous)


def test_a_step_outside_inference_takes_the_modules_and_bad_inputs_are_refused(monkeypatch):
    """With gradients on, under CPU autocast or for more rows than the few-row products take, the step calls
    forward_cached (same values); a slot before 1, a batch that is not the cache's and codes out of range are
    refused as forward_cached refuses them."""
    model = _prior("float32")
    step = eager.eager_step(model)
    tokens = torch.randint(0, 16, (2, 3), generator=seeded(1))
    labels = torch.tensor([0, 1])
    want, _ = _steps(model, None, tokens, labels)
    calls = []
    real = GPT.forward_cached
    monkeypatch.setattr(GPT, "forward_cached", lambda self, *a, **k: calls.append(a[1]) or real(self, *a, **k))
    cache = model.new_cache(2)
    with torch.no_grad():
        model.forward_cached(None, 0, labels, cache=cache)
    got = [step(tokens[:, :1], 1, cache)]  # gradients on: the modules
    monkeypatch.setattr(Linear, "max_packed_rows", 1)
    with torch.no_grad():
        got.append(step(tokens[:, 1:2], 2, cache))  # 2 rows, over the few-row products' 1: the modules
    monkeypatch.undo()
    assert calls == [0, 1, 2]
    torch.testing.assert_close(torch.cat(got, 1).detach(), want[:, :2])
    monkeypatch.setattr(GPT, "forward_cached", lambda self, *a, **k: calls.append(a[1]) or real(self, *a, **k))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        step(tokens[:, 2:3], 3, cache)  # autocast: the modules (bf16 products)
    assert calls == [0, 1, 2, 3]
    with torch.inference_mode():
        with pytest.raises(ValueError, match="pos >= 1"):
            step(tokens[:, :1], 0, cache)
        with pytest.raises(ValueError, match="batch 1 does not match the cache batch 2"):
            step(tokens[:1, :1], 4, cache)
        with pytest.raises(ValueError, match=r"tokens must lie in \[0, 16\)"):
            step(torch.full((2, 1), 16), 4, cache)
        with pytest.raises(ValueError, match="past the 4 slot"):
            step(tokens[:, :1], 9, cache)


def test_quantizing_keeps_the_layers_train_or_eval_mode():
    """quantize_int8's Int8Linear layers take the mode of the layers they replace (an eval prior stays all eval)."""
    model = set_prior_dtype(tiny_gpt(), "int8")
    assert not any(m.training for m in model.modules())
