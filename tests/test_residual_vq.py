"""Residual VQ (issue 17, part 4): error falling with depth, the (h, w*D) code layout and its round trip, one
straight-through gradient, per-depth statistics, and an rvq tokenizer through encode, a prior and sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stage1_vq import QuantizerConfig, ResidualVQ, VQModel, VQModelConfig
from stage1_vq.quantizers import build_quantizer, nearest_code

ROOT = Path(__file__).resolve().parents[1]


def rvq(depth: int = 4, size: int = 8, dim: int = 4, **options) -> ResidualVQ:
    cfg = QuantizerConfig(kind="rvq", codebook_size=size, rvq_depth=depth, **options)
    q = build_quantizer(cfg, dim)
    assert isinstance(q, ResidualVQ)
    return q


def latents(n: int = 512, dim: int = 4, seed: int = 0) -> torch.Tensor:
    """n Gaussian latent vectors as a (1, dim, 1, n) map."""
    points = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return points.t().reshape(1, dim, 1, n).contiguous()


def relative_error(z: torch.Tensor, z_q: torch.Tensor) -> float:
    return float((z - z_q.detach()).pow(2).mean() / z.pow(2).mean())


@pytest.mark.parametrize("options", [dict(kmeans_init=True), dict(rvq_shared_codebook=True, kmeans_init=True,
                                                                  ema=True)],
                         ids=["per-depth codebooks, k-means", "shared codebook, k-means + EMA"])
def test_reconstruction_error_falls_with_depth(options):
    torch.manual_seed(0)
    q = rvq(depth=4, **options).train()
    z = latents()
    for _ in range(3):  # k-means init on the first batch, then EMA / codebook-state updates
        trained = q(z)
    q.eval()
    out = q(z)
    errors = {d: relative_error(z, q.codes_from_indices(out.indices, depths=d)) for d in (1, 2, 4)}
    # each depth quantizes what the ones before left: with 8 codes per depth the error shrinks by
    # well over a third per depth on 4-dim Gaussians (k-means with 8 centres alone removes ~60%)
    assert errors[1] > 1.5 * errors[2] > 1.5 * 1.5 * errors[4], errors
    assert errors[4] < errors[1] / 3
    # the per-depth statistic is the same figure
    for d in (1, 2, 4):
        assert out.stats[f"error_d{d - 1}"].item() == pytest.approx(errors[d], rel=1e-4)
    assert trained.stats["error_d0"] > trained.stats["error_d1"] > trained.stats["error_d3"]


@pytest.mark.parametrize("shared", [False, True])
def test_codes_round_trip_in_the_documented_layout(shared):
    torch.manual_seed(0)
    depth, size = 3, 8
    q = rvq(depth=depth, size=size, rvq_shared_codebook=shared).eval()
    assert q.codes_per_position == depth
    assert q.codebook_size == (size if shared else depth * size)  # the prior's vocabulary
    z = torch.randn(2, 4, 3, 5)
    out = q(z)
    assert out.indices.shape == (2, 3, 5 * depth) and out.indices.dtype == torch.int64
    torch.testing.assert_close(q.codes_from_indices(out.indices), out.z_q, atol=1e-5, rtol=1e-5)
    assert torch.equal(q.lookup(z), out.indices)
    # layout: position (i, j) holds columns j*D .. j*D + D - 1, depth 0 first; per-depth codebooks
    # number depth d's codes from d * size
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    residual, codes = flat, []
    for d in range(depth):
        codebook = q.layer(d).codebook().detach()
        index = nearest_code(residual, codebook)
        residual = residual - codebook[index]
        codes.append(index + (0 if shared else d * size))
    expected = torch.stack(codes, -1).view(2, 3, 5, depth)
    assert torch.equal(out.indices.view(2, 3, 5, depth), expected)
    if not shared:
        for d in range(depth):
            column = out.indices[..., d::depth]
            assert int(column.min()) >= d * size and int(column.max()) < (d + 1) * size
    # every integer grid decodes: a token is looked up in the codebook its value names
    grid = torch.randint(0, q.codebook_size, (2, 3, 5 * depth))
    vectors = F.embedding(grid, q.code_table()).view(2, 3, 5, depth, 4).sum(3).permute(0, 3, 1, 2)
    torch.testing.assert_close(q.codes_from_indices(grid), vectors)
    with pytest.raises(ValueError, match=f"w\\*{depth}"):
        q.codes_from_indices(grid[..., :-1])


def test_one_straight_through_gradient_and_every_codebook_learns():
    torch.manual_seed(0)
    q = rvq(depth=3).train()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    g = torch.randn(2, 4, 3, 3)
    out = q(z)
    (out.z_q * g).sum().backward()
    torch.testing.assert_close(z.grad, g)  # the sum of the depths' codes passes the gradient once, not D times
    q.zero_grad()
    q(z).loss.backward()
    for d, layer in enumerate(q.layers):
        assert layer.embedding.weight.grad.abs().sum() > 0, f"depth {d} got no codebook gradient"


def test_usage_and_perplexity_over_the_vocabulary_and_per_depth():
    torch.manual_seed(0)
    for shared in (False, True):
        q = rvq(depth=2, size=8, rvq_shared_codebook=shared).eval()
        if not shared:  # depth 1: one code at the origin, the rest out of reach, so the depths' usage differs
            with torch.no_grad():
                q.layers[1].embedding.weight.copy_(torch.cat([torch.zeros(1, 4), torch.full((7, 4), 100.0)]))
        out = q(torch.randn(2, 4, 4, 4) * 2)
        if not shared:
            assert out.stats["usage_d1"].item() == 1 / 8 and out.stats["usage_d0"].item() > 1 / 8
        counts = torch.bincount(out.indices.flatten(), minlength=q.codebook_size).float()
        assert out.stats["usage"].item() == pytest.approx((counts > 0).float().mean().item())
        probs = counts[counts > 0] / counts.sum()
        assert out.stats["perplexity"].item() == pytest.approx(torch.exp(-(probs * probs.log()).sum()).item(), rel=1e-5)
        for d in range(2):
            depth_codes = out.indices[..., d::2].flatten() - (0 if shared else d * 8)
            used = torch.bincount(depth_codes, minlength=8) > 0
            assert out.stats[f"usage_d{d}"].item() == pytest.approx(used.float().mean().item())


def test_config_checks_and_vocabulary():
    assert QuantizerConfig(kind="rvq").codebook_size == 1024  # per depth
    with pytest.raises(ValueError, match="rvq_shared_codebook with l2_norm"):
        QuantizerConfig(kind="rvq", rvq_shared_codebook=True, l2_norm=True)
    with pytest.raises(ValueError, match="rvq_shared_codebook applies only to kind 'rvq'"):
        QuantizerConfig(kind="vq", rvq_shared_codebook=True)
    with pytest.raises(ValueError, match="rvq_depth must be >= 1"):
        QuantizerConfig(kind="rvq", rvq_depth=0)
    # l2_norm normalises the latents and the first depth's codes, not the residual codebooks after it
    q = rvq(depth=2, size=16, l2_norm=True).eval()
    assert q.layers[0].l2_norm and not q.layers[1].l2_norm
    torch.testing.assert_close(q.layers[0].codebook().norm(dim=1), torch.ones(16))


def tiny_rvq_model(**options) -> VQModel:
    return VQModel(VQModelConfig(channels=16, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[],
                                 resolution=16, z_channels=16, norm_groups=8,
                                 quantizer=QuantizerConfig(kind="rvq", codebook_size=32, rvq_depth=2, **options)))


def test_tokenizer_grid_export_and_decode(tmp_path):
    torch.manual_seed(0)
    model = tiny_rvq_model().eval()
    images = torch.rand(2, 3, 16, 24) * 2 - 1
    assert model.grid_shape(16, 24) == (8, 24) and model.image_shape(8, 24) == (16, 24)
    codes = model.encode(images)
    assert codes.shape == (2, 8, 24) and model.codebook_size == 64
    assert model.decode(codes).shape == (2, 3, 16, 24)
    model.save_pretrained(tmp_path / "export")
    again = VQModel.from_pretrained(tmp_path / "export")
    assert isinstance(again.quantize, ResidualVQ)
    assert torch.equal(again.encode(images), codes)


def test_reconstruct_reports_psnr_by_depth_and_bits(tmp_path):
    from stage1_vq.evaluate import reconstruct
    from test_quantizer_kinds import write_images

    torch.manual_seed(0)
    tiny_rvq_model().save_pretrained(tmp_path / "export")
    write_images(tmp_path / "images", n=4)
    m = reconstruct(tmp_path / "export", str(tmp_path / "images"), tmp_path / "recon", lpips="none",
                    save_images=False, progress=False)
    assert m["grid"] == [8, 16] and m["codebook_size"] == 64
    assert m["bits_per_image"] == pytest.approx(8 * 16 * 5)  # 8x8 positions x 2 codes x log2(32)
    assert len(m["psnr_by_depth"]) == 2 and m["psnr_by_depth"][-1] == m["psnr"]
    assert m["psnr_by_depth"][0] != m["psnr"]  # the coarse decode uses the first depth only


def test_eval_tokenizer_reports_psnr_by_depth(tmp_path):
    """eval-tokenizer refused every residual-VQ tokenizer, after scoring every image: its report had no key for
    reconstruct's psnr_by_depth. Now one, null for a one-code tokenizer."""
    from test_quantizer_kinds import write_images
    from vqgpt.workflow.evaluation import eval_tokenizer

    torch.manual_seed(0)
    tiny_rvq_model().save_pretrained(tmp_path / "export")
    write_images(tmp_path / "images", n=4)
    report = eval_tokenizer(tmp_path / "export", str(tmp_path / "images"), fid_weights="none", lpips="none",
                            progress=False).to_dict()
    assert len(report["psnr_by_depth"]) == 2 and report["psnr_by_depth"][-1] == report["psnr"]


