"""Validators for the arguments of public functions, shared by the functional API and the facade.

Each `check_*` takes the value and the name of the argument it came from (as the caller
spells it, e.g. "resize_token_embeddings(new_num_tokens)") and either returns the value
(normalised where said) or raises a named error: `ArgumentTypeError` (a `TypeError`) for the
wrong kind of object, `InvalidArgumentError` (a `ValueError`) for a value out of range,
`TokenIdError` (also an `IndexError`) for a token id outside the vocabulary. Messages say
which argument, what was given and what is accepted.

All checks are cheap: type tests, a dtype lookup, and for token ids one min/max reduction.
None of them allocates anything sized by the argument.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .errors import ArgumentTypeError, InvalidArgumentError, TokenIdError

__all__ = [
    "FLOAT_DTYPES",
    "ParameterNameError",
    "check_config",
    "check_device",
    "check_float_dtype",
    "check_int_tensor",
    "check_mapping_of_tensors",
    "check_nonnegative_int",
    "check_positive_int",
    "check_state",
    "check_state_like",
    "check_str",
    "check_token_ids",
    "describe",
]


class ParameterNameError(InvalidArgumentError, KeyError):
    """A name that is not a parameter of the state (or is a tied alias where its source is
    needed); a `KeyError` too, as a dict lookup would raise."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "double": torch.float64,
}
_FLOAT_NAMES = "torch.float32, torch.float16, torch.bfloat16, torch.float64 (or their names)"


