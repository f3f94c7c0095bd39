"""The folder source's file index: built once, read by later starts (no image opened, no folder walked),
rebuilt when the folder changes or the index file is damaged; unreadable images found when first read."""

from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from PIL import Image

import vqgpt.ground.file_index as file_index
from vqgpt.cli import main
from vqgpt.ground.config import from_dict, load_config
from vqgpt.ground.data import DataConfig, Unreadable, UnreadableImageWarning, build_dataset, source_identity
from vqgpt.ground.dataset_base import class_table
from vqgpt.ground.file_index import default_index_dir, folder_index, index_path, load_index

ROOT = Path(__file__).resolve().parents[1]
R = 16


def _image(path: Path, seed: int, side: int = R + 4) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(path)


def _settle(root: Path, age_s: float = 60.0) -> None:
    """Date every directory under ``root`` ``age_s`` back: a folder nobody is writing to (a directory
    changed within file_index.RACY_NS of the scan is not trusted, and is scanned again)."""
    then = time.time_ns() - int(age_s * 1e9)
    for dirpath, _, _ in os.walk(root):
        os.utime(dirpath, ns=(then, then))


def _folder(root: Path, n: int = 6) -> Path:
    for i in range(n):
        _image(root / ("cats" if i % 2 else "dogs") / f"{i:02d}.png", i)
    _image(root / "top.png", 99)
    _settle(root)
    return root


def _cfg(root: Path, **kwargs) -> DataConfig:
    return DataConfig(source=str(root), resolution=R, **kwargs)


class _Touches:
    """Counts the files opened and the directories listed under ``root`` while installed."""

    def __init__(self, monkeypatch, root: Path) -> None:
        self.root = str(root.resolve())
        self.opened: list[str] = []
        self.listed: list[str] = []
        real_open, real_image_open, real_scandir = builtins.open, PIL.Image.open, os.scandir

        def under(path) -> bool:
            return isinstance(path, (str, os.PathLike)) and os.path.realpath(path).startswith(self.root)

        def open_(file, *args, **kwargs):
            if under(file):
                self.opened.append(str(file))
            return real_open(file, *args, **kwargs)

        def image_open(fp, *args, **kwargs):
            if under(fp):
                self.opened.append(str(fp))
            return real_image_open(fp, *args, **kwargs)

        def scandir(path="."):
            if under(path):
                self.listed.append(str(path))
            return real_scandir(path)

        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(PIL.Image, "open", image_open)
        monkeypatch.setattr(os, "scandir", scandir)


# ------------------------------------------------------------------------------------------ reuse


def test_second_start_reads_the_index_and_opens_no_image(tmp_path, monkeypatch):
    root = _folder(tmp_path / "imgs")
    first = build_dataset(_cfg(root))
    assert first.index_file == index_path(root) and first.index_file.is_file()
    assert first.index_file.parent == default_index_dir()  # $VQGPT_CACHE/index (tests/conftest.py sets it)

    touches = _Touches(monkeypatch, root)
    second = build_dataset(_cfg(root))
    eval_split = build_dataset(_cfg(root), "eval")
    assert touches.opened == [] and touches.listed == []  # no image opened, no folder walked
    names = [second.name(i) for i in range(len(second))]
    assert names == [first.name(i) for i in range(len(first))] == [eval_split.name(i) for i in range(len(second))]
    assert names == ["cats/01.png", "cats/03.png", "cats/05.png", "dogs/00.png", "dogs/02.png", "dogs/04.png",
                     "top.png"]
    assert second.classes == ["cats", "default", "dogs"] and second.labels.tolist() == [0, 0, 0, 2, 2, 2, 1]
    image, label = second[0]  # reading an item opens its file, and only then
    assert image.shape == (3, R, R) and label == 0 and set(touches.opened) == {str(root / "cats" / "01.png")}


def test_first_start_opens_no_image_either(tmp_path, monkeypatch):
    root = _folder(tmp_path / "imgs")
    touches = _Touches(monkeypatch, root)
    ds = build_dataset(_cfg(root))
    assert len(ds) == 7 and touches.opened == []  # only listed (and stat'ed)
    assert touches.listed


# ------------------------------------------------------------------------------------- invalidation


