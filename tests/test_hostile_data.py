"""Data sources a hostile user meets: a class without a readable image, a key that comes back inside one
shard, and an image format the shards do not keep as it is. None may change an image, a label or a class."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from test_sources import R, SIDE, encode, noise, wds, write_tar
from vqgpt.ground.data import build_dataset
from vqgpt.ground.shard_writer import write_shards


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VQGPT_CACHE", str(tmp_path / "cache"))  # shard indexes stay inside the test


def _folder(root, classes: dict[str, int], broken: dict[str, bytes] | None = None):
    """Class folders of noise PNGs (``classes``: name -> count), plus ``broken`` files (class/name -> bytes)."""
    k = 0
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            noise(k).save(root / name / f"{k:03d}.png")
            k += 1
    for rel, data in (broken or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


@pytest.mark.parametrize("empty", ["banana", "cherry"])  # a class in the middle, and the last one
def test_shards_keep_every_class_of_the_source_even_one_without_a_readable_image(tmp_path, empty):
    classes = {"apple": 2, "banana": 2, "cherry": 2}
    classes[empty] = 0
    _folder(tmp_path / "src", classes, {f"{empty}/x.png": b"not an image"})
    source = build_dataset(wds(str(tmp_path / "src")), "train")
    assert source.classes == ["apple", "banana", "cherry"]
    report = write_shards(str(tmp_path / "src"), tmp_path / "out", per_shard=3, progress=False)
    assert report.count == 4 and report.classes == source.classes
    for spec in (report.pattern, f"wds:{tmp_path / 'out'}"):
        shards = build_dataset(wds(spec), "train")
        assert shards.classes == ["apple", "banana", "cherry"]  # not ['apple', '1', 'cherry'] nor two classes
        assert shards.labels.tolist() == [int(source.labels[i]) for i in range(len(source))
                                          if source.files[i].name != "x.png"]


def test_a_class_list_that_disagrees_with_its_shards_is_refused(tmp_path):
    _folder(tmp_path / "src", {"apple": 2, "banana": 2})
    write_shards(str(tmp_path / "src"), tmp_path / "out", per_shard=3, progress=False)
    (tmp_path / "out" / "classes.json").write_text('{"classes": ["pear", "banana"]}')
    with pytest.raises(ValueError, match=r"classes.json names class 0 'pear', but its samples say 'apple'"):
        build_dataset(wds(f"wds:{tmp_path / 'out'}"), "train")


def test_a_key_that_comes_back_in_a_shard_is_another_sample(tmp_path):
    """Members are grouped by consecutive key, as webdataset groups them: the second run of key a is a
    sample of its own, with its own class, not merged into the first (which took its label)."""
    red, green, blue = (Image.new("RGB", SIDE, c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255)))
    write_tar(tmp_path / "s.tar", [{"__key__": "a", "png": encode(red), "cls": 0},
                                   {"__key__": "b", "png": encode(green), "cls": 1},
                                   {"__key__": "a", "png": encode(blue), "cls": 1}])
    data = build_dataset(wds(f"wds:{tmp_path / 's.tar'}"), "eval")
    assert len(data) == 3 and data.labels.tolist() == [0, 1, 1]
    colours = [tuple(int(v) for v in (data[i][0][:, 0, 0] > 0)) for i in range(3)]
    assert colours == [(1, 0, 0), (0, 1, 0), (0, 0, 1)]


def test_shard_keeps_an_image_whose_format_shards_do_not_store_as_it_is(tmp_path):
    """A PPM (or TGA, ...) that an hf: or wds: source decodes is stored as a PNG of the same pixels,
    not left out as 'no image'."""
    ppm = encode(noise(7), "PPM")
    write_tar(tmp_path / "in" / "s.tar", [{"__key__": "a", "png": encode(noise(1)), "cls": 0},
                                          {"__key__": "b", "png": ppm, "cls": 1}])  # a PPM under .png
    source = build_dataset(wds(f"wds:{tmp_path / 'in'}"), "eval")
    report = write_shards(f"wds:{tmp_path / 'in'}", tmp_path / "out", per_shard=5, progress=False)
    assert report.count == 2 and report.unreadable == []
    again = build_dataset(wds(report.pattern), "eval")
    assert len(again) == 2 and again.labels.tolist() == [0, 1]
    for i in range(2):
        assert torch.equal(again[i][0], source[i][0])
    with Image.open(io.BytesIO(ppm)) as img:
        assert img.format == "PPM" and np.asarray(img).shape == (SIDE[1], SIDE[0], 3)
    assert again[1][0].shape == (3, R, R)
