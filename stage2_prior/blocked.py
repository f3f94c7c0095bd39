"""Few-row products on x86 CPUs: a small AVX2 kernel over weights stored in blocks of 8 output channels.

At decoding's row counts (1-16) a product reads every weight once and does little arithmetic on it, so
it should run at the memory bandwidth, or, from ~8 rows on this class of CPU, at the FMA rate. The
library kernels fell short on the development CPU (2 cores, AVX2, no AVX-512), over the 60 products
of the GPT-B layers (``benchmarks/sampling.py`` times the whole sampler on them):

- float32: oneDNN's product on a packed weight took 14.5 ms at 1 row and 21.9 ms at 8 rows, inductor's
  GEMM template (frozen weights, compiled) 19.9 ms at 8 rows; this kernel 9.6-9.9 ms (35 GB/s) and
  10.9-11.7 ms (29-31 GB/s);
- bfloat16: F.linear (bf16 is emulated on this CPU) 10.5 ms at 1 row and 69 ms at 8; this kernel
  5.4-6 ms and 10 ms (136 GFLOP/s, near the fp32 matmul rate);
- int8 weights: ``aten._weight_int8pack_mm`` 6.5-7.5 ms at 1 row (10 GB/s, slower than its bf16
  products) and 22-23 ms at 8, inductor's int8 GEMM template 8 ms at 1 row; both convert the weights
  row by row. This kernel: 3.4-4.6 ms at 1 row (18-25 GB/s) and 9.6 ms at 8.

This kernel reads a weight stored as ``(N / 8, K, 8)``: block b holds output channels 8b..8b+7, k-major.
Each step widens the 8 weights of one input k to fp32 in one vector and multiplies them with input k of
up to 8 rows at once (broadcast, fp32 FMA), so the blocked weight streams through once, in order, and
8 rows keep the FMA units busy. From 4 rows on, each step also prefetches the weights 64 inputs ahead:
at 8 rows that took fp32 from 13.4 to 10.9-11.7 ms (at 1 row it slowed the stream, 9.9 to 12.3 ms).

Numerics: fp32 activations, weights widened exactly to fp32, fp32 accumulation, then the per-channel
scale (int8; ones for float weights), a bf16 value and so exact in fp32.

The kernel is C++ built once per weight dtype and machine by inductor's compiler toolchain (the one
``torch.compile`` uses on a CPU; cached on disk), for the CPU's vector ISA; where that fails (no
compiler, no AVX2/FMA, another torch) ``kernel(dtype)`` is None and callers take their library path. It
runs as the custom op ``vqgpt::blocked_linear`` inside compiled graphs.
"""

from __future__ import annotations

import torch

BLOCK = 8  # output channels per block: one AVX2 vector of fp32

# per weight dtype: the C type of a weight and how 8 of them widen to 8 fp32
_WIDEN = {
    torch.float32: ("float", "_mm256_loadu_ps(p)"),
    torch.bfloat16: ("uint16_t", "_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32("
                                 "_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16))"),
    torch.int8: ("int8_t", "_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))))"),
}

_SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#if !(defined(__AVX2__) && defined(__FMA__))
#error "the blocked kernel needs AVX2 and FMA"
#endif
#include <immintrin.h>

typedef WEIGHT_T weight_t;

// 8 weights -> 8 fp32
static inline __m256 widen(const weight_t* p) { return WIDEN; }

// MB rows of x times one block (K, 8) of weights, U steps of k in flight per row (FMA latency)
template <int MB, int U>
static inline void block_rows(const weight_t* wb, const float* x, int64_t K, __m256 scale, float* out, int64_t N) {
    __m256 acc[MB][U];
    for (int m = 0; m < MB; ++m)
        for (int u = 0; u < U; ++u) acc[m][u] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + U <= K; k += U) {
        // from 4 rows on, fetch the weights 64 inputs ahead (measured faster there, slower at 1 row)
        if (MB >= 4) _mm_prefetch(reinterpret_cast<const char*>(wb + (k + 64) * 8), _MM_HINT_T0);
        for (int u = 0; u < U; ++u) {
            const __m256 w = widen(wb + (k + u) * 8);
            for (int m = 0; m < MB; ++m)
                acc[m][u] = _mm256_fmadd_ps(w, _mm256_broadcast_ss(x + m * K + k + u), acc[m][u]);
        }
    }
    for (; k < K; ++k) {
        const __m256 w = widen(wb + k * 8);
        for (int m = 0; m < MB; ++m) acc[m][0] = _mm256_fmadd_ps(w, _mm256_broadcast_ss(x + m * K + k), acc[m][0]);
    }
    for (int m = 0; m < MB; ++m) {
        __m256 sum = acc[m][0];
        for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[m][u]);
        _mm256_storeu_ps(out + m * N, _mm256_mul_ps(sum, scale));
    }
}

