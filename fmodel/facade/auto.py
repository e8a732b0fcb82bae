"""Per-family classes (`LlamaForCausalLM`, ...) and the Auto classes that pick one from a config."""

from __future__ import annotations

import os
from typing import Any

from ..config import CONFIG_CLASSES, load_config
from ..errors import InvalidArgumentError
from ..io.resolve import resolve_checkpoint
from ..models import ARCHITECTURES, specs_for_model_type
from .adapters import adapter_source
from .arg_checks import check_config_argument, check_pretrained_path
from .model import PreTrainedModel

__all__ = [
    "FAMILY_CLASSES",
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForMaskedLM",
    "AutoModelForSeq2SeqLM",
    "AutoModelForSequenceClassification",
]


def _family_class(name: str) -> type[PreTrainedModel]:
    attributes = {
        "architecture": name,
        "config_class": CONFIG_CLASSES[ARCHITECTURES[name].model_type],  # fmodel's frozen config class
        "__doc__": f"fmodel's facade for `{name}`.",
    }
    keep = getattr(ARCHITECTURES[name].build, "_keep_in_fp32_modules", None)  # T5's ["wo"]
    if keep:
        attributes["_keep_in_fp32_modules"] = list(keep)
    return type(name, (PreTrainedModel,), attributes)


FAMILY_CLASSES: dict[str, type[PreTrainedModel]] = {name: _family_class(name) for name in ARCHITECTURES}
globals().update(FAMILY_CLASSES)  # importable by name (pickle finds a class by module and name)


class _Auto:
    """Picks the family class for a task from the checkpoint's config (`model_type`)."""

    output: str = ""

    @classmethod
    def _pick(cls, config) -> type[PreTrainedModel]:
        specs = [s for s in specs_for_model_type(config.model_type) if s.output == cls.output]
        if not specs:
            raise InvalidArgumentError(
                f"{cls.__name__}: model_type {config.model_type!r} has no {cls.output!r} class in fmodel"
            )
        return FAMILY_CLASSES[specs[0].name]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        check_pretrained_path(pretrained_model_name_or_path, f"{cls.__name__}.from_pretrained")
        config = kwargs.get("config")
        if config is None and (
            kwargs.get("gguf_file") or os.fspath(pretrained_model_name_or_path).endswith(".gguf")
        ):
            return cls._from_gguf(pretrained_model_name_or_path, *args, **kwargs)
        if config is None:
            # an adapter folder: the family is the base model's (the class loads both)
            base = adapter_source(
                os.fspath(pretrained_model_name_or_path),
                revision=kwargs.get("revision"),
                cache_dir=kwargs.get("cache_dir"),
            )
            files = resolve_checkpoint(
                base or pretrained_model_name_or_path,
                revision=kwargs.get("revision"),
                cache_dir=kwargs.get("cache_dir"),
                local_files_only=kwargs.get("local_files_only"),
            )
            config = load_config(files.config)
        return cls._pick(config).from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def _from_gguf(cls, path: str | os.PathLike, *args: Any, **kwargs: Any):
        """A GGUF file holds a causal LM (its config is in the file, read once while loading)."""
        if cls.output != "causal_lm":
            raise InvalidArgumentError(
                f"{cls.__name__}: GGUF checkpoints hold causal LMs; use AutoModelForCausalLM"
            )
        loaded = PreTrainedModel.from_pretrained(path, *args, **kwargs)
        model, info = loaded if isinstance(loaded, tuple) else (loaded, None)
        family = FAMILY_CLASSES[model._architecture].from_state(model.state)
        family.train(model.training)
        return family if info is None else (family, info)

    @classmethod
    def from_config(cls, config, **kwargs: Any) -> PreTrainedModel:
        check_config_argument(config, f"{cls.__name__}.from_config")
        return cls._pick(config)._from_config(config, **kwargs)


class AutoModel(_Auto):
    output = "base"


class AutoModelForCausalLM(_Auto):
    output = "causal_lm"


class AutoModelForMaskedLM(_Auto):
    output = "masked_lm"


class AutoModelForSeq2SeqLM(_Auto):
    output = "seq2seq_lm"


class AutoModelForSequenceClassification(_Auto):
    output = "sequence_classification"
