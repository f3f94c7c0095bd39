"""The Python API and a few CLI corners as a careless user meets them: saving a pipeline whose weights
changed since it was loaded, images in the wrong range or type, odd seeds, an import over an export,
a grid under accelerate launch, export file permissions."""

from __future__ import annotations

import stat

import numpy as np
import pytest
import torch

from stage2_prior.model import GPT
from test_pipeline import tiny_prior, tiny_tokenizer
from vqgpt.cli.commands import main
from vqgpt.workflow.pipeline import VQGPTPipeline


@pytest.fixture()
def pipe_dir(tmp_path):
    tok = tiny_tokenizer()
    return VQGPTPipeline(tok, tiny_prior(tok.codebook_size), classes=["a", "b", "c"]).save_pretrained(tmp_path / "p")


def _weights(folder) -> bytes:
    return (folder / "model.safetensors").read_bytes()


def test_save_pretrained_writes_the_weights_as_they_are_now(pipe_dir, tmp_path):
    pipe = VQGPTPipeline.from_pretrained(pipe_dir)
    pipe.save_pretrained(tmp_path / "same")  # unchanged: the exports are copied byte for byte
    assert _weights(tmp_path / "same" / "prior") == _weights(pipe_dir / "prior")
    with torch.no_grad():
        pipe.prior.tok_embeddings.weight.mul_(0.0)  # edited (or trained) in place since it was loaded
    pipe.save_pretrained(tmp_path / "edited")
    again = VQGPTPipeline.from_pretrained(tmp_path / "edited")
    assert torch.equal(again.prior.tok_embeddings.weight, torch.zeros_like(pipe.prior.tok_embeddings.weight))
    assert again.classes == ["a", "b", "c"]
    assert _weights(tmp_path / "edited" / "tokenizer") == _weights(pipe_dir / "tokenizer")  # untouched part: copied
    with pytest.raises(ValueError, match="int8 weights"):
        VQGPTPipeline.from_pretrained(pipe_dir).set_decoding("int8").save_pretrained(tmp_path / "int8")
    with pytest.raises(ValueError, match="int8 weights"):
        VQGPTPipeline.from_pretrained(pipe_dir).set_decoding("int8").prior.save_pretrained(tmp_path / "int8")
    assert not (tmp_path / "int8").exists()


def test_complete_refuses_images_it_would_encode_as_some_other_image(pipe_dir):
    pipe = VQGPTPipeline.from_pretrained(pipe_dir)
    image = torch.rand(3, 16, 16) * 2 - 1
    assert pipe.complete(image, 1, keep_rows=2, class_labels=0, seed=0).shape == (1, 3, 16, 16)
    for bad, message in [((image + 1) * 127.5, r"values in \[-1, 1\], got .*x.float\(\) / 127.5 - 1"),
                         (((image + 1) * 127.5).to(torch.uint8), "got torch.uint8"),
                         (image * float("nan"), "NaN"),
                         (image[:1], r"RGB image \(3, H, W\)"),
                         (image[None], r"RGB image \(3, H, W\)"),
                         (image.numpy(), "image tensor")]:
        with pytest.raises(ValueError, match=message):
            pipe.complete(bad, 1, keep_rows=2, class_labels=0, seed=0)
    with pytest.raises(ValueError, match="takes a device"):
        pipe.to(torch.float64)


def test_seeds_of_any_integer_type(pipe_dir):
    pipe = VQGPTPipeline.from_pretrained(pipe_dir)
    a = pipe.generate(1, class_labels=0, seed=np.int64(3))
    assert torch.equal(a, pipe.generate(1, class_labels=0, seed=3))
    with pytest.raises(ValueError, match=r"seed must be between"):
        pipe.generate(1, class_labels=0, seed=2**64)
    with pytest.raises(ValueError, match="seed must be an integer"):
        pipe.generate(1, class_labels=0, seed=1.5)


