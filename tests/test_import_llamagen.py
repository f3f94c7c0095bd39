"""Importing LlamaGen VQ tokenizers and c2i GPT priors: checkpoints in LlamaGen's exact key layout
(built here from its construction rules, small sizes, random values) are converted, round-trip, and
give the outputs of independent re-implementations of LlamaGen's forward math written below."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from vq_reference import StateShapes, attn_block, conv, group_norm, rel_err, res_block, swish
from stage1_vq.model import VQModel, VQModelConfig
from stage2_prior.model import GPT, PRESETS, GPTConfig
from vqgpt.ground.checkpoint import load_export, read_export_meta
from vqgpt.cli import main
from vqgpt.ground.config import ConfigError
from vqgpt.workflow.encode import tokenizer_fingerprint
from vqgpt.workflow.importers import KeyMismatchError
from vqgpt.workflow.importers.llamagen import GPT_PRESETS, import_llamagen_gpt, import_llamagen_vq
from vqgpt.workflow.pipeline import VQGPTPipeline

CH, MULT, NRB, Z, CODES, DIM, IMAGE = 32, [1, 2, 2], 1, 8, 40, 4, 16  # f = 4 -> 4x4 grid
GPT_LAYERS, GPT_HEADS, GPT_DIM, GPT_MULTIPLE_OF, CLASSES = 2, 2, 32, 32, 10  # = stage2_prior preset 'tiny'


# ----------------------------------------------------------------------------- LlamaGen's key layouts


def llamagen_vq_shapes() -> dict[str, tuple]:
    """Key -> shape of LlamaGen's VQModel, following vq_model.py's Encoder/Decoder loops."""
    s = StateShapes()
    conv, norm, res, attn = s.conv, s.norm, s.res, s.attn

    levels = len(MULT)
    conv("encoder.conv_in", 3, CH, 3)
    in_mult = (1, *MULT)
    for i in range(levels):
        block_in, block_out = CH * in_mult[i], CH * MULT[i]
        for j in range(NRB):
            res(f"encoder.conv_blocks.{i}.res.{j}", block_in, block_out)
            block_in = block_out
            if i == levels - 1:
                attn(f"encoder.conv_blocks.{i}.attn.{j}", block_in)
        if i != levels - 1:
            conv(f"encoder.conv_blocks.{i}.downsample.conv", block_in, block_in, 3)
    res("encoder.mid.0", block_in, block_in), attn("encoder.mid.1", block_in), res("encoder.mid.2", block_in, block_in)
    norm("encoder.norm_out", block_in), conv("encoder.conv_out", block_in, Z, 3)

    block_in = CH * MULT[-1]
    conv("decoder.conv_in", Z, block_in, 3)
    res("decoder.mid.0", block_in, block_in), attn("decoder.mid.1", block_in), res("decoder.mid.2", block_in, block_in)
    for k, i in enumerate(reversed(range(levels))):  # appended lowest resolution first
        block_out = CH * MULT[i]
        for j in range(NRB + 1):
            res(f"decoder.conv_blocks.{k}.res.{j}", block_in, block_out)
            block_in = block_out
            if i == levels - 1:
                attn(f"decoder.conv_blocks.{k}.attn.{j}", block_in)
        if i != 0:
            conv(f"decoder.conv_blocks.{k}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in), conv("decoder.conv_out", block_in, 3, 3)
    s["quantize.embedding.weight"] = (CODES, DIM)
    s["quantize.codebook_used"] = (65536,)
    conv("quant_conv", Z, DIM, 1), conv("post_quant_conv", DIM, Z, 1)
    return s


def llamagen_gpt_shapes(vocab=CODES, classes=CLASSES, layers=GPT_LAYERS, dim=GPT_DIM, multiple_of=GPT_MULTIPLE_OF,
                        kv_dim=None) -> dict[str, tuple]:
    """Key -> shape of LlamaGen's c2i Transformer (class_dropout_prob > 0: one extra null-class row);
    kv_dim = n_kv_head * head_dim (default dim: as many key/value heads as heads)."""
    hidden = int(2 * 4 * dim / 3)
    hidden = hidden + (-hidden) % multiple_of  # find_multiple
    qkv = dim + 2 * (kv_dim or dim)
    s = {"cls_embedding.embedding_table.weight": (classes + 1, dim), "tok_embeddings.weight": (vocab, dim)}
    for i in range(layers):
        p = f"layers.{i}."
        s.update({p + "attention.wqkv.weight": (qkv, dim), p + "attention.wo.weight": (dim, dim),
                  p + "feed_forward.w1.weight": (hidden, dim), p + "feed_forward.w3.weight": (hidden, dim),
                  p + "feed_forward.w2.weight": (dim, hidden), p + "attention_norm.weight": (dim,),
                  p + "ffn_norm.weight": (dim,)})
    s.update({"norm.weight": (dim,), "output.weight": (vocab, dim)})
    return s


def random_state(shapes: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        t = torch.randn(shape, generator=gen)
        if key == "quantize.codebook_used":
            t = torch.randint(0, CODES, shape, generator=gen).float()
        elif len(shape) == 4:
            t = t / math.sqrt(shape[1] * shape[2] * shape[3])
        elif len(shape) == 1:
            t = (1.0 if key.endswith("norm.weight") or ".norm" in key and key.endswith("weight") else 0.0) + 0.1 * t
        elif "embedding" in key or "tok_embeddings" in key:
            t = t * 0.5
        else:  # linear weights (out, in)
            t = t / math.sqrt(shape[1])
        state[key] = t
    return state


# ----------------------------------------------------------------------------- LlamaGen's forward, re-implemented


def _mid(h, sd, p):
    return res_block(attn_block(res_block(h, sd, p + ".0"), sd, p + ".1"), sd, p + ".2")


def ref_vq_encode(sd, x):
    """LlamaGen: Encoder (conv_blocks in order) -> quant_conv -> l2-normalised nearest code."""
    levels = len(MULT)
    h = conv(x, sd, "encoder.conv_in")
    for i in range(levels):
        for j in range(NRB):
            h = res_block(h, sd, f"encoder.conv_blocks.{i}.res.{j}")
            if f"encoder.conv_blocks.{i}.attn.{j}.norm.weight" in sd:
                h = attn_block(h, sd, f"encoder.conv_blocks.{i}.attn.{j}")
        if i != levels - 1:
            p = f"encoder.conv_blocks.{i}.downsample.conv"
            h = F.conv2d(F.pad(h, (0, 1, 0, 1)), sd[p + ".weight"], sd[p + ".bias"], stride=2)
    h = conv(swish(group_norm(_mid(h, sd, "encoder.mid"), sd, "encoder.norm_out")), sd, "encoder.conv_out")
    z = conv(h, sd, "quant_conv", padding=0).permute(0, 2, 3, 1)
    zf = F.normalize(z.reshape(-1, DIM), p=2, dim=-1)
    e = F.normalize(sd["quantize.embedding.weight"], p=2, dim=-1)
    d = zf.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * torch.einsum("bd,dn->bn", zf, e.t())
    return d.argmin(1).view(z.shape[:3])


def ref_vq_decode(sd, indices):
    """LlamaGen: get_codebook_entry (normalised codes) -> post_quant_conv -> Decoder (conv_blocks in list order)."""
    levels = len(MULT)
    zq = F.normalize(sd["quantize.embedding.weight"], p=2, dim=-1)[indices].permute(0, 3, 1, 2)
    h = _mid(conv(conv(zq, sd, "post_quant_conv", padding=0), sd, "decoder.conv_in"), sd, "decoder.mid")
    for k in range(levels):
        for j in range(NRB + 1):
            h = res_block(h, sd, f"decoder.conv_blocks.{k}.res.{j}")
            if f"decoder.conv_blocks.{k}.attn.{j}.norm.weight" in sd:
                h = attn_block(h, sd, f"decoder.conv_blocks.{k}.attn.{j}")
        if k != levels - 1:
            h = conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), sd, f"decoder.conv_blocks.{k}.upsample.conv")
    return conv(swish(group_norm(h, sd, "decoder.norm_out")), sd, "decoder.conv_out")


def llamagen_freqs_cis_2d(grid: int, head_dim: int, base: float = 10000.0, cls_token_num: int = 1) -> torch.Tensor:
    """(cls + grid^2, head_dim/2, [cos, sin]): half the pairs rotate with the row, half with the column."""
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    freqs = torch.outer(torch.arange(grid).float(), freqs)
    grid_freqs = torch.cat([freqs[:, None, :].expand(-1, grid, -1), freqs[None, :, :].expand(grid, -1, -1)], dim=-1)
    cache = torch.stack([torch.cos(grid_freqs), torch.sin(grid_freqs)], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(cls_token_num, half, 2), cache])


def _rotate(x, freqs):  # x (B, S, H, D); freqs (S, D/2, 2); pairs are interleaved
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    c, s = freqs[None, :, None, :, 0], freqs[None, :, None, :, 1]
    return torch.stack([xs[..., 0] * c - xs[..., 1] * s, xs[..., 1] * c + xs[..., 0] * s], dim=-1).flatten(3)


def _rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def ref_gpt_logits(sd, tokens, labels, grid, n_head=GPT_HEADS, n_layer=GPT_LAYERS):
    """LlamaGen c2i teacher forcing: [class embedding, tok(tokens[:, :-1])] -> logits for every token."""
    h = torch.cat([sd["cls_embedding.embedding_table.weight"][labels][:, None],
                   sd["tok_embeddings.weight"][tokens[:, :-1]]], 1)
    B, S, dim = h.shape
    hd = dim // n_head
    freqs = llamagen_freqs_cis_2d(grid, hd)[:S]
    mask = torch.ones(S, S, dtype=torch.bool).tril()
    for i in range(n_layer):
        p = f"layers.{i}."
        qkv = _rms(h, sd[p + "attention_norm.weight"]) @ sd[p + "attention.wqkv.weight"].t()
        q, k, v = qkv.split([dim, dim, dim], -1)
        q, k = _rotate(q.view(B, S, n_head, hd), freqs), _rotate(k.view(B, S, n_head, hd), freqs)
        v = v.view(B, S, n_head, hd)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        attn = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        h = h + torch.einsum("bhqk,bkhd->bqhd", attn, v).reshape(B, S, dim) @ sd[p + "attention.wo.weight"].t()
        x = _rms(h, sd[p + "ffn_norm.weight"])
        ffn = (F.silu(x @ sd[p + "feed_forward.w1.weight"].t()) * (x @ sd[p + "feed_forward.w3.weight"].t()))
        h = h + ffn @ sd[p + "feed_forward.w2.weight"].t()
    return _rms(h, sd["norm.weight"]) @ sd["output.weight"].t()


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def vq(tmp_path_factory):
    """A LlamaGen VQ training checkpoint ({model, ema, optimizer, steps, args}) and its import."""
    tmp = tmp_path_factory.mktemp("llamagen_vq")
    model_sd, ema_sd = random_state(llamagen_vq_shapes(), 0), random_state(llamagen_vq_shapes(), 1)
    args = argparse.Namespace(vq_model="VQ-tiny", codebook_size=CODES, codebook_embed_dim=DIM, codebook_l2_norm=True,
                              commit_loss_beta=0.25, image_size=IMAGE, ema=True)
    optimizer = {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]}
    torch.save({"model": model_sd, "ema": ema_sd, "optimizer": optimizer,
                "discriminator": {"conv.weight": torch.zeros(2)}, "steps": 100, "args": args}, tmp / "vq.pt")
    result = import_llamagen_vq(tmp / "vq.pt", tmp / "tok")
    return tmp, model_sd, ema_sd, result


@pytest.fixture(scope="module")
def gpt(vq):
    tmp = vq[0]
    sd = random_state(llamagen_gpt_shapes(), 2)
    args = argparse.Namespace(gpt_model="GPT-tiny", gpt_type="c2i", cls_token_num=1, image_size=IMAGE,
                              downsample_size=4, num_classes=CLASSES, dropout_p=0.1, token_dropout_p=0.1,
                              drop_path_rate=0.0, vocab_size=CODES)
    torch.save({"model": sd, "optimizer": {}, "steps": 5000, "args": args}, tmp / "c2i.pt")
    result = import_llamagen_gpt(tmp / "c2i.pt", tmp / "tok", tmp / "pipe", preset="tiny")
    return tmp, sd, result


# ----------------------------------------------------------------------------- VQ tests


def test_vq_round_trip_uses_ema_and_maps_every_key(vq):
    tmp, model_sd, ema_sd, result = vq
    assert result.weights == "ema"  # LlamaGen's demo prefers EMA weights
    assert result.num_tensors == len(ema_sd) - 1 and list(result.dropped) == ["quantize.codebook_used"]
    config, exported, extra = load_export(tmp / "tok", "vq_tokenizer", VQModelConfig)
    assert config.channel_mult == MULT and config.channels == CH and config.num_res_blocks == NRB
    assert config.attn_resolutions == [IMAGE // 4] and config.resolution == IMAGE
    assert config.quantizer.l2_norm and (config.quantizer.codebook_size, config.quantizer.codebook_dim) == (CODES, DIM)
    assert extra["imported_from"]["weights"] == "ema"
    # The mapping, spelled out independently: every exported tensor is its LlamaGen source tensor.
    mid = {"0": "block_1", "1": "attn_1", "2": "block_2"}
    expected = {}
    for key, tensor in ema_sd.items():
        parts = key.split(".")
        if key == "quantize.codebook_used":
            continue
        if parts[1] == "mid":
            parts[2] = mid[parts[2]]
        elif parts[1] == "conv_blocks":
            level = int(parts[2]) if parts[0] == "encoder" else len(MULT) - 1 - int(parts[2])
            parts[1:4] = ["down" if parts[0] == "encoder" else "up", str(level),
                          "block" if parts[3] == "res" else parts[3]]
        expected[".".join(parts)] = tensor
    assert set(exported) == set(expected)
    for key, tensor in exported.items():
        assert torch.equal(tensor, expected[key]), key


def test_vq_matches_llamagen_math(vq):
    tmp, _, ema_sd, _ = vq
    model = VQModel.from_pretrained(tmp / "tok")
    torch.manual_seed(0)
    images = torch.rand(2, 3, IMAGE, IMAGE) * 2 - 1
    with torch.no_grad():
        ref_idx = ref_vq_encode(ema_sd, images)
        assert ref_idx.shape == (2, 4, 4) and len(ref_idx.unique()) > 3
        assert torch.equal(model.encode(images), ref_idx)
        assert rel_err(model.decode(ref_idx), ref_vq_decode(ema_sd, ref_idx)) < 1e-4


def test_vq_explicit_weights_and_preset_check(vq, tmp_path):
    tmp, model_sd, _, _ = vq
    result = import_llamagen_vq(tmp / "vq.pt", tmp_path / "tok", weights="model")
    assert result.weights == "model"
    codebook = VQModel.from_pretrained(tmp_path / "tok").quantize.embedding.weight
    assert torch.equal(codebook, model_sd["quantize.embedding.weight"])
    with pytest.raises(ConfigError, match=r"channel multipliers \[1, 2, 2\], but VQ-16 has \[1, 1, 2, 2, 4\]"):
        import_llamagen_vq(tmp / "vq.pt", tmp_path / "tok2", preset="VQ-16")
    with pytest.raises(ValueError, match="no entry 'nonexistent'.*'model', 'ema'"):
        import_llamagen_vq(tmp / "vq.pt", tmp_path / "tok2", weights="nonexistent")
    torch.save({"model": {"encoder.conv_in.weight": torch.zeros(CH, 3, 3, 3)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: not a LlamaGen VQ state dict"):
        import_llamagen_vq(tmp_path / "other.pt", tmp_path / "tok3")


def test_vq_missing_and_extra_keys_fail_listing_both(vq, tmp_path):
    _, model_sd, _, _ = vq
    broken = {k: v for k, v in model_sd.items() if k != "decoder.conv_blocks.0.attn.1.q.bias"}
    broken["decoder.conv_blocks.0.extra.weight"] = torch.zeros(1)
    torch.save({"model": broken}, tmp_path / "broken.pt")
    with pytest.raises(KeyMismatchError) as info:
        import_llamagen_vq(tmp_path / "broken.pt", tmp_path / "tok", image_size=IMAGE)
    # Reported in the target's names (conv_blocks.0 of the decoder is up.2).
    assert info.value.missing == ["decoder.up.2.attn.1.q.bias"]
    assert info.value.unmapped == ["decoder.conv_blocks.0.extra.weight"]


# ----------------------------------------------------------------------------- GPT tests


def test_gpt_presets_agree_with_stage2_presets():
    for name, (n_layer, n_head, dim) in GPT_PRESETS.items():
        if name in PRESETS:
            assert (PRESETS[name]["n_layer"], PRESETS[name]["n_head"], PRESETS[name]["dim"]) == (n_layer, n_head, dim)
    assert PRESETS["tiny"] == dict(n_layer=GPT_LAYERS, n_head=GPT_HEADS, dim=GPT_DIM, multiple_of=GPT_MULTIPLE_OF)


def test_gpt_pipeline_round_trip_and_logits_match_llamagen(gpt):
    tmp, sd, result = gpt
    assert result.weights == "model" and result.num_tensors == len(sd) and result.dropped == {}
    pipe = tmp / "pipe"
    meta = read_export_meta(pipe / "prior", "gpt_prior")
    assert meta["extra"]["tokenizer_fingerprint"] == tokenizer_fingerprint(pipe / "tokenizer")
    assert tokenizer_fingerprint(pipe / "tokenizer") == tokenizer_fingerprint(tmp / "tok")
    config, exported, _ = load_export(pipe / "prior", "gpt_prior", GPTConfig)
    assert (config.num_classes, config.class_dropout) == (CLASSES, 0.1)
    assert (config.codebook_size, config.grid_size) == (CODES, [4, 4])
    assert (config.dropout, config.token_dropout, config.drop_path) == (0.1, 0.1, 0.0)
    for key, tensor in sd.items():
        ours = "class_embedding.weight" if key == "cls_embedding.embedding_table.weight" else key
        assert torch.equal(exported[ours], tensor), key

    prior = GPT.from_pretrained(pipe / "prior")
    torch.manual_seed(0)
    tokens = torch.randint(0, CODES, (2, 16))
    labels = torch.tensor([3, CLASSES])  # CLASSES = the null class (classifier-free guidance)
    with torch.no_grad():
        ref = ref_gpt_logits(sd, tokens, labels, grid=4)
        assert rel_err(prior(tokens, labels), ref) < 1e-4
    pipeline = VQGPTPipeline.from_pretrained(pipe)  # a normal pipeline folder: loads, checks, samples
    assert pipeline.generate(1, class_labels=3, seed=0).shape == (1, 3, IMAGE, IMAGE)


def test_gpt_freqs_cis_is_checked_then_dropped(gpt, tmp_path):
    tmp, sd, _ = gpt
    torch.save({"model": {**sd, "freqs_cis": llamagen_freqs_cis_2d(4, GPT_DIM // GPT_HEADS)}}, tmp_path / "c2i.pt")
    result = import_llamagen_gpt(tmp_path / "c2i.pt", tmp / "tok", tmp_path / "pipe", preset="tiny",
                                 num_classes=CLASSES, image_size=IMAGE)
    assert "freqs_cis" in result.dropped
    with pytest.raises(ConfigError, match="it is for a 4x4 grid"):
        import_llamagen_gpt(tmp_path / "c2i.pt", tmp / "tok", tmp_path / "pipe2", preset="tiny",
                            num_classes=CLASSES, image_size=32)
    one_d = torch.zeros(17, GPT_DIM // GPT_HEADS // 2, 2)  # right shape, wrong (1D) rotation
    one_d[1:, :, 0] = 1
    torch.save({"model": {**sd, "freqs_cis": one_d}}, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match="differs from LlamaGen's 2D RoPE"):
        import_llamagen_gpt(tmp_path / "bad.pt", tmp / "tok", tmp_path / "pipe3", preset="tiny",
                            num_classes=CLASSES, image_size=IMAGE)


def test_gpt_wrapper_prefix_and_bare_dict(gpt, tmp_path):
    tmp, sd, _ = gpt
    torch.save({f"_orig_mod.{k}": v for k, v in sd.items()}, tmp_path / "fsdp.pt")  # bare (FSDP) state dict
    names = [f"class{i}" for i in range(CLASSES)]
    result = import_llamagen_gpt(tmp_path / "fsdp.pt", tmp / "tok", tmp_path / "pipe", preset="tiny",
                                 num_classes=CLASSES, image_size=IMAGE, class_names=names)
    assert result.weights == "<whole file>"
    pipeline = VQGPTPipeline.from_pretrained(tmp_path / "pipe")
    assert torch.equal(pipeline.prior.class_embedding.weight, sd["cls_embedding.embedding_table.weight"])
    assert pipeline.class_index("class3") == 3


def test_gpt_refusals_name_the_problem(gpt, tmp_path):
    tmp, sd, _ = gpt
    ckpt = tmp / "c2i.pt"
    with pytest.raises(ConfigError, match=r"model.dim = 768 \(preset GPT-B\), but the weights have 32"):
        import_llamagen_gpt(ckpt, tmp / "tok", tmp_path / "p", preset="GPT-B")
    with pytest.raises(ConfigError, match="class table has 11 rows"):
        import_llamagen_gpt(ckpt, tmp / "tok", tmp_path / "p", preset="tiny", num_classes=1000)
    other_vocab = random_state(llamagen_gpt_shapes(vocab=64), 3)
    torch.save({"model": other_vocab}, tmp_path / "v64.pt")
    with pytest.raises(ConfigError, match="predicts 64 codes, but tokenizer .* has codebook_size=40"):
        import_llamagen_gpt(tmp_path / "v64.pt", tmp / "tok", tmp_path / "p", preset="tiny",
                            num_classes=CLASSES, image_size=IMAGE)
    text = {**sd, "cls_embedding.cap_proj.fc1.weight": torch.zeros(GPT_DIM, 8)}
    del text["cls_embedding.embedding_table.weight"]
    torch.save({"model": text}, tmp_path / "t2i.pt")
    with pytest.raises(ConfigError, match="text-to-image"):
        import_llamagen_gpt(tmp_path / "t2i.pt", tmp / "tok", tmp_path / "p", preset="tiny",
                            num_classes=CLASSES, image_size=IMAGE)
    missing = {k: v for k, v in sd.items() if k != "layers.1.feed_forward.w3.weight"}
    missing["layers.1.attention.bias"] = torch.zeros(GPT_DIM)
    torch.save({"model": missing}, tmp_path / "missing.pt")
    with pytest.raises(KeyMismatchError) as info:
        import_llamagen_gpt(tmp_path / "missing.pt", tmp / "tok", tmp_path / "p", preset="tiny",
                            num_classes=CLASSES, image_size=IMAGE)
    assert info.value.missing == ["layers.1.feed_forward.w3.weight"]
    assert info.value.unmapped == ["layers.1.attention.bias"]


# ----------------------------------------------------------------------------- architecture: recorded, given, read


def c2i_args(**overrides) -> argparse.Namespace:
    """train_c2i.py's saved args for the small test model (gpt_model left to the caller)."""
    args = dict(gpt_type="c2i", cls_token_num=1, image_size=IMAGE, downsample_size=4, num_classes=CLASSES,
                dropout_p=0.1, token_dropout_p=0.1, drop_path_rate=0.0, vocab_size=CODES)
    return argparse.Namespace(**{**args, **overrides})


