"""Few-row products on x86 CPUs: a small AVX2 kernel over weights stored in blocks of 8 output channels.

At decoding's row counts (1-16) a product reads every weight once and does little arithmetic on it, so
it should run at the memory bandwidth, or, from ~8 rows on this class of CPU, at the FMA rate. The
library kernels fell short on the first development CPU (2 cores, AVX2, no AVX-512), over the 60 products
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
8 rows keep the FMA units busy. From 4 rows on, each step also prefetches the weights 8 KB ahead into
L2. On the CPU above, an L1 prefetch 64 inputs ahead took fp32 at 8 rows from 13.4 to 10.9-11.7 ms
(at 1 row it slowed the stream, 9.9 to 12.3 ms). On a later development CPU (AMD EPYC, 2 cores,
AVX-512 with bf16 dot products), interleaved in one process: fp32 at 8 rows 14.3 ms with that L1
prefetch, 10.6 with the L2 one (8 KB ahead; 4 and 16 KB were within 5%), 20.6 with none (bf16 8.6 to
8.1 ms, int8 7.8 either way); at 1 row no prefetch stayed the fastest. On the Intel development CPU (with
AMX, below) the L2 prefetch paid at every row count, so there it runs from 1 row (checked at run time,
``prefetch_few_rows``): the GPT-B products at 1 row bf16 9.7 -> 7.6 ms, int8 3.3 -> 2.8, fp32 18.5 -> 15.8,
at 2 rows fp32 18.8 -> 12.5 (medians of 15-30 interleaved rounds); compiled GPT-B sampling at batch 1, bf16
75-77 -> 83-98 tokens/s and int8 102-143 -> 160-220 (3 alternating pairs of processes).

fp32 weights on a CPU with AVX-512 (checked at run time), from 5 rows and where N is a multiple of 16, take
512-bit FMAs over a pair of blocks (16 channels: weight k of both blocks in one register), 16 rows at a time:
the 256-bit loop needs one FMA per row for 8 weights, and from a few rows on that rate, not the reads, set its
pace (on the Intel CPU the GPT-B products read 17.5 GB/s at 8 rows against 27.5 at 2). Interleaved in one
process there: 8 rows 18.7-21.1 -> 17.2-19.0 ms, 16 rows (guidance at batch 8) 33.4-46.6 -> 20.1-26.7 ms;
eager GPT-B sampling with guidance at batch 8, 3 alternating pairs of processes: 135-195 -> 262-280 tokens/s
(without guidance the same within the host's swings). Each sum is one fp32 FMA chain over k, as in the
256-bit loop at 5-8 rows: bit for bit the same there.

Numerics: fp32 activations, weights widened exactly to fp32, fp32 accumulation, then the per-channel
scale (int8; ones for float weights), a bf16 value and so exact in fp32 (int8 weights on a CPU with
AVX512-VNNI: rows rounded to 16 bits, below). bf16 weights take bf16 rows
(a bf16 model's activations): on a CPU with AVX512-BF16 (checked at run time) each instruction
multiplies two inputs k, k + 1 of 8 channels (``vdpbf16ps``: exact products, fp32 sums), elsewhere
the rows are widened to fp32 once per call. Over the GPT-B products on the AMD CPU above that took
bf16 at 4 rows from 7.2-7.5 to 5.5-5.8 ms and at 8 rows from 10.5-11.6 to 6.7-8.8 ms (1 row: the
same, it reads at the bandwidth either way). From 5 rows the dot products run 512 bits wide (4 inputs
of 8 channels an instruction): at 8 rows 5.6-6.6 -> 5.3-6.3 ms (interleaved, 4 runs). In slower phases
of the shared host the 256-bit loop took 7.2-7.8 ms at 8 rows against 5.9 at 4: its dot-product rate,
not the reads, set the pace.

bf16 weights on a CPU with AMX-BF16 (checked at run time: CPUID, and Linux lending the process the tile
registers), from 2 rows and where N is a multiple of 16 and K of 32: tile products, 16 rows at a time.
On a later development CPU (Intel Xeon with AMX, 2 cores, about 20 GB/s read) the dot-product loops
were bound by their instruction rate from a few rows on: over a 512 x 768 weight in cache they read
16 GB/s at 4 rows, 12.5 at 8 and 6.7 at 16 (100 GFLOP/s), the tiles 33, 33 and 29; streaming 40
weights of 2304 x 768 from memory, 8 rows went from 9.6 to 15.5 GB/s and 16 rows from 4.8 to 14.2
(interleaved in one process). A pair of blocks (16 channels) goes through the tiles 32 inputs at a time.
Such weights are stored as the B tile takes them (``block``: the tile layout, where ``tiles_run()``), so
the tile loads read them in place; one row goes through a 512-bit ``vdpbf16ps`` loop over the same layout
(16 channels x 2 inputs a load, no permutation). Until they were, the weights kept the blocks above and
each call laid every 32 inputs out in a 1 KB buffer for its tile; laid out once instead, GPT-B's 61
products went at 1 row from 7.3 to 5.5 ms (the 1-row loop then permuted each load), 2 rows 6.2 -> 5.5,
8 rows 6.2 -> 5.3, 16 rows 6.7 -> 5.6 (medians of 12 interleaved rounds in one process). The layout is a
CPU's: a weight is laid out where it is used, not saved. Numerics: exact products of bf16
values summed in fp32, as the dot products do, in another order (four tiles, or four sums of the 1-row
loop, in turn over the chunks of 32 inputs, added at the end): the two agree to fp32 rounding.

int8 weights on a CPU with AVX512-VNNI (checked at run time) take integer dot products instead: the
kernel rounds each row once per call to 16-bit integers on the row's own scale (max |x| / 32767;
``rounded_rows`` gives the same values in torch), and one ``vpdpwssd`` multiplies 4 inputs of the
block's 8 channels (int16 x int16, the weights widened from int8, laid out as the 512-bit bf16 loop
lays them), summed exactly in int32 and moved to fp32 every 512 inputs. The rounding moves an input
by at most 1 / 65534 of its row's largest, against the int8 weights' own rounding of up to 1 / 254 of a
channel's largest. It replaces 3 instructions per 8 weights (widen, convert, FMA) by about 1 + rows
per 32. Over 49 products of GPT-B's shapes (12 layers of 768 -> 2304, 768 -> 768, 768 -> 3072,
3072 -> 768, and a 768 -> 16384 head) on the AMD CPU above, interleaved in one process, 3 runs: 8
rows 9.2-11.1 -> 4.5-6.6 ms, 16 rows 21.3-22.4 -> 9.6-13.3 ms, 1 row 3.7-3.8 -> 3.3-3.4 ms.
Elsewhere int8 takes the fp32 loop above with its rows as they are.

A second kernel, ``decode_attention``, is the attention of a decode step: one query per sequence and
head over the cache slots written so far, in fp32 arithmetic over an fp32 or bf16 cache (scores 8
slots at a time with one reduction for the 8, a vectorised softmax, the weighted sum of the values),
reading keys and values once each, with grouped cache heads read in place. Eager GPT-B sampling at
batch 8 went from 330 to 362 tokens/s with it (interleaved in one process). A compiled step calls it as
``decode_attention_update``, which also writes the step's keys and values into the caches: with the
write in the graph and the attention as a separate op, inductor handed the op fresh copies of the
written caches at every layer and step, and the kernel gained nothing (382 against 379 tokens/s); as
one op, compiled GPT-B batch 8 went from 30.4 to 25.0 ms a step (the AMD CPU above). At batch 8 the
kernel first read its cache at 8-11 GB/s, a third of the bandwidth: it was waiting on memory between
rows (each row's keys, then its values, are a fresh 16-33 KB stretch). It now fetches a phase ahead:
this row's values into L2 while its scores read the keys, the next row's keys while the values are
summed. Over the 12 GPT-B layers at 129 slots and batch 8 (interleaved in one process, the AMD CPU):
bf16 cache 2.8-2.9 -> 1.6-1.9 ms, fp32 3.1-3.9 -> 2.5-3.5 ms. Where the products' C++ op builds, the
compiled step calls ``vqgpt_native::decode_attention_update`` (the same kernel): the Python op cost
about 30 us a layer around a kernel of 15 us at batch 1.
The kernel itself writes the step's keys and values into their slot
(each by the thread of the first query head of its cache head; the other heads read them from the
step's own rows) and reads the query and writes the output in the cache's dtype: the op had run four
copies around the kernel (the two slot writes, the query to fp32, the output back to bf16), 47 us a
layer at GPT-B batch 8. Compiled GPT-B bf16 at batch 8, alternating processes: 10.3-11.0 -> 9.9-10.4 ms
a step (min of 3 runs, 4 pairs).

The kernel is C++ built once per weight dtype and machine by inductor's compiler toolchain (the one
``torch.compile`` uses on a CPU; cached on disk), for the CPU's vector ISA; where that fails (no
compiler, no AVX2/FMA, another torch) ``kernel(dtype)`` is None and callers take their library path. It
runs as the custom op ``vqgpt::blocked_linear`` inside compiled graphs, or, built once more as a torch C++
extension (``native_linear``, with the attention), as ``vqgpt_native::blocked_linear``, which calls it
without Python. Each kernel is checked against torch once per process before use (a build for AVX-512
once summed past the scores: refused, not used).
"""

from __future__ import annotations

import torch

from vqgpt.ground.native import build_kernel

BLOCK = 8  # output channels per block: one AVX2 vector of fp32

# per weight dtype: the C type of a weight and how 8 of them widen to 8 fp32
_WIDEN = {
    torch.float32: ("float", "_mm256_loadu_ps(p)"),
    torch.bfloat16: ("uint16_t", "_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32("
                                 "_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16))"),
    torch.int8: ("int8_t", "_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))))"),
}

# what the rows of x are for each weight dtype (bf16 weights take bf16 rows; see ``product``)
_ROW_DTYPE = {torch.float32: torch.float32, torch.bfloat16: torch.bfloat16, torch.int8: torch.float32}

# what the product kernel needs in both builds: intrinsics, memcpy, vector, and a CPU with AVX2 and FMA
_KERNEL_HEADER = r"""
#include <immintrin.h>
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>
#if !(defined(__AVX2__) && defined(__FMA__))
#error "the blocked kernel needs AVX2 and FMA"
#endif
"""

