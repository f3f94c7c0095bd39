"""GroupNorm followed by SiLU, as one CPU kernel for channels-last maps (the conv tokenizer's pre-activations).

Every ResnetBlock of the encoder and decoder runs ``silu(group_norm(x))`` twice, and their output norms once
more. On a CPU, torch runs the two as separate ops, and in bf16 channels-last its GroupNorm backward is a slow
path: on the development CPU (Intel Xeon with AMX, 2 threads) the norm and SiLU of a 16 x 128 x 64 x 64 bf16
map took 80 ms forward and backward channels-last against 29 ms NCHW, while oneDNN's bf16 convolutions on AMX
run 1.4x faster channels-last (NCHW makes them reorder every input). So a channels-last bf16 step lost in the
norms what it won in the convolutions.

This kernel does the norm and the SiLU of a channels-last map (N, C, H, W) in a few passes over each sample's
(H*W, C) slice, which stays in the core's cache: statistics per group in fp32 (mean first, then the centred
squares: no cancellation), then ``y = silu(x * a[c] + b[c])``. Its backward recomputes the pre-activation
from x instead of storing it, sums the per-channel terms of the GroupNorm gradient in one pass and writes the
input's gradient in a second. Samples go to threads (OpenMP), so it is used where a batch has at least as
many samples as threads; any channel count (a rest after the vector steps is masked). The arithmetic is
fp32 throughout, outputs rounded once to the input's dtype (the two ops in bf16 round twice: the norm's
output, then the SiLU's); on AVX-512 the sigmoid's exp is a short polynomial (relative error below 2e-7).

Built on first use by inductor's C++ toolchain (as ``stage2_prior.blocked`` builds its kernels), checked against
the unfused ops once, and otherwise (no compiler, another CPU architecture, a wrong result) not used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqgpt.ground.native import (VEC_HEADER, build_kernel, close_to_float64, differentiable_backward, functorch_wrapped,
                                 passes)

_HEADER = VEC_HEADER + r"""
// per channel c: group g = c / (C / G) gets value[g]
static inline void per_channel(const float* value, int64_t C, int64_t G, float* out) {
    const int64_t per = C / G;
    for (int64_t c = 0; c < C; ++c) out[c] = value[c / per];
}

// sums of a block of pixels in fp32 lanes are added here in fp64: a map of 256 x 256 pixels sums 65,536 values
constexpr int64_t PIXELS = 256;
static inline void flush(std::vector<float>& block, std::vector<double>& total) {
    for (size_t c = 0; c < block.size(); ++c) total[c] += block[c];
    std::fill(block.begin(), block.end(), 0.0f);
}

