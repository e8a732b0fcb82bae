"""Argument checks of the facade's public methods, done before anything is loaded or changed.

Most checks live in `fmodel._checks` (shared with the functional API); this module holds what
is facade-specific: Transformers' spellings of the arguments and exception types that keep
Transformers' clients working. `model.to("nodevice")` raises a `RuntimeError` in torch and
`model.to(torch.int8)` a `TypeError`; code that catches those keeps catching ours, which are
also `InvalidArgumentError`s (`ValueError`) and `FModelError`s. A *missing attribute* stays an
`AttributeError` everywhere (peft and accelerate probe with `hasattr`); nothing here turns one
into anything else.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .._checks import check_device, check_positive_int, describe
from ..errors import ArgumentTypeError, InvalidArgumentError

__all__ = [
    "CastDtypeError",
    "DeviceArgumentError",
    "check_config_argument",
    "check_generate_lengths",
    "check_model_inputs",
    "check_pretrained_path",
    "check_repo_id",
    "check_to_arguments",
]


class DeviceArgumentError(InvalidArgumentError, RuntimeError):
    """`model.to(device)` with a device torch cannot parse or that does not exist here; a
    `RuntimeError` as torch's own error for such a device string."""


class CastDtypeError(InvalidArgumentError, TypeError):
    """`model.to(dtype)` with an integer or bool dtype; a `TypeError` as `nn.Module.to`'s own."""


def check_pretrained_path(value: Any, call: str) -> str:
    """`from_pretrained`'s first argument as a str: a path (str or os.PathLike) or a repo id.

    Raises:
        ArgumentTypeError: None, an int, a list, ... (names `call` and what was given).
        InvalidArgumentError: an empty string.
    """
    if isinstance(value, bytes) or not isinstance(value, (str, os.PathLike)):
        raise ArgumentTypeError(
            f"{call}(pretrained_model_name_or_path) must be a folder path, a GGUF file or a hub repo id "
            f"'org/name' (str or os.PathLike), got {describe(value)}"
        )
    text = os.fspath(value)
    if not text:
        raise InvalidArgumentError(
            f"{call}(pretrained_model_name_or_path) is an empty string; give a folder path or a hub repo id"
        )
    return text


def check_config_argument(config: Any, call: str) -> Any:
    """A config the facade can build from: an object with a str `model_type` (fmodel's, a
    Transformers config, a `ConfigView`).

    Raises:
        ArgumentTypeError: None, a str (a path: use from_pretrained / AutoConfig), a dict, ...
    """
    model_type = getattr(config, "model_type", None)
    if isinstance(model_type, str) and model_type:
        return config
    hint = ""
    if isinstance(config, (str, os.PathLike)):
        hint = "; to load a checkpoint use from_pretrained(path)"
    elif isinstance(config, dict):
        hint = "; build one with fmodel.config_from_dict(d) or transformers.AutoConfig.for_model(**d)"
    raise ArgumentTypeError(
        f"{call}(config) must be a model config with a model_type (fmodel's, or a Transformers "
        f"PretrainedConfig), got {describe(config)}{hint}"
    )


def check_to_arguments(args: tuple, kwargs: dict) -> tuple[torch.device | None, torch.dtype | None]:
    """Parse `model.to(...)`'s arguments as `nn.Module.to` does and check them.

    Returns:
        (device, dtype), either None when not given.

    Raises:
        DeviceArgumentError: a device torch does not know, or one not present here (cuda
            without a GPU, a GPU index past the last).
        CastDtypeError: an integer or bool dtype (`nn.Module.to` casts floating tensors only).
        ArgumentTypeError: arguments `nn.Module.to` does not take (a list, ...).
    """
    try:
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
    except RuntimeError as exc:  # a device string torch cannot parse
        given = kwargs.get("device", args[0] if args else None)
        raise DeviceArgumentError(
            f"to(device={given!r}): not a device torch knows (e.g. 'cpu', 'cuda:0', 'mps'); "
            f"{str(exc).splitlines()[0][:160]}"
        ) from None
    except TypeError as exc:
        raise ArgumentTypeError(
            f"to() takes a device, a dtype, a tensor, or device=/dtype=/non_blocking=; {exc}"
        ) from None
    if dtype is not None and not (dtype.is_floating_point or dtype.is_complex):
        raise CastDtypeError(
            f"to(dtype={dtype}): a model's weights can only be cast to a floating dtype (torch.float32, "
            "torch.float16, torch.bfloat16, torch.float64); for integer weights use quantize"
        )
    if device is not None:
        try:
            check_device(device, "to(device)")
        except InvalidArgumentError as exc:
            raise DeviceArgumentError(str(exc)) from None
    return device, dtype