# the headers of the product kernel as inductor builds it (a Python binding), and its block loop (OpenMP)
_PYBINDING_HEADER = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
""" + _KERNEL_HEADER + r"""
template <typename F>
static inline void for_each_block(const int64_t n, const F& f) {
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < n; ++b) f(b);
}

// f(begin, end) over one contiguous share of [0, n) per thread
template <typename F>
static inline void for_each_range(const int64_t n, const F& f) {
    #pragma omp parallel
    {
#ifdef _OPENMP
        const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
#else
        const int64_t threads = 1, t = 0;
#endif
        const int64_t share = (n + threads - 1) / threads;
        const int64_t begin = std::min(n, t * share), end = std::min(n, begin + share);
        if (begin < end) f(begin, end);
    }
}
"""

_SOURCE = r"""
typedef WEIGHT_T weight_t;
typedef ROW_T row_t;
constexpr int64_t AHEAD = 8192 / (8 * sizeof(weight_t));  // the prefetch distance in steps of k: 8 KB

// 8 weights -> 8 fp32
static inline __m256 widen(const weight_t* p) { return WIDEN; }

// Whether the loops below fetch the weights ahead (PF) at 1-3 rows too: on the Intel development CPU that
// read the GPT-B products faster at every row count (1 row: 9.7 -> 7.6 ms bf16, 3.3 -> 2.8 int8, 18.5 ->
// 15.8 fp32; 2 rows fp32 18.8 -> 12.5), while on the AMD one 1 row was fastest without. From 4 rows: always.
static bool prefetch_few_rows() {
    static const bool yes = __builtin_cpu_is("intel");
    return yes;
}

// MB rows of x times one block (K, 8) of weights, U steps of k in flight per row (FMA latency)
template <int MB, int U, bool PF = (MB >= 4)>
static inline void block_rows(const weight_t* wb, const float* x, int64_t K, __m256 scale, float* out, int64_t N) {
    __m256 acc[MB][U];
    for (int m = 0; m < MB; ++m)
        for (int u = 0; u < U; ++u) acc[m][u] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + U <= K; k += U) {
        // fetch the weights 8 KB ahead into L2 (see prefetch_few_rows)
        if (PF) _mm_prefetch(reinterpret_cast<const char*>(wb + (k + AHEAD) * 8), _MM_HINT_T1);
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

DOT_PRODUCTS
// fp32 weights from 5 rows on a CPU with AVX-512 (checked at run time): a pair of blocks (16 channels) per
// 512-bit FMA, weight k of block 2p in the low half and of block 2p + 1 in the high half, times input k of a
// row broadcast. The 256-bit loop above needs one FMA per row for 8 weights, and at 8 rows that rate, not the
// reads, set its pace (GPT-B's products read 17.5 GB/s at 8 rows against 27.5 at 2). Each sum is one fp32
// FMA chain over k, as in block_rows<MB, 1>: bit for bit the same for 5-8 rows; a rest of 1-4 rows after 8
// is summed in one chain where the 256-bit loop splits it in 2 or 4 (the same to fp32 rounding).
static bool pairs_run() {
    static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
    return yes;
}

template <int MB>
__attribute__((target("avx512f,avx512dq")))
static void pair_rows(const float* w0, const float* x, const int64_t K, const __m512 scale, float* out,
                      const int64_t N) {
    const float* w1 = w0 + K * 8;
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
        _mm_prefetch(reinterpret_cast<const char*>(w0 + (k + AHEAD) * 8), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(w1 + (k + AHEAD) * 8), _MM_HINT_T1);
        const __m512 w = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(w0 + k * 8)),
                                            _mm256_loadu_ps(w1 + k * 8), 1);
        for (int m = 0; m < MB; ++m) acc[m] = _mm512_fmadd_ps(w, _mm512_set1_ps(x[m * K + k]), acc[m]);
    }
    for (int m = 0; m < MB; ++m) _mm512_storeu_ps(out + m * N, _mm512_mul_ps(acc[m], scale));
}

// pair_rows<rows> for 1 <= rows <= MB
template <int MB>
__attribute__((target("avx512f,avx512dq")))
static void pair_rows_upto(const int64_t rows, const float* w0, const float* x, const int64_t K, const __m512 scale,
                           float* out, const int64_t N) {
    if constexpr (MB > 1)
        if (rows < MB) return pair_rows_upto<MB - 1>(rows, w0, x, K, scale, out, N);
    pair_rows<MB>(w0, x, K, scale, out, N);
}

// 16 rows at a time (16 sums and the weights fit the 32 registers): the weights are read once per 16 rows
__attribute__((target("avx512f,avx512dq")))
static void pair_of_blocks(const int64_t p, const float* x, const float* weight, const uint16_t* scales, float* out,
                           const int64_t M, const int64_t N, const int64_t K) {
    const float* w0 = weight + p * 2 * K * 8;
    const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + p * 16))), 16));
    for (int64_t m0 = 0; m0 < M; m0 += 16)
        pair_rows_upto<16>(std::min<int64_t>(16, M - m0), w0, x + m0 * K, K, scale, out + m0 * N + p * 16, N);
}

static void pair_products(const float* x, const float* weight, const uint16_t* scales, float* out, const int64_t M,
                          const int64_t N, const int64_t K) {
    for_each_block(N / 16, [&](const int64_t p) { pair_of_blocks(p, x, weight, scales, out, M, N, K); });
}

// out (M, N) = x (M, K) @ weight^T * scales over blocks of 8 channels; block_rows for x's row type
// (int16 rows: each output row then times its row's step, ``steps``)
template <typename X>
static void products(const X* x, const weight_t* weight, const uint16_t* scales, float* out, const int64_t M,
                     const int64_t N, const int64_t K, const float* steps = nullptr) {
    if constexpr (std::is_same<weight_t, float>::value && std::is_same<X, float>::value) {
        if (M >= 5 && N % 16 == 0 && pairs_run()) return pair_products(x, weight, scales, out, M, N, K);
    }
    const bool ahead = prefetch_few_rows();
    for_each_block(N / 8, [&](const int64_t b) {
        const weight_t* wb = weight + b * K * 8;
        const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + b * 8));
        const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
        for (int64_t m0 = 0; m0 < M; m0 += 8) {
            const X* xm = x + m0 * K;
            float* om = out + m0 * N + b * 8;
            switch (M - m0 < 8 ? M - m0 : 8) {
                case 1: ahead ? block_rows<1, 4, true>(wb, xm, K, scale, om, N)
                              : block_rows<1, 4, false>(wb, xm, K, scale, om, N); break;
                case 2: ahead ? block_rows<2, 2, true>(wb, xm, K, scale, om, N)
                              : block_rows<2, 2, false>(wb, xm, K, scale, om, N); break;
                case 3: ahead ? block_rows<3, 2, true>(wb, xm, K, scale, om, N)
                              : block_rows<3, 2, false>(wb, xm, K, scale, om, N); break;
                case 4: block_rows<4, 2>(wb, xm, K, scale, om, N); break;
                case 5: block_rows<5, 1>(wb, xm, K, scale, om, N); break;
                case 6: block_rows<6, 1>(wb, xm, K, scale, om, N); break;
                case 7: block_rows<7, 1>(wb, xm, K, scale, om, N); break;
                default: block_rows<8, 1>(wb, xm, K, scale, om, N); break;
            }
            if (steps)
                for (int64_t m = m0; m < std::min(M, m0 + 8); ++m)
                    _mm256_storeu_ps(om + (m - m0) * N,
                                     _mm256_mul_ps(_mm256_loadu_ps(om + (m - m0) * N), _mm256_set1_ps(steps[m])));
        }
    });
}

// out (M, N) = rows (M, K) @ weight^T * scales; weight blocked (N / 8, K, 8), scales (N,) as bf16 bits
LINKAGE void kernel(const row_t* rows, const weight_t* weight, const uint16_t* scales, float* out,
                    const int64_t M, const int64_t N, const int64_t K) {
    PREPARE_ROWS
    products(x, weight, scales, out, M, N, K);
}
"""

_WIDE_LANES = r"""
// The lanes of the 512-bit dot-product loops (bf16 and int16): 16-bit weights k..k + 3 of a block's 8
// channels, permuted by this order so that lane 2c holds channel c's k, k + 1 and lane 2c + 1 its k + 2,
// k + 3; a row's four inputs then go to every lane as one 64-bit value.
__attribute__((target("avx512bw,avx512f")))
static inline __m512i four_inputs_order() {
    alignas(64) uint16_t words[32];
    for (int i = 0; i < 32; ++i) words[i] = uint16_t((i % 4) * 8 + i / 4);
    return _mm512_load_si512(words);
}

// lanes 2c and 2c + 1 -> channel c: evens to the low half, odds to the high half, then added
__attribute__((target("avx512f")))
static inline __m256 channel_sums(const __m512 lanes) {
    const __m512i halves = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    const __m512 split = _mm512_permutexvar_ps(halves, lanes);
    return _mm256_add_ps(_mm512_castps512_ps256(split),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(split), 1)));
}
"""

# Whether bf16 weights multiply in AMX tiles here: AMX-BF16 and AMX-TILE (CPUID), Linux lending the process the
# tile registers, and AVX512-BF16 for the one-row loop. Part of the bf16 kernel, and built alone as the probe
# behind ``tiles_run``, which decides the layout ``block`` gives: the same check in both.
_TILES_CHECK = r"""
#if __has_include(<amxbf16intrin.h>) && __has_include(<amxtileintrin.h>)
#define VQGPT_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

static bool amx_runs() {
    static const bool yes = [] {
        unsigned a = 0, b = 0, c = 0, d = 0;
        if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 22) & 1) || !((d >> 24) & 1))
            return false;  // no AMX-BF16 or no AMX-TILE
        // Linux lends the tile registers to a process that asks (ARCH_REQ_XCOMP_PERM, XTILEDATA)
        return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    }();
    return yes;
}

struct alignas(64) TileConfig {  // ldtilecfg's 64 bytes, palette 1
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};
#else
#define VQGPT_AMX 0
#endif

