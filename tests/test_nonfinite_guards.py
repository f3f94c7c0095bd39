"""NaN and inf stay out of what a run keeps: a non-finite batch leaves the EMA codebook as it was, grad_clip=0
still drops a non-finite update, no export or checkpoint is written with NaN weights, the stop message's advice
is one a resume accepts, and non-finite logits are an error instead of code 0."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from timm.utils import ModelEmaV3

import stage2_prior.train as prior_train
from dist_check import make_token_shards
from prior_helpers import seeded, tiny_gpt
from stage1_vq.model import VQModel
from stage1_vq.quantizers import VectorQuantizer
from stage1_vq.quantizers.rvq import ResidualVQ
from stage1_vq.train import TokenizerRunConfig, train_tokenizer
from stage2_prior import SamplingConfig, generate, sample_logits
from stage2_prior.highres import complete
from stage2_prior.draw import FiniteWatch, NonFiniteLogits, next_token
from stage2_prior.train import PriorRunConfig, train_prior
from vqgpt.cli import main
from vqgpt.ground.checkpoint import NonFiniteWeights, list_checkpoints, resolve_resume, save_checkpoint, save_export
from vqgpt.ground.config import ConfigError, load_config
from vqgpt.training import NonFiniteLoss, TrainConfig, clip_gradients, make_accelerator

ROOT = Path(__file__).resolve().parents[1]
NAN = float("nan")


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    return make_token_shards(tmp_path_factory.mktemp("nonfinite") / "tokens")


def prior_config(tokens: Path, *overrides: str) -> PriorRunConfig:
    return load_config(PriorRunConfig, ROOT / "configs/prior/tiny.yaml",
                       ["train.log_every=1", "train.warmup_steps=2", "train.batch_size=8", *overrides,
                        f"tokens={tokens}"])


def tokenizer_config(*overrides: str) -> TokenizerRunConfig:
    return load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml",
                       ["train.batch_size=4", "train.log_every=1", "train.checkpoint_every=0", "loss.gan_weight=0",
                        *overrides])


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def all_finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in module.state_dict().values() if t.is_floating_point())


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def latents(n: int = 32, dim: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, dim, 1, n, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- B1: the EMA codebook


EMA_CODEBOOKS = {
    "vq": lambda: VectorQuantizer(16, 4, ema=True, restart_threshold=0.5, kmeans_init=True),
    "rvq": lambda: ResidualVQ(2, 16, 4, ema=True, restart_threshold=0.5, kmeans_init=True),
    "rvq-shared": lambda: ResidualVQ(2, 16, 4, shared_codebook=True, ema=True, restart_threshold=0.5, kmeans_init=True),
}


@pytest.mark.parametrize("kind", list(EMA_CODEBOOKS))
@pytest.mark.parametrize("deferred", [False, True], ids=["one-forward", "micro-batches"])
def test_a_nonfinite_batch_leaves_the_ema_codebook_as_it_was(kind, deferred):
    torch.manual_seed(0)
    quantizer = EMA_CODEBOOKS[kind]().train()
    quantizer(latents())  # k-means init and a first finite update (no code is dead after it)
    before = snapshot(quantizer)
    bad = latents(seed=1)
    bad[0, :, 0, 3] = NAN  # one latent of the batch
    bad[0, 1, 0, 5] = float("inf")
    if deferred:  # a step of two micro-batches, the finite one first: the whole step is left out
        quantizer.set_step_updates("defer")
        quantizer(latents(seed=2))
        quantizer.set_step_updates("finish")
    quantizer(bad)
    quantizer.finish_step()
    quantizer.set_step_updates("every_forward")
    after = snapshot(quantizer)
    for key in before:  # codebook, cluster_size, embed_sum, initialized: bit for bit
        assert torch.equal(after[key], before[key]), key
    quantizer(latents(seed=3))  # and the next finite batch updates as usual
    sums = next(key for key in before if key.endswith("embed_sum"))
    assert all_finite(quantizer) and not torch.equal(quantizer.state_dict()[sums], before[sums])


@pytest.mark.parametrize("ema", [False, True])
def test_dead_codes_are_never_restarted_with_nonfinite_latents(ema):
    torch.manual_seed(0)
    quantizer = VectorQuantizer(16, 4, ema=ema, restart_threshold=100.0).train()  # every code dead each step
    codebook = quantizer.embedding.weight.detach().clone()
    quantizer(latents() * NAN)
    assert torch.equal(quantizer.embedding.weight, codebook)  # no finite candidate: nothing restarted
    some = latents(seed=1)
    some[0, :, 0, ::2] = NAN  # half the candidates are NaN
    out = quantizer(some)
    assert all_finite(quantizer) and 0 < float(out.stats["restarted"]) < 16


def test_a_nonfinite_first_batch_does_not_seed_the_kmeans_init():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(16, 4, ema=True, kmeans_init=True).train()
    bad = latents()
    bad[0, 0, 0, 0] = NAN
    quantizer(bad)
    assert not bool(quantizer.initialized) and all_finite(quantizer)
    quantizer(latents(seed=1))  # the first finite batch does
    assert bool(quantizer.initialized) and all_finite(quantizer)


def test_a_skipped_tokenizer_step_with_nonfinite_latents_keeps_the_export_finite(tmp_path, monkeypatch):
    forward, calls = VectorQuantizer.forward, [0]

    def nan_latents_once(self, z):
        if self.training:
            calls[0] += 1
            if calls[0] == 3:  # the third training step's latents: after the k-means init
                z = z * NAN
        return forward(self, z)

    monkeypatch.setattr(VectorQuantizer, "forward", nan_latents_once)
    export = train_tokenizer(tokenizer_config("train.steps=5", "train.on_nonfinite=skip"), tmp_path / "run")
    assert [row["skipped"] for row in read_metrics(tmp_path / "run")] == [0, 0, 1, 1, 1]
    assert all_finite(VQModel.from_pretrained(export))  # (loading refuses NaN weights, and so would saving)
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [5]


# ----------------------------------------------------------------------------- B1: no NaN export or checkpoint


@dataclass
class TinyConfig:
    width: int = 3


def test_save_export_refuses_nan_weights_naming_the_tensor_and_folder(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    with torch.no_grad():
        model[1].bias[0] = NAN
    target = tmp_path / "export"
    save_export(tmp_path / "good", "test", TinyConfig(), torch.nn.Linear(3, 3))  # (a finite one is written)
    with pytest.raises(NonFiniteWeights, match=r"export: refusing to export weights holding NaN or inf values: "
                                               r"1\.bias \(1 of 2 values\)"):
        save_export(target, "test", TinyConfig(), model)
    assert not target.exists()


def test_save_checkpoint_refuses_nan_state_and_keeps_the_earlier_checkpoints(tmp_path):
    accelerator = make_accelerator(TrainConfig(), tmp_path)
    model = accelerator.prepare(torch.nn.Linear(3, 3))
    run = tmp_path / "run"
    save_checkpoint(accelerator, run, 1)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteWeights, match=r"step-00000002: refusing to write a checkpoint holding NaN or inf "
                                               r"values, first in model 0: weight"):
        save_checkpoint(accelerator, run, 2)
    assert [step for step, _ in list_checkpoints(run)] == [1]
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_a_run_whose_weights_turn_nan_exits_nonzero_naming_them(tokens, tmp_path, monkeypatch, capsys):
    """The last line of defence: should NaN reach the state past the finite checks (here: the EMA copy), the
    checkpoint is refused, the earlier one stays the last good one and the command fails with the message."""
    update = ModelEmaV3.update

    def nan_ema(self, model, step=None):
        update(self, model, step=step)
        if step == 3:
            with torch.no_grad():
                next(self.module.parameters()).view(-1)[0] = NAN
    monkeypatch.setattr(ModelEmaV3, "update", nan_ema)
    run = tmp_path / "run"
    code = main(["train-prior", "--config", str(ROOT / "configs/prior/tiny.yaml"), "--tokens", str(tokens),
                 "--out", str(run), "--set", "train.steps=6", "--set", "train.batch_size=8",
                 "--set", "train.checkpoint_every=2", "--set", "train.ema_decay=0.9"])
    err = capsys.readouterr().err
    assert code == 3  # as a non-finite loss exits (docs/architecture.md)
    assert "step-00000004: refusing to write a checkpoint holding NaN or inf values, first in ModelEmaV3" in err
    assert resolve_resume(run, "auto").name == "step-00000002"
    assert not (run / "export").exists()


# ----------------------------------------------------------------------------- B2: grad_clip=0


def test_clip_gradients_off_still_reports_a_nonfinite_norm(tmp_path):
    accelerator = make_accelerator(TrainConfig(), tmp_path)
    model = accelerator.prepare(torch.nn.Linear(3, 2))
    cfg = TrainConfig(grad_clip=0.0)
    for p in model.parameters():
        p.grad = torch.full_like(p, 100.0)  # a norm far above any clip: left as it is
    assert clip_gradients(accelerator, model.parameters(), cfg)
    assert all(bool((p.grad == 100.0).all()) for p in model.parameters())
    model.bias.grad[0] = NAN
    assert not clip_gradients(accelerator, model.parameters(), cfg)


def test_grad_clip_zero_stops_at_a_nonfinite_gradient(tokens, tmp_path, monkeypatch):
    inner = prior_train.next_token_loss

    def infinite_gradient(logits, tokens):  # a finite loss whose backward is not (d sqrt|x| / dx at 0)
        return inner(logits, tokens) + (logits - logits.detach()).abs().sqrt().sum()
    monkeypatch.setattr(prior_train, "next_token_loss", infinite_gradient)
    with pytest.raises(NonFiniteLoss, match="at step 1;.*no checkpoint was written yet"):
        train_prior(prior_config(tokens, "train.steps=3", "train.grad_clip=0"), tmp_path / "run")


# ----------------------------------------------------------------------------- B3: the stop message


def nan_loss_at(monkeypatch, call: int) -> None:
    """The prior's loss is NaN at its ``call``-th computation (1-based), finite at every other."""
    inner, calls = prior_train.next_token_loss, [0]

    def nan_once(*args):
        calls[0] += 1
        return inner(*args) * (NAN if calls[0] == call else 1.0)
    monkeypatch.setattr(prior_train, "next_token_loss", nan_once)


