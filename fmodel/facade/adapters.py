"""PEFT adapters attached to a facade model (Transformers' `PeftAdapterMixin` integration).

With Transformers and PEFT installed, `model.add_adapter`, `load_adapter`, `set_adapter`,
`disable_adapters`, `active_adapters` and `get_adapter_state_dict` are Transformers' own methods
(the facade is a `transformers.PreTrainedModel`, see interop.py): they inject PEFT's layers into
the module tree, which is what the facade's forward runs. What the facade does itself, as
Transformers 4.57 does it:

- `save_pretrained` of a model with adapters (`_hf_peft_config_loaded`) writes the active
  adapter only, in PEFT's format (`save_adapter`): adapter_config.json, adapter_model.safetensors
  (or adapter_model.bin) with keys under `base_model.model.`, and generation_config.json for a
  causal LM; no config.json, no base weights.
- `from_pretrained` of a folder or hub repo holding adapter_config.json loads the base model
  named by its `base_model_name_or_path`, then `load_adapter` on that folder (`adapter_source`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import torch

from ..errors import InvalidArgumentError

__all__ = ["ADAPTER_CONFIG", "adapter_source", "has_adapters", "save_adapter", "with_adapter"]

ADAPTER_CONFIG = "adapter_config.json"


def has_adapters(model: Any) -> bool:
    """Whether PEFT adapters were attached through the model's own methods (`add_adapter`,
    `load_adapter`): Transformers' `_hf_peft_config_loaded` flag."""
    return bool(getattr(model, "_hf_peft_config_loaded", False))


def adapter_source(
    source: str, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None
) -> str | None:
    """The base model's name or path when `source` holds a PEFT adapter (adapter_config.json),
    else None, as Transformers' `find_adapter_config_file`: a local folder, or a hub repo whose
    adapter_config.json is in the local hub cache (no request is made here; an adapter repo not
    yet cached loads with `PeftModel.from_pretrained(base, repo)` or `model.load_adapter(repo)`).

    Raises:
        ValueError: adapter_config.json names no `base_model_name_or_path`.
    """
    if source.endswith(".gguf"):
        return None
    path: Any = os.path.join(source, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        path = None
        if not os.path.exists(source) and source.count("/") <= 1:
            from huggingface_hub import try_to_load_from_cache

            try:
                path = try_to_load_from_cache(source, ADAPTER_CONFIG, cache_dir=cache_dir, revision=revision)
            except ValueError:  # not a valid repo id either (huggingface_hub's HFValidationError)
                path = None
    if not isinstance(path, str):
        return None
    with open(path, encoding="utf-8") as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise InvalidArgumentError(
            f"{path}: an adapter config without `base_model_name_or_path`; load the base model and call "
            "`model.load_adapter(...)` (or `PeftModel.from_pretrained(model, ...)`) instead"
        )
    return base


def with_adapter(loaded: Any, source: str, adapter_name: str, adapter_kwargs: dict[str, Any]) -> Any:
    """`loaded` (a model, or `(model, loading_info)`) after `model.load_adapter(source, ...)`.

    Raises:
        ImportError: Transformers or PEFT is not installed (the adapter layers are PEFT's).
    """
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    if not hasattr(model, "load_adapter"):
        raise ImportError(
            f"{source} holds a PEFT adapter; loading it needs transformers and peft installed "
            "(pip install transformers peft)"
        )
    model.load_adapter(source, adapter_name=adapter_name, adapter_kwargs=adapter_kwargs)
    return loaded


def save_adapter(
    model: Any,
    save_directory: str | os.PathLike,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    safe_serialization: bool = True,
    save_function: Callable[[dict[str, torch.Tensor], str], Any] | None = None,
    save_peft_format: bool = True,
) -> None:
    """Write the model's active adapter as Transformers' `save_pretrained` does for a model with
    adapters: generation_config.json (causal LMs), adapter_config.json and the adapter weights.

    Arguments:
        model: a facade model with adapters (`has_adapters(model)`).
        save_directory: the folder (created if absent).
        state_dict: the model's state dict to take the adapter tensors from (default: its own).
        safe_serialization: adapter_model.safetensors (default) or adapter_model.bin.
        save_function: writes the .bin file (default `torch.save`).
        save_peft_format: prefix the keys with `base_model.model.` as PEFT's files have them.

    Raises:
        ValueError: more than one adapter is active (as Transformers).
    """
    active = model.active_adapters()
    if len(active) > 1:
        raise InvalidArgumentError(
            "Multiple active adapters detected, saving multiple active adapters is not supported yet. You can "
            "save adapters separately one by one by iteratively calling `model.set_adapter(adapter_name)` then "
            "`model.save_pretrained(...)`"
        )
    os.makedirs(save_directory, exist_ok=True)
    if model.can_generate():
        model.generation_config.save_pretrained(save_directory)
    tensors = model.get_adapter_state_dict(state_dict=state_dict)
    if save_peft_format:
        tensors = {f"base_model.model.{key}": value for key, value in tensors.items()}
    tensors = {key: value.detach().contiguous() for key, value in tensors.items()}
    model.peft_config[active[0]].save_pretrained(save_directory)
    if safe_serialization:
        from safetensors.torch import save_file

        save_file(
            tensors, os.path.join(save_directory, "adapter_model.safetensors"), metadata={"format": "pt"}
        )
    else:
        (save_function or torch.save)(tensors, os.path.join(save_directory, "adapter_model.bin"))
