"""Importing taming-transformers VQGANs: a PL-style last.ckpt in taming's exact key layout (built here
from taming's construction rules, random values) is converted, round-trips, and encodes/decodes like
an independent re-implementation of taming's forward math written below."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
import yaml

from vq_reference import StateShapes, attn_block, conv, group_norm, rel_err, res_block, swish
from stage1_vq.model import VQModel, VQModelConfig
from vqgpt.ground.checkpoint import load_export, read_export_meta
from vqgpt.ground.config import ConfigError
from vqgpt.workflow.importers import KeyMismatchError
from vqgpt.workflow.importers.taming import import_taming

DDCONFIG = dict(double_z=False, z_channels=8, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1, 2],
                num_res_blocks=1, attn_resolutions=[8, 3], dropout=0.0)  # 3 matches no level: ignored, as in taming
N_EMBED, EMBED_DIM = 24, 4
LOSS_KEYS = {"loss.discriminator.main.0.weight": (64, 3, 4, 4), "loss.discriminator.main.0.bias": (64,),
             "loss.perceptual_loss.net.slice1.0.weight": (64, 3, 3, 3),
             "loss.perceptual_loss.lin0.model.1.weight": (1, 64, 1, 1)}


# ----------------------------------------------------------------------------- taming's key layout


def taming_shapes(dd: dict, n_embed: int, embed_dim: int, ema: bool = False) -> dict[str, tuple]:
    """Key -> shape of taming's VQModel state dict, following taming's Encoder/Decoder construction loops."""
    s = StateShapes()
    conv, norm, res, attn = s.conv, s.norm, s.res, s.attn

    ch, mult, nrb, z = dd["ch"], dd["ch_mult"], dd["num_res_blocks"], dd["z_channels"]
    levels, cur = len(mult), dd["resolution"]
    conv("encoder.conv_in", dd["in_channels"], ch, 3)
    in_mult = (1, *mult)
    for i in range(levels):
        block_in, block_out = ch * in_mult[i], ch * mult[i]
        for j in range(nrb):
            res(f"encoder.down.{i}.block.{j}", block_in, block_out)
            block_in = block_out
            if cur in dd["attn_resolutions"]:
                attn(f"encoder.down.{i}.attn.{j}", block_in)
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
            cur //= 2
    res("encoder.mid.block_1", block_in, block_in), attn("encoder.mid.attn_1", block_in)
    res("encoder.mid.block_2", block_in, block_in)
    norm("encoder.norm_out", block_in), conv("encoder.conv_out", block_in, z, 3)

    block_in, cur = ch * mult[-1], dd["resolution"] // 2 ** (levels - 1)
    conv("decoder.conv_in", z, block_in, 3)
    res("decoder.mid.block_1", block_in, block_in), attn("decoder.mid.attn_1", block_in)
    res("decoder.mid.block_2", block_in, block_in)
    for i in reversed(range(levels)):
        block_out = ch * mult[i]
        for j in range(nrb + 1):
            res(f"decoder.up.{i}.block.{j}", block_in, block_out)
            block_in = block_out
            if cur in dd["attn_resolutions"]:
                attn(f"decoder.up.{i}.attn.{j}", block_in)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
            cur *= 2
    norm("decoder.norm_out", block_in), conv("decoder.conv_out", block_in, dd["out_ch"], 3)
    conv("quant_conv", z, embed_dim, 1), conv("post_quant_conv", embed_dim, z, 1)
    s["quantize.embedding.weight"] = (n_embed, embed_dim)
    if ema:
        s["quantize.embedding.cluster_size"] = (n_embed,)
        s["quantize.embedding.embed_avg"] = (n_embed, embed_dim)
    s.update(LOSS_KEYS)
    return s


def random_state(shapes: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        t = torch.randn(shape, generator=gen)
        if key.endswith("cluster_size"):
            t = t.abs() + 1
        elif len(shape) == 4:  # conv weight: unit-variance activations
            t = t / math.sqrt(shape[1] * shape[2] * shape[3])
        elif len(shape) == 1:  # norm affine / bias
            t = (1.0 if "norm" in key and key.endswith("weight") else 0.0) + 0.1 * t
        state[key] = t
    return state


def taming_yaml(tmp_path, target="taming.models.vqgan.VQModel", ddconfig=None, n_embed=N_EMBED, **params):
    cfg = {"model": {"base_learning_rate": 4.5e-6, "target": target, "params": {
        "embed_dim": EMBED_DIM, "n_embed": n_embed, "ddconfig": ddconfig or DDCONFIG,
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                       "params": {"disc_conditional": False, "disc_in_channels": 3, "disc_start": 250001,
                                  "disc_weight": 0.8, "codebook_weight": 1.0}}, **params}}}
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def save_lightning_ckpt(path, state_dict):
    """A last.ckpt as PyTorch Lightning 1.0 writes it: callbacks keyed by the ModelCheckpoint class."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    modules = {n: types.ModuleType(n) for n in names}
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": names[-1]})
    modules[names[-1]].ModelCheckpoint = ModelCheckpoint
    saved = {n: sys.modules.get(n) for n in names}
    sys.modules.update(modules)
    try:
        torch.save({"epoch": 7, "global_step": 1000, "pytorch-lightning_version": "1.0.8", "state_dict": state_dict,
                    "callbacks": {ModelCheckpoint: {"monitor": "val/rec_loss", "best_model_score": torch.tensor(0.5),
                                                    "best_model_path": "logs/x/checkpoints/last.ckpt"}},
                    "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4.5e-6, "params": [0]}]}],
                    "lr_schedulers": []}, path)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


