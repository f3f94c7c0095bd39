"""Samplers: filtering, reproducibility, KV cache vs recomputation, classifier-free guidance, overfitting."""

import math

import numpy as np
import pytest
import torch

from prior_helpers import seeded, tiny_gpt
from stage2_prior import GPT, GPTConfig, SamplingConfig, generate, sample_logits, top_k_filter, top_p_filter
from stage2_prior.highres import generate_highres
from stage2_prior.sampling import cfg_scales

GREEDY = SamplingConfig(temperature=0.0)


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    kept = torch.isfinite(top_k_filter(logits, 2))
    assert kept.tolist() == [[False, True, False, True, False], [True, True, False, False, False]]
    torch.testing.assert_close(top_k_filter(logits, 2)[kept], logits[kept])
    assert torch.equal(top_k_filter(logits, 5), logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    keep = lambda p: torch.isfinite(top_p_filter(logits, p)).tolist()[0]  # noqa: E731
    assert keep(0.4) == [False, True, False, False]  # 0.5 alone reaches 0.4
    assert keep(0.7) == [False, True, False, True]  # 0.5 + 0.3
    assert keep(0.9) == [False, True, True, True]  # 0.5 + 0.3 + 0.15
    assert keep(0.99) == [True, True, True, True]
    assert keep(1.0) == [True, True, True, True]
    assert keep(1e-6) == [False, True, False, False]  # the most likely token always stays


def test_sample_logits_respects_filters_and_distribution():
    logits = torch.tensor([0.1, 0.2, 0.3, 0.4]).log().expand(20000, 4)
    g = seeded()
    draws = sample_logits(logits, 1.0, generator=g)
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    torch.testing.assert_close(freq, logits[0].exp(), atol=0.015, rtol=0)
    assert set(sample_logits(logits, 1.0, top_k=2, generator=g).tolist()) == {2, 3}
    assert set(sample_logits(logits, 1.0, top_p=0.6, generator=g).tolist()) == {2, 3}  # 0.4 + 0.3
    assert torch.all(sample_logits(logits, 0.0) == 3)
    assert torch.all(sample_logits(logits, 1.0, top_k=1, generator=g) == 3)


def test_seeded_generation_is_reproducible():
    model = tiny_gpt()
    a = generate(model, 4, class_labels=[0, 1, 2, 0], generator=seeded(3))
    b = generate(model, 4, class_labels=[0, 1, 2, 0], generator=seeded(3))
    c = generate(model, 4, class_labels=[0, 1, 2, 0], generator=seeded(4))
    assert a.shape == (4, 3, 4) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("knobs", [
    dict(temperature=0.0),
    dict(temperature=1.0),
    dict(temperature=0.8, top_k=5, top_p=0.9),
    dict(temperature=1.0, cfg_scale=3.0),
    dict(temperature=1.0, cfg_scale=2.0, cfg_schedule="linear"),
])
def test_cached_and_uncached_sampling_agree(knobs):
    model = tiny_gpt()
    cached = generate(model, 3, class_labels=[2, 0, 1], sampling=SamplingConfig(**knobs), use_cache=True,
                      generator=seeded())
    full = generate(model, 3, class_labels=[2, 0, 1], sampling=SamplingConfig(**knobs), use_cache=False,
                    generator=seeded())
    assert torch.equal(cached, full)


def test_unconditional_prior_samples():
    model = tiny_gpt(num_classes=0)
    cached = generate(model, 2, generator=seeded())
    assert torch.equal(cached, generate(model, 2, use_cache=False, generator=seeded()))
    assert cached.shape == (2, 3, 4) and 0 <= cached.min() and cached.max() < 16
    with pytest.raises(ValueError, match="unconditional"):
        generate(model, 2, class_labels=1)
    with pytest.raises(ValueError, match="unconditional"):
        generate(model, 2, sampling=SamplingConfig(cfg_scale=2.0))


def _reference_greedy(model: GPT, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """Independent greedy loop on model.forward, CFG combined by hand."""
    B, T = labels.numel(), model.seq_len
    seq = torch.zeros(B, T, dtype=torch.long)
    null = torch.full_like(labels, model.null_class)
    with torch.no_grad():
        for t in range(T):
            cond = model(seq[:, : t + 1], labels)[:, -1]
            logits = cond if scale == 1.0 else model(seq[:, : t + 1], null)[:, -1] * (1 - scale) + cond * scale
            seq[:, t] = logits.argmax(-1)
    return seq.view(B, *model.grid_size)


def _greedy_with_model_batches(model, labels, cfg_scale):
    """Greedy samples, and the set of batch sizes the model ran with."""
    batches = []
    hook = model.tok_embeddings.register_forward_hook(lambda m, a, out: batches.append(out.shape[0]))
    greedy = SamplingConfig(temperature=0.0, cfg_scale=cfg_scale)
    out = generate(model, len(labels), class_labels=labels, sampling=greedy)
    hook.remove()
    return out, set(batches)


def test_cfg_scale_one_is_the_conditional_model_without_a_null_batch():
    model = tiny_gpt()
    labels = torch.tensor([0, 1, 2])
    out, batches = _greedy_with_model_batches(model, labels, 1.0)
    assert batches == {3}  # the null half never runs
    assert torch.equal(out, _reference_greedy(model, labels, 1.0))


def test_cfg_combines_conditional_and_null_logits():
    model = tiny_gpt()
    labels = torch.tensor([0, 1, 2])
    out, batches = _greedy_with_model_batches(model, labels, 4.0)
    assert batches == {6}  # conditional and null rows in one forward
    assert torch.equal(out, _reference_greedy(model, labels, 4.0))
    assert not torch.equal(out, _reference_greedy(model, labels, 1.0))


def test_class_conditioning_changes_samples():
    model = tiny_gpt()
    grids = [generate(model, 1, class_labels=k, sampling=GREEDY) for k in range(3)]
    assert not torch.equal(grids[0], grids[1]) or not torch.equal(grids[1], grids[2])


def test_cfg_schedule_and_argument_errors():
    assert cfg_scales(3.0, "constant", 4) == [3.0] * 4
    assert cfg_scales(3.0, "linear", 4) == [1.5, 2.0, 2.5, 3.0]
    model = tiny_gpt()
    with pytest.raises(ValueError, match="cfg_schedule"):
        SamplingConfig(cfg_scale=2.0, cfg_schedule="cosine")
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 3\)"):
        generate(model, 1, class_labels=3)
    with pytest.raises(ValueError, match="class-conditional"):
        generate(model, 1)
    with pytest.raises(ValueError, match="4 entries"):
        generate(model, 4, class_labels=[0, 1])
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=1.5)
    with pytest.raises(ValueError, match="null class"):
        generate(tiny_gpt(class_dropout=0.0), 1, class_labels=0, sampling=SamplingConfig(cfg_scale=2.0))


