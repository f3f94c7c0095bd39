"""`eval-prior` on many processes and against ADM evaluator reference batches (arr_0, mu, sigma, mu_s, sigma_s).

Offline: the random-weight feature network stands in for Inception (its spatial features stand in
for sFID's); the Inception's sFID layer is checked on a random-weight Inception.

Run as a script, this file is the launched program of the 2-process tests: it records which
samples each process draws, which images it encodes with the tokenizer and which it gives the
feature network, then runs the vqgpt command line:

    python tests/test_eval_distributed.py LOG_DIR eval-prior --pipeline P --reference R ...
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import vqgpt.workflow.sample_many as sample_many_module  # noqa: E402
from stage2_prior import SamplingConfig  # noqa: E402
from vqgpt.ground.fid import (  # noqa: E402
    FeatureExtractor,
    compute_stats,
    frechet_distance,
    load_feature_extractor,
    precision_recall,
)
from vqgpt.workflow.evaluation import eval_prior  # noqa: E402
from vqgpt.workflow.pipeline import VQGPTPipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16  # the tiny tokenizer's images


def smooth_uint8(n: int, seed: int, size: int = SIZE) -> np.ndarray:
    """(n, size, size, 3) uint8 images with some spatial structure (blurred noise), as ADM's arr_0."""
    g = torch.Generator().manual_seed(seed)
    images = F.avg_pool2d(torch.rand(n, 3, size, size, generator=g), 3, 1, 1)
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def as_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def write_adm_npz(path: Path, images: np.ndarray | None = None, stats_of: np.ndarray | None = None) -> Path:
    """An ADM-layout reference batch, written with numpy alone: arr_0 and/or the statistics of ``stats_of``
    (what the ADM evaluator's reference files hold, here made with the random stand-in network)."""
    arrays = {}
    if images is not None:
        arrays["arr_0"] = images
    if stats_of is not None:
        features = FeatureExtractor.random()(as_tensor(stats_of))
        for key, rows in (("", features.pool), ("_s", features.spatial)):
            rows = rows.double().numpy()
            arrays["mu" + key], arrays["sigma" + key] = rows.mean(0), np.cov(rows, rowvar=False)  # as ADM computes them
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    from test_pipeline import tiny_prior, tiny_tokenizer

    tok = tiny_tokenizer()
    return VQGPTPipeline(tok, tiny_prior(tok.codebook_size), classes=["a", "b", "c"]).save_pretrained(
        tmp_path_factory.mktemp("pipe") / "pipe")


def _eval(pipe_dir, reference, num: int, **kwargs):
    return eval_prior(pipe_dir, str(reference), num_samples=num, batch_size=5, fid_weights="random", seed=3,
                      device="cpu", progress=False, **kwargs)


def _draw_from(images: np.ndarray, monkeypatch) -> None:
    """Sampling stand-in: sample i is ``images[i]``."""
    monkeypatch.setattr(sample_many_module, "draw_images", lambda pipe, index, *args: as_tensor(images[index]))


