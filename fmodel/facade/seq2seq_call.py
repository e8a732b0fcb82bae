"""The facade's forward for encoder-decoder models (T5), and Transformers' calls of their stacks.

`seq2seq_forward` is `ForwardMixin._forward_module` for a module tree that is an
encoder-decoder: Transformers' arguments (`decoder_input_ids`, `decoder_attention_mask`,
`encoder_outputs`, `labels` shifted right into decoder inputs when no decoder inputs are
given), a decoder cache when `use_cache` (grown as needed when passed back, as Transformers'
DynamicCache), and Transformers' output classes: `Seq2SeqLMOutput` (`loss`: cross entropy over
the decoder positions, -100 ignored, a plain mean, as T5 computes it) and `Seq2SeqModelOutput`.

`bind_stack_calls` makes `model.encoder` / `model.decoder` (what `get_encoder()` /
`get_decoder()` return) callable as Transformers' `T5Stack`: a call without fmodel's `attn`
runs the stack over its own parameters and returns `BaseModelOutput` (the encoder) or
`BaseModelOutputWithPastAndCrossAttentions` (the decoder, without a cache).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
from torch import nn

from .. import attention, losses
from ..errors import ArgumentTypeError, UnsupportedOptionError
from ..forward import prepare_call, to_output
from ..generation.cache import KVCache, init_cache
from ..generation.seq2seq_cache import Seq2SeqCache, self_attention_cache
from ..models.t5 import shift_right

__all__ = ["bind_stack_calls", "seq2seq_forward"]

# Transformers' output fields per head, from fmodel's ModelOutput fields.
_FIELDS = {
    "seq2seq_lm": {"logits": "logits"},
    "base": {"last_hidden_state": "last_hidden_state"},
}
_SHARED = {
    "past_key_values": "past_key_values",
    "decoder_hidden_states": "hidden_states",
    "decoder_attentions": "attentions",
    "cross_attentions": "cross_attentions",
    "encoder_last_hidden_state": "encoder_last_hidden_state",
    "encoder_hidden_states": "encoder_hidden_states",
    "encoder_attentions": "encoder_attentions",
}


def seq2seq_forward(
    model,
    module: nn.Module,
    head: str,
    *,
    input_ids,
    attention_mask,
    position_ids,
    past_key_values,
    inputs_embeds,
    labels,
    use_cache: bool,
    output_attentions: bool,
    output_hidden_states: bool,
    return_dict: bool,
    logits_to_keep: int,
    kwargs: dict[str, Any],
):
    """The facade forward of an encoder-decoder tree (see the module docstring); `use_cache`,
    `output_*` and `return_dict` already resolved against the config."""
    for name in ("head_mask", "decoder_head_mask", "cross_attn_head_mask"):
        if kwargs.pop(name, None) is not None:
            raise UnsupportedOptionError(f"forward: {name} is not supported by fmodel's T5")
    decoder_input_ids = kwargs.pop("decoder_input_ids", None)
    decoder_inputs_embeds = kwargs.pop("decoder_inputs_embeds", None)
    if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
        decoder_input_ids = shift_right(model._frozen_config, labels)
    decoder = decoder_input_ids if decoder_input_ids is not None else decoder_inputs_embeds
    if decoder is not None and use_cache and past_key_values is None:
        past_key_values = init_cache(model._call_info(), decoder.shape[0], max(decoder.shape[1], 1))
    if past_key_values is not None and decoder is not None:
        past_key_values = _with_room(past_key_values, decoder.shape[1])
    call = dict(
        attention_mask=attention_mask,
        position_ids=position_ids,
        inputs_embeds=inputs_embeds,
        output_hidden_states=bool(output_hidden_states),
        output_attentions=bool(output_attentions),
        logits_to_keep=logits_to_keep if head == "seq2seq_lm" else 0,
        training=module.training,
        module=module,
        gradient_checkpointing=model.is_gradient_checkpointing and module.training,
        decoder_input_ids=decoder_input_ids,
        decoder_inputs_embeds=decoder_inputs_embeds,
        past_key_values=past_key_values,
        **kwargs,
    )
    module, args, tree_kwargs = prepare_call(model._call_info(), input_ids, **call)
    runner = model.__dict__.get("_runner") if module is model._tree else None
    out = to_output((runner or module)(*args, **tree_kwargs))
    names = {**_FIELDS[head], **_SHARED}
    fields = {name: getattr(out, source) for name, source in names.items()}
    if labels is not None and out.logits is not None:
        fields["loss"] = losses.masked_lm_loss(out.logits, labels.to(out.logits.device))
    cls = _output("Seq2SeqLMOutput" if head == "seq2seq_lm" else "Seq2SeqModelOutput")
    result = cls(**{k: v for k, v in fields.items() if k in cls.__dataclass_fields__})
    return result if return_dict else result.to_tuple()


def _with_room(cache_value, new_tokens: int):
    """The cache with room for `new_tokens` more decoder positions (buffers doubled as needed)."""
    self_cache = self_attention_cache(cache_value)
    need = self_cache.length + new_tokens
    if need <= self_cache.max_length:
        return cache_value
    size = max(need, 2 * self_cache.max_length)

    def grown(buf: torch.Tensor) -> torch.Tensor:
        out = buf.new_zeros(*buf.shape[:2], size, buf.shape[3])
        out[:, :, : self_cache.length] = buf[:, :, : self_cache.length]
        return out

    bigger = KVCache(
        tuple(map(grown, self_cache.keys)), tuple(map(grown, self_cache.values)), self_cache.length
    )
    if isinstance(cache_value, Seq2SeqCache):
        return Seq2SeqCache(bigger, cache_value.cross_keys, cache_value.cross_values)
    return bigger


# --------------------------------------------------------------------------- stack calls

# Transformers' T5Stack.forward positional order.
_STACK_ORDER = (
    "input_ids",
    "attention_mask",
    "encoder_hidden_states",
    "encoder_attention_mask",
    "inputs_embeds",
    "head_mask",
    "cross_attn_head_mask",
    "past_key_values",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
)


def bind_stack_calls(model, tree: nn.Module) -> None:
    """Give the tree's `encoder` / `decoder` stacks Transformers' call (see the module docstring)."""
    for name in ("encoder", "decoder"):
        stack = tree._modules.get(name)
        if stack is not None and hasattr(stack, "block"):
            stack.__class__ = _callable_stack(stack.__class__)
            stack.__dict__["_fmodel_owner"] = model


class _StackCall:
    """Mixed in first: `forward` without `attn` is Transformers' `T5Stack` call."""

    _fmodel_plain_class: type

    def forward(self, *args: Any, **kwargs: Any):
        if "attn" in kwargs:  # fmodel's own call
            return super().forward(*args, **kwargs)
        owner = self.__dict__.get("_fmodel_owner")
        if owner is None:
            raise ArgumentTypeError(f"{type(self).__name__}: this stack is not part of an fmodel model")
        if len(args) > len(_STACK_ORDER):
            raise ArgumentTypeError(
                f"{type(self).__name__}.forward() takes at most {len(_STACK_ORDER)} positional arguments"
            )
        for name, value in zip(_STACK_ORDER, args, strict=False):
            if name in kwargs:
                raise ArgumentTypeError(f"{type(self).__name__}.forward() got multiple values for {name!r}")
            kwargs[name] = value
        return _stack_call(owner, self, **kwargs)

    def __reduce_ex__(self, protocol: int):
        _fn, _args, *rest = super().__reduce_ex__(protocol)
        return (_new_stack, (self._fmodel_plain_class,), *rest)


