"""Models by Hugging Face Hub id: loading from the standard cache (offline), revisions, push_to_hub, the CLI flags.

No test reaches the Hub: a cache folder is filled in huggingface_hub's documented layout
(models--owner--name/{blobs, snapshots/<commit>, refs/<branch or tag>}) and HF_HUB_OFFLINE is set.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, constants
from PIL import Image
from test_pipeline import tiny_prior, tiny_tokenizer

from stage1_vq.model import VQModel
from stage2_prior.model import GPT
from vqgpt.cli import main
from vqgpt.ground.checkpoint import resolve_model_dir
from vqgpt.workflow.pipeline import VQGPTPipeline

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def fill_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put ``folder`` into ``cache`` as snapshot ``commit`` of model repo ``repo_id``, as a download would."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache under tmp_path, offline; huggingface_hub read its settings at import, so set both."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture()
def pipeline(tmp_path):
    tok = tiny_tokenizer()
    pipe = VQGPTPipeline(tok, tiny_prior(tok.codebook_size), classes=["a", "b", "c"])
    pipe.save_pretrained(tmp_path / "pipe")
    return VQGPTPipeline.from_pretrained(tmp_path / "pipe")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_models_load_by_hub_id_and_revision_from_the_cache(hub_cache, pipeline, tmp_path):
    fill_hub_cache(hub_cache, "someone/tok", pipeline.tokenizer_dir, COMMIT_A, refs=("v1",))
    changed = VQModel.from_pretrained(pipeline.tokenizer_dir)
    with torch.no_grad():
        changed.decoder.conv_out.bias.add_(1.0)
    changed.save_pretrained(tmp_path / "tok-v2")
    fill_hub_cache(hub_cache, "someone/tok", tmp_path / "tok-v2", COMMIT_B, refs=("main",))

    latest = VQModel.from_pretrained("someone/tok")  # main -> commit B
    assert _same_weights(latest, changed)
    for revision in ("v1", COMMIT_A):  # a tag, and a commit hash
        assert _same_weights(VQModel.from_pretrained("someone/tok", revision=revision), pipeline.tokenizer)

    fill_hub_cache(hub_cache, "someone/prior", pipeline.prior_dir, COMMIT_A)
    assert _same_weights(GPT.from_pretrained("someone/prior"), pipeline.prior)
    # an export inside a repository's sub-folder
    fill_hub_cache(hub_cache, "someone/pipe", pipeline.tokenizer_dir.parent, COMMIT_A)
    assert _same_weights(GPT.from_pretrained("someone/pipe", subfolder="prior"), pipeline.prior)
    assert resolve_model_dir("someone/pipe") == hub_cache / "models--someone--pipe" / "snapshots" / COMMIT_A


def test_pipeline_loads_by_hub_id_and_samples_as_the_local_folder(hub_cache, pipeline):
    fill_hub_cache(hub_cache, "someone/pipe", pipeline.tokenizer_dir.parent, COMMIT_A)
    remote = VQGPTPipeline.from_pretrained("someone/pipe", revision="main")
    assert remote.classes == ["a", "b", "c"]
    assert torch.equal(remote.generate(2, class_labels="b", seed=1), pipeline.generate(2, class_labels="b", seed=1))


def test_missing_ids_and_paths_are_clear_errors(hub_cache, pipeline, tmp_path):
    # offline: an id that is not cached says so, naming the id, and never tries the network
    with pytest.raises(FileNotFoundError, match=r"someone/absent.* not in the local cache .*HF_HUB_OFFLINE"):
        VQGPTPipeline.from_pretrained("someone/absent")
    fill_hub_cache(hub_cache, "someone/tok", pipeline.tokenizer_dir, COMMIT_A)
    with pytest.raises(FileNotFoundError, match=r"someone/tok \(revision v9\) is not in the local cache"):
        VQModel.from_pretrained("someone/tok", revision="v9")
    with pytest.raises(FileNotFoundError, match=r"someone/tok: its folder prior/ is not in the local cache .*OFFLINE"):
        GPT.from_pretrained("someone/tok", subfolder="prior")
    # a pipeline of which only tokenizer/ was downloaded (from_pretrained(id, subfolder='tokenizer')): the cache
    # lacks prior/, which the repository may well hold
    only_tokenizer = tmp_path / "only-tokenizer"
    shutil.copytree(pipeline.tokenizer_dir, only_tokenizer / "tokenizer")
    fill_hub_cache(hub_cache, "someone/pipe", only_tokenizer, COMMIT_A)
    VQModel.from_pretrained("someone/pipe", subfolder="tokenizer")
    with pytest.raises(FileNotFoundError, match=r"someone/pipe: its folder prior/ is not in the local cache"):
        VQGPTPipeline.from_pretrained("someone/pipe")
    # a path that is neither a folder nor an id
    with pytest.raises(FileNotFoundError, match=r"runs/a/export: no such folder \(nor a Hugging Face Hub id"):
        VQModel.from_pretrained("runs/a/export")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        VQModel.from_pretrained(tmp_path / "absent")
    # a local folder is used as it is, and a revision makes no sense there
    assert resolve_model_dir(pipeline.tokenizer_dir) == pipeline.tokenizer_dir
    with pytest.raises(ValueError, match="revision='v1' applies to Hub ids"):
        VQModel.from_pretrained(pipeline.tokenizer_dir, revision="v1")


def test_cli_flags_take_hub_ids(hub_cache, pipeline, tmp_path, capsys):
    fill_hub_cache(hub_cache, "someone/pipe", pipeline.tokenizer_dir.parent, COMMIT_A)
    fill_hub_cache(hub_cache, "someone/tok", pipeline.tokenizer_dir, COMMIT_A)
    fill_hub_cache(hub_cache, "someone/prior", pipeline.prior_dir, COMMIT_A)
    assert main(["sample", "--pipeline", "someone/pipe", "--num", "1", "--class-label", "a",
                 "--out", str(tmp_path / "by-id.png")]) == 0
    assert main(["sample", "--tokenizer", "someone/tok", "--prior", "someone/prior", "--num", "1",
                 "--class-label", "a", "--out", str(tmp_path / "by-ids.png")]) == 0
    assert (tmp_path / "by-id.png").read_bytes() == (tmp_path / "by-ids.png").read_bytes()
    image = tmp_path / "in.png"
    shutil.copy(tmp_path / "by-id.png", image)
    assert main(["reconstruct", "--tokenizer", "someone/tok", "--images", str(image), "--out", str(tmp_path / "rec"),
                 "--lpips", "none", "--json"]) == 0
    capsys.readouterr()
    assert main(["sample", "--pipeline", "someone/absent", "--num", "1", "--class-label", "a",
                 "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --pipeline someone/absent: ") and "not in the local cache" in err


def test_cli_hub_ids_of_a_pipeline_or_its_parts_and_what_a_snapshot_lacks(hub_cache, pipeline, tmp_path, capsys,
                                                                         monkeypatch):
    """A pipeline repository serves --tokenizer / --prior (its tokenizer/, prior/, or owner/name/tokenizer);
    what a cached snapshot lacks is said of the id (the cache path said 'is not a pipeline folder' and lost
    the offline hint)."""
    fill_hub_cache(hub_cache, "someone/pipe", pipeline.tokenizer_dir.parent, COMMIT_A)
    only_tokenizer = tmp_path / "only-tokenizer"
    shutil.copytree(pipeline.tokenizer_dir, only_tokenizer / "tokenizer")
    fill_hub_cache(hub_cache, "someone/half", only_tokenizer, COMMIT_A)
    image = tmp_path / "in.png"
    Image.new("RGB", (16, 16), (90, 20, 200)).save(image)
    reports = []
    for tokenizer in ("someone/pipe", "someone/pipe/tokenizer", "someone/half"):
        assert main(["reconstruct", "--tokenizer", tokenizer, "--images", str(image), "--out",
                     str(tmp_path / tokenizer.replace("/", "_")), "--lpips", "none", "--json"]) == 0
        reports.append({k: v for k, v in json.loads(capsys.readouterr().out).items() if k in ("psnr", "num_images")})
    assert reports[0] == reports[1] == reports[2]
    assert main(["sample", "--tokenizer", "someone/pipe", "--prior", "someone/pipe/prior", "--num", "1",
                 "--class-label", "a", "--out", str(tmp_path / "parts.png")]) == 0
    assert main(["sample", "--pipeline", "someone/half", "--num", "1", "--class-label", "a",
                 "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "--pipeline Hub repository someone/half: its folder prior/ is not in the local cache" in err, err
    assert "snapshots" not in err
    assert main(["sample", "--tokenizer", "someone/half", "--prior", "someone/half/prior", "--num", "1",
                 "--class-label", "a", "--out", str(tmp_path / "x.png")]) == 2
    assert "--prior Hub repository someone/half: its folder prior/ is not in the local cache" in capsys.readouterr().err
    # a local path of more parts stays a local path: its error is the missing folder's
    assert main(["reconstruct", "--tokenizer", "runs/a/export", "--images", str(image), "--out",
                 str(tmp_path / "r"), "--lpips", "none"]) == 2
    assert "runs/a/export: no such folder" in capsys.readouterr().err
    (tmp_path / "runs" / "pipe").mkdir(parents=True)  # a local pipeline folder without its tokenizer/
    monkeypatch.chdir(tmp_path)
    assert main(["reconstruct", "--tokenizer", "runs/pipe/tokenizer", "--images", str(image), "--out",
                 str(tmp_path / "r"), "--lpips", "none"]) == 2
    assert "runs/pipe/tokenizer: no such folder" in capsys.readouterr().err


def _fake_hub(monkeypatch, tmp_path) -> dict:
    """Replace HfApi.create_repo / upload_folder: record the calls and keep a copy of the uploaded folder."""
    calls: dict = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create"] = {"repo_id": repo_id, "token": self.token, **kwargs}

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["upload"] = {"repo_id": repo_id, "token": self.token, **kwargs}
        shutil.copytree(folder_path, tmp_path / "uploaded")
        return "https://huggingface.co/me/x/commit/" + COMMIT_A

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_push_to_hub_uploads_the_export_folder(monkeypatch, tmp_path, pipeline):
    calls = _fake_hub(monkeypatch, tmp_path)
    # what else the parts' folders hold is the user's, and stays home
    (pipeline.tokenizer_dir / "private_notes.txt").write_text("not for the Hub")
    (pipeline.prior_dir / "datasets").mkdir()
    (pipeline.prior_dir / "datasets" / "big.bin").write_bytes(b"0" * 100)
    url = pipeline.push_to_hub("me/pipe", private=True, token="hf_test", commit_message="first")
    assert url.endswith(COMMIT_A)
    assert calls["create"] == {"repo_id": "me/pipe", "token": "hf_test", "private": True, "exist_ok": True}
    assert calls["upload"] == {"repo_id": "me/pipe", "token": "hf_test", "commit_message": "first"}
    uploaded = tmp_path / "uploaded"
    assert _files(uploaded) == ["prior/config.json", "prior/model.safetensors",
                                "tokenizer/config.json", "tokenizer/model.safetensors"]
    again = VQGPTPipeline.from_pretrained(uploaded)
    assert torch.equal(again.generate(1, class_labels="c", seed=0), pipeline.generate(1, class_labels="c", seed=0))


def test_models_push_their_exports(monkeypatch, tmp_path, pipeline):
    calls = _fake_hub(monkeypatch, tmp_path)
    pipeline.tokenizer.push_to_hub("me/tok")
    assert calls["create"]["private"] is None and calls["upload"]["commit_message"]
    assert _files(tmp_path / "uploaded") == ["config.json", "model.safetensors"]
    assert _same_weights(VQModel.from_pretrained(tmp_path / "uploaded"), pipeline.tokenizer)
    shutil.rmtree(tmp_path / "uploaded")
    pipeline.prior.push_to_hub("me/prior", extra={"classes": ["a", "b", "c"]}, commit_message="prior")
    assert calls["upload"]["commit_message"] == "prior"
    assert _same_weights(GPT.from_pretrained(tmp_path / "uploaded"), pipeline.prior)
    from vqgpt.ground.checkpoint import read_export_meta

    assert read_export_meta(tmp_path / "uploaded")["extra"] == {"classes": ["a", "b", "c"]}