def test_the_stop_message_advises_only_what_a_resume_accepts(tokens, tmp_path, monkeypatch):
    run = tmp_path / "run"
    nan_loss_at(monkeypatch, 3)
    cfg = ("train.steps=4", "train.checkpoint_every=2")
    with pytest.raises(NonFiniteLoss) as info:
        train_prior(prior_config(tokens, *cfg), run)
    message = str(info.value)
    assert "Lower train.lr" not in message
    assert "--set train.on_nonfinite=skip" in message and "start a new run" in message
    assert "a resume keeps those" in message
    monkeypatch.undo()
    # what it says a resume refuses, it refuses; what it offers, a resume takes
    with pytest.raises(ConfigError, match="train.lr: 0.003 -> 1e-05"):
        train_prior(prior_config(tokens, *cfg, "train.lr=1e-5"), run, resume="auto")
    train_prior(prior_config(tokens, *cfg, "train.on_nonfinite=skip"), run, resume="auto")
    assert read_metrics(run)[-1]["step"] == 4


def test_the_stop_message_before_any_checkpoint_offers_a_fresh_run_with_new_settings(tokens, tmp_path, monkeypatch):
    """With nothing to resume, --resume auto starts afresh and takes a new lr: the message says so."""
    run = tmp_path / "run"
    nan_loss_at(monkeypatch, 1)
    with pytest.raises(NonFiniteLoss) as info:
        train_prior(prior_config(tokens, "train.steps=2"), run)
    message = str(info.value)
    assert "no checkpoint was written yet" in message and "a resume keeps those" not in message
    assert "run again (--resume auto or --overwrite starts this folder afresh) with a lower train.lr" in message
    train_prior(prior_config(tokens, "train.steps=2", "train.lr=1e-5", "train.warmup_steps=1"), run, resume="auto")
    assert read_metrics(run)[-1]["step"] == 2


