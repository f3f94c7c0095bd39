"""Config values derived from elsewhere (the prior's vocabulary, grid and classes from the token shards;
FSQ's codebook size from its levels) fill what the config leaves unset and refuse a different value."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_check import make_token_shards
from stage1_vq import QuantizerConfig, VQModel, VQModelConfig
from stage1_vq.train import TokenizerRunConfig
from stage2_prior.model import GPT, GPTConfig
from stage2_prior.train import PriorRunConfig, model_config_for
from vqgpt.cli import main
from vqgpt.ground.config import ConfigError, from_dict, load_config
from vqgpt.ground.tokens import TokenDataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    return make_token_shards(tmp_path_factory.mktemp("derived") / "tokens", n=8, grid=(2, 3), codebook_size=16,
                             num_classes=3)


def prior_config(tokens: Path, *overrides: str) -> PriorRunConfig:
    return load_config(PriorRunConfig, ROOT / "configs/prior/tiny.yaml", [*overrides, f"tokens={tokens}"])


def test_prior_fields_left_unset_are_filled_from_the_shards_and_said(tokens, capsys):
    cfg = prior_config(tokens)
    assert (cfg.model.codebook_size, cfg.model.grid_size, cfg.model.num_classes) == (None, None, None)
    model = model_config_for(cfg, TokenDataset(tokens))
    assert (model.codebook_size, model.grid_size, model.num_classes) == (16, [2, 3], 3)
    assert (f"model.codebook_size=16, model.grid_size=[2, 3], model.num_classes=3 from the token shards in {tokens}"
            in capsys.readouterr().err)
    # Values that agree with the shards are kept, and nothing is said.
    same = prior_config(tokens, "model.codebook_size=16", "model.grid_size=[2, 3]", "model.num_classes=3")
    assert model_config_for(same, TokenDataset(tokens)) == model and capsys.readouterr().err == ""
    assert model_config_for(prior_config(tokens, "conditional=false"), TokenDataset(tokens)).num_classes == 0
    said = capsys.readouterr().err  # the 0 is conditional's doing, not the shards' (they hold 3 classes)
    assert (f"model.codebook_size=16, model.grid_size=[2, 3] from the token shards in {tokens}; "
            "model.num_classes=0 as conditional is false (the shards' 3 classes are not used)") in said, said


@pytest.mark.parametrize("override, message", [
    ("model.codebook_size=1024", r"model.codebook_size: the config sets 1024, but the token shards in .* give 16"),
    ("model.grid_size=[16, 16]", r"model.grid_size: the config sets \[16, 16\], but the token shards .* give \[2, 3\]"),
    ("model.num_classes=0", r"model.num_classes: the config sets 0, .* give 3; for an unconditional prior set "
                            r"conditional: false"),
    ("model.num_classes=10", r"model.num_classes: the config sets 10, .* give 3"),
])
def test_prior_fields_set_differently_from_the_shards_are_errors(tokens, override, message):
    with pytest.raises(ConfigError, match=message):
        model_config_for(prior_config(tokens, override), TokenDataset(tokens))


def test_train_prior_cli_refuses_a_vocabulary_the_shards_do_not_have(tokens, tmp_path, capsys):
    code = main(["train-prior", "--config", str(ROOT / "configs/prior/tiny.yaml"), "--tokens", str(tokens),
                 "--out", str(tmp_path / "run"), "--set", "model.codebook_size=1024"])
    assert code == 2
    assert "model.codebook_size: the config sets 1024, but the token shards" in capsys.readouterr().err
    assert not (tmp_path / "run" / "export").exists()


def test_train_prior_without_a_tokenizer_says_sample_every_draws_nothing(tokens, tmp_path, capsys):
    """train.sample_every asks for grids; without --tokenizer none can be decoded, and the user is told."""
    argv = ["train-prior", "--config", str(ROOT / "configs/prior/tiny.yaml"), "--tokens", str(tokens),
            "--set", "train.steps=2", "--set", "train.checkpoint_every=0", "--set", "train.batch_size=4"]
    assert main([*argv, "--out", str(tmp_path / "run"), "--set", "train.sample_every=1"]) == 0
    err = capsys.readouterr().err
    assert "warning: train.sample_every=1 writes no image grids without --tokenizer" in err, err
    assert not list((tmp_path / "run").rglob("*.png"))
    assert main([*argv, "--out", str(tmp_path / "quiet")]) == 0  # the default (0) says nothing
    assert "sample_every" not in capsys.readouterr().err


def test_a_gpt_needs_the_data_fields_set():
    with pytest.raises(ConfigError, match="codebook_size, grid_size, num_classes: not set"):
        GPT(GPTConfig.from_preset("tiny"))
    model = GPT(GPTConfig.from_preset("tiny", codebook_size=8, grid_size=[2, 2], num_classes=0))
    assert model.config.num_classes == 0


def test_fsq_codebook_size_is_derived_and_a_different_value_is_an_error(tmp_path):
    assert QuantizerConfig(kind="fsq", fsq_levels=[8, 5, 5, 5]).codebook_size == 1000
    assert QuantizerConfig(kind="fsq", fsq_levels=[8, 5, 5, 5], codebook_size=1000).codebook_size == 1000
    assert QuantizerConfig().codebook_size == 1024  # vq's default
    with pytest.raises(ConfigError, match=r"model.quantizer: codebook_size 1024 disagrees with fsq_levels "
                                          r"\[8, 5, 5, 5\], which give 1000 codes"):
        from_dict(VQModelConfig, {"quantizer": {"kind": "fsq", "fsq_levels": [8, 5, 5, 5], "codebook_size": 1024}},
                  prefix="model")
    # The way a user meets it: a VQ config (codebook_size 256) switched to FSQ on the command line; the
    # error names the --set whose field it names.
    with pytest.raises(ConfigError, match=r"^--set model.quantizer.fsq_levels=\[4, 4\]: model.quantizer: "
                                          r"codebook_size 256 disagrees with "
                                          r"fsq_levels \[4, 4\], which give 16 codes"):
        load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml",
                    ["model.quantizer.kind=fsq", "model.quantizer.fsq_levels=[4, 4]", "model.quantizer.ema=false",
                     "model.quantizer.kmeans_init=false", "model.quantizer.restart_threshold=0"])
    # An export stores the resolved size and loads again.
    config = VQModelConfig(channels=32, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], resolution=16,
                           z_channels=8, quantizer=QuantizerConfig(kind="fsq", fsq_levels=[4, 3]))
    torch.manual_seed(0)
    VQModel(config).save_pretrained(tmp_path / "tok")
    assert VQModel.from_pretrained(tmp_path / "tok").codebook_size == 12