def describe(value: Any) -> str:
    """A short description of `value` for messages: its type and a bounded repr."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"{type(value).__name__} {text}"


def check_state(value: Any, argument: str = "state") -> Any:
    """Return `value` if it is a `ModelState`, else raise `ArgumentTypeError`.

    Raises:
        ArgumentTypeError: `value` is not a `fmodel.ModelState` (None, a str, a dict, a facade
            model: the message says to pass `model.state` for the last).
    """
    from .state import ModelState

    if isinstance(value, ModelState):
        return value
    hint = ""
    if hasattr(value, "state") and isinstance(getattr(value, "state", None), ModelState):
        hint = "; pass model.state for a PreTrainedModel"
    elif isinstance(value, (str, bytes)):
        hint = "; load one with fmodel.load(path)"
    raise ArgumentTypeError(f"{argument} must be a fmodel.ModelState, got {describe(value)}{hint}")


def check_state_like(value: Any, argument: str = "state") -> Any:
    """`check_state`, also accepting a record with a state's `config` and `architecture`
    (what the facade passes to `prepare_call` / `init_cache` instead of building a state)."""
    from .state import ModelState

    if isinstance(value, ModelState) or (
        hasattr(value, "config") and isinstance(getattr(value, "architecture", None), str)
    ):
        return value
    return check_state(value, argument)


def check_config(value: Any, argument: str = "config") -> Any:
    """Return `value` if it is an fmodel config (`fmodel.LlamaConfig(...)`, `config_from_dict`).

    Raises:
        ArgumentTypeError: anything else (None, a dict: the message says to use
            `fmodel.config_from_dict`, a str: `fmodel.load_config`, a Transformers config).
    """
    from .config.base import BaseConfig

    if isinstance(value, BaseConfig):
        return value
    hint = ""
    if isinstance(value, Mapping):
        hint = "; build one from a dict with fmodel.config_from_dict"
    elif isinstance(value, (str, bytes)):
        hint = "; read one from a folder with fmodel.load_config"
    elif hasattr(value, "to_dict"):
        hint = "; convert it with fmodel.config_from_dict(config.to_dict())"
    raise ArgumentTypeError(
        f"{argument} must be an fmodel config (e.g. fmodel.LlamaConfig), got {describe(value)}{hint}"
    )


def check_str(
    value: Any, argument: str, *, allow_none: bool = False, choices: tuple | None = None
) -> str | None:
    """Return `value` if it is a str (one of `choices` when given); None passes when `allow_none`.

    Raises:
        ArgumentTypeError: not a str.
        InvalidArgumentError: not one of `choices`.
    """
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        expected = f"one of {list(choices)}" if choices else "a str"
        raise ArgumentTypeError(f"{argument} must be {expected}, got {describe(value)}")
    if choices is not None and value not in choices:
        raise InvalidArgumentError(f"{argument} must be one of {list(choices)}, got {value!r}")
    return value


def check_float_dtype(dtype: Any, argument: str = "dtype", *, allow_none: bool = True) -> torch.dtype | None:
    """Normalise a floating dtype: a `torch.dtype` or its name ("bfloat16", "torch.float16");
    None (and "auto") give None when `allow_none`.

    Raises:
        InvalidArgumentError: an integer, bool or complex dtype, or a name that is no float dtype;
            the message lists the floating dtypes accepted.
        ArgumentTypeError: neither a dtype nor a str (an int, a list, ...).
    """
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        if allow_none:
            return None
        raise InvalidArgumentError(f"{argument} must be a floating dtype ({_FLOAT_NAMES}), got {dtype!r}")
    if isinstance(dtype, torch.dtype):
        if dtype.is_floating_point:
            return dtype
        raise InvalidArgumentError(
            f"{argument}={dtype} is not a floating dtype; model weights can only be cast to {_FLOAT_NAMES}"
        )
    if isinstance(dtype, str):
        resolved = FLOAT_DTYPES.get(dtype.removeprefix("torch."))
        if resolved is not None:
            return resolved
        raise InvalidArgumentError(f"{argument}={dtype!r} is not a floating dtype; use one of {_FLOAT_NAMES}")
    raise ArgumentTypeError(f"{argument} must be a torch.dtype or its name, got {describe(dtype)}")


def check_device(device: Any, argument: str = "device", *, allow_none: bool = True) -> torch.device | None:
    """Normalise a device: a `torch.device`, a string torch parses ("cpu", "cuda:0", "meta") or a
    non-negative int (a CUDA index); None gives None when `allow_none`.

    Raises:
        InvalidArgumentError: a string torch cannot parse, or an accelerator that does not
            exist here (cuda without a GPU, an index past the last GPU); the message says what
            exists.
        ArgumentTypeError: neither a device, a str nor an int.
    """
    if device is None:
        if allow_none:
            return None
        raise ArgumentTypeError(f"{argument} must be a device, got None")
    if isinstance(device, bool) or not isinstance(device, (torch.device, str, int)):
        raise ArgumentTypeError(f"{argument} must be a torch.device, a str or an int, got {describe(device)}")
    if isinstance(device, int) and device < 0:
        raise InvalidArgumentError(f"{argument}={device} is not a device index (must be >= 0)")
    try:
        resolved = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InvalidArgumentError(
            f"{argument}={device!r} is not a device torch knows (e.g. 'cpu', 'cuda:0', 'mps', 'meta'); "
            f"available here: {_available()}"
        ) from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InvalidArgumentError(
                f"{argument}={device!r}: CUDA is not available here (no GPU, or torch built without CUDA); "
                f"available: {_available()}"
            )
        if resolved.index is not None and resolved.index >= count:
            raise InvalidArgumentError(
                f"{argument}={device!r}: there is no GPU {resolved.index}; available: {_available()}"
            )
    elif resolved.type == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise InvalidArgumentError(
            f"{argument}={device!r}: MPS is not available here; available: {_available()}"
        )
    return resolved


def _available() -> str:
    names = ["cpu", "meta"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        names.append("mps")
    return ", ".join(names)


def check_positive_int(
    value: Any, argument: str, *, minimum: int = 1, allow_none: bool = False
) -> int | None:
    """Return `value` if it is an int >= `minimum` (bools refused); None passes when `allow_none`.

    Raises:
        ArgumentTypeError: not an int (a float, str, None, tensor, ...).
        InvalidArgumentError: smaller than `minimum`.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{argument} must be an int >= {minimum}, got {describe(value)}")
    if value < minimum:
        raise InvalidArgumentError(f"{argument} must be an int >= {minimum}, got {value}")
    return value


