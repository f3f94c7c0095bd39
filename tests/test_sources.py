"""Tar-shard (wds:) and Hugging Face (hf:) image sources, and `vqgpt shard`: classes, corrupt
members, the 2-rank split of an epoch, mid-epoch resume, and a short training run on shards."""

from __future__ import annotations

import io
import json
import os
import tarfile
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import webdataset
from accelerate import skip_first_batches
from accelerate.data_loader import prepare_data_loader
from PIL import Image

from vqgpt.ground import tar_shards
from vqgpt.ground.data import (DataConfig, Unreadable, UnreadableImageWarning, build_dataset, readable_batches,
                               source_identity)
from vqgpt.training.config import TrainConfig
from vqgpt.training.stream import StreamPosition, batch_stream, make_dataloader

R = 8  # output resolution
SIDE = (12, 10)  # stored image size (width, height): crops have room to move


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VQGPT_CACHE", str(tmp_path / "cache"))  # shard indexes stay inside the test


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


def flat(i: int) -> Image.Image:
    """A uniform image whose red channel tells its id (10 * i)."""
    return Image.new("RGB", SIDE, (10 * i, 0, 0))


def noise(i: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(i).integers(0, 256, (SIDE[1], SIDE[0], 3), dtype=np.uint8))


def ident(image: torch.Tensor) -> int:
    """The id of a ``flat`` image from any pixel of its (cropped, flipped) tensor."""
    return round(float((image[0, 0, 0] + 1) * 127.5) / 10)


