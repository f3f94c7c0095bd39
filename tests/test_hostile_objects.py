"""The Python objects handled the way a notebook user handles them: class names changed after loading,
a tokenizer edited or left in train mode, dtypes moved, numbers of the wrong kind. Each gives the
result it would give done the plain way, or one error that names the argument."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from stage1_vq.model import VQModel
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


def test_sizes_and_counts_must_be_whole_numbers(pipe_dir):
    pipe = VQGPTPipeline.from_pretrained(pipe_dir)
    for kwargs, name in (({"height": 0}, "height=0"), ({"width": 0}, "width=0")):
        with pytest.raises(ValueError, match=name):
            pipe.generate(1, class_labels="a", **kwargs)  # 0 is no size: it used to mean the trained one
    for count in (2.5, 2.0, np.float64(2.0), True, "2"):
        with pytest.raises(ValueError, match="num_samples must be a whole number"):
            pipe.generate(count, class_labels="a")
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
    assert next(pipe.prior.parameters()).device.type == "cpu"
    from vqgpt.workflow.evaluation import eval_tokenizer  # the evaluations, called from Python, the same way

    with pytest.raises(ValueError, match=message):
        eval_tokenizer(pipe_dir / "tokenizer", "builtin:mnist", device=missing)
    with pytest.raises(SystemExit):  # argparse: exit 2 with the same message
        main(["eval-bpd", "--pipeline", str(pipe_dir), "--images", "builtin:mnist", "--device", missing])
    assert f"argument --device: {missing}: this machine has" in capsys.readouterr().err
