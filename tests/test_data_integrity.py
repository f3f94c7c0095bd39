"""Nothing silently mixed or counted twice: encode refuses changed data, exports with a missing or broken
file give one line naming it, and an undecodable image is skipped (never replaced) everywhere."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from stage1_vq import QuantizerConfig, VQModel, VQModelConfig
from stage2_prior import GPT, GPTConfig
from vqgpt.ground.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from vqgpt.cli import main
from vqgpt.ground.config import ConfigError, load_config
from vqgpt.ground.data import (DataConfig, FolderImageDataset, Unreadable, UnreadableImageWarning, build_dataset,
                        collate_images, iterate_images)
from vqgpt.workflow.encode import encode_dataset
from vqgpt.ground.tokens import TokenDataset, TokenShardError, TokenShardWriter, read_meta
from vqgpt.training import TrainConfig, make_dataloader

R = 16


# ----------------------------------------------------------------------------------------------- fixtures


def _tokenizer(seed: int = 0) -> VQModel:
    torch.manual_seed(seed)
    config = VQModelConfig(channels=8, channel_mult=[1, 1], num_res_blocks=1, attn_resolutions=[], resolution=R,
                           z_channels=4, norm_groups=4, quantizer=QuantizerConfig(codebook_size=16))
    return VQModel(config).eval()  # downsampling 2: an 8x8 code grid


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return _tokenizer().save_pretrained(tmp_path_factory.mktemp("tok") / "tokenizer")


def _image(path, seed: int, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (R + 4, R + 4, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt, **({"quality": 95} if str(path).endswith(".jpg") else {}))


def _folder(root, n: int = 6, first_seed: int = 0):
    """n small images in two classes, PNG and JPEG mixed."""
    for i in range(n):
        _image(root / ("a" if i % 2 else "b") / f"{i:02d}.{'jpg' if i % 3 == 0 else 'png'}", first_seed + i)
    return root


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _fail_to_decode(monkeypatch, name: str) -> None:
    """Make one file fail at load time, after the scan passed it (as a file changed mid-run would)."""
    original = FolderImageDataset._load

    def load(self, index):
        if self.files[index].name == name:
            raise OSError("image file is truncated")
        return original(self, index)

    monkeypatch.setattr(FolderImageDataset, "_load", load)


def _encode(tokenizer_dir, source, out, **kwargs):
    return encode_dataset(tokenizer_dir, DataConfig(source=str(source), resolution=R), out, batch_size=4,
                          device="cpu", progress=False, **kwargs)


def _codes(out):
    return TokenDataset(out).load_all()


# ------------------------------------------------------------------------ encode notices changed data


def test_encode_refuses_to_resume_after_the_folder_changed(tokenizer_dir, tmp_path):
    source = _folder(tmp_path / "imgs")
    out = tmp_path / "codes"
    _encode(tokenizer_dir, source, out)
    assert len(TokenDataset(out)) == 6
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (source / "a" / "01.png").unlink()
    for i in range(3):
        _image(source / "b" / f"new{i}.png", 100 + i)
    with pytest.raises(TokenShardError, match=r"3 files added \(b/new0.png, b/new1.png, b/new2.png\), "
                                              r"1 removed \(a/01.png\) since the shards were written.*--overwrite"):
        _encode(tokenizer_dir, source, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched
    # a file rewritten in place (new size / time) counts as a change too
    _image(source / "b" / "00.jpg", 999)
    os.utime(source / "b" / "00.jpg", ns=(1, 1))
    with pytest.raises(TokenShardError, match=r"1 modified \(b/00.jpg\) since"):
        _encode(tokenizer_dir, source, out)

    _encode(tokenizer_dir, source, out, overwrite=True)
    fresh = tmp_path / "fresh"
    _encode(tokenizer_dir, source, fresh)
    (a, la), (b, lb) = _codes(out), _codes(fresh)
    assert len(a) == 8 and torch.equal(a, b) and torch.equal(la, lb)


def test_encode_overwrite_with_a_bad_source_or_size_keeps_the_shards(tokenizer_dir, tmp_path):
    """--overwrite cleared the folder before the data and size were checked: a typo emptied it."""
    source = _folder(tmp_path / "imgs", n=3)
    out = tmp_path / "codes"
    _encode(tokenizer_dir, source, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"}
    with pytest.raises(FileNotFoundError, match="image source not found"):
        _encode(tokenizer_dir, tmp_path / "typo", out, overwrite=True)
    with pytest.raises(ValueError, match="not divisible"):
        encode_dataset(tokenizer_dir, DataConfig(source=str(source), resolution=R + 1), out, device="cpu",
                       progress=False, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"} == before


def test_encode_refuses_another_tokenizer_or_option(tokenizer_dir, tmp_path):
    source = _folder(tmp_path / "imgs", n=3)
    out = tmp_path / "codes"
    _encode(tokenizer_dir, source, out)
    other = _tokenizer(seed=1).save_pretrained(tmp_path / "other")
    with pytest.raises(TokenShardError, match="the tokenizer changed .*--overwrite"):
        _encode(other, source, out)
    with pytest.raises(TokenShardError, match="augment is 'none' there but 'flip' now"):
        _encode(tokenizer_dir, source, out, flip=True)
    with pytest.raises(TokenShardError, match="split is 'train' there but 'eval' now"):
        _encode(tokenizer_dir, source, out, split="eval")
    with pytest.raises(TokenShardError, match="resize is True there but False now"):
        encode_dataset(tokenizer_dir, DataConfig(source=str(source), resolution=R, resize=False), out,
                       device="cpu", progress=False)


def test_finished_encode_rerun_is_a_no_op(tokenizer_dir, tmp_path, capsys):
    source = _folder(tmp_path / "imgs", n=3)
    out = tmp_path / "codes"
    _encode(tokenizer_dir, source, out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lock"}  # (taken by each encode)
    encode_dataset(tokenizer_dir, DataConfig(source=str(source), resolution=R), out, device="cpu", progress=True)
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lock"} == stamps


def test_shards_without_a_recorded_source_are_not_resumed(tokenizer_dir, tmp_path):
    source = _folder(tmp_path / "imgs", n=3)
    out = tmp_path / "codes"
    with TokenShardWriter(out, (8, 8), 16, {"source": str(source)}) as writer:  # as an older vqgpt wrote them
        writer.add(torch.zeros(2, 8, 8, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TokenShardError, match="does not record which images were encoded.*--overwrite"):
        _encode(tokenizer_dir, source, out)
    _encode(tokenizer_dir, source, out, overwrite=True)
    assert len(TokenDataset(out)) == 3


def test_builtin_source_identity_is_its_name_split_and_resolution(tokenizer_dir, tmp_path):
    out = tmp_path / "codes"
    encode_dataset(tokenizer_dir, DataConfig(source="builtin:mnist", resolution=R), out, split="eval",
                   batch_size=250, device="cpu", progress=False)
    meta = read_meta(out)
    assert meta["source_identity"] == {"kind": "builtin", "name": "builtin:mnist"} and meta["count"] == 500
    with pytest.raises(TokenShardError, match="source is 'builtin:mnist' there but 'builtin:textures' now"):
        encode_dataset(tokenizer_dir, DataConfig(source="builtin:textures", resolution=R), out, split="eval",
                       device="cpu", progress=False)


def test_cli_encode_out_is_a_file_and_overwrite_flag(tokenizer_dir, tmp_path, capsys):
    source = _folder(tmp_path / "imgs", n=3)
    target = tmp_path / "codes.npy"
    target.write_bytes(b"mine")
    assert main(["encode", "--tokenizer", str(tokenizer_dir), "--data", str(source), "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"{target} is a file, not a folder" in err[0]
    assert target.read_bytes() == b"mine"
    out = tmp_path / "codes"
    args = ["encode", "--tokenizer", str(tokenizer_dir), "--data", str(source), "--out", str(out)]
    assert main(args) == 0
    _image(source / "a" / "extra.png", 50)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "1 file added (a/extra.png)" in err[-1] and "--overwrite" in err[-1]
    assert main(args + ["--overwrite"]) == 0
    assert len(TokenDataset(out)) == 4


# ------------------------------------------------------------- exports with a missing or broken file


def _edit_config(directory, edit) -> None:
    path = directory / CONFIG_NAME
    meta = json.loads(path.read_text())
    edit(meta["config"])
    path.write_text(json.dumps(meta))


def test_export_missing_a_field_names_the_file_and_field(tokenizer_dir, tmp_path):
    broken = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, broken)
    _edit_config(broken, lambda c: c.pop("z_channels"))
    with pytest.raises(ConfigError, match=rf"{broken / CONFIG_NAME}: missing required key z_channels$"):
        VQModel.from_pretrained(broken)
    _edit_config(broken, lambda c: c["quantizer"].pop("codebook_size"))
    with pytest.raises(ConfigError, match=r"missing required keys z_channels, quantizer\.codebook_size"):
        VQModel.from_pretrained(broken)

    prior = tmp_path / "prior"
    config = GPTConfig(codebook_size=16, grid_size=[2, 2], num_classes=0, n_layer=1, n_head=2, dim=32, multiple_of=32)
    GPT(config).save_pretrained(prior)
    _edit_config(prior, lambda c: c.pop("dim"))
    with pytest.raises(ConfigError, match=rf"{prior / CONFIG_NAME}: missing required key dim"):
        GPT.from_pretrained(prior)


def test_export_from_before_the_vit_option_still_loads(tokenizer_dir, tmp_path):
    old = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, old)
    _edit_config(old, lambda c: [c.pop(k) for k in ("architecture", "patch_size", "vit_dim", "vit_depth",
                                                     "vit_heads", "vit_mlp_ratio")])
    assert VQModel.from_pretrained(old).config == VQModel.from_pretrained(tokenizer_dir).config


def test_yaml_configs_still_take_defaults(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("channels: 64\n")
    assert load_config(VQModelConfig, path).z_channels == VQModelConfig().z_channels


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_broken_weights_file_is_one_line_naming_it(tokenizer_dir, tmp_path, capsys, damage):
    broken = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, broken)
    weights = broken / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x00" * 64}[damage])
    with pytest.raises(ConfigError, match=rf"{weights}: not a readable safetensors file"):
        VQModel.from_pretrained(broken)
    source = _folder(tmp_path / "imgs", n=1)
    code = main(["encode", "--tokenizer", str(broken), "--data", str(source), "--out", str(tmp_path / "codes")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(weights) in err[0]


def test_cli_encode_names_a_missing_config_field(tokenizer_dir, tmp_path, capsys):
    broken = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, broken)
    _edit_config(broken, lambda c: c.pop("resolution"))
    source = _folder(tmp_path / "imgs", n=1)
    code = main(["encode", "--tokenizer", str(broken), "--data", str(source), "--out", str(tmp_path / "codes")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"{broken / CONFIG_NAME}: missing required key resolution" in err[0]


# ----------------------------------------------------------------- an undecodable image is skipped


def test_undecodable_image_is_dropped_from_its_batch_not_replaced(tmp_path, monkeypatch):
    source = _folder(tmp_path / "imgs", n=4)
    ds = build_dataset(DataConfig(source=str(source), resolution=R), "eval")
    _fail_to_decode(monkeypatch, "03.jpg")
    bad = [ds.name(i) for i in range(len(ds))].index("a/03.jpg")
    with pytest.warns(UnreadableImageWarning, match="03.jpg"):
        item = ds[bad]
    assert isinstance(item, Unreadable) and item.path.endswith("03.jpg")

    batch = collate_images([ds[i] for i in range(len(ds))])
    assert batch.size == 4 and batch.unreadable == [str(source / "a" / "03.jpg")]
    assert batch.kept.tolist() == [i for i in range(4) if i != bad] and batch.images.shape == (3, 3, R, R)
    for k, i in enumerate(batch.kept.tolist()):
        assert torch.equal(batch.images[k], ds[i][0])

    # training: each readable image once per epoch, the batch one short (no duplicate stands in)
    train = build_dataset(DataConfig(source=str(source), resolution=R, random_crop=False, hflip=False))
    loader = make_dataloader(train, TrainConfig(batch_size=2))  # the loader both training loops use
    seen = torch.cat([images for images, _ in loader])
    assert len(seen) == 3 and len({tuple(img.flatten().tolist()) for img in seen}) == 3

    names = [name for b in iterate_images(str(source), R, batch_size=3) for name in b.names]
    assert names == ["a/01.png", "b/00.jpg", "b/02.png"]


def test_encode_stores_codes_only_for_readable_images_and_resumes_by_item(tokenizer_dir, tmp_path, monkeypatch):
    source = _folder(tmp_path / "imgs", n=8)
    _truncate(source / "b" / "06.jpg")  # truncated on disk: found when first read (the start opens no image)
    _fail_to_decode(monkeypatch, "03.jpg")  # fails at load time
    model = VQModel.from_pretrained(tokenizer_dir)
    ds = build_dataset(DataConfig(source=str(source), resolution=R, random_crop=False, hflip=False))
    readable = [i for i in range(len(ds)) if not isinstance(ds[i], Unreadable)]
    expected = model.encode(torch.stack([ds[i][0] for i in readable]))
    flipped = model.encode(torch.stack([ds[i][0] for i in readable]).flip(3))

    out = tmp_path / "codes"
    _encode(tokenizer_dir, source, out, flip=True, shard_size=3)
    codes, labels = _codes(out)
    assert len(ds) == 8 and len(readable) == 6 and len(codes) == 12  # 6 readable images, each with its mirror
    assert torch.equal(codes[0::2], expected) and torch.equal(codes[1::2], flipped)
    assert torch.equal(labels[0::2], torch.tensor([ds.labels[i] for i in readable]))
    meta = read_meta(out)
    assert meta["unreadable"] == ["a/03.jpg", "b/06.jpg"] and meta["skipped_at_scan"] == []
    # one row per image holding both views: a pair is never split across shards
    assert meta["items_done"] == 8 and meta["views"] == 2 and [s["count"] for s in meta["shards"]] == [3, 3]

    # interrupted after the first batch of 4 items (one of them unreadable), then resumed
    calls = {"n": 0}
    original = VQModel.encode

    def crash_on_third(self, images):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, images)

    part = tmp_path / "part"
    monkeypatch.setattr(VQModel, "encode", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        _encode(tokenizer_dir, source, part, flip=True, shard_size=2)
    monkeypatch.setattr(VQModel, "encode", original)
    stopped = read_meta(part)
    # the first batch's 3 readable images: a shard of 2 written, the third still buffered when it stopped
    assert not stopped["complete"] and stopped["items_done"] == 3 and stopped["count"] == 2
    _encode(tokenizer_dir, source, part, flip=True, shard_size=2)
    resumed, resumed_labels = _codes(part)
    assert torch.equal(resumed, codes) and torch.equal(resumed_labels, labels)


def test_reconstruct_and_reference_stats_count_each_readable_image_once(tokenizer_dir, tmp_path, monkeypatch):
    from stage1_vq.evaluate import reconstruct
    from vqgpt.workflow.evaluation import fid_stats
    from vqgpt.ground.metrics import psnr

    source = _folder(tmp_path / "imgs", n=4)
    _fail_to_decode(monkeypatch, "03.jpg")
    ds = build_dataset(DataConfig(source=str(source), resolution=R, random_crop=False, hflip=False), "eval")
    readable = torch.stack([item[0] for item in (ds[i] for i in range(len(ds))) if not isinstance(item, Unreadable)])
    model = VQModel.from_pretrained(tokenizer_dir)
    with torch.no_grad():
        want = psnr(readable, model.decode(model.encode(readable)).clamp(-1, 1)).mean()
    with pytest.warns(UnreadableImageWarning, match="left out 1 image that failed to decode"):
        metrics = reconstruct(tokenizer_dir, str(source), tmp_path / "recon", batch_size=2, lpips="none",
                              device="cpu", progress=False)
    assert metrics["num_images"] == 3 and len(list((tmp_path / "recon" / "images").iterdir())) == 3
    assert metrics["psnr"] == pytest.approx(float(want), abs=1e-4)
    report = fid_stats(str(source), tmp_path / "ref.npz", fid_weights="random", resolution=R, split="eval",
                       batch_size=2, device="cpu", progress=False)
    assert report.num_images == 3
