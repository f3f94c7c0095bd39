"""Gradient accumulation trains the quantizers like one batch: their training bookkeeping (EMA codebook
sums and counts, dead-code restarts, the usage window, the step's histogram behind 'perplexity') runs
once per optimizer step over all its micro-batches (``set_step_updates`` / ``finish_step``)."""

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stage1_vq.quantizers import FSQ, LFQ, ResidualVQ, VectorQuantizer
from stage1_vq.train import TokenizerRunConfig, train_tokenizer
from vqgpt.ground.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DIM, SIDE = 4, 4  # latents (B, DIM, SIDE, SIDE)


def latents(step: int, batch: int = 8, dim: int = DIM) -> torch.Tensor:
    return torch.randn(batch, dim, SIDE, SIDE, generator=torch.Generator().manual_seed(100 + step))


def spread_codebook(vq: VectorQuantizer, seed: int = 0) -> VectorQuantizer:
    """Codes spread like the latents (the default init is tiny: every latent would pick a few codes)."""
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.randn(vq.embedding.weight.shape, generator=torch.Generator().manual_seed(seed)))
        if vq.ema:
            vq.embed_sum.copy_(vq.embedding.weight * vq.cluster_size.unsqueeze(1))
    return vq.train()


def one_batch_steps(quantizer, steps: int) -> list[dict[str, torch.Tensor]]:
    """Each step one forward of the whole batch (the default: every forward is a step)."""
    return [quantizer(latents(s)).stats for s in range(steps)]


def micro_batch_steps(quantizer, steps: int, parts: int = 2, last_empty: bool = False) -> list[dict[str, torch.Tensor]]:
    """Each step the same batch in ``parts`` micro-batches, the last one finishing the step (or, with
    ``last_empty``, all deferred and the step applied by ``finish_step``, as after an empty micro-batch)."""
    rows = []
    for s in range(steps):
        chunks = latents(s).chunk(parts)
        for i, chunk in enumerate(chunks):
            quantizer.set_step_updates("finish" if i == parts - 1 and not last_empty else "defer")
            stats = quantizer(chunk).stats
            assert "usage" not in stats and "perplexity" not in stats and "restarted" not in stats
        rows.append(quantizer.finish_step())
        assert quantizer.finish_step() == {}  # handed out once
    quantizer.set_step_updates("every_forward")
    return rows


def assert_state_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for key in sa:
        torch.testing.assert_close(sb[key], sa[key], rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(b.last_hit_step, a.last_hit_step, rtol=0, atol=0)
    torch.testing.assert_close(b.usage_step, a.usage_step, rtol=0, atol=0)


def assert_stats_equal(one: list[dict], micro: list[dict], keys: list[str]) -> None:
    for step, (a, b) in enumerate(zip(one, micro, strict=True)):
        for key in keys:
            torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-6, msg=f"step {step + 1} {key}")


@pytest.mark.parametrize("last_empty", [False, True], ids=["finishing-forward", "empty-last-micro-batch"])
def test_vq_ema_micro_batches_update_like_one_batch(last_empty):
    one = spread_codebook(VectorQuantizer(32, DIM, ema=True, ema_decay=0.8, usage_window=2))
    micro = copy.deepcopy(one)
    rows_one, rows_micro = one_batch_steps(one, 4), micro_batch_steps(micro, 4, last_empty=last_empty)
    assert_state_equal(one, micro)  # embedding, cluster_size, embed_sum; the usage window
    assert_stats_equal(rows_one, rows_micro, ["usage", "perplexity", "restarted"])
    assert int(micro.usage_step) == 4  # the window counts steps, not micro-batches
    assert 0 < float(rows_micro[-1]["usage"]) < 1
    # nothing pending is left, and none of it is model state
    assert micro._pending_hits is None and micro._pending_update is None
    assert set(micro.state_dict()) == {"embedding.weight", "cluster_size", "embed_sum"}