def test_import_refuses_to_write_over_an_export(pipe_dir, tmp_path, capsys):
    argv = ["import", "llamagen-vq", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(pipe_dir / "tokenizer")]
    assert main(argv) == 2
    assert "is not empty: pass --overwrite" in capsys.readouterr().err
    assert main([*argv[:-1], str(pipe_dir / "tokenizer" / "config.json")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_one_grid_is_not_drawn_by_every_launched_process(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["sample", "--pipeline", str(tmp_path / "p"), "--class-label", "0", "--out", str(tmp_path / "g.png")]) == 2
    assert "drawn by one process" in capsys.readouterr().err


def test_exported_weights_are_as_readable_as_their_config(tmp_path):
    tiny_prior(256).save_pretrained(tmp_path / "prior")
    mode = stat.S_IMODE((tmp_path / "prior" / "model.safetensors").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "prior" / "config.json").stat().st_mode)
    assert isinstance(GPT.from_pretrained(tmp_path / "prior"), GPT)


def test_class_labels_of_the_wrong_shape_say_so(pipe_dir):
    pipe = VQGPTPipeline.from_pretrained(pipe_dir)
    with pytest.raises(ValueError, match="have 2 entries, got 0"):  # not "got torch.float32" for []
        pipe.labels_tensor([], 2)
    with pytest.raises(ValueError, match=r"flat sequence of them, got shape \(2, 1\)"):
        pipe.labels_tensor(torch.tensor([[1], [2]]), 2)
    assert pipe.labels_tensor(torch.tensor([1, 2]), 2).tolist() == [1, 2]


def test_an_interrupted_demo_says_how_to_continue(monkeypatch, capsys):
    import vqgpt.cli.demo as demo

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_demo", interrupted)
    assert main(["demo", "--out", "unused"]) == 130
    assert "run the same vqgpt demo command again" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_eval_num_counts_readable_images_like_reconstruct(pipe_dir, tmp_path):
    """--num N of fid-stats and eval-bpd means N readable images: a file that fails to decode is
    replaced by the next readable one, not counted against N."""
    from PIL import Image

    from vqgpt.ground.data import UnreadableImageWarning
    from vqgpt.workflow.evaluation import eval_bits_per_dim, fid_stats

    source = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (source / label).mkdir(parents=True)
        (source / label / "0-text.png").write_text("not an image\n")  # first of its class folder
        for k in range(1, 4):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(source / label / f"{k}.png")
    for num in (2, 3):
        with pytest.warns(UnreadableImageWarning, match="left out 1 image that failed to decode: .*0-text.png"):
            report = fid_stats(str(source), tmp_path / f"ref{num}.npz", fid_weights="random", resolution=16,
                               split="train", num_images=num, batch_size=2, device="cpu", progress=False)
        assert report.num_images == num
        with pytest.warns(UnreadableImageWarning, match="left out 1 image"):
            bpd = eval_bits_per_dim(pipe_dir, str(source), split="train", num_images=num, batch_size=2,
                                    device="cpu", progress=False)
        assert bpd.num_images == num
    with pytest.warns(UnreadableImageWarning, match="left out 2 images"):
        assert eval_bits_per_dim(pipe_dir, str(source), split="train", batch_size=4, device="cpu",
                                 progress=False).num_images == 6


def test_eval_bpd_takes_the_image_folders_classes_by_exact_name(pipe_dir, tmp_path, monkeypatch):
    """Folders '0' and 'index:1' were read as typed labels are (indices 0 and 1, i.e. classes a and b) and
    scored as those classes without a word."""
    from PIL import Image

    import vqgpt.workflow.evaluation as evaluation

    def folder(name: str, classes: tuple[str, ...]):
        for label in classes:
            (tmp_path / name / label).mkdir(parents=True)
            Image.new("RGB", (16, 16), (20, 90, 200)).save(tmp_path / name / label / "x.png")
        return str(tmp_path / name)

    with pytest.raises(ValueError, match=r"classes \['0', 'index:1'\] are not among this prior's classes"):
        evaluation.eval_bits_per_dim(pipe_dir, folder("typed", ("0", "index:1")), split="train", device="cpu",
                                     progress=False)
    seen = []
    from stage2_prior.model import GPT

    forward = GPT.forward
    monkeypatch.setattr(GPT, "forward", lambda self, codes, labels=None, *a, **k: seen.append(labels.tolist())
                        or forward(self, codes, labels, *a, **k))
    evaluation.eval_bits_per_dim(pipe_dir, folder("named", ("a", "c")), split="train", device="cpu", progress=False)
    assert sorted(label for batch in seen for label in batch) == [0, 2]  # a and c, by name


def test_complete_with_every_row_kept_and_nothing_added_is_refused(pipe_dir, tmp_path, capsys):
    from PIL import Image

    pipe = VQGPTPipeline.from_pretrained(pipe_dir)
    image = torch.rand(3, 16, 16) * 2 - 1  # 4x4 codes
    for keep in (None, 4):
        with pytest.raises(ValueError, match="nothing to sample: keep fewer than all 4 code rows"):
            pipe.complete(image, 2, keep_rows=keep, class_labels=0, seed=0)
    assert pipe.complete(image, 1, keep_rows=None, extend_right=1, class_labels=0, seed=0).shape == (1, 3, 16, 20)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "i.png")
    assert main(["complete", "--pipeline", str(pipe_dir), "--image", str(tmp_path / "i.png"), "--keep-rows", "4",
                 "--num", "2", "--class-label", "a", "--out", str(tmp_path / "c.png")]) == 2
    assert "nothing to sample" in capsys.readouterr().err and not (tmp_path / "c.png").exists()


