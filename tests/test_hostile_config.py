"""Hostile config values: each is one ConfigError naming the dotted key and the value, raised when the
config is read (before any training), blamed on the --set that gave it; the CLI prints one `error:`
line and exits 2. Also the YAML reader: duplicate keys, a file that is not UTF-8, an empty file."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from stage1_vq.model import VQModelConfig
from stage1_vq.quantizers import QuantizerConfig
from stage1_vq.train import TokenizerRunConfig
from stage2_prior.config import GPTConfig
from stage2_prior.train import PriorRunConfig
from vqgpt.cli.commands import main
from vqgpt.ground.config import ConfigError, from_dict, load_config, read_yaml
from vqgpt.ground.tokens import MAX_CODEBOOK_SIZE, token_dtype

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "configs/tokenizer/tiny.yaml"
VIT_TOKENIZER = ROOT / "configs/tokenizer/vit_f8.yaml"
PRIOR = ROOT / "configs/prior/tiny.yaml"
# tiny.yaml's quantizer uses the vq-only options: turn them off to try another kind
NOT_VQ = ["model.quantizer.ema=false", "model.quantizer.kmeans_init=false", "model.quantizer.restart_threshold=0",
          "model.quantizer.codebook_size=null"]
LFQ = ["model.quantizer.kind=lfq", *NOT_VQ]


def cli_error(capsys, *argv: str) -> str:
    """Run the CLI, which must exit 2 with exactly one `error:` line (no traceback); returns that line."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def set_error(cls: type, config: Path, override: str, *more: str) -> str:
    """The ConfigError message of loading ``config`` with ``more`` and then ``override`` set; it must blame
    ``override``."""
    with pytest.raises(ConfigError) as info:
        load_config(cls, config, [*more, override])
    message = str(info.value)
    assert message.startswith(f"--set {override}: "), message
    return message


# ----------------------------------------------------------------------------- 1, 2: norm_groups


@pytest.mark.parametrize("value", ["0", "-8"])
def test_norm_groups_must_be_at_least_one(value, tmp_path, capsys):
    err = cli_error(capsys, "train-tokenizer", "--config", TOKENIZER, "--set", f"model.norm_groups={value}",
                    "--out", tmp_path / "run")
    assert err == f"error: --set model.norm_groups={value}: model.norm_groups: must be >= 1, got {value}"
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- 3: tokenizer dropout


@pytest.mark.parametrize("value", ["nan", "inf", "-0.5", "1", "5"])
def test_tokenizer_dropout_must_be_in_zero_one(value):
    message = set_error(TokenizerRunConfig, TOKENIZER, f"model.dropout={value}")
    assert message.endswith(f"model.dropout: must be a finite number in [0, 1), got {float(value)}")
    assert load_config(TokenizerRunConfig, TOKENIZER, ["model.dropout=0.5"]).model.dropout == 0.5


# ----------------------------------------------------------------------------- 4: resolution


@pytest.mark.parametrize("config, more", [(TOKENIZER, ["model.attn_resolutions=[]"]), (VIT_TOKENIZER, [])])
@pytest.mark.parametrize("value", ["0", "-32"])
def test_resolution_must_be_positive(config, more, value, tmp_path, capsys):
    message = set_error(TokenizerRunConfig, config, f"model.resolution={value}", *more)
    assert message.endswith(f"model.resolution: must be >= 1, got {value}")
    args = [a for m in more for a in ("--set", m)]
    err = cli_error(capsys, "train-tokenizer", "--config", config, *args, "--set", f"model.resolution={value}",
                    "--out", tmp_path / "run")
    assert "model.resolution: must be >= 1" in err and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- 5: codebook size


def test_token_dtype_refuses_sizes_it_cannot_hold():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.int32
    assert token_dtype(MAX_CODEBOOK_SIZE) == np.int32 and MAX_CODEBOOK_SIZE - 1 == np.iinfo(np.int32).max
    for bad in (MAX_CODEBOOK_SIZE + 1, 10**12, 0, -1, 2.5, True):
        with pytest.raises(ValueError, match=r"codebook_size must be an integer in 1\.\.2147483648"):
            token_dtype(bad)


