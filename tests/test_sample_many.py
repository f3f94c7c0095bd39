"""Many samples (`vqgpt sample --out FOLDER/ --npz F.npz`): per-sample generators, any process count,
resume, the ADM npz layout, class-balanced labels."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vqgpt.workflow.sample_many as sample_many_module
from stage2_prior import SamplingConfig
from stage2_prior.sampling import generate
from test_distributed import launch_command, subprocess_env
from test_encode_parallel import FakeRank
from test_pipeline import tiny_prior, tiny_tokenizer
from vqgpt.ground.images import tensor_to_uint8
from vqgpt.workflow.pipeline import VQGPTPipeline
from vqgpt.workflow.sample_many import class_balanced_labels, png_name, sample_many, sample_seed

ROOT = Path(__file__).resolve().parents[1]
NUM, BATCH = 8, 3  # three batches: [0, 3), [3, 6), [6, 8)
CFG = SamplingConfig(cfg_scale=2.0, top_k=50)


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    tok = tiny_tokenizer()
    pipe = VQGPTPipeline(tok, tiny_prior(tok.codebook_size), classes=["a", "b", "c"])
    return pipe.save_pretrained(tmp_path_factory.mktemp("pipe") / "pipe")


def _generators(indices, seed=0):
    return [torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices]


def _run(pipe_dir, **kwargs):
    pipe = VQGPTPipeline.from_pretrained(pipe_dir)
    return sample_many(pipe, NUM, class_labels=torch.arange(NUM) % 3, sampling=CFG, seed=5, batch_size=BATCH,
                       device="cpu", progress=False, **kwargs)


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_a_folder_holds_the_images_generate_gives_for_the_same_seed(pipe_dir, tmp_path):
    """`sample --out F.png --seed s` (one generator for the whole batch) and `sample --out DIR/ --seed s` drew
    other images, and a grid's first images changed with --num."""
    _run(pipe_dir, out=tmp_path / "s")
    pipe = VQGPTPipeline.from_pretrained(pipe_dir)
    grid = pipe.generate(NUM, class_labels=torch.arange(NUM) % 3, sampling=CFG, seed=5)
    folder = torch.stack([torch.from_numpy(np.array(Image.open(tmp_path / "s" / png_name(i)))) for i in range(NUM)])
    # (decoded in batches of another size: pixels may round the other way)
    assert (tensor_to_uint8(grid).permute(0, 2, 3, 1).int() - folder.int()).abs().max() <= 1


def test_a_samples_tokens_do_not_depend_on_its_batch():
    prior = tiny_prior(256)
    labels = torch.tensor([0, 1, 2, 1, 0])
    whole = generate(prior, 5, class_labels=labels, sampling=CFG, generators=_generators(range(5)))
    alone = torch.cat([generate(prior, 1, class_labels=labels[i:i + 1], sampling=CFG, generators=_generators([i]))
                       for i in range(5)])
    split = torch.cat([generate(prior, 2, class_labels=labels[:2], sampling=CFG, generators=_generators([0, 1])),
                       generate(prior, 3, class_labels=labels[2:], sampling=CFG, generators=_generators([2, 3, 4]))])
    assert torch.equal(whole, alone) and torch.equal(whole, split)
    assert len({tuple(g.flatten().tolist()) for g in whole}) == 5  # distinct seeds give distinct samples
    # one batch generator stays as it was: the same generator, the same tokens as before
    one = generate(prior, 5, class_labels=labels, sampling=CFG, generator=torch.Generator().manual_seed(0))
    again = generate(prior, 5, class_labels=labels, sampling=CFG, generator=torch.Generator().manual_seed(0))
    assert torch.equal(one, again)
    with pytest.raises(ValueError, match="one generator per sample"):
        generate(prior, 5, class_labels=labels, generators=_generators(range(4)))


