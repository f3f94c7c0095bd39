"""Safe loading of pickled checkpoints: weights and harmless training extras load, anything else is
refused with an error naming it, and no code from the file ever runs."""

from __future__ import annotations

import argparse
import os
import sys
import types
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from vqgpt.workflow.importers import strip_wrapper_prefix
from vqgpt.workflow.importers.safe_load import (ALLOWED_GLOBALS, InertObject, UnsafeCheckpointError, find_state_dict,
                                       load_checkpoint)


@contextmanager
def fake_modules(*classes: tuple[str, str, tuple, dict]):
    """Make classes importable under other libraries' names while saving (pickle stores the name only)."""
    created, saved = {}, {}
    for module_name, class_name, bases, body in classes:
        parts = module_name.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in created:
                saved[name] = sys.modules.get(name)
                created[name] = types.ModuleType(name)
        cls = type(class_name, bases, {"__module__": module_name, **body})
        setattr(created[module_name], class_name, cls)
        created[f"{module_name}.{class_name}"] = cls
    sys.modules.update({k: v for k, v in created.items() if isinstance(v, types.ModuleType)})
    try:
        yield {k: v for k, v in created.items() if isinstance(v, type)}
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _touch(path):
    def setstate(self, state):
        open(path, "w").close()
    return setstate


def test_plain_state_dict_loads_memory_mapped_and_legacy(tmp_path, monkeypatch):
    weights = {"a.weight": torch.randn(3, 4), "b": torch.arange(5)}
    torch.save(weights, tmp_path / "new.pt")
    torch.save(weights, tmp_path / "old.pt", _use_new_zipfile_serialization=False)  # cannot be mmapped
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    for name in ("new.pt", "old.pt"):
        loaded = load_checkpoint(tmp_path / name)
        assert set(loaded) == set(weights) and all(torch.equal(loaded[k], weights[k]) for k in weights)
    assert [(c["weights_only"], c["mmap"]) for c in calls] == [(True, True), (True, False)]


def test_safetensors_input(tmp_path):
    from safetensors.torch import save_file

    weights = {"w": torch.randn(2, 2)}
    save_file(weights, str(tmp_path / "m.safetensors"))
    assert torch.equal(load_checkpoint(tmp_path / "m.safetensors")["w"], weights["w"])


def test_lightning_and_llamagen_extras_load_inert(tmp_path):
    """A Lightning checkpoint's callback class key and omegaconf hyper-parameters, numpy scalars and
    LlamaGen's argparse args load; the stand-ins never run the real classes' code."""
    marker = tmp_path / "callback_code_ran"
    callback_cls = "pytorch_lightning.callbacks.model_checkpoint"
    with fake_modules((callback_cls, "ModelCheckpoint", (), {"__setstate__": _touch(marker)}),
                      ("omegaconf.dictconfig", "DictConfig", (), {"__setstate__": _touch(marker)}),
                      ("pytorch_lightning.utilities.parsing", "AttributeDict", (dict,), {})) as fakes:
        ModelCheckpoint = fakes[f"{callback_cls}.ModelCheckpoint"]
        DictConfig = fakes["omegaconf.dictconfig.DictConfig"]
        AttributeDict = fakes["pytorch_lightning.utilities.parsing.AttributeDict"]
        hparams = DictConfig()
        hparams.__dict__.update(_content={"n_embed": 16}, _parent=None)
        torch.save({"state_dict": {"w": torch.ones(2)},
                    "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.5), "dirpath": "ckpts"}},
                    "hyper_parameters": hparams, "hparams_plain": AttributeDict(lr=1e-4),
                    "score": np.float64(1.5), "history": np.zeros(3),
                    "args": argparse.Namespace(image_size=256, vq_model="VQ-16")}, tmp_path / "last.ckpt")
    assert not any(name.startswith(("pytorch_lightning", "omegaconf")) for name in sys.modules)

    ckpt = load_checkpoint(tmp_path / "last.ckpt")
    assert torch.equal(ckpt["state_dict"]["w"], torch.ones(2))
    (key, state), = ckpt["callbacks"].items()
    assert issubclass(key, InertObject) and key.source_name == f"{callback_cls}.ModelCheckpoint"
    assert torch.equal(state["best_model_score"], torch.tensor(0.5))
    assert isinstance(ckpt["hyper_parameters"], InertObject)
    assert ckpt["hyper_parameters"].state["_content"] == {"n_embed": 16}
    assert ckpt["hparams_plain"] == {"lr": 1e-4} and type(ckpt["hparams_plain"]) is dict
    assert isinstance(ckpt["score"], InertObject)
    assert ckpt["args"].image_size == 256 and isinstance(ckpt["args"], argparse.Namespace)
    assert not marker.exists()
    assert not any(name.startswith(("pytorch_lightning", "omegaconf")) for name in sys.modules)


