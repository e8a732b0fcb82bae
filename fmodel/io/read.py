"""Read the tensors of a checkpoint's weight files: memory-mapped and without copies, or (with
`mmap=False`) copied into the process's own memory, one tensor at a time.

Every way a weight file can be bad ends in a `CheckpointError` naming the file: a
safetensors header that the format's parser refuses (offsets, sizes, dtype names, header
length are all checked by `safetensors` before any tensor is made), a pickle that holds more
than tensors (read with `weights_only=True`: no code from a checkpoint ever runs), a
truncated or damaged zip, a payload that is not a {str: tensor} dict, and a shard index that
disagrees with its shards. Tensor *values* are never scanned (that would cost a pass over
every weight); a flipped data byte loads as a different number, as it would anywhere.
"""

from __future__ import annotations

import ctypes
import functools
import pickle
import sys
from mmap import PAGESIZE

import torch

from ..errors import CheckpointError
from .resolve import CheckpointFiles
from .shard_index import read_weight_map

__all__ = ["read_tensors", "read_weight_file"]


def _read_safetensors(path: str, mmap: bool = True) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        # safetensors maps the file copy-on-write: tensors cost no RAM until touched, and
        # writing into one never reaches the file.
        with safe_open(path, framework="pt", device="cpu") as f:
            if mmap:
                return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
            return {key: owned_copy(f.get_tensor(key)) for key in f.keys()}  # noqa: SIM118
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    except Exception as exc:  # safetensors_rust.SafetensorError does not derive from the above
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})"
        ) from None


def _torch_load(path: str, mmap: bool = True):
    if not mmap:  # read into memory
        return torch.load(path, map_location="cpu", weights_only=True)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format


def _read_pickle(path: str, mmap: bool = True) -> dict[str, torch.Tensor]:
    try:
        data = _torch_load(path, mmap)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to unpickle: the file holds more than tensors and fmodel never runs code "
            f"from a checkpoint (weights_only=True). Convert it to safetensors. Detail: {exc}"
        ) from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None
    except (MemoryError, RecursionError) as exc:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: it declares more than can be read)"
        ) from None
    except Exception as exc:  # damaged pickles raise anything: ValueError, KeyError, struct.error, ...
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    _check_state_dict(path, data)
    return data


def _check_state_dict(path: str, data: object) -> None:
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state_dict), got {type(data).__name__}")
    for key, value in data.items():
        if not isinstance(key, str):
            raise CheckpointError(
                f"{path}: expected a dict of tensors (a state_dict) keyed by tensor names, "
                f"got key {key!r} ({type(key).__name__})"
            )
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: expected a dict of tensors (a state_dict), got {type(value).__name__} for {key!r}"
            )
        if value.layout != torch.strided:
            raise CheckpointError(
                f"{path}: tensor {key!r} is {value.layout}; expected a dense (strided) tensor"
            )


def read_weight_file(path: str, mmap: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of one weight file: safetensors or a pickled state dict (`weights_only=True`),
    chosen by its extension; memory-mapped, or with `mmap=False` read into process memory.

    Raises:
        CheckpointError: the file cannot be read or holds more than a {str: tensor} dict.
    """
    return (_read_safetensors if str(path).endswith(".safetensors") else _read_pickle)(str(path), mmap)


def read_tensors(files: CheckpointFiles, mmap: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of the checkpoint and, for each name, the file it came from.

    `mmap=True`: safetensors and pickle (zip) files stay memory-mapped, tensors are views of the
    file's pages. `mmap=False`: each tensor is copied into memory the process owns (see
    `owned_copy`); the legacy TF / Flax readers copy what they convert either way.

    A sharded checkpoint's index must agree with its shards exactly: each tensor it lists is
    in the shard it names, and each shard tensor is listed.

    Raises:
        CheckpointError: unreadable file, a name in two shards, or an index that disagrees
            with its shards (tensors no shard holds, tensors in another shard than listed,
            shard tensors the index does not list), each named.
    """
    if files.format in ("tf", "flax", "tf-safetensors", "flax-safetensors"):  # fmodel.io.legacy
        from .legacy import read_legacy_tensors

        return read_legacy_tensors(files)
    reader = _read_safetensors if files.format == "safetensors" else _read_pickle
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for path in files.weights:
        for name, tensor in reader(path, mmap).items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} appears in two shards: {origin[name]} and {path}")
            tensors[name] = tensor
            origin[name] = path
    if files.index is not None:
        _check_index_against_shards(files.index, read_weight_map(files.index), origin)
    return tensors, origin


def owned_copy(mapped: torch.Tensor) -> torch.Tensor:
    """A copy of a file-mapped tensor in the process's own (anonymous) memory; the mapped pages
    it was copied from are dropped from this process's mapping (`madvise(MADV_DONTNEED)`; they
    stay in the OS page cache), so a copying load peaks at the model's size plus one tensor,
    not twice the model. Only for a tensor the loader just read: were `mapped` a private
    mapping someone had written into, dropping its pages would bring back the file's bytes
    (the copy keeps the written ones); so it is not part of the module's public names.

    Why copy at all: measured on this project's AMD EPYC (Zen 5) VM, SmolLM2-135M float32, one
    thread, the compiled decode step read its 538 MB of weights in 14.9 ms from anonymous
    memory against 16.2 ms from the safetensors mapping of the same file (page-cache pages,
    mostly mapped 4 KiB at a time). Pure for the caller: the file is only read.
    """
    copy = mapped.clone()
    _drop_mapped_pages(mapped)
    return copy


def _drop_mapped_pages(t: torch.Tensor) -> None:
    """Drop the whole pages inside `t`'s bytes from this process's mapping of the file. Only
    ever called on a clean, read-only-in-practice private file mapping (nothing wrote to it), so
    a later touch reads the same bytes back from the file; a no-op where madvise is missing."""
    libc = _libc()
    if libc is None or t.numel() == 0:
        return
    page = PAGESIZE
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


_MADV_DONTNEED = 4  # Linux


@functools.cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        return libc
    except (OSError, AttributeError):
        return None


def _check_index_against_shards(index: str, weight_map: dict[str, str], origin: dict[str, str]) -> None:
    absent = sorted(set(weight_map) - set(origin))
    if absent:
        raise CheckpointError(f"{index}: lists tensors that no shard holds: {absent[:10]}")
    unlisted = sorted(set(origin) - set(weight_map))
    if unlisted:
        raise CheckpointError(
            f"{index}: shards hold tensors the index does not list: "
            + ", ".join(f"{n!r} (in {origin[n]})" for n in unlisted[:10])
        )
    elsewhere = sorted(n for n, shard in weight_map.items() if not _same_file(origin[n], shard))
    if elsewhere:
        raise CheckpointError(
            f"{index}: tensors are not in the shard the index names: "
            + ", ".join(f"{n!r} listed in {weight_map[n]}, found in {origin[n]}" for n in elsewhere[:10])
        )


def _same_file(path: str, shard: str) -> bool:
    shard = shard.replace("\\", "/")
    while shard.startswith("./"):
        shard = shard[2:]
    return path.replace("\\", "/").endswith("/" + shard) or path == shard
