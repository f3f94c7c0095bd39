"""The prior's elementwise ops as CPU kernels: RoPE on q and k (with the split of wqkv's output), RMSNorm, and SwiGLU's
``silu(a) * b``, each forward and backward (for training) or forward alone (for eager inference and decoding); and
the backward of bf16 causal attention.

In an eager training step of the prior on a CPU these ops cost about a third of the time (benchmarks/train_speed.py,
6 x 512 GPT, bf16 autocast, 2 threads): torch runs each as several passes over the activations. RoPE read q and k
in bf16, wrote an fp32 copy, a flipped copy, two products and the bf16 result; its backward as many, and the slice
of wqkv's output it came from was filled with zeros and added to in the backward. Each kernel here makes one pass
each way, with fp32 arithmetic and one rounding to the output's dtype:

- ``rope_qkv``: wqkv's output (B, n, (H + 2K) D) -> q (B, n, H, D), k (B, n, K, D) rotated, v (B, n, K, D) copied;
  the backward writes the gradient of wqkv's output whole, in one pass.
- ``rms_norm``: LlamaGen's RMSNorm of an fp32 stream (statistics in fp32, then ``x * rstd * weight``); under CPU
  bf16 autocast it hands out bf16, which the linear layer after it would cast to anyway (the same values).
- ``swiglu``: ``silu(a) * b``, rounded once (torch's two ops round silu(a), then the product).
- ``causal_attention`` (bf16): the forward is torch's CPU flash attention; the backward is five batched products
  (the scores and dP in fp32) around one kernel, instead of torch's flash backward (see there).

They run on float32 or bfloat16 CPU tensors in eager mode: not under torch.compile (inductor fuses these ops
itself) or torch.func's transforms. Where autograd records the step they run as autograd functions with their
backward; elsewhere (inference, decoding) their forward is called as it is. The attention runs only where autograd
records (its forward is torch's). Eager decoding of GPT-B at batch 8 spent about 7 ms of a 26 ms bf16 step in some
200 small torch ops, a quarter of them RMSNorm's (a bf16 model's norm upcasts, normalises, rounds, and multiplies:
about 65 us a call at 8 rows); a bf16 model's norm has a forward kernel of its own for that (``_norm_bf16``: it
rounds where the module's torch ops round). With the forwards, eager GPT-B sampling at batch 8 went from 274-339 to
377-408 tokens/s in bf16 and from 356-415 to 415-466 with int8 weights (fp32 200-221 -> 195-239; 3 alternating pairs
of processes on the Intel development CPU). Built on first use by inductor's C++ toolchain (``vqgpt.ground.native``),
checked once against the torch ops in float64, and otherwise not used. ``set_enabled(False)`` switches them off (the
benchmark's "unfused" rows). A backward asked to build a graph (``create_graph=True``, for a double backward) runs
the torch ops instead, so second derivatives come out as the torch ops give them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vqgpt.ground.native import (VEC_HEADER, build_kernel, close_to_float64, differentiable_backward, functorch_wrapped,
                                 passes)

_C_TYPE = {torch.float32: "float", torch.bfloat16: "uint16_t"}

_SCALAR = r"""
#include <omp.h>
#include <cstring>
static inline float ld(const float* p, int64_t i) { return p[i]; }
static inline float ld(const uint16_t* p, int64_t i) {
    const uint32_t u = uint32_t(p[i]) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
static inline void st(float* p, int64_t i, float v) { p[i] = v; }
static inline void st(uint16_t* p, int64_t i, float v) { p[i] = c10::BFloat16(v).x; }  // round to nearest even
"""

# RoPE on the q and k heads of wqkv's output rows (row r = (b, t) at qkv + b * sb + t * st: H + K heads of D values
# to rotate, then K heads of v), by the multipliers of slot t: y[2j] = x[2j] c[2j] + x[2j+1] s[2j],
# y[2j+1] = x[2j+1] c[2j+1] + x[2j] s[2j+1] (s holds -sin, sin); q, k, v contiguous.
_ROPE_FORWARD = VEC_HEADER + _SCALAR + r"""
extern "C" void kernel(const T* qkv, const float* table, T* q, T* k, T* v, const int64_t B, const int64_t n,
                       const int64_t H, const int64_t K, const int64_t D, const int64_t sb, const int64_t st_) {
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < B * n; ++r) {
        const int64_t b = r / n, t = r % n;
        const T* x = qkv + b * sb + t * st_;
        const float* c = table + t * 2 * D;
        const float* s = c + D;
        for (int64_t h = 0; h < H + K; ++h) {
            const T* xh = x + h * D;
            T* y = h < H ? q + (r * H + h) * D : k + (r * K + h - H) * D;
            for (int64_t j = 0; j < D; j += 2) {
                const float x0 = ld(xh, j), x1 = ld(xh, j + 1);
                st(y, j, x0 * c[j] + x1 * s[j]);
                st(y, j + 1, x1 * c[j + 1] + x0 * s[j + 1]);
            }
        }
        std::memcpy(v + r * K * D, x + (H + K) * D, K * D * sizeof(T));
    }
}
"""

# The transpose of that rotation: dx[2j] = g[2j] c[2j] + g[2j+1] s[2j+1], dx[2j+1] = g[2j+1] c[2j+1] + g[2j] s[2j];
# dq, dk, dv at any strides (b, t, head; the last dimension contiguous), dqkv (B, n, (H + 2K) D) contiguous.
_ROPE_BACKWARD = VEC_HEADER + _SCALAR + r"""
extern "C" void kernel(const T* dq, const T* dk, const T* dv, const float* table, T* dqkv, const int64_t B,
                       const int64_t n, const int64_t H, const int64_t K, const int64_t D,
                       const int64_t qb, const int64_t qt, const int64_t qh, const int64_t kb, const int64_t kt,
                       const int64_t kh, const int64_t vb, const int64_t vt, const int64_t vh) {
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < B * n; ++r) {
        const int64_t b = r / n, t = r % n;
        T* dx = dqkv + r * (H + 2 * K) * D;
        const float* c = table + t * 2 * D;
        const float* s = c + D;
        for (int64_t h = 0; h < H + K; ++h) {
            const T* g = h < H ? dq + b * qb + t * qt + h * qh : dk + b * kb + t * kt + (h - H) * kh;
            T* y = dx + h * D;
            for (int64_t j = 0; j < D; j += 2) {
                const float g0 = ld(g, j), g1 = ld(g, j + 1);
                st(y, j, g0 * c[j] + g1 * s[j + 1]);
                st(y, j + 1, g1 * c[j + 1] + g0 * s[j]);
            }
        }
        for (int64_t h = 0; h < K; ++h)
            std::memcpy(dx + (H + K + h) * D, dv + b * vb + t * vt + h * vh, D * sizeof(T));
    }
}
"""

# 1 / sqrt(mean(x^2) + eps) of a row of C values (fp32 or bf16), in fp32
_ROW_RSTD = r"""
template <typename X>
static inline float row_rstd(const X* xr, const int64_t C, const float eps) {
    Vec acc0(0.0f), acc1(0.0f);
    for (int64_t c = 0; c < C; c += 2 * V) {
        Vec u, v;
        load2(xr + c, u, v, std::min<int64_t>(2 * V, C - c));
        acc0 = at::vec::fmadd(u, u, acc0);
        acc1 = at::vec::fmadd(v, v, acc1);
    }
    return 1.0f / std::sqrt(at::vec::vec_reduce_all<float>(std::plus<Vec>(), acc0 + acc1) / C + eps);
}
"""

# RMSNorm of fp32 rows (R, C): rstd = 1 / sqrt(mean(x^2) + eps), y = x * rstd * w in Y_T.
_NORM_FORWARD = VEC_HEADER + _SCALAR + _ROW_RSTD + r"""
extern "C" void kernel(const float* x, const float* w, Y_T* y, float* rstd, const int64_t R, const int64_t C,
                       const float eps) {
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
        const float* xr = x + r * C;
        const float scale = row_rstd(xr, C, eps);
        rstd[r] = scale;
        for (int64_t c = 0; c < C; c += 2 * V) {
            const int64_t m = std::min<int64_t>(2 * V, C - c);
            Vec u, v, wu, wv;
            load2(xr + c, u, v, m);
            load2(w + c, wu, wv, m);
            store2(y + r * C + c, u * Vec(scale) * wu, v * Vec(scale) * wv, m);
        }
    }
}
"""

# The RMSNorm of a bf16 model (bf16 rows and weight), forward only (inference), rounded as LlamaGen's module rounds
# it: the rows normalised in fp32 and rounded to bf16, then times the weight, rounded again.
_NORM_BF16_FORWARD = VEC_HEADER + _SCALAR + _ROW_RSTD + r"""
static inline void round2(Vec& a, Vec& b) {  // to the nearest bf16 (even), as fp32
    std::tie(a, b) = at::vec::convert_bfloat16_float(at::vec::convert_float_bfloat16(a, b));
}

