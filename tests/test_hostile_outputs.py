"""Output paths that must not be trusted: a --classifier file that is not a classifier, two samplers in
one folder, an --npz path that cannot be written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import vqgpt.workflow.classifier as clf
import vqgpt.workflow.sample_many as sample_many_module
from stage2_prior import SamplingConfig
from test_pipeline import tiny_prior, tiny_tokenizer
from vqgpt.training.run_folder import RunFolderError, RunLock
from vqgpt.workflow.classifier import MnistClassifier, TrainedClassifier, load_classifier, load_or_train_mnist_classifier
from vqgpt.workflow.pipeline import VQGPTPipeline
from vqgpt.workflow.sample_many import png_name, sample_many

ROOT = Path(__file__).resolve().parents[1]
NUM, BATCH = 6, 3


# ------------------------------------------------------------------------------ --classifier PATH


@pytest.fixture()
def fake_training(monkeypatch):
    calls = []

    def fake_train(steps, seed, progress=False):
        calls.append((steps, seed))
        return TrainedClassifier(MnistClassifier().eval(), 0.5)

    monkeypatch.setattr(clf, "train_mnist_classifier", fake_train)
    return calls


def test_a_named_file_that_is_not_a_classifier_is_refused_and_kept(tmp_path, fake_training):
    notes = tmp_path / "notes.txt"
    notes.write_text("my important notes\n")
    prior = tmp_path / "model.safetensors"  # a readable safetensors file, but another model's weights
    save_file({"tok_embeddings.weight": torch.zeros(4, 2)}, str(prior), metadata={"format": "pt"})
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    for path in (notes, prior, folder):
        before = path.read_bytes() if path.is_file() else None
        with pytest.raises(ValueError, match=f"{path.name}.*does not exist yet"):
            load_or_train_mnist_classifier(path)
        assert (path.read_bytes() if path.is_file() else None) == before and path.exists()
    assert fake_training == []  # refused before any training
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.safetensors", "model.safetensors", "notes.txt"]


def test_a_new_named_path_is_trained_and_written(tmp_path, fake_training):
    path = tmp_path / "new" / "mine.safetensors"
    load_or_train_mnist_classifier(path, steps=5)
    assert fake_training == [(5, 0)] and load_classifier(path).heldout_accuracy == 0.5
    load_or_train_mnist_classifier(path, steps=5)  # then read back, not retrained
    assert fake_training == [(5, 0)]


def test_a_new_named_path_that_cannot_be_written_is_refused_before_training(tmp_path, fake_training):
    """--classifier notes.txt/x.safetensors trained the classifier, then failed with only "[Errno 17] File
    exists: 'notes.txt'" (found by a hostile probe)."""
    (tmp_path / "notes.txt").write_text("mine")
    for path in (tmp_path / "notes.txt" / "x.safetensors", tmp_path / "notes.txt" / "deeper" / "x.safetensors"):
        with pytest.raises(ValueError, match=r"notes.txt is a file, not a folder, so no classifier can be written"):
            load_or_train_mnist_classifier(path)
    assert fake_training == [] and (tmp_path / "notes.txt").read_text() == "mine"


def test_a_damaged_default_cache_is_retrained(tmp_path, monkeypatch, fake_training):
    monkeypatch.setenv("VQGPT_CACHE", str(tmp_path / "cache"))
    cache = clf.default_classifier_path()
    cache.parent.mkdir()
    cache.write_bytes(b"half a file")  # the cache is ours: replacing it loses nothing
    load_or_train_mnist_classifier(steps=5)
    assert fake_training == [(5, 0)] and load_classifier(cache).heldout_accuracy == 0.5


# ------------------------------------------------------------------------------ sample --out DIR/


@pytest.fixture(scope="module")
def pipe():
    tok = tiny_tokenizer()
    return VQGPTPipeline(tok, tiny_prior(tok.codebook_size), classes=["a", "b", "c"])


def _sample(pipe, **kwargs):
    return sample_many(pipe, NUM, class_labels=torch.arange(NUM) % 3, sampling=SamplingConfig(), seed=1,
                       batch_size=BATCH, device="cpu", progress=False, **kwargs)


@pytest.fixture()
def drawn(monkeypatch):
    """The batches drawn, in order (a refusal must come before the first)."""
    calls = []
    real = sample_many_module.draw_images
    monkeypatch.setattr(sample_many_module, "draw_images",
                        lambda pipe, index, *args: calls.append(list(index)) or real(pipe, index, *args))
    return calls