def test_ranks_together_draw_what_one_process_draws(pipe_dir, tmp_path, monkeypatch):
    _run(pipe_dir, out=tmp_path / "one")
    for rank in (0, 1):  # two ranks, run one after the other in this process
        monkeypatch.setattr(sample_many_module, "_process_state", lambda r=rank: FakeRank(r, 2))
        report = _run(pipe_dir, out=tmp_path / "two")
    one, two = _pngs(tmp_path / "one"), _pngs(tmp_path / "two")
    assert list(one) == [png_name(i) for i in range(NUM)] and one == two
    assert report.processes == 2


def test_resume_draws_only_unfinished_batches_and_gives_the_same_set(pipe_dir, tmp_path, monkeypatch):
    first = _run(pipe_dir, out=tmp_path / "s")
    assert (first.drawn, first.skipped) == (NUM, 0)
    before = _pngs(tmp_path / "s")
    (tmp_path / "s" / png_name(4)).unlink()  # batch [3, 6) is unfinished
    kept = {i: (tmp_path / "s" / png_name(i)).stat().st_mtime_ns for i in range(NUM) if i != 4}
    drawn = []
    real = VQGPTPipeline.draw_codes
    monkeypatch.setattr(VQGPTPipeline, "draw_codes",
                        lambda pipe, n, *a, **kw: drawn.append(n) or real(pipe, n, *a, **kw))
    second = _run(pipe_dir, out=tmp_path / "s")
    assert drawn == [3] and (second.drawn, second.skipped) == (3, 5)
    assert _pngs(tmp_path / "s") == before  # the same final set, bitwise
    assert all((tmp_path / "s" / png_name(i)).stat().st_mtime_ns == t for i, t in kept.items())  # untouched
    drawn.clear()
    assert _run(pipe_dir, out=tmp_path / "s").drawn == 0 and drawn == []  # finished: nothing drawn
    with pytest.raises(ValueError, match="other settings.*seed: 5 then, 6 now"):
        sample_many(VQGPTPipeline.from_pretrained(pipe_dir), NUM, out=tmp_path / "s",
                    class_labels=torch.arange(NUM) % 3, sampling=CFG, seed=6, batch_size=BATCH, device="cpu")


def test_resume_refuses_a_changed_compile_and_takes_a_record_without_it(pipe_dir, tmp_path):
    """A compiled decode step draws other images than an eager one (bf16 rounds its products elsewhere): a
    folder begun eager and continued compiled mixed the two under an eager record. A record of an earlier
    vqgpt (no "compile" key) is continued either way."""
    _run(pipe_dir, out=tmp_path / "s")
    settings = tmp_path / "s" / "sampling.json"
    assert json.loads(settings.read_text())["compile"] is False
    (tmp_path / "s" / png_name(7)).unlink()
    compiled = VQGPTPipeline.from_pretrained(pipe_dir).set_decoding(compile=True)
    with pytest.raises(ValueError, match="other settings.*compile: False then, True now"):
        sample_many(compiled, NUM, out=tmp_path / "s", class_labels=torch.arange(NUM) % 3, sampling=CFG, seed=5,
                    batch_size=BATCH, device="cpu", progress=False)
    old = json.loads(settings.read_text())
    del old["compile"]
    settings.write_text(json.dumps(old))
    assert _run(pipe_dir, out=tmp_path / "s").drawn == 2


def test_resume_refuses_samples_of_other_weights(pipe_dir, tmp_path):
    _run(pipe_dir, out=tmp_path / "s")
    (tmp_path / "s" / png_name(7)).unlink()
    other = VQGPTPipeline.from_pretrained(pipe_dir)
    with torch.no_grad():
        other.prior.tok_embeddings.weight[0, 0] += 1.0  # one number of the prior changed: another model
    with pytest.raises(ValueError, match="drawn by other weights"):
        sample_many(other, NUM, out=tmp_path / "s", class_labels=torch.arange(NUM) % 3, sampling=CFG, seed=5,
                    batch_size=BATCH, device="cpu", progress=False)
    assert not (tmp_path / "s" / png_name(7)).exists()
    assert _run(pipe_dir, out=tmp_path / "s").drawn == 2  # the pipeline that drew them resumes