extern "C" void kernel(const uint16_t* x, const uint16_t* w, uint16_t* y, const int64_t R, const int64_t C,
                       const float eps) {
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
        const uint16_t* xr = x + r * C;
        const Vec scale(row_rstd(xr, C, eps));
        for (int64_t c = 0; c < C; c += 2 * V) {
            const int64_t m = std::min<int64_t>(2 * V, C - c);
            Vec u, v, wu, wv;
            load2(xr + c, u, v, m);
            load2(w + c, wu, wv, m);
            u = u * scale;
            v = v * scale;
            round2(u, v);
            store2(y + r * C + c, u * wu, v * wv, m);
        }
    }
}
"""

# Its backward: dx = rstd (g w) - x rstd^3 mean(g w x) (fp32), and each of T threads' part of dw = sum of g x rstd.
_NORM_BACKWARD = VEC_HEADER + _SCALAR + r"""
// the 2 V values at c (of C) of a row of x, of g and of w; returns how many of them are in the row
static inline int64_t load3(const float* x, const Y_T* g, const float* w, const int64_t c, const int64_t C,
                            Vec& u, Vec& v, Vec& gu, Vec& gv, Vec& wu, Vec& wv) {
    const int64_t m = std::min<int64_t>(2 * V, C - c);
    load2(x + c, u, v, m);
    load2(g + c, gu, gv, m);
    load2(w + c, wu, wv, m);
    return m;
}

