"""`Linear`: the skeletons' `nn.Linear`, with a faster CPU path for float32 / bfloat16 decode steps.

For inputs of at most `KERNEL_MAX_ROWS` rows (decode steps) on CPU, a weight is multiplied by
`fmodel.kernels.dense_linear` when the kernel extension is loaded: it reads the weight as
stored, at memory speed (measured on this project's 2-core AVX-512 machine, 1 thread, SmolLM2-
135M's shapes: float32 1.05-1.1x torch's `F.linear`; bfloat16 1.6x `F.linear` and 1.0-1.7x
oneDNN over a packed weight, with no packed copy). bfloat16 takes it eagerly and under
torch.compile / torch.export; float32 only under compile / export (the compiled decode step,
whose results are the eager step's up to float rounding anyway): eager float32 stays `F.linear`,
so an eager forward gives Transformers' numbers bit for bit. Traced, the op's fake
implementation gives the shapes and AOTInductor calls it.

Numerics: x is widened to float32 (exact for bfloat16), products accumulate in float32, the bias
is added in float32, and the result is rounded once to x's dtype. Against `F.linear` the result
differs by float32 summation order only (float32: within K * 2**-24 * sum |w * x|; bfloat16: the
same before the one rounding to bfloat16, so at most one bfloat16 ulp apart; tests bound both).

Without the extension (`FMODEL_KERNELS=0`, no compiler), bfloat16 decode steps run
`torch.ops.mkldnn._linear_pointwise` over a copy of the weight packed once for oneDNN (kept in a
runtime cache, `fmodel.models.cpu_kernels`: derived from the stored weight, never saved), which
is bit-identical to `F.linear` and about twice as fast as it, since `F.linear` repacks a
bfloat16 weight on every call.

Everything else (other dtypes and devices, longer inputs, gradients wanted for the weight or the
input, torch.func transforms) runs `F.linear` as `nn.Linear` does. Module and parameter names
are `nn.Linear`'s, and `isinstance(module, nn.Linear)` holds, so checkpoints, hooks, adapters and
the quantization swap see an ordinary linear layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_kernels import KERNEL_MAX_ROWS, PackCache, fast_path_ok, traced_input_ok, versions
from .cpu_kernels import fmodel_kernels as _kernels

__all__ = ["Linear"]

_BF16_PACKS = PackCache()
_HAS_ONEDNN = torch.backends.mkldnn.is_available()
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def _dense_kernel_ok(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """`fmodel.kernels.dense_linear` may run: while torch.compile / export traces a CPU input, or
    eagerly on plain CPU bfloat16 tensors (float32 stays `F.linear` eagerly: bit for bit the
    numbers Transformers gives); the extension loaded."""
    if torch.compiler.is_compiling():
        ok = traced_input_ok(x)
    else:
        ok = x.dtype == torch.bfloat16 and fast_path_ok(x, weight, *(() if bias is None else (bias,)))
    return ok and _kernels() is not None


class Linear(nn.Linear):
    """`nn.Linear`; float32 / bfloat16 decode steps on CPU run `fmodel.kernels.dense_linear` (or,
    without the extension, oneDNN over a packed bfloat16 weight). See the module docstring."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        rows = x.shape[:-1].numel()
        if (
            0 < rows <= KERNEL_MAX_ROWS
            and self.out_features > 0
            and x.dtype == weight.dtype
            and x.dtype in _KERNEL_DTYPES
            and (bias is None or bias.dtype == x.dtype)
            and not (
                torch.is_grad_enabled()
                and (weight.requires_grad or (bias is not None and bias.requires_grad))
            )
        ):
            if _dense_kernel_ok(x, weight, bias):
                y = _kernels().dense_linear(
                    x.reshape(rows, self.in_features).to(torch.float32), weight.detach()
                )
                if bias is not None:
                    y = y + bias.detach().to(torch.float32)
                return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
            if (
                x.dtype == torch.bfloat16
                and _HAS_ONEDNN
                and fast_path_ok(x, weight, *(() if bias is None else (bias,)))
            ):
                packed = _BF16_PACKS.get(weight, versions(weight), lambda: _pack(weight))
                if packed is not None:
                    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return F.linear(x, weight, bias)
