"""The fused GroupNorm + SiLU kernel of channels-last CPU maps (stage1_vq.norm_silu): the same values and
gradients as the two ops, where it is taken and where not, and a tokenizer training step through it."""

import copy

import pytest
import torch
import torch.nn.functional as F

import stage1_vq.modules as modules
import stage1_vq.norm_silu as norm_silu
from stage1_vq.model import VQModel, VQModelConfig
from stage1_vq.quantizers import QuantizerConfig


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernels_build_here(dtype):
    assert norm_silu.kernels(dtype) is not None  # x86 with AVX2 or AVX-512, as the development and CI machines


def _grads(x, weight, bias, dy, groups, fused):
    x, weight, bias = (t.detach().requires_grad_() for t in (x, weight, bias))
    if fused:
        y = norm_silu._NormSiLU.apply(x, weight, bias, groups, 1e-6)
    else:
        y = F.silu(F.group_norm(x, groups, weight, bias, 1e-6))
    y.backward(dy)
    return [y.double(), x.grad.double(), weight.grad.double(), bias.grad.double()]


def _relative_errors(got, want):
    return [((g - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want)]


@pytest.mark.parametrize("shape,groups", [((3, 64, 20, 17), 32), ((2, 128, 5, 3), 8), ((2, 32, 1, 1), 8),
                                          ((2, 48, 7, 5), 16), ((3, 24, 6, 4), 8), ((2, 6, 3, 3), 2)],
                         ids=["340 pixels (a block of 256 and a rest)", "8 groups of 16", "one pixel",
                              "48 channels", "24 channels", "6 channels"])  # (a step is 16 or 32 channels)
def test_values_and_gradients_equal_the_two_ops(shape, groups):
    """Against F.silu(F.group_norm(...)) in float64 on maps whose channels have unequal means (the variance is
    taken about the mean, not as E[x^2] - E[x]^2): float32 to its rounding; bfloat16 no further from float64
    than the two ops in bfloat16 are (its arithmetic is fp32, rounded once)."""
    gen = torch.Generator().manual_seed(0)
    channels = shape[1]
    x = torch.randn(shape, generator=gen) * 2 + torch.linspace(-6, 6, channels)[:, None, None]
    weight, bias = torch.rand(channels, generator=gen) + 0.5, torch.randn(channels, generator=gen)
    dy = torch.randn(shape, generator=gen)
    want = _grads(*(t.double() for t in (x, weight, bias, dy)), groups, fused=False)
    last = torch.channels_last
    fp32 = _grads(x.contiguous(memory_format=last), weight, bias, dy.contiguous(memory_format=last), groups, True)
    assert max(_relative_errors(fp32, want)) < 1e-5
    x16, dy16 = (t.to(torch.bfloat16).contiguous(memory_format=last) for t in (x, dy))
    want16 = _grads(*(t.double() for t in (x16, weight, bias, dy16)), groups, fused=False)  # of the rounded map
    fused = _relative_errors(_grads(x16, weight, bias, dy16, groups, True), want16)
    unfused = _relative_errors(_grads(x16, weight, bias, dy16, groups, False), want16)
    assert all(f <= max(u, 1e-5) * 1.5 for f, u in zip(fused, unfused)), (fused, unfused)


def test_the_kernel_is_taken_for_channels_last_maps_only(monkeypatch):
    assert norm_silu.kernels(torch.float32) is not None  # built (and checked) before apply is watched
    taken = []
    real = norm_silu._NormSiLU.apply
    monkeypatch.setattr(norm_silu._NormSiLU, "apply", lambda *args: taken.append(args[0].shape) or real(*args))
    norm = torch.nn.GroupNorm(32, 64, eps=1e-6)
    x = torch.randn(4, 64, 6, 6)
    last = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(norm_silu.norm_silu(norm, last), F.silu(norm(x)), rtol=1e-5, atol=1e-5)
    assert taken == [(4, 64, 6, 6)]
    norm_silu.norm_silu(norm, x)  # NCHW: the two ops
    norm_silu.norm_silu(norm, torch.randn(4, 64, 1, 1))  # both layouts at once: the two ops
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    norm_silu.norm_silu(norm, last)  # fewer samples than threads: the two ops, which split each sample
    assert taken == [(4, 64, 6, 6)]
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    odd = torch.nn.GroupNorm(2, 6)
    six = torch.randn(8, 6, 3, 3)
    torch.testing.assert_close(norm_silu.norm_silu(odd, six.contiguous(memory_format=torch.channels_last)),
                               F.silu(odd(six)), rtol=1e-5, atol=1e-5)
    assert taken == [(4, 64, 6, 6), (8, 6, 3, 3)]  # any channel count (a rest after the kernel's steps)
    # a map of other channels than the norm's: the norm's own error (the kernel read past the weight)
    with pytest.raises(RuntimeError, match="weight"):
        norm_silu.norm_silu(norm, torch.randn(4, 96, 3, 3).contiguous(memory_format=torch.channels_last))
    with pytest.raises(RuntimeError, match="weight"):
        norm_silu.norm_silu(torch.nn.GroupNorm(8, 64), torch.randn(4, 32, 3, 3).contiguous(
            memory_format=torch.channels_last))
    assert len(taken) == 2


def test_a_channels_last_training_step_equals_the_unfused_one(monkeypatch):
    """The conv tokenizer's loss and every gradient, channels-last, with the kernel and without it."""
    torch.manual_seed(0)
    cfg = VQModelConfig(channels=32, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], resolution=16,
                        z_channels=16, norm_groups=8, quantizer=QuantizerConfig(kind="vq", codebook_size=32))
    model = VQModel(cfg).train()
    twin = copy.deepcopy(model)  # (a step changes the quantizer's state: each path steps its own copy)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    monkeypatch.setattr(modules, "CONV_MEMORY_FORMAT", torch.channels_last)
    assert norm_silu.kernels(torch.float32) is not None  # built (and checked) before apply is watched
    taken = []
    real = norm_silu._NormSiLU.apply
    monkeypatch.setattr(norm_silu._NormSiLU, "apply", lambda *args: taken.append(1) or real(*args))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)

    def step(net):
        out = net(images)
        loss = (out.reconstruction - images).abs().mean() + out.quantizer.loss
        loss.backward()
        return [loss.detach()] + [p.grad for p in net.parameters() if p.grad is not None]

    fused = step(model)
    blocks = sum(isinstance(m, modules.ResnetBlock) for m in model.modules())
    assert len(taken) == 2 * blocks + 2  # two in each ResnetBlock, and the encoder's and decoder's output norms
    monkeypatch.setattr(norm_silu, "_usable", lambda norm, x: False)
    unfused = step(twin)
    assert len(fused) == len(unfused) > 1
    for a, b in zip(fused, unfused):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad])