# ----------------------------------------------------------------------------- B4: non-finite logits


def test_nonfinite_logits_are_an_error_not_code_zero():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, 1.0, 2.0], [1.0, 0.0, 3.0]])
    for value in (NAN, float("inf")):
        bad = logits.clone()
        bad[1, 1] = value
        for temperature in (0.0, 1.0, 0.7):
            with pytest.raises(NonFiniteLogits, match=r"non-finite logits .* for sample rows \[1\]"):
                sample_logits(bad, temperature, generator=seeded())
    masked = logits.clone()
    masked[:, 0] = float("-inf")  # a filtered token: still a draw
    assert sample_logits(masked, 0.0).tolist() == [1, 2, 2]
    with pytest.raises(NonFiniteLogits, match="at raster position 7"):  # nothing left to draw from
        next_token(torch.full((1, 3), float("-inf")), False, 1.0, SamplingConfig(), seeded(), position=7)


def test_a_prior_with_overflowing_weights_fails_to_sample():
    model = tiny_gpt()
    with torch.no_grad():
        model.output.weight.mul_(1e38)
    with pytest.raises(NonFiniteLogits, match="non-finite logits"):
        generate(model, 2, class_labels=[0, 1], generator=seeded())


def test_sampling_names_the_first_raster_position_whose_logits_overflow():
    model = tiny_gpt()
    with torch.no_grad():
        model.output.weight.mul_(1e38)
    with pytest.raises(NonFiniteLogits, match="at raster position 0 "):
        generate(model, 2, class_labels=[0, 1], generator=seeded())
    h, w = model.grid_size
    with pytest.raises(NonFiniteLogits, match="at raster position 0 "):  # the sliding-window sampler too
        generate(model, 1, class_labels=[0], grid_size=(h + 1, w), generator=seeded())