def write_tar(path, samples: list[dict]) -> None:
    """Samples as webdataset's TarWriter writes them ({"__key__": ..., "png": bytes, "cls": 3, ...})."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with webdataset.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def flat_shards(folder, count: int, per_shard: int, image=flat) -> None:
    """``count`` samples (png, cls = id % 3) in shards of ``per_shard``."""
    for s in range(0, count, per_shard):
        write_tar(folder / f"part-{s // per_shard:03d}.tar",
                  [{"__key__": f"{i:05d}", "png": encode(image(i)), "cls": i % 3}
                   for i in range(s, min(s + per_shard, count))])


def wds(source: str, **kwargs) -> DataConfig:
    return DataConfig(source=source, resolution=R, **kwargs)


# ---------------------------------------------------------------------------------------------
# tar shards


def test_tar_classes_from_cls_and_json(tmp_path):
    # integer cls with json class names; image keys jpg, jpeg, png, webp; one sample has no image
    write_tar(tmp_path / "a/0.tar", [
        {"__key__": "s0", "png": encode(flat(0)), "cls": 2, "json": {"class": "two"}},
        {"__key__": "s1", "jpeg": encode(flat(1), "JPEG"), "cls": 0, "json": {"class": "zero"}},
        {"__key__": "dir/s2", "webp": encode(flat(2), "WEBP"), "cls": 2},
        {"__key__": "s3", "txt": "no image here", "cls": 1},
    ])
    with pytest.warns(UserWarning, match=r"1 samples have no image member .*'s3'"):
        ds = build_dataset(wds(f"wds:{tmp_path / 'a/0.tar'}"), "eval")
    assert ds.classes == ["zero", "1", "two"]  # integers are their own index; names from the json
    assert ds.labels.tolist() == [2, 0, 2]
    assert [ds.name(i) for i in range(3)] == ["0/s0.png", "0/s1.jpeg", "0/dir/s2.webp"]
    assert [ident(ds[i][0]) for i in range(3)] == [0, 1, 2]

    # classes as text in cls, or in the json's "label" / "class" field: numbered in sorted order
    write_tar(tmp_path / "b/0.tar", [
        {"__key__": "k0", "png": encode(flat(0)), "cls": "zebra"},
        {"__key__": "k1", "png": encode(flat(1)), "json": {"label": "ant"}},
        {"__key__": "k2", "png": encode(flat(2)), "json": {"class": "mole", "other": 1}},
    ])
    ds = build_dataset(wds(f"wds:{tmp_path / 'b'}"))
    assert ds.classes == ["ant", "mole", "zebra"] and ds.labels.tolist() == [2, 0, 1]
    assert [ds[i][1] for i in range(3)] == [2, 0, 1]

    # no class at all: one class; integer labels from the json's "label" field
    write_tar(tmp_path / "c/0.tar", [{"__key__": f"k{i}", "png": encode(flat(i))} for i in range(2)])
    assert build_dataset(wds(f"wds:{tmp_path / 'c'}")).classes == ["default"]
    write_tar(tmp_path / "d/0.tar", [{"__key__": f"k{i}", "png": encode(flat(i)), "json": {"label": i}}
                                     for i in range(2)])
    assert build_dataset(wds(f"wds:{tmp_path / 'd'}")).classes == ["0", "1"]

    # a class name keeps its spaces, as a class folder's does (a cls member's final line end goes)
    write_tar(tmp_path / "f/0.tar", [{"__key__": f"k{i}", "png": encode(flat(i)), "cls": name.encode()}
                                     for i, name in enumerate(["cat\n", "cat ", " cat", "cat"])])
    assert build_dataset(wds(f"wds:{tmp_path / 'f'}")).classes == [" cat", "cat", "cat "]

    # mixing integer and text classes is an error naming both samples
    write_tar(tmp_path / "e/0.tar", [{"__key__": "k0", "png": encode(flat(0)), "cls": 1},
                                     {"__key__": "k1", "png": encode(flat(1)), "cls": "cat"}])
    with pytest.raises(ValueError, match=r"0.tar/k0.png has int class 1.*0.tar/k1.png has text class 'cat'"):
        build_dataset(wds(f"wds:{tmp_path / 'e'}"))


def test_brace_pattern_and_folder_of_tars(tmp_path):
    flat_shards(tmp_path / "shards", 10, 4)  # part-000 (4), part-001 (4), part-002 (2)
    (tmp_path / "shards/notes.txt").write_text("not a shard")
    by_folder = build_dataset(wds(f"wds:{tmp_path / 'shards'}"), "eval")
    by_pattern = build_dataset(wds(f"wds:{tmp_path}/shards/part-{{000..002}}.tar"), "eval")
    assert len(by_folder) == len(by_pattern) == 10
    ids = [ident(by_folder[i][0]) for i in range(10)]
    assert ids == [ident(by_pattern[i][0]) for i in range(10)] == list(range(10))
    assert by_pattern.classes == ["0", "1", "2"] and by_pattern.labels.tolist() == [i % 3 for i in range(10)]
    assert len(build_dataset(wds(f"wds:{tmp_path}/shards/part-{{000..001}}.tar"))) == 8

    with pytest.raises(FileNotFoundError, match=r"1 of 4 shard files not found .*part-003.tar"):
        build_dataset(wds(f"wds:{tmp_path}/shards/part-{{000..003}}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .tar files"):
        build_dataset(wds(f"wds:{tmp_path / 'empty'}"))
    (tmp_path / "gz").mkdir()
    with tarfile.open(tmp_path / "gz/part.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "shards/notes.txt", "x.txt")
    with pytest.raises(ValueError, match="not a readable uncompressed tar"):
        build_dataset(wds(f"wds:{tmp_path}/gz/part.tar.gz"))


def test_shard_index_is_reused_and_rebuilt_when_the_shard_changes(tmp_path, monkeypatch):
    flat_shards(tmp_path / "s", 6, 3)
    scans = []
    scan = tar_shards.scan_shard
    monkeypatch.setattr(tar_shards, "scan_shard", lambda shard: scans.append(shard.name) or scan(shard))
    source = f"wds:{tmp_path / 's'}"
    build_dataset(wds(source))
    assert sorted(scans) == ["part-000.tar", "part-001.tar"]
    identity = source_identity(source)
    build_dataset(wds(source))
    assert len(scans) == 2  # both indexes read back, no shard scanned again
    write_tar(tmp_path / "s/part-001.tar", [{"__key__": "new", "png": encode(flat(9)), "cls": 0}])
    ds = build_dataset(wds(source))
    assert scans[2:] == ["part-001.tar"] and len(ds) == 4 and ident(ds[3][0]) == 9
    assert source_identity(source) != identity  # encode refuses to mix shards written before the change


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_fast_header_reader_agrees_with_tarfile(tmp_path, fmt):
    path = tmp_path / "shard.tar"
    long_dir = "d" * 120  # ustar: a name prefix; GNU: a long-name entry; PAX: a path record
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in [("a.png", b"x" * 700), (f"{long_dir}/b.png", b"y" * 512), (f"{long_dir}/b.cls", b"3"),
                           ("é/ünï.json", b"{}"), ("empty.png", b"")]:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1.5  # PAX: a float mtime record, as webdataset writes
            tar.addfile(info, io.BytesIO(data))
        for name, kind in [("folder", tarfile.DIRTYPE), ("link.png", tarfile.SYMTYPE), ("hard.png", tarfile.LNKTYPE)]:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "a.png" if kind != tarfile.DIRTYPE else ""
            tar.addfile(info)
        if fmt != tarfile.USTAR_FORMAT:  # a name ustar cannot hold
            info = tarfile.TarInfo("e" * 150 + ".png")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    fast = tar_shards._fast_members(path)
    assert fast == tar_shards._tarfile_members(path) and len(fast) == (5 if fmt == tarfile.USTAR_FORMAT else 6)
    with open(path, "r+b") as f:  # a damaged header: the fast reader hands the shard to tarfile
        f.seek(148)
        f.write(b"0000000\0")
    with pytest.raises(tar_shards._Unusual):
        tar_shards._fast_members(path)


def test_corrupt_member_is_skipped_and_named(tmp_path):
    whole = encode(flat(3))
    write_tar(tmp_path / "s/part.tar", [
        {"__key__": "good0", "png": encode(flat(1)), "cls": 0},
        {"__key__": "noise", "png": os.urandom(300), "cls": 0},
        {"__key__": "cut", "png": whole[: len(whole) // 2], "cls": 1},
        {"__key__": "good1", "png": whole, "cls": 1},
    ])
    ds = build_dataset(wds(f"wds:{tmp_path / 's'}"))
    assert len(ds) == 4  # nothing is opened at start: bad members are found when read
    with pytest.warns(UnreadableImageWarning) as caught:
        items = [ds[i] for i in range(4)]
        assert isinstance(ds[1], Unreadable)  # read again: no second warning
    assert [isinstance(item, Unreadable) for item in items] == [False, True, True, False]
    assert items[1].path == f"{tmp_path / 's/part.tar'}/noise.png" and items[2].path.endswith("part.tar/cut.png")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and "part.tar/noise.png" in messages[0] and "part.tar/cut.png" in messages[1]
    unreadable: list[str] = []
    with pytest.warns(UnreadableImageWarning, match="left out 2 images"):
        batches = list(readable_batches(ds, batch_size=4, unreadable=unreadable))
    assert [ident(image) for image in batches[0][0]] == [1, 3] and batches[0][1].tolist() == [0, 1]
    assert unreadable == [items[1].path, items[2].path]


class TwoRanks:
    """What ``batch_stream`` uses of an Accelerator, for one rank of two."""

    num_processes = 2
    skip_first_batches = staticmethod(skip_first_batches)


def rank_loader(dataset, rank: int, batch_size: int = 3, num_workers: int = 0):
    """The training loader of ``rank`` (of 2), prepared as ``Accelerator.prepare`` prepares it."""
    cfg = TrainConfig(batch_size=batch_size, seed=5, num_workers=num_workers)
    return prepare_data_loader(make_dataloader(dataset, cfg), num_processes=2, process_index=rank,
                               put_on_device=False, use_seedable_sampler=True, data_seed=cfg.seed)


def take(dataset, rank: int, position: StreamPosition, count: int, num_workers: int = 0) -> list:
    stream = batch_stream(TwoRanks(), rank_loader(dataset, rank, num_workers=num_workers), position)
    return [next(stream) for _ in range(count)]


def test_two_ranks_and_workers_see_every_sample_once_per_epoch(tmp_path):
    flat_shards(tmp_path / "s", 24, 5)  # 5 shards of uneven size: shard boundaries play no part
    ds = build_dataset(wds(f"wds:{tmp_path / 's'}"))  # random crops and flips: the ids survive them
    per_epoch = 24 // (3 * 2)  # batches per rank
    epochs = {0: [], 1: []}
    for rank in (0, 1):
        batches = take(ds, rank, StreamPosition(), 2 * per_epoch, num_workers=2)
        for k, (images, labels) in enumerate(batches):
            ids = [ident(image) for image in images]
            assert labels.tolist() == [i % 3 for i in ids]
            epochs[k // per_epoch] += ids
    for epoch, ids in epochs.items():
        assert sorted(ids) == list(range(24)), (epoch, sorted(ids))
    assert epochs[0] != epochs[1]  # reshuffled each epoch


def test_resume_mid_epoch_equals_the_uninterrupted_stream(tmp_path):
    flat_shards(tmp_path / "s", 18, 4, image=noise)
    source = f"wds:{tmp_path / 's'}"
    for rank in (0, 1):
        whole = take(build_dataset(wds(source)), rank, StreamPosition(), 5)  # 3 batches per epoch per rank
        resumed = take(build_dataset(wds(source)), rank, StreamPosition(epoch=0, batch=2), 3)
        for (a_images, a_labels), (b_images, b_labels) in zip(whole[2:], resumed):
            assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
    # a different position gives different batches (the comparison above can fail)
    assert not torch.equal(whole[3][0], whole[4][0])


def test_vqgpt_shard_keeps_the_folder_images(tmp_path, capsys):
    from vqgpt.cli.commands import main

    folder = tmp_path / "imgs"
    for k, (cls, fmt) in enumerate([("cat", "PNG"), ("cat", "JPEG"), ("dog", "PNG"), ("dog", "WEBP"), ("eel", "PNG")]):
        path = folder / cls / f"img{k}.{fmt.lower().replace('jpeg', 'jpg')}"
        path.parent.mkdir(parents=True, exist_ok=True)
        noise(k).save(path, format=fmt)
    assert main(["shard", str(folder), str(tmp_path / "out"), "--per-shard", "2"]) == 0
    printed = capsys.readouterr().out
    pattern = f"wds:{(tmp_path / 'out').resolve()}/shard-{{000000..000002}}.tar"
    assert f"data.source={pattern}" in printed and "5 images (3 classes) into 3 shards" in printed

    shards = build_dataset(wds(pattern), "eval")
    files = build_dataset(wds(str(folder)), "eval")
    assert shards.classes == files.classes == ["cat", "dog", "eel"] and len(shards) == len(files) == 5
    for i in range(5):
        assert torch.equal(shards[i][0], files[i][0]) and shards[i][1] == files[i][1]
    with tarfile.open(tmp_path / "out/shard-000000.tar") as tar:  # the files' bytes, not re-encoded
        members = {m.name: tar.extractfile(m).read() for m in tar}
    assert members["00000001.jpg"] == (folder / "cat/img1.jpg").read_bytes()
    assert json.loads(members["00000001.json"]) == {"label": 0, "class": "cat", "name": "cat/img1.jpg"}
    assert main(["shard", str(folder), str(tmp_path / "out"), "--per-shard", "3"]) == 2
    assert "already holds 3 finished shards of another conversion" in capsys.readouterr().err


def test_vqgpt_shard_of_a_builtin_gives_its_images(tmp_path):
    from vqgpt.ground.shard_writer import write_shards

    report = write_shards("builtin:mnist", tmp_path / "out", per_shard=200, split="eval", progress=False)
    assert len(report.shards) == 3 and report.count == 500
    shards = build_dataset(DataConfig(source=report.pattern, resolution=32), "eval")
    digits = build_dataset(DataConfig(source="builtin:mnist", resolution=32), "eval")
    assert shards.classes == digits.classes and len(shards) == len(digits)
    for i in (0, 137, 499):  # PNG is lossless: the very same digits
        assert torch.equal(shards[i][0], digits[i][0]) and shards[i][1] == digits[i][1]


def test_train_tokenizer_on_tar_shards(tmp_path):
    from vqgpt.cli.commands import main

    flat_shards(tmp_path / "s", 20, 8, image=lambda i: noise(i).resize((40, 36)))
    run = tmp_path / "run"
    code = main(["train-tokenizer", "--config", "configs/tokenizer/tiny.yaml", "--out", str(run),
                 "--set", f"data.source=wds:{tmp_path}/s/part-{{000..002}}.tar", "--set", "train.steps=2",
                 "--set", "train.batch_size=8", "--set", "train.log_every=1", "--set", "train.warmup_steps=1",
                 "--set", "data.hflip=true"])
    assert code == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"rec_loss"' in line]
    assert [row["step"] for row in rows] == [1, 2] and all(np.isfinite(row["rec_loss"]) for row in rows)
    assert (run / "export/model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets


@pytest.fixture
def hf_folder(tmp_path):
    """A save_to_disk folder: train (6 rows) and validation (2 rows); Image + ClassLabel columns, a
    second image column and a text column."""
    import datasets

    features = datasets.Features({"photo": datasets.Image(), "mask": datasets.Image(),
                                  "species": datasets.Value("string"),
                                  "kind": datasets.ClassLabel(names=["bird", "cat", "dog"])})

    def rows(ids: list[int]) -> dict:
        return {"photo": [flat(i) for i in ids], "mask": [flat(20 + i) for i in ids],
                "species": [["wren", "lynx", "pug"][i % 3] for i in ids], "kind": [i % 3 for i in ids]}

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows(list(range(6))), features=features),
                               "validation": datasets.Dataset.from_dict(rows([10, 11]), features=features)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dd.save_to_disk(str(tmp_path / "hf"), num_proc=None)
    return tmp_path / "hf"


def test_hf_folder_with_image_and_classlabel_columns(hf_folder):
    with pytest.warns(UserWarning, match=r"has 2 image columns \(photo, mask\): reading 'photo', the first; set "
                                         r"data.hf_image_column \(--hf-image-column\) to read another"):
        ds = build_dataset(wds(f"hf:{hf_folder}"))
    assert ds.image_column == "photo" and ds.label_column == "kind"
    assert ds.classes == ["bird", "cat", "dog"] and ds.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert [ident(ds[i][0]) for i in range(6)] == list(range(6)) and [ds[i][1] for i in range(6)] == ds.labels.tolist()
    held_out = build_dataset(wds(f"hf:{hf_folder}", hf_image_column="photo"), "eval")  # (chosen: no warning)
    assert held_out.split_name == "validation" and [ident(held_out[i][0]) for i in range(2)] == [10, 11]
    identity = source_identity(f"hf:{hf_folder}")
    assert identity["kind"] == "hf" and "train/state.json" in [f[0] for f in identity["files"]]


@pytest.mark.filterwarnings("ignore:.*has 2 image columns")
def test_hf_column_overrides_and_errors(hf_folder):
    ds = build_dataset(wds(f"hf:{hf_folder}", hf_image_column="mask", hf_label_column="species"))
    assert [ident(ds[i][0]) for i in range(3)] == [20, 21, 22]
    assert ds.classes == ["lynx", "pug", "wren"] and ds.labels.tolist() == [2, 0, 1, 2, 0, 1]
    assert build_dataset(wds(f"hf:{hf_folder}", hf_label_column="none")).classes == ["default"]
    with pytest.raises(ValueError, match=r"data.hf_image_column='picture' \(--hf-image-column\): .* has no such "
                                         r"column .*photo, mask"):
        build_dataset(wds(f"hf:{hf_folder}", hf_image_column="picture"))
    with pytest.raises(ValueError, match=r"data.hf_label_column='breed' \(--hf-label-column\): .* no such column"):
        build_dataset(wds(f"hf:{hf_folder}", hf_label_column="breed"))
    with pytest.raises(ValueError, match=r"the column 'species' .* not images"):
        build_dataset(wds(f"hf:{hf_folder}", hf_image_column="species"))
    with pytest.raises(ValueError, match=r"data.hf_split='test' \(--hf-split\): .* \(its splits: train, validation\)"):
        build_dataset(wds(f"hf:{hf_folder}", hf_split="test"))
    with pytest.raises(FileNotFoundError, match="no dataset folder"):
        build_dataset(wds(f"hf:{hf_folder}-missing"))
    with pytest.raises(FileNotFoundError, match="hub dataset 'nobody/nothing' could not be loaded"):
        build_dataset(wds("hf:nobody/nothing"))  # HF_HUB_OFFLINE=1: nothing is downloaded


def test_commands_without_a_config_take_the_hf_options_as_flags(hf_folder, tmp_path, capsys):
    """encode, reconstruct, eval-tokenizer, eval-bpd, fid-stats and shard read an hf: source with its default
    columns only: encode silently read the first image column (a mask) of a tokenizer trained on the photos,
    and a dataset whose split is not named train could not be read, while the error said to set
    data.hf_split, which none of them takes."""
    from stage1_vq import QuantizerConfig, VQModel, VQModelConfig
    from vqgpt.cli.commands import main
    from vqgpt.ground.tokens import TokenDataset

    torch.manual_seed(0)
    tokenizer = VQModel(VQModelConfig(channels=8, channel_mult=[1, 1], num_res_blocks=1, attn_resolutions=[],
                                      resolution=16, z_channels=4, norm_groups=4,
                                      quantizer=QuantizerConfig(codebook_size=16))).eval()
    tok = tokenizer.save_pretrained(tmp_path / "tok")
    source = f"hf:{hf_folder}"
    codes = {}
    for column in ("photo", "mask"):
        out = tmp_path / f"codes-{column}"
        assert main(["encode", "--tokenizer", str(tok), "--data", source, "--out", str(out), "--hf-image-column",
                     column, "--hf-label-column", "species"]) == 0
        codes[column] = TokenDataset(out).load_all()
        assert json.loads((out / "meta.json").read_text())["classes"] == ["lynx", "pug", "wren"]
    assert not torch.equal(codes["photo"][0], codes["mask"][0])  # (the mask images are other colours)
    # another column into the same folder is another encode: refused, naming the flag
    capsys.readouterr()
    assert main(["encode", "--tokenizer", str(tok), "--data", source, "--out", str(tmp_path / "codes-photo"),
                 "--hf-image-column", "mask", "--hf-label-column", "species"]) == 2
    assert "--hf-image-column is 'photo' there but 'mask' now" in capsys.readouterr().err
    # the split and label flags reach reconstruct / shard, and their errors name the flag
    assert main(["reconstruct", "--tokenizer", str(tok), "--images", source, "--out", str(tmp_path / "rec"),
                 "--lpips", "none", "--hf-split", "training", "--hf-image-column", "photo"]) == 2
    assert "data.hf_split='training' (--hf-split):" in capsys.readouterr().err
    assert main(["shard", source, str(tmp_path / "shards"), "--per-shard", "4", "--hf-image-column", "mask",
                 "--hf-label-column", "none"]) == 0
    shards = build_dataset(wds(f"wds:{tmp_path / 'shards'}"))
    assert shards.classes == ["default"] and [ident(shards[i][0]) for i in range(6)] == [20 + i for i in range(6)]


def test_an_hf_label_of_minus_one_says_how_to_read_without_classes_and_cls_is_a_label_column(tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"])})
    datasets.Dataset.from_dict({"image": [flat(1), flat(2)], "label": [-1, -1]},
                               features=features).save_to_disk(str(tmp_path / "unlabelled"))
    with pytest.raises(ValueError, match=r"negative class -1 .*; to read .* without classes set "
                                         r"data.hf_label_column \(--hf-label-column\) to 'none'"):
        build_dataset(wds(f"hf:{tmp_path / 'unlabelled'}"))
    assert build_dataset(wds(f"hf:{tmp_path / 'unlabelled'}", hf_label_column="none")).classes == ["default"]
    features = datasets.Features({"jpg": datasets.Image(), "cls": datasets.Value("int64")})
    datasets.Dataset.from_dict({"jpg": [flat(1), flat(2), flat(3)], "cls": [0, 2, 1]},
                               features=features).save_to_disk(str(tmp_path / "wds-style"))
    ds = build_dataset(wds(f"hf:{tmp_path / 'wds-style'}"))  # it was read as one class, without a word
    assert ds.label_column == "cls" and ds.labels.tolist() == [0, 2, 1]


def test_hf_unreadable_row_is_skipped_and_named(tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    rows = {"image": [{"bytes": encode(flat(1)), "path": None}, {"bytes": b"not an image", "path": None}],
            "label": [4, 1]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "one"))
    ds = build_dataset(wds(f"hf:{tmp_path / 'one'}"), "eval")  # one saved Dataset: both splits
    assert ds.classes == ["0", "1", "2", "3", "4"] and ds.labels.tolist() == [4, 1]
    with pytest.warns(UnreadableImageWarning, match=r"one all\[1\]"):
        item = ds[1]
    assert isinstance(item, Unreadable) and item.path == f"hf:{tmp_path / 'one'} all[1]"
    assert ident(ds[0][0]) == 1


def test_a_source_with_spaces_around_it_is_recorded_as_read():
    """' builtin:mnist' read MNIST (every reader strips the source) but was recorded with its space, so the
    run's config and a pipeline's provenance named a source that differs from the same one typed plainly."""
    assert DataConfig(source="  builtin:mnist \n").source == "builtin:mnist"
    assert DataConfig(source=" wds:/data/train-{0..3}.tar").source == "wds:/data/train-{0..3}.tar"
