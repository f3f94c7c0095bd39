"""Hostile reference files and figures for the evaluations: NaN statistics, pickled arrays, half pairs of
statistics, ADM batches with too few images, non-finite figures under --json, and a resumed --npz run.

Offline: the random-weight feature network (``--fid-weights random``) and a tiny pipeline.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vqgpt.workflow.evaluation as evaluation  # noqa: E402
import vqgpt.workflow.sample_many as sample_many_module  # noqa: E402
from test_eval_distributed import smooth_uint8, write_adm_npz  # noqa: E402
from test_pipeline import tiny_prior, tiny_tokenizer  # noqa: E402
from vqgpt.cli import main  # noqa: E402
from vqgpt.cli.commands import _run_json  # noqa: E402
from vqgpt.ground.fid import (  # noqa: E402
    FeatureExtractor,
    FeatureStats,
    frechet_distance,
    load_stats,
    save_stats,
)
from vqgpt.workflow.evaluation import eval_prior  # noqa: E402
from vqgpt.workflow.pipeline import VQGPTPipeline  # noqa: E402
from vqgpt.workflow.sample_many import sample_many  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:s?FID from")


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    tok = tiny_tokenizer()
    return VQGPTPipeline(tok, tiny_prior(tok.codebook_size), classes=["a", "b", "c"]).save_pretrained(
        tmp_path_factory.mktemp("pipe") / "pipe")


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, np.ndarray]:
    """arr_0 (20 images) and their mu, sigma, mu_s, sigma_s (the random network's, as ADM computes them)."""
    images = smooth_uint8(20, seed=1)
    path = write_adm_npz(tmp_path_factory.mktemp("ref") / "good.npz", images=images, stats_of=images)
    with np.load(path) as f:
        return dict(f)


@pytest.fixture()
def no_sampling(monkeypatch):
    """Sampling fails the test: a bad reference must be refused before any sample is drawn."""
    def draw(*args, **kwargs):
        raise AssertionError("samples were drawn before the reference was checked")
    monkeypatch.setattr(sample_many_module, "draw_images", draw)


def _eval(pipe_dir, reference, num: int = 4, **kwargs):
    return eval_prior(pipe_dir, str(reference), num_samples=num, batch_size=4, fid_weights="random", seed=3,
                      device="cpu", progress=False, **kwargs)


# ----------------------------------------------------------------------------------------- 1, 3: non-finite statistics


@pytest.mark.parametrize("key", ["mu", "sigma", "mu_s", "sigma_s"])
def test_non_finite_statistics_in_a_file_are_refused_naming_file_and_key(tmp_path, good, key):
    """A NaN mu gave FID 0.0 (max(0, nan)), a NaN sigma scipy's nameless error after all the sampling."""
    arrays = {k: good[k] for k in ("mu", "sigma", "mu_s", "sigma_s")}
    arrays[key] = arrays[key].copy()
    arrays[key].flat[3] = np.nan if key != "sigma" else np.inf
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=rf"bad\.npz: {key} holds 1 non-finite value \(NaN or inf\)"):
        load_stats(tmp_path / "bad.npz")


