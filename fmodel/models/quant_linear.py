"""Weight-only quantized linear layers, and the module swap that puts them into a skeleton.

Two schemes, each stored as plain tensors (they save, load and move like any other):

- "int8": `weight_int8` [out, in] int8 and `weight_scale` [out] (the model's float dtype),
  symmetric per output channel. Reference value: `W = weight_int8 * weight_scale[:, None]`.
- "int4": `weight_int4` [out, ceil(in / 2)] uint8 holding two 4-bit values per byte (column
  2j in the low nibble, 2j+1 in the high one), `weight_scale` [out, G] (float) and
  `weight_zero` [out, G] float (each group's minimum, like llama.cpp's Q4_1), per group of `group_size` input columns
  (G = ceil(in / group_size); the last group may be shorter). Reference value:
  `W[o, i] = q[o, i] * weight_scale[o, i // g] + weight_zero[o, i // g]`.

The *reference semantics* of a forward is `F.linear(x, W.to(x.dtype), bias)` with W as above,
computed in float32. On CPU the forward runs faster kernels instead, which differ from the
reference by rounding only (tests bound the difference):

- int8: `torch._weight_int8pack_mm` for inputs of at most `KERNEL_MAX_ROWS` rows (decode
  steps) whose width is a multiple of 16 (the kernel's block; other widths fall back to the
  dequantized matmul below): weight-only, the activations rounded to bfloat16 and the product returned in
  bfloat16 (accumulated in float32), then scaled per channel in float32. Longer inputs
  (prefill) dequantize to float32 and matmul, the faster path there. (fbgemm's dynamic int8
  linear, which also quantizes the activations, was slower on this project's machines and
  broke SmolLM2-135M: top-1 agreement with float32 0.22, because of activation outliers.)
- int4: `torch._weight_int4pack_mm_for_cpu` ("tinygemm") for inputs of at most
  `KERNEL_MAX_ROWS` rows (decode steps): activations and scales are rounded to bfloat16
  (about 3 significant digits). Longer inputs (prefill) dequantize to float32 and matmul,
  which is then the faster path.

The kernels' packed weights are a runtime cache derived from the stored tensors (built on
first use, kept per tensor object while it lives, rebuilt if the tensor is written in place);
they never change the stored tensors and are not part of the state. Gradients: the quantized
weights are frozen (no gradient reaches them); an input that requires grad runs the reference
path, so gradients flow to the input (adapters on a quantized base).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError
from .cpu_kernels import KERNEL_MAX_ROWS, PackCache, fast_path_ok, versions

__all__ = [
    "KERNEL_MAX_ROWS",
    "Int4Linear",
    "Int8Linear",
    "dequantize_int4",
    "dequantize_int8",
    "pack_int4",
    "quantization_config",
    "swap_quantized_linears",
    "unpack_int4",
]

QUANT_METHOD = "fmodel"


def quantization_config(config: Any) -> Mapping[str, Any] | None:
    """The fmodel `quantization_config` a config carries (in `config.extra`), or None.

    A `quantization_config` of another `quant_method` (bitsandbytes, GPTQ, ...) is not fmodel's:
    None is returned and the checkpoint loads (or fails to) as an unquantized one."""
    qc = getattr(config, "extra", {}).get("quantization_config")
    if isinstance(qc, Mapping) and qc.get("quant_method") == QUANT_METHOD:
        return qc
    return None


# --------------------------------------------------------------------------- reference math


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[out, in] integers in 0..15 -> [out, ceil(in / 2)] uint8, column 2j in the low nibble."""
    if q.shape[-1] % 2:
        q = F.pad(q, (0, 1))
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of `pack_int4`: [out, ceil(in / 2)] uint8 -> [out, in] uint8 in 0..15."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], -1)[..., :in_features]