static bool tiles_run() {
#if VQGPT_AMX
    return amx_runs() && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vl")
           && __builtin_cpu_supports("avx512bw");
#else
    return false;
#endif
}
"""

# bf16 weights only: rows as bf16; on a CPU with AVX512-BF16 (checked at run time) pairs of inputs go through
# one dot-product instruction, elsewhere the rows are widened once and take the loop above.
_BF16_DOT_SOURCE = _WIDE_LANES + r"""
#define VQGPT_TILES TILES_LAYOUT  // 1 where ``tiles_run()``: bf16 weights of the tiles' shapes come in the tile layout
// From 5 rows: 4 inputs per 512-bit instruction. A 64-byte load holds weights k..k + 3 of the block's 8
// channels, in the lanes of four_inputs_order; each row's four bf16 inputs are broadcast as one 64-bit
// value. At the end the two lanes of each channel are added. Twice the products per instruction
// of the 256-bit loop below, which at 8 rows was bound by its dot-product rate, not by the reads.
template <int MB>
__attribute__((target("avx512bf16,avx512vl,avx512bw,avx512f")))
static void block_rows_wide(const weight_t* wb, const uint16_t* x, int64_t K, __m256 scale, float* out, int64_t N) {
    const __m512i order = four_inputs_order();
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {
        _mm_prefetch(reinterpret_cast<const char*>(wb + (k + AHEAD) * 8), _MM_HINT_T1);
        const __m512i w = _mm512_permutexvar_epi16(order, _mm512_loadu_si512(wb + k * 8));
        for (int m = 0; m < MB; ++m) {
            int64_t four;
            std::memcpy(&four, x + m * K + k, 8);
            acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)w, (__m512bh)_mm512_set1_epi64(four));
        }
    }
    __m256 sum[MB];
    for (int m = 0; m < MB; ++m) sum[m] = channel_sums(acc[m]);
    for (; k < K; ++k) {  // the inputs left after the groups of 4
        const __m256 w = widen(wb + k * 8);
        for (int m = 0; m < MB; ++m)
            sum[m] = _mm256_fmadd_ps(w, _mm256_castsi256_ps(_mm256_set1_epi32(int32_t(x[m * K + k]) << 16)), sum[m]);
    }
    for (int m = 0; m < MB; ++m) _mm256_storeu_ps(out + m * N, _mm256_mul_ps(sum[m], scale));
}

// block_rows for bf16 rows: inputs k and k + 1 in one instruction. One 32-byte load holds weights k and
// k + 1 of the block's 8 channels, vpermw interleaves them per channel, each row's bf16 pair is
// broadcast. Products of bf16 values are exact in fp32; the sums are fp32.
template <int MB, int U, bool PF = (MB >= 4)>
__attribute__((target("avx512bf16,avx512vl,avx512bw,avx512f")))
static void block_rows(const weight_t* wb, const uint16_t* x, int64_t K, __m256 scale, float* out, int64_t N) {
    if constexpr (MB >= 5) return block_rows_wide<MB>(wb, x, K, scale, out, N);
    const __m256i order = _mm256_setr_epi16(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
    __m256 acc[MB][U];
    for (int m = 0; m < MB; ++m)
        for (int u = 0; u < U; ++u) acc[m][u] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 2 * U <= K; k += 2 * U) {
        if (PF) _mm_prefetch(reinterpret_cast<const char*>(wb + (k + AHEAD) * 8), _MM_HINT_T1);
        for (int u = 0; u < U; ++u) {
            const __m256i w = _mm256_permutexvar_epi16(
                order, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + (k + 2 * u) * 8)));
            for (int m = 0; m < MB; ++m) {
                int32_t pair;
                std::memcpy(&pair, x + m * K + k + 2 * u, 4);
                acc[m][u] = _mm256_dpbf16_ps(acc[m][u], (__m256bh)w, (__m256bh)_mm256_set1_epi32(pair));
            }
        }
    }
    for (; k < K; ++k) {  // an odd input left over
        const __m256 w = widen(wb + k * 8);
        for (int m = 0; m < MB; ++m)
            acc[m][0] = _mm256_fmadd_ps(w, _mm256_castsi256_ps(_mm256_set1_epi32(int32_t(x[m * K + k]) << 16)),
                                        acc[m][0]);
    }
    for (int m = 0; m < MB; ++m) {
        __m256 sum = acc[m][0];
        for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[m][u]);
        _mm256_storeu_ps(out + m * N, _mm256_mul_ps(sum, scale));
    }
}

static bool dot_products_run() {
    static const bool yes = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vl")
                            && __builtin_cpu_supports("avx512bw");
    return yes;
}
""" + _TILES_CHECK + r"""
// The tile layout (``block`` where ``tiles_run()``, for N a multiple of 16 and K of 32): pair of blocks p
// (channels 16p..16p + 15) holds its K inputs in chunks of 32, each chunk 16 rows of 64 bytes, row r the
// inputs 2r, 2r + 1 of the 16 channels side by side: a B tile as tdpbf16ps takes it, loaded in place, and
// for one row what one 512-bit vdpbf16ps takes (16 channels x 2 inputs). The weights were laid out in the
// blocks of the other loops once, and each call permuted every 32 inputs into a 1 KB buffer for its tile
// (16 permutations, stores and a tile load from the buffer a KB); the module docstring has the timings.
#if VQGPT_TILES
#if !VQGPT_AMX
#error "the tile layout needs a CPU and compiler with AMX-BF16"
#endif
constexpr int64_t TILE_AHEAD = 4096;  // the prefetch distance in bf16 weights (8 KB), over a pair's chunks

// 2 to 16 rows at a time: one tdpbf16ps multiplies up to 16 rows by 32 inputs of 16 channels, while the
// dot-product loops above are bound by their instruction rate from a few rows on (at 8 rows 100 GFLOP/s on
// 2 cores of the AMX CPU, less than the weights' reads need). The A tile is the rows' own 32 inputs, read
// in place (stride K), and the products add into a C tile of rows x 16 fp32 sums. Four C tiles take turns
// over the chunks (one tdpbf16ps waits on the one before into the same tile) and are added at the end.
// (AVX-512 and AMX code stays out of lambdas: a lambda does not take the target of the function it is in,
// and the kernel's build for a CPU without AVX-512 failed on it.)
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl")))
static inline void fetch_chunk(const uint16_t* wp, const int64_t c) {
    for (int line = 0; line < 16; ++line)
        _mm_prefetch(reinterpret_cast<const char*>(wp + c * 512 + TILE_AHEAD + line * 32), _MM_HINT_T1);
}

// rows (M <= 16, K) times the pair of blocks at wp (16 channels, tile layout)
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl")))
static void pair_tiles(const uint16_t* wp, const uint16_t* x, const int64_t M, const int64_t K,
                       const __m512 scale, float* out, const int64_t N) {
    // tiles: 0-3 C (the sums), 4-5 A (rows), 6-7 B (weights), two of each of A and B in turn
    const int64_t chunks = K / 32, stride = K * 2;
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    int64_t c = 0;
    for (; c + 4 <= chunks; c += 4) {
        fetch_chunk(wp, c);
        _tile_loadd(6, wp + c * 512, 64); _tile_loadd(4, x + c * 32, stride); _tile_dpbf16ps(0, 4, 6);
        fetch_chunk(wp, c + 1);
        _tile_loadd(7, wp + (c + 1) * 512, 64); _tile_loadd(5, x + (c + 1) * 32, stride); _tile_dpbf16ps(1, 5, 7);
        fetch_chunk(wp, c + 2);
        _tile_loadd(6, wp + (c + 2) * 512, 64); _tile_loadd(4, x + (c + 2) * 32, stride); _tile_dpbf16ps(2, 4, 6);
        fetch_chunk(wp, c + 3);
        _tile_loadd(7, wp + (c + 3) * 512, 64); _tile_loadd(5, x + (c + 3) * 32, stride); _tile_dpbf16ps(3, 5, 7);
    }
    for (; c < chunks; ++c) {
        fetch_chunk(wp, c);
        _tile_loadd(6, wp + c * 512, 64); _tile_loadd(4, x + c * 32, stride); _tile_dpbf16ps(0, 4, 6);
    }
    alignas(64) float sums[4][16 * 16];
    _tile_stored(0, sums[0], 64); _tile_stored(1, sums[1], 64);
    _tile_stored(2, sums[2], 64); _tile_stored(3, sums[3], 64);
    for (int64_t m = 0; m < M; ++m) {
        const float* row = sums[0] + m * 16;
        const __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_load_ps(row), _mm512_load_ps(row + 256)),
                                       _mm512_add_ps(_mm512_load_ps(row + 512), _mm512_load_ps(row + 768)));
        _mm512_storeu_ps(out + m * N, _mm512_mul_ps(s, scale));
    }
}

// pair p's 16 scales (bf16 bits) as fp32
__attribute__((target("avx512f,avx512bw")))
static inline __m512 pair_scales(const uint16_t* scales, const int64_t p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + p * 16))), 16));
}

// out (M <= 16, N) = rows @ weight^T * scales, over the block pairs [begin, end) (one thread's share): it
// configures its tiles for them and lets them go after
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl")))
static void tile_range(const uint16_t* x, const uint16_t* weight, const uint16_t* scales, float* out,
                       const int64_t M, const int64_t N, const int64_t K, const int64_t begin, const int64_t end) {
    TileConfig config{};
    config.palette = 1;
    for (int t = 0; t < 6; ++t) { config.rows[t] = uint8_t(M); config.colsb[t] = 64; }  // C, A: M rows
    for (int t = 6; t < 8; ++t) { config.rows[t] = 16; config.colsb[t] = 64; }  // B: 16 pairs of inputs
    _tile_loadconfig(&config);
    for (int64_t p = begin; p < end; ++p)
        pair_tiles(weight + p * 16 * K, x, M, K, pair_scales(scales, p), out + p * 16, N);
    _tile_release();
}

// the same over all block pairs, a share per thread
static void tile_products(const uint16_t* x, const uint16_t* weight, const uint16_t* scales, float* out,
                          const int64_t M, const int64_t N, const int64_t K) {
    for_each_range(N / 16, [&](const int64_t begin, const int64_t end) {
        tile_range(x, weight, scales, out, M, N, K, begin, end);
    });
}

