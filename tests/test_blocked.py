"""The blocked few-row kernel (stage2_prior.blocked) and the layers that take it."""

import itertools
import shutil
import subprocess
import sysconfig

import pytest
import torch
from prior_helpers import tiny_gpt
from torch.utils.cpp_extension import include_paths

from stage2_prior import blocked, layers
from stage2_prior.layers import Linear
from vqgpt.ground.native import build_kernel

DTYPES = [torch.float32, torch.bfloat16, torch.int8]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_blocked_kernel_gives_the_float_product_for_every_row_count(dtype):
    """Rows 1-8 each take their own register blocking, 11 and 17 a full block plus a rest; K = 37 leaves a
    tail after every unrolled k loop (and an odd input after the pairs of bf16's dot products). The kernel
    widens each weight exactly and accumulates in fp32; bf16 weights take the rows as bf16, int8 weights
    on a CPU with AVX512-VNNI the rows rounded to 16 bits (``rounded_rows``; exact int32 sums)."""
    assert blocked.kernel(dtype) is not None  # x86 with AVX2 and FMA, as the development and CI machines
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randint(-127, 128, (40, 37), generator=gen) if dtype == torch.int8
              else torch.randn(40, 37, generator=gen)).to(dtype)
    scales = torch.rand(40, generator=gen).add(0.01).to(torch.bfloat16)
    packed = blocked.block(weight)  # (int8 on VNNI: each group of 4 inputs channel-major, see the test below)
    plain = blocked.block(weight, tiles=False)
    assert packed.shape == plain.shape == (5, 37, 8) and torch.equal(plain[1, :, 3], weight[11])
    for rows in [*range(1, 9), 11, 17]:
        x = torch.randn(rows, 37, generator=gen)
        exact = x.bfloat16() if dtype == torch.bfloat16 else x  # the rows the kernel multiplies
        if dtype == torch.int8 and blocked.int8_rounds_rows():
            exact = blocked.rounded_rows(x)
        want = (exact.double() @ weight.double().t()) * scales.double()
        got = blocked.product(x, packed, scales)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        assert torch.equal(blocked.blocked_linear(x, packed, scales), got)  # the op compiled graphs call


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_op_gives_the_kernels_product_and_names_bad_inputs(dtype):
    """vqgpt_native::blocked_linear, what compiled graphs call where it builds: the same kernel as
    ``product`` behind a C++ op, so the same numbers; wrong inputs are refused with what was wrong."""
    op = blocked.native_linear()
    assert op is not None  # x86 with AVX2, a C++ compiler and ninja (a dependency), as on CI
    gen = torch.Generator().manual_seed(1)
    weight = (torch.randint(-127, 128, (24, 37), generator=gen) if dtype == torch.int8
              else torch.randn(24, 37, generator=gen)).to(dtype)
    scales = torch.rand(24, generator=gen).add(0.01).to(torch.bfloat16)
    packed = blocked.block(weight)
    for rows in (1, 3, 8, 11):
        x = torch.randn(rows, 37, generator=gen).to(blocked._ROW_DTYPE[dtype])
        assert torch.equal(op(x, packed, scales), blocked.product(x, packed, scales))
    wrong_rows = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    with pytest.raises(RuntimeError, match="weights take (Float|BFloat16) rows, got (Float|BFloat16)"):
        op(torch.randn(2, 37).to(wrong_rows), packed, scales)
    with pytest.raises(RuntimeError, match="scales must be bfloat16"):
        op(x, packed, scales.float())
    with pytest.raises(RuntimeError, match=r"weight \(N / 8, K, 8\)"):
        op(x[:, :36], packed, scales)


@pytest.mark.parametrize(("dtype", "check"), [(torch.bfloat16, "if (dot_products_run())"),
                                             (torch.int8, "if (int16_products_run())")], ids=str)