def test_first_use_under_inference_mode_or_no_grad(mode, monkeypatch):
    """Encoding runs under inference_mode: the kernels' first-use check (a backward) failed there with 'Inference
    tensors cannot be saved for backward', and every tokenizer command with it (found by a hostile probe)."""
    monkeypatch.setattr(norm_silu, "_BUILT", {})  # as in a new process: built and checked at this call
    norm = torch.nn.GroupNorm(8, 64, eps=1e-6)
    x = torch.randn(4, 64, 5, 5).contiguous(memory_format=torch.channels_last)
    with mode():
        got = norm_silu.norm_silu(norm, x)
        want = F.silu(norm(x))
    assert norm_silu._BUILT[torch.float32] is not None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_what_the_kernel_cannot_do_is_refused_or_left_to_the_two_ops():
    """From a probe of the kernel: a double backward dropped every second-order term through it without a word
    (then an error where the incoming gradient required grad, and still dropped where it did not; now the backward
    runs the two ops when asked for a graph, so a gradient penalty gets their second derivatives); torch.func's
    transforms failed on it (now the two ops run); a bf16 weight changed in place between forward and backward
    went unnoticed (its fp32 copy was saved; now the weight itself)."""
    norm = torch.nn.GroupNorm(8, 32, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.normal_()
    x = torch.randn(4, 32, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    conv = torch.nn.Conv2d(32, 32, 1).to(memory_format=torch.channels_last)  # (a gradient penalty's shape)
    penalties = []
    for fn in (lambda t: norm_silu.norm_silu(norm, t), lambda t: F.silu(norm(t))):
        for outer in (lambda y: y.pow(2).sum(), lambda y: y.sum()):  # (the incoming gradient with and without a graph)
            x.grad, norm.weight.grad = None, None
            (grad,) = torch.autograd.grad(outer(fn(conv(x))), x, create_graph=True)
            grad.pow(2).sum().backward()
            penalties.append((x.grad.clone(), norm.weight.grad.clone()))
    for got, want in zip(penalties[:2], penalties[2:]):
        assert want[0].abs().max() > 0
        for g, w in zip(got, want):  # (the kernel's first-order values differ from the two ops' in the last bits)
            torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-5)
    want = torch.func.grad(lambda t: F.silu(norm(t)).sum())(x.detach())
    torch.testing.assert_close(torch.func.grad(lambda t: norm_silu.norm_silu(norm, t).sum())(x.detach()), want)
    stacked = x.detach().unsqueeze(1).expand(4, 2, 32, 5, 5)
    assert torch.func.vmap(lambda t: norm_silu.norm_silu(norm, t))(stacked).shape == (4, 2, 32, 5, 5)
    half = torch.nn.GroupNorm(8, 32).to(torch.bfloat16)
    y = norm_silu.norm_silu(half, x.detach().to(torch.bfloat16).contiguous(memory_format=torch.channels_last))
    with torch.no_grad():
        half.weight.mul_(3)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
