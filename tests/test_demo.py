"""`vqgpt demo --quick` end to end through the CLI: every promised output exists, figures well above
trivial baselines."""

import json
import time

import pytest
from baselines import eval_images, label_ignoring_accuracy, mean_image_scores

from vqgpt.cli import main
from vqgpt.cli import demo
from vqgpt.cli.demo import demo_tokenizer_config
from vqgpt.ground.config import save_config


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
    # held-out reconstructions well above a tokenizer that outputs the mean digit for every input
    baseline = mean_image_scores(eval_images("builtin:mnist", demo_tokenizer_config(quick=True).model.resolution))
    assert r["psnr"] >= baseline.psnr + 5, (r["psnr"], baseline)
    assert r["ssim"] >= baseline.ssim + 0.2, (r["ssim"], baseline)
    assert 0.05 < r["codebook_usage"] <= 1
    assert m["classifier_heldout_accuracy"] > 0.95
    # conditional samples: well above the 10% of a prior that ignores the label asked for (the quick
    # demo's 600-step prior reaches ~75% here, the full demo ~94%)
    assert m["samples"]["num"] == 500
    assert m["samples"]["class_accuracy"] >= 5 * label_ignoring_accuracy(10), m["samples"]
    report = (out / "report.md").read_text()
    assert "samples.png" in report and f"{r['psnr']:.2f}" in report
    # the full demo into the quick one's folder is refused before it touches any of it
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert main(["demo", "--out", str(out)]) == 2
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_a_demo_folder_holds_one_kind_of_demo_and_sums_its_times(tmp_path):
    """--quick then the full demo into one --out resumed the quick runs with the full schedules, then stopped
    for good at the token shards (the tokenizer had changed) with a hint, --overwrite, the demo does not take.
    And a demo run again reported only the last run's seconds as the time its stages took."""
    out = tmp_path / "d"
    laps = demo._claim_demo_folder(out, "vq", True)
    laps.begin("tokenizer", time.perf_counter() - 100)  # a stage of 100 s, then the run is stopped
    laps.end()
    for kind, quick, said in [("vq", False, "a --quick vq demo, and this is a full vq demo"),
                              ("pixels", True, "a --quick vq demo, and this is a --quick pixels demo")]:
        with pytest.raises(ValueError, match=rf"{out} holds {said}: .*give another --out"):
            demo._claim_demo_folder(out, kind, quick)
    again = demo._claim_demo_folder(out, "vq", True)
    again.begin("tokenizer", time.perf_counter() - 5)  # the rest of it
    again.end()
    again.begin("prior", time.perf_counter() - 7)
    again.end()
    seconds = again.seconds()
    assert 105 <= seconds["tokenizer"] < 110 and 7 <= seconds["prior"] < 10
    assert again.sessions == 2
    # the report says so
    metrics = {"reconstruction": {"codebook_size": 8, "grid": [4, 4], "psnr": 1.0, "ssim": 0.5,
                                  "codebook_usage": 1.0, "perplexity": 2.0},
               "samples": {"num": 10, "cfg_scale": 1.0, "class_accuracy": 0.5}, "classifier_heldout_accuracy": 0.9,
               "seconds": seconds, "sessions": again.sessions}
    demo._write_report(out, metrics, None)
    assert "Summed over the 2 runs of the demo command" in (out / "report.md").read_text()
    (out / demo.DEMO_RECORD).write_text("{")
    with pytest.raises(ValueError, match="is damaged"):
        demo._claim_demo_folder(out, "vq", True)


def test_a_stopped_demo_session_keeps_the_time_it_spent(tmp_path, monkeypatch):
    """A demo stopped inside a stage recorded nothing of that session: not the stage's time, not the total."""
    out = tmp_path / "d"
    now = [1000.0]
    monkeypatch.setattr(demo.time, "perf_counter", lambda: now[0])
    with pytest.raises(KeyboardInterrupt):
        with demo._demo_folder(out, "vq", True) as lap:
            lap.begin("tokenizer")
            now[0] += 30  # 30 s into the tokenizer, Ctrl-C
            raise KeyboardInterrupt
    record = json.loads((out / demo.DEMO_RECORD).read_text())
    assert record["sessions"] == 1 and record["seconds"] == {"tokenizer": 30.0, "total": 30.0}
    # a training run stopped inside the demo says how the demo continues (it takes no --resume)
    from vqgpt.training import loop
    with demo._demo_folder(out, "vq", True):
        assert loop._CONTINUE[-1] == "the same vqgpt demo command continues it"
    assert loop._CONTINUE[-1] == "continue with --resume auto"
    (tmp_path / "f").write_text("x")
    for bad, said in ((tmp_path / "f", "is a file"), (tmp_path / "f" / "sub", "cannot make the folder")):
        with pytest.raises(ValueError, match=f"--out {bad}(:)? {said}"):
            with demo._demo_folder(bad, "vq", True):
                pass


