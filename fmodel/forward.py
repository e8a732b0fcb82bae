"""`fmodel.forward`: run a state through its skeleton with `torch.func.functional_call`."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import torch
from torch import nn
from torch.func import functional_call

from . import attention
from ._checks import check_state, describe
from .distributed.distribute import local_tensors, mesh_of, tp_skeleton
from .errors import ArgumentTypeError, InvalidArgumentError, StateDistributedError
from .forward_checks import check_head_mask, check_module_inputs, check_options, check_seq2seq_inputs
from .forward_checks import check_inputs as _check_inputs
from .forward_checks import check_not_stacked as _check_not_stacked
from .generation.cache import KVCache
from .models import get_spec
from .models.skeleton import skeleton
from .state import ModelState

__all__ = ["ModelOutput", "bind_forward", "forward"]

logger = logging.getLogger("fmodel")

T = TypeVar("T")


@attrs.frozen(init=False)
class ModelOutput:
    """What a forward returns (frozen: setting an attribute raises).

    Attributes:
        logits: [B, T, vocab] for language-model heads, else None.
        last_hidden_state: [B, T, hidden] after the final norm.
        pooler_output: [B, hidden] for models with a pooler (BERT), else None.
        hidden_states: (embeddings, after layer 1, ..., final normed) when asked, else None.
        attentions: per layer [B, H, T, S] attention weights when asked, else None.
        past_key_values: with a `past_key_values=` cache of length L, the `KVCache` of length
            L + T over the same buffers (see `fmodel.generation.cache` for the contract), else None.
        router_logits: mixture-of-experts models with `output_router_logits=True`: per sparse
            layer [B * T, num_experts] router logits, else None.
        aux_loss: mixture-of-experts models with `output_router_logits=True`: the scalar
            load-balancing loss as Transformers computes it (unscaled), else None.
        encoder_last_hidden_state: encoder-decoder models: the encoder's output [B, S, hidden].
        encoder_hidden_states / encoder_attentions: encoder-decoder models: the encoder's
            per-layer values when asked (`hidden_states` / `attentions` are the decoder's).
        cross_attentions: encoder-decoder models: per decoder layer [B, H, T, S] cross-attention
            weights when asked.
    """

    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    past_key_values: KVCache | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    aux_loss: torch.Tensor | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    encoder_attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None

    def __init__(
        self,
        logits: torch.Tensor | None = None,
        last_hidden_state: torch.Tensor | None = None,
        pooler_output: torch.Tensor | None = None,
        hidden_states: tuple[torch.Tensor, ...] | None = None,
        attentions: tuple[torch.Tensor, ...] | None = None,
        past_key_values: KVCache | None = None,
        router_logits: tuple[torch.Tensor, ...] | None = None,
        aux_loss: torch.Tensor | None = None,
        encoder_last_hidden_state: torch.Tensor | None = None,
        encoder_hidden_states: tuple[torch.Tensor, ...] | None = None,
        encoder_attentions: tuple[torch.Tensor, ...] | None = None,
        cross_attentions: tuple[torch.Tensor, ...] | None = None,
    ) -> None:
        # Written out (not attrs' generated __init__, whose cached `object.__setattr__` method
        # wrapper torch.compile cannot trace), so a compiled function can return a ModelOutput.
        for name, value in (
            ("logits", logits),
            ("last_hidden_state", last_hidden_state),
            ("pooler_output", pooler_output),
            ("hidden_states", hidden_states),
            ("attentions", attentions),
            ("past_key_values", past_key_values),
            ("router_logits", router_logits),
            ("aux_loss", aux_loss),
            ("encoder_last_hidden_state", encoder_last_hidden_state),
            ("encoder_hidden_states", encoder_hidden_states),
            ("encoder_attentions", encoder_attentions),
            ("cross_attentions", cross_attentions),
        ):
            object.__setattr__(self, name, value)


def forward(
    state: ModelState,
    input_ids: torch.Tensor | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    output_hidden_states: bool = False,
    output_attentions: bool = False,
    attn_implementation: str | None = None,
    logits_to_keep: int = 0,
    training: bool = False,
    module: torch.nn.Module | None = None,
    gradient_checkpointing: bool = False,
    **model_inputs: torch.Tensor | None,
) -> ModelOutput:
    """Run the model. Pure: the state's tensors are read, never written.

    Arguments:
        state: the model.
        input_ids: [B, T] token ids (or pass `inputs_embeds` [B, T, hidden]).
        attention_mask: [B, T], 1 for real tokens and 0 for padding (left or right); with a
            cache of length L, [B, L + T] covering the cached positions too (as Transformers).
        position_ids: [B, T]; default 0..T-1 for every row (L..L+T-1 with a cache), as Transformers.
        output_hidden_states / output_attentions: also return per-layer values. Attention
            weights need an implementation that computes them; when the chosen one does not
            (sdpa, flex, flash), that call runs with "eager".
        attn_implementation: override the state's attention function for this call.
        logits_to_keep: compute logits only for the last N positions (0 = all).
        training: run dropout (gradients flow either way).
        gradient_checkpointing: recompute each layer's activations in the backward pass
            instead of keeping them (less memory, same gradients).
        module: run this module instead of the cached skeleton (the facade passes its own
            module tree, so hooks registered on its submodules fire); it must have the
            state's structure, and its own `training` flags then decide dropout.
        **model_inputs: family-specific inputs, e.g. `token_type_ids` [B, T] for BERT
            (passed on when not None), or `head_mask` ([H] or [L, H]; 1 keeps a head) for the
            families that take one (GPT-2, BERT): it runs eager attention for that call.
            `past_key_values`: a `KVCache` (`fmodel.init_cache`) for causal decoders (Llama
            family, GPT-2): the inputs continue the cached sequence, their keys/values are
            written into the cache's buffers above its length (never below: the given cache
            value stays valid) and the output carries the longer cache.
            Encoder-decoders (T5): `input_ids` / `attention_mask` are the encoder's, and
            `decoder_input_ids` (or `decoder_inputs_embeds`, or `labels` shifted right into
            them), `decoder_attention_mask`, `encoder_outputs` (skips the encoder) are passed on;
            `past_key_values` is the decoder's cache (`fmodel.init_cache` sizes it for the
            decoder) and the output carries a `Seq2SeqCache` with the cross-attention keys/values.

    Returns:
        ModelOutput with `logits` (heads) or `last_hidden_state` (base models), and
        `past_key_values` when a cache was passed.

    Raises:
        ArgumentTypeError: `state` is not a `ModelState`, or an input is not a tensor.
        TokenIdError: an id of `input_ids` (or `token_type_ids`, `position_ids`) outside the
            table it indexes; the message gives the id, its position and the size.
        InvalidArgumentError: the input runs past a learned position table (GPT-2, BERT).
        CacheError: the cache does not fit (full, other batch size, dtype, layer shapes or
            device, BERT).
        ValueError: inputs of the wrong shape (both or neither of input_ids / inputs_embeds).

    Example:
        >>> out = fmodel.forward(state, input_ids=ids, attention_mask=mask)
        >>> out.logits.shape
        torch.Size([2, 7, 32000])
    """
    check_state(state, "forward(state)")
    _check_not_stacked(state, "forward")
    if module is None and mesh_of(state) is None:  # a given module may run DTensors itself (FSDP2)
        _refuse_foreign_dtensors(state)
    module, args, kwargs = prepare_call(
        state,
        input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        inputs_embeds=inputs_embeds,
        output_hidden_states=output_hidden_states,
        output_attentions=output_attentions,
        attn_implementation=attn_implementation,
        logits_to_keep=logits_to_keep,
        training=training,
        module=module,
        gradient_checkpointing=gradient_checkpointing,
        **model_inputs,
    )
    tensors = state.tensors if mesh_of(state) is None else local_tensors(state)
    out = functional_call(module, tensors, args, kwargs, tie_weights=False, strict=False)
    return to_output(out)


def _refuse_foreign_dtensors(state: ModelState) -> None:
    """A state of DTensors fmodel did not split (FSDP2's `fully_shard` parameters, or a hand-made
    `distribute_tensor`) cannot run through the plain skeleton: name that instead of torch's
    "mixed torch.Tensor and DTensor" error deep in a layer. (FSDP2 leaves some tensors plain
    between steps, so every one is looked at: ~10 us, only in a process that imported DTensor.)"""
    dtensor = sys.modules.get("torch.distributed.tensor")  # no DTensor exists before it is imported
    if dtensor is None:  # (importing it here would cost ~0.4 s on a first forward)
        return
    if any(isinstance(t, dtensor.DTensor) for t in state.params.values()):
        raise StateDistributedError(
            "forward: the state's tensors are DTensors without fmodel's tensor-parallel layout (e.g. "
            "parameters of an FSDP2 fully_shard model); call the facade model itself, or gather them "
            "first ({name: t.full_tensor() for name, t in state.params.items()}), or use fmodel.distribute"
        )


def prepare_call(
    state: ModelState,
    input_ids: torch.Tensor | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    output_hidden_states: bool = False,
    output_attentions: bool = False,
    attn_implementation: str | None = None,
    logits_to_keep: int = 0,
    training: bool = False,
    module: torch.nn.Module | None = None,
    gradient_checkpointing: bool = False,
    **model_inputs: torch.Tensor | None,
) -> tuple[torch.nn.Module, tuple, dict]:
    """What `forward` calls: `(module, args, kwargs)` such that running `module(*args, **kwargs)`
    with the state's tensors in place (`functional_call`, or a module that already holds them)
    and passing the result to `to_output` is `forward(state, ...)`. Same arguments as `forward`."""
    if getattr(get_spec(state.architecture).build, "is_encoder_decoder", False):
        check_seq2seq_inputs(
            state, input_ids, attention_mask, inputs_embeds, {**model_inputs, "position_ids": position_ids}
        )
    else:
        _check_inputs(
            state,
            input_ids,
            attention_mask,
            inputs_embeds,
            model_inputs.get("past_key_values"),
            {"position_ids": position_ids, "token_type_ids": model_inputs.get("token_type_ids")},
        )
    check_options(
        input_ids, inputs_embeds, position_ids, logits_to_keep, training, model_inputs.get("head_mask")
    )
    name = attn_implementation or state.attn_implementation
    if output_attentions and name in _NO_WEIGHTS:
        logger.info("forward: %s does not compute attention weights; using eager for this call", name)
        name = "eager"
    attn = attention.get(name)
    head_mask = model_inputs.pop("head_mask", None)
    if head_mask is not None:
        check_head_mask(state, head_mask)
        attn = _head_mask_attention(state, head_mask, inputs_embeds)
    if module is None:
        if mesh_of(state) is None:
            module = skeleton(state.config, state.architecture, training)
        else:  # tensor parallel: local heads, collectives after the split layers
            module = tp_skeleton(state, training)
    check_module_inputs(
        module, [k for k, v in model_inputs.items() if v is not None], get_spec(state.architecture).prefix
    )
    kwargs = dict(
        attention_mask=attention_mask,
        position_ids=position_ids,
        inputs_embeds=inputs_embeds,
        attn=attn,
        output_hidden_states=output_hidden_states,
        output_attentions=output_attentions,
    )
    if logits_to_keep:
        kwargs["logits_to_keep"] = logits_to_keep
    if gradient_checkpointing:
        kwargs["gradient_checkpointing"] = True
    kwargs.update({k: v for k, v in model_inputs.items() if v is not None})
    return module, (input_ids,), kwargs


class _Bound(nn.Module):
    """Runs `fn(model)` inside one `functional_call`, so a state's tensors are bound to the
    skeleton once for many forwards (and unbound after them, whatever happens)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[[nn.Module], Any]) -> Any:
        return fn(self.model)


