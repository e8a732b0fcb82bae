"""`GenerationMixin`: Transformers' `generate` and `generation_config` for the facade.

The methods only sort out Transformers' arguments; decoding is `fmodel.generate` on
`self.state`. The host class provides `state`, `config` and, optionally, `_tree` (its module
tree, run so that hooks fire) and `_generation_config_dict` in the instance `__dict__` (the
generation_config.json the model was loaded with; `HubMixin` saves it back).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UnsupportedOptionError
from ..generate import generate as functional_generate
from ..generation_config import GenerationConfig

__all__ = ["GenerationMixin"]

# Keyword arguments of Transformers' `generate` that map onto `GenerationConfig` fields.
_CONFIG_KWARGS = frozenset(
    {
        "max_new_tokens",
        "max_length",
        "min_new_tokens",
        "min_length",
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "repetition_penalty",
        "eos_token_id",
        "pad_token_id",
        "bos_token_id",
        "num_beams",
    }
)
# Accepted when they ask for what fmodel does anyway (their value must equal the given one).
_NEUTRAL_KWARGS = {
    "use_cache": True,
    "num_return_sequences": 1,
    "return_dict_in_generate": False,
    "output_scores": False,
    "output_logits": False,
    "output_attentions": False,
    "output_hidden_states": False,
    "synced_gpus": None,
    "logits_processor": None,
    "stopping_criteria": None,
}
# Fields where Transformers reads an explicit None as "off" (its processors test `is not None`).
_NONE_MEANS = {"top_k": 0, "top_p": 1.0, "temperature": 1.0, "repetition_penalty": 1.0}
_NEVER_NONE = frozenset({"max_length", "min_length", "num_beams", "do_sample"})


class GenerationMixin:
    """Adds Transformers' `generate(...)` and `generation_config` to a facade model."""

    @property
    def generation_config(self) -> GenerationConfig:
        """The model's decoding defaults: the generation_config.json it was loaded with, else
        the model config's token ids (`GenerationConfig.from_model_config`). A frozen value:
        change it with `model.generation_config = model.generation_config.replace(top_k=10)`."""
        data = self.__dict__.get("_generation_config_dict")
        if data is not None:
            return GenerationConfig.from_dict(data)
        return GenerationConfig.from_model_config(self.config)

    @generation_config.setter
    def generation_config(self, value: GenerationConfig | dict[str, Any]) -> None:
        if isinstance(value, GenerationConfig):
            value = value.to_dict()
        if not isinstance(value, dict):
            raise TypeError(
                f"generation_config must be a GenerationConfig or a dict, got {type(value).__name__}"
            )
        GenerationConfig.from_dict(value)  # validate now, not at the next generate
        self.__dict__["_generation_config_dict"] = dict(value)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | dict[str, Any] | None = None,
        streamer: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Greedy or sampled decoding, as Transformers' `generate` (num_beams=1).

        Arguments:
            input_ids: [B, P] prompts, left-padded (`inputs=` is accepted too).
            attention_mask: [B, P], 1 for real tokens.
            generation_config: defaults (a `GenerationConfig` or dict); default `self.generation_config`.
            streamer: Transformers' streamer protocol (`put`, `end`).
            **kwargs: Transformers' generation arguments, overriding the config: max_new_tokens,
                max_length, min_new_tokens, min_length, do_sample, temperature, top_k, top_p,
                repetition_penalty, eos_token_id, pad_token_id, bos_token_id, num_beams (1 only);
                fmodel's `generator` (a torch.Generator for sampling); and, at their neutral
                values only, use_cache, num_return_sequences, return_dict_in_generate, output_*.

        Returns:
            LongTensor [B, P + N]: the prompts followed by the new tokens.

        Raises:
            UnsupportedOptionError: num_beams > 1, or an option at a value fmodel does not offer.
            TypeError: an argument `generate` does not know.
        """
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        if input_ids is None:
            raise ValueError("generate: pass input_ids (the prompt tokens [batch, seq])")
        generator = kwargs.pop("generator", None)
        for name, neutral in _NEUTRAL_KWARGS.items():
            if name in kwargs:
                value = kwargs.pop(name)
                if value != neutral and not (neutral is None and not value):
                    raise UnsupportedOptionError(
                        f"generate: {name}={value!r} is not supported by fmodel (only {neutral!r})"
                    )
        unknown = set(kwargs) - _CONFIG_KWARGS
        if unknown:
            raise TypeError(
                f"generate: unexpected arguments {sorted(unknown)}; fmodel takes {sorted(_CONFIG_KWARGS)}"
            )
        if kwargs.get("num_beams", 1) != 1:
            raise UnsupportedOptionError(
                f"generate: beam search is not supported (num_beams={kwargs['num_beams']}); use num_beams=1"
            )
        config = generation_config if generation_config is not None else self.generation_config
        if not isinstance(config, GenerationConfig):
            config = GenerationConfig.from_dict(config)
        changes = {}
        for name, value in kwargs.items():  # Transformers' update(): an explicit None counts
            if value is None:
                if name in _NEVER_NONE:
                    continue
                value = _NONE_MEANS.get(name)
            changes[name] = value
        max_length = changes.pop("max_length", None)  # passed on: an explicit one counts as such
        config = config.replace(**changes)
        return functional_generate(
            self.state,
            input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            max_length=max_length,
            generator=generator,
            streamer=streamer,
            module=getattr(self, "_tree", None),
        )
