"""The newer quantizer kinds and options (issue 17): LFQ with its entropy losses, SimVQ, LlamaGen's entropy
penalty, one output contract for every kind, and an LFQ tokenizer at 2^10 codes through encode and a prior."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from stage1_vq import FSQ, LFQ, QuantizerConfig, QuantizerOutput, ResidualVQ, VectorQuantizer, VQModel, VQModelConfig
from stage1_vq.quantizers import build_quantizer
from vqgpt.ground.config import ConfigError, from_dict

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(**quantizer) -> VQModel:
    return VQModel(VQModelConfig(channels=16, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[],
                                 resolution=16, z_channels=16, norm_groups=8, quantizer=QuantizerConfig(**quantizer)))


def images(batch: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


def all_codes(d: int) -> torch.Tensor:
    """The 2^d sign patterns (2^d, d), in no particular order."""
    return torch.tensor(list(itertools.product([-1.0, 1.0], repeat=d)))


def brute_force_entropies(flat: torch.Tensor, codes: torch.Tensor,
                          temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean per-sample entropy, entropy of the batch mean) of softmax(-||z - c||^2 / T) over every code."""
    probs = torch.softmax(-torch.cdist(flat.double(), codes.double()).pow(2) / temperature, dim=-1)  # (N, K)
    sample = -(probs * probs.clamp_min(1e-300).log()).sum(-1).mean()
    mean = probs.mean(0)
    return sample, -(mean * mean.clamp_min(1e-300).log()).sum()


# ----------------------------------------------------------------------------- LFQ


def test_lfq_codes_are_the_sign_pattern_and_indices_round_trip():
    torch.manual_seed(0)
    d = 5
    q = LFQ(d).train()
    z = torch.randn(3, d, 4, 6)
    z[0, :, 0, 0] = 0.0  # sign(0) is -1, as in the paper (bit 0)
    out = q(z)
    expected = torch.where(z > 0, 1.0, -1.0)
    assert torch.equal(out.z_q, expected)
    # index = sum_i [z_i > 0] * 2**i: channel 0 least significant
    bits = (z > 0).long()
    assert torch.equal(out.indices, sum(bits[:, i] << i for i in range(d)))
    assert out.indices[0, 0, 0] == 0
    assert torch.equal(q.codes_from_indices(out.indices), out.z_q)
    assert torch.equal(q.lookup(z), out.indices)
    # every one of the 2^d indices is a distinct code and comes back
    every = torch.arange(2 ** d).view(1, 1, -1)
    codes = q.codes_from_indices(every)
    assert len(torch.unique(codes.permute(0, 2, 3, 1).reshape(-1, d), dim=0)) == 2 ** d
    assert torch.equal(q.lookup(codes), every)
    # straight-through: the gradient of z_q reaches z unchanged
    z.requires_grad_(True)
    g = torch.randn_like(z)
    (q(z).z_q * g).sum().backward()
    torch.testing.assert_close(z.grad, g)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("d", [1, 4, 7])
