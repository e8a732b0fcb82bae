"""`ConfigView`: a facade model's `config`, mutable and shaped as Transformers' `PretrainedConfig`.

The model's state keeps a frozen fmodel config; the view reads it and turns each write into a
new frozen config that the model installs (`PreTrainedModel._replace_config`): a write that
changes no module's structure (`pad_token_id`, `use_cache`, `problem_type`, a new key) keeps the
module tree (adapters and hooks stay); one that changes numerics (`rms_norm_eps`,
`rope_theta`) rebuilds it; one whose tensors no longer fit (`hidden_size`) raises a
`ConfigError` naming the transform that does it (`resize_token_embeddings`, ...).

Attributes that are not part of config.json (`_commit_hash`, `name_or_path`) live on the view.
Transformers' base-config attributes a checkpoint did not write read as Transformers' defaults
(`output_hidden_states=False`, `task_specific_params=None`, ...). The view's class is named
after the family's config (`LlamaConfig`), as clients look classes up by name.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, ClassVar

import attrs

from .._frozen import freeze, thaw
from ..config import load_config
from ..errors import InvalidArgumentError
from .config_convert import HF_DEFAULTS, as_fmodel_config, transformers_version, updated_config

__all__ = ["ConfigView", "as_fmodel_config", "view_class"]

# Attributes of the view itself, never written to config.json (as Transformers removes them).
_RUNTIME = {"_commit_hash": None, "_name_or_path": "", "_output_attentions": None}
_RUNTIME_DEFAULT_KEYS = frozenset({"use_cache"})


class ConfigView:
    """A facade model's config with Transformers' `PretrainedConfig` API (see the module docstring).

    Reads: the frozen config's fields (Transformers' spellings), the checkpoint's other keys,
    then Transformers' defaults. Writes install a new frozen config in the model.
    """

    model_type: str = ""
    attribute_map: ClassVar[dict[str, str]] = {}
    sub_configs: ClassVar[dict[str, Any]] = {}
    base_config_key: str = ""
    is_composition: bool = False
    has_no_defaults_at_init: bool = False

    def __init__(self, owner: Any, **runtime: Any) -> None:
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_runtime", {**_RUNTIME, **runtime})
        _mirror_name_or_path(owner, self._runtime["_name_or_path"])

    # -- reading ---------------------------------------------------------------------------

    @property
    def _frozen(self):
        return self._owner._frozen_config

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_owner", "_runtime"):
            raise AttributeError(name)
        runtime = self.__dict__["_runtime"]
        if name in runtime:
            return runtime[name]
        frozen = self._frozen
        if name in frozen.extra:
            return thaw(frozen.extra[name])
        try:
            return thaw(getattr(frozen, name))
        except AttributeError:
            pass
        if name in HF_DEFAULTS:
            return copy.deepcopy(HF_DEFAULTS[name])
        if name == "use_cache" and type(frozen).__name__ not in ("BertConfig",):
            return True
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __contains__(self, key: str) -> bool:
        return key in self.to_dict()

    def __iter__(self):
        return iter(self.to_dict())

    def __eq__(self, other: object) -> bool:
        return hasattr(other, "to_dict") and self.to_dict() == other.to_dict()

    __hash__ = None  # mutable, as Transformers' configs

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    @property
    def name_or_path(self) -> str:
        return self._runtime["_name_or_path"]

    @name_or_path.setter
    def name_or_path(self, value: Any) -> None:
        self._runtime["_name_or_path"] = str(value)
        _mirror_name_or_path(self._owner, str(value))

    @property
    def use_return_dict(self) -> bool:
        return bool(self.return_dict) and not self.torchscript

    @property
    def num_labels(self) -> int:
        id2label = self.id2label
        return len(id2label) if id2label else 2

    @num_labels.setter
    def num_labels(self, num_labels: int) -> None:
        if not self.id2label or len(self.id2label) != num_labels:
            id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
            self._write({"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}})

    @property
    def id2label(self) -> dict[int, str]:
        value = self._frozen.id2label
        return {0: "LABEL_0", 1: "LABEL_1"} if value is None else {int(k): v for k, v in thaw(value).items()}

    @id2label.setter
    def id2label(self, value: dict) -> None:
        self._write({"id2label": {int(k): v for k, v in dict(value).items()}})

    @property
    def label2id(self) -> dict[str, int]:
        given = self._frozen.extra.get("label2id")
        if given is not None:
            return thaw(given)
        return {v: k for k, v in self.id2label.items()}

    @label2id.setter
    def label2id(self, value: dict) -> None:
        self._write({"label2id": dict(value)})

    @property
    def _attn_implementation(self) -> str:
        return self._owner._attn_implementation

    @_attn_implementation.setter
    def _attn_implementation(self, value: str | dict | None) -> None:
        if value is not None:
            self._owner.set_attn_implementation(value)

    _attn_implementation_internal = _attn_implementation

    @property
    def output_attentions(self) -> bool:
        value = self._runtime["_output_attentions"]
        return bool(self._frozen.extra.get("output_attentions", False)) if value is None else value

    @output_attentions.setter
    def output_attentions(self, value: bool) -> None:
        self._runtime["_output_attentions"] = bool(value)

    @property
    def dtype(self):
        return self._owner.dtype

    @dtype.setter
    def dtype(self, value: Any) -> None:
        self._runtime["_dtype"] = value

    torch_dtype = dtype

    # -- writing ---------------------------------------------------------------------------

    def __setattr__(self, name: str, value: Any) -> None:
        cls_attr = getattr(type(self), name, None)
        if isinstance(cls_attr, property):
            cls_attr.__set__(self, value)
        elif name in self._runtime or name.startswith("_"):
            self._runtime[name] = value
        else:
            self._write({name: value})

    def __delattr__(self, name: str) -> None:
        if name in self._runtime:
            del self._runtime[name]
            return
        frozen = self._frozen
        if name not in frozen.extra:
            raise AttributeError(f"{type(self).__name__}: {name!r} can only be deleted if it is an extra key")
        extra = {k: v for k, v in thaw(frozen.extra).items() if k != name}
        self._owner._replace_config(attrs.evolve(frozen, extra=freeze(extra)))

    def _write(self, changes: dict[str, Any]) -> None:
        self._owner._replace_config(updated_config(self._frozen, changes))

    def update(self, config_dict: dict[str, Any]) -> None:
        """Set every key of `config_dict` (one new config, installed once)."""
        self._write(dict(config_dict))

    def update_from_string(self, update_str: str) -> None:
        """Transformers' "n_embd=10,resid_pdrop=0.2,scale_attn_weights=false" updates."""
        changes = {}
        for pair in update_str.split(","):
            key, _, text = pair.partition("=")
            if not hasattr(self, key):
                raise InvalidArgumentError(f"key {key} isn't in the original config dict")
            old = getattr(self, key)
            if isinstance(old, bool):
                value = text.lower() in ("true", "1", "y", "yes")
            elif isinstance(old, (int, float)):
                value = type(old)(text)
            else:
                value = text
            changes[key] = value
        self._write(changes)

    # -- serialising -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Every field with its value, as Transformers' `to_dict` (runtime attributes excluded)."""
        out = {k: v for k, v in HF_DEFAULTS.items() if not k.startswith("base_model_")}
        out.update(self._frozen.to_dict())
        out["id2label"], out["label2id"] = self.id2label, self.label2id
        out.setdefault("transformers_version", transformers_version())
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """What config.json holds: the checkpoint's keys and every changed field."""
        return self._frozen.to_diff_dict()

    def to_json_string(self, use_diff: bool = True) -> str:
        data = self.to_diff_dict() if use_diff else self.to_dict()
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike, use_diff: bool = True) -> None:
        with open(json_file_path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string(use_diff=use_diff))

    def save_pretrained(
        self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any
    ) -> None:
        """Write config.json into `save_directory` (created if needed), as Transformers."""
        if os.path.isfile(save_directory):
            raise AssertionError(f"Provided path ({save_directory}) should be a directory, not a file")
        if push_to_hub:
            raise InvalidArgumentError(
                "ConfigView.save_pretrained: push the model (`model.push_to_hub`) instead"
            )
        os.makedirs(save_directory, exist_ok=True)
        self.to_json_file(os.path.join(save_directory, "config.json"), use_diff=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> ConfigView:
        """The config.json of a checkpoint (folder or hub id) as a detached view, as Transformers'
        `PretrainedConfig.from_pretrained` (PEFT calls it on `type(model.config)`). `revision`,
        `cache_dir`, `local_files_only` locate it; other keywords that are config attributes are
        set on it; the rest are ignored.

        Raises:
            ConfigError / CheckpointError: no readable config.json there.
        """
        source = os.fspath(pretrained_model_name_or_path)
        if os.path.isdir(source):
            frozen = load_config(source)
        else:
            from ..io.resolve import resolve_checkpoint

            where = {k: kwargs.pop(k, None) for k in ("revision", "cache_dir", "local_files_only")}
            frozen = load_config(resolve_checkpoint(source, **where).config)
        view = DetachedConfig(frozen, {"_name_or_path": source}, cls if cls is not ConfigView else None)
        for key, value in kwargs.items():
            if hasattr(view, key):
                setattr(view, key, value)
        return view

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> ConfigView:
        """The text part of the config: fmodel's families are text models, so the config itself."""
        return self

    def frozen(self):
        """The frozen fmodel config this view shows (the one `model.state.config` holds)."""
        return self._frozen

    def __deepcopy__(self, memo: dict) -> Any:
        """A detached copy (a new frozen config value, no model): what `copy.deepcopy(config)` in
        client code means. Its writes change only the copy."""
        return DetachedConfig(self._frozen, dict(self._runtime), type(self))

    def __copy__(self) -> Any:
        return self.__deepcopy__({})

    def __reduce__(self):
        # the class is made per config class at run time: pickle the way to make it again
        return _rebuild_view, (type(self._frozen), self._owner, dict(self._runtime))


def _rebuild_view(config_class: type, owner: Any, runtime: dict[str, Any]) -> ConfigView:
    return _view_class_for(config_class)(owner, **runtime)


def _mirror_name_or_path(owner: Any, value: str) -> None:
    """Keep `owner.__dict__["name_or_path"]` equal to the view's `name_or_path`: Transformers'
    models hold it as an instance attribute and PEFT reads it from `model.__dict__` (the
    adapter config's `base_model_name_or_path`), past the facade's `name_or_path` property."""
    if hasattr(owner, "__dict__"):
        owner.__dict__["name_or_path"] = value


class _Holder:
    """The owner of a detached view: holds a frozen config and replaces it on writes."""

    def __init__(self, frozen) -> None:
        self._frozen_config = frozen
        self._attn_implementation = frozen.extra.get("_attn_implementation", "sdpa")
        self.dtype = None

    def _replace_config(self, new) -> None:
        self._frozen_config = new

    def set_attn_implementation(self, value: Any) -> None:
        self._attn_implementation = value


def DetachedConfig(
    frozen, runtime: dict[str, Any] | None = None, cls: type[ConfigView] | None = None
) -> ConfigView:
    """A config view over its own copy of `frozen`, not attached to any model."""
    cls = cls or view_class(frozen)
    return cls(_Holder(frozen), **(runtime or {}))


_VIEW_CLASSES: dict[type, type[ConfigView]] = {}


def view_class(frozen) -> type[ConfigView]:
    """The `ConfigView` subclass for `frozen`'s config class, named like it (`LlamaConfig`)."""
    return _view_class_for(type(frozen))


def _view_class_for(cls: type) -> type[ConfigView]:
    made = _VIEW_CLASSES.get(cls)
    if made is None:
        attributes = {"model_type": cls.model_type, "__module__": __name__}
        if cls.model_type != "bert":  # Transformers' decoder configs: Trainer drops the cache from logits
            attributes["keys_to_ignore_at_inference"] = ["past_key_values"]
        made = type(cls.__name__, (ConfigView,), attributes)
        _VIEW_CLASSES[cls] = made
    return made