def test_a_nan_reference_fails_eval_prior_before_sampling_and_on_the_command_line(pipe_dir, tmp_path, good,
                                                                                  no_sampling, capsys):
    np.savez(tmp_path / "nan.npz", mu=np.full_like(good["mu"], np.nan), sigma=good["sigma"])
    with pytest.raises(ValueError, match=r"nan\.npz: mu holds 112 non-finite values"):
        _eval(pipe_dir, tmp_path / "nan.npz")
    # the same next to arr_0 (an ADM reference batch): its mu was used as it was
    np.savez(tmp_path / "arr_nan.npz", arr_0=good["arr_0"], mu=good["mu"], sigma=good["sigma"],
             mu_s=good["mu_s"], sigma_s=np.full_like(good["sigma_s"], np.nan))
    with pytest.raises(ValueError, match=r"arr_nan\.npz: sigma_s holds \d+ non-finite values"):
        _eval(pipe_dir, tmp_path / "arr_nan.npz")
    code = main(["eval-prior", "--pipeline", str(pipe_dir), "--reference", str(tmp_path / "nan.npz"), "--num", "4",
                 "--batch-size", "4", "--fid-weights", "random", "--device", "cpu", "--json"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert "error: " in captured.err and "nan.npz: mu holds 112 non-finite values" in captured.err


def test_frechet_distance_refuses_non_finite_statistics_and_results(monkeypatch):
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(40, 4))
    good = FeatureStats(rows.mean(0), np.cov(rows, rowvar=False), 40, "net")
    nan = FeatureStats(np.full(4, np.nan), good.sigma, 40, "net", source="ref.npz")
    with pytest.raises(ValueError, match=r"FID: the statistics of ref\.npz: mu holds 4 non-finite"):
        frechet_distance(nan, good)  # was 0.0
    with pytest.raises(ValueError, match=r"sFID: the statistics of the second set: sigma holds"):
        frechet_distance(good, FeatureStats(good.mu, good.sigma * np.inf, 40, "net"), name="sFID")
    import torch_fidelity.metric_fid as metric_fid

    monkeypatch.setattr(metric_fid, "fid_statistics_to_metric", lambda *a, **k: {"frechet_inception_distance": np.nan})
    with pytest.raises(ValueError, match="FID came out nan from finite statistics"):
        frechet_distance(good, good)
    monkeypatch.setattr(metric_fid, "fid_statistics_to_metric", lambda *a, **k: {"frechet_inception_distance": -1e-9})
    assert frechet_distance(good, good) == 0.0  # round-off of an exact 0 is still clamped


def _nan_extractor() -> FeatureExtractor:
    extractor = FeatureExtractor.random()
    with torch.no_grad():
        next(extractor.backbone.parameters()).fill_(float("nan"))
    return extractor


def test_nan_features_of_reference_images_are_refused(pipe_dir, tmp_path, monkeypatch, no_sampling):
    """Statistics computed from images (a network gone NaN): an error before sampling, and no stats file."""
    monkeypatch.setattr(evaluation, "load_feature_extractor", lambda spec, device: _nan_extractor())
    path = write_adm_npz(tmp_path / "images.npz", images=smooth_uint8(6, seed=2))
    with pytest.raises(ValueError, match=r"the reference .*images\.npz \(features by random-conv-seed0\): mu holds"):
        _eval(pipe_dir, path)
    pool = _nan_extractor()(torch.zeros(3, 3, 16, 16)).pool
    stats = FeatureStats(pool.double().mean(0).numpy(), np.eye(pool.shape[1]), 3, "random-conv-seed0")
    with pytest.raises(ValueError, match=r"statistics for .*out\.npz: mu holds"):
        save_stats(stats, tmp_path / "out.npz")
    assert not (tmp_path / "out.npz").exists()


# ----------------------------------------------------------------------------------------- 2: strict JSON


def test_json_prints_non_finite_figures_as_null_with_a_warning(capsys):
    """`--json` printed Infinity / NaN: not JSON."""
    def command(args: argparse.Namespace) -> int:
        args.json_document = {"fid": float("inf"), "sfid": 1.5, "nested": {"psnr": float("nan"), "ok": None},
                              "rows": [1.0, float("-inf")], "name": "x"}
        return 0

    with pytest.warns(UserWarning, match=r"not finite, printed as null: fid \(inf\), nested\.psnr \(nan\), "
                                         r"rows\[1\] \(-inf\)"):
        assert _run_json(argparse.Namespace(func=command, json=True)) == 0
    out = capsys.readouterr().out

    def refuse(constant: str) -> None:
        raise AssertionError(f"not strict JSON: {constant}")

    document = json.loads(out, parse_constant=refuse)
    assert document == {"fid": None, "sfid": 1.5, "nested": {"psnr": None, "ok": None}, "rows": [1.0, None],
                        "name": "x"}


def test_a_tokenizer_with_non_finite_outputs_reports_nulls_in_strict_json(tmp_path, capsys):
    """A tokenizer whose reconstructions hold inf: eval-tokenizer stopped with exit 2 on rFID ('the statistics of
    the second set: mu holds ... non-finite values'), losing the other figures and leaving reconstruct's
    metrics.json behind; and every OUT/metrics.json held NaN, which strict JSON parsers refuse, where stdout
    printed null (found by a hostile probe). Now rFID is null with a warning, and the files say null too."""
    from PIL import Image

    tok = tiny_tokenizer()
    with torch.no_grad():
        for weight in (q for q in tok.decoder.parameters() if q.dim() > 1):
            weight.mul_(1e30)  # finite weights, outputs past float32's range (inf, then NaN)
    tok.save_pretrained(tmp_path / "tok")
    (tmp_path / "images" / "a").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(smooth_uint8(1, seed=i)[0]).save(tmp_path / "images" / "a" / f"{i}.png")

    def refuse(constant: str) -> None:
        raise AssertionError(f"not strict JSON: {constant}")

    with pytest.warns(UserWarning, match=r"rFID: the reconstructions' features are not finite"):
        assert main(["eval-tokenizer", "--tokenizer", str(tmp_path / "tok"), "--images", str(tmp_path / "images"),
                     "--lpips", "none", "--fid-weights", "random", "--json", "--out", str(tmp_path / "ev")]) == 0
    printed = json.loads(capsys.readouterr().out, parse_constant=refuse)
    written = json.loads((tmp_path / "ev" / "metrics.json").read_text(), parse_constant=refuse)
    assert printed["rfid"] is None and printed["psnr"] is None and printed["codebook_usage"] > 0
    assert written == printed
    assert main(["reconstruct", "--tokenizer", str(tmp_path / "tok"), "--images", str(tmp_path / "images"),
                 "--lpips", "none", "--out", str(tmp_path / "rec")]) == 0
    assert json.loads((tmp_path / "rec" / "metrics.json").read_text(), parse_constant=refuse)["psnr"] is None


# ----------------------------------------------------------------------------------------- 4: pickled arrays


@pytest.mark.parametrize("key", ["mu", "sigma", "mu_s", "sigma_s"])
def test_a_pickled_statistics_array_is_named(tmp_path, good, key):
    arrays = {k: good[k] for k in ("mu", "sigma", "mu_s", "sigma_s")}
    arrays[key] = np.array([{"a": 1}], dtype=object)
    np.savez(tmp_path / "pickled.npz", **arrays)
    with pytest.raises(ValueError, match=rf"pickled\.npz: {key} is a pickled object array, not numbers"):
        load_stats(tmp_path / "pickled.npz")


# ----------------------------------------------------------------------------------------- 5, 6: ADM reference batches


@pytest.mark.filterwarnings("ignore:precision/recall need more than 3")
def test_an_adm_batch_of_fewer_than_2_images_uses_its_statistics(pipe_dir, tmp_path, good):
    """arr_0 with 0 or 1 images was refused even with usable mu / sigma in the file, naming no file."""
    only_stats = _eval(pipe_dir, write_adm_npz(tmp_path / "stats.npz", stats_of=good["arr_0"]))
    for count in (0, 1):
        np.savez(tmp_path / f"n{count}.npz", arr_0=good["arr_0"][:count], mu=good["mu"], sigma=good["sigma"],
                 mu_s=good["mu_s"], sigma_s=good["sigma_s"])
        with pytest.warns(UserWarning, match="precision/recall need more than 3"):
            report = _eval(pipe_dir, tmp_path / f"n{count}.npz")
        assert report.fid == pytest.approx(only_stats.fid) and report.sfid == pytest.approx(only_stats.sfid)
        assert report.precision is None and report.recall is None and report.num_reference is None
    # mu / sigma but no spatial statistics, and one image (no covariance from it): sFID null with a warning
    np.savez(tmp_path / "n1_pool.npz", arr_0=good["arr_0"][:1], mu=good["mu"], sigma=good["sigma"])
    with pytest.warns(UserWarning, match="sFID needs spatial statistics"):
        report = _eval(pipe_dir, tmp_path / "n1_pool.npz")
    assert report.fid == pytest.approx(only_stats.fid) and report.sfid is None


@pytest.mark.parametrize("count", [0, 1])
def test_an_adm_batch_of_fewer_than_2_images_without_statistics_names_the_file(pipe_dir, tmp_path, good,
                                                                                no_sampling, count):
    np.savez(tmp_path / "few.npz", arr_0=good["arr_0"][:count])
    word = "image" if count == 1 else "images"
    with pytest.raises(ValueError, match=rf"few\.npz: arr_0 holds {count} {word}; FID needs at least 2"):
        _eval(pipe_dir, tmp_path / "few.npz")


@pytest.mark.parametrize("held, lacking", [("mu", "sigma"), ("sigma", "mu"), ("mu_s", "sigma_s"),
                                           ("sigma_s", "mu_s")])
def test_half_a_pair_of_statistics_beside_arr_0_is_an_error(pipe_dir, tmp_path, good, no_sampling, held, lacking):
    """A lone mu (or mu_s) beside arr_0 was ignored: the figures then came from the images without a word."""
    np.savez(tmp_path / "half.npz", arr_0=good["arr_0"], **{held: good[held]})
    with pytest.raises(ValueError, match=rf"half\.npz holds {held} but not {lacking}"):
        _eval(pipe_dir, tmp_path / "half.npz")


def test_a_lone_mu_s_in_a_stats_file_is_an_error(tmp_path, good):
    np.savez(tmp_path / "half.npz", mu=good["mu"], sigma=good["sigma"], mu_s=good["mu_s"])
    with pytest.raises(ValueError, match=r"half\.npz holds mu_s but not sigma_s"):
        load_stats(tmp_path / "half.npz")


# ----------------------------------------------------------------------------------------- 7: --npz alone, resumed


def test_a_resumed_npz_run_with_other_settings_names_its_scratch_folder(pipe_dir, tmp_path, monkeypatch):
    """With --npz alone the user gave no folder: "give a new folder" was no way out."""
    pipe = VQGPTPipeline.from_pretrained(pipe_dir)
    npz = tmp_path / "N.npz"

    def full_disk(*args, **kwargs):
        raise OSError("no space left")  # stopped after the samples, before the npz: the scratch folder stays

    monkeypatch.setattr(sample_many_module, "write_npz", full_disk)
    with pytest.raises(OSError, match="no space left"):
        sample_many(pipe, 2, npz=npz, class_labels=0, seed=1, batch_size=2, device="cpu", progress=False)
    monkeypatch.undo()
    assert (tmp_path / "N.npz.parts" / "000000.png").is_file()
    with pytest.raises(ValueError, match="other settings") as failure:
        sample_many(pipe, 2, npz=npz, class_labels=0, seed=2, batch_size=2, device="cpu", progress=False)
    message = str(failure.value)
    assert "seed: 1 then, 2 now" in message and "new folder" not in message
    assert message.endswith(f"resume with the same settings, choose another --npz, or delete {tmp_path}/N.npz.parts/ "
                            "to start over")


def test_nan_features_beside_finite_statistics_are_left_out_with_a_warning(tmp_path):
    """FID needs mu and sigma only: NaN features (precision/recall's) drop those, not the file."""
    path = tmp_path / "s.npz"
    np.savez(path, mu=np.arange(5.0), sigma=np.eye(5), features=np.full((3, 5), np.nan))
    with pytest.warns(UserWarning, match="features hold NaN or inf values: left out"):
        stats = load_stats(path)
    assert stats.features is None and np.array_equal(stats.mu, np.arange(5.0))


def test_one_value_metadata_may_be_a_one_element_array_and_is_named_when_not(tmp_path):
    path = tmp_path / "s.npz"
    np.savez(path, mu=np.zeros(2), sigma=np.eye(2), num_images=np.array([7]), source=np.bytes_(b"imgs"))
    stats = load_stats(path)
    assert stats.num_images == 7 and stats.source == "imgs"
    np.savez(path, mu=np.zeros(2), sigma=np.eye(2), num_images=np.array([7, 8]))
    with pytest.raises(ValueError, match=r"s.npz: num_images should hold one value, got an array of shape \(2,\)"):
        load_stats(path)
    np.savez(path, mu=np.zeros(2), sigma=np.eye(2), resolution=np.float64(2.5))
    with pytest.raises(ValueError, match=r"s.npz: resolution should be an integer, got 2.5"):
        load_stats(path)


def test_few_samples_and_an_unused_classifier_are_said(pipe_dir, tmp_path, good):
    """With --num 10 or fewer each of the Inception Score's 10 groups held one sample, and it was exactly 1.0
    whatever the model, without a word; --classifier was dropped without a word when the evaluation scores no
    class accuracy (found by a hostile probe)."""
    import warnings

    path = tmp_path / "ref.npz"
    np.savez(path, mu=good["mu"], sigma=good["sigma"])
    with pytest.warns(UserWarning, match=r"the Inception Score averages over 10 groups .* with 4 samples some group "
                                         r"holds fewer than 2") as caught:
        report = _eval(pipe_dir, path, classifier_path=tmp_path / "mine.safetensors")
    assert report.inception_score == pytest.approx(1.0)
    assert any("classifier " in str(w.message) and "mine.safetensors is not used" in str(w.message) for w in caught)
    assert not (tmp_path / "mine.safetensors").exists()
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        _eval(pipe_dir, path, num=20)
    assert not [w for w in quiet if "Inception Score" in str(w.message) or "is not used" in str(w.message)]


# ----------------------------------------------------------------------------------------- damaged or foreign files


def test_a_damaged_byte_in_arr_0_is_one_error_naming_the_file(pipe_dir, tmp_path, good, capsys):
    """zipfile checks a member's CRC at its end: a reference batch with one flipped byte ended in a
    BadZipFile traceback (exit 1) after every reference image was scored."""
    path = tmp_path / "ref.npz"
    np.savez(path, arr_0=good["arr_0"])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    code = main(["eval-prior", "--pipeline", str(pipe_dir), "--reference", str(path), "--num", "4",
                 "--batch-size", "4", "--fid-weights", "random", "--device", "cpu", "--json"])
    err = capsys.readouterr().err
    assert code == 2 and "ref.npz: arr_0 is damaged (BadZipFile" in err and "Traceback" not in err
    np.savez(path, arr_0=np.zeros((8, 0, 0, 3), np.uint8))  # images of no pixels: a conv error before
    with pytest.raises(ValueError, match=r"arr_0 must be uint8 images \(N, H, W, 3\) .*\(8, 0, 0, 3\)"):
        _eval(pipe_dir, path)


def test_statistics_that_cannot_be_used_are_refused_before_sampling(pipe_dir, tmp_path, good, no_sampling):
    """features of the wrong shape failed after all the sampling (the FID thrown away); a negated
    covariance gave FID -71, reported as a perfect 0.0."""
    d = good["mu"].shape[0]
    for shape in ((10, 5), (d,), (10, d, 1)):
        np.savez(tmp_path / "s.npz", mu=good["mu"], sigma=good["sigma"], features=np.ones(shape, np.float32))
        with pytest.raises(ValueError, match=rf"s\.npz: features must be rows of the {d}-d features .*got shape"):
            _eval(pipe_dir, tmp_path / "s.npz")
    for sigma in (-good["sigma"], good["sigma"] + np.triu(np.ones((d, d)), 1)):
        np.savez(tmp_path / "s.npz", mu=good["mu"], sigma=sigma)
        with pytest.raises(ValueError, match=r"s\.npz: sigma is no covariance matrix"):
            _eval(pipe_dir, tmp_path / "s.npz")


def test_a_clearly_negative_frechet_distance_is_an_error_and_round_off_is_zero():
    a = FeatureStats(np.zeros(3), np.eye(3), 10, "x")
    assert frechet_distance(a, a) == 0.0
    negated = FeatureStats(np.zeros(3), -10 * np.eye(3), 10, "x")  # (built in memory: not checked on loading)
    with pytest.raises(ValueError, match=r"FID came out -?\d.* < 0 .*not positive semi-definite"):
        frechet_distance(a, negated)


def test_an_npz_no_vqgpt_run_wrote_is_never_replaced(pipe_dir, tmp_path, good, capsys):
    """`sample --npz` and `fid-stats --out` replaced a reference batch given by a mistyped path."""
    reference = tmp_path / "VIRTUAL_ref.npz"
    np.savez(reference, arr_0=good["arr_0"])
    before = reference.read_bytes()
    assert main(["sample", "--pipeline", str(pipe_dir), "--num", "2", "--class-label", "a",
                 "--npz", str(reference)]) == 2
    assert "holds no record of a vqgpt sampling run" in capsys.readouterr().err
    assert main(["fid-stats", "--images", "builtin:mnist", "--num", "8", "--resolution", "16",
                 "--out", str(reference), "--fid-weights", "random"]) == 2
    assert "is no statistics file of vqgpt fid-stats" in capsys.readouterr().err
    assert reference.read_bytes() == before
    # vqgpt's own files are replaced as before: a finished sampling npz, a statistics file
    ours = tmp_path / "ours.npz"
    assert main(["sample", "--pipeline", str(pipe_dir), "--num", "2", "--class-label", "a", "--npz", str(ours)]) == 0
    assert main(["sample", "--pipeline", str(pipe_dir), "--num", "3", "--class-label", "a", "--npz", str(ours)]) == 0
    with np.load(ours) as f:
        assert f["arr_0"].shape[0] == 3
    stats = tmp_path / "stats.npz"
    for _ in range(2):
        assert main(["fid-stats", "--images", "builtin:mnist", "--num", "8", "--resolution", "16",
                     "--out", str(stats), "--fid-weights", "random"]) == 0


def test_files_that_are_no_npz_or_weights_are_named_without_unsafe_advice(tmp_path, capsys):
    """A PNG named .npz was 'pickled data: load it with allow_pickle'; a damaged .pth passed on torch's
    'Re-running torch.load with weights_only set to False will likely succeed'."""
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "fake.png", format="PNG")
    (tmp_path / "fake.png").rename(tmp_path / "fake.npz")
    with pytest.raises(ValueError, match=r"fake\.npz: not an \.npz archive") as exc:
        load_stats(tmp_path / "fake.npz")
    assert "allow_pickle" not in str(exc.value)
    (tmp_path / "folder.npz").mkdir()
    with pytest.raises(IsADirectoryError, match=r"folder\.npz is a folder"):
        load_stats(tmp_path / "folder.npz")
    (tmp_path / "broken.pth").write_bytes(b"not weights")
    with pytest.raises(ValueError, match=r"broken\.pth: not a loadable PyTorch weights file") as exc:
        FeatureExtractor.inception(tmp_path / "broken.pth")
    assert "weights_only set to False" not in str(exc.value)
    with pytest.raises(ValueError, match=r"random:99999999999999999999.*from 0 to 2\*\*63 - 1"):
        evaluation.load_feature_extractor("random:99999999999999999999")