def run_bound(state: ModelState, module: nn.Module, fn: Callable[[nn.Module], T]) -> T:
    """`fn(module)` with the state's tensors bound to `module` (its structure) for the whole
    call: one `functional_call`, however many forwards `fn` runs. A distributed state's
    skeleton is replaced by its tensor-parallel one, and its tensors by their local shards."""
    tensors = state.tensors
    if mesh_of(state) is not None and module is skeleton(state.config, state.architecture, module.training):
        module, tensors = tp_skeleton(state, module.training), local_tensors(state)
    tensors = {f"model.{name}": t for name, t in tensors.items()}
    return functional_call(_Bound(module), tensors, (fn,), tie_weights=False, strict=False)


def bind_forward(
    state: ModelState, fn: Callable[[Callable[..., ModelOutput]], T], *, training: bool = False
) -> T:
    """Run `fn(forward)`, where `forward(input_ids, **kwargs)` is `fmodel.forward(state,
    input_ids, **kwargs)` but the state's tensors are bound to the skeleton once, around the
    whole of `fn`, instead of once per call.

    A `functional_call` swaps every tensor of the state in and out (about 3.6 us each: 1 ms for
    a 135M Llama, ~3% of a CPU decode step). A loop of your own (speculative decoding, a custom
    sampler, scoring many batches) pays it once here, as `fmodel.generate` does.

    Arguments:
        state: the model.
        fn: called once with `forward`, which takes `fmodel.forward`'s arguments except
            `module` and `training` (fixed for the binding) and returns a `ModelOutput`.
        training: run dropout in every forward of the binding.

    Returns:
        What `fn` returns.

    Purity: as `fmodel.forward`: the state's tensors are read, never written, and they are
    unbound when `fn` returns or raises. Do not keep `forward` to call after `fn` returns.

    Example:
        >>> def greedy(forward):
        ...     out = forward(ids, past_key_values=fmodel.init_cache(state, 1, 40), logits_to_keep=1)
        ...     for _ in range(8):
        ...         next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        ...         out = forward(next_ids, past_key_values=out.past_key_values, logits_to_keep=1)
        ...     return out
        >>> last = fmodel.bind_forward(state, greedy)
    """
    check_state(state, "bind_forward(state)")
    if not isinstance(training, bool):
        raise ArgumentTypeError(f"bind_forward(training) must be True or False, got {describe(training)}")
    _check_not_stacked(state, "bind_forward")
    if not callable(fn):
        raise ArgumentTypeError(f"bind_forward(fn) must be a callable taking forward, got {describe(fn)}")
    skel = skeleton(state.config, state.architecture, training)

    def body(bound: nn.Module) -> T:
        def step(input_ids: torch.Tensor | None = None, **kwargs: Any) -> ModelOutput:
            for fixed in ("module", "training"):
                if fixed in kwargs:
                    raise ArgumentTypeError(
                        f"bind_forward: {fixed!r} is fixed for the binding; pass it to bind_forward"
                    )
            module, args, call_kwargs = prepare_call(state, input_ids, module=bound, **kwargs)
            return to_output(module(*args, **call_kwargs))

        return fn(step)

    return run_bound(state, skel, body)


def to_output(out: dict) -> ModelOutput:
    """The skeleton's output dict as a `ModelOutput`."""
    return ModelOutput(**{k: out.get(k) for k in _OUTPUT_FIELDS})


def _head_mask_attention(
    state: ModelState, head_mask: torch.Tensor, inputs_embeds
) -> attention.AttentionFunction:
    from .attention.head_mask import with_head_mask
    from .models import get_spec

    if not get_spec(state.architecture).takes_head_mask:
        raise InvalidArgumentError(
            f"forward: {state.architecture} does not take a head_mask (Transformers' does not either)"
        )
    dtype = inputs_embeds.dtype if inputs_embeds is not None else state.dtype
    return with_head_mask(head_mask, state.config.num_hidden_layers, dtype)


_NO_WEIGHTS = frozenset({"sdpa", "flex_attention", "flash_attention_2", "flash_attention_3"})
_OUTPUT_FIELDS = tuple(f.name for f in attrs.fields(ModelOutput))
