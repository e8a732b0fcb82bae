"""`GenerationMixin`: Transformers' `generate`, `generation_config`, `prepare_inputs_for_generation`
and `_prepare_generation_config` for the facade.

The methods only sort out Transformers' arguments; decoding is `fmodel.generate` on
`self.state` (greedy, sampling, beam search), with a frozen `fmodel.GenerationConfig` made from
the mutable one (`generation_config.to_frozen`). The host class provides `state`, `forward`
and, optionally, `_tree` (its module tree, run so that hooks fire) and `_generation_config_dict`
in the instance `__dict__` (the generation_config.json the model was loaded with). The mutable
config lives in `__dict__["_generation_config"]` once read; `saved_generation_config` is what
`HubMixin` writes back.
"""

from __future__ import annotations

import copy
import inspect
import re
from typing import Any

import torch

from ..errors import ArgumentTypeError, InvalidArgumentError, UnsupportedOptionError
from ..generation.config import GenerationConfig as FrozenGenerationConfig
from ..generation.generate_call import GenerateOutput
from ..generation.generate_call import generate as functional_generate
from ..models import get_spec
from . import generation_config as gc
from .arg_checks import check_generate_lengths, check_model_inputs
from .outputs import ModelOutput
from .stopping import MaxTime, stop_string_criterion

__all__ = ["GenerationMixin", "saved_generation_config"]

# Model kwargs every Transformers model accepts (TransformersKwargs' optional keys).
_TRANSFORMERS_KWARGS = frozenset(
    {
        "cu_seq_lens_k", "cu_seq_lens_q", "max_length_k", "max_length_q", "num_items_in_batch",
        "output_attentions", "output_hidden_states", "output_router_logits",
    }
)  # fmt: skip
# Model kwargs fmodel's generate honours; other known ones are refused by name.
# `output_router_logits` (mixtures of experts) changes no token: the router logits are not part
# of what generate returns, so either value is honoured by decoding as usual.
_HONOURED_MODEL_KWARGS = frozenset(
    {"input_ids", "attention_mask", "logits_to_keep", "decoder_input_ids", "output_router_logits"}
)
# What Transformers' T5 forward takes beyond the facade's named arguments (its **kwargs hide them).
_SEQ2SEQ_FORWARD = frozenset(
    {
        "decoder_input_ids", "decoder_attention_mask", "decoder_inputs_embeds", "encoder_outputs",
        "head_mask", "decoder_head_mask", "cross_attn_head_mask",
    }
)  # fmt: skip
# Config values that pick a decoding method fmodel does not implement: (field, is it set?).
_UNSUPPORTED_MODES = {
    "num_beam_groups": lambda v: v is not None and v > 1,
    "constraints": lambda v: v is not None,
    "force_words_ids": lambda v: v is not None,
    "penalty_alpha": lambda v: v is not None and v > 0,
    "dola_layers": lambda v: v is not None,
    "prompt_lookup_num_tokens": lambda v: v is not None,
    "assistant_early_exit": lambda v: v is not None,
    "low_memory": lambda v: bool(v),
    "prefill_chunk_size": lambda v: v is not None,
    "watermarking_config": lambda v: v is not None,
}
_UNSUPPORTED_ARGUMENTS = (
    "prefix_allowed_tokens_fn", "assistant_model", "negative_prompt_ids", "negative_prompt_attention_mask",
    "custom_generate",
)  # fmt: skip
# Custom logits processors of these Transformers types replace the built-in one (config field, off value).
_REPLACES_PROCESSOR = {"RepetitionPenaltyLogitsProcessor": ("repetition_penalty", 1.0)}


