"""The benchmarks' bookkeeping: the tokenizer leaderboard (rows averaged over seeds, goals judged on
the means) and the sampling benchmark's rows against their bound."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stage1_vq.model import VQModel, VQModelConfig
from stage1_vq.quantizers import QuantizerConfig
from vqgpt.ground.metrics import psnr

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "tokenizer.py"


def load_benchmark(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def board():
    return load_benchmark(BENCH, "tokenizer_benchmark")


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


def test_colour_cast_reads_a_tint_in_8bit_levels(board):
    cast = board.ColourCast()
    originals = torch.zeros(2, 3, 4, 4)
    tinted = originals.clone()
    tinted[:, 0] += 0.2  # red up by 0.2 in [-1, 1]: 25.5 levels of 0..255
    tinted[:, 2] -= 0.1
    cast.add(originals, tinted)
    cast.add(originals, originals)  # a second, untinted batch halves the mean
    assert cast.levels() == pytest.approx([12.75, 0.0, -6.375])
    assert cast.size() == pytest.approx(((12.75 ** 2 + 6.375 ** 2) / 3) ** 0.5)
    # Without the mean shift (0.1, 0, -0.05) both images are off by (0.1, 0, -0.05) in size: MSE 0.0125 / 3.
    assert cast.uncast_psnr() == pytest.approx(10 * math.log10(4 / (0.0125 / 3)))


def tiny_tokenizer(board, quantizer: QuantizerConfig) -> VQModel:
    torch.manual_seed(0)
    model = VQModel(VQModelConfig(**board.QUICK_ARCH, quantizer=quantizer)).eval()
    with torch.no_grad():
        model.post_quant_conv.weight.mul_(30)  # an untrained decoder barely looks at its input: make it look
    return model


def test_latent_psnr_decodes_what_the_codes_approximate(board):
    """With the image's own (l2-normalised) latents as the codebook, quantizing loses nothing, so the
    latent PSNR equals the reconstruction's; with random codes it does not."""
    quantizer = QuantizerConfig(kind="vq", codebook_size=64, codebook_dim=8, l2_norm=True)
    model = tiny_tokenizer(board, quantizer)
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = model.encode_latents(images)  # (1, 8, 8, 8): 64 positions for 64 codes
        model.quantize.embedding.weight.copy_(F.normalize(latents.flatten(2)[0].t(), dim=-1))
    variant = board.Variant("conv", quantizer)
    recon_psnr = float(psnr(images, model.decode(model.encode(images)).clamp(-1, 1)).mean())
    assert board.latent_psnr(model, variant, images) == pytest.approx(recon_psnr, abs=1e-4)
    with torch.no_grad():
        model.quantize.embedding.weight.copy_(F.normalize(torch.randn(64, 8), dim=-1))
    random_psnr = float(psnr(images, model.decode(model.encode(images)).clamp(-1, 1)).mean())
    assert abs(board.latent_psnr(model, variant, images) - random_psnr) > 0.02
    fsq = board.Variant("conv", QuantizerConfig(kind="fsq", fsq_levels=[8, 5, 5, 5]))
    assert board.latent_psnr(tiny_tokenizer(board, fsq.quantizer), fsq, images) is None


def test_peer_vq_unquantized_is_what_its_codes_approximate(board):
    """vector-quantize-pytorch's cosine-sim 8-dim codebook set to the image's own projected, normalised
    latents: its quantized output equals ``unquantized``, which must therefore project and normalise."""
    sys.path.insert(0, str(BENCH.parent))
    try:
        from peer_quantizers import use_peer
    finally:
        sys.path.remove(str(BENCH.parent))
    with use_peer("vq-cos8"):
        model = tiny_tokenizer(board, QuantizerConfig(kind="vq", codebook_size=1024))
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    peer = model.quantize.peer
    with torch.no_grad():
        latents = model.encode_latents(images)
        own = peer._codebook.transform_input(peer.project_in(latents.flatten(2).transpose(1, 2)))[0]  # (64, 8)
        peer._codebook.embed[0, :64] = own
        # the other 960 codes all point away from the first latent: never nearer than a latent's own code
        peer._codebook.embed[0, 64:] = F.normalize(torch.randn(1024 - 64, 8), dim=-1) * 0.01 - own[0] * 4
        peer._codebook.initted.fill_(True)
        quantized = model.quantize.codes_from_indices(model.encode(images))
    assert torch.allclose(model.quantize.unquantized(latents), quantized, atol=1e-5)
    variant = board.VARIANTS["vqp-vq-cos8"]
    recon_psnr = float(psnr(images, model.decode_latents(quantized).clamp(-1, 1)).mean())
    assert board.latent_psnr(model, variant, images) == pytest.approx(recon_psnr, abs=1e-4)


