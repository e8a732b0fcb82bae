"""Read the weights of a Flax checkpoint written by Transformers (`flax_model.msgpack`, or the
shards of `flax_model.msgpack.index.json`) with msgpack alone: no JAX, no Flax.

The format is `flax.serialization.to_bytes(params)`: a msgpack map of maps (parameter names as
keys) whose leaves are msgpack extension values, type 1 (an ndarray) or 3 (a numpy scalar),
each holding a nested msgpack triple (shape, dtype name, raw C-order bytes); arrays over 1 GiB
are split into `{"__msgpack_chunked_array__": True, "shape": {...}, "chunks": {...}}`.

The reader decodes exactly that and refuses everything else: map keys must be strings
(`strict_map_key`), the extension hook knows only types 1 and 3 and builds nothing but a
tensor from a checked (shape, dtype, byte count), the dtype is one of a fixed list of numeric
names, and the byte count must equal what the shape declares. Any other leaf (a number, a
string, a list, an unknown extension) is an error, not data passed on. The file is
memory-mapped while it is decoded, so the peak is about one copy of the weights.
"""

from __future__ import annotations

import math
import mmap
import os

import torch

from .._limits import check_allocation
from ..errors import CorruptFileError, FModelError

__all__ = ["read_flax_msgpack"]

_DTYPES = {
    b"float32": torch.float32,
    b"float16": torch.float16,
    b"bfloat16": torch.bfloat16,
    b"float64": torch.float64,
    b"int8": torch.int8,
    b"int16": torch.int16,
    b"int32": torch.int32,
    b"int64": torch.int64,
    b"uint8": torch.uint8,
    b"bool": torch.bool,
}
_NDARRAY, _NATIVE_COMPLEX, _NPSCALAR = 1, 2, 3
_MAX_NDIM = 8
_CHUNKED = "__msgpack_chunked_array__"


class _Refused(ValueError):
    """Raised inside the msgpack hook; turned into a CorruptFileError naming the file."""


def _msgpack():
    from .legacy import require

    return require("msgpack")


def _array(msgpack, data: bytes) -> torch.Tensor:
    try:
        triple = msgpack.unpackb(data, raw=True, strict_map_key=True, use_list=True)
    except Exception as exc:
        raise _Refused(f"an array record that is not msgpack ({type(exc).__name__})") from None
    if not isinstance(triple, list) or len(triple) != 3:
        raise _Refused(f"an array record that is not (shape, dtype, bytes): {type(triple).__name__}")
    shape, dtype_name, buffer = triple
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise _Refused(f"an array shape that is not a list of at most {_MAX_NDIM} sizes: {str(shape)[:80]}")
    dtype = _DTYPES.get(dtype_name) if isinstance(dtype_name, bytes) else None
    if dtype is None:
        raise _Refused(
            f"an array dtype {str(dtype_name)[:40]}; expected one of {[d.decode() for d in _DTYPES]}"
        )
    if not isinstance(buffer, bytes):
        raise _Refused(f"array data of type {type(buffer).__name__}; expected bytes")
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = math.prod(shape)
    if numel * itemsize != len(buffer):
        raise _Refused(
            f"an array of shape {shape} and dtype {dtype_name.decode()} ({numel * itemsize} bytes) "
            f"holding {len(buffer)} bytes"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    # bytearray: a private, writable copy (a bytes object may be shared by the interpreter)
    return torch.frombuffer(bytearray(buffer), dtype=dtype).reshape(shape)


def _hook(msgpack):
    def ext_hook(code: int, data: bytes):
        if code == _NDARRAY:
            return _array(msgpack, data)
        if code == _NPSCALAR:
            tensor = _array(msgpack, data)
            if tensor.ndim != 0:
                raise _Refused(f"a numpy scalar record of shape {list(tensor.shape)}")
            return tensor
        kind = "a complex number" if code == _NATIVE_COMPLEX else f"msgpack extension type {code}"
        raise _Refused(f"{kind}, which is not a weight")

    return ext_hook


def _unchunk(value: dict, where: str) -> torch.Tensor:
    """flax.serialization's `_unchunk`: {"shape": {"0": n, ...}, "chunks": {"0": tensor, ...}}."""
    shape, chunks = value.get("shape"), value.get("chunks")
    if (
        set(value) != {_CHUNKED, "shape", "chunks"}
        or not isinstance(shape, dict)
        or not isinstance(chunks, dict)
    ):
        raise _Refused(f"{where}: a chunked array without exactly 'shape' and 'chunks' maps")
    try:
        dims = [shape[str(i)] for i in range(len(shape))]
        parts = [chunks[str(i)] for i in range(len(chunks))]
    except KeyError:
        raise _Refused(f"{where}: a chunked array whose keys are not 0, 1, 2, ...") from None
    if (
        not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims)
        or len(dims) > _MAX_NDIM
    ):
        raise _Refused(f"{where}: a chunked array with shape {dims[:10]}")
    if not parts or not all(isinstance(p, torch.Tensor) and p.ndim == 1 for p in parts):
        raise _Refused(f"{where}: a chunked array whose chunks are not 1-D arrays")
    if len({p.dtype for p in parts}) != 1 or sum(p.numel() for p in parts) != math.prod(dims):
        raise _Refused(f"{where}: chunks that do not make one array of shape {dims}")
    return torch.cat(parts).reshape(dims)


