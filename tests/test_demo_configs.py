"""The demo's configs in code and the YAML files users copy must not drift apart."""

from pathlib import Path

import pytest

from stage1_vq.train import TokenizerRunConfig
from stage2_prior.train import PriorRunConfig
from vqgpt.ground.config import load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]


def test_demo_configs_equal_the_yaml_files():
    from vqgpt.cli.demo import demo_prior_config, demo_tokenizer_config

    assert to_dict(load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/cpu_demo.yaml")) == to_dict(demo_tokenizer_config())
    assert to_dict(load_config(PriorRunConfig, ROOT / "configs/prior/cpu_demo.yaml")) == to_dict(demo_prior_config())


@pytest.mark.parametrize("path", sorted((ROOT / "configs/tokenizer").glob("*.yaml")), ids=lambda p: p.name)
def test_tokenizer_configs_load(path):
    cfg = load_config(TokenizerRunConfig, path)
    assert cfg.model.resolution % cfg.model.downsample_factor == 0


@pytest.mark.parametrize("path", sorted((ROOT / "configs/prior").glob("*.yaml")), ids=lambda p: p.name)
def test_prior_configs_load(path):
    load_config(PriorRunConfig, path)
