"""What every command starts with: find MODEL (folder, GGUF file or hub id) and load it.

A folder or hub id is read shard by shard (a progress bar when there are several) and cast
tensor by tensor when a dtype is asked, then checked and assembled by
`fmodel.io.state_from_tensors`, exactly as `fmodel.load` does. A GGUF file's header is parsed
once and shared by the model, its tokenizer and `inspect`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import attrs
import torch

from ..config import load_config
from ..errors import CheckpointError, FModelError
from ..generation.config import GenerationConfig, load_generation_config
from ..io.gguf import GGUFFile, load_gguf, read_gguf, resolve_gguf
from ..io.hub_fetch import HubFetcher
from ..io.load import resolve_dtype, state_from_tensors
from ..io.read import read_tensors
from ..io.resolve import CheckpointFiles, resolve_checkpoint
from ..models.quant_linear import quantization_config
from ..state import ModelState
from ..tokenizer import Tokenizer
from ..transforms import set_attn_implementation

__all__ = [
    "GENERATION_CONFIG",
    "TOKENIZER_FILES",
    "CLIError",
    "LoadedModel",
    "describe_dtype",
    "fetch_extra_files",
    "load_generation_defaults",
    "load_model",
    "load_tokenizer",
    "progress",
]

logger = logging.getLogger("fmodel")

T = TypeVar("T")

# The files of a Hugging Face tokenizer folder (fast and slow formats, chat templates).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)
GENERATION_CONFIG = "generation_config.json"


class CLIError(FModelError, ValueError):
    """Bad command-line input that no library function rejects by itself (the message says what to do)."""


def progress(items: Iterable[T], *, total: int, desc: str, unit: str = "it") -> Iterator[T] | Iterable[T]:
    """`items` wrapped in a tqdm bar on stderr when tqdm is installed, stderr is a terminal,
    the `fmodel` logger is not silenced, and there is more than one item; else `items` as is."""
    if total <= 1 or logging.getLogger("fmodel").getEffectiveLevel() > logging.WARNING:
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # optional: pip install tqdm (in the demo extra)
        return items
    # disable=None: tqdm turns itself off when stderr is not a terminal (pipes, CI logs).
    return tqdm(items, total=total, desc=desc, unit=unit, leave=False, disable=None, file=sys.stderr)


@attrs.frozen(eq=False)
class LoadedModel:
    """A loaded MODEL and where it came from.

    Attributes:
        state: the model.
        source: MODEL as the user gave it.
        format: "gguf", "safetensors" or "pickle".
        files: (path, bytes) of the weight files (a GGUF file, or the shards and their index).
        folder: the folder holding config and tokenizer files (a hub snapshot folder for hub
            ids; the GGUF file's folder for GGUF).
        gguf: the parsed GGUF header (GGUF only).
        tensor_types: {stored tensor type: count} ("Q4_1", "F32" for GGUF; "bfloat16", ... else).
        repo_id: the hub repo id, when MODEL is one.
    """

    state: ModelState
    source: str
    format: str
    files: tuple[tuple[str, int], ...]
    folder: str
    gguf: GGUFFile | None = None
    tensor_types: dict[str, int] = attrs.field(factory=dict)
    repo_id: str | None = None


def _locate(model: str, gguf_file: str | None) -> tuple[str, str]:
    """("gguf", local path) or ("checkpoint", folder or hub id)."""
    if gguf_file is not None:
        return "gguf", resolve_gguf(model, gguf_file)
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            ggufs = sorted(n for n in os.listdir(model) if n.endswith(".gguf"))
            if len(ggufs) == 1:
                return "gguf", os.path.join(model, ggufs[0])
            if ggufs:
                raise CLIError(
                    f"{model}: no config.json, and several GGUF files {ggufs[:10]}: choose one with --gguf-file"
                )
        return "checkpoint", model
    if os.path.isfile(model) or model.endswith(".gguf"):
        return "gguf", model
    return "checkpoint", model


def _read_shards(files: CheckpointFiles, mmap: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`read_tensors`, one shard at a time under a progress bar."""
    if files.format not in ("safetensors", "pickle"):  # TF / Flax: names checked against the index
        return read_tensors(files, mmap=mmap)
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    shards = progress(files.weights, total=len(files.weights), desc="reading shards", unit="shard")
    for path in shards:
        part, _ = read_tensors(attrs.evolve(files, weights=(path,), index=None), mmap=mmap)
        for name, tensor in part.items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} appears in two shards: {origin[name]} and {path}")
            tensors[name] = tensor
            origin[name] = path
    if files.index is not None:
        with open(files.index, encoding="utf-8") as f:
            absent = sorted(set(json.load(f)["weight_map"]) - set(tensors))
        if absent:
            raise CheckpointError(f"{files.index}: lists tensors that no shard holds: {absent[:10]}")
    return tensors, origin


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Floating tensors cast to `dtype` (new tensors; the mapped originals are untouched)."""
    todo = [n for n, t in tensors.items() if dtype is not None and t.is_floating_point() and t.dtype != dtype]
    if not todo:
        return tensors
    out = dict(tensors)
    name = str(dtype).removeprefix("torch.")
    for key in progress(todo, total=len(todo), desc=f"casting to {name}", unit="tensor"):
        out[key] = tensors[key].to(dtype)
    return out


def load_model(
    model: str,
    *,
    gguf_file: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    attn: str | None = None,
    quantized: bool = False,
    activations: str = "float",
    mmap: bool = True,
) -> LoadedModel:
    """Load MODEL: a checkpoint folder, a GGUF file (or a folder holding exactly one), a hub id.

    Arguments:
        model: the path or hub repo id.
        gguf_file: a GGUF file inside the folder or hub repo `model`.
        dtype: cast floating tensors ("bfloat16", ...); None keeps what is stored (float32 for GGUF).
        quantized, activations: GGUF only: keep the file's block-quantized weights as they are
            (`fmodel.io.gguf.load_gguf`); ignored for other checkpoints, and not with `dtype`.
        device: move the tensors there.
        attn: the attention implementation (checked to be available).
        mmap: False: copy a safetensors / pickle checkpoint's tensors into process memory
            (`fmodel.load`'s `mmap`).

    Returns:
        A `LoadedModel`.

    Raises:
        FModelError subclasses: the checkpoint cannot be found or read (names file and tensor).
    """
    target = resolve_dtype(dtype)
    kind, where = _locate(model, gguf_file)
    if kind == "gguf":
        file = read_gguf(where)
        keep = quantized and target is None
        state = load_gguf(
            file, dtype=target, device=device, quantized=keep, activations=activations if keep else "float"
        )
        types = Counter(t.tensor_type.name for t in file.tensors)
        loaded = LoadedModel(
            state,
            model,
            "gguf",
            ((file.path, os.path.getsize(file.path)),),
            os.path.dirname(os.path.abspath(file.path)),
            gguf=file,
            tensor_types=dict(types.most_common()),
        )
    else:
        files = resolve_checkpoint(where)
        config = load_config(files.config)
        tensors, origin = _read_shards(files, mmap=mmap)
        types = Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values())
        # A quantized checkpoint refuses a dtype (state_from_tensors says why); others are cast
        # here, tensor by tensor under a progress bar.
        quantized = quantization_config(config) is not None
        state, _ = state_from_tensors(
            config,
            tensors if quantized else _cast(tensors, target),
            origin=origin,
            source=files.source,
            device=device,
            dtype=target if quantized else None,
        )
        listed = (*files.weights, *((files.index,) if files.index else ()))
        loaded = LoadedModel(
            state,
            model,
            files.format,
            tuple((p, os.path.getsize(p)) for p in listed),
            files.folder,
            tensor_types=dict(types.most_common()),
            repo_id=None if os.path.isdir(where) else where,
        )
    if attn is not None:
        loaded = attrs.evolve(loaded, state=set_attn_implementation(loaded.state, attn))
    logger.info("loaded %s: %s", model, loaded.state)
    return loaded


def fetch_extra_files(loaded: LoadedModel, names: Iterable[str]) -> None:
    """For a hub id, bring `names` (tokenizer files, generation_config.json) into the snapshot
    folder through huggingface_hub's cache; files the repo lacks are skipped, and so is the
    rest once the hub turns out unreachable (`HubFetcher` probes it once, without retries)."""
    if loaded.repo_id is None:
        return
    parent = os.path.basename(os.path.dirname(loaded.folder))
    revision = os.path.basename(loaded.folder) if parent == "snapshots" else None
    cache_dir = os.path.dirname(os.path.dirname(os.path.dirname(loaded.folder))) if revision else None
    hub = HubFetcher(loaded.repo_id, revision=revision, cache_dir=cache_dir)
    for name in names:
        if os.path.isfile(os.path.join(loaded.folder, name)):
            continue
        try:
            if hub.fetch(name) is None:
                logger.debug("%s: no %s%s", loaded.repo_id, name, hub.missing_reason())
        except CheckpointError as exc:  # the hub cannot be reached / refused: use what is here
            logger.info(
                "%s: could not fetch %s (%s); using the files already here", loaded.repo_id, name, exc
            )
            return


def load_tokenizer(loaded: LoadedModel) -> Tokenizer:
    """The model's tokenizer: from the GGUF metadata, or the folder's tokenizer.json.

    Raises:
        CheckpointError: a folder without tokenizer.json (the message names the folder).
    """
    if loaded.gguf is not None:
        return Tokenizer.from_gguf(loaded.gguf)
    fetch_extra_files(loaded, (*TOKENIZER_FILES, GENERATION_CONFIG))
    return Tokenizer.from_folder(loaded.folder)


def load_generation_defaults(loaded: LoadedModel) -> GenerationConfig:
    """generation_config.json of the folder; else (and for GGUF) what the model config implies."""
    if loaded.gguf is not None:
        return GenerationConfig.from_model_config(loaded.state.config)
    fetch_extra_files(loaded, (GENERATION_CONFIG,))
    return load_generation_config(loaded.folder)


def describe_dtype(state: ModelState) -> str:
    """The floating dtype(s) of the parameters: "float32", or "bfloat16 + float32" when mixed."""
    names: dict[str, Any] = {}
    for t in state.unique_params().values():
        if t.is_floating_point():
            names[str(t.dtype).removeprefix("torch.")] = True
    return " + ".join(names) or str(state.dtype).removeprefix("torch.")