class GenerationMixin:
    """Adds Transformers' `generate(...)`, `generation_config` and generation helpers to a facade model."""

    @property
    def generation_config(self) -> Any:
        """The model's decoding defaults: a mutable `transformers.GenerationConfig` (fmodel's
        `MutableGenerationConfig` without Transformers), built once from the generation_config.json
        the model was loaded with, else from the model config; the same object every time, so
        attribute writes persist and the next `generate` uses them."""
        config = self.__dict__.get("_generation_config")
        if config is None:
            data = self.__dict__.get("_generation_config_dict")
            config = gc.from_dict(data) if data is not None else gc.from_model_config(self.state.config)
            self.__dict__["_generation_config"] = config
        return config

    @generation_config.setter
    def generation_config(self, value: Any) -> None:
        self.__dict__["_generation_config"] = _as_mutable(value)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        past_key_values: Any = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache_position: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Transformers' `prepare_inputs_for_generation`: the forward's inputs for the next step.

        With a cache, only the tokens it has not seen (`input_ids[:, cache_position]`, or the
        last `len(cache_position)` ones); `inputs_embeds` only while they cover every position
        to compute; `position_ids` from the attention mask (real tokens counted, padding 1);
        other keyword arguments passed through; `labels` dropped. `cache_position` is used to
        slice, not returned: fmodel's forward takes positions from the cache it is given.
        """
        inputs: dict[str, Any] = {}
        if past_key_values is not None:
            inputs["past_key_values"] = past_key_values
            if cache_position is not None:
                if inputs_embeds is not None and input_ids.shape[1] == 0:
                    inputs_embeds = inputs_embeds[:, -cache_position.shape[0] :]
                elif inputs_embeds is not None or cache_position[-1] >= input_ids.shape[1]:
                    input_ids = input_ids[:, -cache_position.shape[0] :]
                elif input_ids.shape[1] != cache_position.shape[0]:
                    input_ids = input_ids[:, cache_position]
        steps = cache_position.shape[0] if cache_position is not None else None
        if inputs_embeds is not None and (steps is None or steps == inputs_embeds.shape[1]):
            inputs["input_ids"], inputs["inputs_embeds"] = None, inputs_embeds
        else:
            inputs["input_ids"] = input_ids.clone(memory_format=torch.contiguous_format)
            inputs["inputs_embeds"] = None
        if attention_mask is not None and kwargs.get("position_ids") is None:
            position_ids = attention_mask.long().cumsum(-1) - 1
            kwargs["position_ids"] = position_ids.masked_fill(attention_mask == 0, 1)
        for name in ("position_ids", "token_type_ids"):
            value = kwargs.get(name)
            if value is not None:
                if past_key_values is not None:
                    current = inputs[
                        "input_ids" if inputs["inputs_embeds"] is None else "inputs_embeds"
                    ].shape[1]
                    value = value[:, -current:].clone(memory_format=torch.contiguous_format)
                inputs[name] = value
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        for key, value in kwargs.items():
            inputs.setdefault(key, value)
        inputs.pop("labels", None)
        return inputs

    def _prepare_generation_config(
        self, generation_config: Any, use_model_defaults: bool | None = None, **kwargs: Any
    ) -> tuple[Any, dict[str, Any]]:
        """Transformers' `_prepare_generation_config`: a deep copy of `generation_config` (default:
        `self.generation_config`), with the model's non-default values filling the given config's
        default ones (`use_model_defaults`, default: when the model's config was written by
        Transformers >= 4.50), then `kwargs` applied. Returns (config, the kwargs that are not
        generation settings: the model kwargs). Not reproduced: the deprecated fallback to
        generation settings written into the model config."""
        using_model_config = generation_config is None
        if using_model_config:
            generation_config = self.generation_config
            if generation_config.cache_implementation == "hybrid":
                generation_config.cache_implementation = None
        generation_config = copy.deepcopy(_as_mutable(generation_config))
        if not using_model_config:
            model_config = self.generation_config
            if use_model_defaults is True or (
                use_model_defaults is None and _version(model_config) >= (4, 50)
            ):
                default = type(generation_config)()
                for key, value in model_config.__dict__.items():
                    if key.startswith("_") or key == "transformers_version":
                        continue
                    if key == "cache_implementation" and value == "hybrid":
                        continue
                    default_value = getattr(default, key, None)
                    if getattr(generation_config, key, None) == default_value and value != default_value:
                        setattr(generation_config, key, value)
                if generation_config.temperature == 0.0:
                    generation_config.do_sample = False
            else:
                for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
                    if getattr(generation_config, key) is None:
                        setattr(generation_config, key, getattr(model_config, key))
        model_kwargs = generation_config.update(**kwargs)
        for flag in ("output_attentions", "output_hidden_states"):
            if getattr(generation_config, flag):
                model_kwargs[flag] = True
        return generation_config, model_kwargs

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: Any = None,
        logits_processor: Any = None,
        stopping_criteria: Any = None,
        prefix_allowed_tokens_fn: Any = None,
        synced_gpus: bool | None = None,
        assistant_model: Any = None,
        streamer: Any = None,
        negative_prompt_ids: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        use_model_defaults: bool | None = None,
        custom_generate: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor | ModelOutput:
        """Greedy, sampled or beam-search decoding, as Transformers' `generate`.

        Arguments:
            inputs: [B, P] prompt ids, left-padded (or `input_ids=`); without, one BOS token.
            generation_config: base settings (a `transformers.GenerationConfig`, fmodel's
                mutable or frozen `GenerationConfig`, or a dict); default `self.generation_config`.
            logits_processor: callables `(input_ids, scores) -> scores` (a
                `transformers.LogitsProcessorList` works), run after the built-in processors
                and before the sampling warpers; one of the type of a built-in one replaces it.
            stopping_criteria: callables `(input_ids, scores) -> BoolTensor[B]` or bool (a
                `transformers.StoppingCriteriaList` works); a `MaxLengthCriteria` replaces the
                length limit (greedy and sampling), as Transformers.
            streamer: Transformers' streamer protocol (`put`, `end`; not with beams).
            use_model_defaults: as Transformers (see `_prepare_generation_config`).
            **kwargs: generation settings (any `GenerationConfig` field: max_new_tokens, num_beams,
                num_return_sequences, length_penalty, early_stopping, stop_strings, use_cache,
                return_dict_in_generate, output_scores, output_logits, ...), `tokenizer` (for
                `stop_strings`), fmodel's `generator` (a torch.Generator for sampling), and the
                model kwargs `attention_mask` [B, P] / `input_ids`.

        Returns:
            LongTensor [B * num_return_sequences, P + N], or with `return_dict_in_generate`
            Transformers' `GenerateDecoderOnlyOutput` / `GenerateBeamDecoderOnlyOutput` (fmodel's
            `ModelOutput` with the same fields without Transformers).

        Raises:
            ValueError: model kwargs the model does not take (named, as Transformers'
                `_validate_model_kwargs`), contradictory settings, `stop_strings` without `tokenizer`.
            UnsupportedOptionError: a decoding method or input fmodel does not offer (assisted,
                constrained or group beam search, contrastive search, DoLa, `inputs_embeds`,
                a starting `past_key_values`, attention / hidden-state outputs).
        """
        given = {
            "prefix_allowed_tokens_fn": prefix_allowed_tokens_fn,
            "assistant_model": assistant_model,
            "negative_prompt_ids": negative_prompt_ids,
            "negative_prompt_attention_mask": negative_prompt_attention_mask,
            "custom_generate": custom_generate,
        }
        for name in _UNSUPPORTED_ARGUMENTS:
            if given[name] is not None:
                raise UnsupportedOptionError(f"generate: {name} is not supported by fmodel (only None)")
        if synced_gpus:
            raise UnsupportedOptionError("generate: synced_gpus=True is not supported by fmodel")
        check_generate_lengths(kwargs)
        check_model_inputs(None, None, "generate", attention_mask=kwargs.get("attention_mask"))
        tokenizer = kwargs.pop("tokenizer", None)
        kwargs.pop("assistant_tokenizer", None)
        kwargs.pop("trust_remote_code", None)
        generator = kwargs.pop("generator", None)
        explicit_max_length = kwargs.get("max_length")
        config, model_kwargs = self._prepare_generation_config(
            generation_config, use_model_defaults, **kwargs
        )
        self._validate_model_kwargs(model_kwargs.copy())
        input_ids, attention_mask = self._generation_inputs(inputs, model_kwargs, config)
        for name, is_set in _UNSUPPORTED_MODES.items():
            if is_set(getattr(config, name, None)):
                raise UnsupportedOptionError(
                    f"generate: {name}={getattr(config, name)!r} is not supported by fmodel"
                )
        criteria = list(stopping_criteria or [])
        processors = list(logits_processor or [])
        changes: dict[str, Any] = {}
        for processor in processors:
            field = _REPLACES_PROCESSOR.get(_transformers_type(processor))
            if field is not None:
                changes[field[0]] = field[1]
            elif (
                _transformers_type(processor) == "MinLengthLogitsProcessor" and config.min_new_tokens is None
            ):
                changes["min_length"] = 0
        encoder_decoder = getattr(get_spec(self._architecture).build, "is_encoder_decoder", False)
        decoder_input_ids = model_kwargs.get("decoder_input_ids")
        # the length Transformers' criterion counts: the decoder's (start token + decoder prompt)
        for criterion in criteria:
            if (
                _transformers_type(criterion) == "MaxLengthCriteria"
                and config.num_beams == 1
                and isinstance(input_ids, torch.Tensor)  # else fmodel.generate names the bad prompt
            ):
                length = (
                    input_ids.shape[1]
                    if not encoder_decoder
                    else 1 + (0 if decoder_input_ids is None else decoder_input_ids.shape[-1])
                )
                changes["max_new_tokens"] = max(criterion.max_length - length, 1)
        if config.stop_strings is not None:
            criteria.insert(0, stop_string_criterion(config.stop_strings, tokenizer))
        if config.max_time is not None:
            criteria.insert(0, MaxTime(config.max_time))
        frozen = to_frozen_for_generate(config, changes)
        asked = sorted(set(frozen.ignored_fields()) & set(kwargs))
        if asked:  # from the model's own file they are ignored with a warning (fmodel.generate)
            raise UnsupportedOptionError(f"generate: fmodel does not implement {asked}")
        out = functional_generate(
            self.state,
            input_ids,
            attention_mask=attention_mask,
            generation_config=frozen,
            max_length=explicit_max_length if "max_new_tokens" not in changes else None,
            generator=generator,
            streamer=streamer,
            logits_processor=processors,
            stopping_criteria=criteria,
            # a tensor-parallel model runs fmodel's tensor-parallel skeleton (forward_call.py)
            module=None if self.__dict__.get("_tp_mesh") is not None else getattr(self, "_tree", None),
            decoder_input_ids=decoder_input_ids,
        )
        if not isinstance(out, GenerateOutput):
            return out
        return _transformers_output(out, frozen.num_beams > 1, encoder_decoder)

    def _validate_model_kwargs(self, model_kwargs: dict[str, Any]) -> None:
        """Transformers' check: a model kwarg neither `prepare_inputs_for_generation` nor the
        forward takes (a typo in a generation argument, too) raises a ValueError naming it."""
        accepted = set(inspect.signature(self.prepare_inputs_for_generation).parameters)
        accepted |= set(inspect.signature(self.forward).parameters)
        if getattr(get_spec(self._architecture).build, "is_encoder_decoder", False):
            accepted |= _SEQ2SEQ_FORWARD
        unused = [
            key for key, value in model_kwargs.items()
            if value is not None and key not in accepted and key not in _TRANSFORMERS_KWARGS
        ]  # fmt: skip
        if unused:
            raise InvalidArgumentError(
                f"The following `model_kwargs` are not used by the model: {unused} (note: typos in the"
                " generate arguments will also show up in this list)"
            )
        refused = sorted(
            k for k, v in model_kwargs.items() if v is not None and k not in _HONOURED_MODEL_KWARGS
        )
        if refused:
            raise UnsupportedOptionError(
                f"generate: fmodel's generate does not take {refused}; it takes input_ids and attention_mask"
            )

    def _generation_inputs(self, inputs, model_kwargs: dict[str, Any], config) -> tuple[torch.Tensor, Any]:
        input_ids = model_kwargs.pop("input_ids", None)
        if inputs is not None and input_ids is not None:
            raise InvalidArgumentError("generate: pass the prompt once, as `inputs` or as `input_ids`")
        input_ids = inputs if inputs is not None else input_ids
        if input_ids is None:  # Transformers starts from one BOS token
            if config.bos_token_id is None:
                raise InvalidArgumentError(
                    "`bos_token_id` has to be defined when no `input_ids` are provided."
                )
            input_ids = torch.full((1, 1), config.bos_token_id, dtype=torch.long, device=self.state.device)
        attention_mask = model_kwargs.get("attention_mask")
        if attention_mask is not None and attention_mask.dim() > 2:
            raise InvalidArgumentError("`attention_mask` passed to `generate` must be 2D.")
        return input_ids, attention_mask


def to_frozen_for_generate(config: Any, changes: dict[str, Any]) -> FrozenGenerationConfig:
    """The frozen config `fmodel.generate` runs: the mutable one's values (without the keys the
    facade handles itself) with `changes`."""
    frozen = gc.to_frozen(config, drop=("stop_strings", "max_time", "watermarking_config", "compile_config"))
    return frozen.replace(**changes) if changes else frozen


def saved_generation_config(model: Any) -> dict[str, Any] | None:
    """The generation_config.json dict `save_pretrained` writes: the file the model was loaded
    with (None: derived from the config) while `model.generation_config` still says the same,
    else the config's differences from the defaults, as Transformers saves them (refusing, as
    Transformers, flags that have no effect)."""
    loaded = model.__dict__.get("_generation_config_dict")
    current = model.__dict__.get("_generation_config")
    if current is None:
        return loaded
    base = gc.from_dict(loaded) if loaded is not None else gc.from_model_config(model.state.config)
    if _comparable(current) == _comparable(base):
        return loaded
    current.validate(strict=True)
    return current.to_diff_dict()


def _comparable(config: Any) -> dict[str, Any]:
    return {
        k: v for k, v in config.to_diff_dict().items() if k not in ("transformers_version", "_commit_hash")
    }


def _as_mutable(value: Any) -> Any:
    if gc.is_generation_config(value):
        return value
    if isinstance(value, FrozenGenerationConfig):
        return gc.from_dict(value.to_dict())
    if isinstance(value, dict):
        return gc.from_dict(value)
    if hasattr(value, "to_dict") and hasattr(value, "update"):  # another Transformers-shaped config
        return gc.from_dict(value.to_dict())
    raise ArgumentTypeError(
        f"generation_config must be a transformers.GenerationConfig, an fmodel GenerationConfig or a dict, "
        f"got {type(value).__name__}"
    )


def _version(config: Any) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", str(getattr(config, "transformers_version", None) or ""))
    return (int(match[1]), int(match[2])) if match else (0, 0)


def _transformers_type(obj: Any) -> str | None:
    """The class name when `obj` is one of Transformers' own processors or criteria."""
    cls = type(obj)
    return cls.__name__ if cls.__module__.startswith("transformers.") else None


def _transformers_output(out: GenerateOutput, beams: bool, encoder_decoder: bool = False) -> Any:
    """Transformers' output class for `out` (fmodel's `ModelOutput` without Transformers):
    `Generate[Beam]DecoderOnlyOutput`, or `Generate[Beam]EncoderDecoderOutput` for T5."""
    fields = {"sequences": out.sequences}
    if beams:
        fields["sequences_scores"] = out.sequences_scores
    fields.update(scores=out.scores, logits=out.logits)
    if beams:
        fields["beam_indices"] = out.beam_indices
    if encoder_decoder:
        fields.update(
            encoder_attentions=None,
            encoder_hidden_states=None,
            decoder_attentions=None,
            cross_attentions=None,
            decoder_hidden_states=None,
            past_key_values=out.past_key_values,
        )
    else:
        fields.update(attentions=None, hidden_states=None, past_key_values=out.past_key_values)
    try:
        from transformers import generation as hf_generation
    except ImportError:
        return ModelOutput((k, v) for k, v in fields.items() if v is not None)
    kind = "EncoderDecoder" if encoder_decoder else "DecoderOnly"
    return getattr(hf_generation, f"Generate{'Beam' if beams else ''}{kind}Output")(**fields)