def test_the_fp32_loop_where_the_cpu_has_no_dot_products(dtype, check):
    """The bf16 and int8 kernels check for AVX512-BF16 / AVX512-VNNI at run time; their other path (the
    fp32 loop over the rows, widened from bf16 once or taken as they are) is what AVX2-only CPUs run.
    Built here with the check forced off, it must pass the same self-check (every row count, the k tail)
    that the kernel passes before use, and an int8 kernel so built keeps its rows unrounded."""
    source = blocked._product_source(dtype)
    assert source.count(check) == 1
    if dtype == torch.bfloat16:  # and no tiles either (AMX: a CPU without AVX512-BF16 has none)
        assert source.count(_TILES_ON) == 1
        source = source.replace(_TILES_ON, _TILES_OFF)
    # (int8 weights keep the order the dot products read, where they run: the fp32 loop reads a plain copy)
    fp32_loop = build_kernel(source.replace(check, "if (false)"), blocked._product_argtypes(dtype),
                             lambda candidate: blocked._product_correct(candidate, dtype,
                                                                        tiles=dtype == torch.int8))
    assert fp32_loop is not None
    if dtype == torch.int8:
        weight = blocked.block(torch.ones(8, 2, dtype=torch.int8))
        out = torch.empty(1, 8)
        fp32_loop(torch.tensor([[1.0, 1e-6]]), weight, torch.ones(8, dtype=torch.bfloat16), out, 1, 8, 2)
        assert torch.all(out == torch.tensor(1.0) + torch.tensor(1e-6))


def test_int8_weights_come_in_the_order_the_vnni_loop_reads():
    """Where the int8 kernel takes the int16 dot products (AVX512-VNNI), ``block`` lays each full group of 4 inputs
    of a block out channel-major (channel j's inputs 4g..4g + 3 side by side), the order ``vpdpwssd`` reads, so
    that the loop only widens its loads; the inputs after the last full group keep the plain layout. The kernel
    is built for that layout, and its fp32 loop (rows with inf or NaN) reads a plain copy of it."""
    assert blocked.int8_ordered() == torch.cpu._is_vnni_supported()
    assert blocked.int8_ordered()  # the development and CI CPUs: the layout the tests cover
    source = blocked._product_source(torch.int8)
    assert source.count("#define VQGPT_ORDERED 1 ") == 1
    assert blocked._product_source(torch.bfloat16).count("VQGPT_ORDERED") == 0
    weight = torch.randint(-127, 128, (16, 37), generator=torch.Generator().manual_seed(5), dtype=torch.int8)
    laid = blocked.block(weight)
    for b, g, j, i in [(0, 0, 0, 0), (1, 3, 5, 2), (1, 8, 7, 3), (0, 4, 2, 1)]:
        assert laid[b].flatten()[g * 32 + j * 4 + i] == weight[8 * b + j, 4 * g + i]
    assert torch.equal(laid[:, 36], blocked.block(weight, tiles=False)[:, 36])  # the tail input: plain
    x = torch.randn(2, 37)
    x[1, 3] = float("inf")  # the fp32 loop for the call: row 0 unrounded there
    got = blocked.product(x, laid, torch.ones(16, dtype=torch.bfloat16))
    torch.testing.assert_close(got[0], x[0] @ weight.float().t(), rtol=1e-5, atol=1e-4)


# the bf16 kernel's choice of the tiles (and their layout), made where ``blocked.tiles_run()``, and its other value
_TILES_ON, _TILES_OFF = "#define VQGPT_TILES 1 ", "#define VQGPT_TILES 0 "


