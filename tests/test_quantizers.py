"""Quantizers: STE / rotation-trick gradients, EMA, dead-code restart, k-means init, FSQ, usage, DDP sync."""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp

from stage1_vq.quantizers import (FSQ, QuantizerConfig, VectorQuantizer, all_reduce_sum_, build_quantizer,
                                  rotation_trick)



def as_latents(points: torch.Tensor) -> torch.Tensor:
    """(N, D) points -> latents (1, D, 1, N)."""
    return points.t().reshape(1, points.shape[1], 1, points.shape[0]).contiguous()


def clusters(centers: list[list[float]], per_cluster: int = 16, noise: float = 0.1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.tensor(centers)
    points = c.repeat_interleave(per_cluster, 0)
    return points + noise * torch.randn(points.shape, generator=g)


def set_codebook(q: VectorQuantizer, codes: list[list[float]]) -> None:
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor(codes))
        if q.ema:
            q.embed_sum.copy_(q.embedding.weight * q.cluster_size.unsqueeze(1))


CORNERS = [[5.0, 5.0], [-5.0, 5.0], [5.0, -5.0], [-5.0, -5.0]]


@pytest.mark.parametrize("rotation", [False, True])
def test_gradient_reaches_the_input(rotation):
    torch.manual_seed(0)
    q = VectorQuantizer(16, 4, rotation_trick=rotation).train()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = q(z)
    (out.z_q * torch.randn_like(out.z_q)).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    # the codebook learns from the codebook loss
    q.zero_grad()
    q(z).loss.backward()
    assert q.embedding.weight.grad.abs().sum() > 0


def test_rotation_trick_value_and_gradient():
    torch.manual_seed(0)
    z = torch.randn(5, 3, requires_grad=True)
    codes = torch.randn(5, 3)
    out = rotation_trick(z, codes)
    torch.testing.assert_close(out, codes, atol=1e-5, rtol=1e-5)  # forward value is the code
    g = torch.randn(5, 3)
    (out * g).sum().backward()
    for i in range(5):  # gradient = scale * R^T g with R the rotation taking z_hat to q_hat
        u = z[i].detach() / z[i].detach().norm()
        qh = codes[i] / codes[i].norm()
        w = (u + qh) / (u + qh).norm()
        rot = torch.eye(3) - 2 * torch.outer(w, w) + 2 * torch.outer(qh, u)
        torch.testing.assert_close(rot @ u, qh, atol=1e-5, rtol=1e-5)
        expected = codes[i].norm() / z[i].detach().norm() * rot.t() @ g[i]
        torch.testing.assert_close(z.grad[i], expected, atol=1e-5, rtol=1e-5)
    # unlike the straight-through estimator, the gradient is not a copy of g
    assert not torch.allclose(z.grad, g, atol=1e-3)


def test_straight_through_copies_the_gradient():
    torch.manual_seed(0)
    q = VectorQuantizer(16, 4).train()
    z = torch.randn(1, 4, 2, 2, requires_grad=True)
    g = torch.randn(1, 4, 2, 2)
    (q(z).z_q * g).sum().backward()
    torch.testing.assert_close(z.grad, g)


def test_ema_moves_used_codes_and_has_no_codebook_loss():
    q = VectorQuantizer(4, 2, ema=True, ema_decay=0.5, beta=0.25).train()
    far = [[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0], [10.0, -10.0]]
    set_codebook(q, far)
    z = as_latents(clusters([[1.0, 1.0]], per_cluster=32, noise=0.05))
    assert not q.embedding.weight.requires_grad
    for _ in range(4):
        out = q(z)
    code = q.embedding.weight[0]
    assert (code - torch.tensor([1.0, 1.0])).norm() < 0.1  # moved from (0, 0) onto the data
    # unused codes stay put (up to the Laplace smoothing of their counts)
    torch.testing.assert_close(q.embedding.weight[1:], torch.tensor(far[1:]), atol=0.02, rtol=0)
    torch.testing.assert_close(out.loss, 0.25 * out.stats["commitment"])


def test_dead_code_restart_revives_unused_codes():
    torch.manual_seed(0)
    q = VectorQuantizer(8, 2, restart_threshold=0.6, ema_decay=0.5)
    set_codebook(q, [[0.0, 0.0]] + [[100.0, 100.0]] * 7)  # one live code, seven out of reach
    z = as_latents(clusters(CORNERS))
    assert q.eval()(z).indices.unique().tolist() == [0]
    q.train()
    first = q(z)
    assert first.stats["restarted"] == 7
    for _ in range(10):
        q(z)
    used = q.eval()(z).indices.unique()
    assert len(used) >= 4
    # every code now sits on the data: none left at (100, 100), and code 0, stranded at (0, 0)
    # once the revived codes took its data, went dead and was re-seeded too
    dists = torch.cdist(q.embedding.weight.detach(), clusters(CORNERS))
    assert dists.min(dim=1).values.max() < 1.0


