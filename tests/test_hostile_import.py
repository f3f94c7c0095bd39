"""Importing damaged or odd checkpoints: a truncated .safetensors, NaN/inf or integer weights,
unusable values in LlamaGen's saved training args, taming YAML values of the wrong type, duplicate
class names and tangled --tokenizer / --out folders each fail with one line naming the file and the
key, never a traceback or a silently broken export."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from test_import_llamagen import CLASSES, CODES, DIM, IMAGE, llamagen_gpt_shapes, llamagen_vq_shapes
from test_import_llamagen import random_state as llamagen_state
from test_import_taming import (DDCONFIG, EMBED_DIM, N_EMBED, random_state, save_lightning_ckpt, taming_shapes,
                                taming_yaml)
from vqgpt.cli import main
from vqgpt.ground.checkpoint import copy_export
from vqgpt.ground.config import ConfigError
from vqgpt.workflow.importers import build_from_state
from vqgpt.workflow.importers.llamagen import import_llamagen_gpt, import_llamagen_vq
from vqgpt.workflow.importers.safe_load import load_checkpoint
from vqgpt.workflow.importers.taming import import_taming, taming_config
from vqgpt.workflow.pipeline import VQGPTPipeline


@pytest.fixture(scope="module")
def taming_sd():
    return random_state(taming_shapes(DDCONFIG, N_EMBED, EMBED_DIM))


def vq_args(**overrides) -> argparse.Namespace:
    args = dict(vq_model="VQ-tiny", codebook_size=CODES, codebook_embed_dim=DIM, codebook_l2_norm=True,
                commit_loss_beta=0.25, image_size=IMAGE, ema=True)
    return argparse.Namespace(**{**args, **overrides})


def gpt_args(**overrides) -> argparse.Namespace:
    args = dict(gpt_model="tiny", gpt_type="c2i", cls_token_num=1, image_size=IMAGE, downsample_size=4,
                num_classes=CLASSES, dropout_p=0.1, token_dropout_p=0.1, drop_path_rate=0.0, vocab_size=CODES)
    return argparse.Namespace(**{**args, **overrides})


@pytest.fixture(scope="module")
def lg(tmp_path_factory):
    """A LlamaGen VQ state dict, its imported tokenizer, and a c2i GPT state dict for it."""
    tmp = tmp_path_factory.mktemp("hostile_llamagen")
    vq_sd = llamagen_state(llamagen_vq_shapes(), 0)
    torch.save({"model": vq_sd, "args": vq_args()}, tmp / "vq.pt")
    import_llamagen_vq(tmp / "vq.pt", tmp / "tok")
    return tmp, vq_sd, llamagen_state(llamagen_gpt_shapes(), 2)


def cli_error(capsys, *argv: str) -> str:
    """The CLI's message for a failing import: exit code 2 and exactly one 'error:' line."""
    assert main(["import", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err and "\n" not in err, err
    return err


# ----------------------------------------------------------------------------- damaged .safetensors


def test_truncated_safetensors_names_the_file(taming_sd, tmp_path, capsys):
    save_file(taming_sd, str(tmp_path / "w.safetensors"))
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:len(data) // 2])  # header intact, tensors cut off
    (tmp_path / "h.safetensors").write_bytes(data[:50])  # header cut off
    (tmp_path / "g.safetensors").write_bytes(b"hello world" * 100)
    for name in ("t", "h", "g"):
        path = tmp_path / f"{name}.safetensors"
        with pytest.raises(ValueError, match=rf"{name}\.safetensors: not a readable safetensors checkpoint"):
            load_checkpoint(path)
    err = cli_error(capsys, "taming", "--checkpoint", str(tmp_path / "t.safetensors"),
                    "--config", str(taming_yaml(tmp_path)), "--out", str(tmp_path / "o"))
    assert "t.safetensors: not a readable safetensors checkpoint" in err
    assert not (tmp_path / "o").exists()


def test_truncated_safetensors_gpt_names_the_file(lg, tmp_path, capsys):
    tmp, _, gpt_sd = lg
    save_file(gpt_sd, str(tmp_path / "c2i.safetensors"))
    data = (tmp_path / "c2i.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[:-100])
    err = cli_error(capsys, "llamagen-gpt", "--checkpoint", str(tmp_path / "trunc.safetensors"),
                    "--tokenizer", str(tmp / "tok"), "--preset", "tiny", "--out", str(tmp_path / "o"))
    assert "trunc.safetensors: not a readable safetensors checkpoint" in err


# ----------------------------------------------------------------------------- NaN / inf weights


def test_taming_nan_weights_are_refused(taming_sd, tmp_path, capsys):
    sd = {k: v.clone() for k, v in taming_sd.items()}
    sd["quantize.embedding.weight"][0, 0] = float("nan")
    sd["decoder.conv_out.bias"][1] = float("inf")
    sd["loss.discriminator.main.0.bias"][:] = float("nan")  # dropped: not part of the tokenizer, not checked
    save_lightning_ckpt(tmp_path / "nan.ckpt", sd)
    yaml_path = taming_yaml(tmp_path)
    with pytest.raises(ValueError, match=r"nan\.ckpt.*NaN or inf") as info:
        import_taming(tmp_path / "nan.ckpt", yaml_path, tmp_path / "o")
    message = str(info.value)
    assert "quantize.embedding.weight (1 of 96 values)" in message and "decoder.conv_out.bias (1 of 3" in message
    assert "loss." not in message and not (tmp_path / "o").exists()
    err = cli_error(capsys, "taming", "--checkpoint", str(tmp_path / "nan.ckpt"), "--config", str(yaml_path),
                    "--out", str(tmp_path / "o"))
    assert "quantize.embedding.weight" in err


def test_llamagen_nonfinite_weights_are_refused(lg, tmp_path, capsys):
    tmp, vq_sd, gpt_sd = lg
    bad_vq = {**vq_sd, "encoder.conv_in.bias": torch.full_like(vq_sd["encoder.conv_in.bias"], float("-inf"))}
    torch.save({"model": bad_vq, "args": vq_args()}, tmp_path / "vq.pt")
    with pytest.raises(ValueError, match=r"vq\.pt.*encoder\.conv_in\.bias \(32 of 32 values\)"):
        import_llamagen_vq(tmp_path / "vq.pt", tmp_path / "tok")
    bad_gpt = {**gpt_sd, "output.weight": torch.full_like(gpt_sd["output.weight"], float("nan"))}
    torch.save({"model": bad_gpt, "args": gpt_args()}, tmp_path / "c2i_nan.pt")
    err = cli_error(capsys, "llamagen-gpt", "--checkpoint", str(tmp_path / "c2i_nan.pt"),
                    "--tokenizer", str(tmp / "tok"), "--out", str(tmp_path / "o"))
    assert "c2i_nan.pt" in err and "output.weight" in err and "NaN or inf" in err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- integer weights


def test_integer_weights_are_refused_in_one_line(taming_sd, tmp_path, capsys):
    save_lightning_ckpt(tmp_path / "long.ckpt", {k: (v * 100).long() for k, v in taming_sd.items()})
    yaml_path = taming_yaml(tmp_path)
    with pytest.raises(ValueError, match=r"long\.ckpt.*floating-point") as info:
        import_taming(tmp_path / "long.ckpt", yaml_path, tmp_path / "o")
    message = str(info.value)
    assert "torch.int64" in message and "encoder.conv_in.weight (torch.int64)" in message and "more" in message
    assert "\n" not in message and len(message) < 600
    err = cli_error(capsys, "taming", "--checkpoint", str(tmp_path / "long.ckpt"), "--config", str(yaml_path),
                    "--out", str(tmp_path / "o"))
    assert "torch.int64" in err
    # One integer tensor among float ones (e.g. a hand-edited file): named alone.
    one_int = {**taming_sd, "quant_conv.bias": torch.zeros(EMBED_DIM, dtype=torch.int32)}
    save_lightning_ckpt(tmp_path / "one.ckpt", one_int)
    with pytest.raises(ValueError, match=r"1 tensor.*quant_conv\.bias \(torch\.int32\)"):
        import_taming(tmp_path / "one.ckpt", yaml_path, tmp_path / "o")


def test_build_from_state_refuses_integer_weights_in_one_line():
    from stage2_prior.model import GPT, GPTConfig

    config = GPTConfig(codebook_size=8, grid_size=[2, 2], num_classes=2, n_layer=1, n_head=2, dim=16)
    state = {k: torch.zeros(v.shape, dtype=torch.long) for k, v in GPT(config).state_dict().items()}
    with pytest.raises(ValueError, match="floating-point") as info:
        build_from_state(GPT, config, state)
    assert "torch.int64" in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------- LlamaGen training args


@pytest.mark.parametrize("value, expected", [
    (None, r"v\.pt: args\.image_size is None.*pass --image-size"),
    ("abc", r"v\.pt: args\.image_size = 'abc' must be a positive whole number.*--image-size"),
    (0, r"v\.pt: args\.image_size = 0 must be a positive whole number"),
    (-16, r"v\.pt: args\.image_size = -16 must be a positive whole number"),
    (16.5, r"v\.pt: args\.image_size = 16\.5 must be a positive whole number"),
])
def test_vq_odd_image_size_in_args(lg, tmp_path, value, expected):
    _, vq_sd, _ = lg
    torch.save({"model": vq_sd, "args": vq_args(image_size=value)}, tmp_path / "v.pt")
    with pytest.raises(ConfigError, match=expected):
        import_llamagen_vq(tmp_path / "v.pt", tmp_path / "o")
    import_llamagen_vq(tmp_path / "v.pt", tmp_path / "o", image_size=IMAGE)  # the option overrides the args


def test_vq_odd_args_through_the_cli(lg, tmp_path, capsys):
    _, vq_sd, _ = lg
    torch.save({"model": vq_sd, "args": vq_args(image_size=None)}, tmp_path / "v.pt")
    err = cli_error(capsys, "llamagen-vq", "--checkpoint", str(tmp_path / "v.pt"), "--out", str(tmp_path / "o"))
    assert "v.pt: args.image_size is None" in err and "--image-size" in err
    assert main(["import", "llamagen-vq", "--checkpoint", str(tmp_path / "v.pt"), "--out", str(tmp_path / "o"),
                 "--image-size", str(IMAGE)]) == 0
    for key, value in (("commit_loss_beta", "x"), ("codebook_l2_norm", "yes"), ("dropout_p", None)):
        torch.save({"model": vq_sd, "args": vq_args(**{key: value})}, tmp_path / "w.pt")
        err = cli_error(capsys, "llamagen-vq", "--checkpoint", str(tmp_path / "w.pt"), "--out", str(tmp_path / "o2"))
        assert f"w.pt: args.{key}" in err


@pytest.mark.parametrize("key, value, expected", [
    ("num_classes", None, r"g\.pt: args\.num_classes is None.*pass --num-classes"),
    ("num_classes", 0, r"g\.pt: args\.num_classes = 0 must be a positive whole number.*--num-classes"),
    ("image_size", None, r"g\.pt: args\.image_size is None.*pass --image-size"),
    ("image_size", "abc", r"g\.pt: args\.image_size = 'abc' must be a positive whole number.*--image-size"),
    ("image_size", 0, r"g\.pt: args\.image_size = 0 must be a positive whole number"),
    ("downsample_size", None, r"g\.pt: args\.downsample_size is None"),
    ("cls_token_num", "one", r"g\.pt: args\.cls_token_num = 'one' must be a positive whole number"),
    ("vocab_size", None, r"g\.pt: args\.vocab_size is None"),
    ("dropout_p", "abc", r"g\.pt: args\.dropout_p = 'abc' must be a number"),
])
def test_gpt_odd_values_in_args(lg, tmp_path, key, value, expected):
    tmp, _, gpt_sd = lg
    torch.save({"model": gpt_sd, "args": gpt_args(**{key: value})}, tmp_path / "g.pt")
    with pytest.raises(ConfigError, match=expected):
        import_llamagen_gpt(tmp_path / "g.pt", tmp / "tok", tmp_path / "o")


def test_gpt_odd_args_are_overridden_by_options(lg, tmp_path, capsys):
    tmp, _, gpt_sd = lg
    torch.save({"model": gpt_sd, "args": gpt_args(num_classes=None, image_size="abc")}, tmp_path / "g.pt")
    base = ["llamagen-gpt", "--checkpoint", str(tmp_path / "g.pt"), "--tokenizer", str(tmp / "tok")]
    err = cli_error(capsys, *base, "--out", str(tmp_path / "o"))
    assert "g.pt: args.image_size = 'abc'" in err
    err = cli_error(capsys, *base, "--out", str(tmp_path / "o"), "--image-size", str(IMAGE))
    assert "g.pt: args.num_classes is None" in err and "--num-classes" in err
    assert main(["import", *base, "--out", str(tmp_path / "o"), "--image-size", str(IMAGE),
                 "--num-classes", str(CLASSES)]) == 0
    with pytest.raises(ConfigError, match="image_size = 0 must be a positive whole number"):
        import_llamagen_gpt(tmp_path / "g.pt", tmp / "tok", tmp_path / "o2", image_size=0, num_classes=CLASSES)


# ----------------------------------------------------------------------------- LlamaGen GPT: classes and folders


def test_duplicate_class_names_are_refused_before_writing(lg, tmp_path, capsys):
    """The pipeline's own rule (distinct names) is applied at import time: the import writes nothing rather
    than a pipeline that never loads."""
    tmp, _, gpt_sd = lg
    torch.save({"model": gpt_sd, "args": gpt_args()}, tmp_path / "g.pt")
    names = [f"c{i}" for i in range(CLASSES - 2)] + ["c1", "c3"]
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    err = cli_error(capsys, "llamagen-gpt", "--checkpoint", str(tmp_path / "g.pt"), "--tokenizer", str(tmp / "tok"),
                    "--classes", str(tmp_path / "classes.txt"), "--out", str(tmp_path / "o"))
    assert "class names" in err and "given more than once: ['c1', 'c3']" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match=r"more than once: \['c1', 'c3'\]"):
        import_llamagen_gpt(tmp_path / "g.pt", tmp / "tok", tmp_path / "o", class_names=names)
    assert not (tmp_path / "o").exists()


def test_a_classes_file_that_is_empty_or_missing_is_refused_naming_the_flag(lg, tmp_path, capsys):
    """An empty --classes file was taken as 'no names' (the pipeline came out without them); a missing one
    said only 'No such file or directory'."""
    tmp, _, gpt_sd = lg
    torch.save({"model": gpt_sd, "args": gpt_args()}, tmp_path / "g.pt")
    (tmp_path / "empty.txt").write_text("\n \n")
    base = ["llamagen-gpt", "--checkpoint", str(tmp_path / "g.pt"), "--tokenizer", str(tmp / "tok"),
            "--out", str(tmp_path / "o")]
    err = cli_error(capsys, *base, "--classes", str(tmp_path / "empty.txt"))
    assert f"--classes {tmp_path / 'empty.txt'} holds no class names" in err
    err = cli_error(capsys, *base, "--classes", str(tmp_path / "gone.txt"))
    assert f"--classes {tmp_path / 'gone.txt'}: cannot read it (No such file or directory)" in err
    assert not (tmp_path / "o").exists()


def test_out_inside_the_tokenizer_folder_is_refused(lg, tmp_path, capsys):
    tmp, _, gpt_sd = lg
    torch.save({"model": gpt_sd, "args": gpt_args()}, tmp_path / "g.pt")
    tok = tmp_path / "tok"
    copy_export(tmp / "tok", tok)
    before = sorted(p.relative_to(tok) for p in tok.rglob("*"))
    for out in (tok / "pipe", tok):
        err = cli_error(capsys, "llamagen-gpt", "--checkpoint", str(tmp_path / "g.pt"), "--tokenizer", str(tok),
                        "--out", str(out), "--overwrite")
        assert f"--out {out}" in err and f"--tokenizer folder {tok}" in err
    assert sorted(p.relative_to(tok) for p in tok.rglob("*")) == before  # nothing written
    # The tokenizer given as the prior/ folder the import writes would be replaced by the prior.
    copy_export(tmp / "tok", tmp_path / "p" / "prior")
    with pytest.raises(ConfigError, match=r"--tokenizer .*prior is the prior/ folder of --out .*p"):
        import_llamagen_gpt(tmp_path / "g.pt", tmp_path / "p" / "prior", tmp_path / "p")
    # --out/tokenizer as --tokenizer: the export is already in place.
    copy_export(tmp / "tok", tmp_path / "q" / "tokenizer")
    import_llamagen_gpt(tmp_path / "g.pt", tmp_path / "q" / "tokenizer", tmp_path / "q")
    assert VQGPTPipeline.from_pretrained(tmp_path / "q").prior.config.num_classes == CLASSES


def test_the_tokenizer_copy_holds_only_its_export(lg, tmp_path):
    """Other files in the tokenizer's folder are not copied into the pipeline, and a second import into the
    same --out does not nest a copy inside the first."""
    tmp, _, gpt_sd = lg
    torch.save({"model": gpt_sd, "args": gpt_args()}, tmp_path / "g.pt")
    tok = tmp_path / "tok"
    copy_export(tmp / "tok", tok)
    (tok / "notes.txt").write_text("not part of the export")
    (tok / "old-run").mkdir()
    (tok / "old-run" / "big.bin").write_bytes(b"x" * 100)
    for _ in range(2):
        import_llamagen_gpt(tmp_path / "g.pt", tok, tmp_path / "o")
        assert sorted(p.name for p in (tmp_path / "o" / "tokenizer").iterdir()) == ["config.json", "model.safetensors"]
    VQGPTPipeline.from_pretrained(tmp_path / "o")


# ----------------------------------------------------------------------------- taming YAML of the wrong types


def _taming_cfg() -> dict:
    return {"model": {"target": "taming.models.vqgan.VQModel",
                      "params": {"embed_dim": EMBED_DIM, "n_embed": N_EMBED, "ddconfig": dict(DDCONFIG)}}}


def _set(cfg: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[last] = value
    return cfg


@pytest.mark.parametrize("key, value, expected", [  # key under model.params
    ("ddconfig.attn_resolutions", 8, "ddconfig.attn_resolutions: expected a list of integers"),
    ("ddconfig.attn_resolutions", [8, "x"], "ddconfig.attn_resolutions[1]: expected an integer, got 'x'"),
    ("ddconfig.ch_mult", 2, "ddconfig.ch_mult: expected a non-empty list of integers"),
    ("ddconfig.ch_mult", [1, 1.5, 2], "ddconfig.ch_mult[1]: expected an integer, got 1.5"),
    ("ddconfig", None, "ddconfig: expected a mapping"),
    ("ddconfig", [1, 2], "ddconfig: expected a mapping"),
    ("", [1, 2], ": expected a mapping"),  # model.params itself
    ("n_embed", None, "n_embed: expected an integer, got None"),
    ("n_embed", 24.5, "n_embed: expected an integer, got 24.5"),
    ("n_embed", 24.0, "n_embed: expected an integer, got 24.0"),
    ("embed_dim", True, "embed_dim: expected an integer, got True"),
    ("ddconfig.resolution", "abc", "ddconfig.resolution: expected an integer, got 'abc'"),
    ("ddconfig.resolution", 16.7, "ddconfig.resolution: expected an integer, got 16.7"),
    ("ddconfig.ch", 0, "ddconfig.ch: expected an integer >= 1, got 0"),
    ("ddconfig.dropout", "abc", "ddconfig.dropout: expected a number, got 'abc'"),
])
def test_taming_yaml_of_the_wrong_type_names_the_file_and_key(tmp_path, capsys, key, value, expected):
    path = tmp_path / "model.yaml"
    dotted = "model.params" + (f".{key}" if key else "")
    path.write_text(yaml.safe_dump(_set(_taming_cfg(), dotted, value)))
    message = f"{path}: model.params" + (f".{expected}" if key else expected)
    with pytest.raises(ConfigError) as info:
        taming_config(path)
    assert str(info.value).startswith(message), (str(info.value), message)
    err = cli_error(capsys, "taming", "--checkpoint", str(tmp_path / "missing.ckpt"), "--config", str(path),
                    "--out", str(tmp_path / "o"))
    assert err.startswith(f"error: {message}"), err
    assert not (tmp_path / "o").exists()


def test_taming_bare_model_section_keys_have_no_model_prefix():
    cfg = _taming_cfg()["model"]
    cfg["params"]["ddconfig"]["ch_mult"] = 3
    with pytest.raises(ConfigError, match=r"^config: params\.ddconfig\.ch_mult: expected a non-empty list"):
        taming_config(cfg)


# ----------------------------------------------------------------------------- folder as checkpoint, Ctrl-C


def test_a_folder_as_checkpoint_says_it_is_a_folder(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    with pytest.raises(IsADirectoryError, match=r"run is a folder: expected a checkpoint file"):
        load_checkpoint(tmp_path / "run")
    err = cli_error(capsys, "taming", "--checkpoint", str(tmp_path / "run"), "--config", str(taming_yaml(tmp_path)),
                    "--out", str(tmp_path / "o"))
    assert "is a folder" in err and "not found" not in err


def test_ctrl_c_during_an_import_says_what_was_written(taming_sd, tmp_path, capsys, monkeypatch):
    import vqgpt.workflow.importers.taming as taming

    save_lightning_ckpt(tmp_path / "last.ckpt", taming_sd)
    argv = ["import", "taming", "--checkpoint", str(tmp_path / "last.ckpt"), "--config", str(taming_yaml(tmp_path)),
            "--out", str(tmp_path / "o")]

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # while reading the checkpoint
        patch.setattr(taming, "load_checkpoint", interrupt)
        assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"import interrupted: nothing was written (--out {tmp_path / 'o'} is as it was)"
    assert not (tmp_path / "o").exists()

    real_save = taming.save_export

    def save_then_interrupt(out, *args, **kwargs):
        (Path(out)).mkdir(parents=True)
        (Path(out) / "model.safetensors.tmp").write_bytes(b"partial")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # while writing the export
        patch.setattr(taming, "save_export", save_then_interrupt)
        assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"import interrupted while writing --out {tmp_path / 'o'}") and "--overwrite" in err
    assert "\n" not in err and taming.save_export is real_save
    assert main([*argv, "--overwrite"]) == 0


def test_a_linked_prior_folder_of_out_is_not_the_tokenizer(lg, tmp_path):
    """--out/prior a link to the tokenizer's folder: writing the prior there would replace the tokenizer."""
    tmp, _, gpt_sd = lg
    torch.save({"model": gpt_sd, "args": gpt_args()}, tmp_path / "g.pt")
    tok = tmp_path / "mytok"
    copy_export(tmp / "tok", tok)
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "prior").symlink_to(tok, target_is_directory=True)
    for given in (tok, tmp_path / "pipe" / "prior"):
        with pytest.raises(ConfigError, match="is the prior/ folder of --out"):
            import_llamagen_gpt(tmp_path / "g.pt", given, tmp_path / "pipe")
    assert '"vq_tokenizer"' in (tok / "config.json").read_text()


def test_a_python_mapping_may_give_tuples_and_numpy_integers():
    """taming_config(dict): what a Python caller builds (tuples, numpy integers) reads as YAML's lists and ints."""
    import numpy as np

    cfg = _taming_cfg()
    _set(cfg, "model.params.ddconfig.ch_mult", tuple(DDCONFIG["ch_mult"]))
    _set(cfg, "model.params.ddconfig.attn_resolutions", tuple(np.int64(r) for r in DDCONFIG["attn_resolutions"]))
    _set(cfg, "model.params.n_embed", np.int64(N_EMBED))
    assert taming_config(cfg).config == taming_config(_taming_cfg()).config
    with pytest.raises(ConfigError, match="ch_mult: expected a non-empty list of integers"):
        taming_config(_set(_taming_cfg(), "model.params.ddconfig.ch_mult", "12"))
