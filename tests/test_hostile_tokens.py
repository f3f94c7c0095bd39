"""Token folders edited or broken by hand: each gives one error naming meta.json (or the shard file) and
the key, before a prior run starts, never a traceback or a run that fails after its last step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dist_check import make_token_shards
from stage2_prior.train import train_prior
from test_run_integrity import prior_config
from vqgpt.cli import main
from vqgpt.ground.tokens import TokenDataset, TokenShardError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    return make_token_shards(tmp_path_factory.mktemp("tokens") / "tokens", n=16)


def _copy(clean: Path, tmp_path: Path, edit=None) -> Path:
    folder = tmp_path / "t"
    shutil.copytree(clean, folder)
    if edit is not None:
        meta = json.loads((folder / "meta.json").read_text())
        edit(meta)
        (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_an_empty_shard_file_is_named(clean, tmp_path):
    folder = _copy(clean, tmp_path)
    first = json.loads((folder / "meta.json").read_text())["shards"][0]
    (folder / first["tokens"]).write_bytes(b"")  # EOFError from numpy, a traceback before
    with pytest.raises(TokenShardError, match=f"cannot read shard .*{first['tokens']}"):
        TokenDataset(folder)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(dtype="foo"), "dtype 'foo' is no numpy type"),
    (lambda m: m.update(dtype="float32"), "dtype float32 cannot hold codebook_size"),
    (lambda m: m.update(codebook_size=70000), "dtype uint16 cannot hold codebook_size 70000"),
    (lambda m: m.update(grid_size="4x4"), "grid_size must be two whole numbers"),
    (lambda m: m.update(num_classes="x"), "num_classes must be a whole number >= 0, got 'x'"),
    (lambda m: m.update(codebook_size=None), "codebook_size must be a whole number >= 1"),
    (lambda m: m.update(shards=None), "shards must be a list of"),
    (lambda m: m["shards"][0].pop("labels"), "shards must be a list of"),
    (lambda m: m["shards"][0].update(tokens="../other/tokens-00000.npy"), "shard file .* is no file name in this"),
    (lambda m: m.update(classes=["a", "b", "c", "d", "e"]), "5 class names but num_classes 4"),
])
def test_a_hand_edited_meta_json_is_named_with_its_key(clean, tmp_path, edit, message):
    folder = _copy(clean, tmp_path, edit)
    with pytest.raises(TokenShardError, match=f"meta.json: {message}"):
        TokenDataset(folder)
    run = tmp_path / "run"
    assert main(["train-prior", "--config", str(Path(__file__).resolve().parents[1] / "configs/prior/tiny.yaml"),
                 "--tokens", str(folder), "--out", str(run)]) == 2
    assert not run.exists()  # refused before the run folder is made


def test_a_token_folder_without_grids_is_refused_before_the_run_folder(clean, tmp_path):
    folder = _copy(clean, tmp_path, lambda m: m.update(shards=[], count=0))
    with pytest.raises(TokenShardError, match="hold no grids"):
        train_prior(prior_config(folder), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_train_prior_refuses_a_tokenizer_of_another_vocabulary_before_training(clean, tmp_path):
    from stage1_vq.model import VQModel
    from test_pipeline import tiny_tokenizer
    from vqgpt.workflow.chain import train_prior_with_tokenizer

    tok = tiny_tokenizer()  # 256 codes; the shards hold 32
    assert isinstance(tok, VQModel) and tok.codebook_size != 32
    tok.save_pretrained(tmp_path / "tok")
    with pytest.raises(TokenShardError, match=r"meta.json: the shards' codebook_size is 32, but the tokenizer .* has "
                                              r"256 codes"):
        train_prior_with_tokenizer(prior_config(clean), tmp_path / "run", tmp_path / "tok")
    assert not (tmp_path / "run").exists()


def test_a_shard_swapped_in_from_another_encode_is_named(clean, tmp_path):
    # same tokenizer fingerprint, shape, dtype and count: only the codes differ (another seed)
    other = make_token_shards(tmp_path / "other", n=16, seed=1)
    folder = _copy(clean, tmp_path)
    second = json.loads((folder / "meta.json").read_text())["shards"][1]
    shutil.copy(other / second["tokens"], folder / second["tokens"])
    with pytest.raises(TokenShardError, match=f"{second['tokens']} / {second['labels']}: the codes or labels differ "
                                              f"from those written by the encode"):
        TokenDataset(folder)
    run = tmp_path / "run"
    assert main(["train-prior", "--config", str(Path(__file__).resolve().parents[1] / "configs/prior/tiny.yaml"),
                 "--tokens", str(folder), "--out", str(run)]) == 2
    assert not run.exists()


def test_labels_edited_in_range_are_named(clean, tmp_path):
    folder = _copy(clean, tmp_path)
    first = json.loads((folder / "meta.json").read_text())["shards"][0]
    labels = np.load(folder / first["labels"])
    labels[0] = (labels[0] + 1) % 4  # still a valid class: only the checksum can tell
    np.save(folder / first["labels"], labels)
    with pytest.raises(TokenShardError, match="the codes or labels differ"):
        TokenDataset(folder)


def test_a_folder_written_before_shard_checksums_still_opens(clean, tmp_path):
    def drop(meta):
        for shard in meta["shards"]:
            del shard["rows_sha256"]
    folder = _copy(clean, tmp_path, drop)
    assert len(TokenDataset(folder)) == 16


def test_too_many_open_files_says_why_and_what_to_raise(clean, tmp_path, monkeypatch):
    """Each shard kept its codes and its labels open (two files): 60 shards failed under `ulimit -n 64`
    with no hint. The labels are read whole now, and the limit is named."""
    import errno

    opened = []
    real_load = np.load

    def load(path, mmap_mode=None, **kwargs):
        opened.append((Path(path).name, mmap_mode))
        if len(opened) > 1 and mmap_mode:
            raise OSError(errno.EMFILE, "Too many open files")
        return real_load(path, mmap_mode=mmap_mode, **kwargs)

    monkeypatch.setattr(np, "load", load)
    with pytest.raises(TokenShardError, match=r"Too many open files \(\d+ shards stay open while training: raise "
                                              r"the limit, ulimit -n\)"):
        data = TokenDataset(_copy(clean, tmp_path))
        data[len(data) - 1]
    assert [mode for name, mode in opened if name.startswith("labels")] == [None]  # read whole, not mapped


def test_encode_refuses_an_out_folder_holding_other_files(tmp_path, capsys):
    """Shards went without a word into the tokenizer's export, a run folder or the image folder (whose images
    then gained a class of shards); a folder holding only an earlier encode's files is still continued."""
    from PIL import Image

    from test_pipeline import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(images / f"{i}.png")
    before = {p.name for p in (tmp_path / "tok").iterdir()}
    for out in (tmp_path / "tok", images):
        assert main(["encode", "--tokenizer", str(tmp_path / "tok"), "--data", str(images), "--out", str(out)]) == 2
        assert f"--out {out} holds files an encode does not write" in capsys.readouterr().err
    assert {p.name for p in (tmp_path / "tok").iterdir()} == before and len(list(images.iterdir())) == 3
    codes = tmp_path / "codes"
    (codes / "tokens-00000.npy.tmp").parent.mkdir()
    (codes / "tokens-00000.npy.tmp").write_bytes(b"cut")  # an earlier encode's leftover: not the user's file
    assert main(["encode", "--tokenizer", str(tmp_path / "tok"), "--data", str(images), "--out", str(codes)]) == 0
    assert (codes / "meta.json").is_file()


