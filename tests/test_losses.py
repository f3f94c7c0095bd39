"""Stage-1 losses and discriminator: known values, adaptive weight, perceptual loading, backward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from stage1_vq import (
    LossConfig,
    PatchDiscriminator,
    QuantizerConfig,
    VQModel,
    VQModelConfig,
    adaptive_weight,
    build_discriminator,
    build_perceptual,
    discriminator_loss,
    generator_loss,
)
from vqgpt.ground.config import ConfigError, from_dict



@pytest.fixture(scope="module")
def lpips_random():
    torch.manual_seed(0)
    return build_perceptual(LossConfig(perceptual="lpips-random"))


def tiny_model() -> VQModel:
    torch.manual_seed(0)
    return VQModel(VQModelConfig(channels=32, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[],
                                 resolution=32, z_channels=32, quantizer=QuantizerConfig(codebook_size=32)))


def images(seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


REAL = torch.tensor([2.0, 0.5, -1.0])
FAKE = torch.tensor([-2.0, 0.5, 1.0])


def test_discriminator_loss_known_values():
    hinge = discriminator_loss(REAL, FAKE, LossConfig(gan_loss="hinge"))
    # relu(1 - real) = [0, .5, 2] -> 2.5/3 ; relu(1 + fake) = [0, 1.5, 2] -> 3.5/3
    assert hinge.item() == pytest.approx(0.5 * (2.5 / 3 + 3.5 / 3))
    ns = discriminator_loss(REAL, FAKE, LossConfig(gan_loss="non-saturating"))
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    expected = 0.5 * (sum(softplus(-r) for r in REAL.tolist()) / 3 + sum(softplus(f) for f in FAKE.tolist()) / 3)
    assert ns.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind, expected", [("hinge", -(-2.0 + 0.5 + 1.0) / 3),
                                            ("non-saturating", sum(math.log1p(math.exp(-f)) for f in [-2.0, 0.5, 1.0]) / 3)])
def test_generator_adversarial_known_values(kind, expected):
    cfg = LossConfig(perceptual="none", gan_loss=kind, gan_weight=0.5, adaptive_gan_weight=False)
    x = images()
    rec = x + 0.1
    out = generator_loss(x, rec, torch.tensor(0.3), FAKE, None, cfg, step=0, last_layer_weight=torch.zeros(1))
    assert out.gan.item() == pytest.approx(expected, rel=1e-5)
    assert out.reconstruction.item() == pytest.approx(0.1, rel=1e-4)
    assert out.gan_weight.item() == pytest.approx(0.5)
    assert out.total.item() == pytest.approx(0.1 + 0.5 * expected + 0.3, rel=1e-4)


def test_adaptive_weight_positive_finite_and_zero_without_grad():
    model = tiny_model()
    disc = PatchDiscriminator(channels=8, n_layers=2, norm="group")
    x = images()
    rec = model(x).reconstruction
    nll = (rec - x).abs().mean()
    gan = -disc(rec).mean()
    w = adaptive_weight(nll, gan, model.last_layer_weight)
    assert torch.isfinite(w) and w.item() > 0 and not w.requires_grad
    with torch.no_grad():
        rec = model(x).reconstruction
        assert adaptive_weight((rec - x).abs().mean(), -disc(rec).mean(), model.last_layer_weight).item() == 0.0
    other = nn.Conv2d(32, 3, 3)
    with pytest.raises(ValueError, match="last_layer_weight"):
        adaptive_weight(nll, gan, other.weight)


def test_gan_term_off_before_disc_start_or_without_gan():
    model = tiny_model()
    x = images()
    rec = model(x).reconstruction
    logits = PatchDiscriminator(channels=8, n_layers=2)(rec)
    for cfg, step in [(LossConfig(perceptual="none", disc_start=100), 99), (LossConfig(perceptual="none", gan_weight=0.0), 500)]:
        out = generator_loss(x, rec, torch.tensor(0.0), logits, None, cfg, step, model.last_layer_weight)
        assert out.gan_weight.item() == 0.0
        torch.testing.assert_close(out.total, out.reconstruction)
    out = generator_loss(x, rec, torch.tensor(0.0), None, None, LossConfig(perceptual="none"), 10, model.last_layer_weight)
    assert out.gan.item() == 0.0 and out.gan_weight.item() == 0.0
    started = generator_loss(x, rec, torch.tensor(0.0), logits, None, LossConfig(perceptual="none", disc_start=100),
                             100, model.last_layer_weight)
    assert started.gan_weight.item() > 0


def test_generator_loss_backward_with_lpips_random(lpips_random):
    model = tiny_model().train()
    disc = build_discriminator(LossConfig(disc_layers=2, disc_channels=8))
    cfg = LossConfig(perceptual="lpips-random")
    x = images()
    out = model(x)
    loss = generator_loss(x, out.reconstruction, out.quantizer.loss, disc(out.reconstruction), lpips_random, cfg,
                          step=0, last_layer_weight=model.last_layer_weight)
    assert loss.perceptual.item() > 0 and torch.isfinite(loss.total)
    assert 0 < loss.gan_weight.item() <= cfg.gan_weight * 1e4
    loss.total.backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips_random.parameters())
    # the discriminator step: detached reconstructions, gradients reach only the discriminator
    d_loss = discriminator_loss(disc(x), disc(out.reconstruction.detach()), cfg)
    d_loss.backward()
    assert disc.main[0].weight.grad.abs().sum() > 0


def test_perceptual_is_frozen_and_zero_for_identical_images(lpips_random):
    assert all(not p.requires_grad for p in lpips_random.parameters())
    lpips_random.train()
    assert not lpips_random.training and not any(m.training for m in lpips_random.modules())
    x = images()
    with torch.no_grad():
        assert lpips_random(x, x).abs().max().item() < 1e-6
        assert lpips_random(x, images(seed=1)).min().item() > 0
    assert build_perceptual(LossConfig(perceptual="none")) is None
    assert build_perceptual(LossConfig(perceptual_weight=0.0)) is None


def test_local_vgg_weights_file_is_loaded(tmp_path, lpips_random):
    # a torchvision-style vgg16 `features.*` file made from a random backbone with known values
    torch.manual_seed(1)
    source = {}
    for key, value in lpips_random.net.net.state_dict().items():  # slice{s}.{i}.weight
        source["features." + key.split(".", 1)[1]] = torch.randn_like(value)
    source["classifier.0.weight"] = torch.zeros(2, 2)  # full vgg16 files carry a classifier too
    path = tmp_path / "vgg16.pth"
    torch.save(source, path)
    loaded = build_perceptual(LossConfig(perceptual="lpips-vgg", perceptual_weights_path=str(path)))
    for key, value in loaded.net.net.state_dict().items():
        assert torch.equal(value, source["features." + key.split(".", 1)[1]])
    # a full LPIPS state dict (lpips package / taming layout) loads too
    full = tmp_path / "lpips.pth"
    torch.save({k: v for k, v in loaded.net.state_dict().items() if not k.startswith("lins.")}, full)
    again = build_perceptual(LossConfig(perceptual_weights_path=str(full)))
    x = images()
    torch.testing.assert_close(again(x, images(seed=1)), loaded(x, images(seed=1)))
    bad = tmp_path / "bad.pth"
    torch.save({"something.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="bad.pth"):
        build_perceptual(LossConfig(perceptual_weights_path=str(bad)))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_perceptual(LossConfig(perceptual_weights_path=str(tmp_path / "missing.pth")))


def test_stlpips_loads_offline():
    """The trained shift-tolerant LPIPS ships in its wheel (the `test` extra installs it): it loads
    offline, without IPython, and ranks a slightly noisy copy closer than another image."""
    import sys

    perceptual = build_perceptual(LossConfig(perceptual="stlpips"))
    # the stand-in for stlpips' undeclared IPython import does not outlive the import
    assert sys.modules.get("IPython") is None or hasattr(sys.modules["IPython"], "__file__")
    x = images()
    with torch.no_grad():
        near = perceptual(x, (x + 0.05 * torch.randn_like(x)).clamp(-1, 1))
        far = perceptual(x, images(seed=1))
    assert (near < far).all() and all(not p.requires_grad for p in perceptual.parameters())
    # the trained linear heads were loaded (training keeps them >= 0; a random init has negatives)
    heads = [p for name, p in perceptual.named_parameters() if ".lin" in name]
    assert len(heads) == 5 and all(bool((h >= 0).all()) and bool((h > 0).any()) for h in heads)


@pytest.mark.parametrize("n_layers, norm, size", [(2, "batch", 6), (3, "batch", 2), (3, "none", 2), (2, "group", 6)])
def test_patch_discriminator_structure(n_layers, norm, size):
    torch.manual_seed(0)
    disc = PatchDiscriminator(in_channels=3, channels=16, n_layers=n_layers, norm=norm)
    assert disc(images()).shape == (2, 1, size, size)
    convs = [m for m in disc.main if isinstance(m, nn.Conv2d)]
    assert len(convs) == n_layers + 2
    # taming layout: main.0 conv + LeakyReLU, then (conv, norm, LeakyReLU) triples, a final conv
    assert isinstance(disc.main[0], nn.Conv2d) and isinstance(disc.main[-1], nn.Conv2d)
    assert (disc.main[2].bias is None) == (norm == "batch")
    assert abs(convs[1].weight.std().item() - 0.02) < 0.005


def test_bad_loss_config_values():
    with pytest.raises(ConfigError, match="gan_loss.*'wgan'"):
        from_dict(LossConfig, {"gan_loss": "wgan"})
    with pytest.raises(ValueError, match="perceptual.*'vgg'"):
        LossConfig(perceptual="vgg")
    with pytest.raises(ValueError, match="disc_norm"):
        LossConfig(disc_norm="actnorm")
    # a negative start was read as 0; the key is named as the loader names every key
    with pytest.raises(ConfigError, match=r"^loss\.disc_start: must be >= 0 .*got -5$"):
        from_dict(LossConfig, {"disc_start": -5}, prefix="loss")
    with pytest.raises(ConfigError, match=r"^loss\.gan_loss: must be one of"):
        from_dict(LossConfig, {"gan_loss": "vanilla"}, prefix="loss")
    with pytest.raises(ValueError, match="norm"):
        PatchDiscriminator(norm="instance")
