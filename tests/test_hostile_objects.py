"""The Python objects handled the way a notebook user handles them: class names changed after loading,
a tokenizer edited or left in train mode, dtypes moved, numbers of the wrong kind. Each gives the
result it would give done the plain way, or one error that names the argument."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch

from safetensors.torch import load_file, save_file

from stage1_vq.model import VQModel
from stage2_prior.model import GPT
from stage2_prior.sampling import generate
from vqgpt.ground import checkpoint
from vqgpt.ground.config import ConfigError
from test_pipeline import tiny_prior, tiny_tokenizer
from vqgpt.workflow.pipeline import VQGPTPipeline


@pytest.fixture()
def pipe_dir(tmp_path):
    tok = tiny_tokenizer()
    return VQGPTPipeline(tok, tiny_prior(tok.codebook_size), classes=["a", "b", "c"]).save_pretrained(tmp_path / "p")


def test_a_loaded_pipeline_saves_the_class_names_it_holds_now(pipe_dir, tmp_path):
    pipe = VQGPTPipeline.from_pretrained(pipe_dir)
    pipe.classes = ["x", "y", "z"]
    pipe.save_pretrained(tmp_path / "renamed")
    assert VQGPTPipeline.from_pretrained(tmp_path / "renamed").classes == ["x", "y", "z"]
    # unchanged, the prior export is still copied byte for byte
    VQGPTPipeline.from_pretrained(pipe_dir).save_pretrained(tmp_path / "same")
    assert (tmp_path / "same/prior/config.json").read_bytes() == (pipe_dir / "prior/config.json").read_bytes()


def test_a_loaded_pipeline_with_an_edited_tokenizer_saves_a_folder_that_loads(pipe_dir, tmp_path):
    pipe = VQGPTPipeline.from_pretrained(pipe_dir)
    with torch.no_grad():
        pipe.tokenizer.decoder.conv_out.weight.mul_(1.01)
    pipe.save_pretrained(tmp_path / "edited")  # the prior now names the edited tokenizer it is saved with
    again = VQGPTPipeline.from_pretrained(tmp_path / "edited")
    assert torch.equal(again.tokenizer.decoder.conv_out.weight, pipe.tokenizer.decoder.conv_out.weight)


@pytest.mark.parametrize("names, message", [
    ("abc", "must be a list of class names"), (["a", "b"], "2 class names for a prior of 3 classes"),
    (["a", "a", "b"], "given more than once: \\['a'\\]"), ([0, 1, 2], "must be names"),
])
def test_class_names_are_checked_when_set(pipe_dir, names, message):
    pipe = VQGPTPipeline.from_pretrained(pipe_dir)
    with pytest.raises(ValueError, match=message):
        pipe.classes = names
    with pytest.raises(ValueError, match=message):
        VQGPTPipeline(pipe.tokenizer, pipe.prior, classes=names)
    assert pipe.classes == ["a", "b", "c"]


def test_an_unconditional_prior_takes_no_class_names(pipe_dir):
    """Names for a prior of 0 classes were kept and saved, naming classes no label can ask for."""
    from stage2_prior.model import GPT, GPTConfig

    pipe = VQGPTPipeline.from_pretrained(pipe_dir)
    config = GPTConfig(codebook_size=pipe.prior.config.codebook_size, grid_size=pipe.prior.config.grid_size,
                       num_classes=0, n_layer=1, n_head=2, dim=32, multiple_of=16)
    with pytest.raises(ValueError, match=r"2 class names for an unconditional prior \(num_classes=0\)"):
        VQGPTPipeline(pipe.tokenizer, GPT(config), classes=["cat", "dog"])
    assert VQGPTPipeline(pipe.tokenizer, GPT(config), classes=[]).classes == []


def test_class_names_that_do_not_fit_name_the_file_they_are_read_from(pipe_dir, tmp_path):
    """A prior's config.json edited to hold 2 class names for 3 classes: the error named no file."""
    import json
    import shutil
    copy = tmp_path / "pipe"
    shutil.copytree(pipe_dir, copy)
    config = json.loads((copy / "prior" / "config.json").read_text())
    config["extra"]["classes"] = ["a", "b"]
    (copy / "prior" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"prior/config.json: extra.classes: 2 class names for a prior of 3 classes"):
        VQGPTPipeline.from_pretrained(copy)


