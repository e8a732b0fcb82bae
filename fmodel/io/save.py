"""`fmodel.save`: a `ModelState` -> a Hugging Face checkpoint folder, crash-safe.

Everything is written into a temporary folder beside the target, fsynced, and swapped into
place atomically (`fmodel.io.atomic`), so neither a failure nor a kill ever leaves a
half-written checkpoint where a good one stood. The files are those
Transformers' `save_pretrained` writes: config.json, the weights (safetensors or pickle,
sharded with an index, optionally a named variant), generation_config.json for causal LMs,
and a model card when tags are given.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from ..errors import CheckpointError
from ..models import get_spec
from ..models.skeleton import skeleton
from ..state import ModelState
from .atomic import atomic_folder, file_mode, recover
from .card import merge_tags, new_model_card, tag_model_card
from .generation_config import generation_config_from_model_config, generation_config_json
from .resolve import PT_INDEX, PT_SINGLE, SAFE_INDEX, SAFE_SINGLE, variant_name
from .save_args import check_save_arguments

__all__ = ["checkpoint_tensors", "save", "tensors_to_save", "weight_file_names"]

GENERATION_CONFIG = "generation_config.json"
MODEL_CARD = "README.md"
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


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True
    return bool(torch.equal(a, b))


def tensors_to_save(state: ModelState, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a checkpoint stores when the caller gives the tensors (Transformers' `state_dict=`).

    The tensors are taken as given, by Transformers' names (a subset is fine). A tied alias of
    `state` given beside its source, as `model.state_dict()` has it, is dropped: the checkpoint
    stores the tensor once, under the source name, and loaders re-tie it. An alias given without
    its source is kept (loaders read the source from it).

    Arguments:
        state: the model the tensors belong to (for its ties; not modified).
        tensors: {name: tensor}; not modified.

    Returns:
        A new dict sharing the given tensors.

    Raises:
        CheckpointError: an alias and its source are both given with different values; the
            checkpoint cannot hold both, since loading re-ties the alias to the source.
    """
    out = dict(tensors)
    for alias, source in state.ties.items():
        if alias in out and source in out:
            if not _same_tensor(out[alias], out[source]):
                raise CheckpointError(
                    f"state_dict: {alias!r} is tied to {source!r} in this model, but the tensors given "
                    f"for them differ; a checkpoint stores a tied tensor once (under {source!r}). Give "
                    f"one tensor, or untie the model first"
                )
            del out[alias]
    return out


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


def weight_file_names(variant: str | None = None) -> Callable[[str], bool]:
    """A test for the names of weight files of `variant` (None: the plain ones), in both formats:
    model[.V].safetensors, pytorch_model[.V].bin, their `-NNNNN-of-NNNNN` shards and indexes."""
    singles = (variant_name(SAFE_SINGLE, variant), variant_name(PT_SINGLE, variant))
    exact = {*singles, variant_name(SAFE_INDEX, variant), variant_name(PT_INDEX, variant)}
    shard_prefixes = tuple(single.rpartition(".")[0] + "-" for single in singles)

    def is_weight_file(name: str) -> bool:
        return name in exact or (name.startswith(shard_prefixes) and name.endswith((".safetensors", ".bin")))

    return is_weight_file


def _config_dict(state: ModelState) -> dict:
    data = state.config.to_diff_dict()
    params = data.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" not in data and "rope_scaling" not in data:
        # Transformers 5 spelling: also write the Transformers 4 keys, which 4.x reads and 5.x
        # ignores beside rope_parameters, so the checkpoint means the same to both.
        data["rope_theta"] = state.config.rope_theta
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        data["rope_scaling"] = state.config.transformers4_rope_scaling(scaling)
    data["architectures"] = [state.architecture]
    dtype_name = _DTYPE_NAMES.get(state.dtype)
    if dtype_name is not None:
        key = "dtype" if "dtype" in data and "torch_dtype" not in data else "torch_dtype"
        data[key] = dtype_name
    return data


