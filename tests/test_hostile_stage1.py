"""Hostile inputs to the tokenizer side: 16-bit and float images, files named like images that are
none, empty encodes, --crop-range out of bounds, and reconstruct's out folder and --num."""

from __future__ import annotations

import json
import math
import re
import tarfile
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stage1_vq import QuantizerConfig, VQModel, VQModelConfig
from stage1_vq.evaluate import reconstruct
from stage1_vq.train import TokenizerRunConfig, train_tokenizer
from vqgpt.cli.commands import main
from vqgpt.ground.config import ConfigError, load_config
from vqgpt.ground.data import DataConfig, build_dataset
from vqgpt.ground.images import open_rgb, to_rgb
from vqgpt.workflow.encode import MAX_CROP_RANGE, encode_dataset, ten_crop_size

R = 16
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = VQModelConfig(channels=8, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], resolution=R,
                           z_channels=4, norm_groups=4, quantizer=QuantizerConfig(codebook_size=32))
    return VQModel(config).eval().save_pretrained(tmp_path_factory.mktemp("tok") / "tokenizer")


def _noise(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (R + 4, R + 4, 3), dtype=np.uint8))


def _no_images(folder):
    """Files that are named like images but are none: text, an empty file, a truncated PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a-text.png").write_text("not an image\n")
    (folder / "b-empty.jpg").write_bytes(b"")
    whole = folder / "whole.png"
    _noise(99).save(whole)
    (folder / "c-truncated.png").write_bytes(whole.read_bytes()[:200])
    whole.unlink()
    return folder


def _grey(img: Image.Image) -> int:
    """The one grey level of a constant image, once read as RGB."""
    values = np.unique(np.asarray(to_rgb(img)))
    assert len(values) == 1, values
    return int(values[0])


# ------------------------------------------------------------------------------ 16-bit and float images


def test_16_bit_grey_is_scaled_by_its_bit_depth_not_its_brightest_pixel(tmp_path):
    for value, expected in [(255, 1), (256, 1), (32768, 128), (65535, 255)]:
        path = tmp_path / f"grey{value}.png"
        Image.fromarray(np.full((8, 8), value, np.uint16)).save(path)
        with Image.open(path) as img:
            assert img.mode.startswith("I;16")  # how Pillow opens a 16-bit grey PNG
        assert np.unique(np.asarray(open_rgb(path))).tolist() == [expected], value
    # big-endian 16-bit, and 32-bit 'I' holding 16-bit values (older Pillow opens 16-bit PNGs so)
    assert _grey(Image.frombytes("I;16B", (4, 4), np.full(16, 255, ">u2").tobytes())) == 1
    assert _grey(Image.fromarray(np.full((4, 4), 255, np.int32))) == 1
    assert _grey(Image.fromarray(np.full((4, 4), 65535, np.int32))) == 255
    # 'I' values beyond 16 bits have no known scale: stretched
    wide = np.asarray(to_rgb(Image.fromarray(np.array([[-5, 70000]], np.int32))))[..., 0]
    assert wide.tolist() == [[0, 255]]


def test_float_images_in_0_1_are_read_as_such_and_others_stretched():
    assert _grey(Image.fromarray(np.full((4, 4), 0.5, np.float32))) == 128
    assert _grey(Image.fromarray(np.full((4, 4), 1.0, np.float32))) == 255
    assert _grey(Image.fromarray(np.full((4, 4), 0.0, np.float32))) == 0
    ramp = np.asarray(to_rgb(Image.fromarray(np.array([[-5.0, 0.0, 40.0]], np.float32))))[0, :, 0]
    assert ramp.tolist() == [0, 28, 255]  # outside [0, 1]: stretched from minimum to maximum


# ------------------------------------------------------------------------------------------ encode


def test_encode_of_a_source_without_a_readable_image_fails_and_leaves_no_folder(tokenizer_dir, tmp_path, capsys):
    source = _no_images(tmp_path / "imgs")
    out = tmp_path / "codes"
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        with pytest.raises(ValueError, match=r"no image of .*imgs \(train split\) could be read: 3 items failed to "
                                             r"decode \(a-text.png, b-empty.jpg, c-truncated.png\)"):
            encode_dataset(tokenizer_dir, DataConfig(source=str(source), resolution=R), out, device="cpu",
                           progress=False)
    assert not out.exists()

    # an existing (empty) folder is kept, but holds no meta.json claiming a finished encode (one holding other
    # files is refused before: test_hostile_tokens)
    out.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["encode", "--tokenizer", str(tokenizer_dir), "--data", str(source), "--out", str(out)]) == 2
    assert "3 items failed to decode" in capsys.readouterr().err
    assert out.is_dir() and sorted(p.name for p in out.iterdir() if p.name != ".lock") == []  # (.lock: encode's)


def test_crop_range_is_bounded(tokenizer_dir, tmp_path):
    assert ten_crop_size(R, 1.0) == R and ten_crop_size(R, MAX_CROP_RANGE) == 2 * R
    source = tmp_path / "imgs"
    source.mkdir()
    _noise(0).save(source / "0.png")
    for bad in (0.5, 0.0, -1.0, 2.5, 1000.0, math.inf, math.nan):
        for augment in ("ten-crop", "none"):
            with pytest.raises(ValueError, match=r"--crop-range must be between 1 and 2 .*got"):
                encode_dataset(tokenizer_dir, DataConfig(source=str(source), resolution=R), tmp_path / "codes",
                               device="cpu", progress=False, augment=augment, crop_range=bad)
    assert not (tmp_path / "codes").exists()


# ------------------------------------------------------------------------------------------- shard


def test_shard_of_a_folder_leaves_out_files_that_are_no_image(tmp_path, capsys):
    source = _no_images(tmp_path / "imgs")
    for k in range(2):
        _noise(k).save(source / f"good{k}.png")
    assert main(["shard", str(source), str(tmp_path / "out"), "--per-shard", "10"]) == 0
    captured = capsys.readouterr()
    assert "left out 3 items that are no image" in captured.err
    for name in ("a-text.png", "b-empty.jpg", "c-truncated.png"):
        assert name in captured.err
    assert "wrote 2 images" in captured.out
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        names = [json.loads(tar.extractfile(m).read())["name"] for m in tar if m.name.endswith(".json")]
    assert names == ["good0.png", "good1.png"]

    # nothing readable: an error, not shards of text
    bad = _no_images(tmp_path / "bad")
    assert main(["shard", str(bad), str(tmp_path / "out2"), "--per-shard", "10"]) == 2
    assert "no readable image" in capsys.readouterr().err
    assert not list((tmp_path / "out2").glob("shard-*.tar"))


# --------------------------------------------------------------------------------------- reconstruct


def test_reconstruct_again_into_a_folder_replaces_the_earlier_reconstructions(tokenizer_dir, tmp_path):
    source = tmp_path / "imgs"
    source.mkdir()
    for k in range(5):
        _noise(k).save(source / f"{k}.png")
    out = tmp_path / "out"
    first = reconstruct(tokenizer_dir, str(source), out, num_images=5, lpips="none", device="cpu", progress=False)
    assert first["num_images"] == 5 and len(list((out / "images").glob("*.png"))) == 5
    (out / "images" / "mine.png").write_bytes(b"the user's")
    (out / "images" / "notes.txt").write_text("the user's")
    second = reconstruct(tokenizer_dir, str(source), out, num_images=3, lpips="none", device="cpu", progress=False)
    assert second["num_images"] == 3
    assert json.loads((out / "metrics.json").read_text())["num_images"] == 3
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000.png", "00001.png", "00002.png",
                                                                  "mine.png", "notes.txt"]


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_reconstruct_num_counts_readable_images(tokenizer_dir, tmp_path):
    source = tmp_path / "imgs"
    source.mkdir()
    (source / "0-text.png").write_text("not an image\n")  # first in the folder's order
    for k in range(1, 4):
        _noise(k).save(source / f"{k}.png")
    for num in (1, 2, 3):
        with pytest.warns(UserWarning, match="left out 1 image that failed to decode: .*0-text.png"):
            metrics = reconstruct(tokenizer_dir, str(source), tmp_path / f"out{num}", num_images=num, lpips="none",
                                  device="cpu", progress=False, batch_size=2)
        assert metrics["num_images"] == num
        assert len(list((tmp_path / f"out{num}" / "images").glob("*.png"))) == num
    # more than the folder holds: every readable image
    with pytest.warns(UserWarning, match="left out 1 image"):
        metrics = reconstruct(tokenizer_dir, str(source), tmp_path / "all", num_images=10, lpips="none",
                              device="cpu", progress=False, batch_size=2)
    assert metrics["num_images"] == 3


def test_a_missing_lpips_weights_file_is_an_error_not_a_null_figure(tmp_path):
    from stage1_vq.evaluate import load_lpips

    with pytest.raises(FileNotFoundError, match=r"--lpips .*nothing\.pth: no such weights file"):
        load_lpips(str(tmp_path / "nothing.pth"), torch.device("cpu"))
    assert load_lpips("none", torch.device("cpu")) is None


# ------------------------------------------------------------------------------------------ shard


def test_an_interrupted_shard_run_leaves_no_shard_to_be_read_as_the_whole_set(tmp_path, monkeypatch):
    import vqgpt.ground.shard_writer as shard_writer

    source = tmp_path / "imgs"
    source.mkdir()
    for k in range(7):
        _noise(k).save(source / f"{k}.png")
    out = tmp_path / "shards"
    original, seen = shard_writer._sample, []

    def interrupted_at_the_sixth(dataset, index):
        seen.append(index)
        if len(seen) == 6:  # two shards of 2 closed, the third being written
            raise KeyboardInterrupt
        return original(dataset, index)

    monkeypatch.setattr(shard_writer, "_sample", interrupted_at_the_sixth)
    with pytest.raises(KeyboardInterrupt):
        shard_writer.write_shards(str(source), out, per_shard=2, progress=False)
    assert not list(out.glob("*.tar"))  # nothing that wds:OUT would take for a complete set of 4 images
    monkeypatch.setattr(shard_writer, "_sample", original)
    report = shard_writer.write_shards(str(source), out, per_shard=2, progress=False)  # continues after the two closed shards
    assert report.count == 7 and [p.name for p in report.shards] == [f"shard-00000{i}.tar" for i in range(4)]
    # no .partial; the finished set's record beside it
    assert sorted(p.name for p in out.iterdir()) == [".shards.json", "classes.json", *(p.name for p in report.shards)]
    assert len(build_dataset(DataConfig(source=f"wds:{out}", resolution=R, random_crop=False), "train")) == 7


def test_reconstruct_at_a_size_the_tokenizer_cannot_encode_leaves_out_untouched(tokenizer_dir, tmp_path):
    out = tmp_path / "out"  # (the factor is 2: 17 is no multiple of it)
    with pytest.raises(ValueError, match=r"image size 17x17 is not divisible by the downsampling factor 2"):
        reconstruct(tokenizer_dir, "builtin:mnist", out, num_images=2, resolution=17, lpips="none", progress=False)
    assert not out.exists()  # it held images/, .lock and .reconstruct.json


def test_training_at_another_size_than_model_resolution_says_what_the_export_defaults_to(tmp_path):
    """encode / reconstruct without --resolution use the export's model.resolution, which their help called
    the training size; a run that trains at another data.resolution now says so."""
    cfg = load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml",
                      ["data.resolution=16", "train.steps=1", "train.batch_size=2", "train.sample_every=0",
                       "train.checkpoint_every=0", "train.log_every=1"])
    assert cfg.model.resolution == 32
    with pytest.warns(UserWarning, match=r"data.resolution=16 differs from model.resolution=32: encode, reconstruct "
                                         r"and eval-tokenizer default to model.resolution"):
        train_tokenizer(cfg, tmp_path / "run")


def test_a_discriminator_that_never_starts_is_named(tmp_path):
    """`--set train.steps=200000` on a config whose discriminator starts at 250001 trained no GAN step
    without a word; a negative start was read as 0, and disc_lr_ratio=0 left the discriminator untrained."""
    short = ["train.steps=1", "train.batch_size=2", "train.sample_every=0", "train.checkpoint_every=0"]
    cfg = load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml", [*short, "loss.disc_start=1"])
    with pytest.warns(UserWarning, match=r"loss.disc_start=1 is not before train.steps=1: this run trains no step "
                                         r"with the adversarial loss"):
        train_tokenizer(cfg, tmp_path / "late")
    cfg = load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml", [*short, "loss.disc_start=0"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_tokenizer(cfg, tmp_path / "on_time")
    assert not [w for w in caught if "disc_start" in str(w.message)]
    for override, said in [("loss.disc_start=-1", "loss.disc_start: must be >= 0"),
                           ("disc_lr_ratio=0", "disc_lr_ratio: must be a finite number > 0")]:
        with pytest.raises(ConfigError, match=re.escape(said)):
            load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml", [override])


def test_a_discriminator_too_deep_for_the_images_is_refused_before_training():
    """A 3-layer PatchGAN on 16 px images passed the checks, trained and checkpointed until loss.disc_start, then
    failed in a convolution ("Calculated padded input size per channel: (3 x 3). Kernel size: (4 x 4)")."""
    sixteen = ["data.resolution=16", "model.resolution=16", "loss.disc_start=5", "train.steps=10"]
    with pytest.raises(ConfigError, match=r"loss.disc_layers: a PatchGAN of 3 layers needs images of at least 24 px, "
                                          r"and data.resolution is 16: set loss.disc_layers to 2 or less"):
        load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml", [*sixteen, "loss.disc_layers=3"])
    # a smaller PatchGAN, none, or a run that ends before the discriminator starts (tiny.yaml's own case)
    for fine in (["loss.disc_layers=2"], ["loss.disc_layers=3", "loss.gan_weight=0"],
                 ["loss.disc_layers=3", "train.steps=5"]):
        load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml", [*sixteen, *fine])
    # the bound is the network's own: one pixel less fails in it
    from stage1_vq.discriminator import PatchDiscriminator, min_resolution
    for layers in (1, 2, 3):
        net, side = PatchDiscriminator(3, 4, layers, "none"), min_resolution(layers)
        assert net(torch.zeros(1, 3, side, side)).shape[-1] == 1
        with pytest.raises(RuntimeError, match="Kernel size"):
            net(torch.zeros(1, 3, side - 1, side - 1))


def test_perceptual_weights_that_cannot_be_read_are_one_error_naming_the_key(tmp_path):
    """A text file as loss.perceptual_weights_path was a KeyError traceback, random bytes named .safetensors a
    SafetensorError one, and a folder 'does not exist'."""
    from stage1_vq.losses import LossConfig, build_perceptual
    (tmp_path / "junk.pth").write_text("not weights\n")
    (tmp_path / "junk.safetensors").write_bytes(bytes(range(256)) * 4)
    for name in ("junk.pth", "junk.safetensors"):
        cfg = LossConfig(perceptual="lpips-vgg", perceptual_weights_path=str(tmp_path / name))
        with pytest.raises(ConfigError, match=rf"loss.perceptual_weights_path: .*{re.escape(name)} cannot be read as "
                                              r"weights \(\w+: .*\): give torchvision vgg16 weights"):
            build_perceptual(cfg)
    cfg = LossConfig(perceptual="lpips-vgg", perceptual_weights_path=str(tmp_path))
    with pytest.raises(IsADirectoryError, match=r"loss.perceptual_weights_path: .* is a folder: give the weights file"):
        build_perceptual(cfg)


def test_keys_the_architecture_does_not_read_are_named_when_training(tmp_path):
    """`--set model.patch_size=2` on a conv tokenizer (to change its factor) trained and exported at factor 4."""
    cfg = load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml",
                      ["model.patch_size=2", "model.vit_dim=7", "train.steps=1", "train.batch_size=2",
                       "train.sample_every=0", "train.checkpoint_every=0"])
    with pytest.warns(UserWarning, match=r"model.architecture=conv does not read model.patch_size, model.vit_dim: "
                                         r"setting them changes nothing"):
        train_tokenizer(cfg, tmp_path / "run")
    vit = replace(cfg.model, architecture="vit", patch_size=8, vit_dim=16, vit_heads=2)
    assert vit.ignored_keys() == ["channels", "channel_mult", "num_res_blocks", "attn_resolutions", "norm_groups"]
    pixels = replace(vit, architecture="pixels", quantizer=QuantizerConfig(codebook_size=16))
    assert pixels.ignored_keys()[-1] == "z_channels"
    assert VQModelConfig().ignored_keys() == []


def test_loss_settings_that_are_not_read_are_named_when_training(tmp_path):
    """A VGG weights file beside perceptual 'lpips-random' (even one that does not exist) trained on the random
    backbone without a word; so did discriminator options without a GAN."""
    cfg = load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml",
                      [f"loss.perceptual_weights_path={tmp_path / 'vgg.pth'}", "loss.gan_weight=0",
                       "loss.disc_layers=5", "train.steps=1", "train.batch_size=2", "train.sample_every=0",
                       "train.checkpoint_every=0"])
    from stage1_vq.losses import LossConfig

    assert cfg.loss.perceptual == "none"  # (the tiny config's)
    with pytest.warns(UserWarning, match=r"loss.perceptual=none, .*loss.gan_weight=0: loss.perceptual_weights_path, "
                                         r"loss.disc_start, loss.disc_layers, .* are not read"):
        train_tokenizer(cfg, tmp_path / "run")
    assert LossConfig(perceptual="stlpips", perceptual_weights_path="w.pth").ignored_keys() == []
    assert LossConfig(perceptual="lpips-random", perceptual_weights_path="w.pth").ignored_keys() == [
        "perceptual_weights_path"]
    unread = LossConfig(perceptual_weight=0, perceptual_weights_path="w.pth").ignored_keys()
    assert unread == ["perceptual_weights_path"]


def test_another_quantizer_kinds_options_are_named_when_training(tmp_path):
    """rvq_depth=3 with kind vq trained plain VQ without a word (and the export recorded the depth)."""
    cfg = load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml",
                      ["model.quantizer.rvq_depth=3", "model.quantizer.lfq_dim=5", "train.steps=1",
                       "train.batch_size=2", "train.sample_every=0", "train.checkpoint_every=0"])
    with pytest.warns(UserWarning, match=r"model.quantizer.kind=vq does not read model.quantizer.rvq_depth, "
                                         r"model.quantizer.lfq_dim: setting them changes nothing"):
        train_tokenizer(cfg, tmp_path / "run")
    assert QuantizerConfig(kind="rvq", rvq_depth=3, fsq_levels=[4, 3]).ignored_keys() == ["fsq_levels"]
    assert QuantizerConfig(kind="fsq", fsq_levels=[4, 3]).ignored_keys() == []
    # the loss and learned-codebook options of the other kinds too (each was taken without a word)
    assert QuantizerConfig(kind="fsq", beta=1.0, ema_decay=0.5, kmeans_iters=3).ignored_keys() == [
        "beta", "ema_decay", "kmeans_iters"]
    assert QuantizerConfig(kind="lfq", beta=1.0, ema_decay=0.5, entropy_temperature=0.3).ignored_keys() == [
        "ema_decay", "entropy_temperature"]  # (beta: lfq's commitment loss reads it)
    assert QuantizerConfig(kind="vq", lfq_temperature=0.01, lfq_sample_entropy_weight=0.2,
                           lfq_codebook_entropy_weight=1.0).ignored_keys() == [
        "lfq_temperature", "lfq_sample_entropy_weight", "lfq_codebook_entropy_weight"]
    assert QuantizerConfig(kind="rvq", ema_decay=0.5, kmeans_iters=3, entropy_temperature=0.3).ignored_keys() == []


def test_an_encode_into_a_folder_another_encode_is_writing_is_refused(tokenizer_dir, tmp_path):
    """encode took no lock: an `encode --overwrite` started beside a running one deleted its shards, and both
    reported success."""
    import os

    from vqgpt.training.run_folder import RunFolderError, RunLock

    source = tmp_path / "imgs"
    source.mkdir()
    for k in range(4):
        _noise(k).save(source / f"{k}.png")
    out = tmp_path / "codes"
    data = DataConfig(source=str(source), resolution=R)
    encode_dataset(tokenizer_dir, data, out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"}
    running = RunLock(out)
    running.acquire()  # another encode, mid-way
    try:
        with pytest.raises(RunFolderError, match=rf"{out} is in use by pid {os.getpid()}"):
            encode_dataset(tokenizer_dir, data, out, overwrite=True, progress=False)
    finally:
        running.release()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"} == before
    encode_dataset(tokenizer_dir, data, out, overwrite=True, progress=False)  # once it has ended
