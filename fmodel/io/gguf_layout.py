"""The data section of a GGUF file checked against its tensor table, then mapped tensor by tensor.

Every tensor's type id must be a ggml type, its first dimension a whole number of blocks, its
offset aligned and inside the data section, its bytes (from the type's block size and the shape,
`gguf.GGML_QUANT_SIZES`) inside the file; no two tensors may overlap. Every writer of GGUF files
(llama.cpp's `gguf_write`, `gguf.GGUFWriter`) packs the tensors one after the other, each padded
to the alignment, so a hole in the data section means a tensor's offset, type or shape is not the
one it was written with (a type changed from F32 to F16 halves the tensor's bytes and leaves a
hole behind it): holes are refused too. What no reader can see is a change of data bytes, or a
swap between two types of the same block size (F16 <-> BF16, Q4_0 <-> IQ4_NL, Q3_K <-> IQ3_S).
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import numpy as np

from ..errors import CorruptFileError
from .gguf_parse import GGUFHeader, TensorInfo

__all__ = ["GGUFTensor", "map_tensors"]


@attrs.frozen(eq=False)
class GGUFTensor:
    """One tensor of a GGUF file, its data a read-only view of the mapped file.

    The attribute names are those of `gguf.ReaderTensor`, so code written for GGUFReader reads it.

    Attributes:
        name: the GGUF tensor name.
        tensor_type: its `gguf.GGMLQuantizationType`.
        shape: the dimensions in ggml order (fastest first), a uint64 numpy array.
        n_elements: the number of values.
        n_bytes: the bytes of its data.
        data_offset: where its data starts in the file.
        data: the mapped data: float32/float16/float64/int values in numpy order for plain
            types, uint8 blocks (rows of whole blocks) for quantized types and BF16.
    """

    name: str
    tensor_type: Any
    shape: np.ndarray
    n_elements: int
    n_bytes: int
    data_offset: int
    data: np.ndarray = attrs.field(repr=False)


_PLAIN = {"F32": np.float32, "F16": np.float16, "F64": np.float64}
_INTS = {"I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64}


def _describe(path: str, t: TensorInfo, qtype: Any, nbytes: int, header: GGUFHeader) -> str:
    return (
        f"{path} ({header.file_size} bytes): tensor {t.name!r} ({qtype.name}, ggml shape {list(t.dims)}, "
        f"{nbytes} bytes) at data offset {t.offset}"
    )


def _sizes(header: GGUFHeader, path: str, gguf: Any) -> list[tuple[TensorInfo, Any, int, int]]:
    """(info, type, elements, bytes) per tensor, each type, shape and range checked."""
    out = []
    end_of_file = header.file_size - header.data_offset
    for t in header.tensors:
        try:
            qtype = gguf.GGMLQuantizationType(t.type_id)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            known = ", ".join(f"{q.name}={q.value}" for q in gguf.GGML_QUANT_SIZES)
            raise CorruptFileError(
                f"{path}: tensor {t.name!r} (at data offset {t.offset}) has type id {t.type_id}, not a "
                f"ggml tensor type; known: {known}"
            ) from None
        if t.dims[0] % block:
            raise CorruptFileError(
                f"{path}: tensor {t.name!r} ({qtype.name}) has rows of {t.dims[0]} values, not a whole "
                f"number of {qtype.name} blocks of {block}"
            )
        n = math.prod(t.dims)
        nbytes = n // block * type_size
        if t.offset % header.alignment:
            raise CorruptFileError(
                f"{_describe(path, t, qtype, nbytes, header)}: the offset is not a multiple of the file's "
                f"alignment {header.alignment}"
            )
        if t.offset > end_of_file or nbytes > end_of_file - t.offset:
            raise CorruptFileError(
                f"{_describe(path, t, qtype, nbytes, header)}: it would end at byte {header.data_offset + t.offset + nbytes} "
                f"of the file, but the file has {header.file_size} bytes (data section from byte "
                f"{header.data_offset}): a truncated file or a wrong offset, type or shape"
            )
        out.append((t, qtype, n, nbytes))
    return out


def _check_packing(header: GGUFHeader, path: str, sized: list) -> None:
    """No overlaps, no holes between tensors, nothing but padding after the last one."""
    align = header.alignment
    ordered = sorted(sized, key=lambda s: s[0].offset)
    at, prev = 0, None
    for t, qtype, _, nbytes in ordered:  # overlaps first: they name the moved tensor
        if t.offset < at:
            raise CorruptFileError(
                f"{_describe(path, t, qtype, nbytes, header)} overlaps tensor {prev!r}, which ends at data "
                f"offset {at}"
            )
        at, prev = t.offset + nbytes, t.name
    at, prev = 0, None
    for t, qtype, _, nbytes in ordered:
        if t.offset - at >= align or (prev is None and t.offset):
            after = (
                f"after tensor {prev!r} (which ends at data offset {at})"
                if prev
                else "at the start of the data section"
            )
            raise CorruptFileError(
                f"{_describe(path, t, qtype, nbytes, header)}: there are {t.offset - at} unused bytes {after}; "
                "GGUF writers pack tensors back to back, so an offset, type or shape was changed"
            )
        at, prev = -(-(t.offset + nbytes) // align) * align, t.name
    tail = header.file_size - header.data_offset - at
    if sized and tail >= align:
        raise CorruptFileError(
            f"{path}: {tail} bytes follow the last tensor {prev!r} (which ends at data offset {at}; file size "
            f"{header.file_size} bytes): a tensor's type or shape declares fewer bytes than were written"
        )


def map_tensors(header: GGUFHeader, path: str, gguf: Any) -> tuple[GGUFTensor, ...]:
    """Check the tensor table of `header` against the file and map every tensor's data.

    Arguments:
        header: from `fmodel.io.gguf_parse.parse_header(path)`.
        path: the file.
        gguf: the `gguf` package (for the type table and the quantized byte shapes).

    Returns:
        The tensors in file order; their data is memory-mapped, not read.

    Raises:
        CorruptFileError: an unknown type id, a row that is not whole blocks, a misaligned
            offset, a tensor past the end of the file, overlapping tensors, or holes in the data
            section; names the tensor, its type, shape, offset and byte size and the file size.
    """
    sized = _sizes(header, path, gguf)
    _check_packing(header, path, sized)
    if not sized:
        return ()
    data = np.memmap(path, mode="r")
    tensors = []
    for t, qtype, n, nbytes in sized:
        start = header.data_offset + t.offset
        np_dims = tuple(reversed(t.dims))
        raw = data[start : start + nbytes]
        item = _PLAIN.get(qtype.name) or _INTS.get(qtype.name)
        if item is not None:
            view = raw.view(item).reshape(np_dims)
        else:
            view = raw.reshape(gguf.quants.quant_shape_to_byte_shape(np_dims, qtype))
        shape = np.array(t.dims, dtype=np.uint64)
        tensors.append(GGUFTensor(t.name, qtype, shape, n, nbytes, start, view))
    return tuple(tensors)
