"""Read the tensors of a checkpoint's weight files, memory-mapped and without copies."""

from __future__ import annotations

import json
import pickle

import torch

from ..errors import CheckpointError
from .resolve import CheckpointFiles

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


def _read_pickle(path: str) -> dict[str, torch.Tensor]:
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to unpickle: the file holds more than tensors and fmodel never runs code "
            f"from a checkpoint (weights_only=True). Convert it to safetensors. Detail: {exc}"
        ) from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state_dict), got {type(data).__name__}")
    return data


def read_weight_file(path: str) -> dict[str, torch.Tensor]:
    """The tensors of one weight file: safetensors (memory-mapped) or a pickled state dict
    (`weights_only=True`), chosen by its extension."""
    return (_read_safetensors if str(path).endswith(".safetensors") else _read_pickle)(str(path))


def read_tensors(files: CheckpointFiles) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of the checkpoint and, for each name, the file it came from.

    Raises:
        CheckpointError: unreadable file, a name in two shards, or an index that disagrees
            with its shards.
    """
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
        with open(files.index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise CheckpointError(f"{files.index}: lists tensors that no shard holds: {absent[:10]}")
    return tensors, origin
