"""Hostile out folders for reconstruct: the user's own numbered images, an --out that overlaps the image
folder, and two runs into one folder at once. None of them may cost the user a file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from stage1_vq import QuantizerConfig, VQModel, VQModelConfig
from stage1_vq.evaluate import reconstruct
from vqgpt.cli.commands import main
from vqgpt.ground.data import UnreadableImageWarning
from vqgpt.training.run_folder import RunFolderError, RunLock

# the same tiny tokenizer as the other hostile stage-1 tests
from test_hostile_stage1 import R, tokenizer_dir  # noqa: F401 (a fixture)


def _images(folder, count, first=0):
    """``count`` noise PNGs named like FFHQ's (00000.png, ...); returns their bytes by path."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(first, first + count):
        pixels = np.random.default_rng(k).integers(0, 255, (R, R, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{k:05d}.png")
    return _contents(folder)


def _contents(folder, lock=True):
    """Every file under ``folder`` and its bytes; ``lock=False``: leave out the .lock a refused run may leave
    (the lock file is never deleted, see RunLock)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and (lock or p.name != ".lock")}


def _run(tokenizer_dir, images, out, **kwargs):
    return reconstruct(tokenizer_dir, str(images), out, lpips="none", device="cpu", progress=False, **kwargs)


# ------------------------------------------------------------------------- the user's own numbered images


def test_reconstruct_never_deletes_numbered_images_it_did_not_write(tokenizer_dir, tmp_path):
    source = tmp_path / "held_out"
    _images(source, 3)
    proj = tmp_path / "proj"
    mine = _images(proj / "images", 4)  # the user's own 00000.png ... 00003.png
    with pytest.raises(ValueError, match=r"proj/images holds images this command did not write \(00000\.png, "
                                         r".*choose another --out"):
        _run(tokenizer_dir, source, proj)
    assert _contents(proj, lock=False) == {f"images/{name}": data for name, data in mine.items()}

    # the same through the command line: a one-line error, exit code 2, every file kept
    code = main(["reconstruct", "--tokenizer", str(tokenizer_dir), "--images", str(source), "--out", str(proj),
                 "--lpips", "none", "--json"])
    assert code == 2
    assert _contents(proj, lock=False) == {f"images/{name}": data for name, data in mine.items()}


def test_reconstruct_of_ffhq_style_images_into_their_parent_keeps_them(tokenizer_dir, tmp_path, capsys):
    ff = tmp_path / "ff"
    mine = _images(ff / "images", 6)
    for images in (ff / "images", ff):
        code = main(["reconstruct", "--tokenizer", str(tokenizer_dir), "--images", str(images), "--out", str(ff),
                     "--lpips", "none", "--json"])
        assert code == 2
        assert "overlap" in capsys.readouterr().err
        assert _contents(ff) == {f"images/{name}": data for name, data in mine.items()}


def test_a_recorded_run_is_replaced_and_an_older_unrecorded_one_is_recognised(tokenizer_dir, tmp_path):
    source = tmp_path / "held_out"
    _images(source, 4)
    out = tmp_path / "recon"
    _run(tokenizer_dir, source, out, num_images=4)
    # what a reconstruct of an earlier vqgpt left (no record): its metrics.json names as many images as it holds
    (out / ".reconstruct.json").unlink()
    assert _run(tokenizer_dir, source, out, num_images=2)["num_images"] == 2
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000.png", "00001.png"]
    # ... but a numbered image beyond those it counted is not its own
    pixels = np.zeros((R, R, 3), dtype=np.uint8)
    (out / ".reconstruct.json").unlink()
    Image.fromarray(pixels).save(out / "images" / "00002.png")
    with pytest.raises(ValueError, match="holds images this command did not write"):
        _run(tokenizer_dir, source, out, num_images=1)
    assert (out / "images" / "00002.png").is_file() and (out / "images" / "00001.png").is_file()


@pytest.mark.parametrize("theirs", [["metrics.json"], ["grid.png"], ["metrics.json", "grid.png"]])
def test_reconstruct_never_replaces_a_metrics_json_or_grid_it_did_not_write(tokenizer_dir, tmp_path, theirs):
    source = tmp_path / "held_out"
    _images(source, 2)
    proj = tmp_path / "proj"
    proj.mkdir()
    for name in theirs:  # e.g. a training project's own metrics.json (another program's keys)
        (proj / name).write_bytes(b'{"loss": 0.5}\n' if name.endswith(".json") else b"the user's grid")
    mine = _contents(proj)
    with pytest.raises(ValueError, match=rf"proj holds {theirs[0]}.* that this command did not write"):
        _run(tokenizer_dir, source, proj)
    assert _contents(proj, lock=False) == mine
    # metrics only (no images kept) writes metrics.json and grid.png there too: refused the same way
    code = main(["eval-tokenizer", "--tokenizer", str(tokenizer_dir), "--images", str(source), "--out", str(proj),
                 "--lpips", "none", "--fid-weights", "random", "--json"])
    assert code == 2
    assert _contents(proj, lock=False) == mine
    # a folder reconstruct wrote is replaced as before (its record names it)
    out = tmp_path / "recon"
    _run(tokenizer_dir, source, out)
    assert _run(tokenizer_dir, source, out, num_images=1)["num_images"] == 1
    assert json.loads((out / "metrics.json").read_text())["num_images"] == 1


# ------------------------------------------------------------------------- --out overlapping --images


@pytest.mark.parametrize("where", ["same", "out-inside", "images-inside"])
def test_reconstruct_refuses_an_out_that_overlaps_the_image_folder(tokenizer_dir, tmp_path, where):
    loose = tmp_path / "loose"
    _images(loose / ("sub" if where == "images-inside" else ""), 5)
    images, out = {"same": (loose, loose), "out-inside": (loose, loose / "recon"),
                   "images-inside": (loose / "sub", loose)}[where]
    before = _contents(tmp_path)
    with pytest.raises(ValueError, match=r"--out .* and --images .* overlap"):
        _run(tokenizer_dir, images, out)
    assert _contents(tmp_path) == before  # refused before anything was written or deleted (not even a lock)
    assert not (loose / "recon").exists()


def test_reconstruct_refuses_the_tokenizers_own_folder_as_out(tokenizer_dir, tmp_path, capsys):
    """--out TOK with --tokenizer TOK wrote images/, grid.png, metrics.json and a lock among the model's files
    (found by a hostile probe); refused before anything is written, by eval-tokenizer too."""
    source = tmp_path / "held_out"
    _images(source, 3)
    before = _contents(tokenizer_dir)
    with pytest.raises(ValueError, match=r"--out .* is the tokenizer's own folder"):
        _run(tokenizer_dir, source, tokenizer_dir)
    assert main(["eval-tokenizer", "--tokenizer", str(tokenizer_dir), "--images", str(source), "--out",
                 str(tokenizer_dir) + "/", "--lpips", "none", "--fid-weights", "random"]) == 2
    assert "is the tokenizer's own folder" in capsys.readouterr().err
    assert _contents(tokenizer_dir) == before


def test_one_image_file_given_with_its_own_folder_as_out_is_refused(tokenizer_dir, tmp_path, capsys):
    folder = tmp_path / "ffhq"
    before = _images(folder, 3)
    assert main(["reconstruct", "--tokenizer", str(tokenizer_dir), "--images", str(folder / "00001.png"),
                 "--out", str(folder), "--lpips", "none"]) == 2
    assert "overlap (--out holds the image folder)" in capsys.readouterr().err
    assert _contents(folder) == before


def test_reconstruct_beside_the_image_folder_reads_the_same_images_each_time(tokenizer_dir, tmp_path):
    loose = tmp_path / "loose"
    _images(loose, 5)
    first = _run(tokenizer_dir, loose, tmp_path / "loose-recon")
    second = _run(tokenizer_dir, loose, tmp_path / "loose-recon")
    assert first["num_images"] == second["num_images"] == 5 and first["psnr"] == second["psnr"]


# ------------------------------------------------------------------------- two runs at once


def test_reconstruct_refuses_a_folder_another_run_holds(tokenizer_dir, tmp_path):
    source = tmp_path / "held_out"
    _images(source, 3)
    out = tmp_path / "recon"
    _run(tokenizer_dir, source, out)
    before = _contents(out)
    lock = RunLock(out)
    lock.acquire()
    try:
        with pytest.raises(RunFolderError, match=r"recon is in use by pid \d+ .*choose another --out"):
            _run(tokenizer_dir, source, out, num_images=1)
    finally:
        lock.release()
    assert _contents(out) == before
    assert json.loads((out / "metrics.json").read_text())["num_images"] == 3
    assert _run(tokenizer_dir, source, out, num_images=1)["num_images"] == 1  # free again once released


def test_under_accelerate_launch_only_the_first_process_writes(tokenizer_dir, tmp_path, monkeypatch):
    source = tmp_path / "held_out"
    _images(source, 3)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    metrics = _run(tokenizer_dir, source, tmp_path / "recon")
    assert metrics["num_images"] == 3
    assert not (tmp_path / "recon").exists()


def test_a_run_stopped_midway_leaves_a_folder_the_next_run_may_replace(tokenizer_dir, tmp_path):
    source = tmp_path / "held_out"
    _images(source, 4)
    out = tmp_path / "recon"

    def stop(originals, reconstructions):
        if stop.batches == 1:
            raise KeyboardInterrupt
        stop.batches += 1
    stop.batches = 0

    with pytest.raises(KeyboardInterrupt):
        _run(tokenizer_dir, source, out, batch_size=2, on_batch=stop)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000.png", "00001.png"]
    assert _run(tokenizer_dir, source, out, num_images=1)["num_images"] == 1  # its images were recorded first
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000.png"]


# ------------------------------------------------------------------------- which input each output is


def _varied_images(folder):
    """Five PNGs that a tokenizer reconstructs apart (a flat colour plus noise each, so their codes differ),
    the middle one (eel.png) damaged: the outputs after it are numbered one lower than their inputs."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(["cat", "dog", "eel", "fox", "gnu"]):
        rng = np.random.default_rng(k)
        pixels = np.clip(rng.integers(0, 255, 3) + rng.integers(-40, 40, (R, R, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{name}.png")
    (folder / "eel.png").write_bytes((folder / "eel.png").read_bytes()[:60])  # a truncated PNG


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _sources(out):
    return json.loads((out / "sources.json").read_text())


def test_sources_json_names_the_input_behind_each_reconstruction(tokenizer_dir, tmp_path):
    source = tmp_path / "held_out"
    _varied_images(source)
    out = tmp_path / "recon"
    with pytest.warns(UnreadableImageWarning, match="eel.png"):
        metrics = _run(tokenizer_dir, source, out, batch_size=2)  # eel.png is left out of the second batch
    assert metrics["num_images"] == 4
    assert _sources(out) == {"names": ["cat.png", "dog.png", "fox.png", "gnu.png"], "unreadable": ["eel.png"]}
    outputs = sorted((out / "images").glob("*.png"))
    assert [p.name for p in outputs] == ["00000.png", "00001.png", "00002.png", "00003.png"]

    # each named input reconstructed on its own: output i is the reconstruction of names[i] and of no other
    alone = {}
    for name in _sources(out)["names"]:
        (tmp_path / f"alone-{name}").mkdir()
        (tmp_path / f"alone-{name}" / name).write_bytes((source / name).read_bytes())
        _run(tokenizer_dir, tmp_path / f"alone-{name}", tmp_path / f"alone-{name}-recon")
        alone[name] = _pixels(tmp_path / f"alone-{name}-recon" / "images" / "00000.png")
    for path, name in zip(outputs, _sources(out)["names"]):
        distances = {other: int(np.abs(_pixels(path) - image).max()) for other, image in alone.items()}
        assert distances[name] <= 1, (path.name, name, distances)  # the same image (a batch may round apart)
        assert min(d for other, d in distances.items() if other != name) > 8, (path.name, name, distances)


def test_sources_json_follows_num_and_is_replaced_by_a_rerun(tokenizer_dir, tmp_path):
    source = tmp_path / "held_out"
    _varied_images(source)
    out = tmp_path / "recon"
    with pytest.warns(UnreadableImageWarning):
        _run(tokenizer_dir, source, out, num_images=3, batch_size=2)  # --num counts readable images
    assert _sources(out) == {"names": ["cat.png", "dog.png", "fox.png"], "unreadable": ["eel.png"]}
    _run(tokenizer_dir, source, out, num_images=1)
    assert _sources(out) == {"names": ["cat.png"], "unreadable": []}
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000.png"]
    # a folder copied without its dot-files (no .reconstruct.json): its sources.json is still recognised
    (out / ".reconstruct.json").unlink()
    _run(tokenizer_dir, source, out, num_images=2)  # reads cat.png and dog.png only
    assert _sources(out) == {"names": ["cat.png", "dog.png"], "unreadable": []}
    # metrics only (no images kept): sources.json names the images the figures are of
    _run(tokenizer_dir, source, out, num_images=1, save_images=False)
    assert _sources(out) == {"names": ["cat.png"], "unreadable": []}
    assert not list((out / "images").glob("*.png"))


def test_reconstruct_never_replaces_a_sources_json_it_did_not_write(tokenizer_dir, tmp_path):
    source = tmp_path / "held_out"
    _images(source, 2)
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "sources.json").write_text('{"urls": ["https://example.org/a.png"]}\n')  # the user's own
    mine = _contents(proj)
    with pytest.raises(ValueError, match=r"proj holds sources\.json that this command did not write; it "
                                         r"writes its own metrics\.json, grid\.png and sources\.json there"):
        _run(tokenizer_dir, source, proj)
    assert _contents(proj, lock=False) == mine
    # beside the output of a vqgpt that wrote no sources.json (its record says nothing of one): the user's too
    out = tmp_path / "recon"
    _run(tokenizer_dir, source, out)
    (out / ".reconstruct.json").write_text(json.dumps({"images": 2}) + "\n")
    (out / "sources.json").write_text('{"names": ["mine"], "unreadable": []}\n')
    with pytest.raises(ValueError, match="holds sources.json that this command did not write"):
        _run(tokenizer_dir, source, out, num_images=1)
    assert (out / "sources.json").read_text() == '{"names": ["mine"], "unreadable": []}\n'
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000.png", "00001.png"]


def test_reconstruct_command_says_it_wrote_sources_json_and_names_one_image_file(tokenizer_dir, tmp_path, capsys):
    source = tmp_path / "held_out"
    _varied_images(source)
    scan = tmp_path / "scan.data"  # one image file whose extension the folder scan does not list
    scan.write_bytes((source / "dog.png").read_bytes())
    code = main(["reconstruct", "--tokenizer", str(tokenizer_dir), "--images", str(scan), "--out",
                 str(tmp_path / "one"), "--lpips", "none"])
    assert code == 0
    assert f"{tmp_path / 'one'}/grid.png, images/, sources.json" in capsys.readouterr().out
    assert _sources(tmp_path / "one") == {"names": ["scan.data"], "unreadable": []}


def test_a_resolution_over_pils_pixel_limit_is_refused_before_any_work(tokenizer_dir, tmp_path, capsys):
    """`reconstruct --resolution 100000` grew to ~24 GB and was killed for memory, with no word."""
    for argv in (["reconstruct", "--tokenizer", str(tokenizer_dir), "--images", "builtin:mnist", "--resolution",
                  "100000", "--out", str(tmp_path / "out")],
                 ["fid-stats", "--images", "builtin:mnist", "--resolution", "100000", "--out",
                  str(tmp_path / "s.npz"), "--fid-weights", "random"]):
        assert main(argv) == 2
        assert ("resolution 100000 gives 100000x100000-pixel images (10,000,000,000 pixels), more than "
                "PIL.Image.MAX_IMAGE_PIXELS") in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