def _stack_call(
    owner,
    stack: nn.Module,
    input_ids=None,
    attention_mask=None,
    encoder_hidden_states=None,
    encoder_attention_mask=None,
    inputs_embeds=None,
    head_mask=None,
    cross_attn_head_mask=None,
    past_key_values=None,
    use_cache=None,
    output_attentions=None,
    output_hidden_states=None,
    return_dict=None,
    cache_position=None,
):
    if head_mask is not None or cross_attn_head_mask is not None:
        raise UnsupportedOptionError("T5Stack: head masks are not supported by fmodel's T5")
    if past_key_values is not None:
        raise UnsupportedOptionError(
            "T5Stack: a decoder cache is not taken by the stack call; call the model with past_key_values"
        )
    config = owner.config
    output_attentions = config.output_attentions if output_attentions is None else output_attentions
    output_hidden_states = (
        config.output_hidden_states if output_hidden_states is None else output_hidden_states
    )
    return_dict = config.use_return_dict if return_dict is None else return_dict
    name = owner._attn_implementation
    if output_attentions and name != "eager":
        name = "eager"  # the other implementations compute no weights
    extra = {}
    if stack.is_decoder:
        if encoder_hidden_states is None:
            raise ArgumentTypeError("T5Stack (decoder): pass encoder_hidden_states")
        extra = {
            "encoder_hidden_states": encoder_hidden_states,
            "encoder_attention_mask": encoder_attention_mask,
        }
    out = stack(
        input_ids,
        attention_mask,
        inputs_embeds,
        attn=attention.get(name),
        output_hidden_states=bool(output_hidden_states),
        output_attentions=bool(output_attentions),
        gradient_checkpointing=owner.is_gradient_checkpointing and stack.training,
        **extra,
    )
    kind = "BaseModelOutputWithPastAndCrossAttentions" if stack.is_decoder else "BaseModelOutput"
    cls = _output(kind)
    fields = {
        "last_hidden_state": out["last_hidden_state"],
        "hidden_states": out["hidden_states"],
        "attentions": out["attentions"],
        "cross_attentions": out.get("cross_attentions"),
    }
    result = cls(**{k: v for k, v in fields.items() if k in cls.__dataclass_fields__})
    return result if return_dict else result.to_tuple()


def _output(name: str) -> type:
    from . import outputs

    hf = outputs.transformers_or_none()
    if hf is not None:
        import transformers.modeling_outputs as hf_outputs

        return getattr(hf_outputs, name)
    return outputs._OWN[name]


@cache
def _callable_stack(cls: type) -> type:
    if issubclass(cls, _StackCall):
        return cls
    return type(
        cls.__name__,
        (_StackCall, cls),
        {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "_fmodel_plain_class": cls},
    )


def _new_stack(plain: type) -> nn.Module:
    cls = _callable_stack(plain)
    return cls.__new__(cls)
