"""A skipped (non-finite) tokenizer step leaves the discriminator's BatchNorm running stats as they were.

The discriminator runs in train mode before the finite decision (the generator's GAN term, then its own step
on real and fake images), so a NaN reconstruction made its running stats NaN for good; the step was dropped,
yet every later checkpoint and the export were refused (NonFiniteWeights) and a train.on_nonfinite=skip run
died. Each good micro-batch runs the discriminator three times (GAN term, real, fake): num_batches_tracked
counts them, so it tells that a dropped micro-batch's forwards were undone, whichever loss was non-finite."""

import json
from pathlib import Path

import pytest
import torch

import stage1_vq.train as tokenizer_train
from stage1_vq.model import VQModel
from stage1_vq.train import TokenizerRunConfig, train_tokenizer
from vqgpt.ground.checkpoint import list_checkpoints
from vqgpt.ground.config import load_config

ROOT = Path(__file__).resolve().parents[1]
NAN = float("nan")
STEPS = 5


def gan_config(*overrides: str) -> TokenizerRunConfig:
    return load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml",
                       ["train.batch_size=4", "train.log_every=1", "train.checkpoint_every=0", f"train.steps={STEPS}",
                        "train.on_nonfinite=skip", "loss.gan_weight=0.1", "loss.disc_start=0", "loss.disc_norm=batch",
                        *overrides])


def keep_discriminator(monkeypatch) -> list[torch.nn.Module]:
    """The run's discriminator, once it is built (the module whose buffers the run trains)."""
    built, build = [], tokenizer_train.build_discriminator

    def building(*args, **kwargs):
        built.append(build(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(tokenizer_train, "build_discriminator", building)
    return built


def nan_reconstruction_at(monkeypatch, call: int) -> None:
    """The reconstruction of the ``call``-th training forward (1-based, counting micro-batches) is NaN."""
    forward, calls = VQModel.forward, [0]

    def nan_once(self, x, *args, **kwargs):
        out = forward(self, x, *args, **kwargs)
        if self.training:
            calls[0] += 1
            if calls[0] == call:
                out = out._replace(reconstruction=out.reconstruction * NAN)
        return out

    monkeypatch.setattr(VQModel, "forward", nan_once)


def nan_discriminator_loss_at(monkeypatch, call: int) -> None:
    """The discriminator's own loss of its ``call``-th step is NaN (the generator's update of it was good)."""
    loss, calls = tokenizer_train.discriminator_loss, [0]

    def nan_once(*args, **kwargs):
        calls[0] += 1
        value = loss(*args, **kwargs)
        return value * NAN if calls[0] == call else value

    monkeypatch.setattr(tokenizer_train, "discriminator_loss", nan_once)


@pytest.mark.parametrize("where, grad_accum", [("reconstruction", 1), ("reconstruction", 2),
                                               ("discriminator_loss", 1)],
                         ids=["gan-term", "gan-term-grad-accum", "disc-step"])
def test_a_skipped_step_after_disc_start_keeps_the_batchnorm_discriminator_finite(tmp_path, monkeypatch, where,
                                                                                 grad_accum):
    built = keep_discriminator(monkeypatch)
    # the third micro-batch: after the k-means init, and the middle one of step 2 under grad_accum 2
    (nan_reconstruction_at if where == "reconstruction" else nan_discriminator_loss_at)(monkeypatch, 3)
    run = tmp_path / "run"
    export = train_tokenizer(gan_config(f"train.grad_accum={grad_accum}"), run)

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    dropped_in = 3 if grad_accum == 1 else 2  # the step that held the NaN micro-batch
    assert [row["skipped"] for row in rows] == [int(row["step"] >= dropped_in) for row in rows]
    assert [step for step, _ in list_checkpoints(run)] == [STEPS]
    exported = VQModel.from_pretrained(export)  # (loading refuses NaN weights, and so would saving)
    assert all(bool(torch.isfinite(t).all()) for t in exported.state_dict().values() if t.is_floating_point())

    disc, = built
    norms = [m for m in disc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms, "loss.disc_norm=batch builds BatchNorm layers"
    good = STEPS * grad_accum - 1  # micro-batches kept; each ran the discriminator three times
    for norm in norms:
        assert torch.isfinite(norm.running_mean).all() and torch.isfinite(norm.running_var).all()
        assert int(norm.num_batches_tracked) == 3 * good


def test_a_dropped_syncing_micro_batch_drops_the_discriminators_accumulated_gradients(tmp_path, monkeypatch):
    """grad_accum 2, NaN on the second (syncing) micro-batch of step 2: the step is dropped, and the gradients
    the discriminator accumulated on its first micro-batch must not join step 3's."""
    from stage1_vq.losses import PatchDiscriminator

    nan_reconstruction_at(monkeypatch, 4)
    step, seen = tokenizer_train.optimizer_step, []

    def logging_step(accelerator, loss, optimizer, model, cfg):
        module = getattr(model, "module", model)
        if isinstance(module, PatchDiscriminator):  # the gradients it holds before this micro-batch's backward
            seen.append(sum(0.0 if p.grad is None else float(p.grad.abs().sum()) for p in module.parameters()))
        return step(accelerator, loss, optimizer, model, cfg)

    monkeypatch.setattr(tokenizer_train, "optimizer_step", logging_step)
    train_tokenizer(gan_config("train.grad_accum=2", "loss.disc_norm=group"), tmp_path / "run")
    # discriminator steps: step 1 (2 micro-batches), step 2's first, then step 3's first: it starts from nothing
    assert len(seen) == 2 * STEPS - 1 and seen[0] == 0.0 and seen[1] > 0.0
    assert seen[3] == 0.0, f"step 3's discriminator started with step 2's dropped gradients (|g| = {seen[3]})"