def test_a_tokenizer_left_in_train_mode_changes_neither_images_nor_the_global_rng():
    base = tiny_tokenizer()
    tok = VQModel(dataclasses.replace(base.config, dropout=0.3))
    tok.load_state_dict(base.state_dict())
    pipe = VQGPTPipeline(tok, tiny_prior(tok.codebook_size), classes=["a", "b", "c"])
    expected = pipe.generate(2, class_labels="a", seed=1)
    image = expected[0]
    done = pipe.complete(image, 2, keep_rows=1, class_labels="a", seed=2)
    pipe.tokenizer.train()
    state = torch.get_rng_state()
    assert torch.equal(pipe.generate(2, class_labels="a", seed=1), expected)
    assert torch.equal(pipe.complete(image, 2, keep_rows=1, class_labels="a", seed=2), done)
    assert torch.equal(torch.get_rng_state(), state) and pipe.tokenizer.training  # its mode is given back


def test_loading_an_export_leaves_the_global_rng_alone(pipe_dir):
    """from_pretrained built a randomly initialised model before loading the weights over it: the caller's
    torch RNG moved (a notebook's seeded draws changed with each model it loaded)."""
    from stage1_vq.model import VQModel
    from stage2_prior.model import GPT

    loads = (lambda: VQModel.from_pretrained(pipe_dir / "tokenizer"), lambda: GPT.from_pretrained(pipe_dir / "prior"),
             lambda: VQGPTPipeline.from_pretrained(pipe_dir))
    for load in loads:
        state = torch.get_rng_state()
        load()
        assert torch.equal(torch.get_rng_state(), state)


def test_sizes_and_counts_must_be_whole_numbers(pipe_dir):
    pipe = VQGPTPipeline.from_pretrained(pipe_dir)
    for kwargs, name in (({"height": 0}, "height=0"), ({"width": 0}, "width=0")):
        with pytest.raises(ValueError, match=name):
            pipe.generate(1, class_labels="a", **kwargs)  # 0 is no size: it used to mean the trained one
    for count in (2.5, 2.0, np.float64(2.0), True, "2"):
        with pytest.raises(ValueError, match="num_samples must be a whole number"):
            pipe.generate(count, class_labels="a")
        for grid in (None, (4, 6)):  # one level down too (raw TypeErrors of torch before), sliding windows too
            with pytest.raises(ValueError, match="num_samples must be a whole number"):
                generate(pipe.prior, count, class_labels=0, grid_size=grid)
    assert generate(pipe.prior, np.int64(2), class_labels=0).shape[0] == 2
    with pytest.raises(ValueError, match="height must be a whole number"):
        pipe.generate(1, class_labels="a", height=16.0)
    image = pipe.generate(1, class_labels="a", seed=0)[0]
    for kwargs in ({"keep_rows": 2.5}, {"extend_right": 1.5}, {"extend_down": 1.0}):
        with pytest.raises(ValueError, match=f"{next(iter(kwargs))} must be a whole number"):
            pipe.complete(image, 1, class_labels="a", **kwargs)
    assert pipe.generate(np.int64(2), class_labels="a", seed=0).shape[0] == 2  # integer types are fine
    with pytest.raises(ValueError, match="seed must be an integer"):
        pipe.generate(1, class_labels="a", seed=torch.tensor(1.5))  # was read as seed 1
    assert torch.equal(pipe.generate(1, class_labels="a", seed=torch.tensor(1)),
                       pipe.generate(1, class_labels="a", seed=1))


def test_a_tokenizer_checks_its_dtype_and_its_images():
    tok = tiny_tokenizer()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    codes = tok.encode(images)
    assert torch.equal(tok.encode(images.double()), codes)  # other float types are read as float32
    for bad, message in ((images * 127.5 + 127.5, r"expected images in \[-1, 1\], got values"),
                         ((images * 127.5 + 127.5).to(torch.uint8), "expected float images in"),
                         (images.clone().fill_(float("nan")), "NaN or inf")):
        with pytest.raises(ValueError, match=message):
            tok.encode(bad)
    with pytest.raises(ValueError, match="expected integer indices"):
        tok.decode(codes.bool())
    for empty in (codes[:, :0], codes[:, :, :0]):  # a convolution's error from deep in torch said it
        with pytest.raises(ValueError, match="the code grid has no cells"):
            tok.decode(empty)
    tok.double()
    for call in (lambda: tok.encode(images), lambda: tok.decode(codes)):
        with pytest.raises(ValueError, match=r"weights are torch.float64, but it encodes and decodes in float32"):
            call()


def test_numpy_class_names_and_a_tokenizer_cast_before_saving(pipe_dir, tmp_path):
    pipe = VQGPTPipeline.from_pretrained(pipe_dir)
    by_name = pipe.generate(2, class_labels=np.array(["a", "c"]), seed=0)
    assert torch.equal(by_name, pipe.generate(2, class_labels=[0, 2], seed=0))
    tok = tiny_tokenizer().half()
    with pytest.raises(ValueError, match="weights are torch.float16, but it encodes and decodes in float32"):
        tok.save_pretrained(tmp_path / "half")
    assert not (tmp_path / "half").exists()