def test_index_is_rebuilt_when_a_file_is_added_removed_or_renamed(tmp_path):
    root = _folder(tmp_path / "imgs")
    names = lambda ds: [ds.name(i) for i in range(len(ds))]  # noqa: E731
    assert len(build_dataset(_cfg(root))) == 7

    _image(root / "cats" / "new.png", 100)
    assert "cats/new.png" in names(build_dataset(_cfg(root)))
    _settle(root)

    (root / "dogs" / "02.png").unlink()
    after_removal = names(build_dataset(_cfg(root)))
    assert "dogs/02.png" not in after_removal and len(after_removal) == 7
    _settle(root)

    (root / "dogs" / "04.png").rename(root / "dogs" / "04b.png")
    _image(root / "birds" / "0.png", 101)  # a new class folder
    ds = build_dataset(_cfg(root))
    assert "dogs/04b.png" in names(ds) and "dogs/04.png" not in names(ds) and "birds" in ds.classes


def test_a_folder_changed_just_before_the_scan_is_scanned_again(tmp_path, monkeypatch):
    """A directory changed within RACY_NS of the scan may change again in the same clock tick unseen:
    such an index is not trusted at the next start."""
    root = _folder(tmp_path / "imgs")
    build_dataset(_cfg(root))
    _image(root / "cats" / "fresh.png", 7)  # now: within the racy window of the next scan
    build_dataset(_cfg(root))
    scans = []
    real_scan = file_index.scan_folder
    monkeypatch.setattr(file_index, "scan_folder", lambda r: scans.append(r) or real_scan(r))
    build_dataset(_cfg(root))
    assert len(scans) == 1  # not trusted yet
    _settle(root)
    build_dataset(_cfg(root))
    build_dataset(_cfg(root))
    assert len(scans) == 2  # scanned once more, then trusted


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other-format", "other-folder"])
def test_a_damaged_or_foreign_index_is_rebuilt_not_a_crash(tmp_path, damage):
    root = _folder(tmp_path / "imgs")
    path = build_dataset(_cfg(root)).index_file
    good = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(300))
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    else:
        other = _folder(tmp_path / "other", n=2)
        index = file_index.scan_folder(other if damage == "other-folder" else root)
        file_index.save_index(index, path)
        if damage == "other-format":  # e.g. written by an older vqgpt
            with np.load(path) as data:
                arrays = dict(data)
            arrays["format"] = np.int64(file_index.INDEX_FORMAT - 1)
            with open(path, "wb") as f:
                np.savez(f, **arrays)
    assert load_index(path, root) is None
    ds = build_dataset(_cfg(root))
    assert len(ds) == 7 and ds.name(0) == "cats/01.png"
    assert load_index(path, root) is not None  # written again, whole


def test_index_is_written_atomically(tmp_path, monkeypatch):
    """A write that dies half-way leaves the previous index whole (processes read it meanwhile)."""
    root = _folder(tmp_path / "imgs")
    path = build_dataset(_cfg(root, index_dir=str(tmp_path / "idx"))).index_file
    before = path.read_bytes()
    real = np.savez_compressed

    def dies(file, **arrays):
        real(file, **arrays)
        file.truncate(100)
        raise OSError("disk full")

    monkeypatch.setattr(file_index.np, "savez_compressed", dies)
    with pytest.raises(OSError, match="disk full"):
        file_index.save_index(file_index.scan_folder(root), path)
    left = sorted(p.name for p in path.parent.iterdir() if not p.name.endswith(".lock"))  # (the scanners' lock)
    assert path.read_bytes() == before and left == [path.name]