def _cpu_flags() -> list[str]:
    """This CPU's feature flags as Linux's /proc/cpuinfo reports them (none where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return []


def _cpu_has_amx() -> bool:
    """Whether this CPU reports AMX-BF16 tiles (and AVX512-BF16, for one row), asked apart from the kernel."""
    flags = _cpu_flags()
    return all(flag in flags for flag in ("amx_bf16", "amx_tile", "avx512_bf16"))


def test_bf16_rows_take_the_tiles_where_the_cpu_has_amx():
    """On a CPU with AMX-BF16 (the current development and CI machine; an earlier one had none), bf16 weights with
    N a multiple of 16 and K of 32 are laid out for the tiles (``block``): 2 or more rows go through the tiles, 16
    at a time, one row through a 512-bit loop over the same layout; other shapes keep the blocks and the
    dot-product loops. Built with those two calls replaced by markers, the markers show which calls went where;
    the kernel itself gives the float product for 1-40 rows over K = 768 (24 chunks, the four tiles' turns) and
    K = 96 (three: a rest), as a build without the tiles (the dot products over the blocks) does, to fp32
    rounding."""
    amx = _cpu_has_amx()
    assert blocked.tiles_run() == amx and amx  # the development and CI CPUs have it: the path the test covers
    source = blocked._product_source(torch.bfloat16)
    tiles = "tile_products(rows + m0 * K, weight, scales, out + m0 * N, std::min<int64_t>(16, M - m0), N, K);"
    row = "return row_products(rows, weight, scales, out, N, K);"
    assert source.count(tiles) == source.count(row) == source.count(_TILES_ON) == 1
    marked = build_kernel(source.replace(tiles, "std::fill(out + m0 * N, out + std::min<int64_t>(M, m0 + 16) * N, "
                                                "7.0f);").replace(row, "{ std::fill(out, out + N, 5.0f); return; }"),
                          blocked._product_argtypes(torch.bfloat16), lambda _: True)
    dots = build_kernel(source.replace(_TILES_ON, _TILES_OFF), blocked._product_argtypes(torch.bfloat16),
                        lambda candidate: blocked._product_correct(candidate, torch.bfloat16, tiles=False))
    assert marked is not None and dots is not None
    gen = torch.Generator().manual_seed(5)
    for (n, k), rows in itertools.product([(48, 768), (48, 96), (40, 96), (48, 100)], [1, 2, 8, 16, 17, 40]):
        weight = torch.randn(n, k, generator=gen).bfloat16()
        scales = torch.rand(n, generator=gen).add(0.01).to(torch.bfloat16)
        x = torch.randn(rows, k, generator=gen).bfloat16()
        laid = blocked.block(weight)
        tiled = n % 16 == 0 and k % 32 == 0
        if tiled:  # [pair p, chunk c, row r, channel j, input i] = weight[16p + j, 32c + 2r + i]
            assert torch.equal(laid.view(n // 16, k // 32, 16, 16, 2)[2, 1, 5, 9, 1], weight[16 * 2 + 9, 32 + 10 + 1])
        else:
            assert torch.equal(laid, blocked.block(weight, tiles=False))
        out = torch.empty(rows, n)
        marked(x, laid, scales, out, rows, n, k)
        assert bool((out == 7).all()) == (tiled and rows >= 2), (n, k, rows)
        assert bool((out == 5).all()) == (tiled and rows == 1), (n, k, rows)
        got = blocked.product(x, laid, scales)
        want = (x.double() @ weight.double().t()) * scales.double()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        dotted = torch.empty(rows, n)
        dots(x, blocked.block(weight, tiles=False), scales, dotted, rows, n, k)
        torch.testing.assert_close(got, dotted, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_eager_bf16_products_round_in_the_kernel_as_torch_rounds(monkeypatch):
    """An eager bf16 ``Linear`` of a few rows takes its bf16 output from ``rounded_kernel``, which rounds the product
    inside the kernel instead of through a torch ``.to()`` call: bit for bit the fp32 product rounded by torch, for
    the blocks and the tile layout (N a multiple of 16, K of 32), 1-17 rows; a NaN stays a NaN."""
    assert blocked.rounded_kernel() is not None  # x86 with AVX2 and FMA, as the development and CI machines
    gen = torch.Generator().manual_seed(7)
    for (n, k), rows in itertools.product([(48, 768), (40, 96), (48, 100)], [1, 2, 8, 17]):
        weight = torch.randn(n, k, generator=gen).bfloat16()
        scales = torch.rand(n, generator=gen).add(0.01).to(torch.bfloat16)
        x = torch.randn(rows, k, generator=gen).bfloat16()
        x[0, 1] = float("nan") if rows == 17 else x[0, 1]
        laid = blocked.block(weight)
        got, want = blocked.rounded_product(x, laid, scales), blocked.product(x, laid, scales).bfloat16()
        nan = want.isnan()
        assert got.dtype == torch.bfloat16 and torch.equal(got.isnan(), nan) and nan.any() == (rows == 17)
        assert torch.equal(got[~nan], want[~nan]), (n, k, rows)
    layer = Linear(96, 48, bias=False).to(torch.bfloat16)
    x = torch.randn(2, 3, 96, generator=gen).bfloat16()
    calls = []
    real = blocked.rounded_product
    monkeypatch.setattr(blocked, "rounded_product", lambda *args: calls.append(1) or real(*args))
    with torch.no_grad():
        got = layer(x)
    want = blocked.product(x.reshape(6, 96), blocked.block(layer.weight.detach()), torch.ones(48, dtype=torch.bfloat16))
    assert calls == [1] and torch.equal(got, want.bfloat16().reshape(2, 3, 48))


_PAIRS_RUN = "&& pairs_run())"  # the fp32 kernel's run-time check for its 512-bit loop over pairs of blocks


def test_fp32_rows_take_the_pairs_of_blocks_where_the_cpu_has_avx512():
    """On a CPU with AVX-512 (the development and CI machines), 5 or more fp32 rows of a shape with N a multiple of
    16 go through the 512-bit loop over pairs of blocks; fewer rows, and other shapes, take the 256-bit loop. Built
    with the pair call replaced by a marker, the marker shows which calls went there; the kernel gives the 256-bit
    build's product bit for bit where each 8 rows or fewer have 5 or more (the same FMA chain per channel), for 5-20
    rows (16 at a time in the pairs, 8 in the 256-bit loop, and a rest), an odd K and N a multiple of 16 but not
    of 32."""
    call = "return pair_products(x, weight, scales, out, M, N, K);"
    source = blocked._product_source(torch.float32)
    assert source.count(call) == 1 and source.count(_PAIRS_RUN) == 1
    marked = build_kernel(source.replace(call, "{ std::fill(out, out + M * N, 7.0f); return; }"),
                          blocked._product_argtypes(torch.float32), lambda _: True)
    narrow = build_kernel(source.replace(_PAIRS_RUN, "&& false)"), blocked._product_argtypes(torch.float32),
                          lambda candidate: blocked._product_correct(candidate, torch.float32))
    assert marked is not None and narrow is not None
    flags = _cpu_flags()
    assert "avx512f" in flags and "avx512dq" in flags  # the development and CI CPUs have it: the path it covers
    gen = torch.Generator().manual_seed(6)
    for (n, k), rows in itertools.product([(48, 768), (48, 97), (40, 96)], [1, 4, 5, 8, 9, 13, 20]):
        weight = torch.randn(n, k, generator=gen)
        scales = torch.rand(n, generator=gen).add(0.01).to(torch.bfloat16)
        x = torch.randn(rows, k, generator=gen)
        out = torch.empty(rows, n)
        marked(x, blocked.block(weight), scales, out, rows, n, k)
        assert bool((out == 7).all()) == (rows >= 5 and n % 16 == 0), (n, k, rows)
        got = blocked.product(x, blocked.block(weight), scales)
        plain = torch.empty(rows, n)
        narrow(x, blocked.block(weight), scales, plain, rows, n, k)
        want = (x.double() @ weight.double().t()) * scales.double()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        if rows % 8 == 0 or rows % 8 >= 5:  # (a rest of 1-4 rows: the 256-bit loop splits their sums in 2 or 4)
            assert torch.equal(got, plain), (n, k, rows)
        else:
            torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_int8_rows_rounded_to_16_bits_where_the_cpu_has_vnni():
    """On a CPU with AVX512-VNNI (the development and CI machines) the int8 kernel rounds each row to 16-bit
    integers on its own scale and sums exact int32 products, 32 a vpdpwssd: the product is that of
    ``rounded_rows`` to fp32 rounding, whatever the rows' spread, also over more inputs than its int32 sums
    hold at the largest values (they move to fp32 every 512 inputs). Rows with inf or NaN take the fp32
    loop, which keeps them (as torch's product does); an all-zero row gives zeros."""
    assert blocked.int8_rounds_rows() == torch.cpu._is_vnni_supported()
    assert blocked.int8_rounds_rows()  # the development and CI CPUs have it: the path the tests cover
    gen = torch.Generator().manual_seed(3)
    for K in (5, 64, 4099):
        weight = torch.randint(-127, 128, (16, K), generator=gen, dtype=torch.int8)
        weight[0] = 127  # channel 0 at the largest products: all sums at their largest
        scales = torch.rand(16, generator=gen).add(0.01).to(torch.bfloat16)
        x = torch.randn(9, K, generator=gen)
        x[0] = 3.0  # every input at the row's largest value: q = 32767 throughout
        x[1, 0] = 1e4  # one outlier: the rest of the row rounds to steps of 1e4 / 32767
        x[2] = 0.0
        rows = blocked.rounded_rows(x)
        assert torch.all(rows[2] == 0) and rows[1, 1:].unique().numel() <= 40  # steps of 0.3 over randn values
        want = (rows @ weight.double().t()) * scales.double()
        got = blocked.product(x, blocked.block(weight), scales)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
        assert torch.all(got[2] == 0)
        assert (got.double() - (x.double() @ weight.double().t()) * scales.double()).abs().max() > 0  # rounded
    x = torch.randn(3, 37, generator=gen)
    x[0, 5], x[1, 7] = float("nan"), float("inf")
    weight = torch.randint(1, 128, (8, 37), generator=gen, dtype=torch.int8)
    got = blocked.product(x, blocked.block(weight), torch.ones(8, dtype=torch.bfloat16))
    assert torch.isnan(got[0]).all() and torch.isposinf(got[1]).all()
    torch.testing.assert_close(got[2], x[2] @ weight.float().t(), rtol=1e-5, atol=1e-4)  # unrounded


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_an_eager_decode_step_writes_its_slot_in_the_attention_kernel(dtype, monkeypatch):
    """In an eager cached decode (one token a step, float32 or bfloat16 caches) each layer's attention kernel also
    writes the step's keys and values to their slot (``attend_and_write``), in place of two slice writes of the
    caches around it: once per layer and step, the prefix slot too; the logits are the uncached forward's, and the
    caches hold what a chunked forward writes (two tokens a call take SDPA and the slice writes)."""
    model = tiny_gpt(grid_size=[3, 4], n_layer=2, n_kv_head=2).to(dtype)
    assert blocked.attention_kernel(dtype) is not None
    calls = []
    real = blocked.attend_and_write
    monkeypatch.setattr(blocked, "attend_and_write", lambda *args: calls.append(args[-1]) or real(*args))
    tokens = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2])
    with torch.inference_mode():
        cache = model.new_cache(2)
        steps = [model.forward_cached(None, 0, labels, cache=cache)]
        steps += [model.forward_cached(tokens[:, pos - 1: pos], pos, cache=cache) for pos in range(1, 6)]
        assert calls == [pos for pos in range(6) for _ in range(2)]
        full = model(tokens, labels)  # (2, 5 + 1 slots: the prefix's prediction, then each token's)
        chunked = model.new_cache(2)
        model.forward_cached(tokens[:, :1], 0, labels, cache=chunked)
        for pos in (2, 4):
            model.forward_cached(tokens[:, pos - 1: pos + 1], pos, cache=chunked)
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    torch.testing.assert_close(torch.cat(steps, 1)[:, :5].float(), full[:, :5].float(), **tolerance)
    for written, want in zip([*cache.keys, *cache.values], [*chunked.keys, *chunked.values]):
        torch.testing.assert_close(written[:, :, :6].float(), want[:, :, :6].float(), **tolerance)