def test_rvq_tokenizer_through_encode_a_prior_and_sampling(tmp_path, monkeypatch):
    from stage1_vq.train import TokenizerRunConfig, train_tokenizer
    from stage2_prior import GPT, generate
    from stage2_prior.train import PriorRunConfig, train_prior
    from test_quantizer_kinds import write_images
    from vqgpt.ground.config import load_config
    from vqgpt.ground.data import DataConfig
    from vqgpt.ground.tokens import read_meta
    from vqgpt.workflow.encode import encode_dataset
    from vqgpt.workflow.pipeline import VQGPTPipeline

    write_images(tmp_path / "images")
    common = ["train.steps=3", "train.batch_size=8", "train.log_every=1", "train.warmup_steps=1",
              "train.checkpoint_every=0"]
    tok_cfg = load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml", [
        *common, f"data.source={tmp_path / 'images'}", "data.resolution=16", "model.resolution=16",
        "model.attn_resolutions=[]", "model.quantizer.kind=rvq", "model.quantizer.rvq_depth=2",
        "model.quantizer.codebook_size=64"])  # the tiny config's EMA + k-means + restarts, per depth
    train_tokenizer(tok_cfg, tmp_path / "tok")
    metrics = [json.loads(line) for line in (tmp_path / "tok" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all(0 < m["usage"] <= 1 for m in metrics)
    for d in range(2):  # reconstruction and usage per depth reach the log
        assert all(0 < m[f"usage_d{d}"] <= 1 and m[f"perplexity_d{d}"] >= 1 for m in metrics)
    assert all(0 <= m["error_d1"] <= m["error_d0"] for m in metrics)  # the second depth only removes error
    tokenizer = VQModel.from_pretrained(tmp_path / "tok" / "export")
    assert tokenizer.codebook_size == 128 and tokenizer.codes_per_position == 2

    tokens = encode_dataset(tmp_path / "tok" / "export", DataConfig(source=str(tmp_path / "images"), resolution=16),
                            tmp_path / "tokens", batch_size=8, progress=False)
    meta = read_meta(tokens)
    assert meta["codebook_size"] == 128 and list(meta["grid_size"]) == [4, 8]  # 4x4 positions, 2 codes each

    prior_cfg = load_config(PriorRunConfig, ROOT / "configs/prior/tiny.yaml", [*common, f"tokens={tokens}"])
    train_prior(prior_cfg, tmp_path / "prior")
    prior = GPT.from_pretrained(tmp_path / "prior" / "export")
    assert prior.config.codebook_size == 128 and list(prior.config.grid_size) == [4, 8]
    grids = generate(prior, 2, class_labels=[0, 1], generator=torch.Generator().manual_seed(0))
    assert grids.shape == (2, 4, 8)
    assert tokenizer.decode(grids).shape == (2, 3, 16, 16)
    # a canvas twice as wide, its windows moving one position (2 columns) at a time
    wide = generate(prior, 2, class_labels=[0, 1], grid_size=(4, 16), window_stride=(1, 2),
                    generator=torch.Generator().manual_seed(0))
    assert wide.shape == (2, 4, 16)
    assert tokenizer.decode(wide).shape == (2, 3, 16, 32)
    # both stages together, at the trained size: samples, and a completion of an encoded image
    pipe = VQGPTPipeline.from_parts(tmp_path / "tok" / "export", tmp_path / "prior" / "export")
    assert pipe.generate(2, class_labels=[0, 1], seed=0).shape == (2, 3, 16, 16)
    image = torch.rand(3, 16, 16) * 2 - 1
    assert pipe.complete(image, 2, keep_rows=2, class_labels=0, seed=0).shape == (2, 3, 16, 16)
    # trained with its tokenizer, the prior's own sample grids draw each code from its depth's codebook too
    import stage2_prior.train as prior_train
    from vqgpt.workflow.chain import train_prior_with_tokenizer

    drawn_with, snapshot = [], prior_train.sample_snapshot
    monkeypatch.setattr(prior_train, "sample_snapshot",
                        lambda model, *args, **kwargs: drawn_with.append(model.code_groups) or snapshot(model, *args,
                                                                                                        **kwargs))
    train_prior_with_tokenizer(prior_cfg, tmp_path / "prior2", tmp_path / "tok" / "export")
    assert drawn_with == [(2, 64)]
    assert GPT.from_pretrained(tmp_path / "prior2" / "export").code_groups == (2, 64)  # the run's export too
    # resumed for more steps without the tokenizer (as the README allows), the run keeps them from its checkpoint:
    # its new export had none, and a bare prior drew half its codes from the other depth's codebook
    longer = load_config(PriorRunConfig, ROOT / "configs/prior/tiny.yaml", [*common, f"tokens={tokens}",
                                                                          "train.steps=5"])
    train_prior(longer, tmp_path / "prior2", resume="auto")
    assert getattr(GPT.from_pretrained(tmp_path / "prior2" / "export"), "code_groups", None) == (2, 64)


def test_a_prior_whose_rows_split_a_position_is_refused_when_paired():
    """Depth 2 writes each position's 2 codes side by side: a prior 15 codes wide cannot have been trained on
    these codes. Such a pair used to construct, save and load, and fail only at generate."""
    from stage2_prior.model import GPT, GPTConfig
    from vqgpt.ground.config import ConfigError
    from vqgpt.workflow.pipeline import VQGPTPipeline

    tok = tiny_rvq_model().eval()
    prior = GPT(GPTConfig(codebook_size=tok.codebook_size, grid_size=[8, 15], num_classes=0, n_layer=1, n_head=2,
                          dim=32, multiple_of=16))
    with pytest.raises(ConfigError, match=r"2 codes per position .* 15 codes wide, not a multiple of 2"):
        VQGPTPipeline(tok, prior)
    VQGPTPipeline(tok, GPT(GPTConfig(codebook_size=tok.codebook_size, grid_size=[8, 16], num_classes=0, n_layer=1,
                                     n_head=2, dim=32, multiple_of=16)))  # 8 positions of 2 codes: fine


def test_the_pipeline_draws_each_position_from_its_depths_codebook():
    """Depth d owns codes d*K .. d*K + K - 1; the samplers drew from the whole vocabulary at every slot, and a
    code of another depth decoded silently with the wrong codebook (an untrained prior: about half the slots)."""
    from stage2_prior import SamplingConfig
    from stage2_prior.model import GPT, GPTConfig
    from vqgpt.workflow.pipeline import VQGPTPipeline

    torch.manual_seed(0)
    for shared in (False, True):
        tok = tiny_rvq_model(rvq_shared_codebook=shared).eval()
        prior = GPT(GPTConfig(codebook_size=tok.codebook_size, grid_size=[4, 8], num_classes=0, n_layer=1,
                              n_head=2, dim=32, multiple_of=16)).eval()
        pipe = VQGPTPipeline(tok, prior)
        wide = SamplingConfig(temperature=2.0)
        for grid in ((4, 8), (4, 12)):  # the trained grid, and a wider one drawn in sliding windows
            codes = pipe.draw_codes(6, None, grid, wide)
            depth_of_slot = torch.arange(grid[1]) % 2
            if shared:  # one codebook: every code fits every depth
                assert codes.max() < 32 and (codes >= 16).any() and (codes[..., 0::2] >= 16).any()
            else:
                assert torch.equal(codes // 32, depth_of_slot.expand_as(codes)), codes
        pipe.generate(1)  # decodes


def test_a_bare_prior_of_a_per_depth_tokenizer_keeps_its_code_groups(tmp_path):
    """The per-depth rule lived on the pipeline only: GPT.from_pretrained of the pipeline's prior/ (or of a
    run's export) and stage2_prior.generate drew about half the slots from another depth's codebook."""
    from stage2_prior import SamplingConfig, complete, generate
    from stage2_prior.model import GPT, GPTConfig
    from vqgpt.ground.config import ConfigError
    from vqgpt.workflow.pipeline import VQGPTPipeline

    torch.manual_seed(0)
    tok = tiny_rvq_model().eval()
    prior = GPT(GPTConfig(codebook_size=tok.codebook_size, grid_size=[4, 8], num_classes=0, n_layer=1, n_head=2,
                          dim=32, multiple_of=16)).eval()
    VQGPTPipeline(tok, prior).save_pretrained(tmp_path / "pipe")
    bare = GPT.from_pretrained(tmp_path / "pipe" / "prior")
    assert bare.code_groups == (2, 32)
    codes = generate(bare, 6, sampling=SamplingConfig(temperature=2.0), generator=torch.Generator().manual_seed(0))
    assert torch.equal(codes // 32, (torch.arange(8) % 2).expand_as(codes))
    # a canvas whose rows end inside a position: each row after the first would draw from the wrong depths
    with pytest.raises(ValueError, match=r"canvas width 9 is not a multiple of the 2 codes per position"):
        generate(bare, 1, grid_size=(4, 9))
    with pytest.raises(ValueError, match=r"canvas width 11 is not a multiple"):
        complete(bare, torch.zeros(1, 4, 11, dtype=torch.long), keep_rows=1)
    assert generate(bare, 1, grid_size=(5, 10)).shape == (1, 5, 10)
    config = json.loads((tmp_path / "pipe" / "prior" / "config.json").read_text())
    config["extra"]["code_groups"] = [3, 32]  # not the vocabulary
    (tmp_path / "pipe" / "prior" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"extra.code_groups must be \[depth, codes per depth\]"):
        GPT.from_pretrained(tmp_path / "pipe" / "prior")
    one = tiny_rvq_model(rvq_shared_codebook=True).eval()  # one codebook for every depth: no groups
    VQGPTPipeline(one, GPT(GPTConfig(codebook_size=one.codebook_size, grid_size=[4, 8], num_classes=0, n_layer=1,
                                     n_head=2, dim=32, multiple_of=16))).save_pretrained(tmp_path / "shared")
    assert getattr(GPT.from_pretrained(tmp_path / "shared" / "prior"), "code_groups", None) is None


def test_a_bare_prior_draws_a_larger_canvas_as_the_pipeline_does(tmp_path):
    """A bare prior's sliding windows moved one column at a time by default, so half of them started inside a
    position: the codes came from the right depths, but not as the pipeline draws them (its windows move a
    whole position), and the prior saw columns of other depths than it was trained on (found by a hostile
    probe). The default is now one position; a column stride that splits positions is refused."""
    from stage2_prior import generate
    from stage2_prior.model import GPT, GPTConfig
    from vqgpt.workflow.pipeline import VQGPTPipeline

    torch.manual_seed(0)
    tok = tiny_rvq_model().eval()
    prior = GPT(GPTConfig(codebook_size=tok.codebook_size, grid_size=[4, 8], num_classes=0, n_layer=1, n_head=2,
                          dim=32, multiple_of=16)).eval()
    torch.nn.init.normal_(prior.output.weight, std=0.5)  # (a fresh prior's head is zero: every draw uniform)
    VQGPTPipeline(tok, prior).save_pretrained(tmp_path / "pipe")
    pipe, bare = VQGPTPipeline.from_pretrained(tmp_path / "pipe"), GPT.from_pretrained(tmp_path / "pipe" / "prior")
    drawn = pipe.draw_codes(2, None, (4, 12), None, generator=torch.Generator().manual_seed(0))
    assert torch.equal(generate(bare, 2, grid_size=(4, 12), generator=torch.Generator().manual_seed(0)), drawn)
    with pytest.raises(ValueError, match=r"window_stride \(1, 1\): this prior's tokenizer puts 2 codes side by side"):
        generate(bare, 1, grid_size=(4, 12), window_stride=(1, 1))
    assert generate(bare, 1, grid_size=(4, 12), window_stride=(1, 4)).shape == (1, 4, 12)


def test_a_resume_checks_the_code_groups_it_recorded(tmp_path):
    """A prior resumed without --tokenizer takes its code groups from its checkpoint, or (an earlier vqgpt's
    checkpoint) from the run's last export. Both were taken as they were: groups that do not fit the codebook
    went into the sample grids and the new export, and an unreadable export counted as none, without a word.
    Checkpoints now record the key even when the run has no groups (null), so such a run never reads the
    export for them."""
    import warnings

    from stage2_prior.model import GPT, GPTConfig
    from stage2_prior.train import _recorded_code_groups
    from vqgpt.ground.config import ConfigError

    prior = GPT(GPTConfig(codebook_size=128, grid_size=[4, 8], num_classes=0, n_layer=1, n_head=2, dim=32,
                          multiple_of=16))
    prior.code_groups = (2, 64)
    export, checkpoint = tmp_path / "export", tmp_path / "checkpoint"
    prior.save_pretrained(export)
    checkpoint.mkdir()
    config = json.loads((export / "config.json").read_text())

    def recorded(state: dict, groups=(2, 64)):
        (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 3, **state}))
        (export / "config.json").write_text("{" if groups == "broken" else
                                            json.dumps({**config, "extra": {"code_groups": groups}}))
        return _recorded_code_groups(checkpoint, export, 128)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert recorded({"code_groups": [2, 64]}) == (2, 64)
        assert recorded({"code_groups": None}, groups="broken") is None  # recorded as none: no export read
        assert recorded({}) == (2, 64)  # an earlier vqgpt's checkpoint: from the export
    with pytest.raises(ConfigError, match=r"checkpoint: code_groups must be \[depth, codes per depth\] with depth "
                                          r"x codes = codebook_size 128, got \[3, 64\]: pass --tokenizer"):
        recorded({"code_groups": [3, 64]})
    with pytest.raises(ConfigError, match=r"config.json: extra.code_groups must be .* got \[2, 'x'\]"):
        recorded({}, groups=[2, "x"])
    with pytest.warns(UserWarning, match=r"records no code groups, and the run's last export .* cannot be read"):
        assert recorded({}, groups="broken") is None


def test_bits_per_dim_scores_each_position_among_its_own_depths_codes(tmp_path):
    """eval-bpd scored a per-depth residual-VQ prior's codes over the whole vocabulary (D x K), where every
    sampler draws position p from depth p % D's K codes alone: the NLL counted mass on codes that can never
    stand there, and the uniform baseline was log2(D K) bits a token."""
    from stage2_prior.model import GPT, GPTConfig
    from test_quantizer_kinds import write_images
    from vqgpt.workflow.evaluation import eval_bits_per_dim
    from vqgpt.workflow.pipeline import VQGPTPipeline

    torch.manual_seed(0)
    tok = tiny_rvq_model().eval()  # 2 depths of 32 codes; 16 px -> 8 x 8 positions, 8 x 16 codes
    prior = GPT(GPTConfig(codebook_size=tok.codebook_size, grid_size=[8, 16], num_classes=0, n_layer=1, n_head=2,
                          dim=32, multiple_of=16)).eval()
    torch.nn.init.normal_(prior.output.weight, std=0.5)  # logits that depend on the codes
    VQGPTPipeline(tok, prior).save_pretrained(tmp_path / "pipe")
    write_images(tmp_path / "images", n=6)
    report = eval_bits_per_dim(tmp_path / "pipe", str(tmp_path / "images"), progress=False)

    from vqgpt.ground.data import eval_images
    images = torch.stack([eval_images(str(tmp_path / "images"), 16)[i][0] for i in range(6)])
    codes = tok.encode(images).flatten(1)  # (6, 128)
    with torch.no_grad():
        logits = prior(codes, None)  # (6, 128, 64)
    own = torch.arange(64) // 32 == (torch.arange(128) % 2)[:, None]  # (128, 64): depth p % 2's codes
    nats = torch.nn.functional.cross_entropy(logits.masked_fill(~own, float("-inf")).flatten(0, 1), codes.flatten())
    whole = torch.nn.functional.cross_entropy(logits.flatten(0, 1), codes.flatten())
    assert report.num_images == 6 and report.nll_per_token == pytest.approx(float(nats), rel=1e-5)
    assert float(whole) > float(nats) + 0.05  # scored over every code, the same codes looked less likely
    assert report.uniform_bits_per_dim == pytest.approx(5 * 128 / (3 * 16 * 16))  # log2(32) bits a code
