"""GGUF block-quantized tensors re-laid out, losslessly, as fmodel's quantized layouts.

Each kept format maps onto a `Layout` of `fmodel.models.quant_linear` so that the layout's
reference dequantization computes, in float32, the same numbers `gguf.quants.dequantize`
computes (tests compare every format value for value):

| GGUF | block | fmodel | values | scale, zero per group |
|---|---|---|---|---|
| Q4_0 | 32: d, 16 B nibbles | int4 g32 | q in 0..15 | d, -8d |
| Q4_1 | 32: d, m, 16 B | int4 g32 | q | d, m |
| Q4_K | 256: d, dmin, 12 B of 6-bit sc/m, 128 B | int4 g32 | q | d * sc, -(dmin * m) |
| Q8_0 | 32: d, 32 int8 | int8 g32 | q | d |
| Q5_0 | 32: d, 4 B high bits, 16 B | int8 g32 | q - 16 | d |
| Q5_1 | 32: d, m, 4 B, 16 B | int8 g32 + zero | q in 0..31 | d, m |
| Q5_K | 256: d, dmin, 12 B, 32 B high bits, 128 B | int8 g32 + zero | q | d * sc, -(dmin * m) |
| Q6_K | 256: 128 B low, 64 B high, 16 int8 sc, d | int8 g16 | q - 32 | d * sc |

Why the orders agree: gguf computes `d * (q - 8)` for Q4_0 and fmodel `q * d + (-8d)`; with d
a widened float16 (11 significant bits) and q < 16, both `q * d` and `8d` are exact in float32,
and so is their difference, so both give the exact product (only the sign of a zero can
differ: `d * 0` is -0.0 for a negative d, `8d - 8d` is +0.0). Q4_1 / Q5_1 compute `d * q + m`
either way; Q4_K / Q5_K compute `(d * sc) * q - dmin * m` in gguf and `q * (d * sc) + (-(dmin *
m))` here, and `a - b` is `a + (-b)` in IEEE arithmetic; Q8_0 / Q5_0 / Q6_K are one product.

Scale and zero dtypes, decided per tensor so that nothing is rounded: float16 where the file's
values are float16 themselves (Q4_1, Q8_0, Q5_0, Q5_1: d and m as stored; Q4_0: d and -8d,
which is exact in float16 unless it overflows float16's range, and then that tensor's scale
and zero are float32), so the kept state takes the file's 4 bytes per 32 weights for them;
float32 for the K-quants, whose `d * sc` products need float32's bits. A tensor's scale and
zero always share one dtype. Every consumer widens float16 exactly: the reference math
(`fmodel.models.quant_linear`) computes in float32, and `fmodel.kernels` takes float16 scales
and zeros as they are, so the numbers above are unchanged. Float16 scales are storage only:
the model still computes in float32 (`ModelState.dtype` leaves quantization entries out,
`QuantEmbedding` returns float32 rows for them).
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..errors import CorruptFileError
from ..models.quant_linear import Layout

__all__ = ["KEPT_FORMATS", "kept_layout", "release_mapped", "return_free_heap", "to_layout"]

QK_K = 256

INT4_G32 = Layout("int4", 32, True)
INT8_G32 = Layout("int8", 32, False)
INT8_G32_ZERO = Layout("int8", 32, True)
INT8_G16 = Layout("int8", 16, False)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] bytes (a slice, at an even offset, of blocks of an even byte size) -> [n, 1]
    float16: a view of the bytes (the caller's reshape copies it out)."""
    return b.view(torch.float16)


def _f32(b: torch.Tensor) -> torch.Tensor:
    """`_f16` widened to float32 (exact), for the K-quants' float32 products."""
    return _f16(b).to(torch.float32)