def save(
    state: ModelState,
    directory: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    safe_serialization: bool = True,
    variant: str | None = None,
    tensors: Mapping[str, torch.Tensor] | None = None,
    save_function: Callable[[dict[str, torch.Tensor], str], Any] | None = None,
    generation_config: Mapping[str, Any] | None = None,
    tags: Iterable[str] | str | None = None,
    model_card: str | None = None,
    ignore_metadata_errors: bool = False,
) -> str:
    """Write `state` as a checkpoint folder the way Transformers' `save_pretrained` lays it out.

    Writes config.json, the weights (safetensors, or pickle `pytorch_model.bin` written by
    `save_function`; sharded with an index above `max_shard_size`; named like Transformers'
    variants: model.fp16.safetensors, model.fp16-00001-of-00002.safetensors,
    model.safetensors.index.fp16.json), and for a causal LM generation_config.json. Tied tensors
    are written once, under the source name (Transformers re-ties them on load). Files already
    in `directory` are kept, except config.json and the weight files of the same variant (both
    formats), which are replaced; weights of other variants stay.

    Crash safety: the new folder is written beside `directory` as `.NAME.tmp-<random>`, every
    file and the folder are fsynced, and it is swapped in with one atomic exchange (Linux
    `renameat2(RENAME_EXCHANGE)`; a plain rename for a new folder); the parent folder is
    fsynced after. At every instant `directory` holds the complete old or the complete new
    checkpoint, whatever kills the process. Where the exchange is unavailable (other OSes,
    filesystems answering EINVAL) two renames are used; a kill between them leaves the old
    checkpoint as `.NAME.old-<random>` and no `directory`, and the next `fmodel.save` to
    `directory` or `fmodel.load` of it puts the old checkpoint back (the interrupted save
    never returned). Saves to one `directory` hold an flock on `.NAME.lock` beside it, so
    concurrent saves run one after another (the last wins), and each save first removes
    the hidden folders killed saves to that `directory` left. A save that raises leaves
    `directory` exactly as it was and nothing beside it. Written files get the mode `open()`
    gives (0o666 less the umask), a new folder 0o777 less the umask, a replaced one keeps its
    mode.

    Arguments:
        state: the model to save (not modified).
        directory: the checkpoint folder; created if absent.
        max_shard_size: bytes per shard (>= 1), as an int or a string like "5GB" / "500MB"
            (decimal units, as Transformers).
        safe_serialization: safetensors (default) or pickle `.bin` files.
        variant: a variant name for the weight files ("fp16", ...); None for the plain names.
        tensors: save these tensors instead of the state's, by Transformers' names (see
            `tensors_to_save`: tied aliases given beside their source are dropped).
        save_function: writes one pickle shard, `save_function(tensors, path)`; default
            `torch.save`. Unused for safetensors.
        generation_config: the generation_config.json dict to write. None: for a causal LM,
            the one Transformers derives from the config (`generation_config_from_model_config`),
            replacing any generation_config.json already in `directory`, as `save_pretrained`
            does; other architectures get none (an existing one is kept like any other file).
        tags: tags merged into the model card's `tags:` metadata (README.md). A README already
            in `directory` keeps everything else; without one, `model_card` or a new card is
            written. None or empty with `model_card` None: README.md is left alone.
        model_card: the card to start from when `directory` has no README.md.
        ignore_metadata_errors: see `tag_model_card`.

    Returns:
        The directory path (absolute).

    Raises:
        ArgumentTypeError: `state` is not a `ModelState`; `directory` is not a path; `tensors`
            is not a {str: tensor} mapping; `save_function` is not callable; `variant`,
            `model_card` not a str, `generation_config` not a mapping.
        InvalidArgumentError: `max_shard_size` is not a size >= 1 byte (-1, 0, "abc", "5XB",
            NaN); `variant` is empty or has a path separator.
        CheckpointError: `directory` exists and is a file; a tied alias and its source given
            in `tensors` with different values.
        ValueError: the README.md's metadata is not valid YAML or cannot be interpreted (see
            `tag_model_card`).
        OSError: writing failed (a full disk, ...); `directory` is then as before.

    Example:
        >>> fmodel.save(state, "out/", max_shard_size="2GB", variant="fp16")

    A distributed state (DTensors, `fmodel.distribute` or `fmodel.load(..., mesh=)`) is saved
    by calling `save` on every rank of its mesh: the sharded tensors are gathered, rank 0 of
    the mesh writes the same ordinary checkpoint as above, and every rank returns once it is
    written or raises the writer's error (`fmodel.distributed.save_sharded`).
    """
    from ..distributed.save_sharded import is_distributed

    if isinstance(state, ModelState) and is_distributed(state, tensors if isinstance(tensors, Mapping) else None):
        from ..distributed.save_sharded import save_distributed

        return save_distributed(
            state, directory, max_shard_size=max_shard_size, safe_serialization=safe_serialization,
            variant=variant, tensors=tensors, save_function=save_function,
            generation_config=generation_config, tags=tags, model_card=model_card,
            ignore_metadata_errors=ignore_metadata_errors,
        )  # fmt: skip
    directory, shard_bytes = check_save_arguments(
        state,
        directory,
        max_shard_size=max_shard_size,
        variant=variant,
        tensors=tensors,
        save_function=save_function,
        generation_config=generation_config,
        model_card=model_card,
    )
    recover(directory)  # a save killed mid-swap: its files (README.md) are read from the old folder
    weights = tensors_to_save(state, tensors) if tensors is not None else checkpoint_tensors(state)
    text_files: dict[str, str] = {}
    if generation_config is not None:
        text_files[GENERATION_CONFIG] = generation_config_json(generation_config)
    elif get_spec(state.architecture).output in ("causal_lm", "seq2seq_lm"):
        # Transformers' save_pretrained always writes a generative model's generation config:
        # an existing file in `directory` is replaced, never kept stale.
        text_files[GENERATION_CONFIG] = generation_config_json(
            generation_config_from_model_config(state.config)
        )
    tags = merge_tags((), tags)
    if tags or model_card is not None:
        card = _read_text(os.path.join(directory, MODEL_CARD))
        if card is None:
            text_files[MODEL_CARD] = tag_model_card(
                new_model_card(tags) if model_card is None else model_card,
                tags,
                ignore_metadata_errors=ignore_metadata_errors,
            )
        else:
            new = tag_model_card(card, tags, ignore_metadata_errors=ignore_metadata_errors)
            if new != card:  # an unchanged README is kept as is (same file, same mtime)
                text_files[MODEL_CARD] = new

    with atomic_folder(directory) as tmp:
        _write_weights(
            tmp,
            _own_storage(weights),
            safe_serialization=safe_serialization,
            variant=variant,
            max_shard_size=shard_bytes,
            save_function=save_function or torch.save,
            total_parameters=sum(t.numel() for t in state.unique_params().values()),
        )
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(_config_dict(state), f, indent=2, sort_keys=True)
            f.write("\n")
        for name, text in text_files.items():  # newline="": a card keeps its own line endings
            with open(os.path.join(tmp, name), "w", encoding="utf-8", newline="") as f:
                f.write(text)
        _normal_modes(tmp)
        is_weight_file = weight_file_names(variant)
        if os.path.isdir(directory):
            for name in os.listdir(directory):
                if not is_weight_file(name) and not os.path.exists(os.path.join(tmp, name)):
                    _link_or_copy(os.path.join(directory, name), os.path.join(tmp, name))
    return directory