def test_a_folder_of_an_earlier_version_is_continued_with_a_warning_and_recorded(pipe_dir, tmp_path):
    """An earlier vqgpt recorded no weights in sampling.json: the folder was continued by any pipeline, and
    stayed unrecorded, so every later continuation was unchecked too."""
    _run(pipe_dir, out=tmp_path / "s")
    settings = tmp_path / "s" / "sampling.json"
    old = {k: v for k, v in json.loads(settings.read_text()).items() if k not in ("models", "configs")}
    settings.write_text(json.dumps(old))
    (tmp_path / "s" / png_name(7)).unlink()
    with pytest.warns(UserWarning, match=r"records no weights \(an earlier vqgpt drew these samples\)"):
        assert _run(pipe_dir, out=tmp_path / "s").drawn == 2
    assert {"models", "configs"} <= json.loads(settings.read_text()).keys()
    (tmp_path / "s" / png_name(7)).unlink()
    other = VQGPTPipeline.from_pretrained(pipe_dir)
    with torch.no_grad():
        other.prior.tok_embeddings.weight[0, 0] += 1.0
    with pytest.raises(ValueError, match="drawn by other weights"):  # checked from now on
        sample_many(other, NUM, out=tmp_path / "s", class_labels=torch.arange(NUM) % 3, sampling=CFG, seed=5,
                    batch_size=BATCH, device="cpu", progress=False)


def test_a_folder_without_finished_samples_takes_new_settings(pipe_dir, tmp_path):
    _run(pipe_dir, out=tmp_path / "s")
    for png in (tmp_path / "s").glob("*.png"):
        png.unlink()  # stopped before its first sample: only sampling.json is there
    pipe = VQGPTPipeline.from_pretrained(pipe_dir)
    report = sample_many(pipe, NUM, out=tmp_path / "s", class_labels=torch.arange(NUM) % 3, sampling=CFG, seed=5,
                         batch_size=2, device="cpu", progress=False)  # a smaller batch, as after running out of memory
    assert report.drawn == NUM
    assert '"batch_size": 2' in (tmp_path / "s" / "sampling.json").read_text()  # what the folder's samples used
    with pytest.raises(ValueError, match="batch_size: 2 then, 3 now"):
        _run(pipe_dir, out=tmp_path / "s")


def test_npz_is_in_the_adm_layout(pipe_dir, tmp_path):
    report = _run(pipe_dir, out=tmp_path / "s", npz=tmp_path / "samples.npz")
    with np.load(tmp_path / "samples.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (NUM, 16, 16, 3)
    assert labels.tolist() == [i % 3 for i in range(NUM)]
    from PIL import Image

    for i in range(NUM):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "s" / png_name(i))), images[i])
    # npz only: the PNGs live in a scratch folder, removed afterwards; the same arrays
    _run(pipe_dir, npz=tmp_path / "only.npz")
    with np.load(tmp_path / "only.npz") as f:
        assert np.array_equal(f["arr_0"], images)
    assert not (tmp_path / "only.npz.parts").exists() and report.npz == tmp_path / "samples.npz"