def check_nonnegative_int(value: Any, argument: str, *, allow_none: bool = False) -> int | None:
    """`check_positive_int` with minimum 0."""
    return check_positive_int(value, argument, minimum=0, allow_none=allow_none)


def check_mapping_of_tensors(value: Any, argument: str, *, allow_none: bool = False) -> Mapping | None:
    """Return `value` if it is a mapping from str to tensors; None passes when `allow_none`.

    Raises:
        ArgumentTypeError: not a mapping, a key that is not a str, or a value that is not a
            tensor (the message names the first offending key).
    """
    if value is None and allow_none:
        return None
    if not isinstance(value, Mapping):
        raise ArgumentTypeError(f"{argument} must be a mapping {{name: tensor}}, got {describe(value)}")
    for key, tensor in value.items():
        if not isinstance(key, str):
            raise ArgumentTypeError(f"{argument}: keys must be tensor names (str), got {describe(key)}")
        if not isinstance(tensor, torch.Tensor):
            raise ArgumentTypeError(f"{argument}[{key!r}] must be a torch.Tensor, got {describe(tensor)}")
    return value


def check_int_tensor(value: Any, argument: str, *, allow_none: bool = False) -> torch.Tensor | None:
    """Return `value` if it is an integer tensor (int64, int32, ...; not bool or float).

    Raises:
        ArgumentTypeError: not a tensor (a list: the message suggests torch.tensor), or a
            float / bool / complex tensor.
    """
    if value is None and allow_none:
        return None
    if not isinstance(value, torch.Tensor):
        hint = "; wrap it with torch.tensor([...])" if isinstance(value, (list, tuple)) else ""
        raise ArgumentTypeError(f"{argument} must be a tensor of token ids, got {describe(value)}{hint}")
    if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
        raise ArgumentTypeError(f"{argument} must be an integer tensor (torch.long), got dtype {value.dtype}")
    return value


def check_token_ids(ids: Any, vocab_size: int | None, argument: str = "input_ids") -> torch.Tensor | None:
    """Check that every id in `ids` lies in [0, vocab_size): one min and one max reduction.

    Skipped under `torch.compile` tracing (a data-dependent branch would break the graph), for a
    `torch.func` wrapped tensor (vmap over the ids) and on the meta device; None passes (the caller decides whether ids are required).

    Raises:
        ArgumentTypeError: `ids` is not an integer tensor.
        TokenIdError: an id < 0 or >= vocab_size; the message gives the id, its position and
            the vocabulary size.
    """
    if ids is None:
        return None
    check_int_tensor(ids, argument)
    if vocab_size is None or ids.numel() == 0 or ids.device.type == "meta" or _traced(ids):
        return ids
    if ids.device.type == "cpu" and ids.numel() <= 64:  # a decode step: cheaper in Python
        flat = ids.reshape(-1).tolist()
        low, high = min(flat), max(flat)
    else:  # one reduction pass, one host sync
        low, high = torch.stack(torch.aminmax(ids)).tolist()
    if low >= 0 and high < vocab_size:
        return ids
    bad = low if low < 0 else high
    position = tuple(int(i) for i in (ids == bad).nonzero()[0].tolist())
    raise TokenIdError(
        f"{argument} holds token id {bad} at position {position}, outside the vocabulary "
        f"[0, {vocab_size}) (vocab_size={vocab_size})"
    )


def _traced(ids: torch.Tensor) -> bool:
    """Under torch.compile, or a torch.func transform's wrapper (vmap over the ids): no
    data-dependent Python branch is possible there; the eager call outside checked already."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and compiler.is_compiling():
        return True
    functorch = getattr(torch._C, "_functorch", None)
    return bool(functorch is not None and functorch.is_functorch_wrapped_tensor(ids))
