from dataclasses import dataclass

import pytest

from vqgpt.ground.config import ConfigError, apply_overrides, config_reference, from_dict, load_config, opt, save_config
from vqgpt.training import TrainConfig, lr_factor


@dataclass
class Inner:
    size: int = opt(4, "a size")
    levels: list[int] = opt([8, 5], "levels")
    name: str | None = opt(None, "optional name")


@dataclass
class Outer:
    inner: Inner = opt(Inner, "inner section")
    lr: float = opt(1e-3, "learning rate")
    flag: bool = opt(False, "a flag")


def test_unknown_key_names_the_dotted_key():
    with pytest.raises(ConfigError, match=r"inner\.sise"):
        from_dict(Outer, {"inner": {"sise": 3}})


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"inner\.size.*integer"):
        from_dict(Outer, {"inner": {"size": "big"}})
    with pytest.raises(ConfigError, match=r"flag"):
        from_dict(Outer, {"flag": "yes"})
    with pytest.raises(ConfigError, match=r"inner\.levels\[1\]"):
        from_dict(Outer, {"inner": {"levels": [8, "x"]}})


def test_overrides_and_yaml_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    save_config(Outer(), path)
    cfg = load_config(Outer, path, ["inner.size=7", "lr=3e-4", "inner.levels=[3,3]", "inner.name=abc"])
    assert cfg.inner.size == 7 and cfg.lr == pytest.approx(3e-4) and cfg.inner.levels == [3, 3]
    assert cfg.inner.name == "abc"
    # int accepted where float is declared, and the defaults of a fresh instance are independent
    assert from_dict(Outer, {"lr": 1}).lr == 1.0
    a, b = Outer(), Outer()
    a.inner.levels.append(1)
    assert b.inner.levels == [8, 5]


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["nokeyvalue"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("inner:\n  size: 3\n  colour: red\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*inner\.colour"):
        load_config(Outer, bad)


def test_config_reference_lists_leaves_with_help():
    rows = {key: (default, help) for key, _, default, help in config_reference(Outer)}
    assert rows["inner.size"] == (4, "a size")
    assert rows["lr"][1] == "learning rate"
    assert "inner" not in rows


def test_train_config_validation_and_schedule():
    with pytest.raises(ConfigError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")
    cfg = TrainConfig(steps=100, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    assert lr_factor(40, cfg) > lr_factor(80, cfg)
    # the run's last step (steps - 1) trains at exactly min_lr_ratio of the peak, short runs too
    assert lr_factor(99, cfg) == pytest.approx(0.1, abs=1e-12) and lr_factor(98, cfg) > 0.1 + 1e-6
    short = TrainConfig(steps=12, warmup_steps=4, lr_schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(11, short) == pytest.approx(0.1, abs=1e-12) and lr_factor(4, short) == 1.0
