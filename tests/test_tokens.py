"""Token shards: write/read round trip, resume after interruption, validation errors."""

from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pytest
import torch

from vqgpt.ground.tokens import (TokenDataset, TokenShardError, TokenShardWriter, check_tokenizer_match,
                          fingerprint_file, read_meta)

GRID = (3, 4)
META = {"tokenizer_fingerprint": "abc123", "source": "builtin:mnist", "num_classes": 10,
        "classes": [str(i) for i in range(10)], "flip_augmented": False}


def _data(n: int, codebook_size: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, codebook_size, (n, *GRID), generator=gen),
            torch.randint(0, 10, (n,), generator=gen))


def _write(out, tokens, labels, batch=3, shard_size=4, codebook_size=512, meta=META):
    with TokenShardWriter(out, GRID, codebook_size, meta, shard_size=shard_size) as writer:
        for start in range(0, len(tokens), batch):
            writer.add(tokens[start:start + batch], labels[start:start + batch])
    return writer


def test_round_trip_across_shards(tmp_path):
    tokens, labels = _data(10)
    writer = _write(tmp_path / "tok", tokens, labels)
    assert writer.count == 10
    meta = read_meta(tmp_path / "tok")
    assert [s["count"] for s in meta["shards"]] == [4, 4, 2]
    assert meta["grid_size"] == list(GRID) and meta["codebook_size"] == 512 and meta["dtype"] == "uint16"
    assert meta["complete"] and meta["count"] == 10 and meta["tokenizer_fingerprint"] == "abc123"
    on_disk = np.load(tmp_path / "tok" / "tokens-00001.npy")
    assert on_disk.dtype == np.uint16 and on_disk.shape == (4, *GRID)
    assert not list((tmp_path / "tok").glob("*.tmp"))

    ds = TokenDataset(tmp_path / "tok")
    assert len(ds) == 10 and ds.grid_size == list(GRID) and ds.codebook_size == 512 and ds.num_classes == 10
    for i in range(10):
        codes, label = ds[i]
        assert codes.dtype == torch.int64 and torch.equal(codes, tokens[i]) and label == int(labels[i])
    assert torch.equal(ds[-1][0], tokens[-1])
    with pytest.raises(IndexError):
        ds[10]
    all_tokens, all_labels = ds.load_all()
    assert torch.equal(all_tokens, tokens) and torch.equal(all_labels, labels)
    # memory maps are reopened after pickling (DataLoader workers), not copied
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._arrays is None and torch.equal(clone[5][0], tokens[5])
    assert isinstance(ds._open()[0][0], np.memmap)


def test_resume_after_interruption_matches_uninterrupted(tmp_path):
    tokens, labels = _data(11)
    _write(tmp_path / "full", tokens, labels)

    out = tmp_path / "resumed"
    writer = TokenShardWriter(out, GRID, 512, META, shard_size=4)
    writer.add(tokens[:7], labels[:7])  # one shard written, 3 items still buffered
    del writer  # crash: the buffered items are lost
    (out / "tokens-00001.npy.tmp").write_bytes(b"half written")  # debris of an interrupted shard
    np.save(out / "tokens-00001.npy", np.zeros((1, 1), np.uint16))  # unlisted shard from a crash before meta
    with pytest.raises(TokenShardError, match="did not finish"):
        TokenDataset(out)
    assert len(TokenDataset(out, allow_incomplete=True)) == 4

    writer = TokenShardWriter.resume(out, GRID, 512, META, shard_size=4)
    assert writer.count == 4
    for start in range(writer.count, 11, 5):
        writer.add(tokens[start:start + 5], labels[start:start + 5])
    writer.close()
    a, b = TokenDataset(tmp_path / "full").load_all(), TokenDataset(out).load_all()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert read_meta(out)["count"] == 11
    # resuming a finished folder stores nothing new
    assert TokenShardWriter.resume(out, GRID, 512, META).count == 11