// one row times the pair of blocks at wp (tile layout): a 64-byte load is inputs k, k + 1 of the 16 channels,
// one vdpbf16ps with the row's pair broadcast; four sums in turn (the instruction's latency), added at the end
__attribute__((target("avx512bf16,avx512vl,avx512bw,avx512f")))
static void pair_row(const uint16_t* wp, const uint16_t* x, const int64_t K, const __m512 scale, float* out) {
    __m512 acc[4];
    for (int u = 0; u < 4; ++u) acc[u] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {  // (K is a multiple of 32)
        const uint16_t* w = wp + k * 16;
        _mm_prefetch(reinterpret_cast<const char*>(w + TILE_AHEAD), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(w + TILE_AHEAD + 32), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(w + TILE_AHEAD + 64), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(w + TILE_AHEAD + 96), _MM_HINT_T1);
        for (int u = 0; u < 4; ++u) {
            int32_t pair;
            std::memcpy(&pair, x + k + 2 * u, 4);
            acc[u] = _mm512_dpbf16_ps(acc[u], (__m512bh)_mm512_loadu_si512(w + u * 32),
                                      (__m512bh)_mm512_set1_epi32(pair));
        }
    }
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm512_storeu_ps(out, _mm512_mul_ps(sum, scale));
}

__attribute__((target("avx512bf16,avx512vl,avx512bw,avx512f")))
static void pair_of_blocks_row(const int64_t p, const uint16_t* x, const uint16_t* weight, const uint16_t* scales,
                               float* out, const int64_t K) {
    pair_row(weight + p * 16 * K, x, K, pair_scales(scales, p), out + p * 16);
}

static void row_products(const uint16_t* x, const uint16_t* weight, const uint16_t* scales, float* out,
                         const int64_t N, const int64_t K) {
    for_each_block(N / 16, [&](const int64_t p) { pair_of_blocks_row(p, x, weight, scales, out, K); });
}
#endif

"""

_BF16_PREPARE_ROWS = """#if VQGPT_TILES
    if (N % 16 == 0 && K % 32 == 0) {  // the tile layout (``block``): 16 rows at a time through the tiles
        if (M == 1) return row_products(rows, weight, scales, out, N, K);
        for (int64_t m0 = 0; m0 < M; m0 += 16)
            tile_products(rows + m0 * K, weight, scales, out + m0 * N, std::min<int64_t>(16, M - m0), N, K);
        return;
    }
#endif
    if (dot_products_run()) return products(rows, weight, scales, out, M, N, K);
    std::vector<float> widened(M * K);  // bf16 -> fp32, exact
    for (int64_t i = 0; i < M * K; ++i) {
        const uint32_t bits = uint32_t(rows[i]) << 16;
        std::memcpy(&widened[i], &bits, 4);
    }
    const float* x = widened.data();"""


# Whether int8 weights take the int16 dot products here (AVX512-VNNI, -BW, -VL). Part of the int8 kernel, and built
# alone as the probe behind ``int8_ordered``, which decides the layout ``block`` gives int8 weights: the same check.
_VNNI_CHECK = r"""
static bool int16_products_run() {
    static const bool yes = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw")
                            && __builtin_cpu_supports("avx512vl");
    return yes;
}
"""

_INT8_DOT_SOURCE = _WIDE_LANES + _VNNI_CHECK + r"""
#define VQGPT_ORDERED ORDERED_LAYOUT  // 1 where ``int8_ordered()``: int8 weights come in four_inputs_order
// int8 weights on a CPU with AVX512-VNNI (checked at run time): each row is rounded once per call to
// 16-bit integers on its own scale (x = step * q, |q| <= 32767, step = max |x| / 32767), and one
// vpdpwssd multiplies 4 inputs of the block's 8 channels (int16 x int16, pairs summed into int32 lanes),
// as the bf16 dot products do: a 32-byte load holds weights k..k + 3 of the 8 channels, widened to int16
// and put in the lanes of four_inputs_order. The int32 sums are exact; every 512 inputs (at most 128
// instructions of |2 * 128 * 32767| per lane, well inside int32) they move to fp32 lanes.
constexpr int64_t CHUNK = 512;

// weights k..k + 3 of the block's 8 channels (32 bytes at p) as int16 in the lanes of four_inputs_order. Where
// ``block`` laid them out in that order already (VQGPT_ORDERED, on the CPUs that take this loop) they are only
// widened: the permutation cost a second port-5 instruction per 32 bytes, which bound the one-row loop once the
// weights sat in the L3.
__attribute__((target("avx512bw,avx512f")))
static inline __m512i four_inputs(const __m512i order, const weight_t* p) {
    const __m512i wide = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#if VQGPT_ORDERED
    (void)order;
    return wide;
#else
    return _mm512_permutexvar_epi16(order, wide);
#endif
}

// block_rows for int16 rows; the caller multiplies each output row by its row's step
template <int MB, int U, bool PF = (MB >= 4)>
__attribute__((target("avx512vnni,avx512bw,avx512f,avx512vl")))
static void block_rows(const weight_t* wb, const int16_t* x, int64_t K, __m256 scale, float* out, int64_t N) {
    const __m512i order = four_inputs_order();
    __m512 total[MB];
    for (int m = 0; m < MB; ++m) total[m] = _mm512_setzero_ps();
    const int64_t K4 = K - K % 4;
    int64_t k = 0;
    while (k < K4) {
        const int64_t end = std::min(K4, k + CHUNK);
        __m512i acc[MB][U];
        for (int m = 0; m < MB; ++m)
            for (int u = 0; u < U; ++u) acc[m][u] = _mm512_setzero_si512();
        for (; k + 4 * U <= end; k += 4 * U) {
            if (PF) _mm_prefetch(reinterpret_cast<const char*>(wb + (k + AHEAD) * 8), _MM_HINT_T1);
            for (int u = 0; u < U; ++u) {
                const __m512i w = four_inputs(order, wb + (k + 4 * u) * 8);
                for (int m = 0; m < MB; ++m) {
                    int64_t four;
                    std::memcpy(&four, x + m * K + k + 4 * u, 8);
                    acc[m][u] = _mm512_dpwssd_epi32(acc[m][u], w, _mm512_set1_epi64(four));
                }
            }
        }
        for (; k < end; k += 4) {  // groups of 4 left after the unrolled ones
            const __m512i w = four_inputs(order, wb + k * 8);
            for (int m = 0; m < MB; ++m) {
                int64_t four;
                std::memcpy(&four, x + m * K + k, 8);
                acc[m][0] = _mm512_dpwssd_epi32(acc[m][0], w, _mm512_set1_epi64(four));
            }
        }
        for (int m = 0; m < MB; ++m)
            for (int u = 0; u < U; ++u) total[m] = _mm512_add_ps(total[m], _mm512_cvtepi32_ps(acc[m][u]));
    }
    for (int m = 0; m < MB; ++m) {
        __m256 sum = channel_sums(total[m]);
        for (int64_t j = K4; j < K; ++j)  // the inputs left after the groups of 4 (products exact in fp32)
            sum = _mm256_fmadd_ps(widen(wb + j * 8), _mm256_set1_ps(float(x[m * K + j])), sum);
        _mm256_storeu_ps(out + m * N, _mm256_mul_ps(sum, scale));
    }
}


// rows (M, K) -> q (M, K) int16 and steps (M,) with rows ~ steps * q; false where a row is not finite.
// Vectorised: with a scalar loop (nearbyint) a call over one block of 8 channels took 16.6 us at 8 rows
// of 768 inputs and 47.4 us at 8 of 3072, against 4.9 and 7.3 us so.
__attribute__((target("avx512f,avx512bw,avx512vl")))
static bool round_rows(const float* rows, int64_t M, int64_t K, int16_t* q, float* steps) {
    const __m512 largest = _mm512_set1_ps(3.0e38f);
    for (int64_t m = 0; m < M; ++m) {
        const float* r = rows + m * K;
        __m512 most = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) {
            const __mmask16 in = K - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (K - k)) - 1);
            const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(in, r + k));
            if (_mm512_cmp_ps_mask(a, largest, _CMP_LE_OQ) != 0xffff) return false;  // inf or NaN: the fp32 loop
            most = _mm512_max_ps(most, a);
        }
        const float top = _mm512_reduce_max_ps(most);
        steps[m] = top / 32767.0f;
        const __m512 inverse = _mm512_set1_ps(top > 0.0f ? 32767.0f / top : 0.0f);
        for (int64_t k = 0; k < K; k += 16) {
            const __mmask16 in = K - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (K - k)) - 1);
            // nearest even (the default rounding mode), saturated to int16 (|q| <= 32767 already)
            const __m512i whole = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(in, r + k), inverse));
            _mm256_mask_storeu_epi16(q + m * K + k, in, _mm512_cvtsepi32_epi16(whole));
        }
    }
    return true;
}

"""

_INT8_PREPARE_ROWS = """if (int16_products_run()) {
        std::vector<int16_t> q(M * K);
        std::vector<float> steps(M);
        if (round_rows(rows, M, K, q.data(), steps.data()))
            return products(q.data(), weight, scales, out, M, N, K, steps.data());
    }
#if VQGPT_ORDERED
    // rows with inf or NaN: the fp32 loop, over a copy of the weights in the plain block layout
    std::vector<weight_t> plain(N * K);
    const int64_t groups = K / 4;
    for (int64_t b = 0; b < N / 8; ++b)
        for (int64_t i = 0; i < K * 8; ++i) {
            const int64_t g = i / 32, j = i % 32;  // a full group of 4 inputs: byte j holds channel j / 4, input j % 4
            plain[b * K * 8 + (g < groups ? g * 32 + (j % 4) * 8 + j / 4 : i)] = weight[b * K * 8 + i];
        }
    weight = plain.data();