def test_generate_keeps_train_mode_and_dispatches_large_grids():
    model = tiny_gpt().train()
    big = generate(model, 2, class_labels=1, grid_size=(5, 6), generator=seeded())
    assert model.training
    model.eval()
    assert big.shape == (2, 5, 6)
    assert torch.equal(big, generate_highres(model, 2, 5, 6, class_labels=1, generator=seeded()))


def test_threads_sampling_one_train_mode_model_share_its_eval_mode():
    """Two samplers on one model in train mode, their eval_mode spans overlapping (threads): the first to
    leave put the model back in train mode while the other still sampled (dropout in its samples), and the
    last left it in eval mode."""
    from stage2_prior.draw import eval_mode

    model = tiny_gpt().train()
    first = eval_mode(model)
    first.__enter__()
    second = eval_mode(model)  # made while the first holds the model in eval mode
    second.__enter__()
    first.__exit__(None, None, None)
    assert not model.training  # the second still samples
    second.__exit__(None, None, None)
    assert model.training  # the mode the model had before either


def test_tiny_prior_overfits_and_reproduces_its_grids():
    torch.manual_seed(0)
    V, grids = 16, torch.randint(0, 16, (4, 4, 4))
    grids[:, 0, 0] = torch.tensor([0, 1, 2, 3])  # distinct first tokens: the unconditional prior picks one
    data = grids.flatten(1)
    for num_classes in (4, 0):
        torch.manual_seed(1)
        model = GPT(GPTConfig.from_preset("tiny", codebook_size=V, grid_size=[4, 4], num_classes=num_classes,
                                          class_dropout=0.0, dim=64, n_head=4))
        labels = torch.arange(4) if num_classes else None
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(300):
            loss = torch.nn.functional.cross_entropy(model(data, labels).flatten(0, 1), data.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        floor = 0.0 if num_classes else math.log(4) / 16  # unconditional: the first token is a 4-way choice
        assert loss.item() < floor + 0.05
        model.eval()
        if num_classes:
            assert torch.equal(generate(model, 4, class_labels=labels, sampling=GREEDY), grids)
            assert torch.equal(generate(model, 4, class_labels=labels, sampling=SamplingConfig(temperature=0.3),
                                              generator=seeded()), grids)
        else:
            samples = generate(model, 8, sampling=SamplingConfig(temperature=0.5), generator=seeded())
            for s in samples:
                assert any(torch.equal(s, g) for g in grids)
            assert len({s[0, 0].item() for s in samples}) > 1  # not one memorised grid only


@pytest.mark.parametrize("bad,field", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(cfg_scale=-1.0), "cfg_scale"),
    (dict(cfg_schedule="cosine"), "cfg_schedule"),
])
def test_sampling_config_is_checked_when_built_and_names_the_field(bad, field):
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        SamplingConfig(**bad)