// out (M, N) = x (M, K) @ weight^T * scales; weight blocked (N / 8, K, 8), scales (N,) as bf16 bits
extern "C" void kernel(const float* x, const weight_t* weight, const uint16_t* scales, float* out,
                       const int64_t M, const int64_t N, const int64_t K) {
    const int64_t blocks = N / 8;
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
        const weight_t* wb = weight + b * K * 8;
        const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + b * 8));
        const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
        for (int64_t m0 = 0; m0 < M; m0 += 8) {
            const float* xm = x + m0 * K;
            float* om = out + m0 * N + b * 8;
            switch (M - m0 < 8 ? M - m0 : 8) {
                case 1: block_rows<1, 4>(wb, xm, K, scale, om, N); break;
                case 2: block_rows<2, 2>(wb, xm, K, scale, om, N); break;
                case 3: block_rows<3, 2>(wb, xm, K, scale, om, N); break;
                case 4: block_rows<4, 2>(wb, xm, K, scale, om, N); break;
                case 5: block_rows<5, 1>(wb, xm, K, scale, om, N); break;
                case 6: block_rows<6, 1>(wb, xm, K, scale, om, N); break;
                case 7: block_rows<7, 1>(wb, xm, K, scale, om, N); break;
                default: block_rows<8, 1>(wb, xm, K, scale, om, N); break;
            }
        }
    }
}
"""

_BUILT: dict[torch.dtype, object] = {}  # weight dtype -> the kernel, or None where it did not build


def kernel(dtype: torch.dtype):
    """The compiled kernel ``kernel(x, weight, scales, out, M, N, K)`` for weights of ``dtype``, built on the
    first call (about a second, then cached on disk by inductor), or None where it cannot be built or
    gives a wrong product."""
    if dtype not in _BUILT:
        fn = None
        if dtype in _WIDEN:
            c_type, widen = _WIDEN[dtype]
            source = _SOURCE.replace("WEIGHT_T", c_type).replace("WIDEN", widen)
            argtypes = ["const float*", f"const {c_type}*", "const uint16_t*", "float*", "const int64_t",
                        "const int64_t", "const int64_t"]
            try:
                from torch._inductor.codecache import CppPythonBindingsCodeCache

                candidate = CppPythonBindingsCodeCache.load_pybinding(argtypes, source)
                # checked once for 1-11 rows (each register blocking, and a rest after 8) and a k tail:
                # a miscompiled kernel is dropped
                gen = torch.Generator().manual_seed(0)
                weight = torch.randint(-127, 128, (24, 21), generator=gen).to(dtype)
                scales = torch.rand(24, generator=gen).add(0.5).to(torch.bfloat16)
                x = torch.randn(11, 21, generator=gen)
                want = (x @ weight.float().t()) * scales.float()
                good = True
                for rows in range(1, 12):
                    out = torch.empty(rows, 24)
                    candidate(x[:rows], block(weight), scales, out, rows, 24, 21)
                    good = good and torch.allclose(out, want[:rows], rtol=1e-4, atol=1e-3)
                fn = candidate if good else None
            except Exception:  # noqa: BLE001 - any failure to build means: use the library path
                fn = None
        _BUILT[dtype] = fn
    return _BUILT[dtype]


def block(weight: torch.Tensor) -> torch.Tensor:
    """A weight (N, K) -> the kernel's layout (N / 8, K, 8); N must be a multiple of 8."""
    n, k = weight.shape
    return weight.reshape(n // BLOCK, BLOCK, k).transpose(1, 2).contiguous()


def product(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (rows, K) fp32 @ a weight blocked (N / 8, K, 8), times bf16 scales (N,) -> (rows, N) fp32, on a CPU
    where ``kernel(weight.dtype)`` is not None. Eager callers call this directly (the custom op's
    dispatch costs ~10 us a call, 0.6 ms over the 61 products of a GPT-B step); compiled graphs call
    ``blocked_linear``."""
    x = x.contiguous()
    out = torch.empty(x.shape[0], scales.shape[0], dtype=torch.float32)
    kernel(weight.dtype)(x, weight.contiguous(), scales.contiguous(), out, x.shape[0], scales.shape[0], x.shape[1])
    return out


@torch.library.custom_op("vqgpt::blocked_linear", mutates_args=())
def blocked_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``product`` as an op that a compiled graph calls as is."""
    return product(x, weight, scales)


@blocked_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], scales.shape[0], dtype=torch.float32)