@pytest.mark.parametrize("key, value, message", [
    ("rope_base", 0, "finite number > 0"), ("rope_base", float("nan"), "finite number > 0"),
    ("norm_eps", -1.0, "finite number >= 0"), ("norm_eps", float("nan"), "finite number >= 0"),
    ("ffn_dim_multiplier", 0, "finite number > 0"), ("ffn_dim_multiplier", -1, "finite number > 0"),
    ("ffn_dim_multiplier", float("nan"), "finite number > 0"), ("ffn_dim_multiplier", 1e-9, "no hidden unit"),
])
def test_prior_config_values_that_break_the_model_are_config_errors(pipe_dir, key, value, message):
    """Refused where they are read (a config, --set, an export's config.json), not as a non-finite loss
    at step 1, a ZeroDivisionError in the model, or logits of NaN from a loaded export."""
    import json

    from stage2_prior.config import GPTConfig
    from vqgpt.ground.config import ConfigError

    with pytest.raises(ConfigError, match=f"{key}: must be|{key}: leaves"):
        GPTConfig(**{key: value})
    with pytest.raises(ConfigError, match=message):
        GPTConfig(**{key: value})
    config_file = pipe_dir / "prior" / "config.json"
    config = json.loads(config_file.read_text())
    config["config"][key] = value
    config_file.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=key):
        VQGPTPipeline.from_pretrained(pipe_dir)


def test_save_pretrained_refuses_a_prior_rounded_to_bfloat16(pipe_dir, tmp_path):
    pipe = VQGPTPipeline.from_pretrained(pipe_dir).set_decoding("bfloat16")
    with pytest.raises(ValueError, match=r"torch.bfloat16 weights \(set_decoding\), rounded from its float32"):
        pipe.save_pretrained(tmp_path / "bf16")
    assert not (tmp_path / "bf16").exists()
    pipe.set_decoding("float32")  # back to float32, but the rounding stays: still refused, the export is whole
    with pytest.raises(ValueError, match=r"bfloat16 \(now float32 again\) weights .* load it again"):
        pipe.save_pretrained(tmp_path / "fp32")
    assert not (tmp_path / "fp32").exists()
    again = VQGPTPipeline.from_pretrained(pipe_dir)  # loaded again: float32 weights as exported, saved as they are
    again.save_pretrained(tmp_path / "fp32")
    saved, exported = tmp_path / "fp32/prior/model.safetensors", pipe_dir / "prior/model.safetensors"
    assert saved.read_bytes() == exported.read_bytes()