extern "C" void kernel(const Y_T* g, const float* x, const float* w, const float* rstd, float* dx, float* dw_parts,
                       const int64_t R, const int64_t C, const int64_t T) {
    #pragma omp parallel num_threads(T)
    {
        const int64_t id = omp_get_thread_num(), count = omp_get_num_threads();
        float* dw = dw_parts + id * C;
        for (int64_t r = R * id / count; r < R * (id + 1) / count; ++r) {
            const float* xr = x + r * C;
            const Vec scale(rstd[r]);
            Vec acc0(0.0f), acc1(0.0f);
            for (int64_t c = 0; c < C; c += 2 * V) {
                Vec u, v, gu, gv, wu, wv;
                const int64_t m = load3(xr, g + r * C, w, c, C, u, v, gu, gv, wu, wv);
                acc0 = at::vec::fmadd(gu * wu, u, acc0);
                acc1 = at::vec::fmadd(gv * wv, v, acc1);
                Vec du, dv;
                load2(dw + c, du, dv, m);
                store2(dw + c, at::vec::fmadd(gu * u, scale, du), at::vec::fmadd(gv * v, scale, dv), m);
            }
            const float s = rstd[r];
            const Vec k(s * s * s * at::vec::vec_reduce_all<float>(std::plus<Vec>(), acc0 + acc1) / C);
            for (int64_t c = 0; c < C; c += 2 * V) {
                Vec u, v, gu, gv, wu, wv;
                const int64_t m = load3(xr, g + r * C, w, c, C, u, v, gu, gv, wu, wv);
                store2(dx + r * C + c, gu * wu * scale - u * k, gv * wv * scale - v * k, m);
            }
        }
    }
}
"""

# SwiGLU's gate over N values: h = silu(a) * b; backward da = g b s (1 + a (1 - s)), db = g silu(a), s = sigmoid(a).
_GLU_FORWARD = VEC_HEADER + _SCALAR + r"""
extern "C" void kernel(const T* a, const T* b, T* h, const int64_t N) {
    const int64_t blocks = (N + 2 * V - 1) / (2 * V);
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < blocks; ++i) {
        const int64_t o = i * 2 * V, m = std::min<int64_t>(2 * V, N - o);
        Vec a0, a1, b0, b1;
        load2(a + o, a0, a1, m);
        load2(b + o, b0, b1, m);
        store2(h + o, a0 * sigmoid(a0) * b0, a1 * sigmoid(a1) * b1, m);
    }
}
"""

_GLU_BACKWARD = VEC_HEADER + _SCALAR + r"""
extern "C" void kernel(const T* g, const T* a, const T* b, T* da, T* db, const int64_t N) {
    const int64_t blocks = (N + 2 * V - 1) / (2 * V);
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < blocks; ++i) {
        const int64_t o = i * 2 * V, m = std::min<int64_t>(2 * V, N - o);
        Vec a0, a1, b0, b1, g0, g1;
        load2(a + o, a0, a1, m);
        load2(b + o, b0, b1, m);
        load2(g + o, g0, g1, m);
        const Vec s0 = sigmoid(a0), s1 = sigmoid(a1), one(1.0f);
        store2(da + o, g0 * b0 * s0 * (one + a0 * (one - s0)), g1 * b1 * s1 * (one + a1 * (one - s1)), m);
        store2(db + o, g0 * a0 * s0, g1 * a1 * s1, m);
    }
}
"""

# Causal attention's backward, the part between its products, per row (slice, query i) of the (N, T, T) scores S
# (fp32, unscaled): P = exp(S scale - lse) and dS = P (dP - delta) scale over the keys j <= i, zeros after.
_ATTN_BACKWARD = VEC_HEADER + _SCALAR + r"""
extern "C" void kernel(const float* S, const float* lse, const float* dP, const float* delta, uint16_t* P,
                       uint16_t* dS, const int64_t N, const int64_t T, const float scale) {
    #pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < N * T; ++row) {
        const int64_t seen = row % T + 1;  // keys 0..i
        const float* s = S + row * T;
        const float* dp = dP + row * T;
        uint16_t* p = P + row * T;
        uint16_t* ds = dS + row * T;
        const Vec l(lse[row]), d(delta[row]), k(scale);
        for (int64_t c = 0; c < seen; c += 2 * V) {
            const int64_t m = std::min<int64_t>(2 * V, seen - c);
            Vec s0, s1, g0, g1;
            load2(s + c, s0, s1, m);
            load2(dp + c, g0, g1, m);
            const Vec e0 = at::vec::fmsub(s0, k, l).exp_u20(), e1 = at::vec::fmsub(s1, k, l).exp_u20();
            store2(p + c, e0, e1, m);
            store2(ds + c, e0 * (g0 - d) * k, e1 * (g1 - d) * k, m);
        }
        std::memset(p + seen, 0, (T - seen) * sizeof(uint16_t));
        std::memset(ds + seen, 0, (T - seen) * sizeof(uint16_t));
    }
}
"""

_enabled = True
# (op, dtype) -> (forward, backward), or None where they did not build or failed their check
_BUILT: dict[tuple[str, torch.dtype], tuple | None] = {}


def set_enabled(enabled: bool) -> bool:
    """Switch the kernels on or off for this process (off: the torch ops everywhere); returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def _argtypes(op: str, t: str) -> tuple[list[str], list[str]]:
    i64 = "const int64_t"
    if op == "rope":
        return ([f"const {t}*", "const float*", f"{t}*", f"{t}*", f"{t}*"] + [i64] * 7,
                [f"const {t}*"] * 3 + ["const float*", f"{t}*"] + [i64] * 14)
    if op == "norm":
        return (["const float*", "const float*", f"{t}*", "float*", i64, i64, "const float"],
                [f"const {t}*", "const float*", "const float*", "const float*", "float*", "float*", i64, i64, i64])
    return [f"const {t}*", f"const {t}*", f"{t}*", i64], [f"const {t}*"] * 3 + [f"{t}*", f"{t}*", i64]


