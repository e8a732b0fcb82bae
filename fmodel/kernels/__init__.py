"""fmodel's CPU kernels for decode: matrix-vector products (x of 1..16 rows) over quantized and
dense weights, at memory speed, as torch custom ops (`torch.ops.fmodel.*`).

Why a small compiled extension: torch's own int4/int8 CPU kernels round the activations to
bfloat16 and have no integer-activation path, and no maintained library ships llama.cpp's
formats as torch ops. The sources (`fmodel/kernels/csrc/`, ~700 lines of C++) are compiled on
first use on the machine that runs them, with `torch.utils.cpp_extension.load` (ninja, `-O3
-march=native`), and cached in torch's extension cache under a hash of the sources, flags and
CPU: a second process loads the library in milliseconds. `python -m fmodel.kernels build`
prebuilds it; `FMODEL_KERNELS=0` disables it; `FMODEL_KERNELS_PORTABLE=1` builds it without the
AVX-512 code. If the extension cannot be built, `available()` is False (the reason is logged
once) and each op raises `KernelBuildError`: callers check `available()` first.

The ops (float32 x [..., K] in, float32 [..., N] out; output rows split over torch's threads):

- `int4_linear(x, packed, scale, zero, group_size, act_int8)`: fmodel's int4 layout, packed
  uint8 [N, ceil(K/2)] (column 2j in the low nibble, 2j+1 in the high one), scale and zero
  float32 [N, G], `W[n, k] = q * scale[n, k // g] + zero[n, k // g]` (llama.cpp's Q4_1 / Q4_0).
- `int8_linear(x, q, scale, zero, group_size, act_int8)`: q int8 [N, K], scale float32 [N, G]
  (G = 1 with group_size = K: per channel), zero float32 [N, G] or None (llama.cpp's Q8_0:
  group 32, no zero).
- Both also take scale and zero in float16 (GGUF's own d / m, kept as stored: 0.625 bytes per
  Q4_1 weight instead of 0.75, so memory stays at the file's size); they are widened exactly to
  float32 as they are read, so the result equals the float32 call on `scale.float()` bit for bit.
- `dense_linear(x, weight)`: weight float32 or bfloat16 [N, K]. A bfloat16 weight times an x
  whose values are all exactly bfloat16 (a bfloat16 model's activations) runs AVX512-BF16's
  `vdpbf16ps` where the CPU has it (32 products per instruction; the products are exact in
  float32, accumulated in float32; the instruction flushes denormals to zero: at most 2**-126
  per product), about 1.2x the widening kernel at 1 thread.

Numerics:

- weight-only (`act_int8=False`) and dense: the weights are dequantized exactly in registers
  (bfloat16 -> float32 is exact), x stays float32, products are accumulated in float32 (fused
  multiply-adds in 16 lanes, then a tree sum). Against the float64 product of the same
  dequantized weight the error is within float32 accumulation rounding:
  |err| <= ~K * 2**-24 * sum_k |W[n, k] * x[k]| (tests check 4x less slack than this bound).
- `act_int8=True`: x is quantized per block of 32 columns to int8 exactly as llama.cpp's Q8_1
  (d = max|x| / 127, q = round-half-even(x / d) computed as x * (1/d), float32 d instead of
  float16), and each group's integer dot product is exact (AVX512-VNNI `vpdpbusd`):
  `y = sum_g scale_g * sum_b d_b * dot(q_w, q_x)_b + zero_g * sum_b d_b * sum(q_x)_b`.
  Its error against the float64 product is that of x's rounding, at most
  sum_k |W[n, k]| * d_{b(k)} / 2, plus float32 rounding. `quantize_act(x)` returns the
  quantized (q, d) for inspection.

On a CPU without AVX-512 (F, BW, VL, VNNI) the portable C++ loops run: same results up to float32
association order. Group sizes the SIMD code has no pattern for (int4: not a multiple of 8;
int8: not of 4; weight-only: not of 32 / 16) also run the portable loops, correctly but slower.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..errors import InvalidArgumentError, KernelBuildError
from ._build import _state, ensure_loaded, load_error, load_info

__all__ = [
    "KernelBuildError",
    "available",
    "build",
    "decode_attention",
    "dense_linear",
    "int4_linear",
    "int8_linear",
    "quantize_act",
    "simd",
]


def available() -> bool:
    """True when the kernel extension is built and loaded (building it on first call, which takes
    ~10-20 s once per machine; then milliseconds). False, with the reason logged once as a
    warning, when it cannot be built or `FMODEL_KERNELS=0`."""
    if _state.get("loaded"):
        return True
    try:
        ensure_loaded()
    except KernelBuildError:
        return False
    return True


def build() -> dict[str, object]:
    """Build (if needed) and load the extension now.

    Returns:
        {"path": the shared library, "seconds": the time the build or load took, "simd": "avx512vnni"
        or "portable"}.

    Raises:
        KernelBuildError: it cannot be built here; the message says why.
    """
    ensure_loaded()
    return {**load_info(), "simd": simd()}


def simd() -> str:
    """The kernels in use: "avx512vnni" (AVX-512 F/BW/VL/VNNI code) or "portable"."""
    ensure_loaded()
    return torch.ops.fmodel.simd()


def _require() -> None:
    if not _state.get("loaded"):
        ensure_loaded()


_OPS: dict[str, object] = {}  # op name -> its OpOverload, looked up once (saves ~0.2 us a call)


def _op(name: str):
    _require()
    op = _OPS[name] = getattr(torch.ops.fmodel, name).default
    return op


def _named(exc: ValueError) -> InvalidArgumentError:
    return InvalidArgumentError(str(exc).split("\nException raised from")[0])


def int4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    act_int8: bool,
) -> torch.Tensor:
    """x @ W.T for an int4 weight in fmodel's layout.

    Arguments:
        x: float32 [..., K] (CPU).
        packed: uint8 [N, ceil(K / 2)], column 2j in the low nibble, 2j+1 in the high one.
        scale, zero: float32 (or both float16) [N, G], G = ceil(K / group_size):
            W[n, k] = q[n, k] * scale[n, k // group_size] + zero[n, k // group_size].
        group_size: the group width (32 for GGUF Q4_0 / Q4_1).
        act_int8: False: weight-only (float32 x, float32 accumulation). True: x quantized to int8
            per block of 32 (llama.cpp's Q8_1) and integer dot products (module docstring).

    Returns:
        float32 [..., N]. Pure: the inputs are not written.

    Raises:
        KernelBuildError: the extension is unavailable (check `available()` first).
        InvalidArgumentError: a shape, dtype or device that does not fit.

    Example:
        >>> y = fmodel.kernels.int4_linear(x, packed, scale, zero, 32, act_int8=True)
    """
    op = _OPS.get("int4_linear") or _op("int4_linear")
    try:
        return op(x, packed, scale, zero, group_size, act_int8)
    except ValueError as exc:
        raise _named(exc) from exc


def int8_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    group_size: int,
    act_int8: bool,
) -> torch.Tensor:
    """x @ W.T for an int8 weight, W[n, k] = q[n, k] * scale[n, k // group_size] (+ zero[...]).

    Arguments:
        x: float32 [..., K] (CPU).
        q: int8 [N, K].
        scale: float32 or float16 [N, G], G = ceil(K / group_size) (G = 1 with group_size = K:
            per channel).
        zero: [N, G] of scale's dtype, or None (symmetric, as GGUF Q8_0).
        group_size: the group width (32 for Q8_0; K for per-channel scales).
        act_int8: as for `int4_linear`.

    Returns:
        float32 [..., N].

    Raises:
        KernelBuildError, InvalidArgumentError: as for `int4_linear`.
    """
    op = _OPS.get("int8_linear") or _op("int8_linear")
    try:
        return op(x, q, scale, zero, group_size, act_int8)
    except ValueError as exc:
        raise _named(exc) from exc


def dense_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T, weight float32 or bfloat16 [N, K], x float32 or bfloat16 [..., K]; float32
    accumulation (bfloat16 values are widened exactly; x is not rounded). A bfloat16 weight with
    an x that is exactly bfloat16 (a bfloat16 x, or float32 holding such values) runs the
    bfloat16 dot-product instruction where the CPU has it.

    Returns:
        float32 [..., N].

    Raises:
        KernelBuildError, InvalidArgumentError: as for `int4_linear`.
    """
    op = _OPS.get("dense_linear") or _op("dense_linear")
    try:
        return op(x, weight)
    except ValueError as exc:
        raise _named(exc) from exc


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Masked softmax attention of a few query rows over a key/value cache (a decode step).

    Arguments:
        q: [B, H, R, D] float32 or bfloat16 (R: the query rows sharing each key/value head,
            e.g. the grouped-query heads of one position folded together).
        k, v: [B, H, S, D], q's dtype; rows contiguous (a cache sliced along S is fine).
        mask: bool, broadcastable to [B, H, R, S]: True where a row may attend to a key.
        scale: the scores' factor (1 / sqrt(D) for standard attention).

    Returns:
        [B, H, R, D] in q's dtype: softmax(scale * q k^T over the unmasked keys) v, accumulated
        in float32; zeros for a row whose mask lets no key through (as torch's CPU flash
        kernel). Pure: the inputs are not written.

    Raises:
        KernelBuildError, InvalidArgumentError: as for `int4_linear`.
    """
    op = _OPS.get("decode_attention") or _op("decode_attention")
    try:
        return op(q, k, v, mask, float(scale))
    except ValueError as exc:
        raise _named(exc) from exc


def quantize_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The act_int8 kernels' quantization of x [M, K] float32: (q int8 [M, 32 * ceil(K / 32)],
    zero-padded; d float32 [M, ceil(K / 32)]), x[m, k] ~ q[m, k] * d[m, k // 32]."""
    _require()
    try:
        return torch.ops.fmodel.quantize_act.default(x)
    except ValueError as exc:
        raise _named(exc) from exc


@contextlib.contextmanager
def _portable() -> Iterator[None]:
    """Run the portable loops instead of the AVX-512 code inside the block (process-wide; for
    tests and benchmarks of the portable path)."""
    _require()
    torch.ops.fmodel.set_portable(True)
    try:
        yield
    finally:
        torch.ops.fmodel.set_portable(False)


def _load_error() -> str | None:
    return load_error()
