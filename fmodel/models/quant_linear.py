"""Quantized linear layers, their layouts and reference math, and the module swap into a skeleton.

Two schemes, each stored as plain tensors (they save, load and move like any other):

- "int8": `weight_int8` [out, in] int8 and `weight_scale`, either [out] (per output channel,
  symmetric: `fmodel.quantize`'s layout, group_size None) or [out, G] per group of `group_size`
  input columns (G = ceil(in / group_size)), with an optional `weight_zero` [out, G]. Reference
  value: `W[o, i] = q[o, i] * scale[o, i // g]` (`+ zero[o, i // g]` when there is a zero).
  GGUF's Q8_0 (g32), Q6_K (values q - 32, g16), Q5_0 (values q - 16, g32) load symmetric;
  Q5_1 and Q5_K (values 0..31, g32) with a zero.
- "int4": `weight_int4` [out, ceil(in / 2)] uint8 holding two 4-bit values per byte (column
  2j in the low nibble, 2j+1 in the high one), `weight_scale` [out, G] (float) and
  `weight_zero` [out, G] float (each group's minimum, like llama.cpp's Q4_1), per group of
  `group_size` input columns (the last group may be shorter). Reference value:
  `W[o, i] = q[o, i] * weight_scale[o, i // g] + weight_zero[o, i // g]`. GGUF's Q4_0
  (zero -8d), Q4_1 and Q4_K (scale d * sc, zero -dmin * m) load as int4 g32.

Which layout each module has is recorded in the config's `quantization_config` (saved in
config.json): its "scheme" / "group_size" (/ "zero" for int8) are the layout of every listed
module, except those the optional "layouts" {module: {"scheme", "group_size", "zero"}}
overrides (a GGUF file may mix Q4_1 and Q6_K). `module_layouts` reads it; a checkpoint written
before "layouts" existed reads unchanged. Quantized embeddings (`QuantEmbedding`) and an output
projection tied to one (`TiedQuantLinear`, "tied_modules") are in `fmodel.models.quant_embedding`.

Activations: each module has `activations`, "float" (default: float32 activations, the
weight-only products above) or "int8" (the activations are rounded to int8 per block of 32
input columns before the product, as llama.cpp's integer dot products and `fmodel.kernels` do:
`quantize_activations_q8`; the config's "activations"). The *reference semantics* of a forward is `F.linear(x', W, bias)` in float32
with W as above and x' the (rounded) activations. On CPU, weight-only modules run faster
kernels instead, which differ from the reference by rounding only (tests bound the
difference); `_kernel_forward` is the one place per module that picks the kernel:

- `fmodel.kernels` (`int8_linear` / `int4_linear`, every layout, float or int8 activations) for
  inputs of at most `KERNEL_MAX_ROWS` rows (decode steps), when its extension is built (the
  default: compiled on first use; float32 x, float32 accumulation for weight-only).
- Without the extension, torch's own kernels for the same inputs: int8 per channel
  `torch._weight_int8pack_mm` (width a multiple of 16; activations rounded to bfloat16, the
  stored scales applied after it in float32; fbgemm's dynamic int8 linear, which also quantizes
  the activations, broke SmolLM2-135M: top-1 agreement with float32 0.22); int4 with float
  activations `torch._weight_int4pack_mm_for_cpu` ("tinygemm": activations and scales rounded
  to bfloat16). Grouped int8 and int8 activations then run the reference.
- Longer inputs (prefill) dequantize a block of rows at a time to float32 and matmul, the
  faster path there.

Under torch.compile / torch.export (the compiled decode step), inputs of at most
`KERNEL_MAX_ROWS` rows on CPU trace the `fmodel.kernels` custom op (its fake implementation
gives the shapes; AOTInductor's C++ wrapper calls it through the dispatcher) instead of the
reference, when the extension is loaded: `traces_kernel_op` says so to the compiled step.

The kernels' packed weights are a runtime cache derived from the stored tensors (built on
first use, kept per tensor object while it lives, rebuilt if the tensor is written in place);
they never change the stored tensors and are not part of the state. Gradients: the quantized
weights are frozen (no gradient reaches them); an input that requires grad runs the reference
path, so gradients flow to the input (adapters on a quantized base).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError
from .cpu_kernels import KERNEL_MAX_ROWS, PackCache, fast_path_ok, float32_linear, traced_input_ok, versions
from .cpu_kernels import fmodel_kernels as _kernels

__all__ = [
    "ACTIVATIONS",
    "KERNEL_MAX_ROWS",
    "Int4Linear",
    "Int8Linear",
    "Layout",
    "dequantize_int4",
    "dequantize_int8",
    "module_layouts",
    "pack_int4",
    "quantization_config",
    "quantize_activations_q8",
    "swap_quantized_linears",
    "traces_kernel_op",
    "unpack_int4",
]

QUANT_METHOD = "fmodel"
ACTIVATIONS = ("float", "int8")
Q8_BLOCK = 32  # activations per int8 block (llama.cpp's Q8_0)


def quantization_config(config: Any) -> Mapping[str, Any] | None:
    """The fmodel `quantization_config` a config carries (in `config.extra`), or None.

    A `quantization_config` of another `quant_method` (bitsandbytes, GPTQ, ...) is not fmodel's:
    None is returned and the checkpoint loads (or fails to) as an unquantized one."""
    qc = getattr(config, "extra", {}).get("quantization_config")
    if isinstance(qc, Mapping) and qc.get("quant_method") == QUANT_METHOD:
        return qc
    return None


@attrs.frozen
class Layout:
    """How one module's weight is stored.

    Attributes:
        scheme: "int8" or "int4".
        group_size: input columns per scale; None for int8 per output channel (`weight_scale` [out]).
        zero: a `weight_zero` [out, G] is stored (always for int4).
    """

    scheme: str
    group_size: int | None
    zero: bool

    def as_record(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "group_size": self.group_size, "zero": self.zero}

    def entries(self) -> tuple[str, ...]:
        """The state entry suffixes of a module with this layout (`weight_int8`, `weight_scale`, ...)."""
        data = "weight_int8" if self.scheme == "int8" else "weight_int4"
        return (data, "weight_scale", *(("weight_zero",) if self.zero else ()))


def _layout(record: Mapping[str, Any], where: str) -> Layout:
    scheme = record.get("scheme")
    if scheme not in ("int8", "int4"):
        raise InvalidArgumentError(
            f"quantization_config{where}: unknown scheme {scheme!r} (expected 'int8' or 'int4')"
        )
    group = record.get("group_size")
    if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 1):
        raise InvalidArgumentError(
            f"quantization_config{where}: group_size {group!r} is not a positive integer"
        )
    if scheme == "int4" and group is None:
        raise InvalidArgumentError(f"quantization_config{where}: int4 needs a group_size")
    zero = record.get("zero", scheme == "int4")
    if not isinstance(zero, bool) or (scheme == "int4" and not zero) or (zero and group is None):
        raise InvalidArgumentError(
            f"quantization_config{where}: zero={zero!r} does not fit scheme {scheme!r} with group_size "
            f"{group!r} (int4 always has a zero; an int8 zero needs groups)"
        )
    return Layout(scheme, group, zero)


def module_layouts(qc: Mapping[str, Any]) -> dict[str, Layout]:
    """{module name: its `Layout`} for every module a `quantization_config` lists.

    Raises:
        InvalidArgumentError: an unknown scheme, a bad group size or zero flag, or a "layouts"
            entry for a module that "modules" does not list.
    """
    default = _layout(qc, "")
    overrides = qc.get("layouts") or {}
    modules = tuple(qc.get("modules", ()))
    stray = sorted(set(overrides) - set(modules))
    if stray:
        raise InvalidArgumentError(
            f"quantization_config: 'layouts' names modules not in 'modules': {stray[:5]}"
        )
    return {
        name: _layout(overrides[name], f"['layouts'][{name!r}]") if name in overrides else default
        for name in modules
    }


def check_activations(value: Any, what: str) -> str:
    """`value` if it is one of `ACTIVATIONS`; else a named error."""
    if value not in ACTIVATIONS:
        raise InvalidArgumentError(f"{what} must be one of {list(ACTIVATIONS)}, got {value!r}")
    return value


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


def _grouped(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, in_features: int, group_size: int
) -> torch.Tensor:
    """A fresh float32 q [out, >= in] (written in place) times scale [out, G] per group (+ zero),
    cut to [out, in]."""
    out, groups = scale.shape
    if q.shape[-1] != groups * group_size:  # whole groups
        q = F.pad(q, (0, groups * group_size - q.shape[-1]))
    w = q.view(out, groups, group_size).mul_(scale.to(torch.float32)[..., None])
    if zero is not None:
        w = w.add_(zero.to(torch.float32)[..., None])
    w = w.view(out, groups * group_size)
    return w if w.shape[-1] == in_features else w[:, :in_features]


def dequantize_int8(
    weight_int8: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None = None,
    group_size: int | None = None,
) -> torch.Tensor:
    """The reference float32 weight [out, in] of an int8 layer: per channel (`scale` [out]) or
    per group of `group_size` columns (`scale` / `zero` [out, G]; group_size may be left out
    when the groups divide the width evenly)."""
    q = weight_int8.to(torch.float32, copy=True)  # fresh: _grouped writes into it
    if scale.dim() == 1:
        return q * scale.to(torch.float32)[:, None]
    in_features, groups = weight_int8.shape[-1], scale.shape[-1]
    if group_size is None:
        if in_features % groups:
            raise InvalidArgumentError(
                f"dequantize_int8: {groups} groups do not divide {in_features} columns; pass group_size"
            )
        group_size = in_features // groups
    return _grouped(q, scale, zero, in_features, group_size)


def dequantize_int4(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, in_features: int, group_size: int
) -> torch.Tensor:
    """The reference float32 weight [out, in] of an int4 layer."""
    q = unpack_int4(packed, 2 * packed.shape[-1]).to(torch.float32)
    return _grouped(q, scale, zero, in_features, group_size)


def quantize_activations_q8(x: torch.Tensor) -> torch.Tensor:
    """`x` (float, [..., K]) rounded to int8 per block of 32 columns as the int8-activation
    kernels round it (`fmodel.kernels.quantize_act`, the scheme of llama.cpp's Q8 activation
    blocks), back in float32.

    Per block (the last one zero-padded): `d = max|x| / 127` (float32), `q = round(x * (1 / d))`
    (half to even, in -127..127; a block of zeros stays zero) and the block's value is `q * d`.
    The reference of `activations="int8"`: an integer dot product of q with the weights' values,
    scaled, is this float product up to float32 rounding.
    """
    x = x.to(torch.float32)
    k = x.shape[-1]
    blocks = -(-k // Q8_BLOCK)
    xb = F.pad(x, (0, blocks * Q8_BLOCK - k)).reshape(*x.shape[:-1], blocks, Q8_BLOCK)
    d = xb.abs().amax(dim=-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.round(xb * inv).clamp_(-127, 127)  # torch.round: half to even
    y = q * d
    return y.reshape(*x.shape[:-1], blocks * Q8_BLOCK)[..., :k]


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


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def _traced_kernel_ok(x: torch.Tensor) -> bool:
    """While torch.compile / export traces: the `fmodel.kernels` op may stand in for the
    reference (CPU input, no gradient wanted for it, extension loaded)."""
    return traced_input_ok(x) and _kernels() is not None


def traces_kernel_op() -> bool:
    """True when the quantized modules' traced forward calls the `fmodel.kernels` ops (the
    extension is built and loaded here): a compiled step then runs the kernels, not a
    dequantization of every weight per token."""
    return _kernels() is not None


def _kernel_scales(scale: torch.Tensor, zero: torch.Tensor | None):
    """Scales (and zeros) as the kernels take them: float32, or both float16 (kept as stored)."""
    if scale.dtype in (torch.float32, torch.float16) and (zero is None or zero.dtype == scale.dtype):
        return scale, zero
    return scale.to(torch.float32), None if zero is None else zero.to(torch.float32)


class Int8Linear(nn.Module):
    """`nn.Linear` with an int8 weight: symmetric per output channel (`group_size` None), or per
    group of `group_size` input columns with an optional zero (see the module docstring for
    the reference semantics and the CPU kernel)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        *,
        group_size: int | None = None,
        zero: bool = False,
        activations: str = "float",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.activations = check_activations(activations, "Int8Linear(activations)")
        self.weight_int8 = _frozen_param(out_features, in_features, dtype=torch.int8)
        if group_size is None:
            if zero:
                raise InvalidArgumentError("Int8Linear: a zero needs groups (group_size)")
            self.weight_scale = _frozen_param(out_features, dtype=dtype)
        else:
            groups = math.ceil(in_features / group_size)
            self.weight_scale = _frozen_param(out_features, groups, dtype=dtype)
        self.weight_zero = (
            _frozen_param(out_features, self.weight_scale.shape[-1], dtype=dtype) if zero else None
        )
        self.bias = _frozen_param(out_features, dtype=dtype) if bias else None

    def reference_weight(self) -> torch.Tensor:
        return dequantize_int8(
            self.weight_int8, self.weight_scale.detach(), _detach(self.weight_zero), self.group_size
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.weight_int8, self.weight_scale, self.weight_zero, self.bias)

    def linear(self, x, q, scale, zero, bias) -> torch.Tensor:
        """The forward over given tensors of this module's layout (a tied head passes its
        embedding's)."""
        rows = x.shape[:-1].numel()
        if (
            0 < rows <= KERNEL_MAX_ROWS
            and self.out_features > 0
            and (fast_path_ok(x, q, scale) or _traced_kernel_ok(x))
        ):
            y = self._kernel_forward(x.reshape(rows, self.in_features), q, scale.detach(), _detach(zero))
            if y is not None:
                if bias is not None:
                    y = y.to(torch.float32) + bias.detach().to(torch.float32)
                y = y.view(*x.shape[:-1], self.out_features)
                return y if y.dtype == x.dtype else y.to(x.dtype)
        scale, zero, g = scale.detach(), _detach(zero), self.group_size
        return _reference_linear(
            x,
            lambda i, j: dequantize_int8(q[i:j], scale[i:j], None if zero is None else zero[i:j], g),
            self.in_features,
            self.out_features,
            bias,
            self.activations,
        )

    def _kernel_forward(self, x2, q, scale, zero) -> torch.Tensor | None:
        """[rows, in] -> [rows, out] by a kernel, or None where none fits (the reference runs).

        `fmodel.kernels.int8_linear` (every layout, float or int8 activations) when it is built;
        else torch's weight-only int8 kernel for per-channel layouts with float activations."""
        kernels = _kernels()
        if kernels is not None:
            s = scale if scale.dim() == 2 else scale[:, None]
            s, zero = _kernel_scales(s, zero)
            group = self.group_size or self.in_features
            return kernels.int8_linear(x2.to(torch.float32), q, s, zero, group, self.activations == "int8")
        # torch's int8 kernel reads the input in blocks of 16 columns: with another width it
        # returns NaN for one row and crashes the process (SIGSEGV) for more (torch 2.13, CPU).
        if scale.dim() != 1 or self.activations != "float" or self.in_features % 16:
            return None
        # Unit scales in the kernel: the stored scales are applied after it, unrounded. A
        # bfloat16 product times float32 scales promotes to float32 in the one multiply.
        if q.data_ptr() % 16:
            q = _INT8_ALIGNED.get(q, versions(q), lambda: q.clone())
        y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), q, _unit_scales(self.out_features))
        return y * scale if scale.dtype == torch.float32 else y.to(torch.float32) * scale.to(torch.float32)