def recording_dead_codes(vq: VectorQuantizer) -> list[torch.Tensor]:
    """Record, at each restart, which codes were dead (their EMA hit count below the threshold)."""
    dead, restart = [], vq._restart_dead_codes

    def recorded(flat):
        dead.append(vq.cluster_size < vq.restart_threshold)
        return restart(flat)

    vq._restart_dead_codes = recorded
    return dead


def test_vq_restarts_once_per_step_from_the_last_micro_batch():
    # threshold 1 hit per step: with 8 x 16 latents over 64 codes many codes are dead. Only the first
    # step is compared: the candidates differ (the last micro-batch's latents against the whole batch's),
    # so from then on the codebooks do too.
    one = spread_codebook(VectorQuantizer(64, DIM, ema=True, ema_decay=0.5, restart_threshold=1.0))
    micro = copy.deepcopy(one)
    dead_one, dead_micro = recording_dead_codes(one), recording_dead_codes(micro)
    torch.manual_seed(0)
    n_one = one(latents(0)).stats["restarted"]
    torch.manual_seed(0)
    rows = micro_batch_steps(micro, 3, parts=4)
    assert len(dead_micro) == 3  # one restart per step, not per micro-batch
    assert torch.equal(dead_one[0], dead_micro[0])  # the same codes were dead
    dead = dead_micro[0]
    assert float(n_one) == float(rows[0]["restarted"]) == float(dead.sum()) > 0
    assert [float(r["restarted"]) for r in rows] == [float(d.sum()) for d in dead_micro]
    # after the first step the live codes agree; the dead ones were re-seeded from the last micro-batch
    first = spread_codebook(VectorQuantizer(64, DIM, ema=True, ema_decay=0.5, restart_threshold=1.0))
    torch.manual_seed(0)
    micro_batch_steps(first, 1, parts=4)
    torch.testing.assert_close(first.embedding.weight[~dead], one.embedding.weight[~dead])
    torch.testing.assert_close(first.cluster_size, one.cluster_size)
    last = latents(0).chunk(4)[3].permute(0, 2, 3, 1).reshape(-1, DIM)
    assert (first.embedding.weight[dead].unsqueeze(1) == last).all(-1).any(1).all()


@pytest.mark.parametrize("shared", [False, True], ids=["per-depth", "shared"])
def test_rvq_micro_batches_update_like_one_batch(shared):
    one = ResidualVQ(3, 16, DIM, shared_codebook=shared, ema=True, ema_decay=0.8, usage_window=2).train()
    for layer in one.layers:
        spread_codebook(layer)
    micro = copy.deepcopy(one)
    rows_one, rows_micro = one_batch_steps(one, 3), micro_batch_steps(micro, 3)
    assert_state_equal(one, micro)
    keys = ["usage", "perplexity", "restarted", *(f"{k}_d{d}" for d in range(3) for k in ("usage", "perplexity"))]
    assert_stats_equal(rows_one, rows_micro, keys)
    assert int(micro.usage_step) == 3


@pytest.mark.parametrize("kind", ["fsq", "lfq"])
def test_fsq_and_lfq_usage_counts_steps_over_all_micro_batches(kind):
    one = (FSQ([4, 4, 2, 2], usage_window=2) if kind == "fsq" else LFQ(DIM, usage_window=2)).train()
    micro = copy.deepcopy(one)
    rows_one, rows_micro = one_batch_steps(one, 4), micro_batch_steps(micro, 4, parts=4)
    assert_stats_equal(rows_one, rows_micro, ["usage", "perplexity"])
    assert torch.equal(micro.last_hit_step, one.last_hit_step) and int(micro.usage_step) == 4


