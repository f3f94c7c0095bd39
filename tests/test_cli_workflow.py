"""The README's promises, run as a user runs them: every command as a subprocess, on a small folder of
real digits with class sub-folders (numeric names), each output opened and checked against a trivial
baseline computed here."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqgpt.ground.data import _load_mnist
from vqgpt.ground.metrics import psnr

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# Folder name -> digit. Sorted as text the classes are 12, 3, 7: "3" is index 1, so a name read as
# an index would pick the wrong digit.
FOLDERS = {"3": 3, "7": 7, "12": 1}
TRAIN_PER_CLASS, EVAL_PER_CLASS, RES = 64, 8, 32


def vqgpt(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run `python -m vqgpt ARGV`; fail the test with its stderr when it exits non-zero."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "vqgpt", *map(str, argv)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"vqgpt {' '.join(map(str, argv))}\n{proc.stderr[-3000:]}"
    return proc


def write_digits(root: Path, offset: int, per_class: int) -> torch.Tensor:
    """Real MNIST digits as 32x32 PNGs in class folders; returns them as (N, 3, 32, 32) in [-1, 1]."""
    images, labels = _load_mnist()
    written = []
    for folder, digit in FOLDERS.items():
        (root / folder).mkdir(parents=True)
        for k, i in enumerate(np.flatnonzero(labels == digit)[offset: offset + per_class]):
            img = Image.fromarray(images[i]).convert("RGB").resize((RES, RES), Image.BICUBIC)
            img.save(root / folder / f"{k:03d}.png")
            written.append(torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(written)


def image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        img.load()
        return img.size


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("workflow")


def test_readme_workflow_through_the_cli(work):
    train = write_digits(work / "digits", 0, TRAIN_PER_CLASS)
    held_out = write_digits(work / "held_out", 400, EVAL_PER_CLASS)
    # trivial baseline: every held-out digit reconstructed as the mean training image
    mean_psnr = float(psnr(held_out, train.mean(0, keepdim=True).expand_as(held_out)).mean())

    # 1. tokenizer (GAN and EMA codebook on, as in the tiny config)
    tok_run = work / "tok"
    vqgpt("train-tokenizer", "--config", "configs/tokenizer/tiny.yaml", "--set", f"data.source={work / 'digits'}",
          "--set", "train.steps=150", "--set", "loss.disc_start=100", "--set", "train.checkpoint_every=0",
          "--out", tok_run)
    tok = tok_run / "export"
    assert (tok / "model.safetensors").is_file() and (tok_run / "metrics.jsonl").is_file()

    # 2. reconstruct / eval-tokenizer, parsed as JSON
    rec = json.loads(vqgpt("reconstruct", "--tokenizer", tok, "--images", work / "held_out", "--out",
                           work / "recon", "--lpips", "random", "--json").stdout)
    assert rec["num_images"] == len(held_out) and rec["grid"] == [8, 8]
    assert rec["psnr"] > mean_psnr + 3, (rec["psnr"], mean_psnr)
    assert 0 < rec["codebook_usage"] <= 1 and rec["lpips"] is not None
    assert image_size(work / "recon" / "grid.png")[0] > RES
    ev = json.loads(vqgpt("eval-tokenizer", "--tokenizer", tok, "--images", work / "held_out", "--lpips", "random",
                          "--fid-weights", "random", "--json").stdout)
    assert ev["num_images"] == len(held_out) and abs(ev["psnr"] - rec["psnr"]) < 1e-3
    assert ev["rfid"] is not None and ev["rfid"] >= 0 and 0 < ev["ssim"] <= 1

    # 3. codes, with each image's mirror image as a second view
    vqgpt("encode", "--tokenizer", tok, "--data", work / "digits", "--out", work / "codes", "--augment", "flip")
    meta = json.loads((work / "codes" / "meta.json").read_text())
    assert meta["count"] == len(train) and meta["views"] == 2 and meta["classes"] == ["12", "3", "7"]

    # 4. prior, with the pipeline written beside it
    prior_run = work / "prior"
    vqgpt("train-prior", "--config", "configs/prior/tiny.yaml", "--tokens", work / "codes", "--tokenizer", tok,
          "--set", "train.steps=120", "--set", "train.checkpoint_every=0", "--out", prior_run)
    pipe = prior_run / "pipeline"
    assert (pipe / "tokenizer").is_dir() and (pipe / "prior").is_dir()

    # 5. samples: a class by its (numeric) name, larger than trained, bf16 weights
    vqgpt("sample", "--pipeline", pipe, "--num", 4, "--class-label", "3", "--cfg-scale", 2.0, "--out",
          work / "threes.png", "--save-each")
    assert sorted(p.name for p in (work / "threes").iterdir()) == [".vqgpt-save-each.json",  # what it wrote
                                                                   *(f"{i:04d}.png" for i in range(4))]
    assert image_size(work / "threes" / "0000.png") == (RES, RES)
    vqgpt("sample", "--pipeline", pipe, "--num", 2, "--class-label", "index:2", "--height", RES, "--width", 2 * RES,
          "--prior-dtype", "bfloat16", "--out", work / "wide.png", "--save-each")
    assert image_size(work / "wide" / "0000.png") == (2 * RES, RES)

    # 6. completion and extension of a held-out digit
    photo = work / "held_out" / "3" / "000.png"
    vqgpt("complete", "--pipeline", pipe, "--image", photo, "--keep-rows", 4, "--num", 2, "--class-label", "3",
          "--out", work / "half.png", "--save-each")
    assert image_size(work / "half" / "0001.png") == (RES, RES)
    vqgpt("complete", "--pipeline", pipe, "--image", photo, "--extend-right", 4, "--num", 2, "--class-label", "3",
          "--prior-dtype", "bfloat16", "--out", work / "right.png", "--save-each")
    assert image_size(work / "right" / "0000.png") == (RES + 16, RES)
    vqgpt("complete", "--pipeline", pipe, "--image", photo, "--extend-down", 2, "--num", 1, "--class-label", "3",
          "--out", work / "down.png", "--save-each")
    assert image_size(work / "down" / "0000.png") == (RES, RES + 8)

    # 7. prior evaluation against reference statistics made once
    printed = vqgpt("fid-stats", "--images", work / "held_out", "--resolution", RES, "--out", work / "ref.npz",
                    "--fid-weights", "random").stdout
    assert (work / "ref.npz").is_file() and f"num_images: {len(held_out)}" in printed
    report = json.loads(vqgpt("eval-prior", "--pipeline", pipe, "--reference", work / "ref.npz", "--num", 12,
                              "--batch-size", 12, "--fid-weights", "random", "--json").stdout)
    assert report["num_samples"] == 12 and report["num_reference"] == len(held_out)
    assert report["fid"] >= 0 and report["precision"] is not None and 0 <= report["recall"] <= 1


def test_bf16_completion_keeps_the_known_codes(work):
    """`--prior-dtype bfloat16` casts the prior only; the kept code rows come back unchanged."""
    from stage2_prior.highres import complete
    from vqgpt.workflow.pipeline import VQGPTPipeline

    pipe_dir = work / "prior" / "pipeline"
    if not pipe_dir.is_dir():
        pytest.skip("needs the workflow test's pipeline")
    pipe = VQGPTPipeline.from_pretrained(pipe_dir)
    pipe.prior.to(torch.bfloat16)
    with Image.open(work / "held_out" / "7" / "001.png") as img:
        image = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1
    codes = pipe.tokenizer.encode(image[None]).expand(3, -1, -1).clone()
    label = pipe.class_index("7")
    out = complete(pipe.prior, codes, keep_rows=3, class_labels=label, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :3], codes[:, :3])
    assert out.min() >= 0 and out.max() < pipe.prior.config.codebook_size
    images = pipe.tokenizer.decode(out)  # the tokenizer stays float32
    assert images.dtype == torch.float32 and torch.isfinite(images).all()


def test_the_three_imports_through_the_cli(tmp_path):
    """taming and LlamaGen checkpoints in their original layouts -> exports the other commands use."""
    from test_import_llamagen import CODES, DIM, IMAGE, llamagen_gpt_shapes, llamagen_vq_shapes
    from test_import_llamagen import random_state as llamagen_state
    from test_import_taming import DDCONFIG, EMBED_DIM, N_EMBED, save_lightning_ckpt, taming_shapes, taming_yaml
    from test_import_taming import random_state as taming_state

    save_lightning_ckpt(tmp_path / "last.ckpt", taming_state(taming_shapes(DDCONFIG, N_EMBED, EMBED_DIM)))
    vqgpt("import", "taming", "--checkpoint", tmp_path / "last.ckpt", "--config", taming_yaml(tmp_path),
          "--out", tmp_path / "tok_taming")
    Image.new("RGB", (16, 16), (90, 30, 200)).save(tmp_path / "one.png")
    rec = json.loads(vqgpt("reconstruct", "--tokenizer", tmp_path / "tok_taming", "--images", tmp_path / "one.png",
                           "--out", tmp_path / "recon", "--lpips", "none", "--json").stdout)
    assert rec["num_images"] == 1 and rec["codebook_size"] == N_EMBED

    args = argparse.Namespace(vq_model="VQ-tiny", codebook_size=CODES, codebook_embed_dim=DIM, codebook_l2_norm=True,
                              commit_loss_beta=0.25, image_size=IMAGE, ema=True)
    torch.save({"model": llamagen_state(llamagen_vq_shapes(), 0), "steps": 1, "args": args}, tmp_path / "vq.pt")
    vqgpt("import", "llamagen-vq", "--checkpoint", tmp_path / "vq.pt", "--out", tmp_path / "tok_llamagen")
    # a custom size (3 layers of width 48, no training args): not a preset, so the head count is given
    torch.save({"model": llamagen_state(llamagen_gpt_shapes(layers=3, dim=48, multiple_of=128), 2)}, tmp_path / "c2i.pt")
    vqgpt("import", "llamagen-gpt", "--checkpoint", tmp_path / "c2i.pt", "--tokenizer", tmp_path / "tok_llamagen",
          "--image-size", IMAGE, "--out", tmp_path / "pipe", "--set", "model.n_head=4")
    vqgpt("sample", "--pipeline", tmp_path / "pipe", "--num", 2, "--class-label", "index:1", "--out",
          tmp_path / "s.png", "--save-each")
    assert image_size(tmp_path / "s" / "0000.png") == (IMAGE, IMAGE)