def test_a_folder_without_a_demo_record_is_claimed_only_when_its_files_are_this_demos(tmp_path):
    """Before the record, --out could hold the user's own report.md or samples.png (the demo overwrote them),
    or a demo of an earlier version (its quick runs were continued as the full demo's)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my notes")
    (mine / "notes.txt").write_text("not a name the demo writes")
    with pytest.raises(ValueError, match=r"holds report.md, names this demo writes, but no record of a demo"):
        demo._claim_demo_folder(mine, "vq", True)
    assert (mine / "report.md").read_text() == "my notes" and not (mine / demo.DEMO_RECORD).exists()
    # an earlier version's quick vq demo, stopped during the prior: told apart by its runs' schedules
    old = tmp_path / "old"
    save_config(demo.demo_tokenizer_config(quick=True), old / "tokenizer_run" / "config.yaml")
    save_config(demo.demo_prior_config(quick=True), old / "prior_run" / "config.yaml")
    for kind, quick, said in [("vq", False, "a --quick vq demo .*and this is a full vq demo"),
                              ("pixels", True, "a --quick vq demo .*and this is a --quick pixels demo")]:
        with pytest.raises(ValueError, match=rf"{old} holds {said}: its runs cannot be continued"):
            demo._claim_demo_folder(old, kind, quick)
    assert not (old / demo.DEMO_RECORD).exists()
    demo._claim_demo_folder(old, "vq", True)  # the same demo continues, and is recorded from now on
    assert json.loads((old / demo.DEMO_RECORD).read_text())["quick"] is True
    # a pixel demo's palette run is the same quick or full: either continues it
    pixels = tmp_path / "pixels"
    save_config(demo.pixel_demo_tokenizer_config(), pixels / "tokenizer_run" / "config.yaml")
    assert demo._unrecorded_demo_kinds(pixels) == [("pixels", True), ("pixels", False)]
    demo._claim_demo_folder(pixels, "pixels", False)


def test_a_moved_demo_folder_is_refused_with_advice_the_demo_can_follow(tmp_path):
    """Its prior run names its token folder by path: continued elsewhere, train-prior refused the changed path
    and advised --overwrite, which the demo does not take."""
    made = tmp_path / "made"
    demo._claim_demo_folder(made, "vq", True)
    save_config(demo.demo_prior_config(quick=True), made / "prior_run" / "config.yaml")
    demo._claim_demo_folder(made, "vq", True)  # again in place: fine
    moved = made.rename(tmp_path / "moved")
    with pytest.raises(ValueError, match=rf"{moved} was made at {made}, .* move it back, or give a new --out"):
        demo._claim_demo_folder(moved, "vq", True)
    # before its prior started, a moved demo continues (nothing in it names a path), and is recorded there
    (moved / "prior_run" / "config.yaml").unlink()
    demo._claim_demo_folder(moved, "vq", True)
    assert json.loads((moved / demo.DEMO_RECORD).read_text())["folder"] == str(moved.resolve())


def test_a_second_demo_into_a_running_demos_folder_is_refused_before_it_touches_the_record(tmp_path):
    """It was refused only by the tokenizer run's lock, after it had rewritten the first demo's record."""
    import os

    from vqgpt.training.run_folder import RunFolderError

    out = tmp_path / "d"
    with demo._demo_folder(out, "vq", True) as laps:  # the first demo, running
        laps.begin("tokenizer", time.perf_counter() - 3)
        laps.end()
        record = (out / demo.DEMO_RECORD).read_text()
        with pytest.raises(RunFolderError, match=rf"{out} is in use by pid {os.getpid()}"):
            demo.run_demo(out, quick=True)
        assert (out / demo.DEMO_RECORD).read_text() == record
    with demo._demo_folder(out, "vq", True) as laps:  # once it has ended
        assert laps.sessions == 2


def test_the_demo_under_accelerate_launch_is_one_clear_error(tmp_path, monkeypatch, capsys):
    """Every launched process took the demo folder's lock, so all but one failed with 'in use by' an unknown
    pid: the demo is one process's work."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 2
    assert "vqgpt demo runs in one process: run it without accelerate launch" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