_SOURCES = {"rope": (_ROPE_FORWARD, _ROPE_BACKWARD, "T"), "norm": (_NORM_FORWARD, _NORM_BACKWARD, "Y_T"),
            "glu": (_GLU_FORWARD, _GLU_BACKWARD, "T")}


def kernels(op: str, dtype: torch.dtype) -> tuple | None:
    """(forward, backward) of ``op`` ("rope", "norm", "glu") for ``dtype`` (of the activations; for "norm" of its
    output), built and checked against the torch ops on the first call; None where they cannot be built or differ."""
    key = (op, dtype)
    if key not in _BUILT:
        _BUILT[key] = None
        forward_src, backward_src, name = _SOURCES[op]
        t = _C_TYPE[dtype]
        types = _argtypes(op, t)
        forward = build_kernel(f"typedef {t} {name};\n" + forward_src, types[0])
        backward = build_kernel(f"typedef {t} {name};\n" + backward_src, types[1])
        if forward is not None and backward is not None:
            _BUILT[key] = (forward, backward)
            if not passes(lambda: _CHECKS[op](dtype)):
                _BUILT[key] = None
    return _BUILT[key]


def _one_kernel(key: tuple, source: str, argtypes: list[str], check) -> object | None:
    """A kernel of its own (not a forward / backward pair), kept in ``_BUILT`` under ``key``: built on the first call
    and kept if ``check()`` (which may ask for it again) holds; None where not."""
    if key not in _BUILT:
        _BUILT[key] = build_kernel(source, argtypes)
        if _BUILT[key] is not None and not passes(check):
            _BUILT[key] = None
    return _BUILT[key]


