"""Training-speed levers keep the numerics: the AdamW kernel choice and torch.compile of the model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from stage2_prior.model import GPT, GPTConfig
from vqgpt.ground.config import ConfigError
from vqgpt.training import TrainConfig
from vqgpt.training.config import matmul_precision_applied
from vqgpt.training.optim import make_optimizer, optimizer_step


def tiny_prior() -> GPT:
    """A 2-block prior over a 4x4 grid, seeded, without dropout (so eager and compiled see the same ops)."""
    torch.manual_seed(0)
    return GPT(GPTConfig(codebook_size=64, grid_size=[4, 4], num_classes=3, class_dropout=0.0, n_layer=2,
                         n_head=2, dim=32, multiple_of=32)).train()


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` seeded (tokens, labels) batches of 4 grids."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 64, (4, 16), generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(n)]


def train(impl: str, compiled: bool = False, steps: int = 5, backend: str | object = "inductor") \
        -> tuple[list[float], list[torch.Tensor]]:
    """Losses and final parameters of ``steps`` real training steps (accelerate-prepared optimizer,
    ``optimizer_step`` with clipping and weight decay) of the tiny prior."""
    accelerator = Accelerator(cpu=True)
    model = tiny_prior()
    tc = TrainConfig(lr=3e-3, weight_decay=0.1, grad_clip=0.5, optimizer_impl=impl)
    optimizer = accelerator.prepare(make_optimizer(model.parameters(), tc))
    run = torch.compile(model, backend=backend) if compiled else model
    losses = []
    for tokens, labels in batches(steps):
        loss = F.cross_entropy(run(tokens, labels).float().flatten(0, 1), tokens.flatten())
        assert optimizer_step(accelerator, loss, optimizer, model, tc)
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("impl", ["foreach", "fused", "auto"])
def test_adamw_kernels_give_the_for_loop_parameters(impl: str) -> None:
    _, reference = train("for-loop")
    _, params = train(impl)
    for a, b in zip(reference, params):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_auto_picks_the_fused_kernel_on_cpu() -> None:
    # torch defaults to the per-parameter loop for CPU tensors; the fused kernel is the measured fastest.
    optimizer = make_optimizer(tiny_prior().parameters(), TrainConfig())
    assert optimizer.defaults["fused"] is True
    optimizer = make_optimizer(tiny_prior().parameters(), TrainConfig(optimizer_impl="for-loop"))
    assert not optimizer.defaults["fused"] and optimizer.defaults["foreach"] is False


def test_unknown_optimizer_impl_names_the_key() -> None:
    with pytest.raises(ConfigError, match="train.optimizer_impl"):
        TrainConfig(optimizer_impl="apex")


def test_fused_adamw_under_a_grad_scaler_skips_overflowing_steps_like_the_loop() -> None:
    # fp16's loss scaler hands the fused kernel found_inf instead of skipping step() itself.
    results = []
    for impl in ("for-loop", "fused"):
        model = tiny_prior()
        optimizer = make_optimizer(model.parameters(), TrainConfig(lr=3e-3, optimizer_impl=impl))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for i, (tokens, labels) in enumerate(batches(4)):
            loss = F.cross_entropy(model(tokens, labels).flatten(0, 1), tokens.flatten())
            scaler.scale(loss * (float("inf") if i == 2 else 1.0)).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        results.append(([p.detach().clone() for p in model.parameters()], scaler.get_scale()))
    (loop_params, loop_scale), (fused_params, fused_scale) = results
    assert fused_scale == loop_scale < 2.0**10
    for a, b in zip(loop_params, fused_params):  # a step taken by one only would differ by ~lr = 3e-3
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # ~50 s on two cores: inductor compiles the forward and backward graphs with gcc
def test_compiled_training_step_has_the_eager_losses() -> None:
    eager, eager_params = train("auto")
    compiled, compiled_params = train("auto", compiled=True)
    assert len(compiled) == 5
    # Inductor reorders float reductions (~1e-7 relative); a 1% error in the logits moves the loss by ~1e-4.
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-5, atol=1e-6)
    for a, b in zip(eager_params, compiled_params):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)


def tiny_tokenizer(kind: str):
    """A seeded 2-level conv tokenizer on 16x16 images with quantizer ``kind`` (vq: EMA + k-means init)."""
    from stage1_vq.model import VQModel, VQModelConfig
    from stage1_vq.quantizers import QuantizerConfig
    options = {"vq": dict(codebook_size=64, ema=True, kmeans_init=True),
               "vq-restart": dict(codebook_size=64, ema=True, restart_threshold=0.5),
               "fsq": dict(codebook_size=None, fsq_levels=[4, 4, 4]),
               "lfq": dict(codebook_size=None, lfq_dim=6),
               "rvq": dict(codebook_size=32, rvq_depth=2, kmeans_init=True, restart_threshold=0.5)}[kind]
    torch.manual_seed(0)
    return VQModel(VQModelConfig(channels=32, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[],
                                 resolution=16, z_channels=16, norm_groups=8,
                                 quantizer=QuantizerConfig(kind=kind.split("-")[0], **options))).train()


@pytest.mark.parametrize("kind", ["vq", "vq-restart", "fsq", "lfq", "rvq"])
def test_tokenizer_forward_compiles_to_one_graph(kind: str) -> None:
    # Code histograms by scatter-add (not bincount, whose shape depends on the data) and a host-side
    # flag for "k-means done" leave no graph break in a training step's forward after the first step;
    # dead-code restarts run at fixed shapes without reading the number of dead codes on the host.
    import torch._dynamo
    model = tiny_tokenizer(kind)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    model(images)  # the first step runs the one-time k-means initialisation
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(images)
    assert explained.graph_count == 1, [str(b.reason).splitlines()[0] for b in explained.break_reasons]


def test_compiled_tokenizer_step_has_the_eager_losses() -> None:
    # aot_eager: dynamo's graph capture and AOT autograd without inductor's code generation, which
    # takes minutes for a conv net on two cores; the prior test above covers inductor's numerics.
    from stage1_vq.losses import LossConfig, generator_loss
    accelerator = Accelerator(cpu=True)
    images = [torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)) * 2 - 1 for i in range(5)]
    runs = []
    for compiled in (False, True):
        model = tiny_tokenizer("vq")
        tc = TrainConfig(lr=1e-3, grad_clip=1.0)
        optimizer = accelerator.prepare(make_optimizer([p for p in model.parameters() if p.requires_grad], tc))
        run = torch.compile(model, backend="aot_eager") if compiled else model
        losses = []
        for x in images:
            out = run(x)
            g = generator_loss(x, out.reconstruction, out.quantizer.loss, None, None, LossConfig(perceptual_weight=0.0),
                               0, model.last_layer_weight)
            assert optimizer_step(accelerator, g.total, optimizer, model, tc)
            losses.append(g.total.item())
        runs.append(torch.tensor(losses))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-4, atol=1e-5)


def _precision_curve(make_model, step_loss, inputs, precision: str, bf16: bool) -> torch.Tensor:
    """Losses of real training steps (AdamW, clipping) of a fresh seeded model under ``train.matmul_precision``
    ``precision`` (and bf16 autocast where ``bf16``); torch's settings are put back after."""
    with matmul_precision_applied(precision, torch.device("cpu")):
        accelerator, model, tc = Accelerator(cpu=True), make_model(), TrainConfig(lr=3e-3, grad_clip=1.0)
        optimizer = accelerator.prepare(make_optimizer([p for p in model.parameters() if p.requires_grad], tc))
        losses = []
        for batch in inputs:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = step_loss(model, batch)
            assert optimizer_step(accelerator, loss, optimizer, model, tc)
            losses.append(loss.item())
        return torch.tensor(losses)