// sums over the group's channels of per-channel sums, as group means (divided by count)
static inline void group_means(const double* sums, int64_t C, int64_t G, double count, float* out) {
    const int64_t per = C / G;
    for (int64_t g = 0; g < G; ++g) {
        double s = 0;
        for (int64_t c = g * per; c < (g + 1) * per; ++c) s += sums[c];
        out[g] = float(s / count);
    }
}
"""

# Forward: x (N, HW, C) -> y, and mean / rstd (N, G) for the backward.
_FORWARD = _HEADER + r"""
extern "C" void kernel(const MAP_T* x, const float* gamma, const float* beta, MAP_T* y, float* mean, float* rstd,
                       const int64_t N, const int64_t HW, const int64_t C, const int64_t G, const float eps) {
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const MAP_T* xs = x + n * HW * C;
        MAP_T* ys = y + n * HW * C;
        const int64_t CP = (C + 2 * V - 1) / (2 * V) * (2 * V);  // buffers padded with zeros past C
        std::vector<float> sums(CP, 0.0f), centre(CP, 0.0f), a(CP, 0.0f), b(CP, 0.0f), means(G), rstds(G);
        std::vector<double> total(CP, 0.0);
        for (int64_t p = 0; p < HW; ++p) {  // channel sums
            for (int64_t c = 0; c < C; c += 2 * V) {
                const int64_t m = std::min<int64_t>(2 * V, C - c);
                Vec u, v;
                load2(xs + p * C + c, u, v, m);
                store2(sums.data() + c, Vec::loadu(sums.data() + c) + u, Vec::loadu(sums.data() + c + V) + v);
            }
            if (p % PIXELS == PIXELS - 1 || p == HW - 1) flush(sums, total);
        }
        group_means(total.data(), C, G, double(HW) * (C / G), means.data());
        per_channel(means.data(), C, G, centre.data());
        std::fill(total.begin(), total.end(), 0.0);
        for (int64_t p = 0; p < HW; ++p) {  // centred squares
            for (int64_t c = 0; c < C; c += 2 * V) {
                const int64_t m = std::min<int64_t>(2 * V, C - c);
                Vec u, v;
                load2(xs + p * C + c, u, v, m);
                u = u - Vec::loadu(centre.data() + c);
                v = v - Vec::loadu(centre.data() + c + V);
                store2(sums.data() + c, at::vec::fmadd(u, u, Vec::loadu(sums.data() + c)),
                       at::vec::fmadd(v, v, Vec::loadu(sums.data() + c + V)));
            }
            if (p % PIXELS == PIXELS - 1 || p == HW - 1) flush(sums, total);
        }
        group_means(total.data(), C, G, double(HW) * (C / G), rstds.data());
        for (int64_t g = 0; g < G; ++g) {
            rstds[g] = 1.0f / std::sqrt(rstds[g] + eps);
            mean[n * G + g] = means[g];
            rstd[n * G + g] = rstds[g];
        }
        per_channel(rstds.data(), C, G, a.data());
        for (int64_t c = 0; c < C; ++c) {  // the norm as x * a + b per channel
            a[c] *= gamma[c];
            b[c] = beta[c] - centre[c] * a[c];
        }
        for (int64_t p = 0; p < HW; ++p)
            for (int64_t c = 0; c < C; c += 2 * V) {
                const int64_t m = std::min<int64_t>(2 * V, C - c);
                Vec u, v;
                load2(xs + p * C + c, u, v, m);
                u = at::vec::fmadd(u, Vec::loadu(a.data() + c), Vec::loadu(b.data() + c));
                v = at::vec::fmadd(v, Vec::loadu(a.data() + c + V), Vec::loadu(b.data() + c + V));
                store2(ys + p * C + c, u * sigmoid(u), v * sigmoid(v), m);
            }
    }
}
"""

# Backward: dy, x (N, HW, C), mean / rstd (N, G) -> dx, and per-sample parts of dgamma, dbeta (N, C).
_BACKWARD = _HEADER + r"""
// the gradient at the norm's output t = x * a + b, from dy at silu(t)
static inline Vec silu_grad(const Vec& t, const Vec& dy) {
    const Vec s = sigmoid(t);
    return dy * s * (Vec(1.0f) + t * (Vec(1.0f) - s));
}

