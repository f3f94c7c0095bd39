"""C++ kernels built at run time by inductor's C++ toolchain (the compiler torch.compile uses on a CPU).

Both stages carry a few hand-written CPU kernels (stage2_prior.blocked's products and attention,
stage1_vq.norm_silu's fused norm). Each is C++ source with an ``extern "C" void kernel(...)``, built once
per source (inductor caches the library on disk) into a Python callable that takes tensors for pointer
arguments and Python numbers for the rest.
"""

from __future__ import annotations

from typing import Callable


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