def test_lfq_entropies_equal_the_full_softmax_over_all_codes(d, training):
    torch.manual_seed(d)
    q = LFQ(d, temperature=0.7).train(training)
    flat = torch.randn(50, d)
    sample, codebook = q.entropy_terms(flat)
    ref_sample, ref_codebook = brute_force_entropies(flat, all_codes(d), 0.7)
    torch.testing.assert_close(sample.double(), ref_sample, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(codebook.double(), ref_codebook, rtol=1e-5, atol=1e-6)


def test_lfq_codebook_entropy_is_not_the_per_bit_upper_bound():
    """Latents whose 6 bits all copy one another use 2 codes: ln 2, while the per-bit entropies sum to 6 ln 2."""
    q = LFQ(6, temperature=0.01)
    signs = torch.tensor([1.0, -1.0]).repeat(20).unsqueeze(1)  # (40, 1)
    flat = signs * torch.ones(1, 6)
    _, codebook = q.entropy_terms(flat)
    assert codebook.item() == pytest.approx(math.log(2), rel=1e-4)


def test_lfq_entropy_losses_reach_the_encoder():
    torch.manual_seed(0)
    x = images()
    # beta = 0: the quantizer's loss is the entropy terms alone
    for weights in (dict(lfq_sample_entropy_weight=1.0, lfq_codebook_entropy_weight=0.0),
                    dict(lfq_sample_entropy_weight=0.0, lfq_codebook_entropy_weight=1.0)):
        model = tiny_model(kind="lfq", lfq_dim=6, lfq_temperature=1.0, beta=0.0, **weights).train()
        out = model(x).quantizer
        out.loss.backward()
        for weight in (model.quant_conv.weight, model.encoder.conv_in.weight):
            assert weight.grad is not None and weight.grad.abs().sum() > 0, weights
    model = tiny_model(kind="lfq", lfq_dim=6, beta=0.0, lfq_sample_entropy_weight=0.0,
                       lfq_codebook_entropy_weight=0.0).train()
    assert model(x).quantizer.loss.item() == 0.0
    # the loss is exactly beta * commitment + w_s * sample entropy - w_c * codebook entropy
    model = tiny_model(kind="lfq", lfq_dim=6, beta=0.5, lfq_sample_entropy_weight=0.2,
                       lfq_codebook_entropy_weight=0.3).train()
    out = model(x).quantizer
    stats = out.stats
    expected = 0.5 * stats["commitment"] + 0.2 * stats["sample_entropy"] - 0.3 * stats["codebook_entropy"]
    torch.testing.assert_close(out.loss.detach(), expected)


def test_lfq_codebook_entropy_spreads_usage():
    """Latents that all start in one orthant (one code), moved by the codebook entropy alone, spread out."""
    torch.manual_seed(0)
    q = LFQ(6, beta=0.0, temperature=1.0, sample_entropy_weight=0.0, codebook_entropy_weight=1.0).train()
    z = nn.Parameter(0.5 + 0.1 * torch.randn(1, 6, 8, 8))
    assert q(z).indices.unique().tolist() == [63]
    optimizer = torch.optim.Adam([z], lr=0.05)
    for _ in range(40):
        optimizer.zero_grad()
        q(z).loss.backward()
        optimizer.step()
    out = q.eval()(z)
    assert out.stats["usage"] > 0.4 and out.stats["perplexity"] > 20, out.stats  # of 64 codes, 64 latents


@pytest.mark.parametrize("settings, spreads", [({}, True),  # the defaults
                                               (dict(lfq_temperature=0.01, lfq_codebook_entropy_weight=0.1), False)])
def test_lfq_default_losses_spread_latents_committed_to_few_codes(settings, spreads):
    """Latents sitting near their codes (|z_i| ~ 1, where the commitment loss puts them) in 4 of 64 codes,
    moved by the full default loss, spread over most codes. At MAGVIT-2's temperature 0.01 and weight 0.1
    p(. | z) is one-hot there to within e^-400: no entropy gradient, and they stay in their 4 codes."""
    torch.manual_seed(0)
    q = build_quantizer(QuantizerConfig(kind="lfq", lfq_dim=6, **settings), 6).train()
    z0 = torch.ones(1, 6, 8, 8)
    z0[:, :2] = torch.where(torch.rand(1, 2, 8, 8) > 0.5, 1.0, -1.0)  # 2 free bits: 4 codes
    z = nn.Parameter(z0 + 0.1 * torch.randn_like(z0))
    assert q(z).indices.unique().numel() == 4
    optimizer = torch.optim.Adam([z], lr=0.05)
    for _ in range(60):
        optimizer.zero_grad()
        q(z).loss.backward()
        optimizer.step()
    used = q.eval()(z).indices.unique().numel()
    assert (used >= 32) if spreads else (used == 4), used


def test_lfq_usage_and_perplexity():
    q = LFQ(3, usage_window=2).train()
    def latents(indices: list[int]) -> torch.Tensor:
        return q.codes_from_indices(torch.tensor(indices).view(1, 1, -1)) * 0.5
    for i in range(3):
        out = q(latents([i]))
    assert out.stats["usage"].item() == pytest.approx(2 / 8)  # codes 1 and 2: the last two steps
    out = q.eval()(latents([0, 1, 2, 3, 0, 1, 2, 3]))
    assert out.stats["usage"].item() == pytest.approx(4 / 8)
    assert out.stats["perplexity"].item() == pytest.approx(4.0)


def test_lfq_config_derives_the_codebook_size():
    cfg = from_dict(VQModelConfig, {"quantizer": {"kind": "lfq", "lfq_dim": 12}}, prefix="model")
    assert cfg.quantizer.codebook_size == 4096 and cfg.quantizer.latent_dim(256) == 12
    assert QuantizerConfig(kind="lfq", lfq_dim=12, codebook_size=4096).codebook_size == 4096
    with pytest.raises(ConfigError, match=r"model.quantizer: codebook_size 1024 disagrees with lfq_dim 12, which "
                                          r"gives 4096 codes"):
        from_dict(VQModelConfig, {"quantizer": {"kind": "lfq", "lfq_dim": 12, "codebook_size": 1024}}, prefix="model")
    with pytest.raises(ValueError, match=r"lfq_dim must be in 1..18"):
        QuantizerConfig(kind="lfq", lfq_dim=19)
    with pytest.raises(ValueError, match=r"codebook_dim \(8\) must equal lfq_dim \(12\)"):
        QuantizerConfig(kind="lfq", lfq_dim=12, codebook_dim=8)
    with pytest.raises(ValueError, match=r"ema, simvq apply only to kind 'vq' and 'rvq', not kind 'lfq'"):
        QuantizerConfig(kind="lfq", ema=True, simvq=True)
    model = tiny_model(kind="lfq", lfq_dim=7)
    assert model.codebook_size == 128 and model.codebook_dim == 7 and isinstance(model.quantize, LFQ)


def test_lfq_model_exports_and_decodes(tmp_path):
    torch.manual_seed(0)
    model = tiny_model(kind="lfq", lfq_dim=6).eval()
    assert not any(k.startswith("quantize.") for k in model.state_dict())  # no codebook to store
    model.save_pretrained(tmp_path / "tok")
    loaded = VQModel.from_pretrained(tmp_path / "tok")
    x = images(seed=1)
    codes = model.encode(x)
    assert torch.equal(loaded.encode(x), codes) and int(codes.max()) < 64
    torch.testing.assert_close(loaded.decode(codes), model(x).reconstruction, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- SimVQ


def test_simvq_codebook_stays_frozen_while_its_map_learns():
    from vqgpt.training import TrainConfig, make_optimizer

    torch.manual_seed(0)
    model = tiny_model(codebook_size=64, simvq=True).train()
    q = model.quantize
    assert not hasattr(q, "embedding")
    assert all(p is not q.base_codebook for p in model.parameters())
    frozen = q.base_codebook.clone()
    weight, effective = q.codebook_map.weight.detach().clone(), q.codebook().detach().clone()
    optimizer = make_optimizer(model.parameters(), TrainConfig(lr=1e-2, weight_decay=0.1))
    for step in range(3):
        x = images(seed=step)
        out = model(x)
        (F.l1_loss(out.reconstruction, x) + out.quantizer.loss).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(q.base_codebook, frozen)
    assert not torch.allclose(q.codebook_map.weight, weight)
    assert not torch.allclose(q.codebook(), effective)
    # the lookup is against the effective codebook W(C)
    with torch.no_grad():
        z = model.encode_latents(images(seed=9))
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        reference = torch.cdist(flat, q.codebook_map(q.base_codebook)).argmin(-1)
    assert torch.equal(q.lookup(z).flatten(), reference)
    torch.testing.assert_close(model.codes_from_indices(q.lookup(z)), model.quantize.eval()(z).z_q)


def test_simvq_export_round_trip(tmp_path):
    torch.manual_seed(0)
    model = tiny_model(codebook_size=64, simvq=True, l2_norm=True).eval()
    assert {k for k in model.state_dict() if k.startswith("quantize.")} == {
        "quantize.base_codebook", "quantize.codebook_map.weight", "quantize.codebook_map.bias"}
    model.save_pretrained(tmp_path / "tok")
    loaded = VQModel.from_pretrained(tmp_path / "tok")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = images(seed=3)
    assert torch.equal(loaded.encode(x), model.encode(x))
    with pytest.raises(ValueError, match="simvq learns only the linear map.*ema, kmeans_init"):
        QuantizerConfig(simvq=True, ema=True, kmeans_init=True)


def train_linear_autoencoder(quantizer: nn.Module, x_dim: int = 16, steps: int = 60, seed: int = 0) -> float:
    """Train x -> Linear -> quantizer -> Linear -> x on Gaussian data; fraction of codes used on held-out data."""
    torch.manual_seed(seed)
    dim = quantizer.codebook_dim
    encoder, decoder = nn.Linear(x_dim, dim), nn.Linear(dim, x_dim)
    params = [*encoder.parameters(), *decoder.parameters(), *quantizer.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    g = torch.Generator().manual_seed(1)
    quantizer.train()
    for _ in range(steps):
        x = torch.randn(256, x_dim, generator=g)
        out = quantizer(encoder(x).t().reshape(1, dim, 16, 16))
        loss = F.mse_loss(decoder(out.z_q.reshape(dim, -1).t()), x) + out.loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        x = torch.randn(4096, x_dim, generator=g)
        used = quantizer.lookup(encoder(x).t().reshape(1, dim, 64, 64)).unique().numel()
    return used / quantizer.codebook_size


def test_simvq_keeps_more_codes_in_use_than_plain_vq():
    plain = train_linear_autoencoder(VectorQuantizer(512, 8))
    simvq = train_linear_autoencoder(VectorQuantizer(512, 8, simvq=True))
    assert simvq > 0.5 and simvq > 3 * plain, (plain, simvq)  # measured: ~0.85 vs ~0.10


# ----------------------------------------------------------------------------- LlamaGen's entropy penalty


def test_entropy_penalty_matches_llamagen_and_weight_zero_changes_nothing():
    torch.manual_seed(0)
    z = torch.randn(2, 4, 3, 3)
    base = VectorQuantizer(16, 4).train()
    with_penalty = VectorQuantizer(16, 4, entropy_weight=0.5, entropy_temperature=0.3).train()
    with_penalty.load_state_dict(base.state_dict())
    plain = base(z)
    out = with_penalty(z)
    torch.testing.assert_close(plain.loss, plain.stats["codebook_loss"] + 0.25 * plain.stats["commitment"])
    assert plain.stats["entropy_penalty"].item() == 0.0
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    sample, codebook = brute_force_entropies(flat, base.codebook().detach(), 0.3)
    torch.testing.assert_close(out.stats["entropy_penalty"].double(), sample - codebook, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, plain.loss + 0.5 * out.stats["entropy_penalty"])
    assert torch.equal(out.indices, plain.indices) and torch.equal(out.z_q, plain.z_q)


@pytest.mark.parametrize("simvq", [False, True])
def test_entropy_penalty_gradient_reaches_the_encoder(simvq):
    torch.manual_seed(0)
    x = images()
    # beta = 0: the codebook loss stops at sg(z), so only the penalty can reach the encoder
    model = tiny_model(codebook_size=32, beta=0.0, entropy_weight=1.0, entropy_temperature=1.0, simvq=simvq).train()
    model(x).quantizer.loss.backward()
    for weight in (model.quant_conv.weight, model.encoder.conv_in.weight):
        assert weight.grad is not None and weight.grad.abs().sum() > 0
    model = tiny_model(codebook_size=32, beta=0.0, simvq=simvq).train()
    model(x).quantizer.loss.backward()
    assert model.quant_conv.weight.grad is None or model.quant_conv.weight.grad.abs().sum() == 0


def test_entropy_penalty_spreads_usage():
    plain = train_linear_autoencoder(VectorQuantizer(512, 8))
    spread = train_linear_autoencoder(VectorQuantizer(512, 8, entropy_weight=0.1))
    assert spread > 1.5 * plain, (plain, spread)  # measured: ~0.25 vs ~0.10


# ----------------------------------------------------------------------------- one contract


KINDS = {
    "vq": dict(codebook_size=16),
    "vq-ema-restart": dict(codebook_size=16, ema=True, restart_threshold=0.1),
    "vq-entropy": dict(codebook_size=16, entropy_weight=0.1),
    "simvq": dict(codebook_size=16, simvq=True),
    "fsq": dict(kind="fsq", fsq_levels=[4, 4]),
    "lfq": dict(kind="lfq", lfq_dim=4),
    "rvq": dict(kind="rvq", codebook_size=8, rvq_depth=2, ema=True, restart_threshold=0.1),  # 2 x 8 codes
    "rvq-shared": dict(kind="rvq", codebook_size=16, rvq_depth=3, rvq_shared_codebook=True, entropy_weight=0.1),
}


@pytest.mark.parametrize("name", list(KINDS))
def test_every_kind_follows_one_contract(name):
    torch.manual_seed(0)
    cfg = QuantizerConfig(**KINDS[name])
    q = build_quantizer(cfg, cfg.latent_dim(8))
    assert type(q) is {"vq": VectorQuantizer, "fsq": FSQ, "lfq": LFQ, "rvq": ResidualVQ}[cfg.kind]
    columns = 5 * q.codes_per_position  # residual VQ: a position's codes side by side in its row
    assert q.codebook_size == 16
    z = (torch.randn(2, q.codebook_dim, 3, 5) * 2).requires_grad_(True)
    for training in (True, False):
        out = q.train(training)(z)
        assert isinstance(out, QuantizerOutput)
        assert out.z_q.shape == z.shape and out.indices.shape == (2, 3, columns) and out.indices.dtype == torch.int64
        assert out.loss.shape == () and 0 <= int(out.indices.min()) and int(out.indices.max()) < 16
        assert {"usage", "perplexity"} <= set(out.stats)
        assert all(v.shape == () and not v.requires_grad for v in out.stats.values())
        if not training:  # a training step may move the codes (EMA, restarts) after the lookup
            torch.testing.assert_close(q.codes_from_indices(out.indices), out.z_q.detach(), atol=1e-5, rtol=1e-5)
            assert torch.equal(q.lookup(z), out.indices)
    # eval usage and perplexity are the same function of the code histogram for every kind
    counts = torch.bincount(out.indices.flatten(), minlength=16).float()
    probs = counts / counts.sum()
    assert out.stats["usage"].item() == pytest.approx((counts > 0).float().mean().item())
    assert out.stats["perplexity"].item() == pytest.approx(math.exp(-(probs[probs > 0] * probs[probs > 0].log()).sum()))
    out = q.train()(z)
    (out.z_q.sum() + out.loss).backward()
    assert z.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- the workflow at 2^10 codes


def write_images(root, n: int = 24, size: int = 16) -> None:
    """n small images in two classes: smooth colour blobs, so a tokenizer has something to learn."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        cy, cx = rng.uniform(0, size, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 4) ** 2))
        pixels = (blob[..., None] * rng.uniform(0, 255, 3)).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")


def test_lfq_tokenizer_at_1024_codes_through_encode_and_a_prior(tmp_path):
    from stage1_vq.train import TokenizerRunConfig, train_tokenizer
    from stage2_prior import GPT, generate
    from stage2_prior.train import PriorRunConfig, train_prior
    from vqgpt.ground.config import load_config
    from vqgpt.ground.data import DataConfig
    from vqgpt.ground.tokens import read_meta
    from vqgpt.workflow.encode import encode_dataset

    write_images(tmp_path / "images")
    common = ["train.steps=3", "train.batch_size=8", "train.log_every=1", "train.warmup_steps=1",
              "train.checkpoint_every=0"]
    # the tiny VQ config switched to LFQ: its codebook_size (256) must go, like the EMA options
    tok_cfg = load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml", [
        *common, f"data.source={tmp_path / 'images'}", "data.resolution=16", "model.resolution=16",
        "model.attn_resolutions=[]", "model.quantizer.kind=lfq", "model.quantizer.lfq_dim=10",
        "model.quantizer.codebook_size=null", "model.quantizer.ema=false", "model.quantizer.kmeans_init=false",
        "model.quantizer.restart_threshold=0"])
    train_tokenizer(tok_cfg, tmp_path / "tok")
    metrics = [json.loads(line) for line in (tmp_path / "tok" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all(0 < m["usage"] <= 1 and m["perplexity"] >= 1 for m in metrics)
    assert all(m["sample_entropy"] >= 0 and m["codebook_entropy"] >= 0 for m in metrics)  # lfq's own terms logged
    tokenizer = VQModel.from_pretrained(tmp_path / "tok" / "export")
    assert isinstance(tokenizer.quantize, LFQ) and tokenizer.codebook_size == 1024

    tokens = encode_dataset(tmp_path / "tok" / "export", DataConfig(source=str(tmp_path / "images"), resolution=16),
                            tmp_path / "tokens", batch_size=8, progress=False)
    meta = read_meta(tokens)
    assert meta["codebook_size"] == 1024 and list(meta["grid_size"]) == [4, 4]

    prior_cfg = load_config(PriorRunConfig, ROOT / "configs/prior/tiny.yaml", [*common, f"tokens={tokens}"])
    train_prior(prior_cfg, tmp_path / "prior")
    prior = GPT.from_pretrained(tmp_path / "prior" / "export")
    assert prior.config.codebook_size == 1024  # sized from the shards
    assert prior.tok_embeddings.weight.shape[0] == 1024 and prior.output.weight.shape[0] == 1024
    grids = generate(prior, 2, class_labels=[0, 1], generator=torch.Generator().manual_seed(0))
    assert grids.shape == (2, 4, 4) and int(grids.max()) < 1024
    assert tokenizer.decode(grids).shape == (2, 3, 16, 16)