#endif
    const float* x = rows;"""


def _row_c_type(dtype: torch.dtype) -> str:
    """The C type of the rows the product kernel for weights of ``dtype`` takes (float, or bf16 bits)."""
    return _WIDEN[_ROW_DTYPE[dtype]][0]


def _product_argtypes(dtype: torch.dtype) -> list[str]:
    """The C argument types of the product kernel for weights of ``dtype``: rows, weight, scales, out, M, N, K."""
    return [f"const {_row_c_type(dtype)}*", f"const {_WIDEN[dtype][0]}*", "const uint16_t*", "float*"] \
        + ["const int64_t"] * 3


# per weight dtype: its dot-product loops (run where the CPU has them) and what the kernel does to its rows first
_DOT_SOURCE = {torch.bfloat16: _BF16_DOT_SOURCE, torch.int8: _INT8_DOT_SOURCE}
_PREPARE_ROWS = {torch.bfloat16: _BF16_PREPARE_ROWS, torch.int8: _INT8_PREPARE_ROWS}


def _product_body(dtype: torch.dtype, linkage: str) -> str:
    """The product kernel's C++ for weights of ``dtype``, without headers; ``kernel`` declared ``linkage``."""
    c_type, widen = _WIDEN[dtype]
    return (_SOURCE.replace("WEIGHT_T", c_type).replace("ROW_T", _row_c_type(dtype))
            .replace("WIDEN", widen).replace("DOT_PRODUCTS", _DOT_SOURCE.get(dtype, ""))
            .replace("PREPARE_ROWS", _PREPARE_ROWS.get(dtype, "const float* x = rows;"))
            .replace("TILES_LAYOUT", str(int(dtype == torch.bfloat16 and tiles_run())))
            .replace("ORDERED_LAYOUT", str(int(dtype == torch.int8 and int8_ordered()))).replace("LINKAGE", linkage))


def _product_source(dtype: torch.dtype) -> str:
    """The product kernel's C++ for weights of ``dtype``, as inductor builds it (a Python binding)."""
    return _PYBINDING_HEADER + _product_body(dtype, 'extern "C"')


_BUILT: dict[torch.dtype, object] = {}  # weight dtype -> the kernel, or None where it did not build


def rounded_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows (M, K) as the int8 kernel multiplies them where the CPU has AVX512-VNNI (see ``int8_rounds_rows``):
    each row rounded to 16-bit integers on its own scale, max |x| / 32767, in the kernel's fp32 arithmetic;
    returned as fp64, exactly those values."""
    x = x.float()
    most = x.abs().amax(1, keepdim=True)
    step = most / 32767
    inverse = torch.where(most > 0, 32767 / most.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    return (x * inverse).round().clamp(-32767, 32767).double() * step.double()


def _rows_multiplied(x: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """The rows a kernel for weights of ``dtype`` may multiply for x: bf16 weights x in bf16; int8 weights x
    rounded to 16 bits per row (AVX512-VNNI) or x itself (elsewhere); float32 weights x."""
    if dtype == torch.int8:
        return [x, rounded_rows(x)]
    return [x.to(_ROW_DTYPE[dtype])]


# (N, K) and row counts of the first-use checks: 1-11 rows (each register blocking, and a rest after 8) with a k tail;
# 1-17 rows of a shape bf16's tile path takes (N a multiple of 16, K of 32: 5 chunks of 32 inputs; 16 rows and 1 more)
_CHECKED_SHAPES = (((24, 21), range(1, 12)), ((48, 160), range(1, 18)))


def _product_correct(candidate, dtype: torch.dtype, tiles: bool = True) -> bool:
    """The product kernel over ``_CHECKED_SHAPES`` against float64. ``tiles``: as for ``block``, the layout the
    candidate takes."""
    gen = torch.Generator().manual_seed(0)
    good = True
    for (n, k), row_counts in _CHECKED_SHAPES:
        weight = torch.randint(-127, 128, (n, k), generator=gen).to(dtype)
        scales = torch.rand(n, generator=gen).add(0.5).to(torch.bfloat16)
        x = torch.randn(max(row_counts), k, generator=gen).to(_ROW_DTYPE[dtype])
        wants = [(rows.double() @ weight.double().t()) * scales.double() for rows in _rows_multiplied(x, dtype)]
        for rows in row_counts:
            out = torch.empty(rows, n)
            candidate(x[:rows], block(weight, tiles), scales, out, rows, n, k)
            # (int8 on VNNI: int32 sums past 2^24 are rounded when they become fp32, by up to 32 x the step)
            good = good and any(torch.allclose(out.double(), want[:rows], rtol=1e-4,
                                               atol=max(1e-3, 1e-5 * want.abs().max().item())) for want in wants)
    return good


def int8_rounds_rows() -> bool:
    """Whether the int8 kernel rounds its rows to 16 bits (``rounded_rows``) on this CPU, as it does where
    the CPU has AVX512-VNNI; False also where the kernel does not build. Asked of the kernel itself: a
    row (1, 1e-6) loses its 1e-6 in the rounding (steps of 1 / 32767)."""
    fn = kernel(torch.int8)
    if fn is None:
        return False
    weight, out = torch.zeros(8, 2, dtype=torch.int8), torch.empty(1, 8)
    weight[:, 1] = 1
    fn(torch.tensor([[1.0, 1e-6]]), block(weight), torch.ones(8, dtype=torch.bfloat16), out, 1, 8, 2)
    return bool(out[0, 0] == 0)


def kernel(dtype: torch.dtype):
    """The compiled kernel ``kernel(x, weight, scales, out, M, N, K)`` for weights of ``dtype``, built on the
    first call (about a second, then cached on disk by inductor), or None where it cannot be built or
    gives a wrong product."""
    if dtype not in _BUILT:
        fn = None
        if dtype in _WIDEN:
            fn = build_kernel(_product_source(dtype), _product_argtypes(dtype),
                        lambda candidate: _product_correct(candidate, dtype))
        _BUILT[dtype] = fn
    return _BUILT[dtype]


def block(weight: torch.Tensor, tiles: bool = True) -> torch.Tensor:
    """A weight (N, K) -> the kernel's layout, a (N / 8, K, 8) tensor; N must be a multiple of 8. Blocks of 8
    channels, k-major (block b: channels 8b..8b + 7), except for bf16 weights with N a multiple of 16 and K of
    32 where ``tiles_run()``: there the tile layout (pairs of blocks in chunks of 32 inputs, each input pair of
    the 16 channels side by side; see the kernel), and int8 weights where ``int8_ordered()``: there each full
    group of 4 inputs of a block holds its 8 channels' 4 inputs side by side (channel-major: the order of the
    int16 dot products). ``tiles=False``: the plain blocks whatever the CPU (for a build of the kernel without
    the tiles or that order)."""
    n, k = weight.shape
    if tiles and weight.dtype == torch.bfloat16 and n % 16 == 0 and k % 32 == 0 and tiles_run():
        # [pair p, chunk c, row r, channel j, input i] = weight[16p + j, 32c + 2r + i]
        laid = weight.reshape(n // 16, 16, k // 32, 16, 2).permute(0, 2, 3, 1, 4)
        return laid.contiguous().view(n // BLOCK, k, BLOCK)
    blocks = weight.reshape(n // BLOCK, BLOCK, k).transpose(1, 2).contiguous()
    if tiles and weight.dtype == torch.int8 and k >= 4 and int8_ordered():
        # each full group of 4 inputs: [channel j, input i] instead of [input i, channel j] (four_inputs_order)
        full = k - k % 4
        groups = blocks[:, :full].reshape(n // BLOCK, full // 4, 4, BLOCK).transpose(2, 3)
        blocks[:, :full] = groups.reshape(n // BLOCK, full, BLOCK)
    return blocks


_ORDERED: list[bool] = []  # int8_ordered()'s answer, once asked


def int8_ordered() -> bool:
    """Whether int8 weights take the int16 dot products on this CPU (AVX512-VNNI), and so whether ``block`` lays
    each of their groups of 4 inputs out in the order those products read (channel-major, see ``four_inputs``):
    asked once per process of a small build of the kernel's own check; False where that does not build."""
    if not _ORDERED:
        _ORDERED.append(_probe(_VNNI_CHECK, "int16_products_run"))
    return _ORDERED[0]


def _probe(check: str, function: str) -> bool:
    """The answer of the C++ ``function()`` that ``check`` defines, from a small build of it; False where it does not
    build. (A kernel's own check asked alone: the layout ``block`` gives and the kernel then agree.)"""
    probe = build_kernel(_PYBINDING_HEADER + check + 'extern "C" void kernel(float* out) '
                         f"{{ out[0] = {function}() ? 1.f : 0.f; }}", ["float*"])
    answer = torch.zeros(1)
    if probe is not None:
        probe(answer)
    return bool(answer[0] == 1)


_TILES: list[bool] = []  # tiles_run()'s answer, once asked


def tiles_run() -> bool:
    """Whether bf16 products go through AMX tiles on this CPU (AMX-BF16 lent to the process, and AVX512-BF16),
    and so whether ``block`` gives bf16 weights the tile layout: asked once per process of a small build of
    the kernel's own check; False where that does not build."""
    if not _TILES:
        _TILES.append(_probe(_TILES_CHECK, "tiles_run"))
    return _TILES[0]


