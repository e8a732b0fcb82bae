"""Configs in and out of the facade: any config a user passes (fmodel's, a `ConfigView`, a
Transformers `PretrainedConfig`, a dict) as fmodel's frozen config, a frozen config with some
keys changed, and Transformers' base-config defaults that a checkpoint need not write."""

from __future__ import annotations

from typing import Any

import attrs

from .._frozen import freeze, thaw
from ..config import config_from_dict
from ..errors import ArgumentTypeError

__all__ = ["HF_DEFAULTS", "as_fmodel_config", "transformers_version", "updated_config"]

# Transformers' PretrainedConfig attributes and their defaults (4.57, `PretrainedConfig.__init__`
# and the generation defaults it still sets on every config).
HF_DEFAULTS: dict[str, Any] = {
    "return_dict": True,
    "output_hidden_states": False,
    "output_attentions": False,
    "torchscript": False,
    "chunk_size_feed_forward": 0,
    "is_encoder_decoder": False,
    "is_decoder": False,
    "cross_attention_hidden_size": None,
    "add_cross_attention": False,
    "tie_encoder_decoder": False,
    "finetuning_task": None,
    "task_specific_params": None,
    "problem_type": None,
    "tokenizer_class": None,
    "prefix": None,
    "sep_token_id": None,
    "decoder_start_token_id": None,
    "tf_legacy_loss": False,
    "use_bfloat16": False,
    "transformers_version": None,
    "max_length": 20,
    "min_length": 0,
    "do_sample": False,
    "early_stopping": False,
    "num_beams": 1,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "num_return_sequences": 1,
    "output_scores": False,
    "return_dict_in_generate": False,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "remove_invalid_values": False,
    "exponential_decay_length_penalty": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "base_model_tp_plan": None,
    "base_model_pp_plan": None,
    "base_model_ep_plan": None,
}


def updated_config(frozen, changes: dict[str, Any]):
    """`frozen` with `changes` applied: modelled fields by `replace` (validated), other keys in
    `extra`. Raises ConfigError for a bad value."""
    modelled = set(type(frozen).modelled_keys()) | set(type(frozen).field_aliases)
    fields = {k: v for k, v in changes.items() if k in modelled}
    others = {k: v for k, v in changes.items() if k not in modelled}
    new = frozen.replace(**fields) if fields else frozen
    if others:
        new = attrs.evolve(new, extra=freeze({**thaw(new.extra), **others}))
    return new


def as_fmodel_config(config: Any):
    """An fmodel frozen config from any config a user may pass: fmodel's own, a `ConfigView`, a
    Transformers `PretrainedConfig` (or anything with `to_dict()`), or a config.json dict."""
    if hasattr(config, "frozen") and callable(config.frozen):  # a ConfigView
        return config.frozen()
    if attrs.has(type(config)):
        return config
    data = config.to_dict() if hasattr(config, "to_dict") else config
    if not isinstance(data, dict):
        raise ArgumentTypeError(
            f"expected a model config (fmodel, Transformers or a dict), got {type(config).__name__}"
        )
    data = {
        k: v
        for k, v in data.items()
        if not k.startswith("_") and not (k in _DROP_ON_IMPORT and v == HF_DEFAULTS[k])
    }
    if data.get("id2label") in ({"0": "LABEL_0", "1": "LABEL_1"}, {0: "LABEL_0", 1: "LABEL_1"}):
        data.pop("id2label")
        data.pop("label2id", None)
    for key in ("dtype", "torch_dtype"):
        if key in data and not isinstance(data[key], (str, type(None))):
            data[key] = str(data[key]).removeprefix("torch.")
    return config_from_dict(data, source=type(config).__name__)


# Keys of Transformers' `to_dict()` that, at their default values, are its defaults rather than
# the checkpoint's: importing them would write every one into config.json.
_DROP_ON_IMPORT = frozenset(HF_DEFAULTS) - {"transformers_version"}


def transformers_version() -> str | None:
    from .interop import transformers_or_none

    hf = transformers_or_none()
    return None if hf is None else hf.__version__
