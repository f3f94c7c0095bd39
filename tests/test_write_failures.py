"""Writes that fail part-way (a full disk, a file size limit): the earlier file stays whole, no temporary
file is left to keep the disk full, and the CLI says which file in one line (exit 2).

A file size limit (``ulimit -f``, with SIGXFSZ ignored so that writes fail with EFBIG instead of killing
the process) stands in for a full disk: each library reports both the same way."""

from __future__ import annotations

import errno
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stage1_vq.model import VQModel
from test_pipeline import tiny_prior, tiny_tokenizer
from vqgpt.ground.files import replace_when_whole, write_bytes_whole, write_error
from vqgpt.workflow.pipeline import VQGPTPipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    tok = tiny_tokenizer()
    return VQGPTPipeline(tok, tiny_prior(tok.codebook_size), classes=["a", "b", "c"]).save_pretrained(
        tmp_path_factory.mktemp("pipe") / "pipe")


def limited(max_bytes: int):
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return preexec


def vqgpt_limited(max_bytes: int, *argv, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vqgpt", *map(str, argv)], capture_output=True, text=True,
                          timeout=600, cwd=cwd, preexec_fn=limited(max_bytes))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


def test_a_sample_image_that_cannot_be_written_leaves_the_earlier_one_whole(pipe_dir, tmp_path):
    out = tmp_path / "s.png"
    args = ["sample", "--pipeline", pipe_dir, "--class-label", "a", "--out", out]
    assert vqgpt_limited(10**9, *args, "--num", "1", cwd=tmp_path).returncode == 0
    before = out.read_bytes()
    done = vqgpt_limited(len(before) + 512, *args, "--num", "64", "--seed", "1", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: [Errno {errno.EFBIG}] File too large: '{out}'"], done.stderr
    assert out.read_bytes() == before  # used to be cut off where the write stopped
    Image.open(out).load()
    assert leftovers(tmp_path) == []


def test_encode_that_runs_out_of_room_is_one_line_and_leaves_no_temporary_shard(tmp_path):
    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
    # the PNGs are read, not written; the shard of 40 grids (of 8 x 8 int16 codes: 5 KB) does not fit
    done = vqgpt_limited(3000, "encode", "--tokenizer", tmp_path / "tok", "--data", images, "--out",
                         tmp_path / "codes", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"[Errno {errno.EFBIG}] File too large: '{tmp_path / 'codes'}/tokens-00000.npy'" in done.stderr
    assert leftovers(tmp_path) == []  # the partial tokens-00000.npy.tmp used to stay and keep the disk full


def test_an_export_that_cannot_be_written_keeps_the_earlier_one(tmp_path):
    torch.manual_seed(0)
    VQModel(tiny_tokenizer().config).save_pretrained(tmp_path / "tok")
    before = {p.name: p.read_bytes() for p in (tmp_path / "tok").iterdir()}
    script = ("import sys; sys.path.insert(0, 'tests'); import torch\n"
              "from test_pipeline import tiny_tokenizer\n"
              "torch.manual_seed(1); tok = tiny_tokenizer()\n"
              f"try:\n    tok.save_pretrained({str(tmp_path / 'tok')!r})\n"
              "except OSError as exc:\n    print(type(exc).__name__, exc)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          preexec_fn=limited(4096))
    # safetensors' own error (its text quoting 'os error 27') becomes an OSError naming the file
    weights = tmp_path / "tok" / "model.safetensors"
    assert done.stdout.strip() == f"OSError [Errno {errno.EFBIG}] File too large: '{weights}'", done.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in (tmp_path / "tok").iterdir()} == before
    VQModel.from_pretrained(tmp_path / "tok")


@pytest.mark.parametrize("file", ["model.safetensors", "config.json"])
def test_an_export_interrupted_while_written_keeps_the_earlier_one_and_leaves_no_temporary_file(
        tmp_path, monkeypatch, file):
    """A Ctrl-C (or SIGTERM turned into one) while an export's file was written left its partial .tmp beside
    the export: only an error (a full disk) cleaned up."""
    import vqgpt.ground.checkpoint as checkpoint

    torch.manual_seed(0)
    VQModel(tiny_tokenizer().config).save_pretrained(tmp_path / "tok")
    before = {p.name: p.read_bytes() for p in (tmp_path / "tok").iterdir()}

    def interrupted(tmp: Path) -> None:
        tmp.write_bytes(b"part")
        raise KeyboardInterrupt

    real = checkpoint._write_export_files

    def write_files(directory, write_weights, write_config):
        if file == "model.safetensors":
            real(directory, interrupted, write_config)
        else:
            real(directory, write_weights, interrupted)

    monkeypatch.setattr(checkpoint, "_write_export_files", write_files)
    torch.manual_seed(1)
    with pytest.raises(KeyboardInterrupt):
        tiny_tokenizer().save_pretrained(tmp_path / "tok")
    assert {p.name: p.read_bytes() for p in (tmp_path / "tok").iterdir()} == before
    VQModel.from_pretrained(tmp_path / "tok")


def test_write_errors_of_each_library_name_the_file(tmp_path):
    class SafetensorError(Exception):  # safetensors' class name; its text quotes the OS error
        pass

    path = tmp_path / "x.bin"
    found = write_error(SafetensorError("Error while serializing: IoError(No space left on device (os error 28))"),
                        path)
    assert isinstance(found, OSError) and found.errno == errno.ENOSPC and found.filename == str(path)
    short = write_error(OSError("288000 requested and 202688 written"), path)  # numpy's tofile
    assert short.errno == errno.ENOSPC and "disk is full or a file size" in str(short) and short.filename == str(path)
    assert write_error(ValueError("a bug"), path) is None
    # the earlier file stays, the temporary one goes, whatever the writer raised
    path.write_bytes(b"earlier")

    def fails(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=rf"No space left on device: '{path}'"):
        write_bytes_whole(path, fails)
    with pytest.raises(KeyError):
        replace_when_whole(path, lambda tmp: tmp.write_bytes(b"x") and {}["bug"])
    assert path.read_bytes() == b"earlier" and leftovers(tmp_path) == []


def test_a_reconstruction_is_never_left_cut_off(tmp_path):
    """`reconstruct`'s numbered images were written in place (as `sample --save-each`'s were): the write that
    failed left a PNG cut off where it stopped, which opened as a broken image beside the whole ones."""
    torch.manual_seed(0)
    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "recon"
    done = vqgpt_limited(10**9, "reconstruct", "--tokenizer", tmp_path / "tok", "--images", images, "--out", out,
                         "--lpips", "none", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    sizes = sorted(p.stat().st_size for p in (out / "images").glob("*.png"))
    assert len(sizes) == 8
    # room for the small files, not for a reconstruction: the first image's write fails part-way
    done = vqgpt_limited(sizes[0] - 1, "reconstruct", "--tokenizer", tmp_path / "tok", "--images", images, "--out",
                         out, "--lpips", "none", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"File too large: '{out / 'images'}/00000.png'" in done.stderr
    assert sorted(p.name for p in (out / "images").iterdir()) == []  # (the earlier run's were cleared first)
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_folder_that_makes_no_files_is_refused_before_sampling(pipe_dir, tmp_path, monkeypatch, capsys):
    """/proc takes no new file, yet as root os.access says it does: the refusal used to come after sampling."""
    from vqgpt.cli.commands import main

    sampled = []
    monkeypatch.setattr(VQGPTPipeline, "generate", lambda self, *a, **k: sampled.append(1))
    monkeypatch.setattr("vqgpt.workflow.sample_many.draw_images", lambda *a, **k: sampled.append(1))
    for args, flag in ((["--out", "/proc/vqgpt-samples.png"], "--out /proc/vqgpt-samples.png"),
                       (["--out", f"{tmp_path / 's'}/", "--npz", "/proc/vqgpt-samples.npz"],
                        "--npz /proc/vqgpt-samples.npz")):
        assert main(["sample", "--pipeline", str(pipe_dir), "--num", "2", "--class-label", "a", *args]) == 2
        err = capsys.readouterr().err
        assert f"error: {flag}: no " in err, err  # no file can be made (root) / no permission (anyone else)
    assert sampled == []
    assert not (tmp_path / "s").exists()