def test_fid_weights_with_the_checked_keys_but_not_the_whole_network_are_one_error(tmp_path):
    path = tmp_path / "incomplete.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3),
                "Mixed_7c.branch_pool.conv.weight": torch.zeros(192, 2048, 1, 1),
                "fc.weight": torch.zeros(1008, 2048)}, path)
    with pytest.raises(ValueError, match=r"incomplete\.pth: not the whole FID Inception-v3 network"):
        FeatureExtractor.inception(path)


def test_a_damaged_lpips_file_is_an_error_not_a_null_figure(tmp_path):
    from stage1_vq.evaluate import load_lpips

    (tmp_path / "broken.pth").write_bytes(b"not weights")
    with pytest.raises(ValueError, match=r"--lpips .*broken\.pth: not usable as LPIPS weights") as exc:
        load_lpips(str(tmp_path / "broken.pth"), torch.device("cpu"))
    assert "Unsupported operand" in str(exc.value) and "weights_only` set to `False" not in str(exc.value)


def test_eval_tokenizer_out_keeps_the_whole_report_in_metrics_json(tmp_path):
    """OUT/metrics.json was reconstruct's, written before rFID was computed: no rfid, no fid_features."""
    tokenizer = tiny_tokenizer().save_pretrained(tmp_path / "tok")
    report = evaluation.eval_tokenizer(str(tokenizer), "builtin:mnist", fid_weights="random", lpips="none",
                                       num_images=8, batch_size=4, out=tmp_path / "ev", device="cpu", progress=False)
    assert report.rfid is not None
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text()) == report.to_dict()


def test_a_reference_batch_of_another_shape_is_warned(pipe_dir, tmp_path, good):
    images = np.concatenate([good["arr_0"], good["arr_0"][:, :, :8]], axis=2)  # wider than tall
    np.savez(tmp_path / "wide.npz", arr_0=images)
    with pytest.warns(UserWarning, match=rf"the reference images are {images.shape[1]}x{images.shape[2]} pixels"):
        _eval(pipe_dir, tmp_path / "wide.npz")
