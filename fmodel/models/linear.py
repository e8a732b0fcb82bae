"""`Linear`: the skeletons' `nn.Linear`, with a faster CPU path for bfloat16 decode steps.

On CPU, `F.linear` on a bfloat16 weight repacks the weight for oneDNN on every call; a decode
step (1 row) then spends about twice as long as a oneDNN matmul over a weight packed once
(measured on this project's 2-core AVX-512 machines: 48 vs 95 us for 1536x576, 1.06 vs 2.06 ms
for SmolLM2's 49152x576 LM head). So for bfloat16 inputs of at most `KERNEL_MAX_ROWS` rows, the
forward runs `torch.ops.mkldnn._linear_pointwise` over a packed copy of the weight kept in a
runtime cache (`fmodel.models.cpu_kernels`): derived from the stored weight, never saved. The
results are bit-identical to `F.linear` (tests check it); the cost is a packed copy of each
bfloat16 weight (the weights' bytes again) once a decode has run, freed with the weights.

Everything else (float32, other devices, longer inputs, gradients wanted, torch.compile or
torch.func transforms) runs `F.linear` as `nn.Linear` does. Module and parameter names are
`nn.Linear`'s, and `isinstance(module, nn.Linear)` holds, so checkpoints, hooks, adapters and
the quantization swap see an ordinary linear layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_kernels import KERNEL_MAX_ROWS, PackCache, fast_path_ok, versions

__all__ = ["Linear"]

_BF16_PACKS = PackCache()
_HAS_ONEDNN = torch.backends.mkldnn.is_available()


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


class Linear(nn.Linear):
    """`nn.Linear`; bfloat16 decode steps on CPU run oneDNN over a packed weight (see the module
    docstring). Same parameters, same results, bit for bit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if (
            weight.dtype == torch.bfloat16
            and x.dtype == torch.bfloat16
            and _HAS_ONEDNN
            and 0 < x.shape[:-1].numel() <= KERNEL_MAX_ROWS
            and self.out_features > 0
            and not (torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)))
            and fast_path_ok(x, weight, *(() if bias is None else (bias,)))
        ):
            packed = _BF16_PACKS.get(weight, versions(weight), lambda: _pack(weight))
            if packed is not None:
                return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return F.linear(x, weight, bias)
