"""Stage-2 GPT prior: causality, KV cache, LlamaGen layout, config, export."""

import copy
import math

import pytest
import torch

from prior_helpers import tiny_gpt as shared_tiny_gpt
from stage2_prior import GPT, GPTConfig, count_parameters
from stage2_prior.config import PRESETS
from stage2_prior import layers
from stage2_prior.layers import Linear, apply_rope, rope_multipliers, rope_table_2d
from vqgpt.ground.config import ConfigError, from_dict


def tiny_gpt(seed: int = 0, **overrides):
    return shared_tiny_gpt(seed, **{"grid_size": [4, 5], **overrides})


def test_logits_are_causal():
    model = tiny_gpt()
    tokens = torch.randint(0, 16, (2, 20))
    labels = torch.tensor([0, 2])
    ref = model(tokens, labels)
    for t in (0, 7, 19):
        edited = tokens.clone()
        edited[:, t] = (edited[:, t] + 1) % 16
        out = model(edited, labels)
        torch.testing.assert_close(out[:, : t + 1], ref[:, : t + 1], rtol=0, atol=0)
        if t < 19:
            assert not torch.allclose(out[:, t + 1:], ref[:, t + 1:])


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(num_classes=0),
    dict(n_head=4, n_kv_head=2),
    dict(qk_norm=True),
])
def test_kv_cache_equals_full_recomputation(overrides):
    model = tiny_gpt(**overrides)
    B = 3
    tokens = torch.randint(0, 16, (B, 20))
    labels = None if model.config.num_classes == 0 else torch.tensor([0, 1, 2])
    full = model(tokens, labels)  # (B, 20, V); logits[:, t] predicts token t
    cache, other = model.new_cache(B), model.new_cache(B)
    # prefix + 4 tokens, one step, a chunk after the cache, then single steps to the end
    parts = [model.forward_cached(tokens[:, :4], 0, labels, cache=cache)]
    # a second cache filled in between with other tokens: the model itself holds no cache state
    model.forward_cached(tokens.flip(1)[:, :10], 0, labels, cache=other)
    parts += [model.forward_cached(tokens[:, 4:5], 5, cache=cache),
              model.forward_cached(tokens[:, 5:12], 6, cache=cache)]
    parts += [model.forward_cached(tokens[:, t - 1: t], t, cache=cache) for t in range(13, 20)]
    cached = torch.cat(parts, dim=1)
    assert cached.shape == full.shape
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)


