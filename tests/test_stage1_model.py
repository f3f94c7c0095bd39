"""VQModel: shapes, gradients through the quantizer, index/code consistency, export round trip, errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from stage1_vq import QuantizerConfig, VQModel, VQModelConfig
from stage1_vq.modules import AttnBlock
from vqgpt.ground.config import ConfigError, from_dict



def tiny_config(channel_mult=(1, 2), attn=(16,), **quantizer) -> VQModelConfig:
    if quantizer.get("kind", "vq") == "vq":  # FSQ's size is the product of its levels
        quantizer.setdefault("codebook_size", 64)
    return VQModelConfig(channels=32, channel_mult=list(channel_mult), num_res_blocks=1, attn_resolutions=list(attn),
                         resolution=32, z_channels=32, quantizer=QuantizerConfig(**quantizer))


def images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


QUANTIZERS = {
    "vq": dict(),
    "vq-l2": dict(l2_norm=True),
    "vq-lowdim": dict(codebook_dim=4, l2_norm=True),  # LlamaGen-style: 8-dim l2 codes in a 256-ch model
    "vq-ema": dict(ema=True),
    "fsq": dict(kind="fsq", fsq_levels=[4, 3, 3]),
}


@pytest.mark.parametrize("channel_mult, factor", [((1, 2, 2), 4), ((1, 1, 2, 2), 8), ((1, 1, 2, 2, 4), 16)])
def test_shapes_for_downsampling_factors(channel_mult, factor):
    torch.manual_seed(0)
    model = VQModel(tiny_config(channel_mult=channel_mult, attn=(32 // factor,))).eval()
    x = images(size=32)
    out = model(x)
    grid = 32 // factor
    assert model.downsample_factor == factor
    assert out.reconstruction.shape == x.shape
    assert out.quantizer.indices.shape == (2, grid, grid)
    assert out.quantizer.z_q.shape == (2, 32, grid, grid)
    assert model.encode(x).shape == (2, grid, grid)
    assert model.decode(model.encode(x)).shape == x.shape
    # a non-square image that the factor divides also works
    assert model.encode(images(size=32)[..., : 32 - factor]).shape == (2, grid, grid - 1)


@pytest.mark.parametrize("name", ["vq", "vq-rotation", "vq-l2", "fsq"])
def test_gradients_reach_the_encoder(name):
    torch.manual_seed(0)
    options = dict(QUANTIZERS.get(name, {}))
    if name == "vq-rotation":
        options = dict(rotation_trick=True)
    model = VQModel(tiny_config(**options)).train()
    x = images()
    out = model(x)
    loss = F.mse_loss(out.reconstruction, x) + out.quantizer.loss
    loss.backward()
    grad = model.encoder.conv_in.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    # the reconstruction term alone (no quantizer loss) must also reach the encoder
    model.zero_grad()
    F.mse_loss(model(x).reconstruction, x).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_codes_from_indices_equal_quantized_latents(name):
    torch.manual_seed(0)
    model = VQModel(tiny_config(**QUANTIZERS[name])).eval()
    x = images(batch=3)
    with torch.no_grad():
        z = model.encode_latents(x)
        q = model.quantize(z)
        codes = model.codes_from_indices(q.indices)
    assert codes.shape == q.z_q.shape
    torch.testing.assert_close(codes, q.z_q, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.encode(x), q.indices)
    # decode(indices) is the reconstruction of the forward pass
    torch.testing.assert_close(model.decode(q.indices), model(x).reconstruction, atol=1e-4, rtol=1e-4)


def test_encode_changes_no_training_state():
    torch.manual_seed(0)
    model = VQModel(tiny_config(ema=True, restart_threshold=0.5)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.encode(images())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    model(images())  # a training forward does move the EMA state
    assert not torch.equal(before["quantize.cluster_size"], model.state_dict()["quantize.cluster_size"])


@pytest.mark.parametrize("name", ["vq", "vq-ema", "fsq"])
def test_save_load_round_trip(tmp_path, name):
    torch.manual_seed(0)
    options = dict(QUANTIZERS[name])
    if name == "vq-ema":
        options.update(kmeans_init=True, restart_threshold=0.1)
    model = VQModel(tiny_config(**options))
    model.train()
    model(images(seed=1))  # move EMA / k-means state away from its initial values
    model.eval()
    model.save_pretrained(tmp_path / "export")
    meta = json.loads((tmp_path / "export" / "config.json").read_text())
    assert meta["kind"] == "vq_tokenizer"
    loaded = VQModel.from_pretrained(tmp_path / "export")
    assert not loaded.training
    assert loaded.config == model.config
    x = images(seed=2)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), model.encode(x))
        assert torch.equal(loaded(x).reconstruction, model(x).reconstruction)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_from_pretrained_is_strict(tmp_path):
    from safetensors.torch import load_file, save_file

    VQModel(tiny_config()).save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["quantize.embedding.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match="quantize.embedding.weight"):
        VQModel.from_pretrained(tmp_path)


def test_taming_key_names():
    model = VQModel(tiny_config(channel_mult=(1, 2, 2), attn=(8,)))
    keys = set(model.state_dict())
    expected = {
        "encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.1.downsample.conv.weight", "encoder.down.2.attn.0.proj_out.weight",
        "encoder.mid.block_1.norm1.weight", "encoder.mid.attn_1.q.weight", "encoder.mid.block_2.conv2.weight",
        "encoder.norm_out.weight", "encoder.conv_out.weight",
        "decoder.conv_in.weight", "decoder.mid.attn_1.k.weight", "decoder.up.2.block.1.conv1.weight",
        "decoder.up.2.attn.1.v.weight", "decoder.up.2.upsample.conv.weight", "decoder.up.1.upsample.conv.weight",
        "decoder.up.0.block.1.norm2.weight", "decoder.norm_out.weight", "decoder.conv_out.weight",
        "quant_conv.weight", "post_quant_conv.weight", "quantize.embedding.weight",
    }
    assert expected <= keys
    # the lowest decoder level has no upsample and a plain VQ stores nothing beyond the codebook
    assert not any(k.startswith("decoder.up.0.upsample") for k in keys)
    assert not any(k.startswith("encoder.down.2.downsample") for k in keys)
    assert {k for k in keys if k.startswith("quantize.")} == {"quantize.embedding.weight"}
    assert model.last_layer_weight is model.decoder.conv_out.weight


def test_attention_matches_taming_formula():
    torch.manual_seed(0)
    block = AttnBlock(32).eval()
    x = torch.randn(2, 32, 5, 3)
    h = block.norm(x)
    q, k, v = block.q(h).flatten(2), block.k(h).flatten(2), block.v(h).flatten(2)  # (B, C, N)
    weights = torch.softmax(q.transpose(1, 2) @ k * 32 ** -0.5, dim=2)  # (B, N_q, N_k)
    manual = x + block.proj_out((v @ weights.transpose(1, 2)).reshape(x.shape))
    torch.testing.assert_close(block(x), manual, atol=1e-5, rtol=1e-5)


def test_bad_image_size_names_valid_sizes():
    model = VQModel(tiny_config(channel_mult=(1, 2, 2), attn=(8,)))
    with pytest.raises(ValueError, match=r"30x32.*multiples of 4.*28 or 32"):
        model(images()[..., :30, :])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.zeros(1, 1, 32, 32))


def test_bad_config_values_give_clear_errors():
    with pytest.raises(ConfigError, match="'foo'"):
        from_dict(VQModelConfig, {"quantizer": {"kind": "foo"}})
    with pytest.raises(ValueError, match="kind"):
        QuantizerConfig(kind="not-a-kind")
    with pytest.raises(ValueError, match="ema.* only to kind 'vq'"):
        QuantizerConfig(kind="fsq", ema=True)
    with pytest.raises(ValueError, match="attn_resolutions"):
        VQModelConfig(resolution=32, channel_mult=[1, 2], attn_resolutions=[7], channels=32)
    with pytest.raises(ValueError, match="norm_groups"):
        VQModelConfig(channels=16)


def test_fsq_codebook_size_is_derived():
    cfg = from_dict(VQModelConfig, {"quantizer": {"kind": "fsq", "fsq_levels": [8, 5, 5, 5]}})
    assert cfg.quantizer.codebook_size == 1000
    model = VQModel(tiny_config(kind="fsq", fsq_levels=[8, 5, 5, 5]))
    assert model.codebook_size == 1000 and model.codebook_dim == 4


def test_decode_rejects_out_of_range_indices():
    model = VQModel(tiny_config()).eval()
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        model.decode(torch.full((1, 16, 16), 64))
    with pytest.raises(ValueError, match="integer"):
        model.decode(torch.zeros(1, 16, 16))


def test_an_export_written_before_the_newer_quantizer_keys_still_loads(tmp_path):
    # Exports written before SimVQ / the entropy penalty / LFQ / residual VQ lack those keys; they
    # meant "off" (or an unused kind's setting), so they load, and give the same reconstruction.
    torch.manual_seed(0)
    model = VQModel(tiny_config(l2_norm=True)).eval()
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    newer = ("simvq", "entropy_weight", "entropy_temperature", "lfq_dim", "lfq_temperature",
             "lfq_sample_entropy_weight", "lfq_codebook_entropy_weight", "rvq_depth", "rvq_shared_codebook")
    for key in newer:
        del meta["config"]["quantizer"][key]
    (tmp_path / "config.json").write_text(json.dumps(meta))
    loaded = VQModel.from_pretrained(tmp_path)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(images).reconstruction, model(images).reconstruction)
    # ... while a key that always existed is still required
    del meta["config"]["quantizer"]["beta"]
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="quantizer.beta"):
        VQModel.from_pretrained(tmp_path)


def test_an_export_with_an_unknown_top_level_key_is_refused_by_name(tmp_path):
    # A misspelt section ('extras' for 'extra') would otherwise be dropped without a word: the
    # class names or the tokenizer fingerprint it holds would be lost on load.
    VQModel(tiny_config()).save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["extras"] = meta.pop("extra")
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"config.json: unknown top-level key\(s\) extras"):
        VQModel.from_pretrained(tmp_path)