def prior_logits_match(pipe, sd, n_head, n_layer) -> bool:
    prior = GPT.from_pretrained(pipe / "prior")
    torch.manual_seed(0)
    tokens, labels = torch.randint(0, CODES, (2, 16)), torch.tensor([1, 7])
    with torch.no_grad():
        return rel_err(prior(tokens, labels), ref_gpt_logits(sd, tokens, labels, 4, n_head, n_layer)) < 1e-4


def test_gpt_preset_recorded_in_the_checkpoint_is_used(vq, tmp_path, monkeypatch):
    # A LlamaGen preset of 4 heads (LlamaGen's own table, shrunk): the heads can only come from args.gpt_model.
    monkeypatch.setitem(GPT_PRESETS, "GPT-tiny4", (GPT_LAYERS, 4, GPT_DIM))
    tmp = vq[0]
    sd = random_state(llamagen_gpt_shapes(), 5)
    torch.save({"model": sd, "args": c2i_args(gpt_model="GPT-tiny4")}, tmp_path / "c2i.pt")
    import_llamagen_gpt(tmp_path / "c2i.pt", tmp / "tok", tmp_path / "pipe")
    config, _, extra = load_export(tmp_path / "pipe" / "prior", "gpt_prior", GPTConfig)
    assert (config.n_layer, config.n_head, config.dim, config.multiple_of) == (GPT_LAYERS, 4, GPT_DIM, GPT_MULTIPLE_OF)
    assert extra["imported_from"]["preset"] == "GPT-tiny4"
    assert prior_logits_match(tmp_path / "pipe", sd, n_head=4, n_layer=GPT_LAYERS)
    assert not prior_logits_match(tmp_path / "pipe", sd, n_head=2, n_layer=GPT_LAYERS)  # the heads matter
    with pytest.raises(ConfigError, match="preset tiny was given, but the checkpoint records gpt_model=GPT-tiny4"):
        import_llamagen_gpt(tmp_path / "c2i.pt", tmp / "tok", tmp_path / "p2", preset="tiny")
    with pytest.raises(ConfigError, match=r"model.n_head = 2 was given, but preset GPT-tiny4 \(the checkpoint's "
                                          r"args.gpt_model\) has 4"):
        import_llamagen_gpt(tmp_path / "c2i.pt", tmp / "tok", tmp_path / "p2", model={"n_head": 2})
    torch.save({"model": sd, "args": c2i_args(gpt_model="GPT-tiny4", vocab_size=64)}, tmp_path / "v.pt")
    with pytest.raises(ConfigError, match=r"model.codebook_size = 64 \(the checkpoint's args.vocab_size\), "
                                          r"but the weights have 40"):
        import_llamagen_gpt(tmp_path / "v.pt", tmp / "tok", tmp_path / "p2")