def check_generate_lengths(kwargs: dict) -> None:
    """`max_new_tokens` / `max_length` / `min_new_tokens` of a `generate` call, when given.

    Raises:
        ArgumentTypeError / InvalidArgumentError: not an int, or below its minimum (1 for the
            maximums, 0 for `min_new_tokens`); the message names the argument.
    """
    for name, minimum in (("max_new_tokens", 1), ("max_length", 1), ("min_new_tokens", 0), ("min_length", 0)):
        if kwargs.get(name) is not None:
            check_positive_int(kwargs[name], f"generate({name})", minimum=minimum)


def check_model_inputs(input_ids: Any, inputs_embeds: Any, call: str = "forward", **tensors: Any) -> None:
    """`input_ids` (an integer tensor [batch, seq]) or `inputs_embeds` ([batch, seq, hidden]):
    types and ranks only (static: nothing for torch.compile to break on); values are
    `fmodel.forward_checks`' business.

    Raises:
        ArgumentTypeError: `input_ids` is not a tensor (a list: wrap it with torch.tensor), or
            one of `tensors` (attention_mask=, labels=, ...) is given and not a tensor.
        InvalidArgumentError: a tensor of the wrong rank or dtype.
    """
    for name, value in tensors.items():
        if value is not None and not isinstance(value, torch.Tensor):
            hint = "; wrap it with torch.tensor([...])" if isinstance(value, (list, tuple)) else ""
            raise ArgumentTypeError(f"{call}({name}) must be a tensor, got {describe(value)}{hint}")
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor):
            hint = "; wrap it with torch.tensor([...])" if isinstance(input_ids, (list, tuple)) else ""
            raise ArgumentTypeError(
                f"{call}(input_ids) must be a tensor of token ids, got {describe(input_ids)}{hint}"
            )
        if input_ids.ndim != 2 or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
            raise InvalidArgumentError(
                f"{call}(input_ids) must be an integer tensor [batch, seq], got {input_ids.dtype} "
                f"{list(input_ids.shape)}"
            )
    if inputs_embeds is not None:
        if not isinstance(inputs_embeds, torch.Tensor):
            raise ArgumentTypeError(f"{call}(inputs_embeds) must be a tensor, got {describe(inputs_embeds)}")
        if inputs_embeds.ndim != 3 or not inputs_embeds.is_floating_point():
            raise InvalidArgumentError(
                f"{call}(inputs_embeds) must be a floating tensor [batch, seq, hidden], got {inputs_embeds.dtype} "
                f"{list(inputs_embeds.shape)}"
            )


def check_repo_id(repo_id: Any, call: str = "push_to_hub") -> str:
    """A hub repo id, "name" or "org/name", as huggingface_hub validates it.

    Raises:
        ArgumentTypeError: not a str.
        InvalidArgumentError: not a valid repo id (the message gives huggingface_hub's rule).
    """
    if not isinstance(repo_id, str):
        raise ArgumentTypeError(
            f"{call}(repo_id) must be a str 'name' or 'org/name', got {describe(repo_id)}"
        )
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise InvalidArgumentError(f"{call}(repo_id={repo_id!r}) is not a valid hub repo id: {exc}") from None
    return repo_id