def _eager_cpu(x: torch.Tensor) -> bool:
    """Whether a kernel may take x: switched on, a CPU float32 / bfloat16 tensor, outside a torch.compile trace and
    torch.func's transforms (checked in this order: dynamo cannot trace the last)."""
    if not _enabled or torch.compiler.is_compiling() or functorch_wrapped(x):
        return False
    return x.device.type == "cpu" and x.dtype in _C_TYPE


def _recording(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an op on ``tensors``: then the kernels run as an autograd function (with their
    backward); else (inference, a decode step) their forward is called as it is, without that function's cost."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# ---------------------------------------------------------------------------------------------------- RoPE


class _RopeQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: torch.Tensor, table: torch.Tensor, H: int, K: int, D: int):
        ctx.save_for_backward(table)
        ctx.dims = qkv.shape[0], qkv.shape[1], H, K, D
        return _rope_forward(qkv, table, H, K, D)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        (table,) = ctx.saved_tensors
        B, n, H, K, D = ctx.dims
        ref = next(g for g in (dq, dk, dv) if g is not None)
        grads = [ref.new_zeros(B, n, heads, D) if g is None else g for g, heads in ((dq, H), (dk, K), (dv, K))]
        if torch.is_grad_enabled():  # create_graph: the (linear) backward by torch ops, a graph of the gradients
            g = torch.cat(grads[:2], dim=2).float()
            swapped = (g * table[:, None, 1]).unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
            rotated = (g * table[:, None, 0] + swapped).to(ref.dtype).flatten(2)
            return torch.cat([rotated, grads[2].flatten(2)], dim=-1), None, None, None, None
        grads = [g if g.stride(-1) == 1 else g.contiguous() for g in grads]
        _, backward = kernels("rope", grads[0].dtype)
        dqkv = ref.new_empty(B, n, (H + 2 * K) * D)
        backward(*grads, table, dqkv, B, n, H, K, D, *(s for g in grads for s in g.stride()[:3]))
        return dqkv, None, None, None, None


def _rope_forward(qkv: torch.Tensor, table: torch.Tensor, H: int, K: int, D: int) -> tuple[torch.Tensor, ...]:
    """(q, k, v) by the forward kernel."""
    forward, _ = kernels("rope", qkv.dtype)
    B, n, _ = qkv.shape
    q, k, v = (qkv.new_empty(B, n, heads, D) for heads in (H, K, K))
    forward(qkv, table, q, k, v, B, n, H, K, D, qkv.stride(0), qkv.stride(1))
    return q, k, v


def rope_qkv(qkv: torch.Tensor, table: torch.Tensor, H: int, K: int, D: int, rotate) -> tuple[torch.Tensor, ...]:
    """wqkv's output (B, n, (H + 2K) D) -> q (B, n, H, D), k (B, n, K, D) rotated by the multipliers ``table`` (n, 2, D)
    of their slots, and v (B, n, K, D): by the kernel where it applies, else by ``rotate`` (``layers.apply_rope``)."""
    B, n, _ = qkv.shape
    if (_eager_cpu(qkv) and qkv.stride(-1) == 1 and D % 2 == 0 and table.dtype == torch.float32
            and table.shape == (n, 2, D) and table.is_contiguous() and not table.requires_grad
            and kernels("rope", qkv.dtype) is not None):
        return _RopeQKV.apply(qkv, table, H, K, D) if _recording(qkv) else _rope_forward(qkv, table, H, K, D)
    return _rope_reference(qkv, table, H, K, D, rotate)


def _rope_reference(qkv: torch.Tensor, table: torch.Tensor, H: int, K: int, D: int, rotate) -> tuple[torch.Tensor, ...]:
    """``rope_qkv`` by torch ops: q and k rotated by ``rotate(x, table)``, v a view."""
    B, n, _ = qkv.shape
    qk = rotate(qkv[..., : (H + K) * D].view(B, n, H + K, D), table)
    return qk[:, :, :H], qk[:, :, H:], qkv[..., (H + K) * D:].view(B, n, K, D)