def test_unreadable_names_are_kept_once_each_in_order_across_a_resume(tmp_path):
    tokens, labels = _data(8)
    writer = TokenShardWriter(tmp_path / "t", GRID, 512, META, shard_size=4)
    for batch in (["b.png", "a.png", "b.png"], ["a.png", "c.png"], []):
        writer.note_unreadable(batch)
    writer.add(tokens[:4], labels[:4])  # the shard's meta.json carries them
    assert writer.unreadable == ["b.png", "a.png", "c.png"]
    del writer
    writer = TokenShardWriter.resume(tmp_path / "t", GRID, 512, META, shard_size=4)
    writer.note_unreadable(["c.png", "d.png"])  # met again on the resume: still once
    writer.add(tokens[4:], labels[4:])
    writer.close()
    assert read_meta(tmp_path / "t")["unreadable"] == ["b.png", "a.png", "c.png", "d.png"]


def test_resume_refuses_other_tokenizer_or_grid(tmp_path):
    tokens, labels = _data(5)
    _write(tmp_path / "tok", tokens, labels)
    with pytest.raises(TokenShardError, match="tokenizer_fingerprint"):
        TokenShardWriter.resume(tmp_path / "tok", GRID, 512, {**META, "tokenizer_fingerprint": "other"})
    with pytest.raises(TokenShardError, match="grid_size"):
        TokenShardWriter.resume(tmp_path / "tok", (4, 4), 512, META)
    with pytest.raises(TokenShardError, match="codebook_size"):
        TokenShardWriter.resume(tmp_path / "tok", GRID, 1024, META)
    with pytest.raises(FileExistsError, match="resume"):
        TokenShardWriter(tmp_path / "tok", GRID, 512, META)


def test_tokenizer_fingerprint_check(tmp_path):
    tokens, labels = _data(5)
    _write(tmp_path / "tok", tokens, labels)
    ds = TokenDataset(tmp_path / "tok")
    ds.check_tokenizer("abc123")
    with pytest.raises(TokenShardError, match="'abc123'.*'fff'"):
        ds.check_tokenizer("fff")
    with pytest.raises(TokenShardError, match="re-run"):
        check_tokenizer_match(ds.meta, "fff")

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights-v1" * 1000)
    assert fingerprint_file(weights) == hashlib.sha256(b"weights-v1" * 1000).hexdigest()[:16]
    before = fingerprint_file(weights)
    weights.write_bytes(b"weights-v2" * 1000)
    assert fingerprint_file(weights) != before and len(before) == 16


def test_large_codebook_uses_int32(tmp_path):
    tokens, labels = _data(6, codebook_size=70_000)
    assert tokens.max() > 65535
    _write(tmp_path / "tok", tokens, labels, codebook_size=70_000)
    assert np.load(tmp_path / "tok" / "tokens-00000.npy").dtype == np.int32
    assert torch.equal(TokenDataset(tmp_path / "tok").load_all()[0], tokens)


def test_writer_rejects_bad_input(tmp_path):
    writer = TokenShardWriter(tmp_path / "tok", GRID, 16, META, shard_size=4)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        writer.add(torch.full((2, *GRID), 16), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="indices must be"):
        writer.add(torch.zeros(2, 4, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be"):
        writer.add(torch.zeros(2, *GRID, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="set by the writer"):
        TokenShardWriter(tmp_path / "tok2", GRID, 16, {"count": 3})


def test_reader_validates_shards(tmp_path):
    with pytest.raises(TokenShardError, match="meta.json"):
        TokenDataset(tmp_path)
    tokens, labels = _data(10, codebook_size=100)
    out = tmp_path / "tok"
    _write(out, tokens, labels, codebook_size=100)

    bad = tokens[4:8].numpy().astype(np.uint16)
    bad[-1, 0, 0] = 100  # the last row: a spot check must look beyond the first items
    np.save(out / "tokens-00001.npy", bad)
    with pytest.raises(TokenShardError, match=r"tokens-00001\.npy: token value 100 >= codebook_size 100"):
        TokenDataset(out)

    np.save(out / "tokens-00001.npy", tokens[4:8].numpy().astype(np.uint16)[:, :2])
    with pytest.raises(TokenShardError, match=r"tokens-00001\.npy: expected uint16 of shape \(4, 3, 4\)"):
        TokenDataset(out)

    (out / "tokens-00001.npy").unlink()
    with pytest.raises(TokenShardError, match=r"missing: .*tokens-00001\.npy"):
        TokenDataset(out)

    meta = json.loads((out / "meta.json").read_text())
    meta["count"] = 99
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(TokenShardError, match="count is 99"):
        TokenDataset(out)