extern "C" void kernel(const MAP_T* dy, const MAP_T* x, const float* gamma, const float* beta, const float* mean,
                       const float* rstd, MAP_T* dx, float* dgamma, float* dbeta,
                       const int64_t N, const int64_t HW, const int64_t C, const int64_t G) {
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const MAP_T* xs = x + n * HW * C;
        const MAP_T* dys = dy + n * HW * C;
        MAP_T* dxs = dx + n * HW * C;
        const int64_t CP = (C + 2 * V - 1) / (2 * V) * (2 * V);  // buffers padded with zeros past C
        std::vector<float> centre(CP, 0.0f), scale(CP, 0.0f), a(CP, 0.0f), b(CP, 0.0f), block_dt(CP, 0.0f),
            block_dtx(CP, 0.0f);
        std::vector<double> sum_dt(CP, 0.0), sum_dtx(CP, 0.0);
        per_channel(mean + n * G, C, G, centre.data());
        per_channel(rstd + n * G, C, G, scale.data());
        for (int64_t c = 0; c < C; ++c) {
            a[c] = scale[c] * gamma[c];
            b[c] = beta[c] - centre[c] * a[c];
        }
        for (int64_t p = 0; p < HW; ++p) {  // per channel: sum of dt and of dt * x
            for (int64_t c = 0; c < C; c += 2 * V) {
                const int64_t m = std::min<int64_t>(2 * V, C - c);
                Vec u, v, du, dv;
                load2(xs + p * C + c, u, v, m);
                load2(dys + p * C + c, du, dv, m);
                du = silu_grad(at::vec::fmadd(u, Vec::loadu(a.data() + c), Vec::loadu(b.data() + c)), du);
                dv = silu_grad(at::vec::fmadd(v, Vec::loadu(a.data() + c + V), Vec::loadu(b.data() + c + V)), dv);
                store2(block_dt.data() + c, Vec::loadu(block_dt.data() + c) + du,
                       Vec::loadu(block_dt.data() + c + V) + dv);
                store2(block_dtx.data() + c, at::vec::fmadd(du, u, Vec::loadu(block_dtx.data() + c)),
                       at::vec::fmadd(dv, v, Vec::loadu(block_dtx.data() + c + V)));
            }
            if (p % PIXELS == PIXELS - 1 || p == HW - 1) {
                flush(block_dt, sum_dt);
                flush(block_dtx, sum_dtx);
            }
        }
        // xhat = (x - mean) * rstd; dxhat = dt * gamma. Per group, over its M = HW * C/G values:
        // dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) = dt * a[c] + x * k1[g] + k0[g]
        const int64_t per = C / G;
        const double count = double(HW) * per;
        std::vector<float> k1(CP, 0.0f), k0(CP, 0.0f);
        for (int64_t g = 0; g < G; ++g) {
            const double m = mean[n * G + g], r = rstd[n * G + g];
            double s1 = 0, s2 = 0;  // sums of dxhat and of dxhat * xhat
            for (int64_t c = g * per; c < (g + 1) * per; ++c) {
                s1 += double(gamma[c]) * sum_dt[c];
                s2 += double(gamma[c]) * (sum_dtx[c] - m * sum_dt[c]) * r;
            }
            const double m1 = s1 / count, m2 = s2 / count;
            for (int64_t c = g * per; c < (g + 1) * per; ++c) {
                k1[c] = float(-r * r * m2);
                k0[c] = float(-r * m1 + m * r * r * m2);
            }
        }
        for (int64_t c = 0; c < C; ++c) {  // this sample's parts of the parameters' gradients
            dgamma[n * C + c] = float((sum_dtx[c] - centre[c] * sum_dt[c]) * scale[c]);
            dbeta[n * C + c] = float(sum_dt[c]);
        }
        for (int64_t p = 0; p < HW; ++p)
            for (int64_t c = 0; c < C; c += 2 * V) {
                const int64_t m = std::min<int64_t>(2 * V, C - c);
                Vec u, v, du, dv;
                load2(xs + p * C + c, u, v, m);
                load2(dys + p * C + c, du, dv, m);
                const Vec au = Vec::loadu(a.data() + c), av = Vec::loadu(a.data() + c + V);
                du = silu_grad(at::vec::fmadd(u, au, Vec::loadu(b.data() + c)), du);
                dv = silu_grad(at::vec::fmadd(v, av, Vec::loadu(b.data() + c + V)), dv);
                store2(dxs + p * C + c,
                       at::vec::fmadd(du, au, at::vec::fmadd(u, Vec::loadu(k1.data() + c), Vec::loadu(k0.data() + c))),
                       at::vec::fmadd(dv, av, at::vec::fmadd(v, Vec::loadu(k1.data() + c + V),
                                                           Vec::loadu(k0.data() + c + V))), m);
            }
    }
}
"""

_MAP_C_TYPE = {torch.float32: "float", torch.bfloat16: "uint16_t"}
# (map dtype) -> (forward, backward, channels per step of the kernels' loop), or None where they did not build
_BUILT: dict[torch.dtype, tuple | None] = {}


def _argtypes(dtype: torch.dtype, forward: bool) -> list[str]:
    t = _MAP_C_TYPE[dtype]
    if forward:
        return [f"const {t}*", "const float*", "const float*", f"{t}*", "float*", "float*"] + ["const int64_t"] * 4 \
            + ["const float"]
    return [f"const {t}*", f"const {t}*"] + ["const float*"] * 4 + [f"{t}*", "float*", "float*"] \
        + ["const int64_t"] * 4


def _step() -> int:
    """Values per step of the kernels' channel loop: two fp32 vectors of the ISA inductor builds for."""
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        isa = pick_vec_isa()  # (asks the compiler, which a machine may lack)
        return 2 * (isa.nelements() if isa else 0)
    except Exception:  # noqa: BLE001 - no vector ISA to build for: the two ops
        return 0


def kernels(dtype: torch.dtype) -> tuple | None:
    """(forward, backward, step) for maps of ``dtype`` (float32 or bfloat16), built and checked on the first call;
    None where they cannot be built or do not match the unfused ops."""
    if dtype not in _BUILT:
        built = None
        step = _step() if dtype in _MAP_C_TYPE else 0
        if step:
            forward = build_kernel(_FORWARD.replace("MAP_T", _MAP_C_TYPE[dtype]), _argtypes(dtype, True))
            backward = build_kernel(_BACKWARD.replace("MAP_T", _MAP_C_TYPE[dtype]), _argtypes(dtype, False))
            if forward is not None and backward is not None:
                built = (forward, backward, step)
        _BUILT[dtype] = built
        if built is not None and not passes(lambda: _matches_unfused(dtype, step)):
            _BUILT[dtype] = None
    return _BUILT[dtype]