def _prior_loss(model, batch):
    tokens, labels = batch
    return F.cross_entropy(model(tokens, labels).float().flatten(0, 1), tokens.flatten())


def _tokenizer_loss(model, images):
    return (model(images).reconstruction.float() - images).abs().mean()


@pytest.mark.parametrize("stage", ["prior", "tokenizer"])
def test_medium_matmul_precision_keeps_the_loss_curve_within_bf16_noise(stage: str) -> None:
    """train.matmul_precision=medium (float32 products and convolutions with bf16 operands on a CPU with bf16
    units): over 50 steps its losses stay within 3x as far from float32's as a bf16 autocast run's are
    (calibrated in the same test), and they do differ from float32's (the setting takes effect)."""
    from vqgpt.training.config import cpu_has_fast_bf16
    if stage == "prior":  # (one batch again and again: the loss falls within the 50 steps)
        make, loss, inputs = tiny_prior, _prior_loss, batches(1) * 50
    else:
        make, loss = (lambda: tiny_tokenizer("vq")), _tokenizer_loss
        inputs = [torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1] * 50
    fp32 = _precision_curve(make, loss, inputs, "highest", False)
    if not cpu_has_fast_bf16():  # (no bf16 units: medium warns and keeps float32; CI's CPU has AMX)
        with pytest.warns(UserWarning, match="gains nothing here"):
            with matmul_precision_applied("medium", torch.device("cpu")):
                pass
        return
    medium = _precision_curve(make, loss, inputs, "medium", False)
    bf16 = _precision_curve(make, loss, inputs, "highest", True)
    assert fp32[-1] < 0.9 * fp32[0]  # it trains
    noise = (bf16 - fp32).abs().max()
    assert (medium - fp32).abs().max() > 1e-6
    assert (medium - fp32).abs().max() <= 3 * noise, (medium - fp32, noise)  # (prior 1.7x, tokenizer 0.3x here)


def test_make_accelerator_sets_the_matmul_precision_and_training_puts_it_back(tmp_path) -> None:
    """make_accelerator applies train.matmul_precision (oneDNN's products and convolutions in bf16 at medium);
    a training entry point (keeps_caller_rng) hands the caller's settings back, and an unknown value names
    the key."""
    from vqgpt.training.config import float32_precision, keeps_caller_rng, make_accelerator
    before = float32_precision()
    seen = []

    @keeps_caller_rng
    def run():
        make_accelerator(TrainConfig(matmul_precision="medium"), tmp_path)
        seen.append((float32_precision(), torch.backends.mkldnn.matmul.fp32_precision))

    run()
    assert seen == [(("medium", "bf16"), "bf16")]
    assert float32_precision() == before
    with pytest.raises(ConfigError, match="train.matmul_precision: expected highest | high | medium, got 'bf16'"):
        TrainConfig(matmul_precision="bf16")