def test_error_split_table_averages_the_new_figures(board, capsys):
    runs = [dict(run("ema-restart-vq", s, 21.0 + s, 0.95), latent_psnr=21.1 + s, cast=[4.0 * s, -2.0, 0.0],
                 cast_size=1.0 + s, uncast_psnr=21.5 + s) for s in (0, 1)]
    runs.append(run("lfq-2^14", 0, 19.0, 0.9))  # written before the split: left out of its table
    rows = board.combine(runs)
    assert rows[0]["cast"] == pytest.approx([2.0, -2.0, 0.0]) and rows[0]["uncast_psnr"] == pytest.approx(22.0)
    board.print_table(rows)
    split = capsys.readouterr().out.split("where the held-out error comes from")[1]
    assert "21.60 ± 0.71 dB" in split and "0.10 dB" in split and "+2.0/-2.0/+0.0" in split
    assert "22.00 ± 0.71 dB" in split and "lfq-2^14" not in split.split("goal")[0]


def test_sampling_benchmark_prints_every_row_against_its_bound(capsys):
    """benchmarks/sampling.py end to end on the tiny preset: each weight kind's rows, with the bound."""
    load_benchmark(BENCH.with_name("sampling.py"), "sampling_benchmark").main(["--preset", "tiny", "--quick", "--threads", "1"])
    out = capsys.readouterr().out
    assert out.startswith("tiny  threads=1")
    for header in ("== weights float32:", "== weights bfloat16:", "== weights float32, plain products",
                   "== weights int8:"):
        assert header in out
    rows = [line for line in out.splitlines() if line.startswith("cached  batch")]
    # fp32 and bf16: batches 1 and 8, CFG off and on; then plain fp32 and int8 at both batches
    assert len(rows) == 2 * 4 + 2 * 2 and all("of bound (" in row and "tokens/s" in row for row in rows)
    assert "CFG at batch 1: time / time of batch 2 without CFG" in out and "cached/full speed-up" in out
    # each group of rows against the bandwidth and matmul rate measured just before it
    assert out.count("\n== weights") == 4 and all("[measured now: " in line and "GB/s read" in line
                                                   for line in out.splitlines() if line.startswith("== weights"))


def test_sampling_benchmark_times_compiled_guidance_against_the_doubled_batch(capsys):
    """--compile --cfg: each compiled row also with guidance, and its time against twice the batch without."""
    load_benchmark(BENCH.with_name("sampling.py"), "sampling_benchmark").main(
        ["--preset", "tiny", "--quick", "--compile", "--cfg", "--no-int8", "--batches", "1", "--threads", "1"])
    compiled = capsys.readouterr().out.split("== weights float32, compiled decode step")[1]
    rows = [line.split(":")[0] for line in compiled.splitlines() if line.startswith("cached  batch")]
    assert rows == ["cached  batch   1 cfg off (model batch   1)", "cached  batch   1 cfg on  (model batch   2)"]
    assert sum(line.startswith("CFG at batch 1: time / time of batch 2") for line in compiled.splitlines()) == 1
    assert "first call at batch 2, compile included" in compiled