def test_labels_too_large_for_torch_and_a_dtype_name_given_to_to(pipe_dir):
    pipe = VQGPTPipeline.from_pretrained(pipe_dir)
    with pytest.raises(ValueError, match=r"class_labels must be class indices .*3\)\), got 1180591620717411303424"):
        pipe.generate(1, class_labels=2**70)
    for dtype in ("bfloat16", torch.bfloat16):
        with pytest.raises(ValueError, match="to\\(\\) takes a device, got the dtype torch.bfloat16"):
            pipe.to(dtype)
    assert pipe.to("cpu") is pipe


def _missing_cuda_device() -> str:
    return f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 9}"


def test_a_device_this_machine_lacks_is_named_before_anything_loads(pipe_dir, monkeypatch, capsys):
    import stage1_vq.model
    import stage2_prior.model
    import vqgpt.workflow.pipeline
    from stage2_prior.model import GPT
    from vqgpt.cli import main

    missing = _missing_cuda_device()
    message = f"{missing}: this machine has .*CUDA device"
    calls = []
    for module in (stage1_vq.model, stage2_prior.model, vqgpt.workflow.pipeline):  # nothing may load (or download)
        monkeypatch.setattr(module, "resolve_model_dir", lambda *a, **k: calls.append(a))
    for load in (lambda: VQGPTPipeline.from_pretrained(pipe_dir, map_location=missing),
                 lambda: VQModel.from_pretrained(pipe_dir / "tokenizer", map_location=missing),
                 lambda: GPT.from_pretrained(pipe_dir / "prior", device=missing)):
        with pytest.raises(ValueError, match=message):
            load()
    assert not calls
    monkeypatch.undo()
    pipe = VQGPTPipeline.from_pretrained(pipe_dir)
    for device in (missing, "banana", 3.5):
        with pytest.raises(ValueError, match=message if device == missing else "not a torch device"):
            pipe.to(device)
    # meta was let through, and failed later ("Tensor.item() cannot be called on meta tensors")
    with pytest.raises(ValueError, match="meta: the meta device holds shapes, not numbers"):
        pipe.to("meta")
    with pytest.raises(SystemExit):
        main(["eval-bpd", "--pipeline", str(pipe_dir), "--images", "builtin:mnist", "--device", "meta"])
    assert "the meta device holds shapes" in capsys.readouterr().err
    assert next(pipe.prior.parameters()).device.type == "cpu"
    from vqgpt.workflow.evaluation import eval_tokenizer  # the evaluations, called from Python, the same way

    with pytest.raises(ValueError, match=message):
        eval_tokenizer(pipe_dir / "tokenizer", "builtin:mnist", device=missing)
    with pytest.raises(SystemExit):  # argparse: exit 2 with the same message
        main(["eval-bpd", "--pipeline", str(pipe_dir), "--images", "builtin:mnist", "--device", missing])
    assert f"argument --device: {missing}: this machine has" in capsys.readouterr().err


def _prior_weights(folder):
    return load_file(str(folder / "prior" / "model.safetensors"))


def test_a_loaded_pipeline_saves_the_weights_it_holds_even_when_its_folder_changed_since(pipe_dir, tmp_path):
    pipe = VQGPTPipeline.from_pretrained(pipe_dir)
    held = {k: v.clone() for k, v in pipe.prior.state_dict().items()}
    # a resumed train-prior rewrites RUN/pipeline/prior under a loaded pipeline
    other = tiny_prior(pipe.tokenizer.codebook_size)
    torch.manual_seed(1)
    for p in other.parameters():
        torch.nn.init.normal_(p)
    other.save_pretrained(pipe_dir / "prior", extra={"classes": ["a", "b", "c"]})
    pipe.save_pretrained(tmp_path / "saved")
    saved = _prior_weights(tmp_path / "saved")
    assert all(torch.equal(saved[k], held[k]) for k in saved)
    assert VQGPTPipeline.from_pretrained(tmp_path / "saved").classes == ["a", "b", "c"]
    # the tokenizer replaced on disk, the prior edited in memory: the prior is saved beside the tokenizer it
    # was used with, not beside the new one on disk
    pipe = VQGPTPipeline.from_pretrained(tmp_path / "saved")
    tok = pipe.tokenizer.state_dict()["decoder.conv_out.weight"].clone()
    edited = VQModel.from_pretrained(tmp_path / "saved" / "tokenizer")
    with torch.no_grad():
        edited.decoder.conv_out.weight.mul_(2)
    edited.save_pretrained(tmp_path / "saved" / "tokenizer")
    with torch.no_grad():
        pipe.prior.output.weight.mul_(1.01)
    pipe.save_pretrained(tmp_path / "again")
    again = VQGPTPipeline.from_pretrained(tmp_path / "again")  # the fingerprint check passes
    assert torch.equal(again.tokenizer.decoder.conv_out.weight, tok)
    # and the folder it was loaded from may be gone altogether
    pipe = VQGPTPipeline.from_pretrained(tmp_path / "again")
    shutil.rmtree(tmp_path / "again")
    pipe.save_pretrained(tmp_path / "third")
    assert torch.equal(VQGPTPipeline.from_pretrained(tmp_path / "third").prior.output.weight, pipe.prior.output.weight)