def product(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (rows, K) @ a weight blocked (N / 8, K, 8), times bf16 scales (N,) -> (rows, N) fp32, on a CPU
    where ``kernel(weight.dtype)`` is not None. x is taken as fp32, except for bf16 weights: as bf16
    (rounded if it is not; a bf16 model's activations are bf16 already). Eager callers call this
    directly (the custom op's dispatch costs ~10 us a call, 0.6 ms over the 61 products of a GPT-B
    step); compiled graphs call ``blocked_linear``."""
    x = x.to(_ROW_DTYPE[weight.dtype]).contiguous()
    out = torch.empty(x.shape[0], scales.shape[0], dtype=torch.float32)
    kernel(weight.dtype)(x, weight.contiguous(), scales.contiguous(), out, x.shape[0], scales.shape[0], x.shape[1])
    return out


def bound_product(weight: torch.Tensor, scales: torch.Tensor, rounded: bool = False):
    """``product`` (``rounded``: ``rounded_product``, whose kernel must have built) of this blocked weight as a call
    ``run(x) -> out`` that does nothing but allocate the output and call the kernel: for a caller that hands it
    contiguous rows of the kernel's row dtype (bf16 for bf16 weights, else fp32), as ``stage2_prior.eager_step``
    does (``product``'s conversions and checks cost about as much as the kernel on a small weight)."""
    fn = _ROUNDED[0] if rounded else kernel(weight.dtype)
    weight, scales = weight.contiguous(), scales.contiguous()
    N, out_dtype = scales.shape[0], torch.bfloat16 if rounded else torch.float32

    def run(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[0], N, dtype=out_dtype)
        fn(x, weight, scales, out, x.shape[0], N, x.shape[1])
        return out

    return run


@torch.library.custom_op("vqgpt::blocked_linear", mutates_args=())
def blocked_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``product`` as an op that a compiled graph calls as is."""
    return product(x, weight, scales)


def _blocked_linear_fake(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The output's shape and dtype, for tracing; of ``blocked_linear`` and of the C++ op alike."""
    return x.new_empty(x.shape[0], scales.shape[0], dtype=torch.float32)


blocked_linear.register_fake(_blocked_linear_fake)


# -- the products as a C++ op, for compiled graphs -----------------------------------------------------------
# ``blocked_linear`` above runs Python around the kernel on every call (the custom op's dispatch,
# ``product``'s argument handling): about 20 us a call on the AMD CPU above, 1.2 ms over the 61 products
# of a GPT-B step, while the kernel itself reads a 768 x 768 int8 weight in about 20 us. Built as a
# torch C++ extension, ``vqgpt_native::blocked_linear`` is called straight from a compiled graph's
# wrapper (about 2 us). One extension holds the kernels of all three weight dtypes and the attention
# kernel's two (``decode_attention_update``); their loops run on torch's own threads (at::parallel_for).

_NATIVE_SOURCE = r"""
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
""" + _KERNEL_HEADER + r"""
template <typename F>
static inline void for_each_block(const int64_t n, const F& f) {
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) f(b);
    });
}

template <typename F>
static inline void for_each_range(const int64_t n, const F& f) {
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) { f(begin, end); });
}

namespace weights_float32 {
FLOAT32
}
namespace weights_bfloat16 {
BFLOAT16
}
namespace weights_int8 {
INT8
}
namespace cache_float32 {
ATTENTION_FLOAT32
}
namespace cache_bfloat16 {
ATTENTION_BFLOAT16
}

// x (M, K) in the rows' dtype, weight blocked (N / 8, K, 8), scales (N,) bf16 -> (M, N) fp32
at::Tensor blocked_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
    TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && scales.device().is_cpu(),
                "vqgpt_native::blocked_linear takes CPU tensors");
    TORCH_CHECK(x.dim() == 2 && weight.dim() == 3 && weight.size(2) == 8 && weight.size(1) == x.size(1)
                && scales.dim() == 1 && scales.size(0) == 8 * weight.size(0),
                "vqgpt_native::blocked_linear: x (M, K), weight (N / 8, K, 8), scales (N,); got ", x.sizes(), ", ",
                weight.sizes(), ", ", scales.sizes());
    TORCH_CHECK(scales.scalar_type() == at::kBFloat16, "vqgpt_native::blocked_linear: scales must be bfloat16");
    const at::Tensor rows = x.contiguous(), w = weight.contiguous(), sc = scales.contiguous();
    const int64_t M = rows.size(0), K = rows.size(1), N = sc.size(0);
    at::Tensor out = at::empty({M, N}, rows.options().dtype(at::kFloat));
    const auto* s = reinterpret_cast<const uint16_t*>(sc.data_ptr());
    float* o = out.data_ptr<float>();
    const auto want = [&](at::ScalarType row_type) {
        TORCH_CHECK(rows.scalar_type() == row_type, "vqgpt_native::blocked_linear: ", w.scalar_type(),
                    " weights take ", row_type, " rows, got ", rows.scalar_type());
    };
    switch (w.scalar_type()) {
        case at::kFloat:
            want(at::kFloat);
            weights_float32::kernel(rows.data_ptr<float>(), w.data_ptr<float>(), s, o, M, N, K);
            break;
        case at::kBFloat16:
            want(at::kBFloat16);
            weights_bfloat16::kernel(reinterpret_cast<const uint16_t*>(rows.data_ptr()),
                                     reinterpret_cast<const uint16_t*>(w.data_ptr()), s, o, M, N, K);
            break;
        case at::kChar:
            want(at::kFloat);
            weights_int8::kernel(rows.data_ptr<float>(), w.data_ptr<int8_t>(), s, o, M, N, K);
            break;
        default:
            TORCH_CHECK(false, "vqgpt_native::blocked_linear: no kernel for weights of ", w.scalar_type());
    }
    return out;
}

// q (B, H, 1, D); this step's keys and values k, v (B, KH, 1, D) go to slot start_pos of the caches
// (B, KH, S, D), then the attention of q over slots [0, start_pos] -> (B, H, 1, D) in q's dtype
at::Tensor decode_attention_update(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& start_pos) {
    const auto name = "vqgpt_native::decode_attention_update: ";
    TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(), name,
                "takes CPU tensors");
    TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes()
                && k_cache.size(0) == q.size(0) && k_cache.size(3) == q.size(3) && q.size(1) % k_cache.size(1) == 0,
                name, "q (B, H, 1, D) and caches (B, KH, S, D) with H a multiple of KH; got ", q.sizes(), ", ",
                k_cache.sizes(), ", ", v_cache.sizes());
    const int64_t B = q.size(0), H = q.size(1), KH = k_cache.size(1), D = q.size(3);
    TORCH_CHECK(D % 8 == 0 && D <= 256, name, "the head size must be a multiple of 8 up to 256, got ", D);
    TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type()
                && (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
                name, "q and the caches must be all float32 or all bfloat16, got ", q.scalar_type(), ", ",
                k_cache.scalar_type(), ", ", v_cache.scalar_type());
    TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1 && k_cache.stride(2) == D && v_cache.stride(2) == D,
                name, "each cache head must hold its slots as contiguous rows");
    TORCH_CHECK(start_pos.numel() == 1, name, "start_pos must hold one position");
    const int64_t pos = start_pos.item<int64_t>();
    TORCH_CHECK(pos >= 0 && pos < k_cache.size(2), name, "start_pos ", pos, " is outside the ", k_cache.size(2),
                " cache slots");
    TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.size(0) == B && k.size(1) == KH && k.size(2) == 1
                && k.size(3) == D, name, "the step's keys and values must be (B, KH, 1, D) = (", B, ", ", KH, ", 1, ",
                D, "), got ", k.sizes(), ", ", v.sizes());
    TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), name,
                "the step's keys and values must be ", q.scalar_type(), " as the caches, got ", k.scalar_type(),
                ", ", v.scalar_type());
    // rows of D consecutive elements; the kernel converts nothing and writes the slot itself
    const auto rows = [](const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); };
    const at::Tensor query = rows(q), k_new = rows(k), v_new = rows(v);
    at::Tensor out = at::empty({B, H, 1, D}, q.options());
    const float scale = float(std::pow(double(D), -0.5));  // as Python's D ** -0.5
    const auto run = [&](auto* kernel, auto* type) {
        using T = std::remove_pointer_t<decltype(type)>;
        const auto ptr = [](const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); };
        kernel(ptr(query), query.stride(0), query.stride(1), ptr(k_cache), ptr(v_cache), ptr(k_new), ptr(v_new),
               k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1), ptr(out), B, H, KH, pos, D,
               k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), scale, 1);
    };
    if (q.scalar_type() == at::kFloat)
        run(&cache_float32::kernel, static_cast<float*>(nullptr));
    else
        run(&cache_bfloat16::kernel, static_cast<uint16_t*>(nullptr));
    return out;
}

TORCH_LIBRARY(vqgpt_native, m) {
    m.def("blocked_linear(Tensor x, Tensor weight, Tensor scales) -> Tensor");
    m.impl("blocked_linear", c10::DispatchKey::CPU, &blocked_linear);
    m.def("decode_attention_update(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
          "Tensor start_pos) -> Tensor");
    m.impl("decode_attention_update", c10::DispatchKey::CPU, &decode_attention_update);
}
"""

_NATIVE: list = []  # [the op, or None where it did not build or check]


# 8 fp32 -> 8 bf16 at p, rounded to nearest even, NaN to 0xffff: as torch's vectorised .to() rounds (AVX2)
_STORE_BF16 = r"""
static inline void store8(uint16_t* p, const __m256 x) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0xffff), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
"""

# -- bf16 products rounded to bf16 inside the kernel, for eager callers ----------------------------------------
# An eager bf16 Linear handed the kernel's fp32 output to torch's .to(): at GPT-B batch 8 a conversion of 14-19
# us per product (61 a step), for a few microseconds of rounding. This build rounds in the kernel instead, into
# the bf16 output the caller allocates; the sums go to a per-thread fp32 buffer first.
_ROUNDED_WRAPPER = r"""
extern "C" void kernel(const uint16_t* rows, const uint16_t* weight, const uint16_t* scales, uint16_t* out,
                       const int64_t M, const int64_t N, const int64_t K) {
    thread_local std::vector<float> sums;
    sums.resize(M * N);
    fp32_kernel(rows, weight, scales, sums.data(), M, N, K);
    for (int64_t i = 0; i < M * N; i += 8) store8(out + i, _mm256_loadu_ps(sums.data() + i));  // (N % 8 == 0)
}
"""

_ROUNDED: list = []  # rounded_kernel()'s answer, once built


def rounded_kernel():
    """The bf16-weight product kernel ``kernel(x, weight, scales, out, M, N, K)`` with a bf16 ``out``: the fp32
    product rounded as torch's ``.to(torch.bfloat16)`` rounds it, bit for bit (checked at first use); None where
    it or the bf16 kernel does not build."""
    if not _ROUNDED:
        fn = None
        if kernel(torch.bfloat16) is not None:
            body = _product_body(torch.bfloat16, "static")
            assert body.count("static void kernel(") == 1
            source = _PYBINDING_HEADER + body.replace("static void kernel(", "static void fp32_kernel(") \
                + _STORE_BF16 + _ROUNDED_WRAPPER
            argtypes = _product_argtypes(torch.bfloat16)
            fn = build_kernel(source, argtypes[:3] + ["uint16_t*"] + argtypes[4:], _rounded_correct)
        _ROUNDED.append(fn)
    return _ROUNDED[0]


def _rounded_correct(candidate) -> bool:
    """A rounded kernel against the bf16 kernel's fp32 product rounded by torch, bit for bit, over the row counts
    and shapes ``_product_correct`` takes (the blocks, and the tile layout where the tiles run); a NaN stays NaN."""
    gen = torch.Generator().manual_seed(1)
    for (n, k), row_counts in _CHECKED_SHAPES:
        weight = torch.randn(n, k, generator=gen).bfloat16()
        laid = block(weight)
        scales = torch.rand(n, generator=gen).add(0.5).to(torch.bfloat16)
        x = torch.randn(max(row_counts), k, generator=gen).bfloat16()
        x[-1, 3] = float("nan")
        for rows in row_counts:
            want = torch.empty(rows, n)
            kernel(torch.bfloat16)(x[:rows], laid, scales, want, rows, n, k)
            want = want.bfloat16()
            got = torch.empty(rows, n, dtype=torch.bfloat16)
            candidate(x[:rows], laid, scales, got, rows, n, k)
            nan = want.isnan()
            if not (torch.equal(nan, got.isnan()) and torch.equal(got[~nan], want[~nan])):
                return False
    return True


def rounded_product(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``product`` for bf16 rows and weights with the output in bf16, rounded in the kernel (``rounded_kernel``,
    which must have built): the values of ``product(x, weight, scales).to(torch.bfloat16)``."""
    x = x.contiguous()
    out = torch.empty(x.shape[0], scales.shape[0], dtype=torch.bfloat16)
    _ROUNDED[0](x, weight, scales, out, x.shape[0], scales.shape[0], x.shape[1])
    return out


def native_linear():
    """``torch.ops.vqgpt_native.blocked_linear.default``: ``product`` as a C++ op (x in the rows' dtype of the
    weight, see ``product``), built on the first call with torch's C++ extension builder (about 25 s on
    2 cores, then cached on disk, in ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``) with
    ``vqgpt_native::decode_attention_update`` beside it, and checked against torch for each weight and
    cache dtype; None where it cannot be built (no compiler or ninja, no AVX2) or gives a wrong result,
    and where the kernels of ``kernel`` or ``attention_kernel`` are missing."""
    if not _NATIVE:
        _NATIVE.append(_load_native())
    return _NATIVE[0]


def _load_native():
    dtypes = (torch.float32, torch.bfloat16, torch.int8)
    if any(kernel(dtype) is None for dtype in dtypes) or any(attention_kernel(dtype) is None for dtype in _KV_LOAD):
        return None  # the kernels themselves do not build or check here
    try:
        import os
        import shutil

        from torch._inductor.cpu_vec_isa import pick_vec_isa
        from torch.utils.cpp_extension import load_inline

        if shutil.which("ninja") is None:  # torch's builder runs ninja from PATH; the pip package's
            import ninja  # noqa: PLC0415 - a dependency, looked for only here

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        source = _NATIVE_SOURCE
        for dtype in _KV_LOAD:  # first: the names of the product kernels' placeholders are part of these
            source = source.replace("ATTENTION_" + _dtype_name(dtype), _attention_body(dtype, "static"))
        for dtype in dtypes:
            source = source.replace(_dtype_name(dtype), _product_body(dtype, "static"))
        # the flags inductor builds the kernels above with: this CPU's instructions, its vector width for
        # ATen's vector types (the softmax), torch's OpenMP threads
        macros = [f"-D{macro}" for macro in pick_vec_isa().build_macro()]
        load_inline("vqgpt_blocked_native", cpp_sources=[source], is_python_module=False,
                    extra_cflags=["-O3", "-march=native", "-fopenmp", *macros], extra_ldflags=["-fopenmp"])
        op = torch.ops.vqgpt_native.blocked_linear.default
        torch.library.register_fake("vqgpt_native::blocked_linear")(_blocked_linear_fake)
        torch.library.register_fake("vqgpt_native::decode_attention_update")(_attention_update_fake)
    except Exception:  # noqa: BLE001 - any failure to build means: the Python op
        return None
    attention = torch.ops.vqgpt_native.decode_attention_update.default
    good = all(_product_correct(_native_as_kernel(op), dtype) for dtype in dtypes) and all(
        _attention_correct(_native_attention(attention), dtype) for dtype in _KV_LOAD)
    return op if good else None


def _dtype_name(dtype: torch.dtype) -> str:
    """FLOAT32, BFLOAT16, INT8: a dtype's placeholder in ``_NATIVE_SOURCE``."""
    return str(dtype).removeprefix("torch.").upper()


def _native_as_kernel(op):
    """The C++ op called the way ``_product_correct`` calls a kernel."""
    def call(x, weight, scales, out, rows, n, k):
        out.copy_(op(x[:rows], weight, scales))
    return call


def _native_attention(op):
    """The C++ attention op called the way ``_attention_correct`` calls an attention: slot length - 1 of the
    caches is written (with the value it holds), then attended over with the slots before it."""
    def attend(q, k, v, length):
        slot = slice(length - 1, length)
        return op(q, k[:, :, slot].clone(), v[:, :, slot].clone(), k, v, torch.tensor([length - 1]))
    return attend


def compiled_product(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``product`` inside a compiled graph: the C++ op where it was built (by an eager call of
    ``native_linear`` before tracing), else the Python op ``blocked_linear``."""
    op = _NATIVE[0] if _NATIVE else None
    if op is None:
        return blocked_linear(x, weight, scales)
    return op(x.to(_ROW_DTYPE[weight.dtype]).contiguous(), weight, scales)


# -- attention of one query per sequence over a KV cache (a decode step), fp32 or bf16 cache ---------------

_ATTENTION_BODY = r"""
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

// the sums of 8 vectors in one vector: lane i = the sum of a[i]'s lanes
static inline __m256 sums8(const __m256* a) {
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

typedef KV_T kv_t;

// 8 cache elements -> 8 fp32
static inline __m256 load8(const kv_t* p) { return LOAD_KV; }

// 8 fp32 -> 8 floats at p, or 8 bf16 rounded to nearest even (store8 of _STORE_BF16)
static inline void store8(float* p, const __m256 x) { _mm256_storeu_ps(p, x); }
""" + _STORE_BF16 + r"""

// fetch the cache lines of n bytes from p into L1, or L2
template <bool L1>
static inline void fetch(const kv_t* p, const int64_t n) {
    for (int64_t c = 0; c < n; c += 64)
        _mm_prefetch(reinterpret_cast<const char*>(p) + c, L1 ? _MM_HINT_T0 : _MM_HINT_T1);
}

// One query row qr (D = 8 ND elements) over slots [0, P) of its cache head and one more, the step's own
// key kn and value vn: o = softmax(q k^T * scale) v, with the row's scores in ``scores`` (P + 9 floats).
// Keys and values are read once each, and fetched a phase ahead: while the scores read the keys (16
// slots ahead into L1), this row's values go to L2; while the values are summed, the next row's keys
// (``next_k``) go to L1.
template <int ND>
static void attend(const kv_t* qr, const kv_t* kr, const kv_t* kn, const kv_t* vr, const kv_t* vn,
                   const kv_t* next_k, kv_t* o, const int64_t P, const float scale, float* scores) {
    constexpr int64_t D = 8 * ND, ROW = D * int64_t(sizeof(kv_t));
    const int64_t L = P + 1;
    __m256 qv[ND];
    for (int j = 0; j < ND; ++j) qv[j] = load8(qr + 8 * j);
    // scores, 8 slots at a time: 8 independent FMA chains, one reduction for the 8
    int64_t l = 0;
    for (; l + 8 <= P; l += 8) {
        const kv_t* r = kr + l * D;
        fetch<true>(r + 16 * D, 8 * ROW);
        fetch<false>(vr + l * D, 8 * ROW);
        __m256 a[8];
        for (int s = 0; s < 8; ++s) a[s] = _mm256_setzero_ps();
        for (int j = 0; j < ND; ++j)
            for (int s = 0; s < 8; ++s) a[s] = _mm256_fmadd_ps(qv[j], load8(r + s * D + 8 * j), a[s]);
        _mm256_storeu_ps(scores + l, _mm256_mul_ps(sums8(a), _mm256_set1_ps(scale)));
    }
    for (; l < L; ++l) {
        const kv_t* r = l < P ? kr + l * D : kn;
        __m256 a = _mm256_setzero_ps();
        for (int j = 0; j < ND; ++j) a = _mm256_fmadd_ps(qv[j], load8(r + 8 * j), a);
        scores[l] = hsum(a) * scale;
    }
    // softmax: exp(s - max), vectorised at the build's vector width (8 floats on AVX2, 16 on AVX-512)
    float top = scores[0];
    for (int64_t i = 1; i < L; ++i) top = std::max(top, scores[i]);
    using Vec = at::vec::Vectorized<float>;
    const auto shift = Vec(top);
    auto total = Vec(0.f);
    int64_t i = 0;
    for (; i + Vec::size() <= L; i += Vec::size()) {
        auto e = (Vec::loadu(scores + i) - shift).exp();
        e.store(scores + i);
        total = total + e;
    }
    float sum = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, total);
    for (; i < L; ++i) {
        scores[i] = std::exp(scores[i] - top);
        sum += scores[i];
    }
    // the weighted sum of the values
    __m256 acc[ND];
    for (int j = 0; j < ND; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t s = 0; s < L; ++s) {
        fetch<true>(next_k + s * D, ROW);
        const __m256 p = _mm256_set1_ps(scores[s]);
        const kv_t* r = s < P ? vr + s * D : vn;
        for (int j = 0; j < ND; ++j) acc[j] = _mm256_fmadd_ps(p, load8(r + 8 * j), acc[j]);
    }
    const __m256 inv = _mm256_set1_ps(1.f / sum);
    for (int j = 0; j < ND; ++j) store8(o + 8 * j, _mm256_mul_ps(acc[j], inv));
}

// out (B, H, D) contiguous = softmax(q k^T * scale) v for each batch row and head, over cache slots
// [0, P) of k and v and one more slot, this step's key and value: k_new, v_new. All tensors are in the
// cache's dtype (fp32 or bf16, widened on load; the arithmetic is fp32), rows of D elements; strides
// (batch, head) in elements; cache heads hold their slots as consecutive rows; query head h reads cache
// head h / (H / KH). D is a multiple of 8, at most 256. With ``write``, k_new and v_new are also
// stored to slot P of the caches, each by the thread of the first query head of its cache head (the
// others read them from k_new and v_new, not from the slot).
LINKAGE void kernel(const kv_t* q, const int64_t q_sb, const int64_t q_sh, kv_t* k, kv_t* v, const kv_t* k_new,
                    const kv_t* v_new, const int64_t kn_sb, const int64_t kn_sh, const int64_t vn_sb,
                    const int64_t vn_sh, kv_t* out, const int64_t B, const int64_t H, const int64_t KH,
                    const int64_t P, const int64_t D, const int64_t k_sb, const int64_t k_sh, const int64_t v_sb,
                    const int64_t v_sh, const float scale, const int64_t write) {
    const int64_t group = H / KH;
    const auto keys = [&](int64_t bh) { return k + (bh / H) * k_sb + ((bh % H) / group) * k_sh; };
    for_each_range(B * H, [&](const int64_t begin, const int64_t end) {
        std::vector<float> scores(P + 9);
        for (int64_t bh = begin; bh < end; ++bh) {
            const int64_t b = bh / H, h = bh % H, kh = h / group;
            const kv_t* qr = q + b * q_sb + h * q_sh;
            kv_t *kr = keys(bh), *vr = v + b * v_sb + kh * v_sh;
            const kv_t *kn = k_new + b * kn_sb + kh * kn_sh, *vn = v_new + b * vn_sb + kh * vn_sh;
            const kv_t* next_k = keys(std::min(bh + 1, B * H - 1));
            kv_t* o = out + bh * D;
            switch (D / 8) {
CASES
            }
            if (write && h % group == 0) {
                std::copy(kn, kn + D, kr + P * D);
                std::copy(vn, vn + D, vr + P * D);
            }
        }
    });
}
"""
_ATTENTION_BODY = _ATTENTION_BODY.replace("CASES", "\n".join(
    f"                case {n}: attend<{n}>(qr, kr, kn, vr, vn, next_k, o, P, scale, scores.data()); break;"
    for n in range(1, 33)))


def _attention_body(dtype: torch.dtype, linkage: str) -> str:
    """The attention kernel's C++ for a cache of ``dtype``, without headers; ``kernel`` declared ``linkage``."""
    c_type, load = _KV_LOAD[dtype]
    return _ATTENTION_BODY.replace("KV_T", c_type).replace("LOAD_KV", load).replace("LINKAGE", linkage)


# per cache dtype: the C type of a cache element and how 8 of them load as 8 fp32 (the product's widening)
_KV_LOAD = {torch.float32: _WIDEN[torch.float32], torch.bfloat16: _WIDEN[torch.bfloat16]}
_ATTENTION: dict[torch.dtype, object] = {}  # cache dtype -> the attention kernel, or None


def attention_kernel(dtype: torch.dtype = torch.float32):
    """The compiled one-query attention kernel (see ``decode_attention``) over a cache of ``dtype`` (float32,
    bfloat16), built on the first call and checked once against SDPA, or None where it cannot be built
    or disagrees."""
    if dtype not in _ATTENTION:
        fn = None
        if dtype in _KV_LOAD:
            c_type = _KV_LOAD[dtype][0]
            source = _PYBINDING_HEADER + _attention_body(dtype, 'extern "C"')
            argtypes = ([f"const {c_type}*"] + ["const int64_t"] * 2 + [f"{c_type}*"] * 2 + [f"const {c_type}*"] * 2
                        + ["const int64_t"] * 4 + [f"{c_type}*"] + ["const int64_t"] * 9 + ["const float", "const int64_t"])
            fn = build_kernel(source, argtypes, lambda candidate: _attention_correct(
                lambda q, k, v, length: _run_attention(candidate, q, k, v, length), dtype))
        _ATTENTION[dtype] = fn
    return _ATTENTION[dtype]


def _attention_correct(attend, dtype: torch.dtype) -> bool:
    """An attention kernel, called as ``attend(q, k, v, length)``, against SDPA in fp32 on the same (rounded)
    values: grouped cache heads read through strided views, 37 slots (tails after the 8-slot loop and
    the softmax's vector loop, 8 or 16 wide)."""
    gen = torch.Generator().manual_seed(0)
    good = True
    for dim in (16, 64):  # two of the kernel's head sizes
        q, k, v = (torch.randn(2, 4, length, dim, generator=gen).to(dtype) for length in (1, 37, 37))
        k, v = k[:, ::2], v[:, ::2]
        want = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float().repeat_interleave(2, 1), v.float().repeat_interleave(2, 1))
        got = attend(q, k, v, 37).float()
        good = good and (torch.allclose(got, want, rtol=1e-4, atol=1e-5) if dtype == torch.float32 else
                         torch.allclose(got, want, rtol=1e-2, atol=1e-2))  # one bf16 rounding of the output
    return good


def _run_attention(fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int,
                   new: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Attention over cache slots [0, length) with the attention kernel ``fn``; ``new``: this step's keys and
    values (B, KH, 1, D), written to slot length - 1 by the kernel and attended there (else that slot is read)."""
    batch, heads, _, dim = q.shape
    q = q if q.stride(3) == 1 else q.contiguous()
    k_new, v_new = (k[:, :, length - 1], v[:, :, length - 1]) if new is None else (
        t[:, :, 0] if t.stride(3) == 1 else t[:, :, 0].contiguous() for t in new)
    out = q.new_empty(batch, heads, 1, dim)
    fn(q, q.stride(0), q.stride(1), k, v, k_new, v_new, k_new.stride(0), k_new.stride(1), v_new.stride(0),
       v_new.stride(1), out, batch, heads, k.shape[1], length - 1, dim, k.stride(0), k.stride(1), v.stride(0),
       v.stride(1), dim ** -0.5, int(new is not None))
    return out


def bound_attention(dtype: torch.dtype, batch: int, heads: int, kv_heads: int, dim: int, cache_strides: tuple):
    """``attend_and_write`` for an eager decode step's fixed shapes, as a call ``run(q, k, v, k_cache, v_cache, pos)``
    with everything but the position worked out once: q (B, 1, H, D), k and v (B, 1, KH, D) contiguous (as the
    RoPE kernel writes them), caches of ``dtype`` whose strides are ``cache_strides`` (B, KH, slots, D: the last
    two D and 1, see ``attention_usable``). Returns (B, H, 1, D)."""
    fn, scale = attention_kernel(dtype), dim ** -0.5
    ks0, ks1, vs0, vs1 = cache_strides

    def run(q, k, v, k_cache, v_cache, pos: int) -> torch.Tensor:
        out = q.new_empty(batch, heads, 1, dim)
        fn(q, heads * dim, dim, k_cache, v_cache, k, v, kv_heads * dim, dim, kv_heads * dim, dim, out, batch, heads,
           kv_heads, pos, dim, ks0, ks1, vs0, vs1, scale, 1)
        return out

    return run


def attention_usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``decode_attention`` takes these: one query, CPU tensors all float32 or all bfloat16, head size
    a multiple of 8 up to 256, cache slots of contiguous rows, no gradient wanted (the kernel has none),
    and the kernel builds."""
    return (q.shape[2] == 1 and q.device.type == "cpu" and q.dtype == k.dtype == v.dtype
            and q.dtype in _KV_LOAD and not (torch.is_grad_enabled() and q.requires_grad)
            and q.shape[3] % 8 == 0 and q.shape[3] <= 256 and k.stride(3) == v.stride(3) == 1
            and k.stride(2) == v.stride(2) == q.shape[3] and q.shape[1] % k.shape[1] == 0
            and (_ATTENTION.get(q.dtype) is not None if torch.compiler.is_compiling()
                 else attention_kernel(q.dtype) is not None))  # a graph takes it only once an eager call built it


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int) -> torch.Tensor:
    """Attention of one query per sequence and head, q (B, H, 1, D), over cache slots [0, ``length``) of k and
    v (B, KH, >= length, D) -> (B, H, 1, D): SDPA's result for a decode step, read at the memory
    bandwidth (see ``attention_usable`` for what it takes)."""
    return _run_attention(attention_kernel(k.dtype), q, k, v, length)


@torch.library.custom_op("vqgpt::decode_attention_update", mutates_args=("k_cache", "v_cache"))
def decode_attention_update(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, start_pos: torch.Tensor) -> torch.Tensor:
    """A compiled decode step's attention as one op: this step's keys and values k, v (B, KH, 1, D) written
    to slot ``start_pos`` of the caches, then ``decode_attention`` over slots [0, start_pos].

    One op, because a compiled graph that wrote the caches itself (index_copy_) before an attention op
    handed that op fresh copies of the written caches, every layer and step: at GPT-B width and batch
    8 the copies took more time than the attention (the compiled step gained nothing from the kernel).
    Declared as mutating the caches, they go in as they are."""
    return attend_and_write(q, k, v, k_cache, v_cache, int(start_pos.item()))


def attend_and_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     start_pos: int) -> torch.Tensor:
    """An eager decode step's attention: this step's keys and values k, v (B, KH, 1, D) written to slot
    ``start_pos`` (an int) of the caches by the attention kernel, then its attention over slots [0, start_pos]
    (``decode_attention_update`` is this as an op). Writing the slot with the attention (instead of two slice
    writes of the caches and two views of their written slots around ``decode_attention``) saves four torch calls
    a layer."""
    return _run_attention(attention_kernel(k_cache.dtype), q, k_cache, v_cache, start_pos + 1, new=(k, v))


def compiled_attention_update(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                              v_cache: torch.Tensor, start_pos: torch.Tensor) -> torch.Tensor:
    """``decode_attention_update`` inside a compiled graph: the C++ op where it was built (by an eager call
    of ``native_linear`` before tracing; no Python in the step), else the Python op."""
    if _NATIVE and _NATIVE[0] is not None:
        return torch.ops.vqgpt_native.decode_attention_update(q, k, v, k_cache, v_cache, start_pos)
    return decode_attention_update(q, k, v, k_cache, v_cache, start_pos)


def _attention_update_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, start_pos: torch.Tensor) -> torch.Tensor:
    """The output's shape and dtype, for tracing; of ``decode_attention_update`` and of the C++ op alike."""
    return torch.empty_like(q, memory_format=torch.contiguous_format)


decode_attention_update.register_fake(_attention_update_fake)
