"""`Linear`: the skeletons' `nn.Linear`, with faster CPU paths for float32 / bfloat16 inference.

Decode steps: for inputs of at most `KERNEL_MAX_ROWS` rows on CPU, a weight is multiplied by
`fmodel.kernels.dense_linear` when the kernel extension is loaded: it reads the weight as
stored, in address order, at memory speed (SmolLM2-135M's 211 projections, 1 thread of a Zen 5
EPYC core: float32 ~30 GB/s against 12 GB/s for `F.linear`, which is MKL's matrix-vector
product; bfloat16 ~26 GB/s), eagerly and under torch.compile / torch.export (the op's fake
implementation gives the shapes and AOTInductor calls it).

Prefill: float32 inputs of more rows run oneDNN's matrix product on the stored weight
(`torch.ops.mkldnn._linear_pointwise`, no packed copy): on AMD CPUs MKL's single-precision GEMM,
which `F.linear` calls, takes a slower path (measured: 92 GFLOP/s against oneDNN's 215 on a
Zen 5 core, SmolLM2's [128 x 576] x [576 x 1536]); on Intel CPUs the two are alike. bfloat16
prefill is `F.linear`, which already calls oneDNN.

Numerics: against `F.linear` (Transformers' own call) the results differ by float32 summation
order only: the kernel widens x to float32 (exact for bfloat16), accumulates in float32, adds
the bias in float32 and rounds once to x's dtype (float32: within K * 2**-24 * sum |w * x|;
bfloat16: the same before the one rounding, so at most one bfloat16 ulp apart; tests bound
both); oneDNN's float32 product is a float32 GEMM of another blocking. Parity with Transformers
is therefore to float32 rounding, as between two BLAS libraries, not bit for bit.

Without the extension (`FMODEL_KERNELS=0`, no compiler), float32 decode steps run `F.linear`
and bfloat16 ones `torch.ops.mkldnn._linear_pointwise` over a copy of the weight packed once
for oneDNN (kept in a runtime cache, `fmodel.models.cpu_kernels`: derived from the stored
weight, never saved), which is bit-identical to `F.linear` and about twice as fast as it, since
`F.linear` repacks a bfloat16 weight on every call.

Everything else (other dtypes and devices, gradients wanted for the weight or the input,
torch.func transforms, tracing of prefill-sized inputs) runs `F.linear` as `nn.Linear` does.
Module and parameter names are `nn.Linear`'s, and `isinstance(module, nn.Linear)` holds, so
checkpoints, hooks, adapters and the quantization swap see an ordinary linear layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_kernels import (
    KERNEL_MAX_ROWS,
    PackCache,
    fast_path_ok,
    float32_linear,
    no_grad_wanted,
    traced_input_ok,
    versions,
)
from .cpu_kernels import fmodel_kernels as _kernels

__all__ = ["Linear"]

_BF16_PACKS = PackCache()
_HAS_ONEDNN = torch.backends.mkldnn.is_available()
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def _dense_kernel_ok(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """`fmodel.kernels.dense_linear` may run: while torch.compile / export traces a CPU input, or
    eagerly on plain CPU tensors; the extension loaded."""
    if torch.compiler.is_compiling():
        ok = traced_input_ok(x)
    else:
        ok = fast_path_ok(x, weight, *(() if bias is None else (bias,)))
    return ok and _kernels() is not None


class Linear(nn.Linear):
    """`nn.Linear`; float32 / bfloat16 decode steps on CPU run `fmodel.kernels.dense_linear` (or,
    without the extension, oneDNN over a packed bfloat16 weight), float32 prefill oneDNN's
    product. See the module docstring."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        rows = x.shape[:-1].numel()
        out_features = weight.shape[0]  # a tensor-parallel shard holds part of self.out_features
        same = x.dtype == weight.dtype and (bias is None or bias.dtype == x.dtype)
        if rows > KERNEL_MAX_ROWS and x.dtype == torch.float32:
            return float32_linear(x, weight, bias)
        if (
            0 < rows <= KERNEL_MAX_ROWS
            and out_features > 0
            and same
            and x.dtype in _KERNEL_DTYPES
            and no_grad_wanted(weight, bias)
        ):
            if _dense_kernel_ok(x, weight, bias):
                # a bfloat16 x goes as it is: rounded, even where torch.compile would not round it
                y = _kernels().dense_linear(x.reshape(rows, x.shape[-1]), weight.detach())
                if bias is not None:
                    y = y + bias.detach().to(torch.float32)
                return y.view(*x.shape[:-1], out_features).to(x.dtype)
            if (
                x.dtype == torch.bfloat16
                and _HAS_ONEDNN
                and fast_path_ok(x, weight, *(() if bias is None else (bias,)))
            ):
                packed = _BF16_PACKS.get(weight, versions(weight), lambda: _pack(weight))
                if packed is not None:
                    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return F.linear(x, weight, bias)