def _normal_modes(folder: str) -> None:
    """Give the files written into `folder` the mode `open()` gives (0o666 less the umask):
    safetensors writes 0o600, a custom `save_function` may write anything."""
    mode = file_mode()
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, mode)


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _write_weights(
    folder: str,
    tensors: dict[str, torch.Tensor],
    *,
    safe_serialization: bool,
    variant: str | None,
    max_shard_size: int | str,
    save_function: Callable[[dict[str, torch.Tensor], str], Any],
    total_parameters: int,
) -> None:
    """Shard `tensors` as Transformers does (huggingface_hub's splitter, Transformers' names and
    index layout) and write each shard into `folder`."""
    from huggingface_hub import split_torch_state_dict_into_shards

    single = variant_name(SAFE_SINGLE if safe_serialization else PT_SINGLE, variant)
    stem, _, suffix = single.rpartition(".")
    split = split_torch_state_dict_into_shards(
        tensors, filename_pattern=f"{stem}{{suffix}}.{suffix}", max_shard_size=max_shard_size
    )
    for filename, names in split.filename_to_tensors.items():
        shard = {name: tensors[name].detach().contiguous() for name in names}
        path = os.path.join(folder, filename)
        if safe_serialization:
            from safetensors.torch import save_file

            save_file(shard, path, metadata={"format": "pt"})
        else:
            save_function(shard, path)
    if split.is_sharded:
        index = {
            "metadata": {"total_parameters": total_parameters, **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
        index_name = variant_name(SAFE_INDEX if safe_serialization else PT_INDEX, variant)
        with open(os.path.join(folder, index_name), "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _link_or_copy(src: str, dst: str) -> None:
    if os.path.isdir(src):
        shutil.copytree(src, dst, symlinks=True)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