def test_index_dir_key_and_an_unwritable_cache(tmp_path, monkeypatch):
    root = _folder(tmp_path / "imgs")
    chosen = tmp_path / "my-index"
    ds = build_dataset(_cfg(root, index_dir=str(chosen)))
    assert ds.index_file.parent == chosen and ds.index_file.is_file()
    assert from_dict(DataConfig, {"source": str(root), "index_dir": str(chosen)}).index_dir == str(chosen)

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the index folder should be")
    with pytest.warns(UserWarning, match="could not write the file index .*data.index_dir"):
        ds = build_dataset(_cfg(root, index_dir=str(blocked)))
    assert len(ds) == 7 and ds.index_file is None  # used from memory
    # the process's next use of the folder (encode lists it twice) neither scans nor warns again ...
    scans = []
    scan = file_index.scan_folder
    monkeypatch.setattr(file_index, "scan_folder", lambda folder: scans.append(folder) or scan(folder))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(build_dataset(_cfg(root, index_dir=str(blocked)))) == 7
        assert source_identity(str(root), str(blocked))["files"]
    assert not scans and not [w for w in caught if "could not write" in str(w.message)]
    # ... until the folder changes
    time.sleep(0.01)
    _image(root / "cats" / "new.png", 99)
    with pytest.warns(UserWarning, match="could not write the file index"):
        assert len(build_dataset(_cfg(root, index_dir=str(blocked)))) == 8
    assert len(scans) == 1

    monkeypatch.delenv("VQGPT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_index_dir() == tmp_path / "xdg" / "vqgpt" / "index"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_index_dir() == tmp_path / "home" / ".cache" / "vqgpt" / "index"


def test_source_identity_uses_the_index_listing(tmp_path, monkeypatch):
    root = _folder(tmp_path / "imgs")
    build_dataset(_cfg(root))
    touches = _Touches(monkeypatch, root)
    identity = source_identity(str(root))
    assert touches.listed == [] and touches.opened == []  # stat'ed, not listed again, not opened
    assert [f[0] for f in identity["files"]] == ["cats/01.png", "cats/03.png", "cats/05.png", "dogs/00.png",
                                                 "dogs/02.png", "dogs/04.png", "top.png"]
    assert identity["files"][0][1] == (root / "cats" / "01.png").stat().st_size


# ------------------------------------------------------------------ unreadable images, found when read


def test_unreadable_image_is_skipped_when_first_read_and_named_once(tmp_path, monkeypatch):
    root = _folder(tmp_path / "imgs", n=4)
    (root / "cats" / "bad.png").write_bytes(b"not a png at all")
    _settle(root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = build_dataset(_cfg(root))  # nothing opened: nothing to warn about
    bad = [ds.name(i) for i in range(len(ds))].index("cats/bad.png")
    with pytest.warns(UnreadableImageWarning, match=r"cats/bad\.png") as record:
        items = [ds[i] for i in range(len(ds))] + [ds[bad]]
    assert len(record) == 1  # named once
    assert [i for i, item in enumerate(items) if isinstance(item, Unreadable)] == [bad, len(ds)]


def _tokenizer_cfg(root: Path, *overrides: str):
    from stage1_vq.train import TokenizerRunConfig

    return load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml",
                       [f"data.source={root}", "data.resolution=16", "data.hflip=false", "model.resolution=16",
                        "model.channel_mult=[1,2]", "model.attn_resolutions=[]", "train.log_every=1",
                        "train.warmup_steps=1", "train.checkpoint_every=0", *overrides])


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_counts_unreadable_items_and_survives_a_batch_of_nothing_but(tmp_path):
    """batch_size=1: the batch holding the bad file is empty; the step is dropped, not a crash, and
    the run counts each time the file was left out."""
    from stage1_vq.train import train_tokenizer

    root = tmp_path / "imgs"
    for i in range(3):
        _image(root / "a" / f"{i}.png", i)
    (root / "a" / "9-bad.png").write_bytes(b"\x89PNG broken")
    with pytest.warns(UnreadableImageWarning, match="9-bad.png"):
        train_tokenizer(_tokenizer_cfg(root, "train.batch_size=1", "train.steps=8"), tmp_path / "run")
    rows = _metrics(tmp_path / "run")
    assert [r["unreadable"] for r in rows][-1] == 2  # 8 steps = 2 epochs of 4 files: left out twice
    assert sorted({r["unreadable"] for r in rows}) == [0, 1, 2] and all(r["skipped"] == 0 for r in rows)
    assert sum("loss" not in r for r in rows) == 2  # the two empty micro-batches trained nothing
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_the_unreadable_count_is_a_run_total_across_a_resume(tmp_path):
    from stage1_vq.train import train_tokenizer

    root = tmp_path / "imgs"
    for i in range(3):
        _image(root / "a" / f"{i}.png", i)
    (root / "a" / "9-bad.png").write_bytes(b"\x89PNG broken")
    with pytest.warns(UnreadableImageWarning):
        train_tokenizer(_tokenizer_cfg(root, "train.batch_size=1", "train.steps=4", "train.checkpoint_every=4"),
                        tmp_path / "run")
        train_tokenizer(_tokenizer_cfg(root, "train.batch_size=1", "train.steps=8", "train.checkpoint_every=4"),
                        tmp_path / "run", resume="auto")
    assert _metrics(tmp_path / "run")[-1]["unreadable"] == 2  # left out once in each of the two epochs


def _launch(num_processes: int) -> list[str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(sys.executable).parent / "accelerate"
    head = [str(script), "launch"] if script.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    return [*head, "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]


@pytest.mark.slow
def test_two_ranks_go_on_when_one_rank_gets_only_unreadable_files(tmp_path):
    """One rank's batch holds nothing readable while the other's is fine: both drop that micro-batch
    (no rank waits alone in a collective), the run ends and counts every left-out item."""
    root = tmp_path / "imgs"
    for i in range(6):
        _image(root / ("a" if i % 2 else "b") / f"{i}.png", i)
    for name in ("x1.png", "x2.png"):
        (root / "a" / name).write_bytes(b"broken")
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, torch\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from accelerate import PartialState\n"
        "from stage1_vq.train import TokenizerRunConfig, train_tokenizer\n"
        "from vqgpt.ground.config import load_config\n"
        "torch.set_num_threads(1)\n"
        f"cfg = load_config(TokenizerRunConfig, {str(ROOT / 'configs/tokenizer/tiny.yaml')!r}, sys.argv[2:])\n"
        "train_tokenizer(cfg, sys.argv[1])\n"
        "state = PartialState()\n"
        "print(f'rank {state.process_index} of {state.num_processes} done', flush=True)\n")
    overrides = [f"data.source={root}", "data.resolution=16", "data.hflip=false", "model.resolution=16",
                 "model.channel_mult=[1,2]", "model.attn_resolutions=[]", "train.log_every=1", "train.warmup_steps=1",
                 "train.checkpoint_every=0", "train.batch_size=1", "train.steps=12"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([*_launch(2), str(script), str(tmp_path / "run"), *overrides], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=400)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "rank 0 of 2 done" in log and "rank 1 of 2 done" in log, log[-4000:]
    rows = _metrics(tmp_path / "run")
    # 12 steps x 2 ranks x 1 image = 3 epochs of 8 files: each broken file left out 3 times
    assert rows[-1]["unreadable"] == 6 and all(r["skipped"] == 0 for r in rows)
    assert any("loss" not in r for r in rows)  # some step had a rank with nothing readable


# ------------------------------------------------------------------------------------ vqgpt index


def test_vqgpt_index_builds_reuses_and_rebuilds(tmp_path, capsys):
    root = _folder(tmp_path / "imgs")
    where = tmp_path / "idx"
    assert main(["index", str(root), "--index-dir", str(where)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[:3] == [f"cats     {3:>10}", f"default  {1:>10}", f"dogs     {3:>10}"]
    assert "total: 7 files in 3 classes" in out and f"index: {index_path(root, where)} (built in" in out

    assert main(["index", str(root), "--index-dir", str(where), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "reused" and report["total"] == 7 and report["index"] == str(index_path(root, where))
    assert report["classes"] == {"cats": 3, "default": 1, "dogs": 3}

    _image(root / "dogs" / "new.png", 50)
    assert main(["index", str(root), "--index-dir", str(where), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "rebuilt" and report["classes"]["dogs"] == 4
    # the dataset finds the index `vqgpt index` wrote
    assert build_dataset(_cfg(root, index_dir=str(where))).index_file == index_path(root, where)


def test_vqgpt_index_warns_of_links_that_point_nowhere(tmp_path, capsys):
    """A dangling link is listed (fixing it counts as a change) but no image: the counts say so."""
    root = _folder(tmp_path / "imgs")
    (root / "cats" / "gone.png").symlink_to(tmp_path / "deleted.png")
    assert main(["index", str(root), "--index-dir", str(tmp_path / "idx"), "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["total"] == 8 and report["dangling_links"] == ["cats/gone.png"]
    assert "warning: 1 of the 8 files are links that point nowhere (cats/gone.png)" in captured.err
    (tmp_path / "deleted.png").write_bytes((root / "cats" / sorted(os.listdir(root / "cats"))[0]).read_bytes())
    assert main(["index", str(root), "--index-dir", str(tmp_path / "idx"), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["dangling_links"] == [] and "warning" not in captured.err


def test_vqgpt_index_warns_of_classes_that_print_alike(tmp_path, capsys):
    """'café' written in NFC and in NFD (macOS) printed as two identical lines; building the dataset warned,
    the command people check their counts with did not."""
    root = tmp_path / "imgs"
    _image(root / "caf\u00e9" / "0.png", 1)
    _image(root / "cafe\u0301" / "1.png", 2)
    _settle(root)
    assert main(["index", str(root), "--index-dir", str(tmp_path / "idx")]) == 0
    assert "warning: the classes 'cafe\\u0301' and 'caf\\xe9' are the same letters in two Unicode forms" in \
        capsys.readouterr().err


def test_a_folder_named_with_edge_spaces_is_that_folder(tmp_path, capsys):
    """Sources lose stray edge spaces, but not when the text as given names a path: 'trail ' beside 'trail'
    is read, indexed and recorded as itself, not as its neighbour."""
    spaced, plain = _folder(tmp_path / "trail ", n=2), _folder(tmp_path / "trail", n=4)
    assert main(["index", str(spaced), "--index-dir", str(tmp_path / "idx"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["root"] == str(spaced) and report["total"] == 3
    assert _cfg(spaced).source == str(spaced) and len(build_dataset(_cfg(spaced), "eval")) == 3
    assert DataConfig(source=f"  {plain} ", resolution=R).source == str(plain)  # a stray space: stripped
    assert DataConfig(source=" builtin:mnist", resolution=R).source == "builtin:mnist"


def test_vqgpt_index_that_cannot_write_the_index_exits_1(tmp_path, capsys):
    """Writing the index ahead is what `vqgpt index` is for: a script must see that it failed."""
    root = _folder(tmp_path / "imgs")
    (tmp_path / "f").write_text("a file, no folder")
    for k, json_flag in enumerate(([], ["--json"])):
        with pytest.warns(UserWarning, match="could not write the file index"):
            assert main(["index", str(root), "--index-dir", str(tmp_path / "f" / f"sub{k}"), *json_flag]) == 1
        captured = capsys.readouterr()
        assert "index: not written (see the warning)" in captured.out if not json_flag else \
            json.loads(captured.out)["index"] is None


def test_vqgpt_index_imports_no_torch(tmp_path):
    """Listing a folder needs no torch (seconds to import): `vqgpt index` answers at once."""
    root = _folder(tmp_path / "imgs")
    code = ("import sys; from vqgpt.cli import main; assert main(sys.argv[1:]) == 0; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", code, "index", str(root), "--index-dir", str(tmp_path / "idx")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "total: 7 files" in proc.stdout


def test_vqgpt_index_errors_name_the_source(tmp_path, capsys):
    assert main(["index", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"error: image folder not found: {tmp_path / 'nope'}"
    assert main(["index", "builtin:mnist"]) == 2
    assert "not 'builtin:mnist'" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["index", str(tmp_path / "empty")]) == 2
    assert "no image files found in" in capsys.readouterr().err
    assert folder_index(tmp_path / "empty").paths == []


def test_a_folder_behind_two_links_is_listed_under_its_real_name(tmp_path):
    root = tmp_path / "imgs"
    for i in range(2):
        _image(root / "real" / f"{i}.png", i)
    for alias in ("alias", "zz-alias"):  # names before and after "real"
        (root / alias).symlink_to("real")
    index = file_index.scan_folder(root)
    assert index.classes == ["real"] and index.paths == ["real/0.png", "real/1.png"]


def test_root_images_and_a_default_folder_are_one_class_with_a_warning(tmp_path):
    root = tmp_path / "imgs"
    _image(root / "top.png", 0)
    _image(root / "default" / "x.png", 1)
    _image(root / "cats" / "y.png", 2)
    with pytest.warns(UserWarning, match="sub-folder default/ are one class"):
        index = file_index.scan_folder(root)
    assert index.classes == ["cats", "default"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (root / "default" / "x.png").unlink()
        assert file_index.scan_folder(root).classes == ["cats", "default"]  # root images alone: no warning


def test_a_link_higher_up_does_not_take_a_deeper_folder_from_its_class(tmp_path):
    # imgs/best -> cats/kittens: the link is one level above the folder it names; the walk listed
    # kittens' images as class "best" (2) and left "cats" 1 of its 3
    root = tmp_path / "imgs"
    for path in ("cats/a.png", "cats/kittens/k1.png", "cats/kittens/k2.png"):
        _image(root / path, len(path))
    (root / "best").symlink_to("cats/kittens")
    (root / "loop").symlink_to(".")  # a link to the root itself: nothing listed twice
    index = file_index.scan_folder(root)
    assert index.class_counts() == {"cats": 3}
    assert index.paths == ["cats/a.png", "cats/kittens/k1.png", "cats/kittens/k2.png"]
    # a link to a folder outside the root, or to a hidden one the walk skips, is listed under its name
    _image(tmp_path / "elsewhere" / "e.png", 1)
    _image(root / ".hidden" / "h.png", 2)
    (root / "outside").symlink_to(tmp_path / "elsewhere")
    (root / "shown").symlink_to(".hidden")
    assert file_index.scan_folder(root).class_counts() == {"cats": 3, "outside": 1, "shown": 1}


def test_a_directory_time_in_the_future_is_trusted(tmp_path, monkeypatch):
    # a skewed NFS server or an archive's stored times: such an index was rebuilt at every start
    root = _folder(tmp_path / "imgs")
    later = time.time_ns() + 3600 * 10**9
    os.utime(root / "cats", ns=(later, later))
    build_dataset(_cfg(root))
    scans = []
    real_scan = file_index.scan_folder
    monkeypatch.setattr(file_index, "scan_folder", lambda r: scans.append(r) or real_scan(r))
    build_dataset(_cfg(root))
    assert not scans
    _image(root / "cats" / "new.png", 5)  # a real change still shows: the time is now, not the stored one
    assert len(build_dataset(_cfg(root))) == 8 and len(scans) == 1


def test_the_index_file_follows_the_umask(tmp_path):
    root = _folder(tmp_path / "imgs")
    old = os.umask(0o002)
    try:
        index = file_index.folder_index(root, tmp_path / "shared")
    finally:
        os.umask(old)
    assert index.path.stat().st_mode & 0o777 == 0o664  # group-shared cache: others of the group read it


def test_an_index_of_non_ascii_names_reads_back_under_an_ascii_file_name_encoding(tmp_path):
    """Under LC_ALL=C without Python's UTF-8 mode the first `vqgpt index` of 'ñandú/café 0.png' worked and
    every later start failed ('ascii' codec can't encode): the index stored the names as UTF-8 text, not as
    their bytes on disk."""
    for i in range(3):
        _image(tmp_path / "imgs" / "ñandú" / f"café {i}.png", i)
        _image(tmp_path / "imgs" / "日本" / f"{i}.png", 10 + i)
    _settle(tmp_path / "imgs")
    env = {**os.environ, "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "LC_ALL": "C", "LANG": "C",
           "VQGPT_CACHE": str(tmp_path / "cache")}
    runs = [subprocess.run([sys.executable, "-m", "vqgpt", "index", str(tmp_path / "imgs"), "--json"], env=env,
                           capture_output=True, text=True, timeout=300) for _ in range(2)]
    assert [run.returncode for run in runs] == [0, 0], runs[-1].stderr[-2000:]
    first, second = (json.loads(run.stdout) for run in runs)
    assert (first["status"], second["status"]) == ("built", "reused") and first["total"] == second["total"] == 6
    assert sorted(second["classes"].values()) == [3, 3]  # (named by their bytes: no ASCII name holds them)


def test_a_pipe_named_like_an_image_is_left_out_with_a_warning(tmp_path):
    """A FIFO called pipe.png was listed, and every reader (encode, shard, training) then waited on it forever."""
    root = _folder(tmp_path / "imgs")
    os.mkfifo(root / "cats" / "pipe.png")
    with pytest.warns(UserWarning, match=r"pipe.png is not a regular file \(a pipe, socket or device\): left out"):
        dataset = build_dataset(_cfg(root))
    assert "cats/pipe.png" not in [dataset.name(i) for i in range(len(dataset))] and len(dataset) == 7


def test_class_names_in_two_unicode_forms_are_warned_about(tmp_path):
    """Folders 'café' copied from Linux (NFC) and from macOS (NFD, 'e' + a combining accent) were two classes
    that print alike, without a word; the warning names both with ascii(), which shows the difference."""
    root = tmp_path / "imgs"
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    for i, name in enumerate((nfc, nfd, "dogs")):
        _image(root / name / f"{i}.png", i)
    with pytest.warns(UserWarning, match="are the same letters in two Unicode forms") as caught:
        dataset = build_dataset(_cfg(root))
    said = str(caught[0].message)
    assert str(root) in said and ascii(nfc) in said and ascii(nfd) in said
    assert len(dataset.classes) == 3
    # shards and Hub datasets (class_table): the same warning, naming an item of each class
    with pytest.warns(UserWarning, match=r"item 1 and item 0: the classes 'cafe\\u0301' and 'caf\\xe9'"):
        class_table([nfc, nfd, "dogs"], lambda i: f"item {i}")
    _image(tmp_path / "other" / nfc / "a.png", 0)
    _image(tmp_path / "other" / "cafe" / "b.png", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_dataset(_cfg(tmp_path / "other"))  # 'café' beside 'cafe' is no twin
        class_table(["cafe", "dogs", nfc], lambda i: f"item {i}")


def _python_sequences(obj, seen=None):
    """Every list or tuple reachable from ``obj``'s attributes (not inside arrays), with its length."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (str, bytes, np.ndarray, Path, int, float)):
        return []
    seen.add(id(obj))
    found = [(type(obj).__name__, len(obj))] if isinstance(obj, (list, tuple)) else []
    children = (list(obj.values()) if isinstance(obj, dict) else list(obj) if isinstance(obj, (list, tuple, set))
                else list(vars(obj).values()) if hasattr(obj, "__dict__") else [])
    for child in children:
        found += _python_sequences(child, seen)
    return found


def test_a_folder_dataset_keeps_its_files_in_arrays_that_forked_loader_workers_share(tmp_path):
    """The names and labels were Python lists: each DataLoader worker touched their objects' reference counts
    and so copied their pages (about 180 MB per worker at a million files). The names now read back from
    one byte array, undecodable (non-UTF-8) bytes and all."""
    root = tmp_path / "imgs"
    names = [f"n{i:03d}.png" for i in range(60)] + [os.fsdecode(b"caf\xe9.png"), "ñandú.png"]
    for i, name in enumerate(names):
        _image(root / ("cats" if i % 2 else "dogs") / name, i)
    _settle(root)
    ds = build_dataset(_cfg(root), "train")
    assert len(ds) == len(names)
    assert not [found for found in _python_sequences(ds) if found[1] >= 60]  # nothing per file
    listed = sorted(f"{'cats' if i % 2 else 'dogs'}/{name}" for i, name in enumerate(names))
    assert [ds.name(i) for i in range(len(ds))] == listed
    assert ds.files[-1] == ds.root / listed[-1] and ds.files[1:3] == [ds.root / p for p in listed[1:3]]
    assert [ds.files[i].is_file() for i in range(len(ds))] == [True] * len(ds)
    image, label = ds[0]
    assert type(label) is int and label == ds.classes.index(listed[0].split("/")[0])


def test_processes_starting_at_once_on_a_folder_scan_it_once(tmp_path, monkeypatch):
    """Every rank of a run walked the folder itself when no fresh index existed (a million files on one file
    server, N times at once): the first now scans, and the others wait for its index."""
    import threading

    root = _folder(tmp_path / "imgs")
    scans = []
    real_scan = file_index.scan_folder

    def slow_scan(r):
        scans.append(r)
        time.sleep(0.5)  # the others arrive while it scans
        return real_scan(r)

    monkeypatch.setattr(file_index, "scan_folder", slow_scan)
    found = []
    starts = [threading.Thread(target=lambda: found.append(file_index.folder_index(root, tmp_path / "idx")))
              for _ in range(3)]
    for start in starts:
        start.start()
    for start in starts:
        start.join()
    assert len(scans) == 1 and len(found) == 3
    assert [len(index) for index in found] == [7, 7, 7] and sum(index.reused for index in found) == 2
