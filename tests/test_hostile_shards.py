"""Tar shards a hostile world hands over: a shard cut short by an interrupted copy, integer classes that
are ids rather than indices, and an output folder whose name holds braces. None may be read as something
else without a word."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from test_sources import encode, noise, wds, write_tar
from vqgpt.ground import dataset_base
from vqgpt.ground.data import build_dataset
from vqgpt.ground.shard_writer import write_shards


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VQGPT_CACHE", str(tmp_path / "cache"))  # shard indexes stay inside the test


def _whole(path, count: int = 4):
    """A shard of ``count`` samples (png, cls, json), and its members as tarfile reads them."""
    write_tar(path, [{"__key__": f"{i:03d}", "png": encode(noise(i)), "cls": i % 2, "json": {"n": i}}
                     for i in range(count)])
    with tarfile.open(path) as tar:
        return path.read_bytes(), [(m.name, m.offset, m.offset_data, m.size) for m in tar]


def _cut(tmp_path, data: bytes, length: int):
    shard = tmp_path / "cut" / "shard-000000.tar"
    shard.parent.mkdir(exist_ok=True)
    shard.write_bytes(data[:length])
    return shard


# ---------------------------------------------------------------------------------------------
# a truncated shard


def test_a_shard_cut_inside_a_member_is_refused_naming_the_shard_and_member(tmp_path):
    data, members = _whole(tmp_path / "whole.tar")
    png = next(m for m in members if m[0] == "001.png")
    cls = next(m for m in members if m[0] == "002.cls")
    cuts = {png[2] + png[3] // 2: "'001.png'",  # inside an image's data
            cls[2] + 200: "'002.cls'",  # inside the padding after a one-byte member's data
            png[2] + -(-png[3] // 512) * 512 + 100: "001.png"}  # inside the next header
    for length, member in cuts.items():
        shard = _cut(tmp_path, data, length)
        with pytest.raises(ValueError, match=rf"shard {shard} is truncated.*{member}"):
            build_dataset(wds(f"wds:{shard.parent}"), "train")


def test_a_shard_cut_at_a_member_boundary_or_in_its_end_blocks_reads_as_tarfile_reads_it(tmp_path):
    """tarfile (and GNU tar) read a tar that ends right after a member, without its zero blocks, without a
    word: so does the shard reader (the samples the file holds); a cut inside the zero blocks loses nothing."""
    data, members = _whole(tmp_path / "whole.tar")
    last = members[-1]
    end = last[2] + -(-last[3] // 512) * 512
    after_two = next(m for m in members if m[0] == "002.cls")[1]  # samples 000 and 001 are whole
    for length, count in ((after_two, 2), (end, 4), (end + 700, 4)):
        shard = _cut(tmp_path, data, length)
        with tarfile.open(shard) as tar:
            assert len([m for m in tar if m.name.endswith(".png")]) == count
        assert len(build_dataset(wds(f"wds:{shard}"), "train")) == count


def test_shards_vqgpt_shard_writes_still_read(tmp_path):
    _whole(tmp_path / "in" / "a.tar", 5)
    report = write_shards(f"wds:{tmp_path / 'in'}", tmp_path / "out", per_shard=2, progress=False)
    assert len(build_dataset(wds(report.pattern), "train")) == report.count == 5


def test_a_shard_index_follows_the_umask_as_a_folder_index_does(tmp_path):
    """The shard indexes of a group-shared cache came out 0600: the group's other users could not read them."""
    _whole(tmp_path / "in" / "a.tar")
    old = os.umask(0o002)
    try:
        build_dataset(wds(f"wds:{tmp_path / 'in'}"), "train")
    finally:
        os.umask(old)
    [index] = (tmp_path / "cache").rglob("*.json")
    assert index.stat().st_mode & 0o777 == 0o664


# ---------------------------------------------------------------------------------------------
# integer classes that cannot be indices


def _classes(tmp_path, values: list[int]):
    write_tar(tmp_path / "in" / "s.tar", [{"__key__": f"k{i}", "png": encode(noise(i)), "cls": value}
                                          for i, value in enumerate(values)])
    return f"wds:{tmp_path / 'in'}"