class SystemCall:
    """Unpickling this would run a shell command."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class Payload:
    """An importable class whose unpickling (__setstate__) would create a file."""

    def __init__(self, path):
        self.path = str(path)

    def __setstate__(self, state):
        open(state["path"], "w").close()


def test_malicious_reduce_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {"w": torch.ones(1)}, "x": SystemCall(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(tmp_path / "evil.pt")
    assert info.value.name == f"{os.system.__module__}.system"  # posix.system
    assert f"'{os.system.__module__}.system'" in str(info.value) and "nothing was executed" in str(info.value)
    assert "weights_only` set to `False`" not in str(info.value)  # never advise the unsafe path
    assert not marker.exists()


@pytest.mark.parametrize("zipfile_format", [True, False])
def test_unlisted_class_is_refused_by_name(tmp_path, zipfile_format):
    marker = tmp_path / "pwned"
    torch.save({"x": Payload(marker)}, tmp_path / "evil.pt", _use_new_zipfile_serialization=zipfile_format)
    with pytest.raises(UnsafeCheckpointError, match=f"'{Payload.__module__}.Payload'"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_builtin_eval_is_refused(tmp_path):
    class Eval:
        def __reduce__(self):
            return (eval, ("1 + 1",))

    torch.save([Eval()], tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="'builtins.eval'"):
        load_checkpoint(tmp_path / "evil.pt")


def test_allowlist_is_limited_to_known_harmless_names():
    modules = {name.split(".")[0] for name in ALLOWED_GLOBALS}
    assert modules <= {"pytorch_lightning", "lightning", "lightning_fabric", "omegaconf", "typing", "numpy", "pathlib",
                       "argparse", "collections", "builtins"}
    dangerous = {"builtins.eval", "builtins.exec", "builtins.getattr", "os.system", "posix.system"}
    assert not dangerous & set(ALLOWED_GLOBALS)


def test_find_state_dict_order_and_errors(tmp_path):
    a, b = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
    ckpt = {"model": a, "ema": b, "steps": 3}
    assert find_state_dict(ckpt, ["ema", "model"], "f.pt") == (b, "ema")
    assert find_state_dict(ckpt, ["model", "ema"], "f.pt") == (a, "model")
    assert find_state_dict(ckpt, ["model"], "f.pt", weights="ema") == (b, "ema")
    assert find_state_dict(a, ["model"], "f.pt") == (a, "<whole file>")
    with pytest.raises(ValueError, match=r"f.pt: no entry 'state_dict' \(entries holding weights: \['model', 'ema'\]"):
        find_state_dict(ckpt, ["model"], "f.pt", weights="state_dict")
    with pytest.raises(ValueError, match=r"no model weights found.*\['steps'\]"):
        find_state_dict({"steps": 3}, ["model"], "f.pt")
    assert list(strip_wrapper_prefix({"module._orig_mod.w": 1, "module._orig_mod.b": 2})) == ["w", "b"]
    assert list(strip_wrapper_prefix({"module.w": 1, "b": 2})) == ["module.w", "b"]


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: not a readable PyTorch checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