def test_exports_with_nan_or_integer_weights_are_refused_by_name(pipe_dir):
    weights = pipe_dir / "prior" / "model.safetensors"
    state = load_file(str(weights))
    state["output.weight"][0, 0] = float("nan")
    save_file(state, str(weights), metadata={"kind": "gpt_prior"})
    with pytest.raises(ConfigError, match=r"NaN or inf values in model.safetensors: output.weight \(1 of \d+ values"):
        GPT.from_pretrained(pipe_dir / "prior")
    state["output.weight"] = state["output.weight"].nan_to_num().long()
    save_file(state, str(weights), metadata={"kind": "gpt_prior"})
    with pytest.raises(ConfigError, match=r"another kind than the model's: output.weight \(torch.int64"):
        GPT.from_pretrained(pipe_dir / "prior")
    tok_weights = pipe_dir / "tokenizer" / "model.safetensors"
    state = load_file(str(tok_weights))
    state["encoder.conv_in.weight"][0, 0, 0, 0] = float("inf")
    save_file(state, str(tok_weights), metadata={"kind": "vq_tokenizer"})
    with pytest.raises(ConfigError, match="NaN or inf values in model.safetensors: encoder.conv_in.weight"):
        VQModel.from_pretrained(pipe_dir / "tokenizer")


def test_an_export_whose_save_was_killed_between_its_two_files_is_refused(pipe_dir, monkeypatch):
    prior = GPT.from_pretrained(pipe_dir / "prior")
    with torch.no_grad():
        prior.output.weight.mul_(2)
    replace = os.replace

    def killed_before_the_config(src, dst):
        if str(dst).endswith("config.json"):
            raise KeyboardInterrupt  # the process dies here: new weights, the old config.json
        replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", killed_before_the_config)
    with pytest.raises(KeyboardInterrupt):
        prior.save_pretrained(pipe_dir / "prior", extra={"classes": ["x", "y", "z"]})
    monkeypatch.undo()
    with pytest.raises(ConfigError, match=r"prior: a save of this export was interrupted .*config.json.tmp"):
        GPT.from_pretrained(pipe_dir / "prior")
    # killed earlier (both new files still .tmp), the old export is whole and loads; saved again, all is well
    (pipe_dir / "prior" / "model.safetensors.tmp").write_bytes(b"partial")
    assert VQGPTPipeline.from_pretrained(pipe_dir).classes == ["a", "b", "c"]
    prior.save_pretrained(pipe_dir / "prior", extra={"classes": ["x", "y", "z"]})
    assert torch.equal(GPT.from_pretrained(pipe_dir / "prior").output.weight, prior.output.weight)
    assert sorted(p.name for p in (pipe_dir / "prior").iterdir()) == ["config.json", "model.safetensors"]


def test_a_prior_cast_for_decoding_is_not_saved_as_its_export(pipe_dir, tmp_path):
    prior = GPT.from_pretrained(pipe_dir / "prior").to(torch.bfloat16)
    with pytest.raises(ValueError, match="weights are torch.bfloat16 .*save it before casting, or call .float"):
        prior.save_pretrained(tmp_path / "bf16")
    prior.float().save_pretrained(tmp_path / "bf16")  # asked for plainly: the rounded values as float32
    assert GPT.from_pretrained(tmp_path / "bf16").output.weight.dtype == torch.float32


def test_a_prior_export_with_num_classes_null_names_its_file(pipe_dir):
    meta = json.loads((pipe_dir / "prior" / "config.json").read_text())
    meta["config"]["num_classes"] = None
    (pipe_dir / "prior" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"prior/config.json: num_classes: not set"):
        GPT.from_pretrained(pipe_dir / "prior")