def test_an_integer_class_far_above_the_classes_present_is_refused_naming_its_member(tmp_path):
    source = _classes(tmp_path, [0, 5_000_000])
    message = r"s.tar/k1.png has the class 5000000, but only 2 distinct classes occur.*indices 0..N-1"
    with pytest.raises(ValueError, match=message):
        build_dataset(wds(source), "train")
    with pytest.raises(ValueError, match=message):  # vqgpt shard wds:... reads it the same way
        write_shards(source, tmp_path / "out", per_shard=2, progress=False)


@pytest.mark.parametrize("value", [10**20, -(10**20)])
def test_an_integer_class_beyond_int64_is_refused_not_a_traceback(tmp_path, value):
    with pytest.raises(ValueError, match=rf"s.tar/k1.png has the class {value}, far too large.*indices 0..N-1"):
        build_dataset(wds(_classes(tmp_path, [0, value, 1])), "train")


def test_an_integer_class_above_the_largest_index_is_refused(tmp_path, monkeypatch):
    """Above 2**31 - 1 (here lowered: without the check, 2**31 classes would be made, a memory bomb)."""
    assert dataset_base.MAX_CLASS == 2**31 - 1
    monkeypatch.setattr(dataset_base, "MAX_CLASS", 1000)
    with pytest.raises(ValueError, match=r"s.tar/k1.png has the class 1001, above 1000.*indices 0..N-1"):
        build_dataset(wds(_classes(tmp_path, [0, 1001, 1])), "train")


def test_a_subset_of_numbered_classes_keeps_its_numbers(tmp_path):
    """Ten of ImageNet's classes, numbered up to 999 as they are there: 1000 classes, most of them empty."""
    data = build_dataset(wds(_classes(tmp_path, [0, 999, 500, 7, 123, 456, 789, 321, 654, 987])), "train")
    assert len(data.classes) == 1000 and data.labels.tolist() == [0, 999, 500, 7, 123, 456, 789, 321, 654, 987]


# ---------------------------------------------------------------------------------------------
# braces in a folder's name


def test_shards_written_into_a_folder_with_braces_read_back_from_what_vqgpt_shard_prints(tmp_path):
    _whole(tmp_path / "in" / "a.tar", 5)
    out = tmp_path / "run{a,b}"
    report = write_shards(f"wds:{tmp_path / 'in'}", out, per_shard=2, progress=False)
    assert report.count == 5 and len(report.shards) == 3
    for spec in (report.pattern, f"wds:{out}", f"wds:{out / 'shard-000001.tar'}"):
        assert len(build_dataset(wds(spec), "train")) == (2 if spec.endswith("01.tar") else 5), spec


def test_a_glob_is_not_expanded_and_the_error_says_what_to_give(tmp_path):
    _whole(tmp_path / "in" / "a.tar")
    with pytest.raises(FileNotFoundError, match=r"not \* or \?: for every .tar in a folder give wds:FOLDER"):
        build_dataset(wds(f"wds:{tmp_path / 'in'}/*.tar"), "train")


# ---------------------------------------------------------------------------------------------
# items that are no whole image, re-sharded