def test_codebook_size_is_capped_at_what_a_token_shard_holds(tmp_path, capsys):
    for kind in ("vq", "rvq"):
        more = [] if kind == "vq" else [f"model.quantizer.kind={kind}"]
        message = set_error(TokenizerRunConfig, TOKENIZER, "model.quantizer.codebook_size=1000000000000", *more)
        assert "model.quantizer.codebook_size: " in message and "1000000000000" in message
    err = cli_error(capsys, "train-tokenizer", "--config", TOKENIZER, "--set",
                    "model.quantizer.codebook_size=1000000000000", "--out", tmp_path / "run")
    assert err.startswith("error: --set model.quantizer.codebook_size=1000000000000: "
                          "model.quantizer.codebook_size: must be at most 2147483648")
    # rvq: the prior's vocabulary is rvq_depth x codebook_size unless the codebook is shared
    message = set_error(TokenizerRunConfig, TOKENIZER, "model.quantizer.rvq_depth=4", "model.quantizer.kind=rvq",
                        f"model.quantizer.codebook_size={2**30}")
    assert "model.quantizer.codebook_size: " in message and "4294967296 tokens" in message
    shared = ["model.quantizer.kind=rvq", f"model.quantizer.codebook_size={2**30}", "model.quantizer.rvq_depth=4",
              "model.quantizer.rvq_shared_codebook=true"]
    assert load_config(TokenizerRunConfig, TOKENIZER, shared).model.quantizer.codebook_size == 2**30
    # fsq: the product of the levels
    load_config(TokenizerRunConfig, TOKENIZER, ["model.quantizer.kind=fsq", *NOT_VQ])
    message = set_error(TokenizerRunConfig, TOKENIZER, "model.quantizer.fsq_levels=[100000,100000]",
                        "model.quantizer.kind=fsq", *NOT_VQ)
    assert "model.quantizer.fsq_levels: [100000, 100000] give 10000000000 codes" in message
    # the prior's vocabulary
    with pytest.raises(ConfigError, match=r"^codebook_size: must be at most 2147483648"):
        GPTConfig(codebook_size=MAX_CODEBOOK_SIZE + 1)
    assert QuantizerConfig(codebook_size=MAX_CODEBOOK_SIZE).codebook_size == MAX_CODEBOOK_SIZE  # the limit itself


# ----------------------------------------------------------------------------- 6: NaN / inf floats


TOKENIZER_FLOATS = {  # key -> overrides that make it read
    "model.quantizer.restart_threshold": [], "model.quantizer.entropy_weight": [],
    "model.quantizer.entropy_temperature": [], "model.quantizer.beta": [], "model.quantizer.ema_decay": [],
    "model.quantizer.lfq_temperature": LFQ,
    "model.quantizer.lfq_sample_entropy_weight": LFQ,
    "model.quantizer.lfq_codebook_entropy_weight": LFQ,
    "model.vit_mlp_ratio": [], "model.dropout": [],
    "loss.perceptual_weight": [], "loss.gan_weight": [], "loss.codebook_weight": [],
    "train.lr": [], "train.weight_decay": [], "train.grad_clip": [], "train.min_lr_ratio": [], "train.beta1": [],
    "train.beta2": [], "train.ema_decay": [], "disc_lr_ratio": [],
}


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", sorted(TOKENIZER_FLOATS))
def test_tokenizer_floats_must_be_finite(key, value):
    load_config(TokenizerRunConfig, TOKENIZER, TOKENIZER_FLOATS[key])  # valid without the bad value
    message = set_error(TokenizerRunConfig, TOKENIZER, f"{key}={value}", *TOKENIZER_FLOATS[key])
    said = rf"{re.escape(key)}: must be a finite number.*"
    assert re.search(rf"(?:{said}), got {re.escape(str(float(value)))}$", message), message