@pytest.mark.filterwarnings("ignore:s?FID from")
def test_adm_reference_gives_fid_sfid_precision_recall(pipe_dir, tmp_path):
    """FID, sFID and the ADM precision/recall against an ADM reference batch equal a direct computation."""
    reference = smooth_uint8(23, seed=1)
    path = write_adm_npz(tmp_path / "ref.npz", images=reference, stats_of=reference)
    report = _eval(pipe_dir, path, num=17)
    assert report.num_reference == 23 and report.resolution == SIZE

    # the direct computation: sample i from its own seed (the many-samples sampler), the file's statistics
    pipe = VQGPTPipeline.from_pretrained(pipe_dir)
    samples = torch.cat([sample_many_module.draw_images(pipe, list(batch), torch.tensor(batch) % 3,
                                                        pipe.grid_for_pixels(None, None), SamplingConfig(), 3)
                         for batch in sample_many_module.batch_ranges(17, 5)])
    extractor = load_feature_extractor("random")
    fake, real = extractor(samples), extractor(as_tensor(reference))
    fake_stats = compute_stats(fake.pool, extractor.name, spatial=fake.spatial)
    with np.load(path) as f:
        file_stats = compute_stats(real.pool, extractor.name)  # replaced below by the file's arrays
        file_stats.mu, file_stats.sigma, file_stats.spatial_mu, file_stats.spatial_sigma = (
            f["mu"], f["sigma"], f["mu_s"], f["sigma_s"])
    assert report.fid == pytest.approx(frechet_distance(file_stats, fake_stats), rel=1e-6)
    assert report.sfid == pytest.approx(frechet_distance(file_stats.spatial(), fake_stats.spatial()), rel=1e-6)
    # every reference image against every sample, k=3 (ADM's ManifoldEstimator)
    pr = precision_recall(real.pool, fake.pool, k=3, max_features=None)
    assert (report.precision, report.recall) == (pr.precision, pr.recall)
    assert report.precision is not None and 0 <= report.precision <= 1 and 0 <= report.recall <= 1

    # arr_0 alone: the statistics come from its images (the same network here, so the same figures)
    only_images = _eval(pipe_dir, write_adm_npz(tmp_path / "images.npz", images=reference), num=17)
    assert only_images.fid == pytest.approx(report.fid, rel=1e-6)
    assert only_images.sfid == pytest.approx(report.sfid, rel=1e-6)
    assert (only_images.precision, only_images.recall) == (report.precision, report.recall)
    # the file's statistics win over those of its images, as in the ADM evaluator
    other = write_adm_npz(tmp_path / "other.npz", images=reference, stats_of=smooth_uint8(23, seed=2))
    assert _eval(pipe_dir, other, num=17).fid != pytest.approx(report.fid, rel=1e-3)
    # statistics alone (no arr_0): FID and sFID, but no images for precision/recall
    with pytest.warns(UserWarning, match="precision/recall need"):
        only_stats = _eval(pipe_dir, write_adm_npz(tmp_path / "stats.npz", stats_of=reference), num=17)
    assert only_stats.fid == pytest.approx(report.fid, rel=1e-6) and only_stats.sfid == pytest.approx(report.sfid)
    assert only_stats.precision is None and only_stats.recall is None and only_stats.num_reference is None


@pytest.mark.filterwarnings("ignore:s?FID from")
def test_adm_reference_known_answers(pipe_dir, tmp_path, monkeypatch):
    """Samples that are the reference images: FID = sFID = 0, precision = recall = 1; brightened ones: worse."""
    reference = smooth_uint8(30, seed=4)
    path = write_adm_npz(tmp_path / "ref.npz", images=reference, stats_of=reference)
    _draw_from(reference, monkeypatch)
    same = _eval(pipe_dir, path, num=30)
    assert same.fid == pytest.approx(0, abs=1e-6) and same.sfid == pytest.approx(0, abs=1e-6)
    assert same.precision == 1.0 and same.recall == 1.0

    shifted = np.clip(reference.astype(np.int16) + 60, 0, 255).astype(np.uint8)
    _draw_from(shifted, monkeypatch)
    worse = _eval(pipe_dir, path, num=30)
    assert worse.fid > 0.1 and worse.sfid > 0.01, worse
    assert worse.precision < 1.0 and worse.recall < 1.0, worse

    bad = tmp_path / "bad.npz"
    np.savez(bad, arr_0=reference.astype(np.float32))
    with pytest.raises(ValueError, match=r"bad\.npz: arr_0 must be uint8 images \(N, H, W, 3\)"):
        _eval(pipe_dir, bad, num=4)
    np.savez(bad, arr_0=reference, mu=np.zeros(5), sigma=np.eye(5))
    with pytest.raises(ValueError, match=r"bad\.npz holds 5-d statistics"):
        _eval(pipe_dir, bad, num=4)


def test_inception_spatial_features_are_mixed_6_conv(tmp_path):
    """sFID's features: the first 7 channels of Mixed_6d's 1x1 branch (TF mixed_6/conv), in TF's (h, w, c) order."""
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    path = tmp_path / "pt_inception-random.pth"
    torch.save(inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False).state_dict(), path)
    extractor = load_feature_extractor(str(path))
    network = extractor.backbone.network
    seen = {}
    network.Mixed_6c.register_forward_hook(lambda m, i, out: seen.setdefault("mixed_5", out))  # TF's mixed_5
    images = as_tensor(smooth_uint8(2, seed=0, size=64))
    out = extractor(images)
    with torch.inference_mode():
        expected = network.Mixed_6d.branch1x1(seen["mixed_5"])  # (2, 192, 17, 17)
    assert out.spatial.shape == (2, 17 * 17 * 7)
    assert torch.equal(out.spatial, expected[:, :7].permute(0, 2, 3, 1).reshape(2, -1))
    assert out.spatial[1, 3 + 7 * (5 + 17 * 2)] == expected[1, 3, 2, 5]  # channel 3 at (h=2, w=5)


