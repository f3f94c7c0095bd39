"""`--json` commands print exactly one JSON document on stdout, whatever libraries print meanwhile.

Each command runs as a subprocess (`python -c PRELUDE`, which then calls `vqgpt.cli.main` as
`python -m vqgpt` does). The prelude makes the libraries talk the way they do on a user's machine:
lpips with its default ``verbose=True`` prints "Setting up [LPIPS] perceptual loss ..." on stdout,
and the FID network loader prints a download notice, as torchvision / torch-fidelity do when they
fetch weights, plus one write straight to file descriptor 1 (C code). None of it may reach stdout.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

PRELUDE = r"""
import os, sys
import lpips
# lpips' own default verbose=True prints its set-up line on stdout. lpips finds its weights beside
# the file that defines __init__, so the wrapper is compiled under lpips' own file name.
_ns = {"_init": lpips.LPIPS.__init__}
exec(compile("def _verbose_init(self, *args, **kwargs):\n"
             "    kwargs['verbose'] = True\n"
             "    _init(self, *args, **kwargs)\n", lpips.lpips.__file__, "exec"), _ns)
lpips.LPIPS.__init__ = _ns["_verbose_init"]
import vqgpt.ground.fid
_load = vqgpt.ground.fid.load_feature_extractor
def _noisy_load(*args, **kwargs):
    print("Downloading: https://example.invalid/pt_inception-2015-12-05.pth")
    os.write(1, b"C code writing to fd 1\n")
    return _load(*args, **kwargs)
vqgpt.ground.fid.load_feature_extractor = _noisy_load
from vqgpt.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from test_pipeline import tiny_prior, tiny_tokenizer

    from vqgpt.workflow.pipeline import VQGPTPipeline

    root = tmp_path_factory.mktemp("json")
    tok = tiny_tokenizer()
    VQGPTPipeline(tok, tiny_prior(tok.codebook_size, num_classes=2), classes=["a", "b"]).save_pretrained(root / "pipe")
    gen = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        (root / "images" / name).mkdir(parents=True)
        for i in range(3):
            pixels = (torch.rand(32, 32, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / "images" / name / f"{i}.png")
    return root


def run_json(*argv: str) -> tuple[dict, str]:
    """Run one --json command; assert it succeeded, printed one JSON object and sent the noise to stderr."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", PRELUDE, *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    document = json.loads(proc.stdout)  # fails on any extra line
    assert isinstance(document, dict)
    assert proc.stdout.count("\n") == 1
    return document, proc.stderr


def test_reconstruct_json(exports, tmp_path):
    doc, stderr = run_json("reconstruct", "--tokenizer", str(exports / "pipe" / "tokenizer"), "--images",
                           str(exports / "images"), "--out", str(tmp_path / "rec"), "--lpips", "random", "--json")
    assert "Setting up [LPIPS]" in stderr  # the library did print: it went to stderr
    assert doc["num_images"] == 6 and doc["lpips"] is not None
    assert json.loads((tmp_path / "rec" / "metrics.json").read_text()) == doc


def test_eval_tokenizer_json(exports):
    doc, stderr = run_json("eval-tokenizer", "--tokenizer", str(exports / "pipe" / "tokenizer"), "--images",
                           str(exports / "images"), "--lpips", "random", "--fid-weights", "random", "--json")
    assert "Setting up [LPIPS]" in stderr and "Downloading:" in stderr and "C code writing" in stderr
    assert doc["num_images"] == 6 and doc["rfid"] is not None and doc["fid_features"]


def test_eval_prior_json(exports):
    doc, stderr = run_json("eval-prior", "--pipeline", str(exports / "pipe"), "--reference", str(exports / "images"),
                           "--num", "4", "--batch-size", "4", "--fid-weights", "random", "--json")
    assert "Downloading:" in stderr and "C code writing" in stderr
    assert doc["num_samples"] == 4 and doc["fid"] is not None


def _index_run(folder: Path, stdout, *flags: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "VQGPT_CACHE": str(folder.parent / "cache")}
    return subprocess.run([sys.executable, "-m", "vqgpt", "index", str(folder), *flags], stdout=stdout,
                          stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, timeout=120, **kwargs)


def test_a_closed_or_abandoned_stdout(tmp_path):
    """--json with stdout closed is refused (the document would be lost, exit 0 said it was written); a reader
    that stops reading (`| head`) ends the command quietly with SIGPIPE's code, as other tools end."""
    folder = tmp_path / "imgs"
    for i in range(300):  # one line each: more than a pipe holds
        (folder / f"class{i:03d}").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(folder / f"class{i:03d}" / "a.png")
    closed = _index_run(folder, None, "--json", preexec_fn=lambda: os.close(1))
    assert closed.returncode == 2 and "stdout is closed" in closed.stderr
    for flags in ((), ("--json",)):
        read, write = os.pipe()
        os.close(read)  # the reader has gone before the first write
        try:
            gone = _index_run(folder, write, *flags)
        finally:
            os.close(write)
        assert gone.returncode == 141 and gone.stderr == "", (flags, gone.stderr[-2000:])