def test_crop_range_without_ten_crop_is_refused(tmp_path, capsys):
    assert main(["encode", "--tokenizer", str(tmp_path / "tok"), "--data", "builtin:mnist", "--out",
                 str(tmp_path / "codes"), "--crop-range", "2.0"]) == 2  # it was dropped without a word
    assert "--crop-range 2.0 sets the crops of --augment ten-crop; --augment is none" in capsys.readouterr().err


def test_an_interrupted_encode_says_how_to_continue(tmp_path, monkeypatch, capsys):
    import vqgpt.workflow.encode as encode

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(encode, "encode_dataset", interrupted)
    assert main(["encode", "--tokenizer", str(tmp_path / "tok"), "--data", "builtin:mnist", "--out",
                 str(tmp_path / "codes"), "--resolution", "28"]) == 130
    assert "encode interrupted: the same command continues it" in capsys.readouterr().err


@pytest.mark.parametrize("inside", [True, False])
def test_a_tokenizer_run_in_or_around_its_image_folder_is_refused(tmp_path, inside):
    """--out imgs/run: its sample grids became images of a class 'run' (a later encode found the file added);
    --out around the images: --overwrite would delete them."""
    from stage1_vq.train import TokenizerRunConfig, train_tokenizer
    from vqgpt.ground.config import ConfigError, load_config

    images = tmp_path / "imgs" if inside else tmp_path / "run" / "imgs"
    images.mkdir(parents=True)
    out = images / "run" if inside else tmp_path / "run"
    cfg = load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml", [f"data.source={images}"])
    with pytest.raises(ConfigError, match=f"--out {out} {'is inside' if inside else 'holds'} the image folder"):
        train_tokenizer(cfg, out)
    assert not (images / "run").exists() and sorted(p.name for p in images.parent.iterdir()) == ["imgs"]