def test_gpt_custom_architecture_through_the_cli(vq, tmp_path, capsys):
    # Not a preset: 3 layers of width 48 with 4 heads, no training args (a bare released checkpoint).
    tmp = vq[0]
    sd = random_state(llamagen_gpt_shapes(layers=3, dim=48, multiple_of=128), 6)
    torch.save({"model": sd}, tmp_path / "custom.pt")
    base = ["import", "llamagen-gpt", "--checkpoint", str(tmp_path / "custom.pt"), "--tokenizer", str(tmp / "tok"),
            "--image-size", str(IMAGE)]

    def fails(*extra: str) -> str:
        assert main([*base, "--out", str(tmp_path / "bad"), *extra]) == 2
        return capsys.readouterr().err

    assert "model.n_head: the weights do not fix the number of attention heads" in fails()
    assert main([*base, "--out", str(tmp_path / "pipe"), "--set", "model.n_head=4"]) == 0
    config, _, extra = load_export(tmp_path / "pipe" / "prior", "gpt_prior", GPTConfig)
    # Width, depth, vocabulary, classes (rows minus the null row) and the FFN width: read from the weights.
    assert (config.n_layer, config.dim, config.n_head, config.n_kv_head) == (3, 48, 4, None)
    assert (config.codebook_size, config.num_classes, config.class_dropout) == (CODES, CLASSES, 0.1)
    assert config.ffn_hidden_dim == 128 and extra["imported_from"]["set"] == {"n_head": 4}
    assert prior_logits_match(tmp_path / "pipe", sd, n_head=4, n_layer=3)

    heads = ("--set", "model.n_head=4")
    assert "model.n_layer = 4 (given), but the weights have 3" in fails(*heads, "--set", "model.n_layer=4")
    assert "model.dim = 64 (given), but the weights have 48" in fails(*heads, "--set", "model.dim=64")
    assert "model.dim = 768 (preset GPT-B), but the weights have 48" in fails("--preset", "GPT-B")
    assert "model.n_head = 5 (given) does not divide the width 48" in fails("--set", "model.n_head=5")
    err = fails(*heads, "--set", "model.multiple_of=256")
    assert "model.multiple_of / model.ffn_dim_multiplier" in err and "feed-forward width of 128" in err
    assert "expected model.KEY=VALUE" in fails("--set", "model.heads=4")
    assert "set by num_classes (--num-classes)" in fails("--set", "model.num_classes=3")
    assert "model.n_head: expected an integer" in fails("--set", "model.n_head=four")


