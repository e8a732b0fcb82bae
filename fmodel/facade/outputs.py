"""Transformers-shaped outputs: `ModelOutput` and the output classes the facade's forward returns.

`ModelOutput` behaves as Transformers' (`transformers.utils.ModelOutput`): an ordered dict of the
fields that are set (not None) and a dataclass at once; `out.logits`, `out["logits"]`, `out[0]`,
`out.to_tuple()`; a field left None is absent from the keys and positions; unknown attributes
raise AttributeError (there is no `.to()`, as in Transformers); `pop`/`update`/`del` are refused.

When Transformers is installed, `output_class` returns Transformers' own class of that name
(`CausalLMOutputWithPast`, ...): its pipelines test `isinstance(out, transformers.ModelOutput)`
to move outputs between devices, so only the real class keeps them working. Without it,
fmodel's dataclasses of the same names and fields stand in.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields, is_dataclass
from functools import partial
from typing import Any

import torch
import torch.utils._pytree as pytree

from .interop import transformers_or_none

__all__ = ["ModelOutput", "output_class"]


def _flatten(output: ModelOutput):
    return list(output.values()), list(output.keys())


def _unflatten(values, context, output_type=None):
    return output_type(**dict(zip(context, values, strict=True)))


class ModelOutput(OrderedDict):
    """Transformers' `ModelOutput` semantics: the set fields as an ordered dict, readable as
    attributes, keys and positions. Subclasses are dataclasses whose fields default to None;
    the base class itself takes a mapping (`ModelOutput({"logits": x})`)."""

    def __init_subclass__(cls) -> None:
        # as Transformers: outputs are pytree nodes (DDP static_graph, torch.compile outputs)
        pytree.register_pytree_node(
            cls,
            _flatten,
            partial(_unflatten, output_type=cls),
            serialized_type_name=f"{cls.__module__}.{cls.__name__}",
        )

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None:
                self[field.name] = value

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return dict(self.items())[key]
        return self.to_tuple()[key]

    def __getattr__(self, name: str) -> Any:
        # only the base class, built from a mapping, reaches here for its keys
        if not name.startswith("__") and name in self.keys():
            return dict.__getitem__(self, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.keys() and value is not None:
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __delitem__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"You cannot use ``__delitem__`` on a {type(self).__name__} instance.")

    def setdefault(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"You cannot use ``setdefault`` on a {type(self).__name__} instance.")

    def pop(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"You cannot use ``pop`` on a {type(self).__name__} instance.")

    def update(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"You cannot use ``update`` on a {type(self).__name__} instance.")

    def __reduce__(self):
        if not is_dataclass(self):
            return super().__reduce__()
        fn, _args, *rest = super().__reduce__()
        return fn, tuple(getattr(self, f.name) for f in fields(self)), *rest

    def to_tuple(self) -> tuple[Any, ...]:
        """The set fields, in field order."""
        return tuple(self[k] for k in self.keys())


pytree.register_pytree_node(
    ModelOutput,
    _flatten,
    partial(_unflatten, output_type=ModelOutput),
    serialized_type_name=f"{ModelOutput.__module__}.ModelOutput",
)

T = torch.Tensor | None
Tuple = tuple[torch.Tensor, ...] | None


@dataclass
class CausalLMOutputWithPast(ModelOutput):
    loss: T = None
    logits: T = None
    past_key_values: Any = None
    hidden_states: Tuple = None
    attentions: Tuple = None


@dataclass
class CausalLMOutputWithCrossAttentions(ModelOutput):
    loss: T = None
    logits: T = None
    past_key_values: Any = None
    hidden_states: Tuple = None
    attentions: Tuple = None
    cross_attentions: Tuple = None


@dataclass
class BaseModelOutputWithPast(ModelOutput):
    last_hidden_state: T = None
    past_key_values: Any = None
    hidden_states: Tuple = None
    attentions: Tuple = None


@dataclass
class BaseModelOutputWithPastAndCrossAttentions(ModelOutput):
    last_hidden_state: T = None
    past_key_values: Any = None
    hidden_states: Tuple = None
    attentions: Tuple = None
    cross_attentions: Tuple = None


@dataclass
class BaseModelOutputWithPoolingAndCrossAttentions(ModelOutput):
    last_hidden_state: T = None
    pooler_output: T = None
    hidden_states: Tuple = None
    past_key_values: Any = None
    attentions: Tuple = None
    cross_attentions: Tuple = None


@dataclass
class MoeCausalLMOutputWithPast(ModelOutput):
    loss: T = None
    aux_loss: T = None
    logits: T = None
    past_key_values: Any = None
    hidden_states: Tuple = None
    attentions: Tuple = None
    router_logits: Tuple = None


@dataclass
class MoeModelOutputWithPast(ModelOutput):
    last_hidden_state: T = None
    past_key_values: Any = None
    hidden_states: Tuple = None
    attentions: Tuple = None
    router_logits: Tuple = None


@dataclass
class MaskedLMOutput(ModelOutput):
    loss: T = None
    logits: T = None
    hidden_states: Tuple = None
    attentions: Tuple = None


@dataclass
class SequenceClassifierOutput(ModelOutput):
    loss: T = None
    logits: T = None
    hidden_states: Tuple = None
    attentions: Tuple = None


@dataclass
class SequenceClassifierOutputWithPast(ModelOutput):
    loss: T = None
    logits: T = None
    past_key_values: Any = None
    hidden_states: Tuple = None
    attentions: Tuple = None


@dataclass
class BaseModelOutput(ModelOutput):
    last_hidden_state: T = None
    hidden_states: Tuple = None
    attentions: Tuple = None


@dataclass
class Seq2SeqModelOutput(ModelOutput):
    last_hidden_state: T = None
    past_key_values: Any = None
    decoder_hidden_states: Tuple = None
    decoder_attentions: Tuple = None
    cross_attentions: Tuple = None
    encoder_last_hidden_state: T = None
    encoder_hidden_states: Tuple = None
    encoder_attentions: Tuple = None


@dataclass
class Seq2SeqLMOutput(ModelOutput):
    loss: T = None
    logits: T = None
    past_key_values: Any = None
    decoder_hidden_states: Tuple = None
    decoder_attentions: Tuple = None
    cross_attentions: Tuple = None
    encoder_last_hidden_state: T = None
    encoder_hidden_states: Tuple = None
    encoder_attentions: Tuple = None


_OWN = {
    cls.__name__: cls
    for cls in (
        BaseModelOutput,
        Seq2SeqModelOutput,
        Seq2SeqLMOutput,
        CausalLMOutputWithPast,
        CausalLMOutputWithCrossAttentions,
        BaseModelOutputWithPast,
        BaseModelOutputWithPastAndCrossAttentions,
        BaseModelOutputWithPoolingAndCrossAttentions,
        MaskedLMOutput,
        MoeCausalLMOutputWithPast,
        MoeModelOutputWithPast,
        SequenceClassifierOutput,
        SequenceClassifierOutputWithPast,
    )
}

# Transformers 4.57's output class per family (model_type, head); GPT-2 and BERT have their own.
_BY_FAMILY = {
    ("gpt2", "causal_lm"): "CausalLMOutputWithCrossAttentions",
    ("gpt2", "base"): "BaseModelOutputWithPastAndCrossAttentions",
    ("bert", "base"): "BaseModelOutputWithPoolingAndCrossAttentions",
    ("t5", "base"): "BaseModelOutput",  # T5EncoderModel's (T5Model's is seq2seq_call.py's)
    ("mixtral", "causal_lm"): "MoeCausalLMOutputWithPast",
    ("mixtral", "base"): "MoeModelOutputWithPast",
    ("qwen3_moe", "causal_lm"): "MoeCausalLMOutputWithPast",
    ("qwen3_moe", "base"): "MoeModelOutputWithPast",
}
_BY_HEAD = {
    "causal_lm": "CausalLMOutputWithPast",
    "base": "BaseModelOutputWithPast",
    "masked_lm": "MaskedLMOutput",
    "sequence_classification": "SequenceClassifierOutput",
    "seq2seq_lm": "Seq2SeqLMOutput",
}


def output_class(model_type: str, head: str) -> type:
    """The output class Transformers' forward returns for `model_type`'s `head` ("causal_lm",
    "base", "masked_lm", "sequence_classification"): Transformers' own when it is installed."""
    name = _BY_FAMILY.get((model_type, head)) or _BY_HEAD[head]
    if head == "sequence_classification" and model_type != "bert":
        name = "SequenceClassifierOutputWithPast"
    hf = transformers_or_none()
    if hf is not None:
        import transformers.modeling_outputs as hf_outputs

        return getattr(hf_outputs, name)
    return _OWN[name]