class Int4Linear(nn.Module):
    """`nn.Linear` with a packed 4-bit weight, asymmetric per group of `group_size` input
    columns (see the module docstring for the reference semantics and the CPU kernel)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        group_size: int,
        *,
        activations: str = "float",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.activations = check_activations(activations, "Int4Linear(activations)")
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
        return self.linear(x, self.weight_int4, self.weight_scale, self.weight_zero, self.bias)

    def linear(self, x, q, scale, zero, bias) -> torch.Tensor:
        """The forward over given tensors of this module's layout (a tied head passes its
        embedding's)."""
        rows = x.shape[:-1].numel()
        if 0 < rows <= KERNEL_MAX_ROWS and (fast_path_ok(x, q, scale, zero) or _traced_kernel_ok(x)):
            y = self._kernel_forward(x.reshape(rows, self.in_features), q, scale, zero)
            if y is not None:
                if bias is not None:
                    y = y.to(torch.float32) + bias.detach().to(torch.float32)
                return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        scale, zero, n, g = scale.detach(), zero.detach(), self.in_features, self.group_size
        return _reference_linear(
            x,
            lambda i, j: dequantize_int4(q[i:j], scale[i:j], zero[i:j], n, g),
            n,
            self.out_features,
            bias,
            self.activations,
        )

    def _kernel_forward(self, x2, q, scale, zero) -> torch.Tensor | None:
        """[rows, in] -> [rows, out] by a kernel, or None where none fits (the reference runs).

        `fmodel.kernels.int4_linear` (float or int8 activations) when it is built; else torch's
        tinygemm (weight-only, activations and scales rounded to bfloat16) for float activations."""
        kernels = _kernels()
        if kernels is not None:
            s, z = _kernel_scales(scale.detach(), zero.detach())
            return kernels.int4_linear(
                x2.to(torch.float32), q, s, z, self.group_size, self.activations == "int8"
            )
        if self.activations != "float":
            return None
        packed = _INT4_PACKS.get(q, versions(q, scale, zero), lambda: self._prepack(q, scale, zero))
        if packed is None:
            return None
        weight, scales_zeros, padded_in = packed
        x2 = x2.to(torch.bfloat16)
        if padded_in != self.in_features:
            x2 = F.pad(x2, (0, padded_in - self.in_features))
        return torch._weight_int4pack_mm_for_cpu(x2, weight, self.group_size, scales_zeros)

    def _prepack(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        """tinygemm's layout: int32 [out, in'] values 0..15 (in' = in padded to whole groups) and
        bfloat16 [G, out, 2] of (scale, offset) with W = (q - 8) * scale + offset."""
        g = self.group_size
        padded_in = math.ceil(self.in_features / g) * g
        values = unpack_int4(q.detach(), self.in_features).to(torch.int32)
        values = F.pad(values, (0, padded_in - self.in_features))  # x is padded with zeros there
        weight = torch._convert_weight_to_int4pack_for_cpu(values.contiguous(), 1)
        s = scale.detach().to(torch.float32)
        offset = zero.detach().to(torch.float32) + 8 * s
        scales_zeros = torch.stack((s, offset), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        return weight, scales_zeros, padded_in


# Output rows dequantized per block by the reference path: about 1 MiB of float32 weight, so a
# block stays in cache between its dequantization and its product (SmolLM2's 49152 x 576 tied
# head: 48 ms per decode step instead of 182 ms for the whole 113 MB matrix at once, 1 thread).
_BLOCK_BYTES = 1 << 20


def _reference_linear(
    x: torch.Tensor,
    weight_rows: Callable[[int, int], torch.Tensor],
    in_features: int,
    out_features: int,
    bias: torch.Tensor | None,
    activations: str = "float",
) -> torch.Tensor:
    """`F.linear(x', W, bias)` in float32 (x' = x, or x rounded as int8 activations) with W's
    output rows `weight_rows(i, j)` -> float32 W[i:j] dequantized a block at a time (the same
    numbers as one dequantized W; under torch.compile in one piece, which it fuses itself)."""
    xf = x.to(torch.float32)
    if activations == "int8":
        xf = quantize_activations_q8(xf)
    step = max(64, _BLOCK_BYTES // (4 * max(in_features, 1)))
    if out_features <= step or torch.compiler.is_compiling():
        y = float32_linear(xf, weight_rows(0, out_features))
    else:
        y = torch.cat(
            [float32_linear(xf, weight_rows(i, i + step)) for i in range(0, out_features, step)], dim=-1
        )
    if bias is not None:
        y = y + bias.detach().to(torch.float32)
    return y.to(x.dtype)


def make_linear(
    layout: Layout, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, activations: str
) -> Int8Linear | Int4Linear:
    """The quantized linear module of `layout` (on the current default device)."""
    if layout.scheme == "int8":
        return Int8Linear(
            in_features,
            out_features,
            bias,
            dtype,
            group_size=layout.group_size,
            zero=layout.zero,
            activations=activations,
        )
    return Int4Linear(in_features, out_features, bias, dtype, layout.group_size, activations=activations)


# --------------------------------------------------------------------------- the module swap


def swap_quantized_linears(module: nn.Module, config: Any) -> nn.Module:
    """Replace, in place, the modules a quantized config lists: each `nn.Linear` by an
    `Int8Linear` / `Int4Linear` of its layout (same shape and bias), each `nn.Embedding` by a
    `QuantEmbedding`, and each output projection of "tied_modules" by a `TiedQuantLinear` over
    its embedding (on the current default device: call it where the skeleton is built, under
    `torch.device("meta")`). A config without an fmodel `quantization_config` leaves `module`
    as it is. Returns `module`.

    Raises:
        InvalidArgumentError: a listed module is missing or is neither an `nn.Linear` nor an
            `nn.Embedding`, an unknown scheme or activations value, or a tie to a module that is
            not a quantized embedding.
    """
    from .quant_embedding import QuantEmbedding, TiedQuantLinear

    qc = quantization_config(config)
    if qc is None:
        return module
    activations = check_activations(qc.get("activations", "float"), "quantization_config['activations']")
    dtype = torch.get_default_dtype()
    for name, layout in module_layouts(qc).items():
        old = _submodule(module, name)
        if isinstance(old, nn.Linear):
            new = make_linear(
                layout, old.in_features, old.out_features, old.bias is not None, dtype, activations
            )
        elif isinstance(old, nn.Embedding):
            new = QuantEmbedding(
                old.num_embeddings, old.embedding_dim, layout, dtype, padding_idx=old.padding_idx
            )
        else:
            raise InvalidArgumentError(
                f"quantization_config lists {name!r}, which is neither an nn.Linear nor an nn.Embedding of "
                f"{type(module).__name__} (found {type(old).__name__})"
            )
        _set_submodule(module, name, new)
    for head, source in (qc.get("tied_modules") or {}).items():
        old, embedding = _submodule(module, head), _submodule(module, source)
        if not isinstance(embedding, QuantEmbedding) or not isinstance(old, nn.Linear):
            raise InvalidArgumentError(
                f"quantization_config ties {head!r} to {source!r}: expected an nn.Linear tied to a "
                f"quantized embedding, found {type(old).__name__} and {type(embedding).__name__}"
            )
        if (old.in_features, old.out_features) != (embedding.embedding_dim, embedding.num_embeddings):
            raise InvalidArgumentError(
                f"quantization_config ties {head!r} ({old.out_features} x {old.in_features}) to {source!r} "
                f"({embedding.num_embeddings} x {embedding.embedding_dim}): the shapes differ"
            )
        _set_submodule(module, head, TiedQuantLinear(embedding, old.bias is not None, dtype, activations))
    return module


def _submodule(module: nn.Module, name: str) -> nn.Module | None:
    parent_name, _, leaf = name.rpartition(".")
    try:
        parent = module.get_submodule(parent_name) if parent_name else module
    except AttributeError:
        return None
    return getattr(parent, leaf, None)


def _set_submodule(module: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(parent_name) if parent_name else module, leaf, new)
