"""Weight-only int8 for decoding: int8 weights with one scale per output channel.

A decode step at small batch reads every weight once and does little arithmetic on it, so its
speed is the weight bytes: int8 reads a quarter of fp32 and half of bf16. Each linear layer's
weight W (out, in) becomes ``round(W / s)`` in int8 with s = max|W[o, :]| / 127 per output row o
(symmetric, no zero point), and ``y = (x @ q^T) * s``.

Kernels, first that runs:

- on a CPU with AVX2, the blocked kernel of ``stage2_prior.blocked`` over a blocked copy of the int8
  weight (a non-persistent buffer, remade when the module moves to a CPU, so a CPU holds the int8
  weights twice): fp32 activations and accumulation, 1.6x the aten kernel below at 1 row and 2x at
  8 on the development CPU; on a CPU with AVX512-VNNI each row is first rounded to 16-bit integers
  on its own scale (an input moves by at most 1 / 65534 of its row's largest) and multiplied in int16
  with exact int32 sums, ~1.8x faster again at 8 rows;
- ``torch.ops.aten._weight_int8pack_mm(x, q, s)``, which computes the same product with the int8
  weight read as is, on CPU (bf16 / fp16 activations; its fp32-activation path is several times
  slower here, so activations are cast to bf16 for the product); only for an input size that is a
  multiple of 16: on an AVX-512 CPU (torch 2.14) other sizes gave garbage (K = 8, 40, 72) or a
  segfault (K = 40 at 15 rows);
- elsewhere (CUDA, other devices, older torch) the weight is dequantised to bf16 per call and
  multiplied there, which reads the int8 weight and writes a bf16 copy. On CUDA that is chosen over
  the aten kernel, which runs there but was 2.8x slower at batch 1, 3.9x at 8 and about 7x at 64
  (compiled GPT-B decode step on an H200, torch 2.11; README "On a GPU").

torchao (0.18, which installs beside torch 2.14 here) was tried first: its eager int8 weight-only
product dequantises per call on CPU and took about twice the time of the plain fp32 product on one
768 -> 2304 layer at batch 1 on the development CPU, hence this small path.

The quantised model is for sampling: a saved one would not load (the strict loader finds int8
keys), so quantise a loaded float prior each time instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stage2_prior import blocked

DTYPES = ("float32", "bfloat16", "int8")  # what --prior-dtype / VQGPTPipeline.set_decoding accept
_KERNEL_OK: dict[tuple[str, torch.dtype], bool] = {}  # (device type, activation dtype) -> kernel usable
_KERNEL_K_MULTIPLE = 16  # the aten kernel's input sizes: its AVX-512 CPU path has no tail for other K


def _kernel_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether to multiply with aten._weight_int8pack_mm on this device with these activations: where it runs
    (probed once per pair), except on CUDA.

    The samplers' eager prefill calls this before any compiled decode step traces it.
    """
    key = (device.type, dtype)
    if device.type == "cuda":
        return False  # slower there than dequantising (module docstring)
    if key not in _KERNEL_OK:
        op = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
        ok = op is not None
        if ok:
            try:
                x = torch.ones(2, 64, dtype=dtype, device=device)
                w = torch.ones(32, 64, dtype=torch.int8, device=device)
                y = op(x, w, torch.ones(32, dtype=dtype, device=device))
                ok = bool(torch.allclose(y.float().cpu(), torch.full((2, 32), 64.0)))
            except (RuntimeError, NotImplementedError):
                ok = False
        _KERNEL_OK[key] = ok
    return _KERNEL_OK[key]