def test_resharding_leaves_out_cut_off_images_and_rows_without_one(tmp_path):
    """vqgpt shard of wds: / hf: items decodes each in full, as training will: a cut-off PNG was copied
    and counted (encode then skipped it), a row without an image aborted the whole run unnamed."""
    import datasets

    whole = encode(noise(0))
    write_tar(tmp_path / "in" / "s.tar", [{"__key__": "a", "png": whole, "cls": 0},
                                          {"__key__": "b", "png": whole[: len(whole) // 2], "cls": 0},
                                          {"__key__": "c", "png": b"hello", "cls": 1}])
    report = write_shards(f"wds:{tmp_path / 'in'}", tmp_path / "out", per_shard=4, progress=False)
    assert report.count == 1 and len(report.unreadable) == 2, report.unreadable
    assert [name.rsplit("/", 1)[-1] for name in report.unreadable] == ["b.png", "c.png"], report.unreadable
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"])})
    rows = {"image": [{"bytes": whole, "path": None}, None, {"bytes": whole, "path": None}], "label": [0, 1, 0]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf"))
    report = write_shards(f"hf:{tmp_path / 'hf'}", tmp_path / "out_hf", per_shard=4, progress=False)
    assert report.count == 2 and report.unreadable == [f"hf:{tmp_path / 'hf'} all[1]"]


def test_names_that_are_no_utf8_survive_sharding_and_reading(tmp_path):
    """A class folder or a tar member named in another encoding (a lone surrogate in Python): vqgpt shard
    failed writing classes.json after every shard, and wds: failed indexing such a member."""
    import os

    folder = os.fsencode(tmp_path / "src")
    for cls in (b"caf\xe9", b"plain"):
        os.makedirs(os.path.join(folder, cls))
        for i in range(2):
            noise(i).save(os.fsdecode(os.path.join(folder, cls, b"x%d.png" % i)))
    report = write_shards(str(tmp_path / "src"), tmp_path / "out", per_shard=3, progress=False)
    expected = build_dataset(wds(str(tmp_path / "src")), "eval").classes
    assert report.count == 4 and expected == ["caf\udce9", "plain"]
    assert build_dataset(wds(report.pattern), "eval").classes == expected
    (tmp_path / "in").mkdir()
    with tarfile.open(tmp_path / "in" / "t.tar", "w", format=tarfile.GNU_FORMAT, errors="surrogateescape") as tar:
        for name in ("caf\udce9.png", "ok.png"):
            data = encode(noise(0))
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    dataset = build_dataset(wds(f"wds:{tmp_path / 'in'}"), "eval")
    assert [dataset.name(i) for i in range(len(dataset))] == ["t/caf\udce9.png", "t/ok.png"]
    assert dataset[0][0].shape[0] == 3


def _tar(path, members: list[tuple[str, bytes]], mode: str = "w") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_sample_whose_members_are_apart_or_twice_is_refused_naming_it(tmp_path):
    """`tar cf x.tar *.jpg *.cls` (or a folder in directory order) put each image apart from its class:
    every image lost its class, with a warning about samples 'without an image'; a key twice in a row
    took the first image with the last class, and the second image was dropped."""
    images = {i: encode(noise(i)) for i in range(3)}
    _tar(tmp_path / "apart" / "s.tar", [*((f"{i:03d}.png", images[i]) for i in range(3)),
                                        *((f"{i:03d}.cls", str(i % 2).encode()) for i in range(3))])
    with pytest.raises(ValueError, match=r"s\.tar: the members of the sample '000' are not together \(other "
                                         r"samples' members come between them\).*tar --sort=name"):
        build_dataset(wds(f"wds:{tmp_path / 'apart'}"))
    _tar(tmp_path / "twice" / "s.tar", [("dup.png", images[0]), ("dup.cls", b"1"), ("dup.png", images[1]),
                                        ("dup.cls", b"2")])
    with pytest.raises(ValueError, match=r"s\.tar: the sample 'dup' holds two 'png' members \(dup\.png\)"):
        build_dataset(wds(f"wds:{tmp_path / 'twice'}"))
    # grouped as webdataset writes them, the same members read as 3 samples with their classes
    _tar(tmp_path / "grouped" / "s.tar", [m for i in range(3) for m in ((f"{i:03d}.png", images[i]),
                                                                         (f"{i:03d}.cls", str(i % 2).encode()))])
    assert build_dataset(wds(f"wds:{tmp_path / 'grouped'}")).labels.tolist() == [0, 1, 0]


def test_a_shard_folder_with_compressed_or_upper_case_tars_leaves_none_out(tmp_path):
    """wds:FOLDER read only *.tar: b.tar.gz and D.TAR beside a.tar were left out without a word."""
    _tar(tmp_path / "f" / "a.tar", [("x.png", encode(noise(1)))])
    _tar(tmp_path / "f" / "D.TAR", [("z.png", encode(noise(2)))])
    assert len(build_dataset(wds(f"wds:{tmp_path / 'f'}"))) == 2
    _tar(tmp_path / "f" / "b.tar.gz", [("y.png", encode(noise(3)))], mode="w:gz")
    with pytest.raises(ValueError, match=r"holds compressed tar files \(b\.tar\.gz\), .*decompress them to \.tar"):
        build_dataset(wds(f"wds:{tmp_path / 'f'}"))
