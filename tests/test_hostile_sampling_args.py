"""Sampling arguments a hostile user gets wrong: refused at once, naming the value, before a folder is made or
a reference is scored; options that were silently ignored or misread."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import vqgpt.workflow.evaluation as evaluation
import vqgpt.workflow.sample_many as sample_many_module
from prior_helpers import tiny_gpt
from stage2_prior import SamplingConfig, generate
from stage2_prior.highres import complete
from test_pipeline import tiny_prior, tiny_tokenizer
from vqgpt.cli.commands import main
from vqgpt.workflow.pipeline import VQGPTPipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """A class-conditional pipeline and an unconditional one."""
    root = tmp_path_factory.mktemp("pipes")
    tok = tiny_tokenizer()
    VQGPTPipeline(tok, tiny_prior(tok.codebook_size), classes=["a", "b", "c"]).save_pretrained(root / "cond")
    VQGPTPipeline(tok, tiny_prior(tok.codebook_size, num_classes=0)).save_pretrained(root / "uncond")
    return root


@pytest.fixture()
def drawn(monkeypatch):
    calls = []
    monkeypatch.setattr(sample_many_module, "draw_images", lambda *a, **k: calls.append(1))
    return calls


def _error(capsys) -> str:
    return capsys.readouterr().err


def test_guidance_an_unconditional_prior_cannot_give_is_refused_before_the_folder(pipes, tmp_path, drawn, capsys):
    for where in (["--out", f"{tmp_path / 'u'}/"], ["--npz", str(tmp_path / "u.npz")]):
        assert main(["sample", "--pipeline", str(pipes / "uncond"), "--num", "2", "--cfg-scale", "2", *where]) == 2
        assert "cfg_scale=2.0 needs a class-conditional prior" in _error(capsys)
    assert drawn == [] and sorted(p.name for p in tmp_path.iterdir()) == []  # no u/, no u.npz.parts/


def test_a_seed_out_of_range_is_a_flag_error(pipes, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--pipeline", str(pipes / "cond"), "--num", "1", "--class-label", "a", "--out",
              f"{tmp_path / 's'}/", "--seed", "99999999999999999999999"])
    assert exc.value.code == 2
    assert "argument --seed: must be <= 18446744073709551615" in _error(capsys)
    assert not (tmp_path / "s").exists()


def test_sample_many_checks_guidance_and_seed_before_making_the_folder(pipes, tmp_path, drawn):
    pipe = VQGPTPipeline.from_pretrained(pipes / "cond")
    with pytest.raises(ValueError, match="seed must be between"):
        sample_many_module.sample_many(pipe, 2, out=tmp_path / "s", class_labels=0, seed=2**70, progress=False)
    assert drawn == [] and not (tmp_path / "s").exists()


def test_eval_prior_refuses_impossible_guidance_before_scoring_the_reference(pipes, monkeypatch):
    scored = []
    monkeypatch.setattr(evaluation, "_reference", lambda *a, **k: scored.append(1))
    with pytest.raises(ValueError, match="cfg_scale=2.0 needs a class-conditional prior"):
        evaluation.eval_prior(pipes / "uncond", "builtin:mnist", num_samples=4, fid_weights="random",
                              sampling=evaluation.SamplingConfig(cfg_scale=2.0), device="cpu", progress=False)
    with pytest.raises(ValueError, match="seed must be between"):
        evaluation.eval_prior(pipes / "cond", "builtin:mnist", num_samples=4, fid_weights="random", seed=-(2**64),
                              device="cpu", progress=False)
    assert scored == []


def test_batch_size_with_one_grid_is_refused_not_ignored(pipes, tmp_path, capsys):
    assert main(["sample", "--pipeline", str(pipes / "cond"), "--num", "4", "--class-label", "a", "--out",
                 str(tmp_path / "g.png"), "--batch-size", "2"]) == 2
    assert "--batch-size belongs to --out FOLDER/ and --npz" in _error(capsys)
    assert not (tmp_path / "g.png").exists()


def test_a_grid_larger_than_pil_reads_back_is_refused_before_sampling(pipes, tmp_path, capsys, monkeypatch):
    """--num 100000 --out g.png drew every sample in one batch, held them all, and wrote a picture over
    PIL's decompression-bomb limit; now refused before drawing, pointing at the folder and npz modes. Here
    the limit is lowered to one row of 8 tiny images: 8 fit, 9 (a second row) do not."""
    from PIL import Image

    from vqgpt.ground.images import grid_pixels

    pipe = VQGPTPipeline.from_pretrained(pipes / "cond")
    height, width = pipe.trained_pixels()
    one_row = grid_pixels(8, height, width)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", one_row[0] * one_row[1])
    drawn = []
    real = VQGPTPipeline.generate
    monkeypatch.setattr(VQGPTPipeline, "generate", lambda self, n, **kw: drawn.append(n) or real(self, n, **kw))
    assert main(["sample", "--pipeline", str(pipes / "cond"), "--num", "9", "--class-label", "a", "--out",
                 str(tmp_path / "g.png")]) == 2
    err = _error(capsys)
    assert "--num 9 images of" in err and "more than PIL.Image.MAX_IMAGE_PIXELS" in err and "--out FOLDER/" in err
    assert drawn == [] and not (tmp_path / "g.png").exists()
    assert main(["sample", "--pipeline", str(pipes / "cond"), "--num", "8", "--class-label", "a", "--out",
                 str(tmp_path / "g.png")]) == 0
    assert drawn == [8] and Image.open(tmp_path / "g.png").size == one_row[::-1]


def test_a_bare_npz_name_is_told_it_needs_a_name(pipes, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--pipeline", str(pipes / "cond"), "--num", "2", "--class-label", "a", "--npz",
                 ".npz"]) == 2
    assert "--npz .npz must have a name before .npz" in _error(capsys)


@pytest.mark.parametrize("value", ["false", "no", 0, 1, None])
def test_set_decoding_takes_only_a_bool_for_compile(pipes, value):
    pipe = VQGPTPipeline.from_pretrained(pipes / "cond")
    if value is None:
        assert pipe.set_decoding(compile=True).set_decoding(compile=None).compile_decode is True
        return
    with pytest.raises(ValueError, match="compile must be True, False or None"):
        pipe.set_decoding(compile=value)  # bool('false') turned compiling on
    with pytest.raises(ValueError, match="compile must be True, False or None"):
        pipe.set_decoding("int8", compile=value)  # refused before the one-way change of the weights
    assert pipe.compile_decode is False and next(pipe.prior.parameters()).dtype == torch.float32
    assert not any("Int8" in type(m).__name__ for m in pipe.prior.modules())


def test_sample_many_draws_under_inference_mode(pipes, tmp_path, monkeypatch):
    modes = []
    real = sample_many_module.draw_images
    monkeypatch.setattr(sample_many_module, "draw_images",
                        lambda *a, **k: modes.append(torch.is_inference_mode_enabled()) or real(*a, **k))
    sample_many_module.sample_many(VQGPTPipeline.from_pretrained(pipes / "cond"), 2, out=tmp_path / "s",
                                   class_labels=0, progress=False)
    assert modes == [True]


def test_complete_runs_on_the_gpu_where_there_is_one(pipes, tmp_path, monkeypatch):
    from PIL import Image

    moved = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(VQGPTPipeline, "to", lambda self, device: moved.append(str(device)) or self)
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "in.png")
    assert main(["complete", "--pipeline", str(pipes / "cond"), "--image", str(tmp_path / "in.png"), "--keep-rows",
                 "2", "--num", "1", "--class-label", "a", "--out", str(tmp_path / "c.png")]) == 0
    assert moved == ["cuda"]  # it stayed on the CPU, where sample moved to the GPU


@pytest.mark.parametrize("kwargs", [dict(grid_size=(5, 6), window_stride=(1.5, 1)), dict(window_stride=True),
                                    dict(window_stride=0), dict(window_stride=(-5, "x")),
                                    dict(grid_size=(6.0, 6)), dict(grid_size=(4, 4, 1)), dict(grid_size="ab")])
def test_generate_refuses_a_bad_stride_or_grid_on_any_canvas(kwargs):
    """A stride was checked only on a larger canvas, and its elements and the grid size never: raw TypeErrors."""
    model = tiny_gpt(grid_size=[3, 4], n_layer=1)
    with pytest.raises(ValueError, match="window_stride must be|grid_size must be"):
        generate(model, 1, class_labels=0, **kwargs)


def test_generate_takes_numpy_and_torch_integers_for_stride_and_grid():
    model = tiny_gpt(grid_size=[3, 4], n_layer=1)
    seeded = dict(class_labels=0, generator=torch.Generator().manual_seed(3))
    want = generate(model, 1, grid_size=(5, 6), window_stride=(2, 2), **seeded)
    seeded["generator"] = torch.Generator().manual_seed(3)
    got = generate(model, 1, grid_size=torch.tensor([5, 6]), window_stride=np.int64(2), **seeded)
    assert torch.equal(got, want)
    assert generate(model, 1, class_labels=0, grid_size=6).shape == (1, 6, 6)  # one integer: a square grid


def test_complete_refuses_float_codes():
    model = tiny_gpt(grid_size=[3, 4], n_layer=1)
    with pytest.raises(ValueError, match="tokens must be integer codes, got torch.float32"):
        complete(model, torch.full((1, 3, 4), 3.7), keep_rows=1, class_labels=0)


def test_top_k_takes_numpy_and_torch_integers():
    from stage2_prior import SamplingConfig

    assert SamplingConfig(top_k=np.int64(5)).top_k == 5 and type(SamplingConfig(top_k=torch.tensor(3)).top_k) is int
    for bad in (np.bool_(True), torch.tensor(3.0), 2.0):
        with pytest.raises(ValueError, match="top_k must be an int >= 1"):
            SamplingConfig(top_k=bad)


def test_class_names_that_differ_by_edge_spaces_are_told_apart_in_errors():
    tok = tiny_tokenizer()
    pipe = VQGPTPipeline(tok, tiny_prior(tok.codebook_size), classes=[" a", "a", "b,c"])
    with pytest.raises(ValueError) as exc:
        pipe.class_index("z")
    assert "known classes: [' a', a, 'b,c']" in str(exc.value)


def test_an_output_extension_pillow_cannot_write_is_named_as_such(pipes, tmp_path, capsys):
    assert main(["sample", "--pipeline", str(pipes / "cond"), "--num", "1", "--class-label", "a", "--out",
                 str(tmp_path / "x.xyz")]) == 2
    assert "has the extension .xyz, not one vqgpt writes images in" in _error(capsys)


def test_an_output_name_over_the_file_systems_limit_is_one_line(pipes, tmp_path, capsys):
    out = tmp_path / ("a" * 300 + ".png")
    assert main(["sample", "--pipeline", str(pipes / "cond"), "--num", "1", "--class-label", "a", "--out",
                 str(out)]) == 2  # was a traceback
    err = _error(capsys)
    assert err.startswith("error: [Errno 36] File name too long") and "Traceback" not in err


@pytest.mark.parametrize("name", ["yes", "null", "[x]", "a: b", "codes #1"])
def test_a_token_folder_is_a_path_whatever_its_name(tmp_path, monkeypatch, name):
    """--tokens went into the config as an unquoted YAML override: a folder named yes was the boolean true."""
    import stage2_prior.train as prior_train
    import vqgpt.workflow.chain as chain  # imported before the patch: it would keep the fake train_prior for good

    seen = []
    for module in (prior_train, chain):
        monkeypatch.setattr(module, "train_prior", lambda cfg, *a, **k: seen.append(cfg.tokens) or tmp_path)
    monkeypatch.setattr(chain, "refresh_run_pipeline", lambda *a: None)
    monkeypatch.chdir(tmp_path)  # a folder named as it is in the current one
    assert main(["train-prior", "--config", str(ROOT / "configs/prior/tiny.yaml"), "--tokens", name,
                 "--out", str(tmp_path / "run")]) == 0
    assert seen == [name]


def test_the_token_folder_given_twice_is_refused(tmp_path, capsys):
    assert main(["train-prior", "--config", str(ROOT / "configs/prior/tiny.yaml"), "--tokens", "a", "--set", "tokens=b",
                 "--out", str(tmp_path / "run")]) == 2  # --tokens silently replaced it
    assert "--set tokens=b: the token folder is --tokens (a); give it once" in _error(capsys)


def test_a_second_interrupt_says_the_checkpoint_may_be_missing(monkeypatch, capsys):
    import signal

    import vqgpt.training.loop as loop

    monkeypatch.setattr(loop, "_aborted", False)
    with loop.GracefulInterrupt() as interrupt:
        interrupt._handle(signal.SIGINT, None)  # the first: a flag the loop reads after its step
        assert not loop.aborted()
        with pytest.raises(KeyboardInterrupt):
            interrupt._handle(signal.SIGINT, None)
    assert loop.aborted()
    import argparse

    from vqgpt.cli.commands import _run

    def stopped(args):
        raise KeyboardInterrupt

    assert _run(argparse.Namespace(func=stopped, json=False)) == 130
    assert "stopped at once by a second interrupt" in _error(capsys)


def test_a_kv_cache_larger_than_free_memory_is_a_memory_error_before_anything_is_allocated(monkeypatch):
    """generate(model, 10**7) allocated its untouched cache lazily, and the kernel killed the process once
    sampling wrote it: the cache's size is now checked against the free memory first, guidance's doubled
    rows included, and the error says how much it needs."""
    import stage2_prior.layers as layers

    model = tiny_gpt()
    with pytest.raises(MemoryError, match=r"KV cache of 1,000,000,000 rows .* needs [\d,.]+ GiB, and cpu has "):
        generate(tiny_gpt(num_classes=0), 10**9)  # far beyond any host
    per_row = 2 * model.config.n_layer * (1 + 12) * model.config.dim * 4  # keys and values, float32
    available = type("Memory", (), {"available": 40 * per_row})
    monkeypatch.setattr(layers.psutil, "virtual_memory", lambda: available)
    assert generate(model, 40, class_labels=0).shape == (40, 3, 4)  # exactly fits
    with pytest.raises(MemoryError, match="KV cache of 41 rows"):
        generate(model, 41, class_labels=0)
    with pytest.raises(MemoryError, match="KV cache of 42 rows"):  # guidance: a null-class row per sample
        generate(model, 21, class_labels=0, sampling=SamplingConfig(cfg_scale=2.0))
