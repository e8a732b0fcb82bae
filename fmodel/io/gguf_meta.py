"""Typed, bounded reads of GGUF model metadata, and the metadata checked against the tensor table.

A config built from GGUF metadata drives what a load allocates and computes (layer count, head
size, ...). These checks run before any config or skeleton is built, so a file whose metadata
lies (`llama.block_count` 10**9, `llama.attention.head_count` 0, a key length of 10**12) fails
in microseconds with an error that names the file and the key, instead of dividing by zero or
building a billion layers.
"""

from __future__ import annotations

import math
import re
from typing import Any

from ..errors import CheckpointError, ConfigError, ShapeMismatchError
from .gguf_file import GGUFFile

__all__ = ["check_against_tensors", "count", "positive"]

_MISSING = object()
_BLOCK_RE = re.compile(r"blk\.(\d+)\.")


def count(file: GGUFFile, key: str, *, default: Any = _MISSING) -> Any:
    """The integer metadata value under `key`, which must be >= 1 (a size or count).

    Arguments:
        file: the parsed file.
        key: the metadata key.
        default: returned when the key is absent; without one the key is required.

    Raises:
        CheckpointError: the key is missing (no default) or not an integer.
        ConfigError: the integer is < 1.
    """
    required = default is _MISSING
    value = file.get(key, int, required=required, default=None if required else default)
    if key in file.metadata and value < 1:
        raise ConfigError(f"{file.path}: GGUF metadata key {key!r} is {value}, expected a count >= 1")
    return value


def positive(file: GGUFFile, key: str, *, default: Any = _MISSING) -> Any:
    """The float metadata value under `key`, which must be finite and > 0 (an epsilon, a base).

    Raises:
        CheckpointError: the key is missing (no default) or not a number.
        ConfigError: the number is not finite or <= 0.
    """
    required = default is _MISSING
    value = file.get(key, float, required=required, default=None if required else default)
    if key in file.metadata and not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{file.path}: GGUF metadata key {key!r} is {value}, expected a finite number > 0")
    return value


def check_against_tensors(file: GGUFFile, arch: Any, d: dict[str, Any], head_dim: int) -> None:
    """Refuse metadata that the tensor table contradicts, before anything is built from it.

    Arguments:
        file: the parsed file.
        arch: the architecture entry (`model_type`, `architecture`).
        d: the config dict built from the metadata (Transformers' field names).
        head_dim: the head size the config will have.

    Raises:
        CheckpointError: `block_count` larger than the blocks the file holds tensors for
            (the message says which tensors are missing).
        ShapeMismatchError: `blk.0.attn_q.weight` (or `attn_k`) does not have heads x head size
            rows; names the GGUF tensor, the rows found and the keys that predict them.
        ConfigError: a head count that does not divide the heads or the hidden size.
    """
    a = file.architecture
    n_heads, n_kv = d["num_attention_heads"], d["num_key_value_heads"]
    if n_heads % n_kv:
        raise ConfigError(
            f"{file.path}: GGUF metadata {a}.attention.head_count {n_heads} is not a multiple of "
            f"{a}.attention.head_count_kv {n_kv}"
        )
    blocks = {int(m.group(1)) for t in file.tensors if (m := _BLOCK_RE.match(t.name))}
    n_layers = d["num_hidden_layers"]
    held = max(blocks) + 1 if blocks else 0
    if n_layers > held:
        raise CheckpointError(
            f"{file.path}: GGUF metadata {a}.block_count is {n_layers}, but the file holds tensors of "
            f"{held} blocks: the tensor(s) that {arch.architecture} needs are missing for blocks "
            f"{held}..{n_layers - 1} (blk.{held}.*)"
        )
    by_name = {t.name: t for t in file.tensors}
    for part, heads, key in (("attn_q", n_heads, "head_count"), ("attn_k", n_kv, "head_count_kv")):
        t = by_name.get(f"blk.0.{part}.weight")
        if t is None or len(t.shape) != 2:
            continue  # state_from_tensors reports a missing or misshapen weight by its own name
        rows = int(t.shape[1])  # ggml order: [in, out]
        if rows != heads * head_dim:
            raise ShapeMismatchError(
                f"{file.path}: GGUF tensor 'blk.0.{part}.weight' has {rows} rows, but the metadata gives "
                f"{a}.attention.{key} {heads} x head size {head_dim} = {heads * head_dim} rows "
                f"(head size from {a}.attention.key_length, {a}.rope.dimension_count or "
                f"{a}.embedding_length / head_count)"
            )
