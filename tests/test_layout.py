"""The conv encoder's and decoder's memory layout is chosen per device and dtype
(stage1_vq.modules.conv_memory_format: NCHW for bf16 on a CPU with bf16 units where the fused norm kernel does
not build, channels-last otherwise), the same in training and in decoding from indices whatever the quantizer
hands over, and it does not change the outputs beyond rounding."""

import pytest
import torch

import stage1_vq.modules as modules
from stage1_vq.model import VQModel, VQModelConfig
from stage1_vq.quantizers import QuantizerConfig


def tiny_model(kind: str = "vq") -> VQModel:
    torch.manual_seed(0)
    quantizer = QuantizerConfig(kind="vq", codebook_size=32) if kind == "vq" else \
        QuantizerConfig(kind="fsq", codebook_size=None, fsq_levels=[4, 4, 2])
    cfg = VQModelConfig(channels=32, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], resolution=16,
                        z_channels=16, norm_groups=8, quantizer=quantizer)
    return VQModel(cfg).eval()


def input_layouts(model: VQModel, run, bf16: bool) -> list[str]:
    """The layout of each input the encoder's and the decoder's first conv received while ``run`` ran."""
    seen = []
    hooks = [conv.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
             for conv in (model.encoder.conv_in, model.decoder.conv_in)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        run()
    for hook in hooks:
        hook.remove()
    return ["channels_last" if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            else "contiguous" if x.is_contiguous() else "other" for x in seen]


@pytest.mark.parametrize(("bf16", "fast_bf16", "fused", "expected"), [
    (False, True, True, "channels_last"), (False, False, True, "channels_last"),
    (True, True, True, "channels_last"),  # bf16 units and the fused norm kernel: channels-last
    (True, True, False, "contiguous"),  # bf16 units, no fused norm: NCHW
    (True, False, True, "channels_last"), (True, False, False, "channels_last"),  # bf16 emulated: channels-last
])
@pytest.mark.parametrize("kind", ["vq", "fsq"])
def test_conv_layout_is_chosen_per_dtype_not_inherited(kind, bf16, fast_bf16, fused, expected, monkeypatch):
    # Training passes the quantizer's permuted view, decoding from indices a fresh NCHW tensor, encoding
    # the caller's images: each conv stack gets the layout chosen for the dtype and the CPU.
    monkeypatch.setattr(modules, "_fast_bf16_cpu", lambda: fast_bf16)
    monkeypatch.setattr(modules, "_fused_bf16_norm", lambda: fused)
    model = tiny_model(kind)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    codes = model.encode(images)
    assert input_layouts(model, lambda: model(images), bf16) == [expected, expected]
    assert input_layouts(model, lambda: model.decode(codes), bf16) == [expected]
    assert input_layouts(model, lambda: model.encode(images.contiguous(memory_format=torch.channels_last)),
                         bf16) == [expected]


def test_bf16_tensors_choose_like_bf16_autocast(monkeypatch):
    monkeypatch.setattr(modules, "_fast_bf16_cpu", lambda: True)
    monkeypatch.setattr(modules, "_fused_bf16_norm", lambda: False)
    assert modules.conv_memory_format(torch.zeros(1, 2, 3, 3, dtype=torch.bfloat16)) == torch.contiguous_format
    assert modules.conv_memory_format(torch.zeros(1, 2, 3, 3)) == torch.channels_last


@pytest.mark.parametrize("forced", [torch.contiguous_format, torch.channels_last])
def test_layout_does_not_change_the_outputs(forced, monkeypatch):
    model = tiny_model()
    codes = torch.randint(0, 32, (2, 8, 8))
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    chosen_decode, chosen = model.decode(codes), model(images)
    monkeypatch.setattr(modules, "CONV_MEMORY_FORMAT", forced)
    assert input_layouts(model, lambda: model(images), False) == 2 * [
        "contiguous" if forced == torch.contiguous_format else "channels_last"]
    torch.testing.assert_close(model.decode(codes), chosen_decode, rtol=1e-5, atol=1e-5)
    forced_out = model(images)
    torch.testing.assert_close(forced_out.reconstruction, chosen.reconstruction, rtol=1e-5, atol=1e-5)
    assert torch.equal(forced_out.quantizer.indices, chosen.quantizer.indices)