def test_an_accelerator_watch_raises_once_the_call_is_done_naming_the_first_position():
    watch = FiniteWatch(torch.device("cpu"), 11)
    watch.deferred = True  # as on a GPU: nothing raises (no host sync) before done()
    watch.see(torch.tensor([1.0, 2.0]), 3)
    watch.done()  # all finite so far
    watch.see(torch.tensor([1.0, NAN]), 5)
    watch.see(torch.tensor([float("inf")]), 9)
    watch.see(torch.tensor([1.0, 2.0]), 10)
    with pytest.raises(NonFiniteLogits, match="at raster position 5:"):
        watch.done()


def test_a_known_cell_is_not_checked_and_the_error_names_the_samples_drawn():
    """complete() computes the logits of every row but keeps only the unknown cells' draws: a sample whose
    cells are all known may have broken logits (here its class is NaN) without failing the others."""
    model = tiny_gpt()
    with torch.no_grad():
        model.class_embedding.weight[0] = NAN
    h, w = model.grid_size
    tokens = torch.randint(0, model.config.codebook_size, (3, h, w), generator=seeded(5))
    known = torch.zeros(3, h, w, dtype=torch.bool)
    known[0] = True  # sample 0 (class 0) is whole: nothing of it is drawn
    for generator in (seeded(), [seeded(i) for i in range(3)]):  # one generator, and one per sample
        out = complete(model, tokens, known_mask=known, class_labels=[0, 1, 2], generator=generator)
        assert torch.equal(out[0], tokens[0]) and not torch.equal(out[1:], tokens[1:])
    known[0], known[1] = False, True  # sample 0 is drawn now, sample 1 is whole
    for generator in (seeded(), [seeded(i) for i in range(3)]):
        with pytest.raises(NonFiniteLogits, match=r"for sample rows \[0\] "):
            complete(model, tokens, known_mask=known, class_labels=[0, 1, 2], generator=generator)
    known[:] = False
    known[0] = known[1] = True  # only sample 2 is drawn: the error names it, not its row in the subset drawn
    with torch.no_grad():
        model.class_embedding.weight[2] = NAN
    for generator in (seeded(), [seeded(i) for i in range(3)]):
        with pytest.raises(NonFiniteLogits, match=r"for sample rows \[2\] "):
            complete(model, tokens, known_mask=known, class_labels=[0, 1, 2], generator=generator)


def test_one_row_of_nonfinite_logits_without_a_batch_dimension_is_the_same_error():
    for temperature in (0.0, 1.0, 0.7):
        with pytest.raises(NonFiniteLogits, match=r"sample rows \[0\]"):
            sample_logits(torch.tensor([1.0, NAN, 3.0]), temperature, generator=seeded())
    assert sample_logits(torch.tensor([1.0, 5.0, 3.0]), 0.0).item() == 1
