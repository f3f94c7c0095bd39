"""The tokenizer leaderboard's bookkeeping: rows averaged over seeds, goals judged on the means."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "tokenizer.py"


@pytest.fixture(scope="module")
def board():
    spec = importlib.util.spec_from_file_location("tokenizer_benchmark", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(variant: str, seed: int, psnr: float, usage: float, peer: bool = False) -> dict:
    return {"variant": variant, "seed": seed, "peer": peer, "steps": 500, "psnr": psnr, "ssim": 0.6, "lpips": None,
            "lpips_kind": "LPIPS", "usage": usage, "perplexity": 500.0, "grid_usage": 0.7, "grid_perplexity": 40.0,
            "images_per_s": 80.0, "codebook_size": 1024, "codes": "1024", "bits_per_image": 640, "resolution": 32,
            "grid_crops": 71}


def test_rows_average_over_seeds_and_goals_use_the_means(board, capsys):
    runs = [run("ema-restart-vq", 0, 22.0, 0.99), run("ema-restart-vq", 1, 20.0, 0.95),
            run("vqp-vq-kmeans-dead", 0, 21.5, 0.80, peer=True)]
    rows = board.combine(runs)
    ours, peer = rows
    assert (ours["seeds"], peer["seeds"]) == (2, 1)
    assert ours["psnr"] == pytest.approx(21.0) and ours["sd"]["psnr"] == pytest.approx(2 ** 0.5)
    assert ours["usage"] == pytest.approx(0.97) and ours["lpips"] is None
    assert [r["seed"] for r in ours["runs"]] == [0, 1]
    assert peer["psnr"] == 21.5 and peer["sd"]["psnr"] == 0.0
    # Seed 0 alone would meet goal 1 (99% usage, 22.0 dB >= 21.5 dB); the mean over seeds does not.
    (goal,) = board.goals(rows)
    assert goal.startswith("goal 1 NOT MET (means over 2 seeds ± sd)") and "21.00 ± 1.41 dB" in goal
    assert board.goals(board.combine(runs[:1] + runs[2:]))[0].startswith("goal 1 MET")
    board.print_table(rows)
    table = capsys.readouterr().out
    assert "21.00 ± 1.41 dB" in table and "97.0% ± 2.8%" in table and "mean ± sd over 2 seeds" in table


def test_run_names_keep_seed_zero_bare(board):
    assert board.run_name("simvq", 0) == "simvq"
    assert board.run_name("simvq", 3) == "simvq-seed3"
