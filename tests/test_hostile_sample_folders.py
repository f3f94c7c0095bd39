"""`sample --out FOLDER/ [--npz F.npz]` folders handled by hand: a pipeline with the same weights but
another config, a scratch folder NPZ.parts/ that someone else made, damaged PNGs or sampling.json, an
--npz that is the --out folder. Each is refused up front, or repaired, never mixed in silently."""

from __future__ import annotations

import json
import shutil

import pytest

from test_sample_many import _pngs, _run, pipe_dir  # noqa: F401 (fixture)


def test_the_same_weights_under_another_config_are_refused(pipe_dir, tmp_path):
    _run(pipe_dir, out=tmp_path / "s")
    (tmp_path / "s" / "000004.png").unlink()
    other = tmp_path / "other"
    shutil.copytree(pipe_dir, other)
    config = json.loads((other / "prior/config.json").read_text())
    config["config"]["rope_base"] = 7.0  # other images from the very same weights
    (other / "prior/config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="drawn by models of another config"):
        _run(other, out=tmp_path / "s")
    assert not (tmp_path / "s" / "000004.png").exists()
    assert _run(pipe_dir, out=tmp_path / "s").drawn == 3  # its own pipeline resumes it


def test_an_npz_scratch_folder_holding_someone_elses_files_is_refused_not_deleted(pipe_dir, tmp_path):
    scratch = tmp_path / "y.npz.parts"
    (scratch / "keep").mkdir(parents=True)
    (scratch / "keep" / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match=r"y.npz.parts/ and removes it at the end, but it holds files no sampling "
                                         r"run wrote \(keep\)"):
        _run(pipe_dir, npz=tmp_path / "y.npz")
    assert (scratch / "keep" / "thesis.tex").read_text() == "precious"
    shutil.rmtree(scratch)
    _run(pipe_dir, npz=tmp_path / "y.npz")  # its own scratch folder: used and removed
    assert (tmp_path / "y.npz").is_file() and not scratch.exists()


@pytest.mark.parametrize("damage", [b"", "cut"])
def test_an_empty_or_cut_short_png_is_drawn_again(pipe_dir, tmp_path, damage):
    _run(pipe_dir, out=tmp_path / "ref")
    folder = tmp_path / "s"
    shutil.copytree(tmp_path / "ref", folder)
    png = folder / "000005.png"
    png.write_bytes(png.read_bytes()[:100] if damage == "cut" else damage)
    report = _run(pipe_dir, out=folder, npz=tmp_path / "s.npz")  # counted finished, then a traceback in the npz
    assert report.drawn == 3 and _pngs(folder) == _pngs(tmp_path / "ref")  # its batch [3, 6) again, same pixels


def test_a_damaged_sampling_json_is_named(pipe_dir, tmp_path):
    _run(pipe_dir, out=tmp_path / "s")
    (tmp_path / "s" / "sampling.json").write_text("{\n oops")
    with pytest.raises(ValueError, match=r"s/sampling.json is damaged"):
        _run(pipe_dir, out=tmp_path / "s")


def test_an_npz_that_is_the_out_folder_is_refused_before_drawing(pipe_dir, tmp_path):
    with pytest.raises(ValueError, match=r"--npz .*q.npz is the --out folder"):
        _run(pipe_dir, out=tmp_path / "q.npz", npz=tmp_path / "q.npz")
    assert not (tmp_path / "q.npz").exists()