def test_train_speed_benchmark_takes_a_device_a_preset_and_a_published_peak(capsys, monkeypatch):
    """benchmarks/train_speed.py end to end at its smallest (the flags a GPU run uses, here on the CPU):
    every lever row, each with the share of the measured matmul peak and the MFU against --peak-tflops."""
    monkeypatch.syspath_prepend(str(BENCH.parent))  # the script imports its neighbour sampling.py
    load_benchmark(BENCH.with_name("train_speed.py"), "train_speed_benchmark").main(
        ["--quick", "--device", "cpu", "--prior-preset", "tiny", "--prior-batch", "2", "--tokenizer-batch", "1",
         "--dtypes", "fp32", "--no-compile", "--threads", "1", "--peak-tflops", "1"])
    out = capsys.readouterr().out
    assert "published peak 1.0 TFLOP/s" in out and "prior: 2 layers x 32" in out
    table = [line for line in out.splitlines() if line.startswith(("| tokenizer | fp32 |", "| prior | fp32 |"))]
    # tokenizer: AdamW for-loop and fused, then fused NCHW (the other layout), fused under matmul_precision medium,
    # then channels-last with the norm and SiLU as two ops (on a CPU); prior: for-loop, foreach, fused, fused under
    # matmul_precision medium, then fused with RoPE/RMSNorm/SwiGLU as torch ops
    assert len(table) == 10 and all(line.count("|") == 8 and line.endswith("% |") for line in table)
    assert sum("channels-last, unfused norm" in line for line in table) == 1
    assert sum("unfused RoPE/RMSNorm/SwiGLU" in line for line in table) == 1
    assert sum("fp32 | AdamW fused, matmul_precision medium" in line for line in table) == 2  # (both stages)
    assert any(line.startswith("| stage |") and line.endswith("MFU (published peak) |") for line in out.splitlines())


def test_train_speed_benchmark_runs_only_the_stages_asked(capsys, monkeypatch):
    """``--stages prior``: the GPU run at GPT-B / GPT-L shape leaves out the small tokenizer (its rows, its
    optimizer timing and its compile)."""
    monkeypatch.syspath_prepend(str(BENCH.parent))
    load_benchmark(BENCH.with_name("train_speed.py"), "train_speed_benchmark").main(
        ["--quick", "--device", "cpu", "--prior-preset", "tiny", "--prior-batch", "2", "--stages", "prior",
         "--dtypes", "fp32", "--no-compile", "--threads", "1"])
    out = capsys.readouterr().out
    assert "tokenizer" not in out and "prior: 2 layers x 32" in out
    assert sum(line.startswith("| prior | fp32 |") for line in out.splitlines()) == 5


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")


@pytest.mark.parametrize("script, argv, said", [
    ("sampling.py", ["--batches", "1,,8"], "--batches: comma-separated positive integers, got '1,,8'"),
    ("sampling.py", ["--batches", "8,0"], "--batches: every batch size must be >= 1, got '8,0'"),
    ("sampling.py", ["--threads", "0"], "argument --threads: must be >= 1, got 0"),
    ("sampling.py", ["--cfg"], "--cfg adds guidance to the compiled rows: give it with --compile"),
    ("sampling.py", ["--preset", "nope"], "--preset: unknown GPT preset 'nope'"),
    ("sampling.py", ["--device", "nope"], "--device: not a device name: 'nope'"),
    pytest.param("sampling.py", ["--device", "cuda"], "--device cuda: CUDA is not available here", marks=NO_CUDA),
    ("train_speed.py", ["--dtypes", "fp16"], "--dtypes: comma-separated fp32 and bf16, got 'fp16'"),
    ("train_speed.py", ["--dtypes", ","], "--dtypes: comma-separated fp32 and bf16, got ','"),
    ("train_speed.py", ["--prior-batch", "0"], "argument --prior-batch: must be >= 1, got 0"),
    ("train_speed.py", ["--stages", "prior,gpt"], "--stages: comma-separated tokenizer and prior, got 'prior,gpt'"),
    # a CPU run under the GPU's name, with an MFU of 0.0% against the GPU's peak
    pytest.param("train_speed.py", ["--device", "cuda", "--peak-tflops", "989"],
                 "--device cuda: CUDA is not available here", marks=NO_CUDA),
    ("train_speed_history.py", ["--dtypes", "fp16"], "--dtypes: comma-separated fp32 and bf16, got 'fp16'"),
    ("train_speed_history.py", ["--rounds", "0"], "argument --rounds: must be >= 1, got 0"),
    ("tokenizer.py", ["--rescore"], "--rescore recomputes --quality runs: give it with --quality"),
    ("tokenizer.py", ["--quality", "--variants", "fsq", "--seeds", "0"], "--seeds must be >= 1, got 0"),
])
def test_benchmark_mistakes_are_refused_before_anything_is_measured(script, argv, said, capsys, monkeypatch):
    """Mistakes were tracebacks after the bandwidth and matmul measurements (sampling.py), or ran anyway:
    fp16 measured as fp32 under its name (train_speed_history.py), --device cuda on the CPU (train_speed.py)."""
    monkeypatch.syspath_prepend(str(BENCH.parent))  # (train_speed_history.py imports its neighbour)
    module = load_benchmark(BENCH.with_name(script), script.removesuffix(".py") + "_benchmark")

    def measured(*args, **kwargs):
        raise AssertionError("measured before the mistake was said")

    for name in ("ceilings", "matmul_gflops", "speed", "run_side"):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, measured)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as exit_:
        module.main(argv) if script in ("sampling.py", "train_speed.py") else module.main()
    assert exit_.value.code == 2 and said in capsys.readouterr().err