def _flatten(tree: dict, prefix: tuple[str, ...], out: dict[tuple[str, ...], torch.Tensor]) -> None:
    for key, value in tree.items():
        if not isinstance(key, str) or not key:
            raise _Refused(f"a parameter name {key!r}; expected a non-empty string")
        path = (*prefix, key)
        if isinstance(value, dict) and _CHUNKED in value:
            value = _unchunk(value, "/".join(path))
        if isinstance(value, dict):
            if not value:
                continue  # an empty module (Flax writes {} for a layer without parameters)
            _flatten(value, path, out)
        elif isinstance(value, torch.Tensor):
            out[path] = value
        else:
            raise _Refused(
                f"{'/'.join(path)} holds a {type(value).__name__}; expected an array or a map of them"
            )


def read_flax_msgpack(path: str) -> dict[tuple[str, ...], torch.Tensor]:
    """The flattened parameters of one Flax msgpack file: {("bert", "embeddings", ...): tensor}.

    Raises:
        CorruptFileError: not msgpack, truncated, extra bytes after the map, a top level that is
            not a map, a leaf that is not an array, an unknown dtype or extension type, an array
            whose byte count contradicts its shape.
        SizeLimitError: the file is larger than the machine's memory.
        MissingDependencyError: msgpack is not installed.
    """
    msgpack = _msgpack()
    size = os.path.getsize(path)
    check_allocation(size, what=f"{path}: a Flax msgpack file of {size} bytes")
    try:
        with open(path, "rb") as f:
            if size == 0:
                raise _Refused("an empty file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
                tree = msgpack.unpackb(
                    view, raw=False, strict_map_key=True, ext_hook=_hook(msgpack), use_list=True
                )
        if not isinstance(tree, dict):
            raise _Refused(f"a top level of type {type(tree).__name__}; expected a map of parameters")
        out: dict[tuple[str, ...], torch.Tensor] = {}
        _flatten(tree, (), out)
        return out
    except FModelError:
        raise
    except _Refused as exc:
        raise CorruptFileError(f"{path}: not a Flax weights file: {exc}") from None
    except (ValueError, TypeError, UnicodeDecodeError, OverflowError, RecursionError, MemoryError) as exc:
        raise CorruptFileError(
            f"{path}: not a readable Flax msgpack file ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    except Exception as exc:  # msgpack's own errors (FormatError, StackError, ExtraData, ...)
        if exc.__class__.__module__.split(".")[0] != "msgpack":
            raise
        raise CorruptFileError(
            f"{path}: not a readable Flax msgpack file ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