def dequantize_int8(weight_int8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The reference float32 weight [out, in] of an int8 layer."""
    return weight_int8.to(torch.float32) * scale.to(torch.float32)[:, None]


def dequantize_int4(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, in_features: int, group_size: int
) -> torch.Tensor:
    """The reference float32 weight [out, in] of an int4 layer."""
    out, groups = scale.shape
    q = unpack_int4(packed, 2 * packed.shape[-1]).to(torch.float32)
    q = F.pad(q, (0, groups * group_size - q.shape[-1])).view(out, groups, group_size)  # whole groups
    w = q * scale.to(torch.float32)[..., None] + zero.to(torch.float32)[..., None]
    return w.reshape(out, groups * group_size)[:, :in_features]


# --------------------------------------------------------------------------- modules


def _frozen_param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


_INT4_PACKS = PackCache()
# torch's int8 kernel reads the weight with aligned vector loads: a weight at an address not a
# multiple of 16 bytes (a tensor memory-mapped from a safetensors file, whose header only aligns
# to 8) crashes the process. Such a weight runs the kernel over an aligned copy kept here (a
# runtime cache, like the packs: derived from the stored weight, never saved).
_INT8_ALIGNED = PackCache()


@functools.lru_cache(maxsize=64)
def _unit_scales(n: int) -> torch.Tensor:
    """bfloat16 ones [n] (read-only use), shared by every int8 layer with n outputs."""
    return torch.ones(n, dtype=torch.bfloat16)


class Int8Linear(nn.Module):
    """`nn.Linear` with an int8 weight, symmetric per output channel (see the module docstring
    for the reference semantics and the CPU kernel)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_int8 = _frozen_param(out_features, in_features, dtype=torch.int8)
        self.weight_scale = _frozen_param(out_features, dtype=dtype)
        self.bias = _frozen_param(out_features, dtype=dtype) if bias else None

    def reference_weight(self) -> torch.Tensor:
        return dequantize_int8(self.weight_int8, self.weight_scale.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, scale, bias = self.weight_int8, self.weight_scale, self.bias
        rows = x.shape[:-1].numel()
        # torch's int8 kernel reads the input in blocks of 16 columns: with another width it
        # returns NaN for one row and crashes the process (SIGSEGV) for more (torch 2.13, CPU).
        if (
            0 < rows <= KERNEL_MAX_ROWS
            and self.out_features > 0
            and self.in_features % 16 == 0
            and fast_path_ok(x, q, scale)
        ):
            # Unit scales in the kernel: the stored scales are applied after it, unrounded. A
            # bfloat16 product times float32 scales promotes to float32 in the one multiply.
            x2 = x.reshape(rows, self.in_features).to(torch.bfloat16)
            if q.data_ptr() % 16:
                q = _INT8_ALIGNED.get(q, versions(q), lambda: q.clone())
            y = torch._weight_int8pack_mm(x2, q, _unit_scales(self.out_features))
            scale = scale.detach()
            if bias is None and scale.dtype == torch.float32:
                y = y * scale
            else:
                y = y.to(torch.float32) * scale.to(torch.float32)
                if bias is not None:
                    y = y + bias.detach().to(torch.float32)
            y = y.view(*x.shape[:-1], self.out_features)
            return y if y.dtype == x.dtype else y.to(x.dtype)
        return _reference_linear(x, self.reference_weight(), bias)


class Int4Linear(nn.Module):
    """`nn.Linear` with a packed 4-bit weight, asymmetric per group of `group_size` input
    columns (see the module docstring for the reference semantics and the CPU kernel)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, group_size: int
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = math.ceil(in_features / group_size)
        self.weight_int4 = _frozen_param(out_features, math.ceil(in_features / 2), dtype=torch.uint8)
        self.weight_scale = _frozen_param(out_features, groups, dtype=dtype)
        self.weight_zero = _frozen_param(out_features, groups, dtype=dtype)
        self.bias = _frozen_param(out_features, dtype=dtype) if bias else None

    def reference_weight(self) -> torch.Tensor:
        return dequantize_int4(
            self.weight_int4, self.weight_scale.detach(), self.weight_zero, self.in_features, self.group_size
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, scale, zero, bias = self.weight_int4, self.weight_scale, self.weight_zero, self.bias
        rows = x.shape[:-1].numel()
        if 0 < rows <= KERNEL_MAX_ROWS and fast_path_ok(x, q, scale, zero):
            packed = _INT4_PACKS.get(q, versions(q, scale, zero), lambda: self._prepack(q, scale, zero))
            if packed is not None:
                weight, scales_zeros, padded_in = packed
                x2 = x.reshape(rows, self.in_features).to(torch.bfloat16)
                if padded_in != self.in_features:
                    x2 = F.pad(x2, (0, padded_in - self.in_features))
                y = torch._weight_int4pack_mm_for_cpu(x2, weight, self.group_size, scales_zeros)
                if bias is not None:
                    y = y.to(torch.float32) + bias.detach().to(torch.float32)
                return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return _reference_linear(x, self.reference_weight(), bias)

    def _prepack(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        """tinygemm's layout: int32 [out, in'] values 0..15 (in' = in padded to whole groups) and
        bfloat16 [G, out, 2] of (scale, offset) with W = (q - 8) * scale + offset."""
        g = self.group_size
        padded_in = math.ceil(self.in_features / g) * g
        values = unpack_int4(q.detach(), self.in_features).to(torch.int32)
        values = F.pad(values, (0, padded_in - self.in_features))  # x is padded with zeros there
        weight = torch._convert_weight_to_int4pack_for_cpu(values.contiguous(), 1)
        s = scale.detach().to(torch.float32)
        offset = zero.to(torch.float32) + 8 * s
        scales_zeros = torch.stack((s, offset), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        return weight, scales_zeros, padded_in


def _reference_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = F.linear(x.to(torch.float32), weight, None if bias is None else bias.detach().to(torch.float32))
    return y.to(x.dtype)


# --------------------------------------------------------------------------- the module swap


def swap_quantized_linears(module: nn.Module, config: Any) -> nn.Module:
    """Replace, in place, the `nn.Linear` submodules a quantized config lists by `Int8Linear` /
    `Int4Linear` of the same shape and bias (on the current default device: call it where the
    skeleton is built, under `torch.device("meta")`). A config without an fmodel
    `quantization_config` leaves `module` as it is. Returns `module`.

    Raises:
        ValueError: a listed module is missing or is not an `nn.Linear`.
    """
    qc = quantization_config(config)
    if qc is None:
        return module
    scheme, group_size = qc["scheme"], int(qc.get("group_size") or 0)
    dtype = torch.get_default_dtype()
    for name in qc.get("modules", ()):
        parent_name, _, leaf = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        old = getattr(parent, leaf, None)
        if not isinstance(old, nn.Linear):
            raise InvalidArgumentError(
                f"quantization_config lists {name!r}, which is not an nn.Linear of "
                f"{type(module).__name__} (found {type(old).__name__})"
            )
        bias = old.bias is not None
        if scheme == "int8":
            new = Int8Linear(old.in_features, old.out_features, bias, dtype)
        elif scheme == "int4":
            new = Int4Linear(old.in_features, old.out_features, bias, dtype, group_size)
        else:
            raise InvalidArgumentError(
                f"quantization_config: unknown scheme {scheme!r} (expected 'int8' or 'int4')"
            )
        setattr(parent, leaf, new)
    return module