def test_cpp_attention_op_writes_the_slot_then_attends_and_names_bad_inputs():
    """vqgpt_native::decode_attention_update, what compiled steps call where the C++ ops build: the step's
    keys and values written to slot start_pos, then SDPA's attention over slots [0, start_pos] in fp32,
    rounded to bf16 for a bf16 cache exactly as torch rounds; the same kernel as the Python op
    ``decode_attention_update`` (built with other flags, so within float tolerance). Query and new rows
    come in as the model makes them, strided views; wrong inputs are refused with what was wrong."""
    assert blocked.native_linear() is not None  # x86 with AVX2, a C++ compiler and ninja, as on CI
    op = torch.ops.vqgpt_native.decode_attention_update
    gen = torch.Generator().manual_seed(2)
    shapes, dtypes = [(4, 2, 64), (6, 6, 24)], [torch.float32, torch.bfloat16]
    for (heads, cache_heads, dim), dtype in itertools.product(shapes, dtypes):
        cache_k, cache_v = (torch.randn(3, cache_heads, 33, dim, generator=gen).to(dtype) for _ in range(2))
        # (B, 1, H, D) transposed: heads and batch rows at strides of their own, as in the model
        q = torch.randn(3, 1, heads, dim, generator=gen).to(dtype).transpose(1, 2)
        new_k, new_v = torch.randn(3, 1, 2 * cache_heads, dim, generator=gen).to(dtype).transpose(1, 2).chunk(2, 1)
        for pos in (0, 8, 32):  # one slot, a tail after the 8-slot loop, all 33
            want_k, want_v = cache_k.clone(), cache_v.clone()
            python_op = blocked.decode_attention_update(q, new_k, new_v, want_k, want_v, torch.tensor([pos]))
            got_k, got_v = cache_k.clone(), cache_v.clone()
            got = op(q, new_k, new_v, got_k, got_v, torch.tensor([pos]))
            assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
            assert torch.equal(got_k[:, :, pos], new_k[:, :, 0]) and torch.equal(got_v[:, :, pos], new_v[:, :, 0])
            assert torch.equal(got_k[:, :, pos + 1:], cache_k[:, :, pos + 1:])
            assert got.shape == (3, heads, 1, dim) and got.dtype == dtype and got.is_contiguous()
            group = heads // cache_heads
            exact = torch.nn.functional.scaled_dot_product_attention(
                q.float(), *(c[:, :, :pos + 1].float().repeat_interleave(group, 1) for c in (got_k, got_v)))
            torch.testing.assert_close(got.float(), exact, rtol=1e-5 if dtype == torch.float32 else 2 ** -8,
                                       atol=1e-5)
            torch.testing.assert_close(got, python_op, rtol=1e-5 if dtype == torch.float32 else 2 ** -7, atol=1e-5)
            if dtype == torch.bfloat16:  # the fp32 kernel on the same values, rounded by torch: bit for bit
                floats = op(q.float(), new_k.float(), new_v.float(), cache_k.float(), cache_v.float(),
                            torch.tensor([pos]))
                assert torch.equal(got.view(torch.int16), floats.bfloat16().view(torch.int16))
    # a NaN query row (NaN out) and huge values round as torch rounds them
    q = torch.tensor([float("nan")] * 8 + [2e-38] * 8).view(2, 1, 1, 8).bfloat16()
    cache = torch.tensor([3.3e38, -3.3e38, 1.0, -2.0])[:, None].expand(4, 8).repeat(2, 1, 1, 1).bfloat16()
    new = cache[:, :, 2:3]  # the step's row: slot 2's
    got = op(q, new, new, cache.clone(), cache.clone(), torch.tensor([3]))
    floats = op(q.float(), new.float(), new.float(), cache.float(), cache.float(), torch.tensor([3]))
    assert floats[0].isnan().all() and (floats[1].abs() > 1e38).all() and floats[1].isfinite().all()
    assert torch.equal(got.view(torch.int16), floats.bfloat16().view(torch.int16))
    # ties go to the even neighbour: equal scores average two values, (1 + (1 + 2^-7)) / 2 -> 1,
    # ((1 + 2^-7) + (1 + 2^-6)) / 2 -> 1 + 2^-6
    keys = torch.zeros(1, 1, 4, 8, dtype=torch.bfloat16)
    values = keys.clone()
    values[..., 0, :] = torch.tensor([1.0, 1 + 2 ** -7]).repeat(4)
    new = torch.tensor([1 + 2 ** -7, 1 + 2 ** -6]).repeat(4).view(1, 1, 1, 8).bfloat16()
    got = op(torch.zeros(1, 1, 1, 8, dtype=torch.bfloat16), new * 0, new, keys, values, torch.tensor([1]))
    assert got.flatten().tolist() == [1.0, 1 + 2 ** -6] * 4
    cache = torch.zeros(1, 2, 8, 16)
    q, kv = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    with pytest.raises(RuntimeError, match="start_pos 8 is outside the 8 cache slots"):
        op(q, kv, kv, cache, cache.clone(), torch.tensor([8]))
    with pytest.raises(RuntimeError, match="all float32 or all bfloat16, got Float, BFloat16"):
        op(q, kv, kv, cache.bfloat16(), cache.bfloat16(), torch.tensor([1]))
    with pytest.raises(RuntimeError, match="multiple of 8 up to 256, got 12"):
        op(q[..., :12], kv[..., :12], kv[..., :12], cache[..., :12], cache[..., :12].clone(), torch.tensor([1]))
    with pytest.raises(RuntimeError, match="H a multiple of KH"):
        op(torch.randn(1, 3, 1, 16), kv, kv, cache, cache.clone(), torch.tensor([1]))
    with pytest.raises(RuntimeError, match=r"keys and values must be \(B, KH, 1, D\) = \(1, 2, 1, 16\), got \[1, 1, 1, 16\]"):
        op(q, kv[:, :1], kv[:, :1], cache, cache.clone(), torch.tensor([1]))
    with pytest.raises(RuntimeError, match="keys and values must be Float as the caches, got BFloat16, Float"):
        op(q, kv.bfloat16(), kv, cache, cache.clone(), torch.tensor([1]))


