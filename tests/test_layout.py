"""The conv decoder's memory layout is chosen (stage1_vq.modules.DECODER_MEMORY_FORMAT: channels-last), the same in
training and in decoding from indices whatever the quantizer hands over, and it does not change the reconstruction."""

import pytest
import torch

import stage1_vq.model as model_module
from stage1_vq.model import VQModel, VQModelConfig
from stage1_vq.quantizers import QuantizerConfig


def tiny_model(kind: str = "vq") -> VQModel:
    torch.manual_seed(0)
    quantizer = QuantizerConfig(kind="vq", codebook_size=32) if kind == "vq" else \
        QuantizerConfig(kind="fsq", codebook_size=None, fsq_levels=[4, 4, 2])
    cfg = VQModelConfig(channels=32, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], resolution=16,
                        z_channels=16, norm_groups=8, quantizer=quantizer)
    return VQModel(cfg).eval()


def decoder_input_layout(model: VQModel, run, bf16: bool) -> str:
    seen = []
    hook = model.decoder.conv_in.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        run()
    hook.remove()
    (x,) = seen
    if x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "contiguous" if x.is_contiguous() else "other"


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("kind", ["vq", "fsq"])
def test_decoder_layout_is_chosen_not_inherited(kind, bf16):
    # Training passes the quantizer's permuted view, decoding from indices a fresh NCHW tensor: both
    # reach the decoder channels-last.
    model = tiny_model(kind)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    codes = model.encode(images)
    assert decoder_input_layout(model, lambda: model(images), bf16) == "channels_last"
    assert decoder_input_layout(model, lambda: model.decode(codes), bf16) == "channels_last"


def test_layout_does_not_change_the_reconstruction(monkeypatch):
    model = tiny_model()
    codes = torch.randint(0, 32, (2, 8, 8))
    chosen = model.decode(codes)
    monkeypatch.setattr(model_module, "DECODER_MEMORY_FORMAT", torch.contiguous_format)
    other = model.decode(codes)
    torch.testing.assert_close(chosen, other, rtol=1e-5, atol=1e-5)