def test_vit_mlp_ratio_is_checked_on_a_vit_tokenizer_too():
    message = set_error(TokenizerRunConfig, VIT_TOKENIZER, "model.vit_mlp_ratio=nan")
    assert message.endswith("model.vit_mlp_ratio: must be a finite number > 0, got nan")
    assert "model.vit_mlp_ratio: leaves the MLP no hidden unit" in set_error(
        TokenizerRunConfig, VIT_TOKENIZER, "model.vit_mlp_ratio=0.0001")


@pytest.mark.parametrize("key, value, message", [
    ("restart_threshold", math.nan, "restart_threshold: must be a finite number >= 0, got nan"),
    ("restart_threshold", -0.1, "restart_threshold: must be a finite number >= 0, got -0.1"),
    ("entropy_weight", math.inf, "entropy_weight: must be a finite number >= 0, got inf"),
    ("entropy_temperature", math.nan, "entropy_temperature: must be a finite number > 0, got nan"),
    ("entropy_temperature", 0.0, "entropy_temperature: must be a finite number > 0, got 0.0"),
])
def test_quantizer_floats_built_by_hand(key, value, message):
    """restart_threshold=NaN once turned dead-code restarts off without a word."""
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        QuantizerConfig(**{key: value})
    with pytest.raises(ConfigError, match=f"^{re.escape('model.quantizer.' + message)}$"):
        from_dict(VQModelConfig, {"quantizer": {key: value}}, prefix="model")


@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize("key", ["train.lr", "train.weight_decay", "model.rope_base", "model.norm_eps",
                                 "model.class_dropout", "model.dropout", "model.ffn_dim_multiplier"])
def test_prior_floats_must_be_finite(key, value):
    message = set_error(PriorRunConfig, PRIOR, f"{key}={value}", "tokens=T")
    assert key in message and str(float(value)) in message


# ----------------------------------------------------------------------------- 7: prior model.* keys


def test_prior_model_errors_name_the_dotted_key_and_blame_the_set(tmp_path, capsys):
    err = cli_error(capsys, "train-prior", "--config", PRIOR, "--set", "model.n_head=3", "--tokens", tmp_path / "T",
                    "--out", tmp_path / "run")
    assert err == "error: --set model.n_head=3: model.dim: must be divisible by n_head=3, got 64"
    assert not (tmp_path / "run").exists()
    for override, start in [("model.n_layer=0", "model.n_layer: must be positive, got 0"),
                            ("model.n_kv_head=3", "model.n_kv_head: must divide n_head=2"),
                            ("model.dim=63", "model.dim: must be divisible by n_head=2, got 63")]:
        assert set_error(PriorRunConfig, PRIOR, override, "tokens=T").startswith(f"--set {override}: {start}")
    # from the file: blamed on the file, still with the dotted key
    bad = tmp_path / "prior.yaml"
    bad.write_text(PRIOR.read_text().replace("n_head: 2", "n_head: 3"))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad))}: model\.dim: must be divisible by n_head=3"):
        load_config(PriorRunConfig, bad, ["tokens=T"])
    with pytest.raises(ConfigError, match=r"^model\.dim: must be divisible by n_head=3, got 64$"):
        from_dict(GPTConfig, {"dim": 64, "n_head": 3}, prefix="model")
    with pytest.raises(ConfigError, match=r"^dim: must be divisible by n_head=3, got 64$"):  # built by hand
        GPTConfig(dim=64, n_head=3)


# ----------------------------------------------------------------------------- 8: sample_* keys


@pytest.mark.parametrize("key", ["sample_temperature", "sample_cfg_scale"])
@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_prior_sample_settings_are_checked_when_the_config_is_read(key, value, tmp_path, capsys):
    message = set_error(PriorRunConfig, PRIOR, f"{key}={value}", "tokens=T")
    bounds = "in [0, 10000]" if key == "sample_cfg_scale" else ">= 0"  # the sampler's own guidance bound
    assert message.endswith(f"{key}: must be a finite number {bounds}, got {float(value)}")
    err = cli_error(capsys, "train-prior", "--config", PRIOR, "--set", f"{key}={value}", "--tokens", tmp_path / "T",
                    "--out", tmp_path / "run")
    assert err.startswith(f"error: --set {key}={value}: {key}: must be") and not (tmp_path / "run").exists()
    assert load_config(PriorRunConfig, PRIOR, ["tokens=T", f"{key}=0"])  # 0: greedy / unconditional


