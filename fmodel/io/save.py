"""`fmodel.save`: a `ModelState` -> a Hugging Face checkpoint folder, atomically.

Everything is written into a temporary folder beside the target and renamed into place, so
a failure never leaves a half-written checkpoint where a good one stood.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

from ..errors import CheckpointError
from ..models.skeleton import skeleton
from ..state import ModelState

__all__ = ["checkpoint_tensors", "save"]

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}


def checkpoint_tensors(state: ModelState) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores: persistent ones, each tied tensor once (under its source name)."""
    persistent = skeleton(state.config, state.architecture).state_dict(keep_vars=True).keys()
    tensors = state.tensors
    return {name: tensors[name] for name in persistent if name not in state.ties}


def _own_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Clone the tensors that share a storage with another or cover only part of theirs (views
    left by slicing transforms or `unstack_state`), since safetensors refuses shared storage;
    tensors with storage of their own are passed as is."""
    by_storage: dict[tuple[torch.device, int], list[str]] = {}
    for name, t in tensors.items():
        by_storage.setdefault((t.device, t.untyped_storage().data_ptr()), []).append(name)
    out = dict(tensors)
    for names in by_storage.values():
        for name in names:
            t = tensors[name]
            if len(names) > 1 or t.untyped_storage().nbytes() != t.numel() * t.element_size():
                out[name] = t.clone()
    return out


def _is_weight_file(name: str) -> bool:
    return name in _WEIGHT_FILES or (
        name.startswith(("model-", "pytorch_model-")) and name.endswith((".safetensors", ".bin"))
    )


def _config_dict(state: ModelState) -> dict:
    data = state.config.to_dict()
    params = data.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" not in data and "rope_scaling" not in data:
        # Transformers 5 spelling: also write the Transformers 4 keys, which 4.x reads and 5.x
        # ignores beside rope_parameters, so the checkpoint means the same to both.
        data["rope_theta"] = state.config.rope_theta
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        data["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    data["architectures"] = [state.architecture]
    dtype_name = _DTYPE_NAMES.get(state.dtype)
    if dtype_name is not None:
        key = "dtype" if "dtype" in data and "torch_dtype" not in data else "torch_dtype"
        data[key] = dtype_name
    return data


def save(state: ModelState, directory: str | os.PathLike, *, max_shard_size: int | str = "5GB") -> str:
    """Write `state` as config.json + safetensors (sharded with an index above `max_shard_size`).

    Tied tensors are written once, under the source name (Transformers re-ties them on load).
    Files already in `directory` that are not weights or config (tokenizer, generation config,
    README) are kept; old weight files are replaced.

    Arguments:
        state: the model to save (not modified).
        directory: the checkpoint folder; created if absent.
        max_shard_size: bytes per shard, as an int or a string like "5GB" / "500MB" (decimal
            units, as Transformers).

    Returns:
        The directory path.

    Raises:
        CheckpointError: `directory` exists and is a file.

    Example:
        >>> fmodel.save(state, "out/", max_shard_size="2GB")
    """
    from huggingface_hub import save_torch_state_dict

    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CheckpointError(
            f"{directory}: exists and is not a folder; fmodel.save writes a checkpoint folder"
        )
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    try:
        tensors = _own_storage(checkpoint_tensors(state))
        save_torch_state_dict(tensors, tmp, max_shard_size=max_shard_size, metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(_config_dict(state), f, indent=2, sort_keys=True)
            f.write("\n")
        if os.path.isdir(directory):
            for name in os.listdir(directory):
                if (
                    name != "config.json"
                    and not _is_weight_file(name)
                    and not os.path.exists(os.path.join(tmp, name))
                ):
                    _link_or_copy(os.path.join(directory, name), os.path.join(tmp, name))
        _swap_into_place(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _link_or_copy(src: str, dst: str) -> None:
    if os.path.isdir(src):
        shutil.copytree(src, dst, symlinks=True)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _swap_into_place(tmp: str, directory: str) -> None:
    """Rename `tmp` to `directory`. An existing `directory` is first renamed aside and removed
    only after the new one is in place; if the second rename fails it is put back."""
    if not os.path.exists(directory):
        os.rename(tmp, directory)
        return
    backup = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.old-", dir=os.path.dirname(directory))
    os.rmdir(backup)
    os.rename(directory, backup)
    try:
        os.rename(tmp, directory)
    except BaseException:
        os.rename(backup, directory)
        raise
    shutil.rmtree(backup, ignore_errors=True)
