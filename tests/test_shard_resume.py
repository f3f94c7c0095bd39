"""An interrupted `vqgpt shard` continues after its last shard closed whole: a 1M-image conversion stopped
at 99% must not start again from image 0. The continued set is byte for byte an uninterrupted run's, the
shards closed before the interruption are not written again, the one cut short is never kept, and a
re-run with another source or options is refused (naming what differs) rather than mixed in."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import vqgpt.ground.shard_writer as shard_writer
from test_sources import noise
from vqgpt.cli.commands import main
from vqgpt.ground.data import DataConfig, build_dataset
from vqgpt.ground.shard_writer import PARTIAL_DIR, PROGRESS_FILE, write_shards

PER_SHARD = 3


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VQGPT_CACHE", str(tmp_path / "cache"))  # shard indexes stay inside the test


def _source(root: Path) -> Path:
    """12 items in two classes, the 5th no image: 11 samples, 4 shards of 3 (the last of 2)."""
    for k in range(12):
        path = root / ("a" if k < 6 else "b") / f"{k:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if k == 4:
            path.write_text("not an image\n")
        else:
            noise(k).save(path)
    return root


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


class _Reads:
    """``_sample`` counted (the items a run reads) and, at its ``stop_at``-th call, interrupted."""

    def __init__(self, monkeypatch, stop_at: int | None = None):
        self.indices: list[int] = []
        self.stop_at = stop_at
        self.sample = shard_writer._sample
        monkeypatch.setattr(shard_writer, "_sample", self)

    def __call__(self, dataset, index):
        self.indices.append(index)
        if len(self.indices) == self.stop_at:
            raise KeyboardInterrupt
        return self.sample(dataset, index)


def _interrupt(source: Path, out: Path, monkeypatch, stop_at: int = 10, **options) -> dict:
    """Run into ``out`` until the ``stop_at``-th item is read; the record the run left."""
    reads = _Reads(monkeypatch, stop_at)
    with pytest.raises(KeyboardInterrupt):
        write_shards(str(source), out, **{"per_shard": PER_SHARD, "progress": False, **options})
    monkeypatch.setattr(shard_writer, "_sample", reads.sample)
    assert not list(out.glob("*.tar"))  # nothing that wds:OUT would read as the whole set
    return json.loads((out / PARTIAL_DIR / PROGRESS_FILE).read_text())


@pytest.fixture
def reference(tmp_path):
    """The source and the shards an uninterrupted run writes of it."""
    source = _source(tmp_path / "src")
    report = write_shards(str(source), tmp_path / "ref", per_shard=PER_SHARD, progress=False)
    assert report.count == 11 and len(report.shards) == 4
    return source, report, _contents(tmp_path / "ref")


def test_the_writer_is_deterministic(tmp_path, reference):
    source, _, expected = reference
    write_shards(str(source), tmp_path / "again", per_shard=PER_SHARD, progress=False)
    assert _contents(tmp_path / "again") == expected


def test_an_interrupted_run_continues_after_its_last_closed_shard(tmp_path, monkeypatch, capsys, reference):
    source, whole, expected = reference
    out = tmp_path / "out"
    # the 10th item read is item 9: shards 0 (items 0-2) and 1 (3, 5, 6; 4 is no image) are closed,
    # shard 2 (7, 8) is being written
    record = _interrupt(source, out, monkeypatch)
    partial = out / PARTIAL_DIR
    assert [s["name"] for s in record["shards"]] == ["shard-000000.tar", "shard-000001.tar"]
    assert [s["next"] for s in record["shards"]] == [3, 7] and record["shards"][1]["unreadable"] == [
        str(source / "a" / "04.png")]
    assert (partial / "shard-000002.tar").exists()  # the one cut short: there, but not recorded
    closed = {name: (partial / name).stat().st_ino for name in ("shard-000000.tar", "shard-000001.tar")}

    reads = _Reads(monkeypatch)
    report = write_shards(str(source), out, per_shard=PER_SHARD, progress=False)
    assert reads.indices == list(range(7, 12))  # the closed shards' items are not read again
    assert "continuing after shard-000001.tar (2 shards, 6 images written by an earlier run)" in capsys.readouterr().out
    assert _contents(out) == expected  # byte for byte; no .partial left
    assert {name: (out / name).stat().st_ino for name in closed} == closed  # moved, not written again
    assert report.count == whole.count and report.unreadable == whole.unreadable and report.pattern.endswith(
        "shard-{000000..000003}.tar")
    assert len(build_dataset(DataConfig(source=report.pattern, resolution=8), "train")) == 11


def test_a_shard_closed_but_not_recorded_is_written_again(tmp_path, monkeypatch, reference):
    """Killed between closing a shard and recording it: only the record says what is whole."""
    source, _, expected = reference
    out = tmp_path / "out"
    record_calls = []
    real = shard_writer._write_record

    def killed_at_the_third(partial, record):  # 1: the start, 2: shard 0, 3: shard 1
        record_calls.append(len(record["shards"]))
        if len(record_calls) == 3:
            raise KeyboardInterrupt
        real(partial, record)

    monkeypatch.setattr(shard_writer, "_write_record", killed_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        write_shards(str(source), out, per_shard=PER_SHARD, progress=False)
    monkeypatch.setattr(shard_writer, "_write_record", real)
    reads = _Reads(monkeypatch)
    write_shards(str(source), out, per_shard=PER_SHARD, progress=False)
    assert reads.indices == list(range(3, 12))
    assert _contents(out) == expected


def test_a_half_written_or_damaged_shard_is_never_kept(tmp_path, monkeypatch, capsys, reference):
    source, _, expected = reference
    out = tmp_path / "out"
    _interrupt(source, out, monkeypatch)
    partial = out / PARTIAL_DIR
    # what a kill -9 leaves: the shard being written cut off mid-member, a temporary record
    (partial / "shard-000002.tar").write_bytes((partial / "shard-000002.tar").read_bytes()[:700])
    (partial / ".progress.json.tmp").write_text('{"identity": ')
    # and a recorded shard changed since (same size, other bytes): caught by its checksum
    data = bytearray((partial / "shard-000001.tar").read_bytes())
    data[600] ^= 0xFF
    (partial / "shard-000001.tar").write_bytes(bytes(data))
    reads = _Reads(monkeypatch)
    write_shards(str(source), out, per_shard=PER_SHARD, progress=False)
    assert "shard-000001.tar does not hold the bytes recorded: writing it again" in capsys.readouterr().err
    assert reads.indices == list(range(3, 12))
    assert _contents(out) == expected


def test_a_recorded_shard_gone_or_cut_is_written_again_with_those_after_it(tmp_path, monkeypatch, capsys, reference):
    source, _, expected = reference
    out = tmp_path / "out"
    _interrupt(source, out, monkeypatch, stop_at=12)  # shards 0, 1, 2 closed
    first = out / PARTIAL_DIR / "shard-000001.tar"
    first.write_bytes(first.read_bytes()[:1000])
    reads = _Reads(monkeypatch)
    write_shards(str(source), out, per_shard=PER_SHARD, progress=False)
    assert "shard-000001.tar is 1,000 bytes, but" in capsys.readouterr().err
    assert reads.indices == list(range(3, 12))
    assert _contents(out) == expected


@pytest.mark.parametrize("change, message", [
    ({"per_shard": 4}, "--per-shard is 3 there but 4 now"),
    ({"split": "eval"}, "--split is 'train' there but 'eval' now"),
])
def test_other_options_are_refused_and_overwrite_starts_over(tmp_path, monkeypatch, reference, change, message):
    source, _, _ = reference
    out = tmp_path / "out"
    record = _interrupt(source, out, monkeypatch)
    before = _contents(out / PARTIAL_DIR)
    options = {"per_shard": PER_SHARD, "progress": False, **change}
    with pytest.raises(ValueError, match=r"cannot continue the unfinished run in .*\.partial \(2 shards, 6 images "
                                         rf"written\): {message}\. Run it again as it was .* pass --overwrite"):
        write_shards(str(source), out, **options)
    assert _contents(out / PARTIAL_DIR) == before  # hours of work are not thrown away on a typo
    assert json.loads((out / PARTIAL_DIR / PROGRESS_FILE).read_text()) == record

    reads = _Reads(monkeypatch)
    report = write_shards(str(source), out, overwrite=True, **options)
    assert reads.indices == list(range(12)) and report.count == 11
    assert not (out / PARTIAL_DIR).exists()
    fresh = tmp_path / "fresh"
    write_shards(str(source), fresh, **options)
    assert _contents(out) == _contents(fresh)


def test_a_source_that_changed_meanwhile_is_refused_naming_the_files(tmp_path, monkeypatch, reference):
    source, _, _ = reference
    out = tmp_path / "out"
    _interrupt(source, out, monkeypatch)
    noise(99).save(source / "a" / "00b.png")  # sorts among the items already written
    with pytest.raises(ValueError, match=r"1 file added \(a/00b.png\) since that run began"):
        write_shards(str(source), out, per_shard=PER_SHARD, progress=False)
    (source / "a" / "00b.png").unlink()
    noise(98).save(source / "a" / "01.png")  # rewritten in place
    os.utime(source / "a" / "01.png", ns=(1, 1))
    with pytest.raises(ValueError, match=r"1 file modified \(a/01.png\) since that run began"):
        write_shards(str(source), out, per_shard=PER_SHARD, progress=False)
    other = _source(tmp_path / "other")
    with pytest.raises(ValueError, match=r"the source is '.*src' there but '.*other' now"):
        write_shards(str(other), out, per_shard=PER_SHARD, progress=False)


def test_a_run_stopped_before_its_first_shard_closed_starts_over_whatever_changed(tmp_path, monkeypatch, capsys,
                                                                                  reference):
    source, _, _ = reference
    out = tmp_path / "out"
    record = _interrupt(source, out, monkeypatch, stop_at=2)
    assert record["shards"] == []
    report = write_shards(str(source), out, per_shard=4, progress=False)  # nothing to lose: no refusal
    assert "starting over: the unfinished run there had closed no shard (--per-shard is 3 there but 4 now)" in (
        capsys.readouterr().err)
    assert report.count == 11 and len(report.shards) == 3


def test_an_older_partial_folder_without_a_record_starts_over(tmp_path, capsys, reference):
    source, _, expected = reference
    out = tmp_path / "out"
    (out / PARTIAL_DIR).mkdir(parents=True)
    (out / PARTIAL_DIR / "shard-000000.tar").write_bytes(b"half a shard")  # an older vqgpt's interrupted run
    write_shards(str(source), out, per_shard=PER_SHARD, progress=False)
    assert "it holds no record of a shard closed whole" in capsys.readouterr().err
    assert _contents(out) == expected


def test_a_damaged_record_is_refused_until_overwrite(tmp_path, monkeypatch, reference):
    source, _, expected = reference
    out = tmp_path / "out"
    _interrupt(source, out, monkeypatch)
    (out / PARTIAL_DIR / PROGRESS_FILE).write_text('{"identity": {}, "shards": [{"name": "x"}]}')
    with pytest.raises(ValueError, match=r"its record .*progress.json cannot be read .*lacks .*--overwrite"):
        write_shards(str(source), out, per_shard=PER_SHARD, progress=False)
    write_shards(str(source), out, per_shard=PER_SHARD, progress=False, overwrite=True)
    assert _contents(out) == expected


def test_two_runs_into_one_folder_do_not_interleave(tmp_path, monkeypatch, reference):
    source, _, expected = reference
    out = tmp_path / "out"
    _interrupt(source, out, monkeypatch)
    held = shard_writer._lock(out / PARTIAL_DIR)  # a run that is writing there
    try:
        with pytest.raises(ValueError, match=rf"{out} is in use by pid {os.getpid()} on .*another `vqgpt shard`"):
            write_shards(str(source), out, per_shard=PER_SHARD, progress=False)
        with pytest.raises(ValueError, match="in use by"):  # not even to delete its shards
            write_shards(str(source), out, per_shard=PER_SHARD, progress=False, overwrite=True)
    finally:
        os.close(held)
    write_shards(str(source), out, per_shard=PER_SHARD, progress=False)
    assert _contents(out) == expected


def test_resolution_counts_only_where_images_are_encoded_again(tmp_path):
    folder = _source(tmp_path / "src")
    for source, wanted in ((str(folder), None), ("builtin:mnist", 8)):
        dataset = build_dataset(DataConfig(source=source, resolution=8), "eval")
        identity, _ = shard_writer._identity(source, "eval", 3, 8, "", dataset)
        assert identity["resolution"] == wanted  # a folder's files are copied as stored, at any --resolution


def test_vqgpt_shard_continues_refuses_and_overwrites(tmp_path, monkeypatch, capsys, reference):
    source, _, expected = reference
    out = tmp_path / "out"
    _interrupt(source, out, monkeypatch)
    assert main(["shard", str(source), str(out), "--per-shard", "4"]) == 2
    assert "--per-shard is 3 there but 4 now" in capsys.readouterr().err
    assert main(["shard", str(source), str(out), "--per-shard", "3"]) == 0
    printed = capsys.readouterr().out
    assert "continuing after shard-000001.tar" in printed and "wrote 11 images (2 classes) into 4 shards" in printed
    assert _contents(out) == expected
    # the same command again (a script re-run after a stop that came once the set was whole): nothing to do
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(["shard", str(source), str(out), "--per-shard", "3"]) == 0
    said = capsys.readouterr()
    assert "already holds the 4 finished shards" in said.err and "nothing to do" in said.err
    assert "already written: 11 images (2 classes) into 4 shards" in said.out and "shard-{000000..000003}" in said.out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    # other options, or a set that is not the one recorded, are refused naming why
    assert main(["shard", str(source), str(out), "--per-shard", "4"]) == 2
    assert "already holds 4 finished shards of another conversion (--per-shard is 3 there but 4 now)" in \
        capsys.readouterr().err
    (out / "shard-000003.tar").unlink()
    assert main(["shard", str(source), str(out), "--per-shard", "3"]) == 2
    assert "(its shards are not those its record lists)" in capsys.readouterr().err
    assert main(["shard", str(source), str(out), "--per-shard", "4", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [".shards.json", "classes.json",
                                                     *(f"shard-00000{i}.tar" for i in range(3))]
    (out / ".shards.json").unlink()  # a set of an earlier vqgpt, without the record: refused as before
    assert main(["shard", str(source), str(out), "--per-shard", "4"]) == 2
    assert "already holds 3 shards (shard-000000.tar, ...)" in capsys.readouterr().err


@pytest.mark.parametrize("moved_before_the_stop", [0, 2, 4])
def test_a_run_stopped_while_moving_its_shards_is_finished_by_the_next(tmp_path, monkeypatch, reference,
                                                                      moved_before_the_stop):
    """Stopped after moving some shards into OUT: classes.json went first, so wds:OUT read the shards moved
    so far as the whole set, and a re-run refused ("already holds N shards")."""
    source, report, expected = reference
    out, moves = tmp_path / "out", []
    replace = os.replace

    def stopping(src, dst):
        if Path(dst).parent == out:
            if len(moves) == moved_before_the_stop:
                raise KeyboardInterrupt
            moves.append(dst)
        replace(src, dst)

    monkeypatch.setattr(shard_writer.os, "replace", stopping)
    with pytest.raises(KeyboardInterrupt):
        write_shards(str(source), out, per_shard=PER_SHARD, progress=False)
    monkeypatch.setattr(shard_writer.os, "replace", replace)
    assert not (out / "classes.json").exists()  # moved last: no set in OUT reads as complete
    reads = _Reads(monkeypatch)
    finished = write_shards(str(source), out, per_shard=PER_SHARD, progress=False)
    assert not reads.indices  # nothing written again: the rest moved
    assert _contents(out) == expected and finished.count == report.count
    assert finished.classes == report.classes and finished.unreadable == report.unreadable
    assert len(build_dataset(DataConfig(source=f"wds:{out}", resolution=16), "train")) == 11


def test_an_out_path_with_percent_signs_or_a_colon(tmp_path, monkeypatch, reference):
    """webdataset %-formats the shard pattern and reads 'name:...' as a URL: '100%done' crashed with a
    TypeError, 'a%%b' wrote elsewhere, and a relative 'out:1' found no handler."""
    source, _, expected = reference
    for name in ("100%done", "a%%b", "%d"):
        write_shards(str(source), tmp_path / name, per_shard=PER_SHARD, progress=False)
        assert _contents(tmp_path / name) == expected, name
    monkeypatch.chdir(tmp_path)
    write_shards(str(source), Path("out:1"), per_shard=PER_SHARD, progress=False)
    assert _contents(tmp_path / "out:1") == expected


def test_a_set_is_never_written_over_what_it_reads(tmp_path, capsys, reference):
    """Re-sharding wds:OUT into OUT (say, for another --per-shard) deleted the source with --overwrite and
    then failed reading it; writing into the image folder, or into '' (the working folder), is refused too."""
    source, _, expected = reference
    ref = tmp_path / "ref"
    for overwrite in ([], ["--overwrite"]):
        assert main(["shard", f"wds:{ref}", str(ref), "--per-shard", "4", *overwrite]) == 2
        err = capsys.readouterr().err
        assert f"--out {ref} holds the shards of the source wds:{ref} (shard-000000.tar, ...)" in err, err
        assert _contents(ref) == expected  # nothing deleted, nothing added
    assert main(["shard", f"wds:{ref}/shard-000001.tar", str(tmp_path / "ref2"), "--per-shard", "4"]) == 0
    for out, where in ((source, "is"), (source / "a", "is inside")):
        assert main(["shard", str(source), str(out), "--per-shard", "4"]) == 2
        assert f"--out {out} {where} the image folder {source}" in capsys.readouterr().err
        assert not list(Path(out).glob("*.tar")) and not (Path(out) / PARTIAL_DIR).exists()
    assert main(["shard", str(source), "", "--per-shard", "4"]) == 2
    assert "--out is empty" in capsys.readouterr().err