def test_a_folder_in_use_by_another_sampler_is_refused(pipe, tmp_path, drawn):
    folder = tmp_path / "s"
    folder.mkdir()
    other = RunLock(folder)  # another `vqgpt sample --out s/` that has not written its first sample yet
    other.acquire()
    try:
        with pytest.raises(RunFolderError, match=f"{folder} is in use by pid"):
            _sample(pipe, out=folder)
        with pytest.raises(RunFolderError, match="in use"):
            _sample(pipe, npz=tmp_path / "s.npz", out=folder)
        parts = RunLock(tmp_path / "t.npz.parts")  # --npz alone: its scratch folder is the one locked
        parts.path.parent.mkdir()
        parts.acquire()
        try:
            with pytest.raises(RunFolderError, match=r"pid \d+ on .* is writing .*t.npz .* choose another --npz$"):
                _sample(pipe, npz=tmp_path / "t.npz")
        finally:
            parts.release()
    finally:
        other.release()
    assert drawn == [] and sorted(p.name for p in folder.iterdir()) == [".lock"]
    assert not (tmp_path / "s.npz").exists()
    report = _sample(pipe, out=folder, npz=tmp_path / "s.npz")  # free again: it samples, and .lock is no sample
    assert report.drawn == NUM
    assert sorted(p.name for p in folder.iterdir()) == sorted([".lock", "sampling.json", *map(png_name, range(NUM))])
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_0"].shape[0] == NUM


def test_an_interrupted_sampler_leaves_the_folder_free_to_resume(pipe, tmp_path, monkeypatch):
    folder = tmp_path / "s"
    real = sample_many_module.draw_images

    def interrupted(pipe, index, *args):
        if index[0] >= BATCH:
            raise KeyboardInterrupt  # Ctrl-C in a notebook: the process lives on
        return real(pipe, index, *args)

    monkeypatch.setattr(sample_many_module, "draw_images", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _sample(pipe, out=folder)
    monkeypatch.setattr(sample_many_module, "draw_images", real)
    report = _sample(pipe, out=folder)  # the same process resumes: the lock went with the run
    assert (report.drawn, report.skipped) == (NUM - BATCH, BATCH)


@pytest.mark.slow
def test_a_folder_in_use_stops_every_launched_process(pipe, tmp_path):
    """Under accelerate launch only the main process locks; the others stop with its error, not in a barrier."""
    from test_distributed import launch_command, subprocess_env

    pipe_dir = pipe.save_pretrained(tmp_path / "pipe")
    folder = tmp_path / "s"
    folder.mkdir()
    other = RunLock(folder)
    other.acquire()
    try:
        cmd = [*launch_command(2), "-m", "vqgpt", "sample", "--pipeline", str(pipe_dir), "--per-class", "2",
               "--out", f"{folder}/", "--batch-size", "2"]
        try:
            done = subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail("a launched process kept waiting after the main process found the folder in use")
    finally:
        other.release()
    assert done.returncode != 0
    assert f"error: {folder} is in use by pid" in done.stderr, done.stderr[-3000:]  # the main process
    assert f"error: main process: {folder} is in use by pid" in done.stderr, done.stderr[-3000:]  # the other one
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]


# ------------------------------------------------------------------------------ --npz PATH


def test_npz_into_a_new_folder_is_written_as_with_npz_alone(pipe, tmp_path):
    _sample(pipe, out=tmp_path / "s", npz=tmp_path / "new" / "deeper" / "s.npz")
    _sample(pipe, npz=tmp_path / "alone" / "s.npz")
    with np.load(tmp_path / "new" / "deeper" / "s.npz") as a, np.load(tmp_path / "alone" / "s.npz") as b:
        assert a["arr_0"].shape[0] == NUM and np.array_equal(a["arr_0"], b["arr_0"])


@pytest.mark.parametrize("with_out", [True, False])
def test_an_unwritable_npz_path_is_refused_before_sampling(pipe, tmp_path, drawn, with_out):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "taken.npz").mkdir()
    out = {"out": tmp_path / "s"} if with_out else {}
    for npz, why in [(tmp_path / "afile" / "s.npz", "afile is a file, not a folder"),
                     (tmp_path / "afile" / "sub" / "s.npz", "afile is a file, not a folder"),
                     (tmp_path / "taken.npz", "is a folder")]:
        with pytest.raises(ValueError, match=f"--npz {npz}.*{why}"):
            _sample(pipe, npz=npz, **out)
    assert drawn == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "taken.npz"]  # no .tmp, .parts or s/ left
    assert list((tmp_path / "taken.npz").iterdir()) == []