def test_the_sample_grids_guidance_scale_is_bounded_as_the_samplers_is():
    """A sample_cfg_scale the sampler refuses used to pass the config and end the run after training,
    with no export."""
    assert set_error(PriorRunConfig, PRIOR, "sample_cfg_scale=20000", "tokens=T").endswith(
        "sample_cfg_scale: must be a finite number in [0, 10000], got 20000.0")
    assert load_config(PriorRunConfig, PRIOR, ["tokens=T", "sample_cfg_scale=10000"])


# ----------------------------------------------------------------------------- 9: duplicate keys


@pytest.mark.parametrize("text, key, lines", [
    ("model:\n  channels: 16\n  norm_groups: 8\n  channels: 32\n", "model.channels", (2, 4)),
    ("train:\n  lr: 1.0e-3\ntrain:\n  steps: 3\n", "train", (1, 3)),
    ("model:\n  quantizer:\n    kind: vq\n    beta: 0.1\n    beta: 0.2\n", "model.quantizer.beta", (4, 5)),
    ("model:\n  channel_mult: [{a: 1, a: 2}]\n", "model.channel_mult[0].a", (2, 2)),
])
def test_duplicate_yaml_keys_are_errors(text, key, lines, tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    expected = f"{path}: duplicate key '{key}' (lines {lines[0]} and {lines[1]})"
    with pytest.raises(ConfigError, match=f"^{re.escape(expected)}"):
        read_yaml(path)
    err = cli_error(capsys, "train-tokenizer", "--config", path, "--out", tmp_path / "run")
    assert err.startswith(f"error: {expected}") and not (tmp_path / "run").exists()


def test_yaml_merge_keys_and_aliases_are_no_duplicates(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("base: &b {x: 1, y: 2}\nm:\n  <<: *b\n  x: 3\nn: *b\n")
    assert read_yaml(path) == {"base": {"x": 1, "y": 2}, "m": {"x": 3, "y": 2}, "n": {"x": 1, "y": 2}}


# ----------------------------------------------------------------------------- 10: encoding, empty file


def test_a_config_that_is_not_utf8_names_the_file(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model:\n  channels: 16  # größe\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: not a UTF-8 text file"):
        read_yaml(path)
    err = cli_error(capsys, "train-tokenizer", "--config", path, "--out", tmp_path / "run")
    assert err.startswith(f"error: {path}: not a UTF-8 text file")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "~\n"])
def test_an_empty_config_file_is_an_error(text, tmp_path, capsys):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: the config file is empty"):
        load_config(PriorRunConfig, path, ["tokens=T"])
    err = cli_error(capsys, "train-tokenizer", "--config", path, "--out", tmp_path / "run")
    assert err.startswith(f"error: {path}: the config file is empty")
    path.write_text("{}\n")  # every default, said so
    assert load_config(PriorRunConfig, path, ["tokens=T"]) == PriorRunConfig(tokens="T")


def test_data_resolution_must_be_a_multiple_of_the_tokenizers_factor():
    """A data.resolution the tokenizer cannot tile used to fail at the first training step, naming no key."""
    from stage1_vq.train import TokenizerRunConfig

    with pytest.raises(ConfigError, match=r"--set data.resolution=33: data.resolution: 33 is not a multiple of the "
                                          r"tokenizer's downsampling factor 4 \(nearest: 32 or 36\)"):
        load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml", ["data.resolution=33"])
    with pytest.raises(ConfigError, match=r"data.resolution: 3 is not a multiple .* \(nearest: 4\)"):
        load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml", ["data.resolution=3"])


@pytest.mark.parametrize("kind", ["fsq", "lfq", "vq"])
@pytest.mark.parametrize("key, value, message", [
    ("ema_decay", 5.0, "ema_decay: must be a finite number in (0, 1), got 5.0"),
    ("kmeans_iters", 0, "kmeans_iters must be >= 1, got 0"),
    ("rvq_depth", -2, "rvq_depth must be >= 1, got -2"),
    ("lfq_dim", 40, "lfq_dim must be in 1..18 (2**lfq_dim codes), got 40"),
    ("lfq_temperature", -1.0, "lfq_temperature: must be a finite number > 0, got -1.0"),
    ("fsq_levels", [8, 1], "fsq_levels must be a non-empty list of integers >= 2, got [8, 1]"),
])
def test_another_kinds_option_out_of_range_is_named_not_ignored(kind, key, value, message):
    """ema_decay=5 with fsq was accepted and ignored: a value no kind could use is a mistake."""
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        QuantizerConfig(kind=kind, **{key: value})
    # in range, another kind's option is ignored, as its default is
    fine = {"ema_decay": 0.5, "kmeans_iters": 3, "rvq_depth": 2, "lfq_dim": 4, "lfq_temperature": 2.0,
            "fsq_levels": [4, 4]}[key]
    QuantizerConfig(kind=kind, **{key: fine})


def test_a_misspelt_section_in_a_set_is_blamed_on_that_set(tmp_path, capsys):
    """The unknown key is the first unknown part of the dotted name ('modle'); the message's list of valid keys
    named 'tokens', so the --tokens that train-prior adds as an override was blamed, or, with no override
    named, the YAML file."""
    err = cli_error(capsys, "train-prior", "--config", PRIOR, "--tokens", tmp_path / "T", "--set", "modle.dim=512",
                    "--out", tmp_path / "run")
    assert err.startswith("error: --set modle.dim=512: unknown config key 'modle'"), err
    err = cli_error(capsys, "train-tokenizer", "--config", TOKENIZER, "--set", "modle.channels=32",
                    "--out", tmp_path / "run")
    assert err.startswith("error: --set modle.channels=32: unknown config key 'modle'"), err
    message = set_error(PriorRunConfig, PRIOR, "model.quantizer.codebok_size=5", "tokens=T")
    assert "unknown config key 'model.quantizer'" in message
    # a key the YAML file holds is still the file's
    bad = tmp_path / "bad.yaml"
    bad.write_text(TOKENIZER.read_text() + "modle:\n  channels: 32\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'modle'"):
        load_config(TokenizerRunConfig, bad, ["model.channels=32"])


def test_a_quantizer_kind_set_against_the_files_options_is_blamed_on_the_set():
    """vit_f8.yaml sets l2_norm; `--set model.quantizer.kind=fsq` was blamed on the file, which is fine alone."""
    vit = ROOT / "configs/tokenizer/vit_f8.yaml"
    assert set_error(TokenizerRunConfig, vit, "model.quantizer.kind=fsq") == (
        "--set model.quantizer.kind=fsq: model.quantizer: l2_norm applies only to kind 'vq' and 'rvq', not kind 'fsq'")
    assert set_error(TokenizerRunConfig, vit, "model.quantizer.kind=lfq", "model.quantizer.l2_norm=false").startswith(
        "--set model.quantizer.kind=lfq:")  # (ema stays on: what blocks it now is the kind)


def test_a_set_value_that_yaml_would_change_is_refused_not_read_as_another_path(tmp_path):
    """`--set "data.source=/data/photos #2"` trained on /data/photos: YAML read ' #2' as a comment."""
    with pytest.raises(ConfigError, match=r"YAML reads the value as '/data/photos' \(' #' starts a comment.*quote it "
                                          r"to keep it as written: --set 'data.source=\"/data/photos #2\"'"):
        load_config(TokenizerRunConfig, TOKENIZER, ["data.source=/data/photos #2"])
    with pytest.raises(ConfigError, match=r"YAML reads the value as None"):
        load_config(TokenizerRunConfig, TOKENIZER, ["data.source=#2"])
    quoted = load_config(TokenizerRunConfig, TOKENIZER, ['data.source="/data/photos #2"'])
    assert quoted.data.source == "/data/photos #2"
    # what YAML reads as written is unchanged: numbers, lists, null, globs, Windows paths
    cfg = load_config(TokenizerRunConfig, TOKENIZER, ["train.lr=3e-4", "model.attn_resolutions=[]",
                                                      "data.source=C:\\data\\*.png"])
    assert (cfg.train.lr, cfg.model.attn_resolutions, cfg.data.source) == (3e-4, [], "C:\\data\\*.png")


@pytest.mark.parametrize("value", [-1, 2**32])
def test_a_seed_out_of_range_names_train_seed(value):
    """accelerate's set_seed refused it as "Seed must be between 0 and 2**32 - 1", naming no key."""
    with pytest.raises(ConfigError, match=rf"train.seed: must be in \[0, 2\*\*32 - 1\] .*got {value}"):
        load_config(PriorRunConfig, ROOT / "configs/prior/tiny.yaml", [f"train.seed={value}"])


def test_mixed_precision_no_as_documented_is_read_as_no(tmp_path):
    """`mixed_precision: no` (the documented value, accelerate's word) is YAML's false: it was refused with
    'expected a string, got False'."""
    from stage2_prior.train import PriorRunConfig

    cfg = load_config(PriorRunConfig, ROOT / "configs/prior/tiny.yaml", ["train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"
    (tmp_path / "c.yaml").write_text("train:\n  mixed_precision: no\n")
    assert load_config(PriorRunConfig, tmp_path / "c.yaml").train.mixed_precision == "no"
    with pytest.raises(ConfigError, match=r"train.lr_schedule: expected a string, got False"):
        load_config(PriorRunConfig, ROOT / "configs/prior/tiny.yaml", ["train.lr_schedule=no"])


@pytest.mark.parametrize("text", ["0123", "010", "0x1F", "12:30", "1_000", "1.50", ".5", "2024-1-1", "2024-01-01",
                                  "2024", "1.5", "+7"])
def test_a_text_key_written_like_a_number_keeps_its_text(text, tmp_path):
    """YAML 1.1 reads 0123 as the octal 83, 0x1F as 31, 12:30 as 750 and 1_000 as 1000, and a text key took
    the number's digits: a folder named 0123 became '83', and a run trained on a folder named 83 if there
    was one. A numeric key still takes the number YAML reads."""
    cfg = load_config(TokenizerRunConfig, TOKENIZER, [f"data.source={text}", f"train.project_name={text}"])
    assert (cfg.data.source, cfg.train.project_name) == (text, text)
    (tmp_path / "c.yaml").write_text(f"data: {{source: {text}, hf_image_column: {text}}}\n")
    assert (load_config(TokenizerRunConfig, tmp_path / "c.yaml").data.hf_image_column) == text
    cfg = load_config(TokenizerRunConfig, TOKENIZER, ["train.steps=1_000", "train.lr=1.50", "model.resolution=0x20",
                                                      "train.seed=017"])
    assert (cfg.train.steps, cfg.train.lr, cfg.model.resolution, cfg.train.seed) == (1000, 1.5, 32, 15)
    assert type(cfg.data.source) is str  # a plain str, so that the run's config.yaml can be written


@pytest.mark.parametrize("key, value, message", [("iterations", -1, "iterations must be >= 0, got -1"),
                                                 ("sample_pixels", 0, "sample_pixels must be >= 1, got 0")])
def test_a_palette_option_out_of_range_names_its_key_once(key, value, message):
    with pytest.raises(ConfigError, match=rf"^--set palette.{key}={value}: palette: {message}$"):
        load_config(TokenizerRunConfig, TOKENIZER, [f"palette.{key}={value}"])  # was 'palette: palette.iterations'
