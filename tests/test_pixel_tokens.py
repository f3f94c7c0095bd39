"""Pixel tokens (Image GPT style): the palette tokenizer, its k-means fit, and the whole workflow on it."""

import json
import math
import warnings
from pathlib import Path

import numpy
import pytest
import torch

from stage1_vq.model import VQModel, VQModelConfig
from stage1_vq.palette import kmeans
from stage1_vq.quantizers import QuantizerConfig
from stage1_vq.train import TokenizerRunConfig
from stage2_prior.train import PriorRunConfig
from vqgpt.ground.config import load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]


def pixel_model(colours: torch.Tensor, resolution: int = 8) -> VQModel:
    model = VQModel(VQModelConfig(architecture="pixels", resolution=resolution,
                                  quantizer=QuantizerConfig(codebook_size=len(colours))))
    model.quantize.palette.copy_(colours)
    return model.eval()


def brute_force_nearest(pixels: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """Reference: every pixel against every colour, in float64, one at a time."""
    p64, c64 = pixels.double(), palette.double()
    return torch.tensor([int(((c64 - p).pow(2).sum(-1)).argmin()) for p in p64])


def test_pixels_model_is_only_a_palette():
    model = pixel_model(torch.rand(8, 3) * 2 - 1)
    assert list(model.state_dict()) == ["quantize.palette"]
    assert model.downsample_factor == 1 and model.codebook_size == 8
    assert model.encode(torch.zeros(2, 3, 5, 7)).shape == (2, 5, 7)  # any size: one token per pixel


def test_palette_round_trip_even_for_close_colours(tmp_path):
    # Two colours 1e-4 apart: the ||c||^2 - 2 x.c shortcut rounds them together in float32; the palette
    # lookup must still map each colour back to its own index.
    gen = torch.Generator().manual_seed(0)
    colours = torch.rand(32, 3, generator=gen) * 1.8 - 0.9
    colours[1] = colours[0] + torch.tensor([1e-4, 0.0, 0.0])
    colours[3] = colours[2] - torch.tensor([0.0, 5e-5, 5e-5])
    model = pixel_model(colours)
    codes = torch.randint(0, 32, (4, 8, 8), generator=gen)
    codes[0, 0, :4] = torch.tensor([0, 1, 2, 3])
    assert torch.equal(model.encode(model.decode(codes)), codes)
    # the export (config.json + safetensors) holds the same tokenizer
    loaded = VQModel.from_pretrained(model.save_pretrained(tmp_path / "tok"))
    assert loaded.config.architecture == "pixels"
    assert torch.equal(loaded.encode(model.decode(codes)), codes)
    assert torch.equal(loaded.decode(codes), model.decode(codes))


def test_nearest_colour_matches_brute_force():
    gen = torch.Generator().manual_seed(1)
    colours = torch.rand(64, 3, generator=gen) * 2 - 1
    images = torch.rand(3, 3, 8, 8, generator=gen) * 2 - 1
    model = pixel_model(colours)
    codes = model.encode(images)
    expected = brute_force_nearest(images.permute(0, 2, 3, 1).reshape(-1, 3), colours).view(3, 8, 8)
    assert torch.equal(codes, expected)
    # decode gives those colours, clamped to the image range
    assert torch.equal(model.decode(codes), colours[expected].permute(0, 3, 1, 2))


def colour_blobs(n: int, seed: int) -> torch.Tensor:
    """n pixels spread around 12 colours (a stand-in for an image's colours, with no exact K clusters)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.rand(12, 3, generator=gen) * 1.6 - 0.8
    which = torch.randint(0, 12, (n,), generator=gen)
    return (centres[which] + 0.2 * torch.randn(n, 3, generator=gen)).clamp(-1, 1)


def distortion(pixels: torch.Tensor, palette: torch.Tensor) -> float:
    return float((pixels - palette[brute_force_nearest(pixels, palette)]).pow(2).sum(-1).mean())


def test_kmeans_beats_random_palettes():
    pixels = colour_blobs(3000, seed=0)
    fit = kmeans(pixels, 8, iterations=10, init="random", seed=0, progress=False)
    assert fit.palette.shape == (8, 3) and fit.num_pixels == 3000 and int(fit.counts.sum()) == 3000
    # Lloyd iterations never increase the distortion, and lower it from the initial palette
    assert all(b <= a + 1e-6 for a, b in zip(fit.distortion, fit.distortion[1:])), fit.distortion
    assert fit.distortion[-1] < fit.distortion[0]
    assert distortion(pixels, fit.palette) == pytest.approx(fit.distortion[-1], rel=1e-4)
    gen = torch.Generator().manual_seed(3)
    random_palettes = [pixels[torch.randperm(len(pixels), generator=gen)[:8]] for _ in range(5)]
    best_random = min(distortion(pixels, p) for p in random_palettes)
    assert fit.distortion[-1] < 0.75 * best_random, (fit.distortion[-1], best_random)
    assert kmeans(pixels, 8, iterations=10, seed=0, progress=False).distortion[-1] < 0.75 * best_random  # k-means++


def test_palette_colours_stay_distinct_with_few_colours():
    # 3 distinct grey levels, 8 colours wanted: the palette holds them plus distinct colours no pixel hits
    pixels = torch.tensor([[-1.0] * 3, [0.0] * 3, [1.0] * 3]).repeat(100, 1)
    fit = kmeans(pixels, 8, iterations=3, progress=False)
    assert len(torch.unique(fit.palette, dim=0)) == 8
    assert fit.distortion[-1] == 0.0 and int((fit.counts > 0).sum()) == 3
    model = pixel_model(fit.palette.clamp(-1, 1))
    codes = torch.arange(8).view(1, 2, 4)
    assert torch.equal(model.encode(model.decode(codes)), codes)


def test_coinciding_colours_are_split():
    from stage1_vq.palette import _distinct

    colours = torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5], [-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    pixels = torch.tensor([[0.5] * 3, [-1.0] * 3, [0.9, 0.0, 0.0]])
    split = _distinct(colours, pixels, torch.Generator().manual_seed(0))
    assert len(torch.unique(split, dim=0)) == 4
    assert {tuple(c) for c in split[:2].tolist()} == {(0.5, 0.5, 0.5), (-1.0, -1.0, -1.0)}  # the first of each kept
    assert torch.equal(split[2], pixels[2])  # then the pixel farthest from the kept colours


@pytest.mark.parametrize("key, value, named", [("ema", True, "quantizer.ema"), ("l2_norm", True, "quantizer.l2_norm"),
                                               ("codebook_dim", 4, "codebook_dim")])
def test_pixels_refuse_learning_options(key, value, named):
    with pytest.raises(ValueError, match=named):
        VQModelConfig(architecture="pixels", quantizer=QuantizerConfig(codebook_size=16, **{key: value}))
    with pytest.raises(ValueError, match="quantizer.kind must be 'vq'"):
        VQModelConfig(architecture="pixels", quantizer=QuantizerConfig(kind="fsq"))


def test_the_gradient_training_keys_a_palette_fit_does_not_read_are_named(tmp_path):
    """loss.*, the quantizer's learning options and train.lr/steps/... were taken without a word by a pixel
    tokenizer, whose palette is fitted by k-means."""
    from stage1_vq.train import train_tokenizer

    small = ["model.resolution=8", "data.resolution=8", "model.quantizer.codebook_size=4", "palette.sample_pixels=500",
             "palette.iterations=1"]
    cfg = load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/pixels_digits.yaml",
                      [*small, "model.quantizer.beta=0.9", "loss.gan_weight=0.5", "train.lr=0.5", "train.steps=50"])
    with pytest.warns(UserWarning, match=r"model.architecture=pixels fits a palette by k-means, nothing by gradients: "
                                         r"loss.gan_weight, train.steps, train.lr, model.quantizer.beta are not read"):
        train_tokenizer(cfg, tmp_path / "set")
    with warnings.catch_warnings():  # the shipped config and what a fit reads (seed, batch size): nothing to say
        warnings.filterwarnings("error", message=".*fits a palette")
        train_tokenizer(load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/pixels_digits.yaml",
                                    [*small, "train.seed=3", "train.batch_size=16"]), tmp_path / "plain")


def test_pixel_demo_configs_equal_the_yaml_files():
    from vqgpt.cli.demo import pixel_demo_prior_config, pixel_demo_tokenizer_config

    assert (to_dict(load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/pixels_digits.yaml"))
            == to_dict(pixel_demo_tokenizer_config()))
    assert (to_dict(load_config(PriorRunConfig, ROOT / "configs/prior/pixels_digits.yaml"))
            == to_dict(pixel_demo_prior_config()))
    big = load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/pixels_512.yaml")
    assert big.model.architecture == "pixels" and big.model.quantizer.codebook_size == 512
    assert big.model.resolution == big.data.resolution == 32


def test_pixel_tokens_end_to_end(tmp_path, capsys):
    """tokenizer (palette fit) -> encode -> prior -> sample -> complete -> wider canvas -> bits per dim, by the CLI."""
    from vqgpt.cli import main
    from vqgpt.ground.config import ConfigError
    from vqgpt.ground.data import DataConfig, build_dataset
    from vqgpt.ground.images import tensor_to_pil
    from vqgpt.workflow.pipeline import VQGPTPipeline

    colours = 8
    tok = ["--config", str(ROOT / "configs/tokenizer/pixels_digits.yaml"), "--set", "model.resolution=8",
           "--set", "data.resolution=8", "--set", f"model.quantizer.codebook_size={colours}",
           "--set", "palette.sample_pixels=5000", "--set", "palette.iterations=5"]
    assert main(["train-tokenizer", *tok, "--out", str(tmp_path / "tok")]) == 0
    export = tmp_path / "tok" / "export"
    records = [json.loads(line) for line in (tmp_path / "tok" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7)) and records[-1]["psnr"] > 20
    weights = (export / "model.safetensors").read_bytes()
    # --resume auto on the finished fit re-exports the same palette without fitting again
    assert main(["train-tokenizer", *tok, "--out", str(tmp_path / "tok"), "--resume", "auto"]) == 0
    assert (export / "model.safetensors").read_bytes() == weights
    assert len((tmp_path / "tok" / "metrics.jsonl").read_text().splitlines()) == len(records)

    codes_dir = str(tmp_path / "codes")
    assert main(["encode", "--tokenizer", str(export), "--data", "builtin:mnist", "--out", codes_dir]) == 0
    meta = json.loads((tmp_path / "codes" / "meta.json").read_text())
    assert meta["grid_size"] == [8, 8] and meta["codebook_size"] == colours
    assert main(["train-prior", "--config", str(ROOT / "configs/prior/tiny.yaml"), "--set", "conditional=false",
                 "--set", "train.steps=60", "--set", "train.checkpoint_every=0", "--set", "train.log_every=20",
                 "--tokens", codes_dir, "--tokenizer", str(export), "--out", str(tmp_path / "prior")]) == 0
    pipeline = tmp_path / "prior" / "pipeline"

    assert main(["sample", "--pipeline", str(pipeline), "--num", "4", "--out", str(tmp_path / "s.png")]) == 0
    digit = build_dataset(DataConfig(source="builtin:mnist", resolution=8), "eval")[0][0]
    tensor_to_pil(digit).save(tmp_path / "digit.png")
    assert main(["complete", "--pipeline", str(pipeline), "--image", str(tmp_path / "digit.png"), "--keep-rows", "4",
                 "--num", "2", "--out", str(tmp_path / "c.png")]) == 0
    pipe = VQGPTPipeline.from_pretrained(pipeline)
    completed = pipe.complete(digit, 2, keep_rows=4, seed=0)
    codes = pipe.tokenizer.encode(digit[None])
    assert torch.equal(pipe.tokenizer.encode(completed)[:, :4], codes[:, :4].expand(2, -1, -1))  # kept rows unchanged
    wide = pipe.generate(2, height=8, width=16, seed=0)  # a larger canvas than trained: sliding windows
    assert wide.shape == (2, 3, 8, 16)
    assert set(pipe.tokenizer.encode(wide).unique().tolist()) <= set(range(colours))

    capsys.readouterr()
    assert main(["eval-bpd", "--pipeline", str(pipeline), "--images", "builtin:mnist", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_images"] == 500 and report["grid"] == [8, 8] and not report["class_conditional"]
    assert report["bits_per_pixel"] == pytest.approx(report["bits_per_token"])  # one token per RGB pixel
    assert report["bits_per_dim"] == pytest.approx(report["bits_per_token"] / 3)
    uniform = math.log2(colours) / 3
    assert report["uniform_bits_per_dim"] == pytest.approx(uniform)
    assert 0 < report["bits_per_dim"] < 0.8 * uniform, report
    # the same NLL straight from the prior's logits on the held-out digits' codes
    heldout = torch.stack([item[0] for item in build_dataset(DataConfig(source="builtin:mnist", resolution=8), "eval")])
    tokens = pipe.tokenizer.encode(heldout).flatten(1)
    with torch.no_grad():
        nats = torch.nn.functional.cross_entropy(pipe.prior(tokens).flatten(0, 1), tokens.flatten())
    assert report["bits_per_token"] == pytest.approx(float(nats) / math.log(2), rel=1e-4)

    # another palette's codes mean other colours: the prior is refused with it
    assert main(["train-tokenizer", *tok, "--set", "train.seed=1", "--set", "palette.init=random",
                 "--out", str(tmp_path / "tok2")]) == 0
    with pytest.raises(ConfigError, match="tokenizer"):
        VQGPTPipeline.from_parts(tmp_path / "tok2" / "export", pipeline / "prior")


def test_pixel_demo_writes_every_output(tmp_path, monkeypatch):
    """`vqgpt demo --tokenizer pixels` on shrunken configs (8x8 digits, a 40-step prior): files and figures."""
    from dataclasses import replace

    import vqgpt.cli.demo as demo
    from vqgpt.cli import main

    tok_cfg, prior_cfg = demo.pixel_demo_tokenizer_config(), demo.pixel_demo_prior_config(quick=True)
    tiny_tok = replace(tok_cfg, model=replace(tok_cfg.model, resolution=8), data=replace(tok_cfg.data, resolution=8),
                       palette=replace(tok_cfg.palette, sample_pixels=5000, iterations=5))
    tiny_prior = replace(prior_cfg, model=replace(prior_cfg.model, n_layer=2, dim=64),
                         train=replace(prior_cfg.train, steps=40, mixed_precision="no"))
    monkeypatch.setattr(demo, "pixel_demo_tokenizer_config", lambda: tiny_tok)
    monkeypatch.setattr(demo, "pixel_demo_prior_config", lambda quick=False: tiny_prior)
    out = tmp_path / "demo"
    assert main(["demo", "--tokenizer", "pixels", "--quick", "--out", str(out)]) == 0
    for name in ("report.md", "metrics.json", "samples.png", "completions.png", "reconstruction/grid.png",
                 "pipeline/tokenizer/model.safetensors", "pipeline/prior/model.safetensors", "tokens/meta.json"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    assert m["tokenizer"]["tokens_per_image"] == 64 and m["prior"]["num_images"] == 500
    assert m["prior"]["uniform_bits_per_dim"] == pytest.approx(math.log2(16) / 3)
    assert 0 < m["prior"]["bits_per_dim"] < m["prior"]["uniform_bits_per_dim"]
    from PIL import Image

    # 10 rows (one held-out digit each) x 6 columns (the given half, 4 completions, the original), padding 2
    grid = torch.from_numpy(numpy.array(Image.open(out / "completions.png").convert("L"))).float()
    assert grid.shape == (10 * 8 + 11 * 2, 6 * 8 + 7 * 2)

    def cell(row: int, col: int) -> torch.Tensor:
        return grid[2 + 10 * row: 10 + 10 * row, 2 + 10 * col: 10 + 10 * col]

    for row in range(10):
        assert (cell(row, 0)[4:] - 127.5).abs().max() <= 1  # the given image: its lower half greyed out
        assert all((cell(row, col)[4:] - 127.5).abs().max() > 1 for col in range(1, 5))  # completions draw it
    assert f"{m['prior']['bits_per_dim']:.3f} bits per dim" in (out / "report.md").read_text()


@pytest.mark.parametrize("edit, message", [
    # (non-finite values are refused in any export's weights, before the palette's own checks)
    (lambda p: p[3].fill_(float("nan")), r": NaN or inf values in model.safetensors: quantize.palette \(3 of 24"),
    (lambda p: p[2, 1].fill_(float("inf")), r": NaN or inf values in .*: quantize.palette \(1 of 24 values"),
    (lambda p: p[5].copy_(p[1]), r"/model.safetensors: palette colour 5 encodes as colour 1 .*must be distinct"),
    (lambda p: p[0].fill_(3.0), r"/model.safetensors: palette colour 0 is \[3.0, 3.0, 3.0\], outside the pixel range"),
])
def test_a_hand_edited_palette_is_refused_on_loading(tmp_path, edit, message):
    """A NaN colour was the nearest of every pixel (all codes 3, decoded as NaN); a duplicate never encodes
    to its own index: both loaded without a word."""
    from safetensors.torch import load_file, save_file

    fitted = kmeans(torch.rand(500, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1, 8, progress=False)
    pixel_model(fitted.palette).save_pretrained(tmp_path / "tok")
    assert torch.equal(VQModel.from_pretrained(tmp_path / "tok").quantize.palette, fitted.palette)  # as fitted: fine
    weights = tmp_path / "tok" / "model.safetensors"
    state = load_file(weights)
    edit(state["quantize.palette"])
    save_file(state, weights)
    with pytest.raises(ValueError, match=rf"tok{message}"):
        VQModel.from_pretrained(tmp_path / "tok")
