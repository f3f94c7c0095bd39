"""sample / complete image outputs that must not be trusted: --out naming the input image, a parent that
is a file, a --save-each folder holding someone else's files, canvases too large to ever decode, and
running out of memory. Each is refused before the model loads (or named in one line), never after the
work or by replacing the user's files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vqgpt.cli.commands as commands
from test_pipeline import tiny_prior, tiny_tokenizer
from vqgpt.cli import main
from vqgpt.workflow.pipeline import VQGPTPipeline


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory) -> Path:
    tok = tiny_tokenizer()
    return VQGPTPipeline(tok, tiny_prior(tok.codebook_size), classes=["a", "b", "c"]).save_pretrained(
        tmp_path_factory.mktemp("p") / "pipe")


@pytest.fixture()
def loads(monkeypatch) -> list:
    """Records every pipeline load of a CLI command (a refusal up front makes none)."""
    calls: list = []
    real = commands._load_pipeline
    monkeypatch.setattr(commands, "_load_pipeline", lambda args: calls.append(args) or real(args))
    return calls


def _photo(path: Path, size: int = 16) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def _complete(pipe_dir, image, out, *extra) -> int:
    return main(["complete", "--pipeline", str(pipe_dir), "--image", str(image), "--keep-rows", "1", "--num", "1",
                 "--class-label", "a", "--out", str(out), *map(str, extra)])


def _sample(pipe_dir, out, *extra) -> int:
    return main(["sample", "--pipeline", str(pipe_dir), "--num", "2", "--class-label", "a", "--out", str(out),
                 *map(str, extra)])


def test_complete_never_writes_over_its_input_image(pipe_dir, tmp_path, loads, capsys):
    photo = _photo(tmp_path / "photo.png")
    before = photo.read_bytes()
    assert _complete(pipe_dir, photo, photo) == 2
    assert "--out " in capsys.readouterr().err and photo.read_bytes() == before and not loads
    # the same file by another path
    assert _complete(pipe_dir, photo, tmp_path / "sub" / ".." / "photo.png") == 2
    assert photo.read_bytes() == before and not loads
    assert _complete(pipe_dir, photo, tmp_path / "done.png") == 0 and (tmp_path / "done.png").is_file()


def test_an_out_under_a_file_is_refused_before_sampling(pipe_dir, tmp_path, loads, capsys):
    blocker = tmp_path / "in.png"
    blocker.write_bytes(b"a file")
    assert _sample(pipe_dir, blocker / "x.png") == 2
    assert f"{blocker} is a file" in capsys.readouterr().err and not loads
    photo = _photo(tmp_path / "photo.png")
    assert _complete(pipe_dir, photo, blocker / "deeper" / "x.png") == 2 and not loads


def test_save_each_refuses_a_file_or_a_folder_of_someone_elses_files(pipe_dir, tmp_path, loads, capsys):
    (tmp_path / "each").write_bytes(b"notes")
    assert _sample(pipe_dir, tmp_path / "each.png", "--save-each") == 2
    assert "but " in capsys.readouterr().err and not loads
    assert not (tmp_path / "each.png").exists()  # refused before the grid was written
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "0000.png").write_bytes(b"the user's picture")  # named as --save-each names its images
    assert _complete(pipe_dir, _photo(tmp_path / "photo.png"), tmp_path / "mine.png", "--save-each") == 2
    err = capsys.readouterr().err
    assert "holds files no earlier --save-each recorded writing (0000.png)" in err and not loads
    # (an earlier vqgpt's --save-each wrote such names without a record: the message says how to tell them)
    assert "(an earlier vqgpt's --save-each kept no record: if they are its images, delete them)" in err
    assert (mine / "0000.png").read_bytes() == b"the user's picture"
    (mine / "notes.txt").write_text("the user's")
    assert _complete(pipe_dir, _photo(tmp_path / "photo.png"), tmp_path / "mine.png", "--save-each") == 2
    assert "earlier vqgpt" not in capsys.readouterr().err  # not all named like its images


def test_save_each_replaces_its_own_images_and_drops_those_of_a_larger_num(pipe_dir, tmp_path):
    out = tmp_path / "grid.png"
    assert _sample(pipe_dir, out, "--save-each", "--num", 3) == 0
    assert sorted(p.name for p in (tmp_path / "grid").iterdir()) == [".vqgpt-save-each.json", "0000.png", "0001.png",
                                                                     "0002.png"]
    assert _sample(pipe_dir, out, "--save-each", "--num", 1) == 0  # a re-run: its own files, replaced
    assert sorted(p.name for p in (tmp_path / "grid").iterdir()) == [".vqgpt-save-each.json", "0000.png"]
    assert json.loads((tmp_path / "grid" / ".vqgpt-save-each.json").read_text()) == ["0000.png"]


def test_save_each_refuses_to_write_over_its_own_input(pipe_dir, tmp_path, loads, capsys):
    """`complete --image r1/0001.png --out r1.png --save-each` (completing an earlier completion) replaced the
    input with a new completion; only --out itself was compared with --image."""
    out = tmp_path / "r1.png"
    assert _complete(pipe_dir, _photo(tmp_path / "photo.png"), out, "--save-each") == 0
    image = tmp_path / "r1" / "0000.png"
    before = image.read_bytes()
    loads.clear()
    assert _complete(pipe_dir, image, out, "--save-each") == 2
    err = capsys.readouterr().err
    assert f"--image {image} lies in {tmp_path / 'r1'}/, where --save-each writes this run's images" in err
    assert image.read_bytes() == before and not loads


def test_under_accelerate_launch_a_report_is_said_once_and_complete_refuses(pipe_dir, tmp_path, loads, capsys,
                                                                            monkeypatch):
    """eval-bpd / eval-tokenizer / reconstruct printed their report on every process (two JSON documents on one
    stdout), and complete wrote the same files from every process."""
    from types import SimpleNamespace
    report = SimpleNamespace(to_dict=lambda: {"bits_per_dim": 1.5})
    for rank, said in (("1", ""), ("0", "bits_per_dim: 1.5000")):
        monkeypatch.setenv("RANK", rank)
        commands._print_report(report, SimpleNamespace(json=False))
        assert capsys.readouterr().out.strip() == said
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _complete(pipe_dir, _photo(tmp_path / "photo.png"), tmp_path / "done.png") == 2
    assert "in one process: run it without accelerate launch" in capsys.readouterr().err and not loads


def test_canvases_over_pils_pixel_limit_are_refused_before_drawing(pipe_dir, tmp_path, loads, monkeypatch, capsys):
    pipe = VQGPTPipeline.from_pretrained(pipe_dir)
    f = pipe.downsample_factor
    with pytest.raises(ValueError, match=r"height=4000000, width=4000000 give .* more than PIL.Image.MAX_IMAGE_PIXELS"):
        pipe.generate(1, class_labels=0, height=4_000_000, width=4_000_000)
    image = torch.zeros(3, 4 * f, 4 * f)
    with pytest.raises(ValueError, match=r"extend_right=1000000000, extend_down=0 give .* more than PIL"):
        pipe.complete(image, 1, extend_right=10**9, class_labels=0)
    assert _sample(pipe_dir, tmp_path / "big.png", "--height", 4_000_000, "--width", 4_000_000) == 2
    assert "MAX_IMAGE_PIXELS" in capsys.readouterr().err
    # the limit is PIL's own: lowered, it binds sooner; None (PIL's "no limit") lifts it
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", (8 * f) ** 2 - 1)
    with pytest.raises(ValueError, match="MAX_IMAGE_PIXELS"):
        pipe.generate(1, class_labels=0, height=8 * f, width=8 * f)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert pipe.generate(1, class_labels=0, height=8 * f, width=8 * f).shape == (1, 3, 8 * f, 8 * f)


def test_a_completion_grid_larger_than_pil_reads_back_is_refused_before_drawing(pipe_dir, tmp_path, monkeypatch,
                                                                               capsys):
    """complete --num N writes the input and N completions in one grid, all drawn in one batch: --num 100000
    drew them all and wrote a picture PIL refuses to read back. Refused before drawing, as sample's grid is;
    with the limit lowered to one row of 8 images, the input and 7 completions fit and 8 do not. An extension
    past the limit on its own is named by its flags."""
    from vqgpt.ground.images import grid_pixels

    pipe = VQGPTPipeline.from_pretrained(pipe_dir)
    height, width = pipe.trained_pixels()
    one_row = grid_pixels(8, height, width)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", one_row[0] * one_row[1])
    drawn = []
    real = VQGPTPipeline.complete
    monkeypatch.setattr(VQGPTPipeline, "complete", lambda self, image, n, **kw: drawn.append(n) or real(self, image, n,
                                                                                                        **kw))
    photo = _photo(tmp_path / "photo.png")
    assert _complete(pipe_dir, photo, tmp_path / "g.png", "--num", 8) == 2
    err = capsys.readouterr().err
    assert "--num 8 completions of" in err and "more than PIL.Image.MAX_IMAGE_PIXELS" in err
    assert "a smaller --num" in err
    assert drawn == [] and not (tmp_path / "g.png").exists()
    assert _complete(pipe_dir, photo, tmp_path / "g.png", "--num", 7) == 0
    assert drawn == [7] and Image.open(tmp_path / "g.png").size == one_row[::-1]
    assert _complete(pipe_dir, photo, tmp_path / "wide.png", "--extend-right", 10**6) == 2
    assert "--extend-right 1000000 --extend-down 0 give" in capsys.readouterr().err and drawn == [7]


def test_running_out_of_memory_is_one_line_not_a_traceback(pipe_dir, tmp_path, monkeypatch, capsys):
    def starved(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 8000000000000 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(VQGPTPipeline, "generate", starved)
    assert _sample(pipe_dir, tmp_path / "x.png") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory ([enforce fail") and "a smaller --num" in err
    monkeypatch.setattr(VQGPTPipeline, "generate", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))
    assert _sample(pipe_dir, tmp_path / "x.png") == 1
    assert capsys.readouterr().err.startswith("error: out of memory (MemoryError)")