class _NormSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float):
        forward, _, _ = kernels(x.dtype)
        n, c, h, w = x.shape
        y = torch.empty_like(x, memory_format=torch.channels_last)
        mean, rstd = x.new_empty(n, groups, dtype=torch.float32), x.new_empty(n, groups, dtype=torch.float32)
        forward(x, *_as_fp32(weight, bias), y, mean, rstd, n, h * w, c, groups, eps)
        # the parameters themselves, not fp32 copies: autograd's check of in-place changes sees them
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.groups, ctx.eps = groups, eps
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph (a double backward): the two ops' gradient, as a graph
            return differentiable_backward(lambda x, w, b: F.silu(F.group_norm(x, ctx.groups, w, b, ctx.eps)),
                                           (x, weight, bias), (dy,)) + (None, None)
        _, backward, _ = kernels(x.dtype)
        n, c, h, w = x.shape
        dy = dy.to(x.dtype).contiguous(memory_format=torch.channels_last)
        dx = torch.empty_like(x, memory_format=torch.channels_last)
        dgamma, dbeta = x.new_empty(n, c, dtype=torch.float32), x.new_empty(n, c, dtype=torch.float32)
        backward(dy, x, *_as_fp32(weight, bias), mean, rstd, dx, dgamma, dbeta, n, h * w, c, ctx.groups)
        return dx, dgamma.sum(0).to(weight.dtype), dbeta.sum(0).to(bias.dtype), None, None


def _as_fp32(*params: torch.Tensor) -> list[torch.Tensor]:
    return [p.detach().float().contiguous() for p in params]


def _usable(norm: nn.GroupNorm, x: torch.Tensor) -> bool:
    """Whether ``norm_silu`` takes the kernel for x: a CPU map of 4 dims with the norm's channel count,
    channels-last and not also NCHW (where both strides agree, e.g. 1x1 maps, the unfused ops do as well),
    float32 or bfloat16, at least as many samples as threads, outside a torch.compile trace (inductor fuses
    the unfused ops itself) and torch.func's transforms (the kernel's function defines none of their rules),
    and with the kernels built."""
    if torch.compiler.is_compiling() or functorch_wrapped(x):  # (in this order: dynamo cannot trace the second)
        return False
    if not (x.device.type == "cpu" and x.dim() == 4 and x.dtype in _MAP_C_TYPE and norm.affine
            and x.shape[1] == norm.num_channels and x.shape[0] >= torch.get_num_threads()):
        return False
    if not x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous():
        return False
    return kernels(x.dtype) is not None


def norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """``F.silu(norm(x))``, by the fused kernel where it applies (see ``_usable``), else by the two ops. Under
    CPU autocast the map is in its autocast dtype already (the convolution before made it), as the unfused
    GroupNorm would take it."""
    if not _usable(norm, x):
        return F.silu(norm(x))
    return _NormSiLU.apply(x, norm.weight, norm.bias, norm.num_groups, norm.eps)


def _matches_unfused(dtype: torch.dtype, step: int) -> bool:
    """The built kernels against ``F.silu(F.group_norm(...))`` in float64 on a small channels-last map with uneven
    statistics and a channel count that leaves a tail after the kernel's steps: forward and the three
    gradients, within the dtype's rounding."""
    # (first asked inside a training step's autocast, or under no_grad / inference_mode while encoding: every
    # tensor here is made outside them)
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        gen = torch.Generator().manual_seed(0)
        channels = 2 * step + 8  # (a tail of 8 channels after the full steps)
        x = (torch.randn(2, channels, 5, 3, generator=gen) * 3 + torch.linspace(-4, 4, channels)[:, None, None])
        weight, bias = torch.rand(channels, generator=gen) + 0.5, torch.randn(channels, generator=gen)
        dy = torch.randn(2, channels, 5, 3, generator=gen)
        x, dy = (t.to(dtype).contiguous(memory_format=torch.channels_last) for t in (x, dy))
        results = []
        for fused in (True, False):
            a = (x if fused else x.double()).detach().requires_grad_()
            w = (weight if fused else weight.double()).detach().requires_grad_()
            b = (bias if fused else bias.double()).detach().requires_grad_()
            y = _NormSiLU.apply(a, w, b, 4, 1e-6) if fused else F.silu(F.group_norm(a, 4, w, b, 1e-6))
            y.backward(dy if fused else dy.double())
            results.append([y.double(), a.grad.double(), w.grad.double(), b.grad.double()])
    return close_to_float64(*results, dtype)