class Int8Linear(nn.Module):
    """A bias-free linear layer with an int8 weight (out, in) and per-output-channel scales (out,)."""

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        if weight_int8.dtype != torch.int8 or weight_int8.dim() != 2 or scales.shape != weight_int8.shape[:1]:
            raise ValueError(f"Int8Linear takes an int8 weight (out, in) and scales (out,), got "
                             f"{weight_int8.dtype} {tuple(weight_int8.shape)} and {tuple(scales.shape)}")
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8.contiguous())
        self.register_buffer("scales", scales.to(torch.bfloat16))  # the kernels' dtype
        self.weight_blocked: torch.Tensor | None
        self.register_buffer("weight_blocked", None, persistent=False)
        self._block()

    def _block(self) -> None:
        """Keep the CPU kernel's blocked copy of the weight (``stage2_prior.blocked``) where that kernel runs:
        on a CPU that builds it, for a multiple of 8 output channels. None elsewhere."""
        weight = self.weight_int8
        usable = (weight.device.type == "cpu" and self.out_features % blocked.BLOCK == 0
                  and blocked.kernel(torch.int8) is not None)
        self.weight_blocked = blocked.block(weight) if usable else None

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._block()  # moved to another device (or back): remade or dropped
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._block()  # the int8 weight was just overwritten

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        """Quantise a bias-free nn.Linear: per output row, scale = max|w| / 127, weights rounded to [-127, 127]."""
        if linear.bias is not None:
            raise ValueError("Int8Linear quantises bias-free linear layers only (the prior has no biases)")
        weight = linear.weight.detach().float()
        amax = weight.abs().amax(dim=1)
        exact = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))  # an all-zero row stays zero
        # The kernel takes bf16 scales: round each up to a bf16 value, then quantise with that very
        # scale, so that |w| / scale <= 127 (no clipping) and the error stays within half a step.
        scales = exact.to(torch.bfloat16)
        scales = torch.where(scales.float() < exact, torch.nextafter(scales, torch.full_like(scales, float("inf"))),
                             scales)
        q = torch.round(weight / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(q, scales)

    def dequantized(self) -> torch.Tensor:
        """The weight (out, in) this layer multiplies by, in fp32."""
        return self.weight_int8.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out) in x's dtype. fp32 inputs on a CPU with the blocked kernel: an fp32
        product; otherwise the product runs in bf16 (fp16 for fp16 inputs)."""
        if (self.weight_blocked is not None and x.dtype == torch.float32 and x.device.type == "cpu"
                and not (x.requires_grad and torch.is_grad_enabled())):
            flat = x.reshape(-1, self.in_features)
            scales = self.scales if self.scales.dtype == torch.bfloat16 else self.scales.to(torch.bfloat16)
            if torch.compiler.is_compiling():
                out = blocked.compiled_product(flat, self.weight_blocked, scales)
            else:
                out = blocked.product(flat, self.weight_blocked, scales)
            return out.reshape(*x.shape[:-1], self.out_features)
        compute = torch.float16 if x.dtype == torch.float16 else torch.bfloat16
        flat = x.reshape(-1, self.in_features).to(compute)
        scales = self.scales if self.scales.dtype == compute else self.scales.to(compute)
        if self.in_features % _KERNEL_K_MULTIPLE == 0 and _kernel_usable(x.device, compute):
            out = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), self.weight_int8, scales)
        else:
            out = F.linear(flat, self.weight_int8.to(compute)) * scales
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=int8 per-channel"


@torch.no_grad()
def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every bias-free nn.Linear of ``model`` (the prior: attention, FFN and output head) by an
    Int8Linear, in place; returns the model. Other parameters keep their dtype (float32 with
    ``--prior-dtype int8``; a bfloat16 model gives bf16 activations and a bf16 KV cache)."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                setattr(module, child_name, Int8Linear.from_linear(child).to(child.weight.device).train(child.training))
    return model


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds Int8Linear layers (from ``quantize_int8``)."""
    return any(isinstance(m, Int8Linear) for m in model.modules())


def set_prior_dtype(model: nn.Module, dtype: str) -> nn.Module:
    """Weights for decoding: 'float32', 'bfloat16', or 'int8' (linear layers weight-only int8, the rest float32).

    int8 keeps the residual stream, norms, attention and KV cache in float32 and casts activations
    to bf16 only inside each int8 product: on the development CPU (no bf16 units) a bf16 model's
    elementwise work cost more than int8 saved, and fp32 elsewhere keeps greedy tokens closer to fp32.
    """
    if dtype not in DTYPES:
        raise ValueError(f"prior dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if is_quantized(model):
        if dtype == "int8":
            return model
        raise ValueError(f"this prior is already quantised to int8; load it again for {dtype}")
    if dtype == "int8":
        return quantize_int8(model.to(torch.float32))
    return model.to(getattr(torch, dtype))