# ---------------------------------------------------------------------------------------------------- RMSNorm


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype):
        y, rstd = _norm_forward(x, weight, eps, out_dtype)
        ctx.save_for_backward(x, weight, rstd)  # the parameter itself: autograd's check of in-place changes sees it
        ctx.eps, ctx.out = eps, out_dtype
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a backward of its own gradient, by the torch ops
            return differentiable_backward(
                lambda x, w: F.rms_norm(x, x.shape[-1:], w, ctx.eps).to(ctx.out), (x, weight), (dy,)) + (None, None)
        dtype = torch.bfloat16 if dy.dtype == torch.bfloat16 else torch.float32
        _, backward = kernels("norm", dtype)
        dy = dy.to(dtype).contiguous()
        C, threads = x.shape[-1], torch.get_num_threads()
        dx = torch.empty_like(x)
        parts = x.new_zeros(threads, C)
        backward(dy, x, weight.detach(), rstd, dx, parts, rstd.numel(), C, threads)
        return dx, parts.sum(0), None, None


def _norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype):
    """(y, rstd) of the fp32 kernel."""
    forward, _ = kernels("norm", out_dtype)
    C = x.shape[-1]
    y = x.new_empty(x.shape, dtype=out_dtype)
    rstd = x.new_empty(x.numel() // C)
    forward(x, weight.detach(), y, rstd, rstd.numel(), C, eps)
    return y, rstd


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """LlamaGen's RMSNorm by a kernel: of an fp32 x with an fp32 weight (bf16 out under CPU bf16 autocast), and, for
    inference, of a bf16 x with a bf16 weight (a bf16 model); None where no kernel applies (the caller runs the
    torch ops)."""
    if not (_eager_cpu(x) and x.dtype == weight.dtype and x.is_contiguous() and weight.shape == x.shape[-1:]
            and weight.device.type == "cpu"):
        return None
    if x.dtype == torch.bfloat16:
        kernel = None if _recording(x, weight) else _norm_bf16()
        if kernel is None:
            return None
        y = torch.empty_like(x)
        kernel(x, weight.contiguous(), y, x.numel() // x.shape[-1], x.shape[-1], eps)
        return y
    out = torch.bfloat16 if (torch.is_autocast_enabled("cpu")
                             and torch.get_autocast_dtype("cpu") == torch.bfloat16) else torch.float32
    if kernels("norm", out) is None:
        return None
    return _RMSNorm.apply(x, weight, eps, out) if _recording(x, weight) else _norm_forward(x, weight, eps, out)[0]


def _norm_bf16():
    """The bf16 model's RMSNorm kernel (inference), built and checked on the first call; None where not."""
    return _one_kernel(("norm", "bf16 weight"), _NORM_BF16_FORWARD, ["const uint16_t*", "const uint16_t*", "uint16_t*",
                                                                     "const int64_t", "const int64_t", "const float"],
                       _check_norm_bf16)


def decode_kernels(dtype: torch.dtype) -> tuple | None:
    """For a decode step that calls the kernels itself (``stage2_prior.eager_step``): (norm, rope, glu), the inference
    forwards of the activations' ``dtype`` (float32 or bfloat16) as plain calls without the checks of ``rms_norm``,
    ``rope_qkv`` and ``swiglu``, which give the same values from them: ``norm(x (rows, C), weight, eps)``,
    ``rope(qkv, table, H, K, D) -> (q, k, v)`` and ``glu(a, b)``, for contiguous x, qkv, a, b and weight. None where the
    kernels are switched off or one of them is missing. Each call makes a norm of its own (with a scratch buffer):
    one per caller and thread."""
    if not _enabled or dtype not in _C_TYPE or kernels("rope", dtype) is None or kernels("glu", dtype) is None:
        return None
    if dtype == torch.float32:
        pair = kernels("norm", dtype)
        if pair is None:
            return None
        forward = pair[0]
        unread: dict[int, torch.Tensor] = {}  # the rstd the fp32 kernel also writes, per row count: one buffer

        def norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
            rows = x.numel() // x.shape[-1]
            if rows not in unread:
                unread[rows] = torch.empty(rows)
            y = torch.empty_like(x)
            forward(x, weight, y, unread[rows], rows, x.shape[-1], eps)
            return y
    else:
        kernel = _norm_bf16()
        if kernel is None:
            return None

        def norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
            y = torch.empty_like(x)
            kernel(x, weight, y, x.numel() // x.shape[-1], x.shape[-1], eps)
            return y

    return norm, _rope_forward, _glu_forward


# ---------------------------------------------------------------------------------------------------- SwiGLU


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor):
        ctx.save_for_backward(a, b)
        return _glu_forward(a, b)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        a, b = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a backward of its own gradient, by the torch ops
            return differentiable_backward(lambda a, b: F.silu(a) * b, (a, b), (dh,))
        _, backward = kernels("glu", a.dtype)
        dh = dh.to(a.dtype).contiguous()
        da, db = torch.empty_like(a), torch.empty_like(b)
        backward(dh, a, b, da, db, a.numel())
        return da, db


def _glu_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b`` by the forward kernel."""
    forward, _ = kernels("glu", a.dtype)
    h = torch.empty_like(a)
    forward(a, b, h, a.numel())
    return h


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b`` by the kernel where it applies, else by the torch ops."""
    if (_eager_cpu(a) and b.dtype == a.dtype and a.shape == b.shape and a.is_contiguous() and b.is_contiguous()
            and b.device.type == "cpu" and kernels("glu", a.dtype) is not None):
        return _SwiGLU.apply(a, b) if _recording(a, b) else _glu_forward(a, b)
    return F.silu(a) * b


# ---------------------------------------------------------------------------------------------------- attention

_SCORES_BYTES = 64 << 20  # fp32 scores held at once by the attention's backward (slices of (T, T) each)


def _attention_kernel():
    """The attention backward's elementwise kernel (bf16), built and checked on the first call; None where not."""
    argtypes = ["const float*"] * 4 + ["uint16_t*", "uint16_t*", "const int64_t", "const int64_t", "const float"]
    return _one_kernel(("attn", torch.bfloat16), _ATTN_BACKWARD, argtypes, _check_attention)


class _CausalAttention(torch.autograd.Function):
    """Causal attention of bf16 q, k, v (B, H, T, D): forward by torch's CPU flash kernel (which gives the rows'
    logsumexp), backward by batched products and one elementwise kernel (see ``causal_attention``)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: torch's attention (whose flash backward has no backward either)
            return differentiable_backward(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                            (q, k, v), (dout,))
        B, H, T, D = q.shape
        N, scale = B * H, D ** -0.5
        kernel = _attention_kernel()
        dout = dout.to(q.dtype)
        delta = (dout.float() * out.float()).sum(-1).reshape(N, T)  # rowsum(dO * O) = rowsum(P * dP)
        q3, k3, v3, do3 = (t.reshape(N, T, D) for t in (q, k, v, dout))
        lse = lse.reshape(N, T)
        dq, dk, dv = (q3.new_empty(N, T, D) for _ in range(3))
        step = max(1, _SCORES_BYTES // (4 * T * T))
        for i in range(0, N, step):
            j = min(N, i + step)
            # the scores in fp32 from bf16 q and k (a bf16 product would round them before the exp)
            scores = torch.bmm(q3[i:j].float(), k3[i:j].float().transpose(1, 2))
            dp = torch.bmm(do3[i:j].float(), v3[i:j].float().transpose(1, 2))
            p, ds = torch.empty_like(dp, dtype=q.dtype), torch.empty_like(dp, dtype=q.dtype)
            kernel(scores, lse[i:j].contiguous(), dp, delta[i:j].contiguous(), p, ds, j - i, T, scale)
            torch.bmm(p.transpose(1, 2), do3[i:j], out=dv[i:j])
            torch.bmm(ds, k3[i:j], out=dq[i:j])
            torch.bmm(ds.transpose(1, 2), q3[i:j], out=dk[i:j])
        return dq.view(B, H, T, D), dk.view(B, H, T, D), dv.view(B, H, T, D)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """Causal attention (no dropout) of q, k, v (B, H, T, D) with its backward done here, in a CPU bf16 training step;
    None where it does not apply (the caller runs SDPA).

    torch's CPU flash attention backward took 20-30 ms per layer of 8 x 8 heads x 256 tokens x 64 in bf16 (about
    a fifth of the 6 x 512 prior's step on the development CPU, Intel Xeon with AMX, 2 threads), where the batched
    products the same gradient needs took about 7 ms (oneDNN's, on AMX). This backward does those products, the
    scores and dP = dO V^T in fp32 (so it is no further from float64 than the flash backward), with the softmax's
    rows from the forward's logsumexp and one kernel between them (P, and dS = P (dP - rowsum(dO O))); the scores
    are held for a few (T, T) slices at a time (``_SCORES_BYTES``)."""
    if not (_eager_cpu(q) and _recording(q, k, v) and q.dtype == torch.bfloat16 and k.dtype == v.dtype == q.dtype
            and q.dim() == 4 and q.shape == k.shape == v.shape and q.shape[2] > 1 and _attention_kernel() is not None):
        return None
    return _CausalAttention.apply(q, k, v)


# ---------------------------------------------------------------------------------------------------- first-use checks


def _check_rope(dtype: torch.dtype) -> bool:
    """The kernels against the rotation in float64 on 2 x 3 rows of 3 q, 1 k and 1 v head of 6 values, from a view
    with padded rows (strides the kernel must follow), with a gradient for every output."""
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        gen = torch.Generator().manual_seed(0)
        H, K, D, n = 3, 1, 6, 3
        full = torch.randn(2, n, (H + 2 * K) * D + 4, generator=gen)
        table = torch.randn(n, 2, D, generator=gen)
        grads = [torch.randn(2, n, heads, D, generator=gen) for heads in (H, K, K)]
        x = full.to(dtype)[..., : (H + 2 * K) * D].detach().requires_grad_()
        out = _RopeQKV.apply(x, table, H, K, D)
        torch.autograd.backward(out, [g.to(dtype) for g in grads])
        x64 = x.detach().double().requires_grad_()
        xs = x64[..., : (H + K) * D].view(2, n, H + K, D)
        swapped = xs.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        qk = xs * table[:, None, 0].double() + swapped * table[:, None, 1].double()
        want = [qk[:, :, :H], qk[:, :, H:], x64[..., (H + K) * D:].view(2, n, K, D)]
        torch.autograd.backward(want, [g.double() for g in grads])
    return close_to_float64([*out, x.grad], [*want, x64.grad], dtype)


def _check_norm(dtype: torch.dtype) -> bool:
    """The kernels against LlamaGen's RMSNorm in float64 on 5 rows of 2 V + 3 values (a masked tail), dtype the
    output's (and the incoming gradient's)."""
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        gen = torch.Generator().manual_seed(0)
        C = 35
        x = (torch.randn(5, C, generator=gen) * 3 + 1).requires_grad_()
        weight = (torch.rand(C, generator=gen) + 0.5).requires_grad_()
        dy = torch.randn(5, C, generator=gen)
        y = _RMSNorm.apply(x, weight, 1e-5, dtype)
        y.backward(dy.to(dtype))
        x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
        want = F.rms_norm(x64, (C,), w64, 1e-5)
        want.backward(dy.to(dtype).double())
    return close_to_float64([y, x.grad, weight.grad], [want, x64.grad, w64.grad], dtype)


def _check_norm_bf16() -> bool:
    """The bf16 model's norm kernel against the module's torch ops in float64 (their bf16 roundings included) on 5 rows
    of 2 V + 3 values (a masked tail)."""
    gen = torch.Generator().manual_seed(0)
    C = 35
    x = (torch.randn(5, C, generator=gen) * 3 + 1).to(torch.bfloat16)
    weight = (torch.rand(C, generator=gen) + 0.5).to(torch.bfloat16)
    y = torch.empty_like(x)
    _norm_bf16()(x, weight, y, 5, C, 1e-5)
    with torch.autocast("cpu", enabled=False):
        want = F.rms_norm(x.double(), (C,), None, 1e-5).to(torch.bfloat16).double() * weight.double()
    return close_to_float64([y], [want], torch.bfloat16)


def _check_glu(dtype: torch.dtype) -> bool:
    """The kernels against ``silu(a) * b`` in float64 over 2 V * 3 + 5 values (a masked tail)."""
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        gen = torch.Generator().manual_seed(0)
        a, b, g = (torch.randn(101, generator=gen) * 4 for _ in range(3))
        a, b = (t.to(dtype).requires_grad_() for t in (a, b))
        h = _SwiGLU.apply(a, b)
        h.backward(g.to(dtype))
        a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
        want = F.silu(a64) * b64
        want.backward(g.to(dtype).double())
    return close_to_float64([h, a.grad, b.grad], [want, a64.grad, b64.grad], dtype)


def _check_attention() -> bool:
    """The attention's backward against SDPA in float64 on 2 x 3 heads of 9 tokens (rows shorter than a vector and
    a masked rest) of 8 values, with scores of a size that a bf16 product would round visibly."""
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        gen = torch.Generator().manual_seed(0)
        q, k, v, dout = (torch.randn(2, 3, 9, 8, generator=gen) * 2 for _ in range(4))
        q, k, v = (t.to(torch.bfloat16).requires_grad_() for t in (q, k, v))
        out = _CausalAttention.apply(q, k, v)
        out.backward(dout.to(torch.bfloat16))
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        want = F.scaled_dot_product_attention(q64, k64, v64, is_causal=True)
        want.backward(dout.to(torch.bfloat16).double())
    return close_to_float64([out, q.grad, k.grad, v.grad], [want, q64.grad, k64.grad, v64.grad], torch.bfloat16)


_CHECKS = {"rope": _check_rope, "norm": _check_norm, "glu": _check_glu}
