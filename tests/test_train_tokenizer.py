"""End-to-end stage 1: a short run on real digits learns, exports, reconstructs and resumes."""

import json
from pathlib import Path

import torch

from stage1_vq.evaluate import reconstruct
from stage1_vq.model import VQModel
from stage1_vq.train import TokenizerRunConfig, train_tokenizer
from vqgpt.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(*overrides: str) -> TokenizerRunConfig:
    return load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml",
                       ["train.log_every=5", "train.warmup_steps=5", *overrides])


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_short_run_lowers_reconstruction_loss_and_exports(tmp_path):
    cfg = tiny_config("train.steps=80", "train.checkpoint_every=40", "loss.disc_start=40")
    export = train_tokenizer(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    first, last = rows[0]["rec_loss"], rows[-1]["rec_loss"]
    assert last < 0.6 * first, (first, last)
    assert rows[-1]["disc_loss"] > 0  # the GAN switched on at disc_start
    assert (tmp_path / "run/config.yaml").is_file()
    assert list((tmp_path / "run/samples").glob("*.png"))
    model = VQModel.from_pretrained(export)
    codes = model.encode(torch.zeros(2, 3, 32, 32))
    assert codes.shape == (2, 8, 8)
    metrics = reconstruct(export, "builtin:mnist", tmp_path / "recon", num_images=64, lpips="none", progress=False)
    assert metrics["num_images"] == 64 and metrics["psnr"] > 12
    assert metrics["num_tokens"] == 64 * 8 * 8
    assert (tmp_path / "recon/grid.png").is_file()


def test_resume_continues_to_the_same_weights(tmp_path):
    """A run stopped at a checkpoint and resumed ends where an uninterrupted run ends."""
    common = ["train.steps=30", "train.checkpoint_every=10", "loss.disc_start=10", "train.keep_checkpoints=5"]
    full = train_tokenizer(tiny_config(*common), tmp_path / "full")
    # the same run, stopped after step 20: keep only its first two checkpoints and resume from them
    part = tmp_path / "part"
    train_tokenizer(tiny_config(*common), part)
    import shutil

    shutil.rmtree(part / "checkpoints/step-00000030")
    shutil.rmtree(part / "export")
    resumed = train_tokenizer(tiny_config(*common), part, resume="auto")
    a = VQModel.from_pretrained(full).state_dict()
    b = VQModel.from_pretrained(resumed).state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