# ----------------------------------------------------------------------------- taming's forward, re-implemented


def ref_encode(sd, x, levels, nrb):
    """taming: Encoder -> quant_conv -> VectorQuantizer2 argmin of ||z||^2 + ||e||^2 - 2 z.e."""
    h = conv(x, sd, "encoder.conv_in")
    for i in range(levels):
        for j in range(nrb):
            h = res_block(h, sd, f"encoder.down.{i}.block.{j}")
            if f"encoder.down.{i}.attn.{j}.norm.weight" in sd:
                h = attn_block(h, sd, f"encoder.down.{i}.attn.{j}")
        if i != levels - 1:
            p = f"encoder.down.{i}.downsample.conv"
            h = F.conv2d(F.pad(h, (0, 1, 0, 1)), sd[p + ".weight"], sd[p + ".bias"], stride=2)
    h = res_block(attn_block(res_block(h, sd, "encoder.mid.block_1"), sd, "encoder.mid.attn_1"), sd, "encoder.mid.block_2")
    z = conv(conv(swish(group_norm(h, sd, "encoder.norm_out")), sd, "encoder.conv_out"), sd, "quant_conv", padding=0)
    zf = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    e = sd["quantize.embedding.weight"]
    d = zf.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * zf @ e.t()
    return d.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])


def ref_decode(sd, indices, levels, nrb):
    """taming: embedding lookup -> post_quant_conv -> Decoder (up[i] from the top level down)."""
    zq = sd["quantize.embedding.weight"][indices].permute(0, 3, 1, 2)
    h = conv(conv(zq, sd, "post_quant_conv", padding=0), sd, "decoder.conv_in")
    h = res_block(attn_block(res_block(h, sd, "decoder.mid.block_1"), sd, "decoder.mid.attn_1"), sd, "decoder.mid.block_2")
    for i in reversed(range(levels)):
        for j in range(nrb + 1):
            h = res_block(h, sd, f"decoder.up.{i}.block.{j}")
            if f"decoder.up.{i}.attn.{j}.norm.weight" in sd:
                h = attn_block(h, sd, f"decoder.up.{i}.attn.{j}")
        if i != 0:
            h = conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), sd, f"decoder.up.{i}.upsample.conv")
    return conv(swish(group_norm(h, sd, "decoder.norm_out")), sd, "decoder.conv_out")


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def taming_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("taming")
    sd = random_state(taming_shapes(DDCONFIG, N_EMBED, EMBED_DIM))
    save_lightning_ckpt(tmp / "last.ckpt", sd)
    return tmp, sd


def test_import_round_trip_and_matches_taming_math(taming_ckpt, tmp_path):
    tmp, sd = taming_ckpt
    result = import_taming(tmp / "last.ckpt", taming_yaml(tmp_path), tmp_path / "tok")
    assert result.weights == "state_dict"
    assert result.num_tensors == len(sd) - len(LOSS_KEYS)
    assert list(result.dropped) == ["loss.*"] and "(4 tensors)" in result.dropped["loss.*"]

    meta = read_export_meta(tmp_path / "tok", "vq_tokenizer")
    assert meta["config"]["attn_resolutions"] == [8]
    assert meta["config"]["quantizer"]["codebook_size"] == N_EMBED
    assert any("legacy" in note for note in meta["extra"]["imported_from"]["notes"])
    _, exported, _ = load_export(tmp_path / "tok", "vq_tokenizer", VQModelConfig)
    assert set(exported) == set(sd) - set(LOSS_KEYS)
    for key, tensor in exported.items():
        assert torch.equal(tensor, sd[key]), key

    model = VQModel.from_pretrained(tmp_path / "tok")
    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    levels, nrb = len(DDCONFIG["ch_mult"]), DDCONFIG["num_res_blocks"]
    with torch.no_grad():
        ref_idx = ref_encode(sd, images, levels, nrb)
        ours_idx = model.encode(images)
        assert ref_idx.shape == (2, 4, 4) and len(ref_idx.unique()) > 3
        assert torch.equal(ours_idx, ref_idx)
        assert rel_err(model.decode(ref_idx), ref_decode(sd, ref_idx, levels, nrb)) < 1e-4
        # The full forward (encode -> z_q -> decode) reconstructs like taming too.
        assert rel_err(model(images).reconstruction, ref_decode(sd, ref_idx, levels, nrb)) < 1e-4