def test_the_same_npz_command_after_it_finished_draws_nothing(pipe_dir, tmp_path, monkeypatch):
    """--npz alone removes its scratch folder: the same command again drew every sample again (hours for 50k).
    The npz records its settings, so it is found complete; other settings draw anew."""
    first = _run(pipe_dir, npz=tmp_path / "only.npz")
    assert first.drawn == NUM
    written = (tmp_path / "only.npz").read_bytes()
    calls = []
    real = sample_many_module.draw_images
    monkeypatch.setattr(sample_many_module, "draw_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = _run(pipe_dir, npz=tmp_path / "only.npz")
    assert (again.drawn, again.skipped, calls) == (0, NUM, [])
    assert (tmp_path / "only.npz").read_bytes() == written and not (tmp_path / "only.npz.parts").exists()
    with np.load(tmp_path / "only.npz") as f:  # beside the ADM evaluator's arrays
        assert sorted(f.files) == ["arr_0", "arr_1", "vqgpt_settings"] and json.loads(str(f["vqgpt_settings"]))
    other = sample_many(VQGPTPipeline.from_pretrained(pipe_dir), NUM, class_labels=torch.arange(NUM) % 3,
                        sampling=CFG, seed=6, batch_size=BATCH, device="cpu", progress=False, npz=tmp_path / "only.npz")
    assert other.drawn == NUM and calls and (tmp_path / "only.npz").read_bytes() != written


def test_an_npz_scratch_folder_that_is_a_link_is_refused_before_sampling(pipe_dir, tmp_path):
    """`--npz mine.npz` with mine.npz.parts a link to the user's sample folder: the scratch folder's removal
    emptied the folder the link names (its PNGs and sampling.json), then failed on the link."""
    _run(pipe_dir, out=tmp_path / "mine")
    before = sorted(p.name for p in (tmp_path / "mine").iterdir())
    (tmp_path / "mine.npz.parts").symlink_to(tmp_path / "mine")
    with pytest.raises(ValueError, match=r"mine.npz.parts is a link \(to .*mine\): remove the link, or choose another"):
        _run(pipe_dir, npz=tmp_path / "mine.npz")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == before and not (tmp_path / "mine.npz").exists()
    (tmp_path / "file.npz.parts").write_text("mine")  # a file there: named as --npz's, not as an --out
    with pytest.raises(ValueError, match=r"--npz .*file.npz draws its samples into .*file.npz.parts/, but that is a "
                                         r"file"):
        _run(pipe_dir, npz=tmp_path / "file.npz")
    with pytest.raises(ValueError, match=r"--npz .*/.npz must have a name before .npz"):
        _run(pipe_dir, npz=tmp_path / ".npz")


def test_per_class_labels_are_balanced():
    labels = class_balanced_labels(3, 2)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.bincount(class_balanced_labels(1000, 50)).tolist() == [50] * 1000
    with pytest.raises(ValueError, match="--num 7 disagrees with --per-class 2.*--num 6"):
        class_balanced_labels(3, 2, num=7)
    with pytest.raises(ValueError, match="class-conditional"):
        class_balanced_labels(0, 2)


@pytest.mark.slow
def test_two_processes_write_bitwise_what_one_process_writes(pipe_dir, tmp_path):
    outputs = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        cmd = ["-m", "vqgpt", "sample", "--pipeline", str(pipe_dir), "--per-class", "3", "--cfg-scale", "2.0",
               "--out", f"{out}/", "--npz", str(tmp_path / f"p{n}.npz"), "--batch-size", "2", "--seed", "3"]
        head = launch_command(2) if n == 2 else [sys.executable]
        done = subprocess.run([*head, *cmd], env=subprocess_env(), capture_output=True, text=True, timeout=600,
                              cwd=ROOT)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("drew 9 samples") == 1, done.stdout  # said once, by rank 0
        assert f"on {n} process" in done.stdout
        outputs[n] = (_pngs(out), (tmp_path / f"p{n}.npz").read_bytes())
    assert len(outputs[1][0]) == 9 and outputs[2] == outputs[1]
    with np.load(tmp_path / "p2.npz") as f:
        assert f["arr_0"].shape == (9, 16, 16, 3) and f["arr_1"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


@pytest.mark.slow
def test_a_failure_on_one_process_stops_every_process_with_its_reason(pipe_dir, tmp_path):
    # batch [2, 4) is process 1's; a folder where its sample 3's temporary file goes fails that write only.
    # The other process used to wait in its next collective and print the lost connection's traceback.
    out = tmp_path / "s"
    (out / ".000003.png.tmp").mkdir(parents=True)
    cmd = ["-m", "vqgpt", "sample", "--pipeline", str(pipe_dir), "--num", "6", "--class-label", "a",
           "--out", f"{out}/", "--batch-size", "2"]
    done = subprocess.run([*launch_command(2), *cmd], env=subprocess_env(), capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode != 0  # (the launcher prints its own traceback for any process that exits non-zero)
    assert "gloo" not in done.stderr and "Connection closed" not in done.stderr, done.stderr[-3000:]
    # process 1's own line (the two processes' stderr lines can interleave, so no line start is asked for)
    assert "error: [Errno 21] Is a directory" in done.stderr, done.stderr[-3000:]
    assert "error: process 1: [Errno 21] Is a directory" in done.stderr, done.stderr[-3000:]  # process 0
    assert "exitcode  : 1" not in done.stderr  # both exit 2: a user error, one line each
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png", "000002.png", "000004.png",
                                                          "000005.png"]
    # a sample name taken by a folder is refused before anything is drawn, on every process alike
    (out / ".000003.png.tmp").rmdir()
    (out / "000003.png").mkdir()
    done = subprocess.run([sys.executable, *cmd], env=subprocess_env(), capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert done.returncode == 2 and "not a file where a sample image is to be written: 000003.png" in done.stderr


def test_a_residual_tokenizers_larger_canvas_moves_its_windows_by_whole_positions(tmp_path):
    """sample_many (sample --out DIR/, --npz, eval-prior's samples) draws what pipe.generate draws: with a
    residual-VQ tokenizer (D codes per position) its sliding windows move D columns at a time, never
    starting mid-position. It used to move one column, and so drew other images than the grid command."""
    from stage2_prior import GPT, GPTConfig
    from test_residual_vq import tiny_rvq_model
    from vqgpt.ground.images import tensor_to_uint8

    tok = tiny_rvq_model().eval()  # factor 2, 2 codes per position
    torch.manual_seed(0)
    prior = GPT(GPTConfig(codebook_size=tok.codebook_size, grid_size=[4, 8], num_classes=0,  # 8 x 8 px
                          n_layer=2, n_head=2, dim=32, multiple_of=16)).eval()
    with torch.no_grad():  # larger weights than at initialisation: the window's context changes the logits
        for p in prior.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5)
    pipe = VQGPTPipeline(tok, prior)
    sharp = SamplingConfig(temperature=0.5)
    sample_many(pipe, 2, npz=tmp_path / "wide.npz", width=16, seed=3, sampling=sharp, batch_size=2, device="cpu",
                progress=False)
    with np.load(tmp_path / "wide.npz") as data:
        drawn = data["arr_0"]
    assert drawn.shape == (2, 8, 16, 3)

    def by_stride(stride):
        codes = generate(prior, 2, grid_size=(4, 16), window_stride=stride, sampling=sharp,
                         generators=_generators([0, 1], seed=3))
        return tensor_to_uint8(tok.decode(codes).clamp(-1, 1)).permute(0, 2, 3, 1).numpy()

    assert np.array_equal(drawn, by_stride((1, 2)))
    assert np.array_equal(drawn, by_stride(None))  # a bare prior's default moves one position too
    with pytest.raises(ValueError, match=r"window_stride \(1, 1\): this prior's tokenizer puts 2 codes side by side"):
        by_stride((1, 1))  # windows that start inside a position are refused


def test_a_run_starting_while_the_npz_scratch_folder_is_removed(pipe_dir, tmp_path, monkeypatch):
    """--npz alone: the scratch folder NPZ.parts/ (its .lock too) is removed once the npz is written. A run
    starting at that moment made a new .lock in the half-removed folder, and the first run then failed."""
    from vqgpt.training.run_folder import RunLock

    npz, later = tmp_path / "only.npz", []
    unlink = Path.unlink

    def arrives(path, *args, **kwargs):
        unlink(path, *args, **kwargs)
        if path.name == ".lock" and not later:  # the second run starts just after the lock file went
            scratch = npz.with_name(npz.name + ".parts")
            scratch.mkdir(exist_ok=True)
            later.append(RunLock(scratch))
            later[0].acquire()

    monkeypatch.setattr(Path, "unlink", arrives)
    _run(pipe_dir, npz=npz)  # does not fail
    assert later and npz.is_file()
    later[0].release()
    assert [p.name for p in tmp_path.iterdir() if p.name != "only.npz"] == ["only.npz.parts"]  # the second run's
