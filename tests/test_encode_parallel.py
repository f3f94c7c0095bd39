"""`vqgpt encode` on many processes (each its own part of the shards, merged by rank 0), resumable
per process, and the views of --augment flip / ten-crop, drawn one per sample by TokenDataset."""

from __future__ import annotations

import json
import os
import re
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import vqgpt.workflow.encode as encode_module
from stage1_vq import QuantizerConfig, VQModel, VQModelConfig
from test_distributed import launch_command, subprocess_env
from vqgpt.ground.data import DataConfig, build_dataset
from vqgpt.ground.tokens import META_FILE, TokenDataset, TokenShardError, TokenShardWriter, read_meta
from vqgpt.training import SeededSamples
from vqgpt.training.config import launch_command as launch_here
from vqgpt.workflow.encode import encode_dataset, process_slice

R = 16
BATCH = 4


def _tokenizer() -> VQModel:
    torch.manual_seed(0)
    config = VQModelConfig(channels=8, channel_mult=[1, 1], num_res_blocks=1, attn_resolutions=[], resolution=R,
                           z_channels=4, norm_groups=4, quantizer=QuantizerConfig(codebook_size=16))
    return VQModel(config).eval()  # an 8x8 code grid


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return _tokenizer().save_pretrained(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """11 small images (not square, so crops differ) in two classes: 3 batches of 4, the last short."""
    root = tmp_path_factory.mktemp("imgs")
    for i in range(11):
        path = root / ("cat" if i % 2 else "dog") / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (R + 4, R + 8, 3), dtype=np.uint8)).save(path)
    return root


def _encode(tokenizer_dir, source, out, **kwargs):
    kwargs = {"batch_size": BATCH, "progress": False, **kwargs}
    return encode_dataset(tokenizer_dir, DataConfig(source=str(source), resolution=R), out, device="cpu", **kwargs)


def _by_name(out, source) -> dict[str, tuple[np.ndarray, int]]:
    """image name -> (its stored views (V, h, w), label); rows are in dataset order (no unreadable file here)."""
    ds = TokenDataset(out)
    names = build_dataset(DataConfig(source=str(source), resolution=R), "eval")
    labels = ds.load_all()[1][::ds.views]
    return {names.name(i): (ds.all_views(i).numpy(), int(labels[i])) for i in range(len(ds))}


def _assert_same_rows(a, b) -> None:
    ta, la = TokenDataset(a).load_all()
    tb, lb = TokenDataset(b).load_all()
    assert torch.equal(ta, tb) and torch.equal(la, lb)


class FakeRank:
    """What encode_dataset asks of accelerate's PartialState, for rank ``rank`` of ``processes`` run one
    after another in this process (the barriers are no-ops: the test orders the ranks itself)."""

    def __init__(self, rank: int, processes: int) -> None:
        self.process_index, self.num_processes = rank, processes
        self.is_main_process = rank == 0
        self.device = torch.device("cpu")

    def wait_for_everyone(self) -> None:
        pass


def _as_rank(monkeypatch, rank: int, processes: int) -> None:
    monkeypatch.setattr(encode_module, "_process_state", lambda: FakeRank(rank, processes))
    # what rank 0 works out and broadcasts (the source's identity), each rank here works out itself
    monkeypatch.setattr(encode_module, "on_main_process", lambda state, work: work())


# ------------------------------------------------------------------------------------- many processes


def test_slices_are_contiguous_runs_of_whole_batches():
    for total, processes in [(11, 2), (12, 3), (3, 4), (0, 2), (100, 7)]:
        slices = [process_slice(total, BATCH, processes, r) for r in range(processes)]
        assert slices[0][0] == 0 and slices[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))  # contiguous, in rank order
        assert all(start % BATCH == 0 for start, _ in slices)  # every batch [kB, (k+1)B) stays whole


