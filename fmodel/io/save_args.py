"""The argument checks of `fmodel.save`, run before anything is written."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

from .._checks import check_mapping_of_tensors, check_state, check_str, describe
from ..errors import ArgumentTypeError, CheckpointError, InvalidArgumentError

__all__ = ["check_save_arguments", "shard_size_bytes"]

_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # decimal, as Transformers
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]B)\s*", re.I)
_SIZE_HELP = 'an int (bytes, >= 1) or a str like "5GB" / "500MB" (units KB, MB, GB, TB)'


def shard_size_bytes(value: Any) -> int:
    """`max_shard_size` in bytes: an int >= 1, or a decimal size string ("5GB", "0.5MB").

    Raises:
        InvalidArgumentError: zero, negative, NaN, a float, or a string that is not a size.
        ArgumentTypeError: anything else (None, a list, ...).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ArgumentTypeError(f"max_shard_size must be {_SIZE_HELP}, got {describe(value)}")
    if isinstance(value, float):
        shown = "NaN" if math.isnan(value) else repr(value)
        raise InvalidArgumentError(f"max_shard_size must be {_SIZE_HELP}, got the float {shown}")
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if match is None:
            raise InvalidArgumentError(f"max_shard_size must be {_SIZE_HELP}, got {value!r}")
        number, unit = match.groups()
        size = int(float(number) * _UNITS[unit.upper()])
    else:
        size = value
    if size < 1:
        raise InvalidArgumentError(f"max_shard_size must be {_SIZE_HELP}, got {value!r} ({size} bytes)")
    return size


def _directory(value: Any) -> str:
    try:
        path = os.fspath(value)
    except TypeError:
        raise ArgumentTypeError(
            f"directory must be a path (str or os.PathLike), got {describe(value)}"
        ) from None
    path = os.path.abspath(os.fsdecode(path))
    if not os.path.basename(path):
        raise InvalidArgumentError(f"directory {path!r}: a checkpoint folder cannot be the filesystem root")
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"{path}: exists and is not a folder; fmodel.save writes a checkpoint folder")
    return path


def _variant(value: Any) -> str | None:
    check_str(value, "variant", allow_none=True)
    if value is None:
        return None
    if (
        not value
        or value in (".", "..")
        or "\0" in value
        or any(s and s in value for s in ("/", "\\", os.sep))
    ):
        raise InvalidArgumentError(
            f"variant must be a non-empty name without path separators (e.g. 'fp16'), got {value!r}"
        )
    return value


def check_save_arguments(
    state: Any,
    directory: Any,
    *,
    max_shard_size: Any,
    variant: Any,
    tensors: Any,
    save_function: Any,
    generation_config: Any,
    model_card: Any,
) -> tuple[str, int]:
    """Check `fmodel.save`'s arguments (see its Raises); return the absolute directory and
    the shard size in bytes."""
    check_state(state)
    path = _directory(directory)
    size = shard_size_bytes(max_shard_size)
    _variant(variant)
    check_mapping_of_tensors(tensors, "tensors", allow_none=True)
    if save_function is not None and not callable(save_function):
        raise ArgumentTypeError(
            f"save_function must be callable as save_function(tensors, path) (e.g. torch.save), "
            f"got {describe(save_function)}"
        )
    if generation_config is not None and not isinstance(generation_config, Mapping):
        raise ArgumentTypeError(
            f"generation_config must be a mapping (the generation_config.json dict) or None, "
            f"got {describe(generation_config)}"
        )
    check_str(model_card, "model_card", allow_none=True)
    return path, size
