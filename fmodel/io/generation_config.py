"""The `generation_config.json` Transformers writes beside a generative model, as a pure function.

Transformers 4.57 gives every model that can generate a `GenerationConfig` built by
`GenerationConfig.from_model_config(model.config)` (unless it was loaded with one) and saves
it as the difference from `GenerationConfig()`'s defaults. `generation_config_from_model_config`
computes that same dict from an fmodel config, without importing Transformers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = ["GENERATION_DEFAULTS", "generation_config_from_model_config", "generation_config_json"]

# `GenerationConfig().to_dict()` of Transformers 4.57 (metadata keys left out). The tests check
# this table against the installed Transformers.
GENERATION_DEFAULTS: Mapping[str, Any] = {
    "assistant_confidence_threshold": 0.4,
    "assistant_early_exit": None,
    "assistant_lookbehind": 10,
    "bad_words_ids": None,
    "begin_suppress_tokens": None,
    "bos_token_id": None,
    "cache_config": None,
    "cache_implementation": None,
    "constraints": None,
    "decoder_start_token_id": None,
    "disable_compile": False,
    "diversity_penalty": 0.0,
    "do_sample": False,
    "dola_layers": None,
    "early_stopping": False,
    "encoder_no_repeat_ngram_size": 0,
    "encoder_repetition_penalty": 1.0,
    "eos_token_id": None,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "exponential_decay_length_penalty": None,
    "force_words_ids": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "guidance_scale": None,
    "is_assistant": False,
    "length_penalty": 1.0,
    "low_memory": None,
    "max_length": 20,
    "max_matching_ngram_size": None,
    "max_new_tokens": None,
    "max_time": None,
    "min_length": 0,
    "min_new_tokens": None,
    "min_p": None,
    "no_repeat_ngram_size": 0,
    "num_assistant_tokens": 20,
    "num_assistant_tokens_schedule": "constant",
    "num_beam_groups": 1,
    "num_beams": 1,
    "num_return_sequences": 1,
    "output_attentions": False,
    "output_hidden_states": False,
    "output_logits": None,
    "output_scores": False,
    "pad_token_id": None,
    "penalty_alpha": None,
    "prefill_chunk_size": None,
    "prompt_lookup_num_tokens": None,
    "remove_invalid_values": False,
    "renormalize_logits": False,
    "repetition_penalty": 1.0,
    "return_dict_in_generate": False,
    "return_legacy_cache": None,
    "sequence_bias": None,
    "stop_strings": None,
    "suppress_tokens": None,
    "target_lookbehind": 10,
    "temperature": 1.0,
    "token_healing": False,
    "top_k": 50,
    "top_p": 1.0,
    "typical_p": 1.0,
    "use_cache": True,
    "watermarking_config": None,
}
_EXTRA_OUTPUT_FLAGS = ("output_attentions", "output_hidden_states", "output_scores", "output_logits")


def _json(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    return value


def _model_config_dict(config) -> dict[str, Any]:
    """Every key of the model config with its value, as Transformers' `config.to_dict()` has
    them: fmodel's `to_dict` leaves out modelled fields still at their default (a Llama
    config's bos_token_id=1), which Transformers' has."""
    data = config.to_dict()
    if attrs.has(type(config)):
        for key in type(config).modelled_keys():
            if key in GENERATION_DEFAULTS and key not in data:
                data[key] = _json(getattr(config, key))
    return data


def generation_config_from_model_config(config) -> dict[str, Any]:
    """The `generation_config.json` dict Transformers 4.57 writes for a model with this config.

    As `GenerationConfig.from_model_config(config).to_diff_dict()`: the config's keys that are
    generation parameters (token ids, `use_cache`, legacy `max_length`, `temperature`, ...),
    without None values and without values equal to `GenerationConfig()`'s defaults, plus
    `"_from_model_config": true`; `return_dict_in_generate` becomes true when an `output_*`
    flag is set. `transformers_version` is the config's own (the version whose format the
    checkpoint follows) and is left out when the config has none.

    Not reproduced: Transformers' refusal to save a generation config whose flags contradict
    each other (e.g. `temperature` without `do_sample`), and the fallback to a sub-config's
    decoder (the families here have no sub-configs).

    Arguments:
        config: an fmodel config (anything with `to_dict()`).

    Returns:
        A new JSON-ready dict; the config is not modified.

    Example:
        >>> generation_config_from_model_config(LlamaConfig(vocab_size=96))
        {'_from_model_config': True, 'bos_token_id': 1, 'eos_token_id': 2}
    """
    data = _model_config_dict(config)
    out: dict[str, Any] = {"_from_model_config": True}
    for key, default in GENERATION_DEFAULTS.items():
        value = _json(data.get(key))
        if value is not None and value != default:
            out[key] = value
    if not out.get("return_dict_in_generate") and any(out.get(flag) for flag in _EXTRA_OUTPUT_FLAGS):
        out["return_dict_in_generate"] = True
    version = data.get("transformers_version")
    if version is not None:
        out["transformers_version"] = version
    return out


def generation_config_json(generation_config: Mapping[str, Any]) -> str:
    """The file text, formatted as Transformers writes it (indent 2, sorted keys, final newline)."""
    return json.dumps(_json(generation_config), indent=2, sort_keys=True) + "\n"