# `vqgpt encode` that notes, in the folder $IDENTIFIED, each process that lists the source's files and stats them
_COUNTING_ENCODE = """
import os, sys
import vqgpt.workflow.encode as encode
real = encode.source_identity
def noted(*args, **kwargs):
    open(os.path.join(os.environ["IDENTIFIED"], os.environ.get("RANK", "0")), "w").close()
    return real(*args, **kwargs)
encode.source_identity = noted
from vqgpt.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_two_processes_encode_exactly_what_one_process_does(tokenizer_dir, source, tmp_path):
    one = _encode(tokenizer_dir, source, tmp_path / "one", augment="flip")
    two = tmp_path / "two"
    (tmp_path / "encode.py").write_text(_COUNTING_ENCODE)
    (tmp_path / "identified").mkdir()
    cmd = [*launch_command(2), str(tmp_path / "encode.py"), "encode", "--tokenizer", str(tokenizer_dir), "--data",
           str(source), "--out", str(two), "--augment", "flip", "--batch-size", str(BATCH)]
    done = subprocess.run(cmd, env={**subprocess_env(), "IDENTIFIED": str(tmp_path / "identified")},
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("token shards written to") == 1  # said once, by rank 0
    # one process stats the images (each did: a million stats per process at every start); the other gets its digest
    assert sorted(p.name for p in (tmp_path / "identified").iterdir()) == ["0"]
    meta = read_meta(two)
    # each rank wrote its own files; rank 0 listed rank 0's, then rank 1's: a run of 1 and of 2 batches
    assert meta["processes"] == 2 and meta["complete"] and meta["views"] == 2
    assert [(s["tokens"], s["count"]) for s in meta["shards"]] == [("tokens-r000-00000.npy", 4),
                                                                   ("tokens-r001-00000.npy", 7)]
    assert not list(two.glob("progress-*.json"))
    mapping_one, mapping_two = _by_name(one, source), _by_name(two, source)
    assert mapping_two.keys() == mapping_one.keys() and len(mapping_one) == 11
    for name, (codes, label) in mapping_one.items():
        assert np.array_equal(mapping_two[name][0], codes) and mapping_two[name][1] == label, name
    _assert_same_rows(two, one)  # and in the same order
    for key in ("tokenizer_fingerprint", "source_identity", "classes", "augment", "view_names", "count"):
        assert meta[key] == read_meta(one)[key]


def test_killed_parallel_encode_resumes_each_rank_where_it_stopped(tokenizer_dir, source, tmp_path, monkeypatch):
    one = _encode(tokenizer_dir, source, tmp_path / "one", shard_size=2)
    out = tmp_path / "two"
    calls = {"n": 0}
    original = VQModel.encode

    def killed_at_second_batch(self, images):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, images)

    # rank 1 (items 4..10) is killed in its second batch; rank 0 (items 0..3) finishes and waits
    _as_rank(monkeypatch, 1, 2)
    monkeypatch.setattr(VQModel, "encode", killed_at_second_batch)
    with pytest.raises(KeyboardInterrupt):
        _encode(tokenizer_dir, source, out, shard_size=2)
    monkeypatch.setattr(VQModel, "encode", original)
    _as_rank(monkeypatch, 0, 2)
    _encode(tokenizer_dir, source, out, shard_size=2)
    meta, rank1 = read_meta(out), read_meta(out, "r001")
    assert not meta["complete"] and meta["processes"] == 2
    assert rank1["start"] == 4 and rank1["items_done"] == 4 and not rank1["complete"]  # 2 shards of 2 stored
    assert read_meta(out, "r000")["complete"] and meta["count"] == 4 + 4
    with pytest.raises(TokenShardError, match="did not finish"):
        TokenDataset(out)

    # another process count is refused, naming the one to use
    _as_rank(monkeypatch, 0, 1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # (on a machine without GPUs `accelerate launch --num_processes 2` alone starts one process)
    with pytest.raises(TokenShardError, match=r"started on 2 processes and this run has 1; resume it on 2 \(`"
                                              + re.escape(launch_here(2)) + " encode` .*--overwrite"):
        _encode(tokenizer_dir, source, out, shard_size=2)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # another batch size would move each process's share: refused, naming the one it was started with
    _as_rank(monkeypatch, 1, 2)
    with pytest.raises(TokenShardError, match=r"started with --batch-size 4 \(each of its 2 processes .*resume "
                                              r"it with --batch-size 4"):
        _encode(tokenizer_dir, source, out, shard_size=2, batch_size=3)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    legacy = {k: v for k, v in meta.items() if k != "batch_size"}  # meta.json of an earlier vqgpt: the shares tell
    (out / META_FILE).write_text(json.dumps(legacy))
    with pytest.raises(TokenShardError, match=r"started with another --batch-size .*the --batch-size it was started "
                                              r"with \(the default is 64\)"):
        _encode(tokenizer_dir, source, out, shard_size=2, batch_size=3)
    (out / META_FILE).write_text(json.dumps(meta))

    # the same count resumes: rank 1 from its 9th image, rank 0 has nothing left
    _as_rank(monkeypatch, 1, 2)
    _encode(tokenizer_dir, source, out, shard_size=2)
    _as_rank(monkeypatch, 0, 2)
    _encode(tokenizer_dir, source, out, shard_size=2)
    meta = read_meta(out)
    assert meta["complete"] and meta["count"] == 11 and not list(out.glob("progress-*.json"))
    assert [s["tokens"] for s in meta["shards"]] == [
        "tokens-r000-00000.npy", "tokens-r000-00001.npy",
        *(f"tokens-r001-{k:05d}.npy" for k in range(4))]
    _assert_same_rows(out, one)
    # and a finished folder is left alone whatever the process count
    _as_rank(monkeypatch, 0, 1)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lock"}  # (taken by each encode)
    _encode(tokenizer_dir, source, out, shard_size=2)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lock"} == stamps


def test_an_encode_stopped_before_its_first_shard_starts_over_on_any_process_count(tokenizer_dir, source, tmp_path,
                                                                                    monkeypatch, capsys):
    """Nothing was stored, yet a re-run on another process count was refused (and on a machine without GPUs
    the advised `accelerate launch --num_processes 2` starts one process, so the advice looped)."""
    out = tmp_path / "two"
    original = VQModel.encode

    def killed(self, images):
        raise KeyboardInterrupt

    _as_rank(monkeypatch, 0, 2)
    monkeypatch.setattr(VQModel, "encode", killed)
    with pytest.raises(KeyboardInterrupt):
        _encode(tokenizer_dir, source, out, shard_size=2)
    monkeypatch.setattr(VQModel, "encode", original)
    assert read_meta(out)["processes"] == 2 and read_meta(out, "r000")["items_done"] == 0
    _as_rank(monkeypatch, 0, 1)
    _encode(tokenizer_dir, source, out, shard_size=2, progress=True)
    assert "stored no shard yet; starting over on 1" in capsys.readouterr().out
    meta = read_meta(out)
    assert meta["complete"] and "processes" not in meta and not list(out.glob("progress-*.json"))
    _assert_same_rows(out, _encode(tokenizer_dir, source, tmp_path / "one", shard_size=2))


# ------------------------------------------------------------------------------------------- views


def test_flip_stores_the_mirror_image_as_a_second_view(tokenizer_dir, source, tmp_path):
    out = _encode(tokenizer_dir, source, tmp_path / "codes", augment="flip")
    ds = TokenDataset(out)
    assert len(ds) == 11 and ds.views == 2 and ds.meta["view_names"] == ["image", "flipped"]
    images = torch.stack([item[0] for item in build_dataset(DataConfig(source=str(source), resolution=R), "eval")])
    model = VQModel.from_pretrained(tokenizer_dir)
    with torch.inference_mode():
        plain, mirrored = model.encode(images), model.encode(images.flip(3))
    assert not torch.equal(plain, mirrored)
    stored = torch.stack([ds.all_views(i) for i in range(len(ds))])  # (N, 2, h, w)
    assert torch.equal(stored[:, 0], plain) and torch.equal(stored[:, 1], mirrored)
    assert np.load(out / "tokens-00000.npy").shape == (11, 2, 8, 8)


def test_ten_crop_stores_ten_views_as_llamagen_extracts_them(tokenizer_dir, source, tmp_path):
    out = _encode(tokenizer_dir, source, tmp_path / "codes", augment="ten-crop")
    ds = TokenDataset(out)
    assert ds.views == 10 and len(ds) == 11 and ds.meta["crop_range"] == 1.1
    assert ds.meta["view_names"][4] == "center" and ds.meta["view_names"][9] == "flipped center"
    # the crops come from a center crop 1.1x the resolution (17 px for 16)
    larger = torch.stack([item[0] for item in build_dataset(DataConfig(source=str(source), resolution=17), "eval")])
    model = VQModel.from_pretrained(tokenizer_dir)
    with torch.inference_mode():
        want = torch.stack([model.encode(crop) for crop in TF.ten_crop(larger, [R, R])], 1)  # (N, 10, h, w)
    stored = torch.stack([ds.all_views(i) for i in range(len(ds))])
    assert torch.equal(stored, want)
    assert not torch.equal(stored[:, 0], stored[:, 3]) and not torch.equal(stored[:, 4], stored[:, 9])

    # crop_range 1: every crop is the whole image, so the views are the image's and its mirror's codes
    same = _encode(tokenizer_dir, source, tmp_path / "range1", augment="ten-crop", crop_range=1.0)
    flipped = _encode(tokenizer_dir, source, tmp_path / "flip", augment="flip")
    a, b = TokenDataset(same), TokenDataset(flipped)
    for i in range(len(a)):
        views, pair = a.all_views(i), b.all_views(i)
        assert all(torch.equal(views[k], pair[0]) for k in range(5))
        assert all(torch.equal(views[k], pair[1]) for k in range(5, 10))
    with pytest.raises(TokenShardError, match="augment is 'ten-crop' there but 'flip' now"):
        _encode(tokenizer_dir, source, out, augment="flip")
    with pytest.raises(TokenShardError, match="crop_range is 1.1 there but 1.2 now"):
        _encode(tokenizer_dir, source, out, augment="ten-crop", crop_range=1.2)


def _views_shards(out, n: int = 6, views: int = 3) -> torch.Tensor:
    grids = torch.arange(n * views * 4).view(n, views, 2, 2) % 50
    with TokenShardWriter(out, (2, 2), 50, {"num_classes": 2}, shard_size=4, views=views) as writer:
        writer.add(grids, torch.arange(n) % 2)
    return grids


def test_token_dataset_draws_one_view_per_sample_reproducibly(tmp_path):
    grids = _views_shards(tmp_path / "tok")
    ds = TokenDataset(tmp_path / "tok")
    assert len(ds) == 6 and ds.views == 3 and torch.equal(ds.load_all()[0], grids.flatten(0, 1))

    def drawn(seed: int, epoch: int) -> list[int]:
        samples = SeededSamples(ds, seed)
        samples.set_epoch(epoch)
        picks = []
        for i in range(len(ds)):
            codes, label = samples[i]
            assert label == i % 2
            picks.append(next(v for v in range(3) if torch.equal(codes, grids[i, v])))
        return picks

    state = torch.random.get_rng_state()
    first = [drawn(0, epoch) for epoch in range(30)]
    assert torch.equal(torch.random.get_rng_state(), state)  # the draw leaves the global RNG alone
    assert [drawn(0, epoch) for epoch in range(30)] == first  # reproducible (and so resume-exact)
    assert [drawn(1, epoch) for epoch in range(30)] != first  # and seed-dependent
    for i in range(6):
        assert {picks[i] for picks in first} == {0, 1, 2}  # every view of every image is trained on
    assert len({tuple(picks) for picks in first}) > 1  # views vary across epochs


def test_single_view_shards_of_an_older_vqgpt_still_load_and_resume(tokenizer_dir, source, tmp_path):
    out = _encode(tokenizer_dir, source, tmp_path / "codes")
    ds = TokenDataset(out)
    assert ds.views == 1 and np.load(out / "tokens-00000.npy").shape == (11, 8, 8)
    meta = json.loads((out / META_FILE).read_text())
    for key in ("views", "augment", "view_names"):
        meta.pop(key)
    (out / META_FILE).write_text(json.dumps({**meta, "format_version": 1, "flip_augmented": False}))
    old = TokenDataset(out)
    state = torch.random.get_rng_state()
    assert old.views == 1 and all(torch.equal(old[i][0], ds[i][0]) for i in range(len(ds)))
    assert torch.equal(torch.random.get_rng_state(), state)  # one view: no random draw, as before views
    assert torch.equal(old.load_all()[0], ds.load_all()[0])
    _encode(tokenizer_dir, source, out)  # a finished old folder of the same options: nothing to do
    # an older flip encode stored mirror images as extra rows: never continued as views
    (out / META_FILE).write_text(json.dumps({**meta, "format_version": 1, "flip_augmented": True, "complete": False}))
    with pytest.raises(TokenShardError, match=r"augment is 'flip \(as extra rows, older vqgpt\)' there but 'flip'"):
        _encode(tokenizer_dir, source, out, augment="flip")


def test_a_finished_encode_run_again_says_which_left_out_images_can_be_read_now(tokenizer_dir, tmp_path):
    """An image left out as unreadable (no read permission) and mended by a chmod, which changes neither its size
    nor its time: the same encode again said 'nothing to do', and the image was never encoded."""
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    for i in range(3):
        picture = np.random.default_rng(i).integers(0, 255, (R, R, 3), dtype=np.uint8)
        Image.fromarray(picture).save(root / "a" / f"{i}.png")
    good = (root / "a" / "2.png").read_bytes()
    (root / "a" / "2.png").write_bytes(b"\0" * len(good))  # unreadable, at the size the mended file will have
    stamp = (root / "a" / "2.png").stat()
    with pytest.warns(UserWarning, match="unreadable image"):
        out = _encode(tokenizer_dir, root, tmp_path / "codes")
    assert read_meta(out)["unreadable"] == ["a/2.png"] and read_meta(out)["count"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _encode(tokenizer_dir, root, out)  # still unreadable: nothing to say
    (root / "a" / "2.png").write_bytes(good)
    os.utime(root / "a" / "2.png", ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # as a chmod leaves it
    with pytest.warns(UserWarning, match=r"1 image that the encode in .*codes left out as unreadable can be read now "
                                         r"\(a/2.png\); pass --overwrite"):
        _encode(tokenizer_dir, root, out)
    assert read_meta(_encode(tokenizer_dir, root, out, overwrite=True))["count"] == 3