def _image_keys(images: torch.Tensor) -> list[str]:
    """A short digest of each image (B, 3, H, W), leaving out blank (all-zero) probes of a network's output shapes."""
    return [hashlib.sha1(image.float().contiguous().numpy().tobytes()).hexdigest()[:12]
            for image in images.detach().cpu() if image.any()]


def _launched_run(log_dir: str, argv: list[str]) -> int:
    """This file as the launched program: record each process's drawn indices, the images it encodes with the
    tokenizer and those it gives the feature network (a line per call), then run the command line."""
    from stage1_vq.model import VQModel
    from vqgpt.cli import main
    from vqgpt.ground.fid import FeatureExtractor

    rank = os.environ.get("RANK", "0")
    real = sample_many_module.draw_images

    def recording(pipe, index, *args):
        with open(Path(log_dir) / f"drawn-rank{rank}.txt", "a") as f:
            f.write(" ".join(map(str, index)) + "\n")
        return real(pipe, index, *args)

    def logged(kind: str, method):
        def call(self, images, *args, **kwargs):
            keys = _image_keys(images)
            if keys:
                with open(Path(log_dir) / f"{kind}-rank{rank}.txt", "a") as f:
                    f.write(" ".join(keys) + "\n")
            return method(self, images, *args, **kwargs)
        return call

    sample_many_module.draw_images = recording
    VQModel.encode = logged("encoded", VQModel.encode)
    FeatureExtractor.forward = logged("featured", FeatureExtractor.forward)
    if argv[0] == "rank0-api":  # a script that evaluates on its first process only, through the Python API
        if rank == "0":
            from vqgpt.workflow.evaluation import eval_bits_per_dim, eval_tokenizer

            pipe, images = argv[1:3]
            reports = [eval_bits_per_dim(pipe, images, split="train", device="cpu", progress=False).to_dict(),
                       eval_tokenizer(Path(pipe) / "tokenizer", images, fid_weights="none", lpips="none",
                                      device="cpu", progress=False).to_dict()]
            (Path(log_dir) / "rank0.json").write_text(json.dumps(reports))
        return 0
    return main(argv)


@pytest.mark.slow
def test_two_processes_give_the_report_of_one(pipe_dir, tmp_path):
    """1 vs 2 gloo processes: the same JSON report, printed once; each process drew its own batches only."""
    from test_distributed import launch_command, subprocess_env

    # 11 reference images and 9 samples in batches of 2: the processes' shares differ in size (padded gather)
    reference = write_adm_npz(tmp_path / "ref.npz", images=smooth_uint8(11, seed=5), stats_of=smooth_uint8(11, seed=5))
    reports = {}
    for n in (1, 2):
        logs = tmp_path / f"logs{n}"
        logs.mkdir()
        cmd = [str(Path(__file__).resolve()), str(logs), "eval-prior", "--pipeline", str(pipe_dir), "--reference",
               str(reference), "--num", "9", "--batch-size", "2", "--cfg-scale", "2.0", "--seed", "4",
               "--fid-weights", "random", "--device", "cpu", "--json"]
        head = launch_command(2) if n == 2 else [sys.executable]
        done = subprocess.run([*head, *cmd], env=subprocess_env(), capture_output=True, text=True, timeout=600,
                              cwd=ROOT)
        assert done.returncode == 0, done.stderr[-3000:]
        lines = done.stdout.strip().splitlines()
        assert len(lines) == 1, done.stdout  # said once, by rank 0
        reports[n] = json.loads(lines[0])
        drawn = {p.name: [int(i) for i in p.read_text().split()] for p in sorted(logs.glob("drawn-rank*.txt"))}
        if n == 2:  # batch c on process c % 2
            assert drawn == {"drawn-rank0.txt": [0, 1, 4, 5, 8], "drawn-rank1.txt": [2, 3, 6, 7]}, drawn
    assert reports[2] == reports[1]
    assert reports[1]["num_samples"] == 9 and reports[1]["num_reference"] == 11
    assert None not in (reports[1]["fid"], reports[1]["sfid"], reports[1]["precision"], reports[1]["recall"])


