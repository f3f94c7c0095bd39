"""The join of the stages: pipeline folders, compatibility checks, sample / complete through the CLI."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from stage1_vq.model import VQModel
from stage2_prior import SamplingConfig
from stage2_prior.model import GPT, GPTConfig
from stage2_prior.sampling import generate
from vqgpt.cli import main
from vqgpt.ground.config import ConfigError, load_config
from vqgpt.workflow.pipeline import VQGPTPipeline, sample_seed

ROOT = Path(__file__).resolve().parents[1]


def tiny_tokenizer() -> VQModel:
    from stage1_vq.train import TokenizerRunConfig

    torch.manual_seed(0)
    return VQModel(load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml").model).eval()


def tiny_prior(codebook_size: int, num_classes: int = 3) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(codebook_size=codebook_size, grid_size=[4, 4], num_classes=num_classes,
                    n_layer=1, n_head=2, dim=32, multiple_of=16)
    return GPT(cfg).eval()


@pytest.fixture()
def pipe_dir(tmp_path):
    tok = tiny_tokenizer()
    pipe = VQGPTPipeline(tok, tiny_prior(tok.codebook_size), classes=["a", "b", "c"])
    pipe.save_pretrained(tmp_path / "pipe")
    return tmp_path / "pipe"


def test_vocabulary_mismatch_is_a_clear_error():
    tok = tiny_tokenizer()
    with pytest.raises(ConfigError, match=r"codebook_size=256.*codebook_size=100"):
        VQGPTPipeline(tok, tiny_prior(100))


def test_prior_from_another_tokenizer_is_refused(tmp_path, pipe_dir):
    other = tiny_tokenizer()
    with torch.no_grad():
        other.decoder.conv_out.weight.add_(1.0)
    other.save_pretrained(tmp_path / "other_tok")
    # a prior export that records the fingerprint of the pipeline's own tokenizer
    from vqgpt.workflow.encode import tokenizer_fingerprint

    prior = GPT.from_pretrained(pipe_dir / "prior")
    prior.save_pretrained(tmp_path / "prior", extra={"tokenizer_fingerprint": tokenizer_fingerprint(pipe_dir / "tokenizer")})
    VQGPTPipeline.from_parts(pipe_dir / "tokenizer", tmp_path / "prior")  # the right pair loads
    with pytest.raises(ConfigError, match="trained on codes of tokenizer"):
        VQGPTPipeline.from_parts(tmp_path / "other_tok", tmp_path / "prior")


def test_generate_sizes_and_bad_pixel_sizes(pipe_dir):
    pipe = VQGPTPipeline.from_pretrained(pipe_dir)
    images = pipe.generate(2, class_labels=1, seed=0)
    assert images.shape == (2, 3, 16, 16)
    # exactly the tokenizer's decoding of the prior's class-1 codes, sample i drawn from its own generator
    generators = [torch.Generator().manual_seed(sample_seed(0, i)) for i in range(2)]
    codes = generate(pipe.prior, 2, class_labels=torch.tensor([1, 1]), generator=generators)
    assert torch.equal(images, pipe.tokenizer.decode(codes).clamp(-1, 1))
    # so a seed's images do not depend on how many are drawn with them (the first of 2 is the one of 1; the
    # same codes, decoded in a batch of another size: equal to float rounding)
    torch.testing.assert_close(pipe.generate(1, class_labels=1, seed=0), images[:1], atol=1e-5, rtol=0)
    wide = pipe.generate(1, class_labels="b", height=16, width=32, seed=0)
    assert wide.shape == (1, 3, 16, 32)
    with pytest.raises(ValueError, match=r"width=30 is not a multiple .* 4: use 28 or 32"):
        pipe.generate(1, class_labels=0, height=16, width=30)
    with pytest.raises(ValueError, match="out of range"):
        pipe.class_index(7)


def test_same_seed_same_images(pipe_dir):
    pipe = VQGPTPipeline.from_pretrained(pipe_dir)
    a = pipe.generate(2, class_labels=[0, 2], sampling=SamplingConfig(cfg_scale=2.0), seed=3)
    b = pipe.generate(2, class_labels=[0, 2], sampling=SamplingConfig(cfg_scale=2.0), seed=3)
    torch.testing.assert_close(a, b)


def test_complete_keeps_the_known_rows(pipe_dir, monkeypatch):
    pipe = VQGPTPipeline.from_pretrained(pipe_dir)
    image = torch.rand(3, 16, 16) * 2 - 1
    codes = pipe.tokenizer.encode(image[None])[0]
    captured = {}
    decode = pipe.tokenizer.decode

    def spy(indices):
        captured["codes"] = indices.clone()
        return decode(indices)

    monkeypatch.setattr(pipe.tokenizer, "decode", spy)
    out = pipe.complete(image, 3, keep_rows=2, extend_right=2, class_labels=0, seed=0)
    assert out.shape == (3, 3, 16, 24)
    kept = captured["codes"][:, :2, :4]
    assert torch.equal(kept, codes[:2].expand_as(kept))


def test_cli_sample_and_complete(pipe_dir, tmp_path, monkeypatch):
    assert main(["sample", "--pipeline", str(pipe_dir), "--num", "2", "--class-label", "c", "--width", "32",
                 "--out", str(tmp_path / "s.png"), "--save-each"]) == 0
    assert Image.open(tmp_path / "s.png").size[0] > 32
    assert len(list((tmp_path / "s").glob("*.png"))) == 2
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "in.png")
    assert main(["complete", "--pipeline", str(pipe_dir), "--image", str(tmp_path / "in.png"), "--keep-rows", "2",
                 "--num", "2", "--class-label", "0", "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").is_file()
    # bfloat16 prior weights: the prior samples in bf16, the tokenizer decodes in fp32
    seen = {}
    original = VQGPTPipeline.generate

    def spy(self, *args, **kwargs):
        seen["prior"] = self.prior.tok_embeddings.weight.dtype
        seen["tokenizer"] = next(self.tokenizer.parameters()).dtype
        return original(self, *args, **kwargs)

    monkeypatch.setattr(VQGPTPipeline, "generate", spy)
    assert main(["sample", "--pipeline", str(pipe_dir), "--num", "2", "--class-label", "c", "--prior-dtype", "bfloat16",
                 "--cfg-scale", "2.0", "--out", str(tmp_path / "bf16.png")]) == 0
    assert seen == {"prior": torch.bfloat16, "tokenizer": torch.float32}
    assert (tmp_path / "bf16.png").is_file()
    # a bad pixel size is reported, not a traceback
    assert main(["sample", "--pipeline", str(pipe_dir), "--num", "1", "--height", "18",
                 "--out", str(tmp_path / "x.png")]) == 2


def test_train_prior_with_tokenizer_writes_a_verified_pipeline(tmp_path):
    from stage2_prior.train import PriorRunConfig
    from vqgpt.ground.checkpoint import export_fingerprint, read_export_meta
    from vqgpt.workflow.encode import tokenizer_fingerprint
    from vqgpt.ground.tokens import TokenShardError, TokenShardWriter
    from vqgpt.workflow.chain import train_prior_with_tokenizer

    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    fingerprint = export_fingerprint(tmp_path / "tok")
    assert tokenizer_fingerprint(tmp_path / "tok") == fingerprint  # the old name stays importable
    grids = torch.randint(0, tok.codebook_size, (8, 8, 8), generator=torch.Generator().manual_seed(0))
    meta = {"tokenizer_fingerprint": fingerprint, "source": "test", "num_classes": 2, "classes": ["a", "b"]}
    with TokenShardWriter(tmp_path / "codes", [8, 8], tok.codebook_size, meta) as writer:
        writer.add(grids, torch.arange(8) % 2)
    cfg = load_config(PriorRunConfig, ROOT / "configs/prior/tiny.yaml",
                      ["train.steps=2", "train.batch_size=4", "train.checkpoint_every=0", f"tokens={tmp_path / 'codes'}"])

    pipeline = train_prior_with_tokenizer(cfg, tmp_path / "run", tmp_path / "tok")
    assert pipeline == tmp_path / "run" / "pipeline"
    assert read_export_meta(pipeline / "prior")["extra"]["tokenizer_fingerprint"] == fingerprint
    assert list((tmp_path / "run" / "samples").glob("*.png"))  # the sample grid was decoded by the tokenizer
    pipe = VQGPTPipeline.from_pretrained(pipeline)
    assert pipe.classes == ["a", "b"] and pipe.prior.config.codebook_size == tok.codebook_size

    other = tiny_tokenizer()
    with torch.no_grad():
        other.decoder.conv_out.weight.add_(1.0)
    other.save_pretrained(tmp_path / "other_tok")
    with pytest.raises(TokenShardError, match="tokenizer"):  # shards made by another tokenizer
        train_prior_with_tokenizer(cfg, tmp_path / "run2", tmp_path / "other_tok")
    assert not (tmp_path / "run2" / "pipeline").exists()


def test_results_are_ordinary_tensors(pipe_dir):
    """What generate / complete return takes in-place edits and autograd like any tensor (an inference
    tensor would refuse both outside inference mode)."""
    pipe = VQGPTPipeline.from_pretrained(pipe_dir)
    images = pipe.generate(1, class_labels=0, seed=0)
    completed = pipe.complete(images[0], 1, keep_rows=2, class_labels=0, seed=0)
    codes = generate(pipe.prior, 1, class_labels=0, generator=torch.Generator().manual_seed(0))
    for out in (images, completed, codes):
        assert not out.is_inference()
    images.add_(1).mul_(0.5)  # the usual [-1, 1] -> [0, 1]
    completed.requires_grad_()
    (completed * 2).sum().backward()
    assert completed.grad is not None


# The program `accelerate launch` runs in the next test: the chain's two pipeline writers, the training
# replaced by a ready prior export, and rank 0's write slowed so that a process that does not wait for it
# finds no pipeline.
_CHAIN_ON_TWO_PROCESSES = '''
import sys, time
from pathlib import Path
from types import SimpleNamespace
from accelerate import PartialState
import vqgpt.workflow.chain as chain
from vqgpt.workflow.pipeline import VQGPTPipeline

parts, work = Path(sys.argv[1]), Path(sys.argv[2])
rank = PartialState(cpu=True).process_index  # the gloo group the trainer's Accelerator would set up
said = open(work / f"rank{rank}.txt", "w")  # (the launched processes' stdout lines interleave)
real_save = VQGPTPipeline.save_pretrained

def slow_save(self, directory):
    time.sleep(2)
    return real_save(self, directory)

VQGPTPipeline.save_pretrained = slow_save
chain.train_prior = lambda cfg, out, **kwargs: parts / "prior"
chain.read_meta = lambda tokens: {"codebook_size": 256}
made = chain.train_prior_with_tokenizer(SimpleNamespace(tokens="-"), work / "run", parts / "tokenizer")
print(f"rank {rank}: made", VQGPTPipeline.from_pretrained(made).prior.config.codebook_size, file=said, flush=True)
again = chain.refresh_run_pipeline(work / "run", parts / "prior")
print(f"rank {rank}: refreshed", again == made, VQGPTPipeline.from_pretrained(again).classes, file=said, flush=True)
try:
    chain.refresh_run_pipeline(work / "run", work / "stranger")
except ValueError as exc:
    print(f"rank {rank}: refused", type(exc).__name__, "trained on codes of tokenizer" in str(exc), file=said,
          flush=True)
'''


@pytest.mark.slow
def test_every_process_gets_the_pipeline_once_it_is_written(tmp_path, pipe_dir):
    """Under accelerate launch the pipeline folder is written by rank 0; the others return it only when it is
    whole (they returned at once and loaded a missing or older one), and a refusal on rank 0 reaches them."""
    import subprocess
    import sys

    from test_distributed import launch_command, subprocess_env

    prior = GPT.from_pretrained(pipe_dir / "prior")
    prior.save_pretrained(tmp_path / "stranger", extra={"tokenizer_fingerprint": "0" * 16})  # another tokenizer's
    script = tmp_path / "chain.py"
    script.write_text(_CHAIN_ON_TWO_PROCESSES)
    done = subprocess.run([*launch_command(2), str(script), str(pipe_dir), str(tmp_path)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for rank in (0, 1):
        said = (tmp_path / f"rank{rank}.txt").read_text().splitlines()
        assert said == [f"rank {rank}: made 256", f"rank {rank}: refreshed True ['a', 'b', 'c']",
                        f"rank {rank}: refused ConfigError True"], said


def test_save_pretrained_writes_only_folders_that_load(tmp_path):
    """From a probe of the Python API: class names changed in place (pipe.classes.append) or a prior swapped in
    (pipe.prior = ...) were saved without a check, and the folder was then refused by from_pretrained; a pair
    made with from_parts(check_fingerprint=False) copied the prior's export naming the other tokenizer, which
    from_pretrained refused too. Now the first two are refused when saving, the third is stamped anew."""
    tok = tiny_tokenizer()
    VQGPTPipeline(tok, tiny_prior(tok.codebook_size), classes=["a", "b", "c"]).save_pretrained(tmp_path / "pipe")
    pipe = VQGPTPipeline.from_pretrained(tmp_path / "pipe")
    pipe.classes.append("d")
    with pytest.raises(ValueError, match=r"pipe.classes no longer fit the prior: 4 class names for a prior of 3"):
        pipe.save_pretrained(tmp_path / "bad")
    pipe.classes = ["a", "b", "c"]
    pipe.prior = tiny_prior(tok.codebook_size, num_classes=5)
    with pytest.raises(ValueError, match=r"3 class names for a prior of 5 classes"):
        pipe.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    # a tokenizer with another decoder (the same codes), paired on purpose without the fingerprint check
    tuned = VQModel.from_pretrained(tmp_path / "pipe" / "tokenizer")
    with torch.no_grad():
        tuned.decoder.conv_out.weight.mul_(1.01)
    tuned.save_pretrained(tmp_path / "tuned")
    paired = VQGPTPipeline.from_parts(tmp_path / "tuned", tmp_path / "pipe" / "prior", check_fingerprint=False)
    paired.save_pretrained(tmp_path / "paired")
    again = VQGPTPipeline.from_pretrained(tmp_path / "paired")
    assert again.classes == ["a", "b", "c"]
    torch.testing.assert_close(again.generate(2, class_labels=[0, 1], seed=0),
                               paired.generate(2, class_labels=[0, 1], seed=0))
