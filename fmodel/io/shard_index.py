"""The shard index of a sharded checkpoint (`model.safetensors.index.json`), read and checked.

An index is `{"metadata": {...}, "weight_map": {tensor name: shard file name}}`. Its rules:

- it is strict JSON by the rules of `fmodel.config.json_file` (UTF-8, no NaN, no duplicate
  keys, bounded size and depth), with an object at the top and an object `weight_map`;
- every key is a tensor name (a non-empty str) and every value a shard file name (a
  non-empty str);
- a shard name is confined to the checkpoint folder: relative, no `..` component, no drive
  or backslash tricks, and, for a local folder, its real path (symlinks resolved) lies
  inside the folder. A hub snapshot folder (`.../snapshots/<rev>/`) holds symlinks into the
  repo's `../../blobs/`: those are the cache's own layout and allowed; confinement is about
  the names the index lists.

`read.py` then checks the index against the shards' contents: every listed tensor is in the
shard the index names, and every shard tensor is listed (an unlisted tensor means the index
and the shards are not one checkpoint: refused, as a name in two shards is).
"""

from __future__ import annotations

import os
import posixpath

from ..config.json_file import read_json_object
from ..errors import CheckpointError

__all__ = ["local_shard_paths", "read_weight_map", "shard_names"]


def _check_name(index_path: str, tensor: object, shard: object) -> None:
    if not isinstance(tensor, str) or not tensor:
        raise CheckpointError(
            f"{index_path}: weight_map key {tensor!r} is not a tensor name (a non-empty str)"
        )
    if not isinstance(shard, str) or not shard:
        raise CheckpointError(
            f"{index_path}: weight_map[{tensor!r}] is {_short(shard)} ({type(shard).__name__}); "
            f"expected the file name of a shard (a non-empty str)"
        )
    parts = shard.replace("\\", "/").split("/")
    if (
        shard.startswith(("/", "\\"))
        or os.path.isabs(shard)
        or ".." in parts
        or (len(shard) > 1 and shard[1] == ":")
        or "\x00" in shard
    ):
        raise CheckpointError(
            f"{index_path}: weight_map[{tensor!r}] is {shard!r}, a path outside the checkpoint folder; "
            f"a shard must be a file name inside it"
        )


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_weight_map(index_path: str) -> dict[str, str]:
    """The checked `weight_map` of a shard index: {tensor name: shard file name}.

    Raises:
        CheckpointError: the file is not strict JSON, has no object `weight_map`, or an entry
            that is not {str: str} or names a path outside the folder; the message names the
            index file and the tensor.
    """
    index = read_json_object(index_path, what="shard index", error=CheckpointError)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        found = "no 'weight_map'" if weight_map is None else f"a {type(weight_map).__name__}"
        raise CheckpointError(
            f"{index_path}: not a valid shard index ({found}); expected {{'weight_map': {{tensor: shard file}}}}"
        )
    for tensor, shard in weight_map.items():
        _check_name(index_path, tensor, shard)
    return weight_map


def shard_names(index_path: str) -> list[str]:
    """The distinct shard file names an index lists, sorted (checked by `read_weight_map`)."""
    return sorted(set(read_weight_map(index_path).values()))


def _is_hub_blob(real: str, folder: str) -> bool:
    """True when `folder` is a hub snapshot (`<repo>/snapshots/<rev>`) and `real` lies in the
    repo's `blobs/` folder, where the cache's snapshot symlinks point."""
    snapshots = os.path.dirname(os.path.realpath(folder))
    if os.path.basename(snapshots) != "snapshots":
        return False
    blobs = os.path.join(os.path.dirname(snapshots), "blobs")
    return os.path.commonpath([real, blobs]) == blobs


def local_shard_paths(index_path: str, folder: str) -> list[str]:
    """The shard files of a local folder's index, confined to the folder.

    Raises:
        CheckpointError: a bad index (`read_weight_map`), or a shard whose real path (symlinks
            resolved) is outside `folder` (and not a hub snapshot's blob).
    """
    root = os.path.realpath(folder)
    paths = []
    for name in shard_names(index_path):
        path = os.path.join(folder, *posixpath.normpath(name).split("/"))
        real = os.path.realpath(path)
        if os.path.commonpath([real, root]) != root and not _is_hub_blob(real, folder):
            raise CheckpointError(
                f"{index_path}: shard {name!r} resolves to {real}, outside the checkpoint folder {root}; "
                f"a shard must be a file inside it"
            )
        paths.append(path)
    return paths