def test_forward_cached_last_only_and_positions():
    model = tiny_gpt()
    tokens = torch.randint(0, 16, (2, 8))
    labels = torch.tensor([1, 2])
    cache = model.new_cache(2)
    default = model.forward_cached(tokens, 0, labels, cache=cache)
    cells = torch.tensor([[t // 5, t % 5] for t in range(8)])  # the default raster cells, given explicitly
    explicit = model.forward_cached(tokens, 0, labels, positions=cells, cache=cache)
    torch.testing.assert_close(explicit, default, rtol=0, atol=0)
    last = model.forward_cached(tokens, 0, labels, positions=cells, cache=cache, last_only=True)
    torch.testing.assert_close(last, default[:, -1:], rtol=0, atol=1e-5)
    # RoPE is relative: moving every token by the same offset changes nothing, moving one does.
    shifted = model.forward_cached(tokens, 0, labels, positions=cells + torch.tensor([1, 0]), cache=cache)
    torch.testing.assert_close(shifted, default, rtol=0, atol=1e-5)
    moved = cells.clone()
    moved[2] = torch.tensor([3, 4])
    other = model.forward_cached(tokens, 0, labels, positions=moved, cache=cache)
    torch.testing.assert_close(other[:, :3], default[:, :3], rtol=0, atol=1e-5)  # slots before token 2
    assert (other[:, 3:] - default[:, 3:]).abs().max() > 1e-2


def test_forward_cached_errors():
    model = tiny_gpt()
    with pytest.raises(TypeError, match="cache"):  # the model keeps no cache of its own
        model.forward_cached(None, 0, torch.tensor([0]))
    cache = model.new_cache(1, max_len=4)
    with pytest.raises(ValueError, match="cache length"):
        model.forward_cached(torch.zeros(1, 4, dtype=torch.long), 0, torch.tensor([0]), cache=cache)
    with pytest.raises(ValueError, match="cache batch"):
        model.forward_cached(torch.zeros(2, 1, dtype=torch.long), 1, cache=cache)
    with pytest.raises(ValueError, match="start_pos=0"):
        model.forward_cached(torch.zeros(1, 1, dtype=torch.long), 1, torch.tensor([0]), cache=cache)
    uncond = tiny_gpt(num_classes=0)  # the prefix takes the cache's batch: the tokens' batch must match it
    with pytest.raises(ValueError, match="cache batch 1"):
        uncond.forward_cached(torch.zeros(2, 3, dtype=torch.long), 0, cache=uncond.new_cache(1))


def test_class_labels_condition_and_errors():
    model = tiny_gpt()
    tokens = torch.randint(0, 16, (1, 10))
    a, b = model(tokens, torch.tensor([0])), model(tokens, torch.tensor([1]))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="class-conditional"):
        model(tokens)
    with pytest.raises(ValueError, match="shape"):
        model(tokens, torch.tensor([0, 1]))
    uncond = tiny_gpt(num_classes=0)
    assert uncond(tokens).shape == (1, 10, 16)
    with pytest.raises(ValueError, match="unconditional"):
        uncond(tokens, torch.tensor([0]))
    with pytest.raises(ValueError, match="1 <= T <= 20"):
        model(torch.zeros(1, 21, dtype=torch.long), torch.tensor([0]))


def test_null_class_rows():
    assert tiny_gpt(num_classes=3, class_dropout=0.1).class_embedding.num_embeddings == 4
    assert tiny_gpt(num_classes=3, class_dropout=0.1).null_class == 3
    assert tiny_gpt(num_classes=3, class_dropout=0.0).class_embedding.num_embeddings == 3
    assert tiny_gpt(num_classes=3, class_dropout=0.0).null_class is None
    assert tiny_gpt(num_classes=0).class_embedding.num_embeddings == 1  # the learned start embedding


def test_training_class_dropout_uses_null_class():
    model = tiny_gpt(class_dropout=0.999)
    tokens = torch.randint(0, 16, (4, 20))
    labels = torch.tensor([0, 1, 2, 0])
    null = model(tokens, torch.full((4,), model.null_class))
    model.train()
    torch.manual_seed(1)
    dropped = model(tokens, labels)
    torch.testing.assert_close(dropped, null)


def test_rope_table_layout_matches_llamagen():
    h, w, head_dim, base = 3, 4, 16, 10000.0
    table = rope_table_2d((h, w), head_dim, base)
    assert table.shape == (1 + h * w, head_dim // 2, 2) and table.dtype == torch.float32
    assert torch.all(table[0] == 0)  # prefix slot: cos = sin = 0, as in LlamaGen
    quarter = head_dim // 4
    for r, c in [(0, 0), (1, 3), (2, 2)]:
        cos, sin = table[1 + r * w + c].unbind(-1)
        for k in range(quarter):
            freq = base ** (-4 * k / head_dim)
            for pair, angle in ((k, r * freq), (quarter + k, c * freq)):  # rows first, then columns
                assert math.isclose(cos[pair].item(), math.cos(angle), abs_tol=1e-6)
                assert math.isclose(sin[pair].item(), math.sin(angle), abs_tol=1e-6)


def test_rope_rotates_interleaved_pairs():
    x = torch.randn(1, 1, 1, 4)
    table = torch.tensor([[[math.cos(0.3), math.sin(0.3)], [math.cos(1.1), math.sin(1.1)]]])  # (n=1, D/2, 2)
    out = apply_rope(x, rope_multipliers(table))[0, 0, 0]
    for pair, angle in ((0, 0.3), (1, 1.1)):
        z = complex(x[0, 0, 0, 2 * pair], x[0, 0, 0, 2 * pair + 1]) * complex(math.cos(angle), math.sin(angle))
        assert math.isclose(out[2 * pair].item(), z.real, abs_tol=1e-6)
        assert math.isclose(out[2 * pair + 1].item(), z.imag, abs_tol=1e-6)


def test_prefix_key_and_query_are_zero():
    # LlamaGen rotates the class slot by 0 (not identity): the prefix attends uniformly; changing the
    # class embedding changes logits only through values.
    model = tiny_gpt()
    attn = model.layers[0].attention
    captured = {}

    def hook(module, args, out):
        captured["qkv"] = out

    handle = attn.wqkv.register_forward_hook(hook)
    model(torch.zeros(1, 3, dtype=torch.long), torch.tensor([1]))
    handle.remove()
    qkv = captured["qkv"].view(1, 3, -1, attn.head_dim)
    rotated = apply_rope(qkv, model.rope_table(torch.device("cpu"))[:3])
    assert torch.all(rotated[:, 0, : attn.n_head + attn.n_kv_head] == 0)
    assert not torch.all(rotated[:, 1] == 0)


def test_state_dict_uses_llamagen_names():
    model = tiny_gpt(n_layer=1)
    expected = {
        "class_embedding.weight",  # LlamaGen: cls_embedding.embedding_table.weight
        "tok_embeddings.weight", "norm.weight", "output.weight",
        "layers.0.attention.wqkv.weight", "layers.0.attention.wo.weight",
        "layers.0.feed_forward.w1.weight", "layers.0.feed_forward.w2.weight", "layers.0.feed_forward.w3.weight",
        "layers.0.attention_norm.weight", "layers.0.ffn_norm.weight",
    }
    assert set(model.state_dict()) == expected


def test_presets_match_llamagen_sizes():
    sizes = {"GPT-B": (12, 768, 12), "GPT-L": (24, 1024, 16), "GPT-XL": (36, 1280, 20), "GPT-XXL": (48, 1536, 24)}
    for name, (n_layer, dim, n_head) in sizes.items():
        c = GPTConfig.from_preset(name, codebook_size=16384, num_classes=1000)
        assert (c.n_layer, c.dim, c.n_head) == (n_layer, dim, n_head)
    c = GPTConfig.from_preset("GPT-B", codebook_size=16384, num_classes=1000)
    assert c.ffn_hidden_dim == 2048  # find_multiple(int(8 * 768 / 3), 256)
    assert GPTConfig.from_preset("GPT-XL").ffn_hidden_dim == 3584  # int(8*1280/3)=3413 -> 3584
    assert 110e6 < count_parameters(c) < 112e6  # LlamaGen: "GPT-B 111M"
    assert 340e6 < count_parameters(GPTConfig.from_preset("GPT-L", codebook_size=16384, num_classes=1000)) < 345e6
    assert set(PRESETS) >= {"tiny", "small", "GPT-B", "GPT-L", "GPT-XL", "GPT-XXL"}


@pytest.mark.parametrize("overrides", [dict(), dict(num_classes=0), dict(n_head=4, n_kv_head=1, qk_norm=True),
                                       dict(class_dropout=0.0, ffn_dim_multiplier=1.3)])
def test_count_parameters_formula_matches_model(overrides):
    model = tiny_gpt(**overrides)
    assert count_parameters(model.config) == count_parameters(model) == sum(p.numel() for p in model.parameters())
    assert count_parameters(model, exclude_embeddings=True) == count_parameters(model.config, exclude_embeddings=True)


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="n_kv_head"):
        GPTConfig.from_preset("tiny", n_head=4, n_kv_head=3)
    with pytest.raises(ConfigError, match="dim: must be divisible by n_head"):
        GPTConfig(dim=30, n_head=4)
    with pytest.raises(ConfigError, match="divisible by 4 for 2D RoPE"):
        GPTConfig(dim=24, n_head=4)
    with pytest.raises(ConfigError, match="grid_size"):
        GPTConfig(grid_size=[16])
    with pytest.raises(ConfigError, match="unknown GPT preset"):
        GPTConfig.from_preset("GPT-Z")
    with pytest.raises(ConfigError, match="bogus"):
        GPTConfig.from_preset("tiny", bogus=1)
    with pytest.raises(ConfigError, match="n_layers"):
        from_dict(GPTConfig, {"n_layers": 3})
    assert from_dict(GPTConfig, {"grid_size": [8, 12], "dim": 64, "n_head": 4}).grid_size == [8, 12]


def test_save_load_round_trip(tmp_path):
    model = tiny_gpt(num_classes=5, n_kv_head=1)
    model.save_pretrained(tmp_path / "prior")
    loaded = GPT.from_pretrained(tmp_path / "prior")
    assert loaded.config == model.config
    tokens = torch.randint(0, 16, (2, 20))
    labels = torch.tensor([4, 0])
    torch.testing.assert_close(loaded(tokens, labels), model(tokens, labels), rtol=0, atol=0)


def test_load_rejects_mismatched_weights(tmp_path):
    import json

    model = tiny_gpt()
    model.save_pretrained(tmp_path / "prior")
    meta_path = tmp_path / "prior" / "config.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["n_layer"] = 3
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"prior: the weights in model\.safetensors do not match config\.json"):
        GPT.from_pretrained(tmp_path / "prior")  # a user error (exit code 2) naming the export


def test_bf16_weights_keep_fp32_rope_and_cache_matches():
    model = tiny_gpt().to(torch.bfloat16)
    tokens = torch.randint(0, 16, (2, 6))
    labels = torch.tensor([0, 1])
    full = model(tokens, labels)
    assert full.dtype == torch.float32 and model.rope_table(torch.device("cpu")).dtype == torch.float32
    cache = model.new_cache(2)
    assert cache.keys[0].dtype == torch.bfloat16  # the cache takes the weights' dtype by default
    cached = torch.cat([model.forward_cached(tokens[:, :3], 0, labels, cache=cache),
                        model.forward_cached(tokens[:, 3:5], 4, cache=cache)], 1)
    torch.testing.assert_close(cached, full, rtol=0.05, atol=0.05)


def _no_f_linear(*args):
    raise AssertionError("F.linear called on a few-row path")


def test_few_row_linear_fallback_matches_f_linear(monkeypatch):
    """Where oneDNN cannot pack, 1-5 rows run as W @ x^T."""
    monkeypatch.setattr(layers, "_packing_works", False)
    torch.manual_seed(0)
    layer = Linear(24, 40, bias=False)
    inputs = {shape: torch.randn(shape) for shape in [(1, 1, 24), (2, 1, 24), (5, 1, 24), (2, 2, 24), (7, 24)]}
    expected = {shape: torch.nn.functional.linear(x, layer.weight) for shape, x in inputs.items()}
    for shape, x in inputs.items():
        few = math.prod(shape[:-1]) <= Linear.max_rows
        with monkeypatch.context() as m, torch.inference_mode():
            if few:  # the weight-major product must be the one that runs
                m.setattr(torch.nn.functional, "linear", _no_f_linear)
            y = layer(x)
        assert y.shape == (*shape[:-1], 40)
        torch.testing.assert_close(y, expected[shape], rtol=1e-5, atol=1e-6)
    # with gradients (training) the usual product runs, so autograd sees nn.Linear
    y = layer(inputs[(1, 1, 24)])
    assert y.grad_fn is not None and torch.equal(y.detach(), expected[(1, 1, 24)])


@pytest.mark.skipif(not layers._onednn_works, reason="this torch build has no oneDNN")
def test_packed_linear_follows_the_weight(monkeypatch, tmp_path):
    """Up to max_packed_rows rows run on a prepared (blocked or oneDNN-packed) copy of the weight, which is
    remade whenever the weight changes (in place, loaded, moved) and does not stop the module being
    copied or saved."""
    torch.manual_seed(0)
    layer = Linear(24, 40, bias=False)
    shapes = [(1, 1, 24), (8, 1, 24), (16, 1, 24), (Linear.max_packed_rows, 24)]
    with monkeypatch.context() as m, torch.no_grad():
        m.setattr(torch.nn.functional, "linear", _no_f_linear)
        for shape in shapes:
            x = torch.randn(shape)
            torch.testing.assert_close(layer(x), x @ layer.weight.t(), rtol=1e-5, atol=1e-5)
        layer.weight.mul_(-2)  # an in-place update (an optimizer step, a weight edit)
        torch.testing.assert_close(layer(x), x @ layer.weight.t(), rtol=1e-5, atol=1e-5)
        other = torch.randn(40, 24)
        layer.load_state_dict({"weight": other})
        torch.testing.assert_close(layer(x), x @ other.t(), rtol=1e-5, atol=1e-5)
    assert set(layer.state_dict()) == {"weight"}  # the packed copy is not part of the module
    twin = copy.deepcopy(layer)
    torch.save(layer, tmp_path / "layer.pt")
    with torch.no_grad():
        twin.weight.zero_()
        assert torch.equal(twin(x), torch.zeros(Linear.max_packed_rows, 40))
    # more rows, or gradients, take F.linear
    with torch.no_grad():
        y = layer(torch.randn(Linear.max_packed_rows + 1, 24))
    assert y.shape == (Linear.max_packed_rows + 1, 40)
    assert layer(x).grad_fn is not None
    # a compiled graph gets the few-row product as one opaque op for 2+ rows, F.linear for one row (the
    # compiled decode step freezes the weights and inductor packs them for its GEMM template)
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=keep_graph, fullgraph=True)
    with torch.no_grad():
        y, one = compiled(x[:8]), compiled(x[:1])
    torch.testing.assert_close(y, x[:8] @ layer.weight.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one, x[:1] @ layer.weight.t(), rtol=1e-5, atol=1e-5)
    targets = [[str(node.target) for node in gm.graph.nodes] for gm in graphs]
    assert any("vqgpt.few_row_linear" in t for t in targets[0]) and not any("mkldnn" in t for t in targets[0])
    assert any("linear" in t and "vqgpt" not in t for t in targets[-1])
    with torch.inference_mode():  # a layer made here has no version counter: the plain products run
        made_here = Linear(24, 40, bias=False)
        torch.testing.assert_close(made_here(x[:8]), x[:8] @ made_here.weight.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not layers._onednn_works, reason="this torch build has no oneDNN")
def test_weight_packing_switch_drops_the_packed_copies():
    """set_weight_packing(False) gives back the packed copies and sends few-row products down the plain
    path (same values); switching it on again packs anew."""
    from stage2_prior import set_weight_packing

    torch.manual_seed(0)
    layer = Linear(24, 40, bias=False)
    x = torch.randn(8, 24)
    try:
        with torch.no_grad():
            packed_out = layer(x)
            assert id(layer.weight) in layers._PACKED
            assert set_weight_packing(False) is True
            assert not layers._PACKED
            torch.testing.assert_close(layer(x), packed_out, rtol=1e-5, atol=1e-5)
            assert not layers._PACKED  # the plain path made no copy
            assert set_weight_packing(True) is False
            torch.testing.assert_close(layer(x), packed_out, rtol=1e-5, atol=1e-5)
            assert id(layer.weight) in layers._PACKED
    finally:
        set_weight_packing(True)
