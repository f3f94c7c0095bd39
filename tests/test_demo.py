"""`vqgpt demo --quick` end to end through the CLI: every promised output exists, figures in range."""

import json

import pytest

from vqgpt.cli import main


@pytest.mark.slow
def test_quick_demo_writes_every_output(tmp_path, monkeypatch):
    monkeypatch.setenv("VQGPT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    for name in ("report.md", "metrics.json", "samples.png", "reconstruction/grid.png",
                 "pipeline/tokenizer/model.safetensors", "pipeline/prior/model.safetensors",
                 "tokenizer_run/export/config.json", "prior_run/export/config.json", "tokens/meta.json"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    r = m["reconstruction"]
    assert 12 < r["psnr"] < 60 and 0 < r["ssim"] <= 1 and 0.05 < r["codebook_usage"] <= 1
    assert m["classifier_heldout_accuracy"] > 0.95
    assert 0 <= m["samples"]["class_accuracy"] <= 1 and m["samples"]["num"] == 500
    report = (out / "report.md").read_text()
    assert "samples.png" in report and f"{r['psnr']:.2f}" in report