def test_ema_variant_keeps_ema_state(tmp_path):
    sd = random_state(taming_shapes(DDCONFIG, N_EMBED, EMBED_DIM, ema=True), seed=1)
    save_lightning_ckpt(tmp_path / "last.ckpt", sd)
    import_taming(tmp_path / "last.ckpt", taming_yaml(tmp_path, target="taming.models.vqgan.EMAVQ"), tmp_path / "tok")
    model = VQModel.from_pretrained(tmp_path / "tok")
    assert model.config.quantizer.ema
    assert torch.equal(model.quantize.cluster_size, sd["quantize.embedding.cluster_size"])
    assert torch.equal(model.quantize.embed_sum, sd["quantize.embedding.embed_avg"])
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(model.encode(images), ref_encode(sd, images, len(DDCONFIG["ch_mult"]), 1))


def test_safetensors_input(taming_ckpt, tmp_path):
    from safetensors.torch import save_file

    _, sd = taming_ckpt
    save_file(sd, str(tmp_path / "vqgan.safetensors"))
    result = import_taming(tmp_path / "vqgan.safetensors", taming_yaml(tmp_path), tmp_path / "tok")
    assert result.weights == "<whole file>"
    codebook = VQModel.from_pretrained(tmp_path / "tok").quantize.embedding.weight
    assert torch.equal(codebook, sd["quantize.embedding.weight"])


def test_missing_and_extra_keys_are_listed_together(taming_ckpt, tmp_path):
    _, sd = taming_ckpt
    broken = dict(sd)
    del broken["decoder.conv_in.bias"]
    broken["encoder.extra_layer.weight"] = torch.zeros(3)
    save_lightning_ckpt(tmp_path / "last.ckpt", broken)
    with pytest.raises(KeyMismatchError) as info:
        import_taming(tmp_path / "last.ckpt", taming_yaml(tmp_path), tmp_path / "tok")
    assert info.value.missing == ["decoder.conv_in.bias"]
    assert info.value.unmapped == ["encoder.extra_layer.weight"]
    message = str(info.value)
    assert "target keys not filled (1): decoder.conv_in.bias" in message
    assert "source keys with no target (1): encoder.extra_layer.weight" in message
    assert not (tmp_path / "tok").exists()


def test_shape_mismatch_names_key_and_shapes(taming_ckpt, tmp_path):
    tmp, _ = taming_ckpt
    with pytest.raises(KeyMismatchError, match=r"quantize\.embedding\.weight: checkpoint \(24, 4\) vs model \(32, 4\)"):
        import_taming(tmp / "last.ckpt", taming_yaml(tmp_path, n_embed=32), tmp_path / "tok")


def test_gumbel_and_unsupported_options_are_refused(taming_ckpt, tmp_path):
    tmp, _ = taming_ckpt
    with pytest.raises(ConfigError, match="GumbelVQ is not supported: its GumbelQuantize"):
        import_taming(tmp / "last.ckpt", taming_yaml(tmp_path, target="taming.models.vqgan.GumbelVQ"), tmp_path / "t")
    with pytest.raises(ConfigError, match="remap"):
        import_taming(tmp / "last.ckpt", taming_yaml(tmp_path, remap="used_codes.npy"), tmp_path / "t")
    with pytest.raises(ConfigError, match=r"ddconfig\.double_z=True is not supported"):
        import_taming(tmp / "last.ckpt", taming_yaml(tmp_path, ddconfig={**DDCONFIG, "double_z": True}), tmp_path / "t")
    with pytest.raises(ConfigError, match=r"model\.params\.ddconfig\.mystery"):
        import_taming(tmp / "last.ckpt", taming_yaml(tmp_path, ddconfig={**DDCONFIG, "mystery": 1}), tmp_path / "t")
    # A Gumbel checkpoint presented under a plain VQModel YAML is caught by its keys.
    gumbel = {k: v for k, v in taming_ckpt[1].items() if not k.startswith("quantize.")}
    gumbel["quantize.proj.weight"] = torch.zeros(N_EMBED, 8, 1, 1)
    gumbel["quantize.embed.weight"] = torch.zeros(N_EMBED, 4)
    torch.save({"state_dict": gumbel}, tmp_path / "gumbel.ckpt")
    with pytest.raises(ConfigError, match="GumbelQuantize"):
        import_taming(tmp_path / "gumbel.ckpt", taming_yaml(tmp_path), tmp_path / "t")