def test_default_sampling_config_is_the_plain_draw():
    model = tiny_gpt()
    default = generate(model, 2, class_labels=[0, 1], generator=seeded())
    explicit = SamplingConfig(temperature=1.0, top_k=None, top_p=None, cfg_scale=1.0, cfg_schedule="constant")
    assert torch.equal(default, generate(model, 2, class_labels=[0, 1], sampling=explicit, generator=seeded()))
    linear = SamplingConfig(cfg_scale=3.0, cfg_schedule="linear")  # the schedule reaches the sampler
    constant = SamplingConfig(cfg_scale=3.0)
    assert not torch.equal(generate(model, 4, class_labels=[0, 1, 2, 0], sampling=linear, generator=seeded()),
                           generate(model, 4, class_labels=[0, 1, 2, 0], sampling=constant, generator=seeded()))


def test_a_class_label_mistake_reads_the_same_from_the_model_and_the_samplers():
    from stage2_prior.highres import complete
    from stage2_prior.model import UNCONDITIONAL, needs_class_label

    uncond, cond = tiny_gpt(num_classes=0), tiny_gpt()
    tokens = torch.zeros(1, 12, dtype=torch.long)
    for call in (lambda: uncond(tokens, torch.tensor([0])), lambda: generate(uncond, 1, class_labels=0),
                 lambda: complete(uncond, torch.zeros(1, 3, 4, dtype=torch.long), keep_rows=1, class_labels=0)):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == UNCONDITIONAL
    for call in (lambda: cond(tokens), lambda: generate(cond, 1), lambda: generate_highres(cond, 1, 3, 5)):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == needs_class_label(3)


def test_a_tiny_temperature_is_greedy_and_an_absurd_guidance_scale_is_refused():
    """Logits over a temperature of 1e-38 overflow float32: inf - inf made every probability NaN and the
    first code won every draw. From the row's largest logit the division gives -inf instead, so a tiny
    temperature draws what greedy decoding draws."""
    from prior_helpers import tiny_gpt
    from stage2_prior.draw import sample_logits

    logits = torch.tensor([[1.0, 3.0, 2.0, 3.5], [0.5, -1.0, 4.0, 2.0]])
    for t in (1e-38, 1e-45, 1e-300):
        assert sample_logits(logits, temperature=t, generator=torch.Generator().manual_seed(0)).tolist() == [3, 2]
    model = tiny_gpt()
    greedy = generate(model, 2, class_labels=[0, 1], sampling=SamplingConfig(temperature=0.0))
    tiny = generate(model, 2, class_labels=[0, 1], sampling=SamplingConfig(temperature=1e-38),
                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(tiny, greedy) and tiny.unique().numel() > 1
    with pytest.raises(ValueError, match="cfg_scale must be <= 10000"):
        SamplingConfig(cfg_scale=1e39)


def test_the_command_line_bounds_guidance_as_the_sampler_does():
    import vqgpt.cli.commands as commands
    from stage2_prior.draw import MAX_CFG_SCALE

    assert commands._MAX_CFG_SCALE == MAX_CFG_SCALE


@pytest.mark.parametrize("kwargs, name", [({"temperature": "0.5"}, "temperature"), ({"cfg_scale": "2"}, "cfg_scale"),
                                          ({"temperature": True}, "temperature"), ({"top_p": "0.9"}, "top_p"),
                                          ({"temperature": None}, "temperature")])
def test_sampling_settings_of_the_wrong_type_are_named(kwargs, name):
    with pytest.raises(ValueError, match=f"{name} must be a number, got"):
        SamplingConfig(**kwargs)
    assert SamplingConfig(temperature=np.float32(0.5), top_p=np.float64(0.9)).temperature == 0.5  # numpy numbers


def test_sampling_must_be_a_sampling_config():
    from prior_helpers import tiny_gpt

    with pytest.raises(ValueError, match="sampling must be a SamplingConfig"):
        generate(tiny_gpt(), 1, class_labels=[0], sampling={"temperature": 0.5})
