"""Transformers' call of the base model inside a head: `model.model(input_ids, ...)`.

In Transformers the base model of a head class (`LlamaForCausalLM.model`, `GPT2LMHeadModel.
transformer`, `BertForSequenceClassification.bert`, also reached as `model.base_model`) is a
model of its own, and clients call it for hidden states: TRL's `SFTTrainer` runs
`model.base_model(**inputs)` in its fused LM head, reward and embedding code calls
`model.model(...)`. In fmodel that module is a part of the skeleton whose forward takes fmodel's
internal call (an `attn` function; it returns a dict).

`bind_base_call(model, tree)`, run by the facade each time it installs a tree, gives the tree's
base module a subclass of its own class whose forward also takes Transformers' call: a call
without `attn` (fmodel's own calls always pass it) runs the facade's forward over that very
module (its parameters, hooks and adapters), with Transformers' positional order for the
family's base class, and returns Transformers' base output class (`BaseModelOutputWithPast`,
...; fmodel's stand-in without Transformers). The module keeps its facade as `_fmodel_owner`, a
plain attribute: `state_dict()`, `modules()` and `parameters()` are unchanged. Pickle and deepcopy
keep the subclass (`__reduce_ex__`).
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import TYPE_CHECKING, Any

from torch import nn

from ..errors import ArgumentTypeError
from ..models import get_spec, specs_for_model_type
from .interop import transformers_or_none

if TYPE_CHECKING:
    from .model import PreTrainedModel

__all__ = ["bind_base_call", "plain_class"]

# The order of Transformers' `LlamaModel.forward`, used without Transformers installed.
_DEFAULT_ORDER = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "past_key_values",
    "inputs_embeds",
    "use_cache",
)


def bind_base_call(model: PreTrainedModel, tree: nn.Module) -> None:
    """Make the base module of `tree` (a head's `model` / `transformer` / `bert`) callable as
    Transformers' base model, running through `model`. A base architecture's tree is the
    facade's own forward already: nothing is done."""
    spec = get_spec(model._architecture)
    if spec.model_type == "t5":  # its encoder / decoder stacks take Transformers' T5Stack call
        from .seq2seq_call import bind_stack_calls

        bind_stack_calls(model, tree)
    base = None if spec.is_base else getattr(tree, spec.prefix, None)
    if base is None:
        return
    base.__class__ = _callable_class(base.__class__)
    base.__dict__["_fmodel_owner"] = model


def plain_class(module: nn.Module) -> type:
    """The skeleton class of `module`: its own class, or for a base module bound here the class
    it was built as (what a fresh skeleton has at that place)."""
    return getattr(type(module), "_fmodel_plain_class", type(module))


class _TransformersCall:
    """Mixed in first: `forward` without `attn` is Transformers' base-model call."""

    _fmodel_plain_class: type

    def forward(self, *args: Any, **kwargs: Any):
        if "attn" in kwargs:  # fmodel's own call (`prepare_call` always passes the function)
            return super().forward(*args, **kwargs)
        owner = self.__dict__.get("_fmodel_owner")
        if owner is None:
            raise ArgumentTypeError(
                f"{type(self).__name__}: this module is not part of an fmodel model; call the model, "
                "or pass fmodel's `attn` function"
            )
        names = _positional_names(owner._frozen_config.model_type)
        if len(args) > len(names):
            raise ArgumentTypeError(
                f"{type(self).__name__}.forward() takes at most {len(names)} positional arguments"
            )
        for name, value in zip(names, args, strict=False):
            if name in kwargs:
                raise ArgumentTypeError(
                    f"{type(self).__name__}.forward() got multiple values for argument {name!r}"
                )
            kwargs[name] = value
        kwargs.pop("labels", None)  # Transformers' base forward takes no labels (they would land in **kwargs)
        kwargs.pop("logits_to_keep", None)
        return owner._forward_module(self, "base", **kwargs)

    def __reduce_ex__(self, protocol: int):
        # pickle/deepcopy rebuild this subclass from the plain class (importable by name)
        _fn, _args, *rest = super().__reduce_ex__(protocol)
        return (_new_callable, (self._fmodel_plain_class,), *rest)


@cache
def _callable_class(cls: type) -> type:
    if issubclass(cls, _TransformersCall):
        return cls
    return type(
        cls.__name__,
        (_TransformersCall, cls),
        {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "_fmodel_plain_class": cls},
    )


def _new_callable(plain: type) -> nn.Module:
    cls = _callable_class(plain)
    return cls.__new__(cls)


@cache
def _positional_names(model_type: str) -> tuple[str, ...]:
    """The positional parameters of Transformers' base class for `model_type` (its
    `forward` signature when Transformers is installed, else Llama's order)."""
    hf = transformers_or_none()
    base = next((s.name for s in specs_for_model_type(model_type) if s.output == "base"), None)
    hf_class = getattr(hf, base, None) if hf is not None and base is not None else None
    if hf_class is None:
        return _DEFAULT_ORDER
    params = list(inspect.signature(hf_class.forward).parameters.values())[1:]
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in params if p.kind in kinds)