def test_gpt_key_value_heads_and_rope_head_size_come_from_the_weights(vq, tmp_path):
    tmp = vq[0]
    gqa = random_state(llamagen_gpt_shapes(kv_dim=GPT_DIM // 4), 7)  # 4 heads of 8, one key/value head
    torch.save({"model": gqa, "args": c2i_args()}, tmp_path / "gqa.pt")
    import_llamagen_gpt(tmp_path / "gqa.pt", tmp / "tok", tmp_path / "pipe", model={"n_head": 4, "multiple_of": 32})
    config, _, _ = load_export(tmp_path / "pipe" / "prior", "gpt_prior", GPTConfig)
    assert (config.n_head, config.n_kv_head) == (4, 1)
    with pytest.raises(ConfigError, match=r"model.n_kv_head = 2 \(given\), but the weights have 1"):
        import_llamagen_gpt(tmp_path / "gqa.pt", tmp / "tok", tmp_path / "p2", model={"n_head": 4, "n_kv_head": 2})

    # A stored RoPE table fixes the head size: 2 heads of 16 here, with no preset or --set at all.
    sd = random_state(llamagen_gpt_shapes(), 8)
    torch.save({"model": {**sd, "freqs_cis": llamagen_freqs_cis_2d(4, GPT_DIM // 2)}}, tmp_path / "rope.pt")
    import_llamagen_gpt(tmp_path / "rope.pt", tmp / "tok", tmp_path / "pipe3", image_size=IMAGE)
    assert GPT.from_pretrained(tmp_path / "pipe3" / "prior").config.n_head == 2
    assert prior_logits_match(tmp_path / "pipe3", sd, n_head=2, n_layer=GPT_LAYERS)
    with pytest.raises(ConfigError, match=r"model.n_head = 4 \(given\), head size 8, but the stored freqs_cis is "
                                          r"for head size 16 \(n_head = 2\)"):
        import_llamagen_gpt(tmp_path / "rope.pt", tmp / "tok", tmp_path / "p4", image_size=IMAGE, model={"n_head": 4})
