"""The GGUF format layer: read a file's header and tensor table, checked, and dequantize tensors.

The header is parsed by `fmodel.io.gguf_parse` (every count and length bounded by the file) and
the tensor table checked against the data section by `fmodel.io.gguf_layout`; `gguf` (the
package maintained with llama.cpp, an optional dependency imported on first use) gives the type
table and dequantizes. Mapping the tensors to a model is `fmodel.io.gguf`'s business.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import attrs
import torch

from .._frozen import FrozenDict
from ..errors import CheckpointError
from .gguf_layout import GGUFTensor, map_tensors
from .gguf_parse import StringArray, parse_header

__all__ = [
    "GGUF_MAGIC",
    "INSTALL_HINT",
    "GGUFFile",
    "GGUFTensor",
    "check_tensor_types",
    "dequantize",
    "is_gguf_file",
    "read_gguf",
]

INSTALL_HINT = "pip install 'fmodel[gguf]'"
GGUF_MAGIC = b"GGUF"


def _gguf() -> Any:
    """The `gguf` package, imported on first use (it is an optional dependency)."""
    try:
        import gguf
    except ImportError:
        raise ImportError(
            f"reading GGUF files needs the `gguf` package (the reader maintained with llama.cpp): {INSTALL_HINT}"
        ) from None
    return gguf


@attrs.frozen(eq=False, repr=False)
class GGUFFile:
    """The parsed header of a GGUF file: metadata and tensor descriptions (data stays mapped).

    Attributes:
        path: the file.
        metadata: read-only {key: value}: str, int, float, bool, or a list of them; an array
            of strings (`tokenizer.ggml.tokens`) is a `StringArray`, a read-only sequence of
            str decoded on first use, which `get(key, list)` accepts as a list.
        tensors: `GGUFTensor`s (name, tensor_type, shape, memory-mapped data; the attributes of
            gguf's `ReaderTensor`) in file order, checked against the file by `read_gguf`.
    """

    path: str
    metadata: FrozenDict
    tensors: tuple[GGUFTensor, ...]

    @property
    def architecture(self) -> str:
        """`general.architecture`, e.g. "llama"."""
        return self.get("general.architecture", str, required=True)

    def get(
        self, key: str, kind: type | tuple[type, ...] = object, *, required: bool = False, default: Any = None
    ):
        """The metadata value under `key`, checked to be of `kind`.

        Raises:
            CheckpointError: the key is absent (when `required`) or holds another type (an
                integer is not a float, a bool is neither); names the file, the key, what was
                found and what was expected.
        """
        if key not in self.metadata:
            if required:
                raise CheckpointError(f"{self.path}: GGUF metadata key {key!r} is missing")
            return default
        value = self.metadata[key]
        accepted = (list, StringArray) if kind is list else kind
        if isinstance(value, bool) and kind in (int, float):
            value = None  # a bool is not a count
        # An integer where a float belongs is refused, as llama.cpp's loader refuses it: a
        # FLOAT32 field whose type id was changed to UINT32 would otherwise read its bits as a
        # (huge) number.
        if value is None or not isinstance(value, accepted):
            want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise CheckpointError(
                f"{self.path}: GGUF metadata key {key!r} holds {self.metadata[key]!r}, expected {want}"
            )
        return value

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, {self.metadata.get('general.architecture')!r}, {len(self.tensors)} tensors)"


def is_gguf_file(path: str | os.PathLike) -> bool:
    """True when `path` is a file that starts with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's header (metadata and tensor table); tensor data stays memory-mapped.

    Arguments:
        path: a .gguf file.

    Returns:
        A `GGUFFile`; pass it to `load_gguf` or `fmodel.tokenizer.Tokenizer.from_gguf` to read the
        file's header once for both.

    Raises:
        CorruptFileError: a header that contradicts itself or the file: counts or lengths past
            the end, an unknown value or tensor type, tensor offsets misaligned, outside the data
            section, overlapping or leaving holes; names the file, the key or tensor, the offset,
            the size and the file size.
        CheckpointError: not a file, not a GGUF file, or a GGUF version other than 2 and 3.
        ImportError: the `gguf` package is not installed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such GGUF file")
    if not is_gguf_file(path):
        raise CheckpointError(
            f"{path}: not a GGUF file (it does not start with the magic bytes {GGUF_MAGIC!r})"
        )
    gguf = _gguf()
    header = parse_header(path)
    return GGUFFile(path, FrozenDict(header.metadata), map_tensors(header, path, gguf))


_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


def check_tensor_types(file: GGUFFile) -> None:
    """Fail before any dequantization if a tensor's type cannot be read as weights.

    Raises:
        CheckpointError: names the file, the tensor, its type and the readable types.
    """
    gguf = _gguf()
    traits = getattr(gguf.quants, "_type_traits", None)  # the types gguf.quants can dequantize
    if traits is None:  # another gguf version: let dequantize() say what it cannot read
        return
    for t in file.tensors:
        qtype = t.tensor_type
        if qtype.name in _FLOAT_TYPES or qtype in traits:
            continue
        supported = sorted({*_FLOAT_TYPES, *(q.name for q in traits)})
        raise CheckpointError(
            f"{file.path}: tensor {t.name!r} has type {qtype.name}, which gguf {_gguf_version()} cannot "
            f"dequantize; readable types: {', '.join(supported)}"
        )


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "(unknown version)"


def dequantize(t: Any, file: GGUFFile) -> torch.Tensor:
    """Tensor `t` of `file` as a new float32 torch tensor in row-major shape (ggml's reversed).

    Raises:
        CheckpointError: a type gguf cannot dequantize, or data that does not fill the shape.
    """
    gguf = _gguf()
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # ggml lists dimensions fastest first
    if _torch_dequantizable(t):
        return _dequantize_blocks_torch(t).reshape(shape)
    try:
        if t.tensor_type.name == "F64":
            array = t.data.view("float64").astype("float32")
        else:
            array = gguf.quants.dequantize(t.data, t.tensor_type)
    except (NotImplementedError, ValueError) as exc:
        raise CheckpointError(
            f"{file.path}: tensor {t.name!r} ({t.tensor_type.name}) could not be dequantized: {exc}"
        ) from None
    if array.size != int(t.n_elements):
        raise CheckpointError(
            f"{file.path}: tensor {t.name!r} ({t.tensor_type.name}) holds {array.size} values, "
            f"expected {int(t.n_elements)} for shape {list(shape)}"
        )
    if not array.flags.writeable:  # F32 data is a read-only view of the mapped file
        array = array.copy()
    return torch.from_numpy(array.reshape(shape))


# (block bytes, values per block) of the types `_dequantize_blocks_torch` handles
_TORCH_BLOCKS = {"Q4_1": (20, 32), "Q8_0": (34, 32)}


def _torch_dequantizable(t: Any) -> bool:
    """`t` is Q4_1 / Q8_0 data filling whole blocks of its shape (anything else, malformed data
    included, goes through gguf.quants, whose errors the caller names)."""
    layout = _TORCH_BLOCKS.get(t.tensor_type.name)
    if layout is None:
        return False
    block_bytes, per_block = layout
    size = int(t.data.nbytes)
    return size % block_bytes == 0 and size // block_bytes * per_block == int(t.n_elements)


def _dequantize_blocks_torch(t: Any) -> torch.Tensor:
    """Q4_1 / Q8_0 data (`_torch_dequantizable`) as float32 [n_values], computed by torch with
    gguf.quants' operations in the same order (fp16 scales widened to float32, then `q * d + m` /
    `d * q`), so bit-equal to `gguf.quants.dequantize`, about 3x faster (the demo's start-up spent
    ~0.7 s there)."""
    import numpy as np

    block_bytes, _ = _TORCH_BLOCKS[t.tensor_type.name]
    with warnings.catch_warnings():  # the mapped file is read-only; the bytes are only read
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.from_numpy(np.asarray(t.data, dtype=np.uint8).reshape(-1))
    blocks = raw.view(-1, block_bytes)
    d = blocks[:, 0:2].contiguous().view(torch.float16).to(torch.float32)  # [n, 1]
    if t.tensor_type.name == "Q8_0":
        q = blocks[:, 2:].contiguous().view(torch.int8).to(torch.float32)
        return (d * q).reshape(-1)
    m = blocks[:, 2:4].contiguous().view(torch.float16).to(torch.float32)
    qs = blocks[:, 4:]  # [n, 16]: element j in the low nibble of byte j, j + 16 in the high one
    q = torch.cat((qs & 0x0F, qs >> 4), dim=1).to(torch.float32)
    return ((d * q) + m).reshape(-1)
