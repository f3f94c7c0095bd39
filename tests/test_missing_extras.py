"""A user who installed vqgpt without an optional extra: each feature that needs one says which, in one
line, before slow work (not a traceback naming a package the user never chose, not a silent 'n/a')."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from stage1_vq.evaluate import load_lpips
from stage1_vq.losses import LossConfig, build_perceptual
from vqgpt.cli import main
from vqgpt.ground.config import ConfigError
from vqgpt.workflow import evaluation

ROOT = Path(__file__).resolve().parents[1]


def test_shard_without_webdataset_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "webdataset", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "braceexpand", None)  # (installed with it)
    # the shard writer imported the shard reader, and with it braceexpand: a traceback naming that
    assert main(["shard", "builtin:mnist", str(tmp_path / "shards"), "--per-shard", "100"]) == 2
    assert 'vqgpt shard needs the webdataset package: pip install "vqgpt[wds]"' in capsys.readouterr().err
    assert not (tmp_path / "shards").exists()


def test_stlpips_without_its_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "stlpips_pytorch", None)
    # an ImportError was a traceback (exit 1, "a bug"); now a config error (exit 2) naming the extra
    with pytest.raises(ConfigError, match=r'loss.perceptual=stlpips needs the stlpips-pytorch package .*'
                                          r'pip install "vqgpt\[stlpips\]"'):
        build_perceptual(LossConfig(perceptual="stlpips", perceptual_weight=1.0))


def test_eval_tokenizer_checks_the_data_source_before_loading_the_fid_network(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)

    def no_network(*args, **kwargs):
        raise AssertionError("the FID network was loaded (offline: downloaded, then a warning) before the check")

    monkeypatch.setattr(evaluation, "_optional_extractor", no_network)
    with pytest.raises(ValueError, match=r"data.source='hf:mnist' needs the datasets package: "
                                         r'pip install "vqgpt\[hf\]"'):
        evaluation.eval_tokenizer(tmp_path / "tok", "hf:mnist")


def test_the_lpips_warning_of_reconstruct_does_not_offer_training_keys(monkeypatch):
    """Offline, `reconstruct`'s LPIPS warning quoted training's advice: set loss.perceptual_weights_path, or use
    'stlpips', neither of which --lpips takes."""
    import lpips

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(lpips, "LPIPS", offline)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_lpips("vgg", "cpu") is None
    said = " ".join(str(w.message) for w in caught)
    assert "network unreachable" in said and "--lpips PATH" in said
    assert "perceptual_weights_path" not in said and "stlpips" not in said


@pytest.mark.parametrize("hidden, flags, said", [
    ("vector_quantize_pytorch", ["--variants", "fsq,vqp-fsq", "--lpips", "none"],
     r'the rows vqp-fsq need vector-quantize-pytorch: pip install -e ".[bench]"'),
    ("stlpips_pytorch", ["--variants", "fsq"], r'--lpips stlpips needs stlpips-pytorch: pip install -e ".[stlpips]"'),
])
def test_the_tokenizer_benchmark_refuses_a_missing_package_before_training(tmp_path, hidden, flags, said):
    """The fsq row trained (minutes at the README's settings) before the vqp-fsq row's import failed; without
    stlpips-pytorch the ST-LPIPS column was n/a without a word."""
    out = tmp_path / "bench"
    code = (f"import runpy, sys; sys.modules[{hidden!r}] = None; "
            f"sys.argv = ['tokenizer.py', '--quality', '--quick', '--steps', '1', '--out', {str(out)!r}, *{flags!r}]; "
            "runpy.run_path('benchmarks/tokenizer.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 2 and said in done.stderr, done.stderr[-2000:]
    assert not out.exists()


def test_eval_prior_offline_without_fid_weights_is_one_line_naming_the_references_network(tmp_path, monkeypatch,
                                                                                           capsys):
    """Offline and without --fid-weights, eval-prior ended in a urllib traceback; the reference's stats
    recorded the network they were computed with, which the message now names."""
    import torch

    from test_pipeline import tiny_prior, tiny_tokenizer
    from vqgpt.ground import fid
    from vqgpt.workflow.pipeline import VQGPTPipeline

    tok = tiny_tokenizer()
    pipe = VQGPTPipeline(tok, tiny_prior(tok.codebook_size), classes=["a", "b", "c"]).save_pretrained(tmp_path / "p")
    random_net = fid.FeatureExtractor.random(seed=0)
    reference = fid.save_stats(fid.compute_stats(random_net(torch.rand(8, 3, 32, 32) * 2 - 1).pool, random_net.name),
                               tmp_path / "ref.npz")

    def offline(weights, device):
        raise fid.FeatureNetworkUnavailable("could not download the FID Inception-v3 weights (no network)")

    monkeypatch.setattr(evaluation, "load_feature_extractor", offline)
    assert main(["eval-prior", "--pipeline", str(pipe), "--reference", str(reference), "--num", "4"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"error: could not download the FID Inception-v3 weights (no network); {reference} was computed with "
        f"{random_net.name!r}: give the --fid-weights its `vqgpt fid-stats` had")


def test_a_read_only_compiler_cache_is_one_line(monkeypatch, capsys):
    """`sample --compile` with TORCHINDUCTOR_CACHE_DIR read-only ended in a 36-frame traceback: torch wraps the
    OSError in its InductorError, which the CLI took for a bug."""
    import errno

    from torch._inductor.exc import InductorError

    import vqgpt.cli.commands as commands

    def compiles(args):
        raise InductorError(OSError(errno.EROFS, "Read-only file system", "/ro/inductor/hq"), None)

    monkeypatch.setattr(commands, "cmd_config_reference", compiles)
    assert main(["config-reference"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: torch.compile could not write its files ([Errno 30] Read-only file system: '/ro/inductor/hq'): "
        "point TORCHINDUCTOR_CACHE_DIR at a writable folder, or leave out --compile")