def test_a_run_folder_or_an_export_given_as_a_pipeline_says_what_to_give(pipe_dir, tmp_path, capsys):
    import shutil

    run = tmp_path / "prior_run"  # what train-prior --tokenizer writes: export/ and pipeline/
    shutil.copytree(pipe_dir / "prior", run / "export")
    shutil.copytree(pipe_dir, run / "pipeline")
    with pytest.raises(FileNotFoundError, match=f"looks like a prior's run folder: use {run / 'pipeline'}"):
        VQGPTPipeline.from_pretrained(run)
    for part, kind in (("tokenizer", "a tokenizer export"), ("prior", "a prior export")):
        assert main(["sample", "--pipeline", str(pipe_dir / part), "--num", "1", "--class-label", "a",
                     "--out", str(tmp_path / "s.png")]) == 2
        assert f"it is {kind}: give the RUN/pipeline/ that train-prior --tokenizer writes, or join" in \
            capsys.readouterr().err
    # eval-bpd takes --pipeline only: the advice it gets (join the two) works for it
    assert main(["eval-bpd", "--pipeline", str(pipe_dir / "prior"), "--images", str(tmp_path)]) == 2
    assert "VQGPTPipeline.from_parts(TOKENIZER, PRIOR).save_pretrained(DIR)" in capsys.readouterr().err
    VQGPTPipeline.from_parts(pipe_dir / "tokenizer", pipe_dir / "prior").save_pretrained(tmp_path / "joined")
    assert VQGPTPipeline.from_pretrained(tmp_path / "joined").classes == VQGPTPipeline.from_pretrained(pipe_dir).classes
    with pytest.raises(FileNotFoundError, match=r"tokenizer/ is missing \(a pipeline folder holds tokenizer/ and "
                                                r"prior/ exports\)$"):
        VQGPTPipeline.from_pretrained(tmp_path)  # nothing more to say about an unrelated folder