def test_kmeans_init_puts_codes_on_the_data():
    torch.manual_seed(0)
    q = VectorQuantizer(4, 2, kmeans_init=True, kmeans_iters=10).train()
    assert not bool(q.initialized)
    q(as_latents(clusters(CORNERS)))
    assert bool(q.initialized)
    dists = torch.cdist(torch.tensor(CORNERS), q.embedding.weight.detach())
    assert dists.min(dim=1).values.max() < 0.3  # every cluster has a code at its centre
    before = q.embedding.weight.detach().clone()
    with torch.no_grad():
        q(as_latents(clusters([[0.0, 0.0]], seed=1)))  # a later batch does not re-initialise
    assert torch.equal(before, q.embedding.weight)


def test_l2_norm_codes_and_outputs_are_unit_vectors():
    torch.manual_seed(0)
    q = VectorQuantizer(32, 8, l2_norm=True).eval()
    out = q(torch.randn(2, 8, 4, 4) * 3)
    torch.testing.assert_close(out.z_q.norm(dim=1), torch.ones(2, 4, 4))
    torch.testing.assert_close(q.codebook().norm(dim=1), torch.ones(32))


def test_usage_counts_codes_over_the_window():
    q = VectorQuantizer(8, 2, usage_window=2).train()
    set_codebook(q, [[10.0 * i, 0.0] for i in range(8)])
    for i in range(3):
        out = q(as_latents(torch.tensor([[10.0 * i, 0.0]])))
    assert out.stats["usage"].item() == pytest.approx(2 / 8)  # codes 1 and 2: the last two steps
    out = q.eval()(as_latents(torch.tensor([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0], [30.0, 0.0]])))
    assert out.stats["usage"].item() == pytest.approx(4 / 8)
    assert out.stats["perplexity"].item() == pytest.approx(4.0)


@pytest.mark.parametrize("levels", [[3, 4, 5], [8, 8, 8, 5, 5, 5]])
def test_fsq_index_code_round_trip_over_all_codes(levels):
    fsq = FSQ(levels)
    size = math.prod(levels)
    assert fsq.codebook_size == size
    indices = torch.arange(size).view(1, 1, size)
    codes = fsq.codes_from_indices(indices)  # (1, D, 1, size)
    flat = codes.permute(0, 2, 3, 1).reshape(size, len(levels))
    assert flat.abs().max() <= 1.0
    assert len(torch.unique(flat, dim=0)) == size  # a bijection: every index a distinct code
    assert torch.equal(fsq.codes_to_indices(flat), torch.arange(size))
    # quantizing the codes' pre-images gives the codes back: bound(atanh-ish) round-trips via forward
    out = fsq(torch.randn(4, len(levels), 5, 5) * 4)
    torch.testing.assert_close(fsq.codes_from_indices(out.indices), out.z_q)


def test_fsq_reaches_every_level_and_passes_gradients():
    torch.manual_seed(0)
    fsq = FSQ([3, 4, 5]).train()
    z = (torch.randn(1, 3, 16, 16) * 3).requires_grad_(True)
    out = fsq(z)
    for channel, level in enumerate([3, 4, 5]):
        assert len(out.z_q[:, channel].unique()) == level
    assert out.loss.item() == 0.0
    out.z_q.sum().backward()
    assert z.grad.abs().sum() > 0


def test_build_quantizer_and_input_checks():
    vq = build_quantizer(QuantizerConfig(codebook_size=32), 8)
    assert isinstance(vq, VectorQuantizer) and vq.codebook_size == 32 and vq.codebook_dim == 8
    fsq = build_quantizer(QuantizerConfig(kind="fsq", fsq_levels=[5, 5]), 2)
    assert isinstance(fsq, FSQ) and fsq.codebook_size == 25
    with pytest.raises(ValueError, match="len\\(fsq_levels\\)=2"):
        build_quantizer(QuantizerConfig(kind="fsq", fsq_levels=[5, 5]), 3)
    with pytest.raises(ValueError, match=r"\(B, 8, h, w\).*\(1, 4, 2, 2\)"):
        vq(torch.zeros(1, 4, 2, 2))


def test_plain_codebook_state_dict_is_only_the_embedding():
    assert set(VectorQuantizer(8, 2).state_dict()) == {"embedding.weight"}
    assert set(VectorQuantizer(8, 2, ema=True, kmeans_init=True).state_dict()) == {
        "embedding.weight", "cluster_size", "embed_sum", "initialized"}
    assert set(FSQ([3, 3]).state_dict()) == set()


# ----------------------------------------------------------------------------- two processes (gloo)