def test_linear_takes_the_blocked_kernel_then_onednn_then_plain(monkeypatch):
    """Few-row fp32 and bf16 products run on a blocked copy of the weight; without the kernel fp32 falls
    back to oneDNN's packed copy, bf16 to F.linear; all give the same product."""
    torch.manual_seed(0)
    layer, x = Linear(24, 40, bias=False), torch.randn(3, 2, 24)
    want = x @ layer.weight.t()
    monkeypatch.setattr(layers, "_PACKED", {})
    with torch.no_grad():
        got = layer(x)
        assert layers._PACKED[id(layer.weight)][2][0] == "blocked"
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        odd = Linear(24, 20, bias=False)  # an output size that is not a multiple of 8 cannot be blocked
        torch.testing.assert_close(odd(x), x @ odd.weight.t(), rtol=1e-5, atol=1e-5)
        assert layers._PACKED.get(id(odd.weight), (None, None, ("onednn",)))[2][0] == "onednn"
        half = Linear(24, 40, bias=False).to(torch.bfloat16)
        exact = x.to(torch.bfloat16).float() @ half.weight.float().t()
        got_half = half(x.to(torch.bfloat16))
        assert got_half.dtype == torch.bfloat16 and layers._PACKED[id(half.weight)][2][0] == "blocked"
        # fp32 accumulation, one rounding to bf16 at the end
        torch.testing.assert_close(got_half.float(), exact, rtol=2 ** -8, atol=1e-6)
        monkeypatch.setattr(blocked, "_BUILT", {torch.float32: None, torch.bfloat16: None})
        monkeypatch.setattr(layers, "_PACKED", {})
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
        if layers._onednn_works:
            assert layers._PACKED[id(layer.weight)][2][0] == "onednn"
        torch.testing.assert_close(half(x.to(torch.bfloat16)).float(), exact, rtol=2e-2, atol=2e-2)
        assert id(half.weight) not in layers._PACKED  # bf16 without the kernel: F.linear, no copy