# ----------------------------------------------------------------------------------------- eval-bpd, eval-tokenizer,
# reconstruct and fid-stats on two processes: each does its own share of the batches, the report is the one-process one


def _class_folders(root: Path) -> Path:
    """Folders a/, b/, c/ (the tiny pipeline's classes) of 5 noise images each; b/1.png does not decode."""
    rng = np.random.default_rng(7)
    for label in ("a", "b", "c"):
        (root / label).mkdir(parents=True)
        for k in range(5):
            Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / label / f"{k}.png")
    (root / "b" / "1.png").write_text("not an image\n")
    return root


def _launch(n: int, logs: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """``vqgpt ARGV`` as 1 plain process or under accelerate launch on ``n`` gloo processes, recording in ``logs``."""
    from test_distributed import launch_command, subprocess_env

    logs.mkdir()
    head = launch_command(n) if n > 1 else [sys.executable]
    done = subprocess.run([*head, str(Path(__file__).resolve()), str(logs), *map(str, argv)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _calls(logs: Path, kind: str, rank: int) -> list[list[str]]:
    """The images of each call ``kind`` (encoded, featured) that process ``rank`` made, in order."""
    path = logs / f"{kind}-rank{rank}.txt"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def _assert_split(logs: dict[int, Path], kind: str, images: int) -> None:
    """One process's batches of ``images`` images; on two, batch c on process c % 2 alone."""
    batches = _calls(logs[1], kind, 0)
    assert sum(map(len, batches)) == images, batches
    assert len({key for batch in batches for key in batch}) == images  # every image once
    assert _calls(logs[2], kind, 0) == batches[0::2] and _calls(logs[2], kind, 1) == batches[1::2], (
        f"two processes' {kind} batches {_calls(logs[2], kind, 0)} and {_calls(logs[2], kind, 1)}, "
        f"one process's {batches}")


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes, but the lock file (RunLock never deletes it)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.mark.slow
def test_eval_bpd_on_two_processes_gives_the_report_of_one(pipe_dir, tmp_path):
    """1 vs 2 gloo processes: the same JSON report, printed once; each process encoded and scored its own batches.
    --num 10 in batches of 2 ends inside the second process's batch, and b/1.png leaves one batch an image short."""
    source = _class_folders(tmp_path / "imgs")
    reports, logs, stderr = {}, {}, {}
    for n in (1, 2):
        logs[n] = tmp_path / f"logs{n}"
        done = _launch(n, logs[n], ["eval-bpd", "--pipeline", pipe_dir, "--images", source, "--split", "train",
                                    "--num", 10, "--batch-size", 2, "--device", "cpu", "--json"])
        lines = done.stdout.strip().splitlines()
        assert len(lines) == 1, done.stdout  # said once, by rank 0
        reports[n], stderr[n] = json.loads(lines[0]), done.stderr
    assert reports[2] == reports[1]
    assert reports[1]["num_images"] == 10 and reports[1]["class_conditional"]
    _assert_split(logs, "encoded", 10)
    for n in (1, 2):  # the file left out is named once, not by every process
        assert stderr[n].count("left out 1 image that failed to decode") == 1, stderr[n][-3000:]
    # --num 6: b/1.png lies in the batch after the cut, which the second process reads in the cut's round;
    # one process never reads it, so neither warns about it
    done = _launch(2, tmp_path / "logs-cut", ["eval-bpd", "--pipeline", pipe_dir, "--images", source, "--split",
                                             "train", "--num", 6, "--batch-size", 2, "--device", "cpu", "--json"])
    assert "unreadable" not in done.stderr and "failed to decode" not in done.stderr, done.stderr[-3000:]


@pytest.mark.slow
def test_python_api_called_on_one_process_of_a_launch_does_not_wait_for_the_others(pipe_dir, tmp_path):
    """The API splits the images only when given the processes (the CLI gives them): a script that evaluated on
    its first process alone waited forever for the others' share."""
    from test_distributed import launch_command, subprocess_env

    source = _class_folders(tmp_path / "imgs")
    done = subprocess.run([*launch_command(2), str(Path(__file__).resolve()), str(tmp_path), "rank0-api",
                           str(pipe_dir), str(source)], env=subprocess_env(), capture_output=True, text=True,
                          timeout=120, cwd=ROOT)  # (a minute or more: it waits)
    assert done.returncode == 0, done.stderr[-3000:]
    bpd, tokenizer = json.loads((tmp_path / "rank0.json").read_text())
    assert bpd["num_images"] == 14 and tokenizer["num_images"] == 14


@pytest.mark.slow
def test_eval_tokenizer_on_two_processes_gives_the_report_and_files_of_one(pipe_dir, tmp_path):
    """1 vs 2 gloo processes: the same JSON report (PSNR, SSIM, LPIPS, rFID, codebook figures), printed once, and the
    same files in --out, byte for byte (the second process wrote its own reconstructions); each process
    reconstructed and scored its own batches only."""
    source = _class_folders(tmp_path / "imgs")
    reports, logs, warned = {}, {}, {}
    for n in (1, 2):
        logs[n] = tmp_path / f"logs{n}"
        done = _launch(n, logs[n], ["eval-tokenizer", "--tokenizer", pipe_dir / "tokenizer", "--images", source,
                                    "--fid-weights", "random", "--lpips", "random", "--num", 11, "--batch-size", 2,
                                    "--out", tmp_path / f"out{n}", "--device", "cpu", "--json"])
        lines = done.stdout.strip().splitlines()
        assert len(lines) == 1, done.stdout
        reports[n] = json.loads(lines[0])
        warned[n] = done.stderr.count("rFID from")  # a figure every process computes alike: said once
    assert reports[2] == reports[1]
    assert warned[2] == warned[1] == 1, warned
    assert reports[1]["num_images"] == 11 and None not in (reports[1]["rfid"], reports[1]["lpips"])
    one = _files(tmp_path / "out1")
    assert len([name for name in one if name.startswith("images/")]) == 11 and "grid.png" in one
    assert _files(tmp_path / "out2") == one
    _assert_split(logs, "encoded", 11)


@pytest.mark.slow
def test_reconstruct_on_two_processes_gives_the_metrics_and_files_of_one(pipe_dir, tmp_path):
    """1 vs 2 gloo processes: the same JSON metrics, printed once, and the same files in --out, byte for byte;
    each process encoded its own batches only (14 readable images in batches of 3: b/1.png leaves one short)."""
    source = _class_folders(tmp_path / "imgs")
    metrics, logs = {}, {}
    for n in (1, 2):
        logs[n] = tmp_path / f"logs{n}"
        done = _launch(n, logs[n], ["reconstruct", "--tokenizer", pipe_dir / "tokenizer", "--images", source,
                                    "--lpips", "random", "--batch-size", 3, "--out", tmp_path / f"out{n}", "--json"])
        lines = done.stdout.strip().splitlines()
        assert len(lines) == 1, done.stdout
        metrics[n] = json.loads(lines[0])
    assert metrics[2] == metrics[1] and metrics[1]["num_images"] == 14
    assert _files(tmp_path / "out2") == _files(tmp_path / "out1")
    _assert_split(logs, "encoded", 14)


@pytest.mark.slow
def test_fid_stats_on_two_processes_writes_the_statistics_of_one(tmp_path):
    """1 vs 2 gloo processes: the same report, printed once, and the same statistics file, array for array, bit
    for bit; each process gave the feature network its own batches only."""
    source = _class_folders(tmp_path / "imgs")
    printed, logs = {}, {}
    for n in (1, 2):
        logs[n] = tmp_path / f"logs{n}"
        done = _launch(n, logs[n], ["fid-stats", "--images", source, "--out", tmp_path / f"ref{n}.npz", "--fid-weights",
                                    "random", "--resolution", SIZE, "--num", 12, "--batch-size", 2, "--device", "cpu"])
        lines = done.stdout.strip().splitlines()
        assert sum(line.strip().startswith("path:") for line in lines) == 1, done.stdout  # said once
        printed[n] = [line for line in lines if not line.strip().startswith("path:")]
    assert printed[2] == printed[1] and any(line.split() == ["num_images:", "12"] for line in printed[1])
    with np.load(tmp_path / "ref1.npz") as one, np.load(tmp_path / "ref2.npz") as two:
        assert sorted(two.files) == sorted(one.files) and "features" in one.files
        for key in one.files:
            assert np.array_equal(two[key], one[key]), key
    _assert_split(logs, "featured", 12)


if __name__ == "__main__":
    raise SystemExit(_launched_run(sys.argv[1], sys.argv[2:]))
