"""`model.generation_config`: a mutable, Transformers-shaped generation config for the facade.

The choice: when Transformers is installed, the facade's `generation_config` is a real
`transformers.GenerationConfig`; without it, `MutableGenerationConfig` below, a small class with
the same API (every field as an attribute, unknown keys too; `update`, `to_dict`,
`to_diff_dict`, `to_json_string`, `to_json_file`, `save_pretrained`, `from_dict`,
`from_pretrained`, `validate`, `get_generation_mode`, equality, hashing, deepcopy).

Why the real class when it is there: the clients that touch `model.generation_config` are
Transformers' own (pipelines deep-copy it, `update()` it, write attributes, hand it back as
`generation_config=` and to `_prepare_generation_config`, which walks its `__dict__` and reads
`transformers_version`), PEFT (assigns it between models) and TRL (writes `pad_token_id` /
`eos_token_id`). Giving them Transformers' object makes `isinstance` checks, `validate()`'s
exact errors and warnings, watermarking / compile sub-configs and equality with configs they
build themselves agree with Transformers by construction, where a copy would drift. The
fallback exists so the facade keeps working without Transformers, and is tested against it.

Decoding reads such an object only through `to_frozen`, which turns its differences from the
defaults into fmodel's frozen `fmodel.GenerationConfig`: the functional core never sees a
mutable value.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
from typing import Any

from ..errors import InvalidArgumentError, UnsupportedOptionError
from ..generation.config import GenerationConfig as FrozenGenerationConfig
from ..io.generation_config import GENERATION_DEFAULTS, generation_config_from_model_config

__all__ = [
    "MutableGenerationConfig",
    "config_class",
    "from_dict",
    "from_model_config",
    "is_generation_config",
    "to_frozen",
]

logger = logging.getLogger("fmodel")

METADATA_FIELDS = ("_from_model_config", "_commit_hash", "_original_object_hash", "transformers_version")
# `generate` arguments that do not belong in a generation config (Transformers' validate refuses them).
_GENERATE_ARGUMENTS = (
    "logits_processor",
    "stopping_criteria",
    "prefix_allowed_tokens_fn",
    "synced_gpus",
    "assistant_model",
    "streamer",
    "negative_prompt_ids",
    "negative_prompt_attention_mask",
    "use_model_defaults",
)
# The Transformers version whose GenerationConfig this class follows (written as its
# `transformers_version`, which Transformers' `_prepare_generation_config` reads).
REFERENCE_VERSION = "4.57.6"


@functools.cache
def config_class() -> type:
    """`transformers.GenerationConfig` when Transformers is installed, else `MutableGenerationConfig`."""
    try:
        from transformers import GenerationConfig
    except ImportError:
        return MutableGenerationConfig
    return GenerationConfig


def is_generation_config(value: Any) -> bool:
    """A mutable generation config of either kind (Transformers' or this module's)."""
    if isinstance(value, MutableGenerationConfig):
        return True
    cls = config_class()
    return cls is not MutableGenerationConfig and isinstance(value, cls)


def from_dict(data: dict[str, Any]) -> Any:
    """A new mutable config from a generation_config.json dict (as `GenerationConfig.from_dict`)."""
    return config_class().from_dict(copy.deepcopy(dict(data)))


def from_model_config(model_config) -> Any:
    """Transformers' `GenerationConfig.from_model_config(config)` for an fmodel config: the
    config's generation keys (token ids, legacy `max_length`, ...), `_from_model_config` set and
    the hash of the unmodified value recorded in `_original_object_hash`."""
    data = generation_config_from_model_config(model_config)
    data.pop("transformers_version", None)
    config = from_dict(data)
    config._original_object_hash = hash(config)
    return config


def to_frozen(config: Any, *, drop: tuple[str, ...] = ()) -> FrozenGenerationConfig:
    """fmodel's frozen `GenerationConfig` with the values of a mutable one (either kind), minus
    the keys in `drop`; metadata keys are left out.

    Raises:
        ConfigError: a value fmodel's config refuses (names the field).
    """
    data = {k: v for k, v in config.to_diff_dict().items() if k not in METADATA_FIELDS and k not in drop}
    return FrozenGenerationConfig.from_dict(data, source="generation_config")


class MutableGenerationConfig:
    """Transformers 4.57's `GenerationConfig` API without Transformers (see the module docstring).

    Every key of `GENERATION_DEFAULTS` is an attribute with Transformers' default; other keyword
    arguments become attributes too (unless `_from_model_config`, as Transformers).
    """

    def __init__(self, **kwargs: Any) -> None:
        for key, default in GENERATION_DEFAULTS.items():
            setattr(self, key, kwargs.pop(key, copy.deepcopy(default)))
        self.is_assistant = False
        self._from_model_config = kwargs.pop("_from_model_config", False)
        self._commit_hash = kwargs.pop("_commit_hash", None)
        self.transformers_version = kwargs.pop("transformers_version", REFERENCE_VERSION)
        if not self._from_model_config:
            for key, value in kwargs.items():
                setattr(self, key, value)
        self.validate()

    # -- value semantics --------------------------------------------------------------------

    def __hash__(self) -> int:
        return hash(self.to_json_string(ignore_metadata=True))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MutableGenerationConfig):
            return False
        return self.to_json_string(use_diff=False, ignore_metadata=True) == other.to_json_string(
            use_diff=False, ignore_metadata=True
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string(ignore_metadata=True)}"

    # -- Transformers' methods --------------------------------------------------------------

    def get_generation_mode(self, assistant_model: Any = None) -> str:
        """Transformers' generation mode names: "greedy_search", "sample", "beam_search", ..."""
        if self.constraints is not None or self.force_words_ids is not None:
            return "constrained_beam_search"
        if self.num_beams == 1:
            if self.do_sample:
                mode = "sample"
            elif (
                self.top_k is not None
                and self.top_k > 1
                and self.penalty_alpha is not None
                and self.penalty_alpha > 0
            ):
                mode = "contrastive_search"
            else:
                mode = "greedy_search"
        elif self.num_beam_groups > 1:
            mode = "group_beam_search"
        else:
            mode = "beam_sample" if self.do_sample else "beam_search"
        assisted = assistant_model is not None or self.prompt_lookup_num_tokens is not None
        if (assisted or self.assistant_early_exit is not None) and mode in ("greedy_search", "sample"):
            return "assisted_generate"
        if self.dola_layers is not None and mode in ("greedy_search", "sample"):
            return "dola_generation"
        return mode

    def validate(self, strict: bool = False) -> None:
        """Transformers' checks: errors for impossible values, and (logged, or raised when
        `strict`) the flags that have no effect with the other settings."""
        if self.early_stopping not in {True, False, "never"}:
            raise InvalidArgumentError(
                f"`early_stopping` must be a boolean or 'never', but is {self.early_stopping}."
            )
        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            raise InvalidArgumentError(
                f"`max_new_tokens` must be greater than 0, but is {self.max_new_tokens}."
            )
        minor: dict[str, str] = {}
        if self.pad_token_id is not None and isinstance(self.pad_token_id, int) and self.pad_token_id < 0:
            minor["pad_token_id"] = f"`pad_token_id` should be positive but got {self.pad_token_id}."
        if self.do_sample is False:
            sampling_only = {
                "temperature": 1.0, "top_p": 1.0, "typical_p": 1.0, "top_k": 50, "epsilon_cutoff": 0.0,
                "eta_cutoff": 0.0,
            }  # fmt: skip
            for name, neutral in sampling_only.items():
                value = getattr(self, name)
                if value is not None and value != neutral:
                    minor[name] = f"`do_sample` is set to `False`. However, `{name}` is set to `{value}`."
            if self.min_p is not None:
                minor["min_p"] = f"`do_sample` is set to `False`. However, `min_p` is set to `{self.min_p}`."
        if self.num_beams == 1:
            if self.early_stopping is not False:
                minor["early_stopping"] = (
                    f"`num_beams` is set to 1. However, `early_stopping` is {self.early_stopping}."
                )
            if self.length_penalty is not None and self.length_penalty != 1.0:
                minor["length_penalty"] = (
                    f"`num_beams` is set to 1. However, `length_penalty` is {self.length_penalty}."
                )
        if self.num_return_sequences != 1:
            if self.num_beams == 1 and self.do_sample is False:
                raise InvalidArgumentError(
                    "Greedy methods without beam search do not support `num_return_sequences` different than 1 "
                    f"(got {self.num_return_sequences})."
                )
            if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
                raise InvalidArgumentError(
                    f"`num_return_sequences` ({self.num_return_sequences}) has to be smaller or equal to "
                    f"`num_beams` ({self.num_beams})."
                )
        if self.return_dict_in_generate is not True:
            for flag in ("output_attentions", "output_hidden_states", "output_scores", "output_logits"):
                if getattr(self, flag) is True:
                    minor[flag] = f"`return_dict_in_generate` is NOT set to `True`, but `{flag}` is."
        for arg in _GENERATE_ARGUMENTS:
            if hasattr(self, arg):
                raise InvalidArgumentError(
                    f"Argument `{arg}` is not a valid argument of `GenerationConfig`. It should be passed to "
                    "`generate()` (or a pipeline) directly."
                )
        if minor:
            if strict:
                details = "\n".join(f"- `{name}`: {issue}" for name, issue in minor.items())
                raise InvalidArgumentError("GenerationConfig is invalid: \n" + details)
            logger.warning(
                "The following generation flags are not valid and may be ignored: %s.", list(minor)
            )

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set the keys that are attributes already; return the others (the model kwargs)."""
        used = [key for key in kwargs if hasattr(self, key)]
        for key in used:
            setattr(self, key, kwargs[key])
        self.validate()
        return {key: value for key, value in kwargs.items() if key not in used}

    def to_dict(self) -> dict[str, Any]:
        output = copy.deepcopy(self.__dict__)
        for key in ("_commit_hash", "_original_object_hash", "compile_config"):
            output.pop(key, None)
        return output

    def to_diff_dict(self) -> dict[str, Any]:
        """The keys that differ from `MutableGenerationConfig()` (plus `transformers_version`)."""
        default = MutableGenerationConfig().to_dict()
        return {
            k: v
            for k, v in self.to_dict().items()
            if k not in default or k == "transformers_version" or v != default[k]
        }

    def to_json_string(self, use_diff: bool = True, ignore_metadata: bool = False) -> str:
        data = self.to_diff_dict() if use_diff else self.to_dict()
        if ignore_metadata:
            for key in METADATA_FIELDS:
                data.pop(key, None)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike, use_diff: bool = True) -> None:
        with open(json_file_path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string(use_diff=use_diff))

    def save_pretrained(
        self, save_directory: str | os.PathLike, config_file_name: str | None = None, **kwargs: Any
    ) -> None:
        """Write `generation_config.json` (the differences from the defaults) into the folder;
        refuses, as Transformers, a config with flags that have no effect."""
        if kwargs.get("push_to_hub"):
            raise UnsupportedOptionError(
                "MutableGenerationConfig.save_pretrained cannot push to the hub; push the model (model.push_to_hub)"
            )
        try:
            self.validate(strict=True)
        except ValueError as exc:
            raise InvalidArgumentError(str(exc) + "\n\nFix these issues to save the configuration.") from None
        if os.path.isfile(save_directory):
            raise AssertionError(f"Provided path ({save_directory}) should be a directory, not a file")
        os.makedirs(save_directory, exist_ok=True)
        self.to_json_file(os.path.join(save_directory, config_file_name or "generation_config.json"))

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        return_unused = kwargs.pop("return_unused_kwargs", False)
        kwargs.pop("_from_auto", None)
        kwargs.pop("_from_pipeline", None)
        config = cls(**{**config_dict, **kwargs})
        unused = config.update(**kwargs)
        return (config, unused) if return_unused else config

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name: str | os.PathLike, config_file_name: str | None = None, **kwargs
    ):
        """From a folder's (or a file path's) generation_config.json; hub ids need Transformers."""
        path = os.fspath(pretrained_model_name)
        file = (
            os.path.join(path, config_file_name or "generation_config.json") if os.path.isdir(path) else path
        )
        with open(file, encoding="utf-8") as f:
            return cls.from_dict(json.load(f), **kwargs)