def test_decode_attention_gives_sdpa_over_the_written_slots():
    """One query per sequence and head over cache slots [0, length): SDPA's output, with grouped cache heads
    (GQA) read through strided views, lengths that leave tails after the 8-slot loop and the softmax's
    vector loop (8 floats on AVX2, 16 on AVX-512), and slots past ``length`` ignored."""
    gen = torch.Generator().manual_seed(0)
    shapes, dtypes = [(4, 4, 64), (6, 2, 16)], [torch.float32, torch.bfloat16]
    for (heads, cache_heads, dim), dtype in itertools.product(shapes, dtypes):
        # x86 with AVX2 and FMA, as the development and CI machines
        assert blocked.attention_kernel(dtype) is not None
        # a bf16 cache: fp32 arithmetic on its values, the output rounded once to bf16
        tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2 ** -8, "atol": 1e-3}
        cache_k, cache_v = (torch.randn(3, cache_heads, 40, dim, generator=gen).to(dtype) for _ in range(2))
        q = torch.randn(3, 1, heads, dim, generator=gen).to(dtype).transpose(1, 2)  # (B, H, 1, D), not contiguous
        for length in (1, 3, 9, 40):
            k, v = cache_k[:, :, :length], cache_v[:, :, :length]
            group = heads // cache_heads
            want = torch.nn.functional.scaled_dot_product_attention(
                q.float(), k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)).to(dtype)
            assert blocked.attention_usable(q, k, v)
            torch.testing.assert_close(blocked.decode_attention(q, cache_k, cache_v, length), want, **tolerance)
            # the compiled step's op: writes slot length - 1 of the caches first, then attends
            written_k, written_v = cache_k.clone(), cache_v.clone()
            written_k[:, :, length - 1], written_v[:, :, length - 1] = 0, 0
            new_k, new_v = cache_k[:, :, length - 1: length], cache_v[:, :, length - 1: length]
            got = blocked.decode_attention_update(q, new_k, new_v, written_k, written_v, torch.tensor([length - 1]))
            torch.testing.assert_close(got, want, **tolerance)
            assert torch.equal(written_k, cache_k) and torch.equal(written_v, cache_v)
    q = torch.randn(1, 2, 1, 12)
    assert not blocked.attention_usable(q, q, q)  # a head size that is not a multiple of 8
    q = torch.randn(1, 2, 2, 16)
    assert not blocked.attention_usable(q, q, q)  # two queries: SDPA with its causal mask
    assert not blocked.attention_usable(*(torch.randn(1, 2, 1, 16, dtype=torch.float16),) * 3)
    q, kv = torch.randn(1, 2, 1, 16, requires_grad=True), torch.randn(1, 2, 3, 16)
    assert not blocked.attention_usable(q, kv, kv)  # the kernel has no gradient: SDPA
    with torch.no_grad():
        assert blocked.attention_usable(q, kv, kv)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_product_kernels_build_for_a_cpu_without_avx512(dtype, tmp_path):
    """The kernels are built for the CPU they run on; on one with AVX2 alone (the first development CPU) the
    AVX-512 and AMX loops must still compile, behind their run-time checks. Code of another target inside a lambda
    does not (a lambda does not take its function's target attribute): the bf16 kernel's tiles once failed so, and
    where a kernel does not build its dtype falls back to the library's products."""
    compiler = shutil.which("g++")
    assert compiler is not None  # inductor's CPU toolchain, which the kernels are built with
    includes = [*include_paths(), sysconfig.get_paths()["include"]]
    source = tmp_path / "kernel.cpp"
    source.write_text(blocked._product_source(dtype))
    done = subprocess.run([compiler, "-std=c++17", "-O1", "-c", "-fPIC", "-fopenmp", "-mavx2", "-mfma",
                           *(f"-I{path}" for path in includes), str(source), "-o", str(tmp_path / "kernel.o")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
