"""The ViT encoder/decoder option of the tokenizer (architecture: vit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stage1_vq import QuantizerConfig, VQModel, VQModelConfig
from stage1_vq.train import TokenizerRunConfig, train_tokenizer
from vqgpt.ground.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def vit_config(patch_size: int = 8, **quantizer) -> VQModelConfig:
    if quantizer.get("kind", "vq") == "vq":  # FSQ's size is the product of its levels
        quantizer.setdefault("codebook_size", 64)
    return VQModelConfig(architecture="vit", patch_size=patch_size, vit_dim=32, vit_depth=2, vit_heads=4,
                         resolution=32, z_channels=16, quantizer=QuantizerConfig(**quantizer))


def images(batch: int = 2, height: int = 32, width: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=g) * 2 - 1


@pytest.mark.parametrize("patch_size", [4, 8])
def test_vit_shapes_and_other_sizes(patch_size):
    torch.manual_seed(0)
    model = VQModel(vit_config(patch_size)).eval()
    grid = 32 // patch_size
    assert model.downsample_factor == patch_size
    x = images()
    out = model(x)
    assert out.reconstruction.shape == x.shape
    assert out.quantizer.indices.shape == (2, grid, grid)
    # larger and non-square images than trained: positions are resampled
    wide = images(height=32, width=64)
    assert model.encode(wide).shape == (2, grid, 2 * grid)
    assert model.decode(model.encode(wide)).shape == wide.shape
    with pytest.raises(ValueError, match=f"downsampling factor {patch_size}"):
        model.encode(images(height=32, width=32 + patch_size // 2 + 1))


@pytest.mark.parametrize("quantizer", [dict(), dict(codebook_dim=4, l2_norm=True), dict(kind="fsq", fsq_levels=[4, 3, 3])])
def test_vit_gradients_reach_the_encoder_and_last_layer(quantizer):
    torch.manual_seed(0)
    model = VQModel(vit_config(**quantizer)).train()
    x = images()
    F.mse_loss(model(x).reconstruction, x).backward()
    assert model.encoder.patch_embed.weight.grad.abs().sum() > 0
    assert model.last_layer_weight is model.decoder.to_pixels.weight
    assert model.last_layer_weight.grad.abs().sum() > 0


def test_vit_decoder_puts_each_token_in_its_own_patch():
    torch.manual_seed(0)
    model = VQModel(vit_config(patch_size=8)).eval()
    decoder = model.decoder
    with torch.no_grad():  # residual branches off: each output patch can only see its own token
        for block in decoder.blocks:
            for layer in (block.attn.proj, block.mlp.fc2):
                layer.weight.zero_()
                layer.bias.zero_()
        z = torch.randn(1, 16, 4, 4)
        base = decoder(z)
        z[0, :, 1, 2] += 1.0  # token at row 1, column 2
        changed = (decoder(z) - base).abs().sum(1)[0] > 1e-6  # (32, 32)
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[8:16, 16:24] = True
    assert torch.equal(changed, expected)


def test_vit_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = VQModel(vit_config(codebook_dim=4, l2_norm=True)).eval()
    model.save_pretrained(tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["config"]["architecture"] == "vit"
    loaded = VQModel.from_pretrained(tmp_path / "export")
    assert loaded.config == model.config
    x = images(seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(x).reconstruction, model(x).reconstruction)


def test_vit_bad_config_values():
    with pytest.raises(ValueError, match="architecture"):
        VQModelConfig(architecture="swin")
    with pytest.raises(ValueError, match="divisible by vit_heads"):
        VQModelConfig(architecture="vit", vit_dim=30, vit_heads=4)
    with pytest.raises(ValueError, match="multiple of patch_size 16"):
        VQModelConfig(architecture="vit", patch_size=16, resolution=40)


def test_vit_tokenizer_trains_from_the_config(tmp_path):
    cfg = load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml", overrides=[
        "model.architecture=vit", "model.patch_size=4", "model.vit_dim=32", "model.vit_depth=1", "model.vit_heads=2",
        "train.steps=30", "train.checkpoint_every=0", "train.log_every=5", "loss.disc_start=1000"])
    export = train_tokenizer(cfg, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["rec_loss"] for r in records if "rec_loss" in r]
    assert losses[-1] < 0.8 * losses[0]
    assert VQModel.from_pretrained(export).config.architecture == "vit"