def test_a_pipeline_or_a_missing_folder_given_as_tokenizer_says_what_it_is(pipe_dir, tmp_path, capsys):
    """encode said 'config.json is missing' of a folder that does not exist, and every command said only that
    of a pipeline folder given as --tokenizer (the reverse mistake got a hint)."""
    images = tmp_path / "imgs"
    images.mkdir()
    assert main(["encode", "--tokenizer", str(tmp_path / "nope"), "--data", str(images), "--out",
                 str(tmp_path / "c")]) == 2
    assert f"{tmp_path / 'nope'}: no such folder" in capsys.readouterr().err
    assert main(["encode", "--tokenizer", str(pipe_dir), "--data", str(images), "--out", str(tmp_path / "c")]) == 2
    assert f"it is a pipeline folder: give its tokenizer/ ({pipe_dir / 'tokenizer'})" in capsys.readouterr().err
    assert main(["reconstruct", "--tokenizer", str(pipe_dir), "--images", str(images), "--out",
                 str(tmp_path / "r")]) == 2
    assert f"it is a pipeline folder: give its tokenizer/ ({pipe_dir / 'tokenizer'})" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_fid_stats_output_paths_are_checked_first_and_written_whole(tmp_path, monkeypatch, capsys):
    import vqgpt.ground.fid as fid
    import vqgpt.workflow.evaluation as evaluation

    args = ["fid-stats", "--images", "builtin:mnist", "--split", "eval", "--num", "8", "--resolution", "16",
            "--fid-weights", "random"]
    (tmp_path / "folder.npz").mkdir()
    (tmp_path / "afile").write_text("x")
    computed = []
    monkeypatch.setattr(evaluation, "stream_stats", lambda *a, **k: computed.append(1))  # must not be reached
    for out, message in ((tmp_path / "folder.npz", "is a folder, not a file: give a file path ending in .npz"),
                         (tmp_path / "afile" / "ref.npz", "afile is a file, not a folder")):
        assert main([*args, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert not computed
    monkeypatch.undo()
    good = tmp_path / "ref.npz"
    assert main([*args, "--out", str(good)]) == 0
    before = good.read_bytes()

    def killed_while_writing(file, **arrays):
        file.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(fid.np, "savez", killed_while_writing)
    assert main([*args, "--out", str(good)]) == 130
    assert good.read_bytes() == before  # the earlier statistics are intact


def test_unwritable_paths_are_user_errors_not_tracebacks():
    import errno

    from vqgpt.cli.commands import _exit_code

    for exc in (PermissionError(errno.EACCES, "Permission denied", "ro/x.png"),
                IsADirectoryError(errno.EISDIR, "Is a directory", "d.npz"),
                OSError(errno.ENOSPC, "No space left on device")):
        assert _exit_code(exc) == 2
    assert _exit_code(OSError(errno.EIO, "Input/output error")) is None  # not the user's to fix


@pytest.mark.parametrize("compile", [False, True])
def test_weights_edited_through_data_are_the_weights_sampled_with(pipe_dir, tmp_path, compile):
    """p.data.mul_() / .copy_() (a hand-written EMA, weight surgery) bumps no version counter: the
    prepared few-row copies and the frozen compiled step must notice the edit anyway."""
    pipe = VQGPTPipeline.from_pretrained(pipe_dir).set_decoding(compile=compile)
    before = pipe.generate(2, class_labels=1, seed=0)
    torch.manual_seed(1)
    for p in pipe.prior.parameters():
        if p.dim() == 2:
            p.data.copy_(torch.randn_like(p))
    edited = pipe.generate(2, class_labels=1, seed=0)
    pipe.save_pretrained(tmp_path / "edited")
    fresh = VQGPTPipeline.from_pretrained(tmp_path / "edited").set_decoding(compile=compile)
    assert not torch.equal(edited, before)
    assert torch.equal(edited, fresh.generate(2, class_labels=1, seed=0))
    completed = pipe.complete(before[0], 1, keep_rows=2, class_labels=1, seed=0)  # the other sampler
    assert torch.equal(completed, fresh.complete(before[0], 1, keep_rows=2, class_labels=1, seed=0))


def test_an_edit_through_data_after_a_forward_without_gradients_is_noticed(pipe_dir):
    """The copies were checked against a fingerprint taken at the previous sampling call only: made by a
    forward without gradients (a validation loss) and then swapped through .data (an EMA's copy_to), the
    weights went on being sampled from the old copies, on every later call; a forward itself too."""
    import copy

    pipe = VQGPTPipeline.from_pretrained(pipe_dir)
    other = copy.deepcopy(pipe.prior)
    torch.manual_seed(1)
    for p in other.parameters():
        if p.dim() == 2:
            p.data.copy_(torch.randn_like(p))
    tokens, labels = torch.zeros(2, 5, dtype=torch.long), torch.tensor([0, 1])
    with torch.no_grad():
        pipe.prior(tokens, labels)  # few rows: the prepared copies are made here
        for p, q in zip(pipe.prior.parameters(), other.parameters()):
            p.data.copy_(q.data)
        assert torch.equal(pipe.prior(tokens, labels), other(tokens, labels))
    swapped = VQGPTPipeline(pipe.tokenizer, other, classes=pipe.classes)
    for _ in range(2):
        assert torch.equal(pipe.generate(2, class_labels=1, seed=0), swapped.generate(2, class_labels=1, seed=0))


def test_save_pretrained_after_an_edit_through_data_writes_the_edited_weights(pipe_dir, tmp_path):
    pipe = VQGPTPipeline.from_pretrained(pipe_dir)
    pipe.prior.tok_embeddings.weight.data.mul_(0.0)  # no sampling in between to notice it
    pipe.tokenizer.quantize.embedding.weight.data.add_(1.0)
    pipe.save_pretrained(tmp_path / "edited")
    again = VQGPTPipeline.from_pretrained(tmp_path / "edited")
    assert torch.equal(again.prior.tok_embeddings.weight, pipe.prior.tok_embeddings.weight)
    assert torch.equal(again.tokenizer.quantize.embedding.weight, pipe.tokenizer.quantize.embedding.weight)


def test_keep_rows_out_of_range_names_the_flag_and_the_image_size(pipe_dir):
    pipe = VQGPTPipeline.from_pretrained(pipe_dir)
    image = torch.rand(3, 16, 16) * 2 - 1  # 4x4 codes
    with pytest.raises(ValueError, match=r"keep_rows \(--keep-rows\) must be between 0 and 4, the code rows of the "
                                         r"16x16 px image completed, got 5"):
        pipe.complete(image, 1, keep_rows=5, class_labels=0, seed=0)
