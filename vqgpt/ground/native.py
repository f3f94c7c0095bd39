"""C++ kernels built at run time by inductor's C++ toolchain (the compiler torch.compile uses on a CPU).

Both stages carry a few hand-written CPU kernels (stage2_prior.blocked's products and attention,
stage2_prior.fused's RoPE, RMSNorm and SwiGLU, stage1_vq.norm_silu's fused norm). Each is C++ source
with an ``extern "C" void kernel(...)``, built once per source (inductor caches the library on disk)
into a Python callable that takes tensors for pointer arguments and Python numbers for the rest.

Also here, what those kernels share: the at::vec header, the first-use check (``passes``,
``close_to_float64``), and for the autograd functions around them the torch.func test and the torch-ops
backward of a double backward (``functorch_wrapped``, ``differentiable_backward``).
"""

from __future__ import annotations

from typing import Callable

import torch

# The start of a kernel over fp32 / bf16 tensors with at::vec: Vec (V fp32 lanes), load2 / store2 of 2 V values
# (float or bf16 storage, optionally the first m of them), and sigmoid.
VEC_HEADER = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#if !INDUCTOR_USE_VECTOR_TYPES()
#error "this kernel needs at::vec"
#endif
using Vec = at::vec::Vectorized<float>;
constexpr int64_t V = Vec::size();

// two vectors of fp32 (2 V values) from / to a kernel's own buffers (padded to a multiple of 2 V values)
static inline void load2(const float* p, Vec& a, Vec& b) { a = Vec::loadu(p); b = Vec::loadu(p + V); }
static inline void store2(float* p, const Vec& a, const Vec& b) { a.store(p); b.store(p + V); }

// the same from / to a tensor, m <= 2 V of its values (the last of a row whose length is not a multiple of
// 2 V: the lanes past them read as 0 and are not written)
static inline void load2(const float* p, Vec& a, Vec& b, const int64_t m) {
    if (m == 2 * V) return load2(p, a, b);
    a = Vec::loadu(p, std::min<int64_t>(m, V));
    b = m > V ? Vec::loadu(p + V, m - V) : Vec(0.0f);
}
static inline void store2(float* p, const Vec& a, const Vec& b, const int64_t m) {
    if (m == 2 * V) return store2(p, a, b);
    a.store(p, std::min<int64_t>(m, V));
    if (m > V) b.store(p + V, m - V);
}
using BVec = at::vec::Vectorized<at::BFloat16>;  // 2 V values
static inline void load2(const uint16_t* p, Vec& a, Vec& b, const int64_t m) {
    const auto* q = reinterpret_cast<const at::BFloat16*>(p);
    std::tie(a, b) = at::vec::convert_bfloat16_float(m == 2 * V ? BVec::loadu(q) : BVec::loadu(q, m));
}
static inline void store2(uint16_t* p, const Vec& a, const Vec& b, const int64_t m) {
    const BVec packed = at::vec::convert_float_bfloat16(a, b);
    if (m == 2 * V) packed.store(reinterpret_cast<at::BFloat16*>(p));
    else packed.store(reinterpret_cast<at::BFloat16*>(p), m);
}
#if defined(CPU_CAPABILITY_AVX512)
// 1 / (1 + exp(-t)) in a dozen AVX-512 instructions: exp as 2^n * e^r, |r| <= ln2 / 2, e^r by its Taylor
// polynomial to r^6 (relative error below 2e-7), and the reciprocal by rcp14 and one Newton step (2^-28).
// at::vec's exp_u20 cost 3x the rest of the fused GroupNorm's forward pass (and more with its division).
static inline Vec sigmoid(const Vec& t) {
    const __m512 x = _mm512_min_ps(_mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), t), _mm512_set1_ps(-87.0f)),
                                   _mm512_set1_ps(87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln 2 in two parts
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 e = _mm512_set1_ps(1.0f / 720);
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f / 120));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f / 24));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f / 6));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(0.5f));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f));
    const __m512 d = _mm512_add_ps(_mm512_scalef_ps(e, n), _mm512_set1_ps(1.0f));  // 1 + exp(-t)
    const __m512 q = _mm512_rcp14_ps(d);
    return Vec(_mm512_mul_ps(q, _mm512_fnmadd_ps(d, q, _mm512_set1_ps(2.0f))));
}
#else
static inline Vec sigmoid(const Vec& t) { return Vec(1.0f) / (Vec(1.0f) + t.neg().exp_u20()); }
#endif

"""


def build_kernel(source: str, argtypes: list[str], check: Callable[[object], bool] | None = None) -> object:
    """``source`` built as a callable ``kernel(*args)`` with C argument types ``argtypes`` (e.g. ``"const float*"``,
    ``"const int64_t"``, ``"const float"``), kept only if ``check(kernel)`` is true; None where it cannot be
    built (no compiler, a CPU or compiler without what the source needs) or the check fails."""
    try:
        from torch._inductor.codecache import CppPythonBindingsCodeCache

        candidate = CppPythonBindingsCodeCache.load_pybinding(argtypes, source)
        return candidate if check is None or check(candidate) else None
    except Exception:  # noqa: BLE001 - any failure to build means: use the library path
        return None


def passes(check: Callable[[], bool]) -> bool:
    """Whether a built kernel's first-use ``check()`` holds; one that raises fails (the library path is used)."""
    try:
        return bool(check())
    except Exception:  # noqa: BLE001 - a kernel that fails its check is not used
        return False


def differentiable_backward(reference, inputs: tuple[torch.Tensor, ...], grads: tuple) -> tuple:
    """The gradients of ``reference(*inputs)`` (torch ops) for ``grads``, as a graph: what a kernel's autograd function
    hands back from a backward asked to build one (``create_graph=True``, for a double backward), so that second
    derivatives come out as the torch ops give them instead of being dropped."""
    with torch.enable_grad():
        outputs = reference(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None]
    wanted = [t for t in inputs if t.requires_grad]
    found = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True,
                                     allow_unused=True))
    return tuple(next(found) if t.requires_grad else None for t in inputs)


def functorch_wrapped(x: torch.Tensor) -> bool:
    """Whether x is a tensor of a torch.func transform (grad, vmap, ...), whose rules a kernel's autograd function
    does not define: the torch ops run there."""
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check(x)) if check is not None else False


def close_to_float64(got: list[torch.Tensor], want: list[torch.Tensor], dtype: torch.dtype) -> bool:
    """A first-use check's comparison: each of ``got`` (a kernel's outputs and gradients, in ``dtype``) equals its
    float64 reference in ``want`` within the dtype's rounding (relative to the reference's largest value)."""
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    return all(torch.allclose(g.double(), w, rtol=tol, atol=tol * max(1.0, w.abs().max().item()))
               for g, w in zip(got, want))