def test_the_default_mode_and_eval_are_unchanged():
    vq = spread_codebook(VectorQuantizer(32, DIM, ema=True))
    stats = vq(latents(0)).stats  # every training forward is a step, with its statistics
    assert {"usage", "perplexity", "restarted"} <= set(stats) and int(vq.usage_step) == 1
    assert vq.finish_step() == {}
    vq.set_step_updates("defer")
    vq.eval()
    assert "usage" in vq(latents(1)).stats and vq.finish_step() == {}  # eval forwards never defer
    with pytest.raises(ValueError, match="step updates"):
        vq.set_step_updates("sometimes")


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tokenizer_with_grad_accum_trains_like_the_whole_batch(tmp_path):
    common = ["data.resolution=16", "model.resolution=16", "train.log_every=1", "train.steps=3",
              "train.warmup_steps=1", "loss.gan_weight=0", "model.quantizer.ema=true",
              "model.quantizer.kmeans_init=false", "model.quantizer.restart_threshold=0",
              "model.quantizer.usage_window=2", "train.checkpoint_every=0"]
    for name, overrides in (("whole", ["train.batch_size=8"]), ("accum", ["train.batch_size=4", "train.grad_accum=2"])):
        train_tokenizer(load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml", [*common, *overrides]),
                        tmp_path / name)
    whole, accum = load_file(str(tmp_path / "whole/export/model.safetensors")), \
        load_file(str(tmp_path / "accum/export/model.safetensors"))
    assert set(whole) == set(accum)
    for key in whole:
        # (an attention key bias adds q.b to each of a query's scores alike, which its softmax ignores: its
        # gradient is rounding noise, which AdamW's normalised step turns into steps of about the lr, so the
        # two runs' rounding leaves it apart by a little more on some CPUs: 1.3e-5 on an Intel Xeon)
        atol = 1e-4 if re.search(r"\.attn\.\d+\.k\.bias$", key) else 1e-5
        torch.testing.assert_close(accum[key], whole[key], rtol=0, atol=atol, msg=key)
    rows_whole, rows_accum = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "accum")
    assert [r["step"] for r in rows_accum] == [1, 2, 3]
    for a, b in zip(rows_whole, rows_accum, strict=True):
        for key in ("usage", "perplexity", "restarted"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (a["step"], key)
        for key in ("loss", "rec_loss", "quant_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)


def test_a_second_optimizer_keeps_its_accumulated_gradients_under_fp16_loss_scaling(tmp_path):
    """The tokenizer's step order under grad_accum: each micro-batch the generator, then the discriminator,
    each clipped on the syncing one. With fp16's loss scaler, accelerate's clip unscaled every optimizer's
    gradients at the generator's clip, so the discriminator's earlier micro-batches were divided by the
    scale twice (lost). Its update must be the one without a scaler."""
    from vqgpt.training.config import TrainConfig, make_accelerator
    from vqgpt.training.optim import optimizer_step

    def run(scaler: bool) -> torch.Tensor:
        # clipping never binds: only the unscaling matters
        cfg = TrainConfig(grad_accum=2, grad_clip=1e6, mixed_precision="fp16")
        with pytest.warns(UserWarning, match="fp16 needs a GPU"):
            accelerator = make_accelerator(cfg, tmp_path)
        if scaler:  # fp16's GradScaler, on a CPU (accelerate makes one for a GPU only)
            accelerator.native_amp, accelerator.scaler = True, torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
        torch.manual_seed(0)
        gen, disc = torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 1, bias=False)
        opt_g, opt_d = torch.optim.SGD(gen.parameters(), lr=1.0), torch.optim.SGD(disc.parameters(), lr=1.0)
        opt_g, opt_d = accelerator.prepare(opt_g, opt_d)  # the models unprepared: fp32 forwards, no autocast
        start = disc.weight.detach().clone()
        for micro in range(2):
            x = torch.randn(8, 4, generator=torch.Generator().manual_seed(micro))
            with accelerator.accumulate(gen, disc):
                assert optimizer_step(accelerator, gen(x).square().mean(), opt_g, gen, cfg)
                assert optimizer_step(accelerator, disc(gen(x).detach()).mean(), opt_d, disc, cfg)
        return disc.weight.detach() - start

    torch.testing.assert_close(run(True), run(False), rtol=1e-5, atol=1e-7)