def test_the_tokenizer_benchmark_keeps_what_it_did_not_write(board, tmp_path, capsys, monkeypatch):
    """--quality trains every row with overwrite: a folder OUT/fsq of the user's was emptied, and their
    OUT/summary.json replaced."""
    out = tmp_path / "out"
    (out / "fsq").mkdir(parents=True)
    (out / "fsq" / "precious.txt").write_text("the user's")
    (out / "summary.json").write_text('{"mine": 1}')
    assert board.foreign_files(out, ["fsq", "lfq-2^10"], 1) == [str(out / "fsq"), str(out / "summary.json")]
    monkeypatch.setattr(sys, "argv", ["tokenizer.py", "--quality", "--variants", "fsq", "--lpips", "none",
                                      "--out", str(out)])
    with pytest.raises(SystemExit):
        board.main()
    assert f"--out {out} holds what no run of this benchmark wrote" in capsys.readouterr().err
    assert (out / "fsq" / "precious.txt").read_text() == "the user's"
    # a run of the benchmark (its config.yaml) and a summary of rows are its own, to replace
    (out / "fsq" / "config.yaml").write_text("model: {}\n")
    (out / "summary.json").write_text('[{"variant": "fsq"}]')
    assert board.foreign_files(out, ["fsq"], 1) == []


def test_a_table_of_rows_trained_for_the_same_time_shows_each_rows_steps(board, capsys):
    """--minutes gives every row the same wall time and its own step count; the header named the first's."""
    rows = board.combine([run("ema-restart-vq", 0, 22.0, 0.99), {**run("fsq", 0, 20.0, 0.9), "steps": 3175}])
    board.print_table(rows)
    table = capsys.readouterr().out
    assert "500 to 3175 steps (column 'steps') of batch 16 each" in table and "500 steps of" not in table
    lines = table.splitlines()
    assert next(line for line in lines if "variant" in line).split()[-1] == "steps"
    assert next(line for line in lines if line.strip().startswith("fsq ")).split()[-1] == "3175"
    board.print_table(board.combine([run("ema-restart-vq", 0, 22.0, 0.99)]))
    assert "500 steps of batch 16 each" in capsys.readouterr().out


def test_the_int8_compute_ceiling_on_a_gpu_is_bf16s(monkeypatch):
    """On a GPU Int8Linear casts its activations to bf16 and multiplies in bf16; the bound used fp32's rate,
    which at batch 64 made the bound too low and the share of it too high."""
    sampling = load_benchmark(BENCH.with_name("sampling.py"), "sampling_benchmark")
    monkeypatch.setattr(sampling, "measure_bandwidth", lambda megabytes, device: 1e12)
    monkeypatch.setattr(sampling, "matmul_flops", lambda device, dtype: 60e12 if dtype == torch.float32 else 900e12)
    _, flops, _ = sampling.ceilings("cuda", 1)
    assert flops == {"float32": 60e12, "int8": 900e12, "bfloat16": 900e12}
    monkeypatch.setattr(sampling.blocked, "int8_rounds_rows", lambda: False)
    assert sampling.ceilings("cpu", 1)[1]["int8"] == 60e12  # fp32 rows on a CPU without VNNI
