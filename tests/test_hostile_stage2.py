"""Inputs a careless or hostile user gives the prior's side: non-finite sampling settings, token shards
with a bad value where the opening spot check does not look, weights that do not fit their config, a
resume naming the same folder another way, a reference file named in capitals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from stage2_prior import SamplingConfig
from stage2_prior.model import GPT
from test_pipeline import ROOT, tiny_prior
from test_tokens import GRID, _data, _write
from vqgpt.ground.config import ConfigError
from vqgpt.ground.tokens import TokenDataset, TokenShardError


@pytest.mark.parametrize("settings", [dict(temperature=math.nan), dict(temperature=math.inf),
                                      dict(cfg_scale=math.nan), dict(cfg_scale=math.inf), dict(top_p=math.nan)])
def test_sampling_settings_must_be_finite(settings):
    # NaN passes every "< 0" check, and inf guidance makes NaN logits: both drew code 0 everywhere
    with pytest.raises(ValueError, match=next(iter(settings))):
        SamplingConfig(**settings)


def test_every_grid_read_is_checked_not_only_the_spot_checked_rows(tmp_path):
    tokens, labels = _data(10, codebook_size=100)
    out = tmp_path / "tok"
    _write(out, tokens, labels, codebook_size=100)
    shard_labels = np.load(out / "labels-00001.npy")
    shard_labels[1] = 42  # grid 5; 10 classes
    np.save(out / "labels-00001.npy", shard_labels)
    shard_tokens = np.load(out / "tokens-00002.npy")
    shard_tokens[1, 1, 2] = 100  # grid 9; 100 codes
    np.save(out / "tokens-00002.npy", shard_tokens)
    # a folder written before the shards' checksums (which would name the edited shards at opening)
    meta = json.loads((out / "meta.json").read_text())
    for shard in meta["shards"]:
        del shard["rows_sha256"]
    (out / "meta.json").write_text(json.dumps(meta))
    data = TokenDataset(out, check_samples=1)  # the opening check reads the first row of each shard only
    assert [int(data[i][1]) for i in range(5)] == labels[:5].tolist()
    with pytest.raises(TokenShardError, match=r"labels-00001\.npy: grid 5 has label 42, outside \[0, 10\)"):
        data[5]
    with pytest.raises(TokenShardError, match=r"tokens-00002\.npy: grid 9 holds a token outside \[0, 100\)"):
        data[-1]
    assert data[8][0].shape == GRID


def test_weights_that_do_not_fit_the_config_are_a_config_error_naming_the_export(tmp_path):
    tiny_prior(256, num_classes=0).save_pretrained(tmp_path / "uncond")
    tiny_prior(256, num_classes=3).save_pretrained(tmp_path / "cond")
    (tmp_path / "cond" / "model.safetensors").write_bytes((tmp_path / "uncond" / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match=r"cond: the weights in model\.safetensors do not match config\.json"):
        GPT.from_pretrained(tmp_path / "cond")


def test_a_resume_may_name_the_same_folder_another_way(tmp_path, monkeypatch):
    from vqgpt.training.run_folder import _same_value

    (tmp_path / "codes").mkdir()
    monkeypatch.chdir(tmp_path)
    assert _same_value("codes", "codes/") and _same_value("codes", "./codes")
    assert _same_value("codes", str(tmp_path / "codes"))
    assert not _same_value("codes", "other") and not _same_value("vq", "fsq") and not _same_value(1, "1")


def test_an_adm_reference_batch_named_in_capitals(tmp_path):
    from vqgpt.workflow.evaluation import _is_image_batch

    with open(tmp_path / "REF.NPZ", "wb") as f:  # a file object: np.savez would add ".npz" to the name
        np.savez(f, np.zeros((2, 8, 8, 3), dtype=np.uint8))
    assert _is_image_batch(str(tmp_path / "REF.NPZ"))


def test_a_resume_with_another_spelling_of_the_tokens_folder_is_accepted(tmp_path, monkeypatch):
    from stage2_prior.train import PriorRunConfig
    from vqgpt.ground.config import load_config, save_config
    from vqgpt.training.run_folder import check_config_unchanged

    (tmp_path / "codes").mkdir()
    monkeypatch.chdir(tmp_path)
    config = ROOT / "configs/prior/tiny.yaml"
    save_config(load_config(PriorRunConfig, config, ["tokens=codes"]), tmp_path / "config.yaml")
    for spelling in ("codes/", "./codes", str(tmp_path / "codes")):
        check_config_unchanged(load_config(PriorRunConfig, config, [f"tokens={spelling}"]), tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match="changes tokens: 'codes' -> 'elsewhere'"):
        check_config_unchanged(load_config(PriorRunConfig, config, ["tokens=elsewhere"]), tmp_path / "config.yaml")


def test_bad_tokens_labels_and_cache_positions_are_clear_errors():
    """GPT.forward and forward_cached ran on bad input (negative slots counted from the end, a 0-slot cache
    made the default one) or failed deep in torch (IndexError, 'int' has no .shape, a shape mismatch)."""
    import torch

    prior = tiny_prior(256).eval()  # class-conditional, 3 classes
    tokens, labels = torch.zeros(1, 4, dtype=torch.long), torch.tensor([0])
    for args, message in (((torch.full((1, 4), 300), labels), r"tokens must lie in \[0, 256\) and class_labels"),
                          ((tokens, torch.tensor([5])), r"class_labels in \[0, 3\)"),
                          ((tokens, 0), "class_labels must be an integer tensor of shape"),
                          ((tokens.float(), labels), "tokens must be integer codes")):
        with pytest.raises(ValueError, match=message):
            prior(*args)
    cache = prior.new_cache(2)
    prior.forward_cached(None, 0, torch.tensor([0, 1]), cache=cache)
    for start in (-3, -1, 1.5):
        with pytest.raises(ValueError, match=f"start_pos must be a slot index >= 0.*got {start}"):
            prior.forward_cached(torch.zeros(2, 2, dtype=torch.long), start, cache=cache)
    assert prior.forward_cached(torch.zeros(2, 1, dtype=torch.long), np.int64(1), cache=cache).shape[:2] == (2, 1)
    with pytest.raises(ValueError, match="max_len must be >= 1"):
        prior.new_cache(2, 0)
    longer = prior.new_cache(2, 4 + prior.seq_len)
    prior.forward_cached(None, 0, torch.tensor([0, 1]), cache=longer)
    with pytest.raises(ValueError, match=r"run past the prior's .* slots .*give positions"):
        prior.forward_cached(torch.zeros(2, prior.seq_len + 2, dtype=torch.long), 1, cache=longer)


def test_a_cached_forward_past_the_written_slots_is_refused():
    """forward_cached at a start_pos beyond the slots written so far attended over uninitialised cache memory
    (garbage logits, no error); out-of-range tokens there failed with torch's bare IndexError. The compiled
    decode step checks the same, and both count the slots they write."""
    from stage2_prior.decode import decode_step

    prior = tiny_prior(256).eval()
    one = torch.zeros(2, 1, dtype=torch.long)
    cache = prior.new_cache(2)
    assert cache.filled == 0
    with pytest.raises(ValueError, match=r"start_pos 3 is past the 0 slot\(s\) written .*slots 0..2"):
        prior.forward_cached(one, 3, cache=cache)
    prior.forward_cached(torch.zeros(2, 2, dtype=torch.long), 0, torch.tensor([0, 1]), cache=cache)
    assert cache.filled == 3
    prior.forward_cached(one, 3, cache=cache)  # the next slot
    prior.forward_cached(one, 1, cache=cache)  # rewinding: slots after the rewritten one are stale
    assert cache.filled == 2
    with pytest.raises(ValueError, match=r"start_pos 3 is past the 2 slot\(s\) written"):
        prior.forward_cached(one, 3, cache=cache)
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 256\) and class_labels in \[0, 3\)"):
        prior.forward_cached(torch.full((2, 1), 256), 2, cache=cache)
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 256\)"):
        prior.forward_cached(torch.full((2, 1), -1), 2, cache=cache)
    with pytest.raises(ValueError, match="tokens must lie in"):
        prior.forward_cached(None, 0, torch.tensor([0, 7]), cache=cache)
    with pytest.raises(ValueError, match="tokens must be integer codes"):
        prior.forward_cached(one.float(), 2, cache=cache)
    assert cache.filled == 2  # refused calls count nothing
    assert cache.select(0, 1).filled == 2
    step = decode_step(prior)
    compiled = step.new_cache(2, 1 + prior.seq_len)
    with pytest.raises(ValueError, match=r"start_pos 2 is past the 0 slot\(s\) written"):
        step(one, 2, compiled)
    with pytest.raises(ValueError, match=r"pos >= 1"):
        step(one, 0, compiled)
    prior.forward_cached(None, 0, torch.tensor([0, 1]), cache=compiled)
    step(one, 1, compiled)
    assert compiled.filled == 2
    with pytest.raises(ValueError, match="exceed the cache length"):
        step(one, 1 + prior.seq_len, compiled)


def test_grid_arguments_of_extend_complete_and_labels_are_checked():
    """From a probe of the Python API: extend cut float codes to integers (complete refuses them), and took
    2-D tokens or a height of 5.5 to errors inside torch; complete of no grids or keep_rows=2.5 failed inside
    torch; True in a list of int labels was read as class 1 (in a list of names it was refused)."""
    from stage2_prior import generate
    from stage2_prior.highres import complete, extend, generate_highres
    from test_pipeline import tiny_prior, tiny_tokenizer
    from vqgpt.workflow.pipeline import VQGPTPipeline

    tok = tiny_tokenizer()
    prior = tiny_prior(tok.codebook_size)
    codes = torch.zeros(1, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="tokens must be integer codes, got torch.float32"):
        extend(prior, torch.full((1, 4, 4), 3.7), 4, 6, class_labels=0)
    with pytest.raises(ValueError, match=r"tokens must be \(B, H, W\), got shape \(4, 4\)"):
        extend(prior, codes[0], 4, 6, class_labels=0)
    with pytest.raises(ValueError, match="grid_size must be"):
        extend(prior, codes, 5.5, 6, class_labels=0)
    with pytest.raises(ValueError, match="grid_size must be"):
        generate_highres(prior, 1, 5.5, 6, class_labels=0)
    with pytest.raises(ValueError, match=r"tokens hold no grids \(B = 0\)"):
        complete(prior, codes[:0], keep_rows=2, class_labels=0)
    with pytest.raises(ValueError, match="keep_rows must be an integer, got 2.5"):
        complete(prior, codes, keep_rows=2.5, class_labels=0)
    assert extend(prior, codes, 4, 6, class_labels=0).shape == (1, 4, 6)
    assert complete(prior, codes, keep_rows=torch.tensor(2), class_labels=0).shape == (1, 4, 4)
    pipe = VQGPTPipeline(tok, prior, classes=["a", "b", "c"])
    with pytest.raises(ValueError, match="a class label is an int index or a str name, got True"):
        pipe.labels_tensor([True, 1, 2], 3)
    assert pipe.labels_tensor([0, 1, 2], 3).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="a class label is an int index or a str name, got True"):
        generate(prior, 2, class_labels=[True, 1])  # the prior's own check, which the pipeline's goes through


def test_an_export_extra_that_would_not_load_back_is_refused(tmp_path):
    """GPT.save_pretrained(extra="abc") wrote an export that from_pretrained refused ('the extra section is not
    an object'), replacing a good one; an object json cannot write left an empty folder (from a probe)."""
    from test_pipeline import tiny_tokenizer

    prior = tiny_prior(tiny_tokenizer().codebook_size)
    for bad, said in (("abc", "extra must be a dict of JSON values, got str"),
                      (["a"], "extra must be a dict of JSON values, got list"),
                      ({"foo": object()}, "extra must hold JSON values"),
                      ({"x": float("nan")}, "extra must hold JSON values")):
        with pytest.raises(ValueError, match=said):
            prior.save_pretrained(tmp_path / "e", extra=bad)
        assert not (tmp_path / "e").exists()
    prior.save_pretrained(tmp_path / "e", extra={"note": "fine", "n": [1, 2.5, None]})
    assert GPT.from_pretrained(tmp_path / "e").config == prior.config
