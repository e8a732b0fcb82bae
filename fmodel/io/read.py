"""Read the tensors of a checkpoint's weight files, memory-mapped and without copies.

Every way a weight file can be bad ends in a `CheckpointError` naming the file: a
safetensors header that the format's parser refuses (offsets, sizes, dtype names, header
length are all checked by `safetensors` before any tensor is made), a pickle that holds more
than tensors (read with `weights_only=True`: no code from a checkpoint ever runs), a
truncated or damaged zip, a payload that is not a {str: tensor} dict, and a shard index that
disagrees with its shards. Tensor *values* are never scanned (that would cost a pass over
every weight); a flipped data byte loads as a different number, as it would anywhere.
"""

from __future__ import annotations

import pickle

import torch

from ..errors import CheckpointError
from .resolve import CheckpointFiles
from .shard_index import read_weight_map

__all__ = ["read_tensors", "read_weight_file"]


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        # safetensors maps the file copy-on-write: tensors cost no RAM until touched, and
        # writing into one never reaches the file.
        with safe_open(path, framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    except Exception as exc:  # safetensors_rust.SafetensorError does not derive from the above
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})"
        ) from None


def _torch_load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format


def _read_pickle(path: str) -> dict[str, torch.Tensor]:
    try:
        data = _torch_load(path)
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


def read_weight_file(path: str) -> dict[str, torch.Tensor]:
    """The tensors of one weight file: safetensors (memory-mapped) or a pickled state dict
    (`weights_only=True`), chosen by its extension.

    Raises:
        CheckpointError: the file cannot be read or holds more than a {str: tensor} dict.
    """
    return (_read_safetensors if str(path).endswith(".safetensors") else _read_pickle)(str(path))


def read_tensors(files: CheckpointFiles) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of the checkpoint and, for each name, the file it came from.

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
        for name, tensor in reader(path).items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} appears in two shards: {origin[name]} and {path}")
            tensors[name] = tensor
            origin[name] = path
    if files.index is not None:
        _check_index_against_shards(files.index, read_weight_map(files.index), origin)
    return tensors, origin


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
