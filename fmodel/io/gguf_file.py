"""The GGUF format layer: parse a file's header with `gguf.GGUFReader` and dequantize its tensors.

`gguf` (the reader maintained with llama.cpp) is an optional dependency, imported on first use.
Mapping the tensors to a model is `fmodel.io.gguf`'s business.
"""

from __future__ import annotations

import os
from typing import Any

import attrs
import torch

from .._frozen import FrozenDict
from ..errors import CheckpointError

__all__ = [
    "GGUF_MAGIC",
    "INSTALL_HINT",
    "GGUFFile",
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
        metadata: read-only {key: value}: str, int, float, bool, or a list of them
            (`tokenizer.ggml.tokens` is a list of str).
        tensors: gguf's `ReaderTensor`s (name, tensor_type, shape, memory-mapped data) in file order.
    """

    path: str
    metadata: FrozenDict
    tensors: tuple[Any, ...]

    @property
    def architecture(self) -> str:
        """`general.architecture`, e.g. "llama"."""
        return self.get("general.architecture", str, required=True)

    def get(
        self, key: str, kind: type | tuple[type, ...] = object, *, required: bool = False, default: Any = None
    ):
        """The metadata value under `key`, checked to be of `kind`.

        Raises:
            CheckpointError: the key is absent (when `required`) or holds another type;
                names the file, the key, what was found and what was expected.
        """
        if key not in self.metadata:
            if required:
                raise CheckpointError(f"{self.path}: GGUF metadata key {key!r} is missing")
            return default
        value = self.metadata[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is int and isinstance(value, bool):
            value = None  # a bool is not a count
        if value is None or not isinstance(value, kind):
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
        CheckpointError: not a file, or not a GGUF file (wrong magic, unsupported version, corrupt).
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
    try:
        reader = gguf.GGUFReader(path, "r")
        metadata = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):  # header bookkeeping (version, counts), not metadata
                continue
            metadata[key] = field.contents()
    except (ValueError, KeyError, IndexError, OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    return GGUFFile(path, FrozenDict(metadata), tuple(reader.tensors))


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