def _zero_q4_0(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0's (scale, zero) = (d, -8d) of float16 d [n, 1]: both float16 when every -8d is exact
    in float16 (it is unless |d| > 8188, where it overflows), else both float32 (exact there)."""
    wide = d.to(torch.float32) * -8  # exact: a power of two times a float16
    narrow = wide.to(torch.float16)
    back = narrow.to(torch.float32)
    if bool(((back == wide) | (back.isnan() & wide.isnan())).all()):
        return d, narrow
    return d.to(torch.float32), wide


def _repack(g: torch.Tensor) -> torch.Tensor:
    """Bytes [..., L] holding 2L 4-bit values, element i in the low nibble of byte i and L + i
    in the high one (ggml's order), -> fmodel's order [..., L]: elements 2k, 2k + 1 in the low /
    high nibble of byte k. Byte k < L/2 takes the low nibbles of bytes 2k and 2k + 1, byte
    L/2 + k their high nibbles."""
    even, odd = g[..., 0::2], g[..., 1::2]
    return torch.cat(((even & 0x0F) | ((odd & 0x0F) << 4), (even >> 4) | (odd & 0xF0)), dim=-1)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes of a 32-block -> [n, 32]: element j in the low nibble of byte j, j + 16 in the high one."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes (a little-endian uint32) -> [n, 32] bits, bit i for element i."""
    shifts = torch.arange(8, dtype=torch.uint8)
    bits = (qh[..., :, None] >> shifts) & 1  # [n, 4, 8]: byte b, bit k -> element 8b + k
    return bits.reshape(qh.shape[0], 32)


def _q4_0(b):
    return _repack(b[:, 2:18]), *_zero_q4_0(_f16(b[:, 0:2]))


def _q4_1(b):
    return _repack(b[:, 4:20]), _f16(b[:, 0:2]), _f16(b[:, 2:4])


def _q8_0(b):
    return b[:, 2:34].view(torch.int8), _f16(b[:, 0:2]), None


def _q5_0(b):
    q = _nibbles(b[:, 6:22]) | (_high_bits(b[:, 2:6]) << 4)
    return (q.to(torch.int16) - 16).to(torch.int8), _f16(b[:, 0:2]), None


def _q5_1(b):
    q = _nibbles(b[:, 8:24]) | (_high_bits(b[:, 4:8]) << 4)
    return q.view(torch.int8), _f16(b[:, 0:2]), _f16(b[:, 2:4])


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit minimums per super-block
    (`gguf.quants.Q4_K.get_scale_min`)."""
    s = scales.reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat((d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc.to(torch.float32), mn.to(torch.float32)


def _k_scales(b):
    """d * sc and -(dmin * m) [n, 8] of Q4_K / Q5_K super-blocks, in gguf's float32 order."""
    sc, mn = _scale_min_k4(b[:, 4:16])
    return _f32(b[:, 0:2]) * sc, -(_f32(b[:, 2:4]) * mn)


def _low_k(qs: torch.Tensor) -> torch.Tensor:
    """[n, 128] bytes -> [n, 8, 32]: chunk c's low nibbles are sub-block 2c, its high ones 2c + 1."""
    chunks = qs.reshape(-1, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)
    return (chunks & 0x0F).reshape(-1, 8, 32)


def _q4_k(b):
    scale, zero = _k_scales(b)
    return _repack(b[:, 16:144].reshape(-1, 4, 32)).reshape(-1, QK_K // 2), scale, zero


def _q5_k(b):
    scale, zero = _k_scales(b)
    qh = b[:, 16:48].reshape(-1, 1, 1, 32) >> torch.arange(8, dtype=torch.uint8).reshape(1, 1, 8, 1)
    q = _low_k(b[:, 48:176]) | ((qh & 1).reshape(-1, 8, 32) << 4)
    return q.reshape(-1, QK_K).view(torch.int8), scale, zero


def _q6_k(b):
    ql = b[:, 0:128].reshape(-1, 2, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)
    ql = (ql & 0x0F).reshape(-1, 8, 32)
    qh = b[:, 128:192].reshape(-1, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(
        1, 1, 4, 1
    )
    qh = (qh & 0x03).reshape(-1, 8, 32)
    q = ((ql | (qh << 4)).to(torch.int16) - 32).to(torch.int8).reshape(-1, QK_K)
    sc = b[:, 192:208].view(torch.int8).to(torch.float32)
    return q, _f32(b[:, 208:210]) * sc, None


# format -> (layout, block bytes, values per block, unpack: blocks [n, bytes] uint8 ->
# (values: int8 [n, per block], or int4 packed in fmodel's order [n, per block / 2] uint8;
# scale [n, groups per block]; zero or None; float16 or float32, see the module docstring))
KEPT_FORMATS: dict[str, tuple[Layout, int, int, Callable]] = {
    "Q4_0": (INT4_G32, 18, 32, _q4_0),
    "Q4_1": (INT4_G32, 20, 32, _q4_1),
    "Q4_K": (INT4_G32, 144, QK_K, _q4_k),
    "Q8_0": (INT8_G32, 34, 32, _q8_0),
    "Q5_0": (INT8_G32, 22, 32, _q5_0),
    "Q5_1": (INT8_G32_ZERO, 24, 32, _q5_1),
    "Q5_K": (INT8_G32_ZERO, 176, QK_K, _q5_k),
    "Q6_K": (INT8_G16, 210, QK_K, _q6_k),
}


def kept_layout(t: Any) -> Layout | None:
    """The layout a 2-D GGUF tensor keeps with `quantized=True`, or None (it is dequantized)."""
    entry = KEPT_FORMATS.get(t.tensor_type.name)
    return entry[0] if entry is not None and len(t.shape) == 2 else None


def _raw(t: Any) -> torch.Tensor:
    with warnings.catch_warnings():  # the mapped file is read-only; the bytes are only read
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(t.data, dtype=np.uint8).reshape(-1))


def to_layout(t: Any, path: str) -> tuple[Layout, dict[str, torch.Tensor]]:
    """A kept-format 2-D tensor (`kept_layout`) as new tensors of its fmodel layout.

    Returns:
        (layout, {"weight_int4" or "weight_int8": values, "weight_scale": [out, G],
        "weight_zero": [out, G] where the layout has one}), rows in the file's order (values:
        int4 packed [out, in / 2] uint8, int8 [out, in]; scale and zero of one dtype: float16
        for Q4_1, Q8_0, Q5_0, Q5_1 and Q4_0 unless its -8d overflows float16, else float32;
        see the module docstring). New tensors: the file's mapping is only read.

    Raises:
        CorruptFileError: data that does not fill whole blocks of the shape.
    """
    layout, block_bytes, per_block, unpack = KEPT_FORMATS[t.tensor_type.name]
    out, cols = (int(n) for n in reversed(t.shape.tolist()))
    raw = _raw(t)
    if cols % per_block or raw.numel() != out * (cols // per_block) * block_bytes:
        raise CorruptFileError(
            f"{path}: tensor {t.name!r} ({t.tensor_type.name}) holds {raw.numel()} bytes, expected "
            f"{out * (cols // per_block) * block_bytes} for shape {[out, cols]} in blocks of {per_block}"
        )
    q, scale, zero = unpack(raw.view(-1, block_bytes))
    groups = cols // layout.group_size
    mapped = raw.untyped_storage().data_ptr()

    def own(x: torch.Tensor, *shape: int) -> torch.Tensor:
        # a view of the mapped bytes may already be contiguous (a single block): copy it out
        x = x.reshape(*shape).contiguous()
        return x.clone() if x.untyped_storage().data_ptr() == mapped else x

    parts = {"weight_scale": own(scale, out, groups)}
    if zero is not None:
        parts["weight_zero"] = own(zero, out, groups)
    if layout.scheme == "int4":
        parts = {"weight_int4": own(q, out, cols // 2), **parts}
    else:
        parts = {"weight_int8": own(q, out, cols), **parts}
    return layout, parts


_FAULT_AROUND = 64 * 1024


def release_mapping(data: Any) -> None:
    """`release_mapped` for the whole file that `data` (a numpy view of an `np.memmap`) maps: the
    loader's last word, for pages the OS read ahead or mapped around reads beyond the windows
    `release_mapped` covers (which depends on the page cache and the readahead state)."""
    mapping = getattr(data, "_mmap", None)
    if isinstance(mapping, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mapping.madvise(mmap.MADV_DONTNEED, 0, len(mapping))
        except (OSError, ValueError):  # a closed mapping, or an OS that refuses: only memory is at stake
            return


def release_mapped(data: Any) -> None:
    """Drop this process's resident pages of `data`, a numpy view of a file mapped read-only
    by `np.memmap` (a GGUF tensor's `data`), once it has been copied out. The pages stay in the
    OS's page cache and a later read maps them again, so nothing changes but the resident
    size: a load that copies tensor after tensor out of the mapping then holds about its
    result, not its result plus the whole file. Any other array (not mapped, or where numpy
    or the OS offers no `madvise`) is left alone."""
    mapping = getattr(data, "_mmap", None)  # np.memmap and its views hold the mmap.mmap
    if not isinstance(mapping, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
        return
    try:
        origin = np.frombuffer(mapping, dtype=np.uint8).__array_interface__["data"][0]
        start = data.__array_interface__["data"][0] - origin
        # Reading a page maps its neighbours too (Linux's fault-around, 64 KiB by default):
        # pages of the tensors before and after, which their own release may already have
        # passed. Dropping those as well costs nothing: a later read maps them again.
        first = max(0, start - _FAULT_AROUND)
        first -= first % mmap.PAGESIZE
        end = min(start + data.nbytes + _FAULT_AROUND, len(mapping))
        if start >= 0 and end > first:
            mapping.madvise(mmap.MADV_DONTNEED, first, end - first)
    except (OSError, ValueError):  # a closed mapping, or an OS that refuses: only memory is at stake
        return


@functools.cache
def _glibc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # musl or another C library: nothing to trim
        return None


def return_free_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's `malloc_trim(0)`), after a load that
    re-laid thousands of small blocks out: their freed temporaries (~8 MB for SmolLM2) would
    otherwise stay resident beside the kept tensors. A no-op off glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
