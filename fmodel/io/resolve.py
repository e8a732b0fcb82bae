"""Find a checkpoint's files: a local folder, or a hub repo id through huggingface_hub's cache."""

from __future__ import annotations

import os

import attrs

from ..errors import CheckpointError
from .atomic import recover
from .hub_fetch import HubFetcher
from .shard_index import local_shard_paths, shard_names

__all__ = ["CheckpointFiles", "resolve_checkpoint", "variant_name"]

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PT_SINGLE = "pytorch_model.bin"
PT_INDEX = "pytorch_model.bin.index.json"
CONFIG = "config.json"


def variant_name(filename: str, variant: str | None) -> str:
    """`filename` with `variant` before its last suffix, as Transformers names variant files:
    ("model.safetensors", "fp16") -> "model.fp16.safetensors",
    ("model.safetensors.index.json", "fp16") -> "model.safetensors.index.fp16.json"."""
    if not variant:
        return filename
    stem, _, suffix = filename.rpartition(".")
    return f"{stem}.{variant}.{suffix}"


# TensorFlow and Flax checkpoints (fmodel.io.legacy), looked for after safetensors and pickle:
# a folder holding several formats loads its safetensors. They have no variant files.
LEGACY_CANDIDATES = (
    ("tf_model.h5.index.json", "tf_model.h5", "tf"),
    ("flax_model.msgpack.index.json", "flax_model.msgpack", "flax"),
)


def _candidates(variant: str | None) -> tuple[tuple[str, str, str], ...]:
    """(index name, single-file name, format) in the order they are looked for."""
    return tuple(
        (variant_name(index, variant), variant_name(single, variant), fmt)
        for index, single, fmt in ((SAFE_INDEX, SAFE_SINGLE, "safetensors"), (PT_INDEX, PT_SINGLE, "pickle"))
    ) + (() if variant else LEGACY_CANDIDATES)


@attrs.frozen
class CheckpointFiles:
    """Local paths of one checkpoint.

    Attributes:
        source: what the user passed (folder or repo id), for error messages.
        config: path of config.json (None when the caller brought its own config).
        weights: weight files, in shard order.
        index: path of the shard index, if sharded.
        format: "safetensors", "pickle", "tf" (tf_model.h5), "flax" (flax_model.msgpack), or
            "tf-safetensors" / "flax-safetensors" (safetensors written by TF / Flax, their names).
        folder: the folder holding the files (a hub snapshot folder for repo ids).
    """

    source: str
    config: str | None
    weights: tuple[str, ...]
    index: str | None
    format: str
    folder: str


def _local(folder: str, variant: str | None = None, require_config: bool = True) -> CheckpointFiles:
    config = os.path.join(folder, CONFIG)
    if not os.path.isfile(config):
        if require_config:
            raise CheckpointError(f"{folder}: no {CONFIG} in this folder")
        config = None
    candidates = _candidates(variant)
    for index_name, single, fmt in candidates:
        index = os.path.join(folder, index_name)
        if os.path.isfile(index):
            shards = local_shard_paths(index, folder)  # names checked and confined to the folder
            missing = [s for s in shards if not os.path.isfile(s)]
            if missing:
                raise CheckpointError(f"{index}: lists shard files that do not exist: {missing}")
            return CheckpointFiles(folder, config, tuple(shards), index, _refine(fmt, shards), folder)
        path = os.path.join(folder, single)
        if os.path.isfile(path):
            return CheckpointFiles(folder, config, (path,), None, _refine(fmt, [path]), folder)
    raise CheckpointError(f"{folder}: no weights found; expected {_expected(candidates)}")


def _refine(fmt: str, weights) -> str:
    """A safetensors checkpoint that TF / Flax `save_pretrained` wrote keeps TF / Flax names
    (its metadata says so): "tf-safetensors" / "flax-safetensors", read by fmodel.io.legacy."""
    if fmt != "safetensors" or not weights or not os.path.isfile(weights[0]):
        return fmt
    from .legacy import safetensors_format

    return safetensors_format(weights[0])


def _expected(candidates: tuple[tuple[str, str, str], ...]) -> str:
    names = [name for index, single, _ in candidates for name in (single, index)]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _hub(
    repo_id: str,
    revision,
    cache_dir,
    local_files_only,
    variant: str | None = None,
    require_config: bool = True,
) -> CheckpointFiles:
    # HubFetcher: one HEAD probe without hidden retries, cache-only when offline or unreachable,
    # HubUnavailableError when the cache does not hold the repo, damaged cache entries named.
    hub = HubFetcher(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    config = hub.fetch(CONFIG)
    if config is None and require_config:
        raise CheckpointError(f"{repo_id}: no {CONFIG} found{hub.missing_reason()}")
    folder = None if config is None else os.path.dirname(config)
    candidates = _candidates(variant)
    for index_name, single, fmt in candidates:
        index = hub.fetch(index_name)
        if index is not None:
            shards = []
            for name in shard_names(index):  # checked: {str: str}, no path outside the snapshot
                path = hub.fetch(name)
                if path is None:
                    raise CheckpointError(
                        f"{repo_id}: shard {name} listed in {index_name} could not be fetched{hub.missing_reason()}"
                    )
                shards.append(path)
            return CheckpointFiles(
                repo_id, config, tuple(shards), index, _refine(fmt, shards), folder or os.path.dirname(index)
            )
        path = hub.fetch(single)
        if path is not None:
            return CheckpointFiles(
                repo_id, config, (path,), None, _refine(fmt, [path]), folder or os.path.dirname(path)
            )
    raise CheckpointError(
        f"{repo_id}: no weights found; expected {_expected(candidates)}{hub.missing_reason()}"
    )


def resolve_checkpoint(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    variant: str | None = None,
    require_config: bool = True,
) -> CheckpointFiles:
    """Locate config and weights. A path that exists is a local folder; otherwise a hub id.

    `require_config=False` (the caller has a config): a missing config.json is no error and
    `config` is None.

    Offline use: pass `local_files_only=True` or set `HF_HUB_OFFLINE=1`; cached files are used.
    `variant` ("fp16", ...) picks Transformers' variant files (model.fp16.safetensors, ...)
    and only those.

    Hub ids go through `fmodel.io.hub_fetch.HubFetcher`: an unreachable hub is detected with
    one request (no hidden retries) and the local cache is used instead.

    Raises:
        HubUnavailableError: a hub id whose repo is not in the local cache while offline mode
            is on or the hub cannot be reached; says which, the cache folder, and how to use a
            local copy.
        CheckpointError: nothing found, names what was looked for and where; a damaged hub
            cache (a ref to a missing snapshot, a broken blob symlink, a folder for a file).
    """
    source = os.fspath(path_or_repo_id)
    if not os.path.exists(source):
        recover(source)  # a save killed between its fallback renames: put the old folder back
    if os.path.isdir(source):
        return _local(source, variant, require_config)
    if os.path.exists(source):
        raise CheckpointError(f"{source}: expected a checkpoint folder (config.json + weights), got a file")
    if source.count("/") > 1 or source.startswith((".", "/", "~")):
        raise CheckpointError(f"{source}: no such folder (and not a valid hub repo id 'org/name')")
    return _hub(
        source,
        revision,
        None if cache_dir is None else os.fspath(cache_dir),
        local_files_only,
        variant,
        require_config,
    )