# Every kind, with each option whose state or statistics cross ranks. All but "all" are deterministic,
# so two ranks must equal one process that sees both ranks' batches.
DDP_CASES = {
    "ema": dict(ema=True),
    "all": dict(ema=True, restart_threshold=0.6, kmeans_init=True),  # rank-local random draws, synced
    "entropy": dict(entropy_weight=0.5, entropy_temperature=1.0),
    "simvq": dict(simvq=True, entropy_weight=0.5, entropy_temperature=1.0),
    "fsq": dict(kind="fsq", fsq_levels=[4, 4]),
    "lfq": dict(kind="lfq", lfq_dim=4, lfq_temperature=1.0, lfq_sample_entropy_weight=0.5),
    "rvq": dict(kind="rvq", rvq_depth=2, ema=True),
    "rvq-shared": dict(kind="rvq", rvq_depth=2, rvq_shared_codebook=True, entropy_weight=0.5, entropy_temperature=1.0),
}


def _make_quantizer(options: dict) -> torch.nn.Module:
    torch.manual_seed(0)  # identical initial codebook on both ranks
    vq = options.get("kind", "vq") in ("vq", "rvq")
    cfg = QuantizerConfig(**({"codebook_size": 16, "ema_decay": 0.5} if vq else {}), **options)
    return build_quantizer(cfg, cfg.latent_dim(2)).train()


def _rank_batch(rank: int, step: int, dim: int = 2) -> torch.Tensor:
    if dim != 2:
        return torch.randn(1, dim, 4, 4, generator=torch.Generator().manual_seed(10 * step + rank)) + 0.3 * rank
    centers = CORNERS[:2] if rank == 0 else CORNERS[2:]
    return as_latents(clusters(centers, per_cluster=8, seed=10 * step + rank))


def _train_steps(q: torch.nn.Module, batches, world: int = 1) -> list[dict]:
    """Three steps of (loss + z_q term).backward(), gradients averaged over ranks as DDP does, SGD."""
    params = [p for p in q.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5) if params else None
    records = []
    for z in batches:
        z = z.clone().requires_grad_(True)
        out = q(z)
        (out.loss + (out.z_q * z.detach()).mean()).backward()
        for p in params:
            if p.grad is not None and world > 1:
                all_reduce_sum_(p.grad).div_(world)
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad()
        records.append({"loss": out.loss.detach(), "z_grad": z.grad, **{k: v.clone() for k, v in out.stats.items()}})
    return records


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name, options in DDP_CASES.items():
            q = _make_quantizer(options)
            torch.manual_seed(100 + rank)  # different restart samples on each rank: sync must hide it
            records = _train_steps(q, [_rank_batch(rank, step, q.codebook_dim) for step in range(3)], world)
            state = {k: v.clone() for k, v in q.state_dict().items()}
            torch.save({"state": state, "records": records}, f"{out_dir}/{name}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_quantizer_state_agrees_across_two_processes(tmp_path):
    """Every kind: replicas agree; the deterministic ones equal one process on both ranks' data, in state,
    loss (the mean of the ranks'), global statistics and input gradients (the all-reduced batch means of
    the entropy terms pass each rank the gradient of its own latents, which DDP's averaging then scales)."""
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for name, options in DDP_CASES.items():
        r0, r1 = torch.load(tmp_path / f"{name}-rank0.pt"), torch.load(tmp_path / f"{name}-rank1.pt")
        for key in r0["state"]:
            assert torch.equal(r0["state"][key], r1["state"][key]), f"{name}: {key} differs between ranks"
        global_stats = {"usage", "perplexity", "restarted", "codebook_entropy",
                        *(f"{s}_d{d}" for s in ("usage", "perplexity") for d in range(4))}  # rvq: per depth
        for a, b in zip(r0["records"], r1["records"]):
            for key in global_stats & set(a):
                assert torch.equal(a[key], b[key]), f"{name}: stat {key} differs between ranks"
        if name == "all":
            continue
        single_q = _make_quantizer(options)
        dim = single_q.codebook_dim
        single = _train_steps(single_q, [torch.cat([_rank_batch(0, s, dim), _rank_batch(1, s, dim)], dim=0)
                                         for s in range(3)])
        for key, value in single_q.state_dict().items():
            torch.testing.assert_close(r0["state"][key], value, msg=f"{name}: {key} differs from one process")
        for step, (a, b, one) in enumerate(zip(r0["records"], r1["records"], single)):
            torch.testing.assert_close((a["loss"] + b["loss"]) / 2, one["loss"], msg=f"{name} step {step}: loss")
            for key in global_stats & set(one):
                torch.testing.assert_close(a[key], one[key], msg=f"{name} step {step}: {key}")
            # each rank's loss is a mean over half the data: its input gradient is twice the single one
            both = torch.cat([a["z_grad"], b["z_grad"]], dim=0) / 2
            torch.testing.assert_close(both, one["z_grad"], msg=f"{name} step {step}: input gradients")
