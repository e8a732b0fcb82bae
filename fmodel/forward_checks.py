"""The checks `fmodel.forward` (and `bind_forward`, and the facade's forward through
`prepare_call`) runs on its inputs before any kernel: types, shapes, token ids within the
vocabulary (one min/max reduction, skipped under torch.compile), learned positions within the
table, and the KV cache against the model. `state` may be a state-like record without `params`
(the facade's), in which case the sizes come from the config."""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from ._checks import check_int_tensor, check_token_ids, describe
from .errors import ArgumentTypeError, InvalidArgumentError
from .generation.cache import KVCache, check_cache
from .state import ModelState

__all__ = [
    "check_head_mask",
    "check_inputs",
    "check_module_inputs",
    "check_not_stacked",
    "check_options",
    "check_seq2seq_inputs",
    "vocab_size",
]


def check_inputs(state: ModelState, input_ids, attention_mask, inputs_embeds, cache=None, extra=None) -> None:
    if (input_ids is None) == (inputs_embeds is None):
        raise InvalidArgumentError("forward: pass exactly one of input_ids or inputs_embeds")
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor):
            check_int_tensor(input_ids, "forward(input_ids)")
        if input_ids.dim() != 2 or input_ids.is_floating_point():
            raise InvalidArgumentError(
                f"forward: input_ids must be an integer tensor [batch, seq], got {input_ids.dtype} {list(input_ids.shape)}"
            )
        check_token_ids(input_ids, vocab_size(state), "forward(input_ids)")
        shape = tuple(input_ids.shape)
    else:
        hidden = state.config.hidden_size
        if not isinstance(inputs_embeds, torch.Tensor):
            raise ArgumentTypeError(
                f"forward(inputs_embeds) must be a tensor [batch, seq, {hidden}], got {describe(inputs_embeds)}"
            )
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden:
            raise InvalidArgumentError(
                f"forward: inputs_embeds must be [batch, seq, {hidden}], got {list(inputs_embeds.shape)}"
            )
        shape = tuple(inputs_embeds.shape[:2])
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise ArgumentTypeError(
            f"forward(attention_mask) must be a tensor [batch, seq], got {describe(attention_mask)}"
        )
    _check_extra_ids(state, extra or {}, shape, cache)
    if cache is not None:
        dtype = inputs_embeds.dtype if inputs_embeds is not None else state.dtype
        check_cache(state, cache, shape[0], shape[1], dtype)
        shape = (shape[0], cache.length + shape[1])  # the mask covers the cached positions too
        if attention_mask is not None and tuple(attention_mask.shape) != shape:
            raise InvalidArgumentError(
                f"forward: with a KV cache of length {cache.length}, attention_mask must cover the "
                f"cached and the new positions: shape {list(shape)}, got {list(attention_mask.shape)}"
            )
    if attention_mask is not None and tuple(attention_mask.shape) != shape:
        raise InvalidArgumentError(
            f"forward: attention_mask must have shape {list(shape)} like the inputs, got {list(attention_mask.shape)}"
        )


def check_seq2seq_inputs(state: ModelState, input_ids, attention_mask, inputs_embeds, inputs: dict) -> None:
    """An encoder-decoder's (T5's) inputs: the encoder side as `check_inputs` (skipped when
    `encoder_outputs` is given), the decoder side (`decoder_input_ids` or
    `decoder_inputs_embeds`, else `labels` to shift right) with its mask and the cache."""
    from .generation.seq2seq_cache import self_attention_cache

    if inputs.get("position_ids") is not None:
        raise InvalidArgumentError(
            f"forward: {state.architecture} takes no position_ids (its positions are relative buckets)"
        )
    if inputs.get("encoder_outputs") is None:
        check_inputs(state, input_ids, attention_mask, inputs_embeds)
    elif attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise ArgumentTypeError(
            f"forward(attention_mask) must be a tensor [batch, seq], got {describe(attention_mask)}"
        )
    ids, embeds, labels = (inputs.get(k) for k in ("decoder_input_ids", "decoder_inputs_embeds", "labels"))
    if ids is not None and embeds is not None:
        raise InvalidArgumentError("forward: pass decoder_input_ids or decoder_inputs_embeds, not both")
    if ids is None and embeds is None:
        if labels is None:
            raise InvalidArgumentError(
                "forward: an encoder-decoder needs decoder_input_ids (or decoder_inputs_embeds, or labels "
                "to shift right into decoder inputs)"
            )
        ids = check_int_tensor(labels, "forward(labels)")
        if ids.dim() != 2:
            raise InvalidArgumentError(f"forward: labels must be [batch, seq], got {list(ids.shape)}")
        check_token_ids(ids.masked_fill(ids == -100, 0), vocab_size(state), "forward(labels)")
    elif ids is not None:
        check_int_tensor(ids, "forward(decoder_input_ids)")
        if ids.dim() != 2 or ids.is_floating_point():
            raise InvalidArgumentError(
                f"forward: decoder_input_ids must be an integer tensor [batch, seq], got {list(ids.shape)}"
            )
        check_token_ids(ids, vocab_size(state), "forward(decoder_input_ids)")
    elif (
        not isinstance(embeds, torch.Tensor)
        or embeds.dim() != 3
        or embeds.shape[-1] != state.config.hidden_size
    ):
        raise InvalidArgumentError(
            f"forward: decoder_inputs_embeds must be a tensor [batch, seq, {state.config.hidden_size}]"
        )
    shape = tuple(ids.shape) if ids is not None else tuple(embeds.shape[:2])
    cache = self_attention_cache(inputs.get("past_key_values"))
    if cache is not None:
        check_cache(state, cache, shape[0], shape[1], embeds.dtype if embeds is not None else state.dtype)
        shape = (shape[0], cache.length + shape[1])
    mask = inputs.get("decoder_attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != shape):
        raise InvalidArgumentError(
            f"forward: decoder_attention_mask must be a tensor of shape {list(shape)} (cached and new "
            f"decoder positions), got {describe(mask)}"
        )


def check_not_stacked(state: ModelState, caller: str) -> None:
    """A `stack_states` result has [n, vocab, hidden] embeddings: it runs with `vmap_forward`
    (inside which each member's tensors are the per-member shapes again)."""
    from .models import get_spec

    matrix = state.params.get(get_spec(state.architecture).input_embeddings)
    if matrix is not None and matrix.dim() > 2:
        raise InvalidArgumentError(
            f"{caller}(state): the state is stacked (input embeddings {list(matrix.shape)}); run it with "
            "fmodel.vmap_forward, or take one member with fmodel.unstack_state"
        )


def vocab_size(state: ModelState) -> int | None:
    """Rows of the input embedding matrix (the ids it can look up); [-2] so that a stacked
    state's [n, vocab, hidden] reads the same."""
    from .models import get_spec

    params = getattr(state, "params", None)  # the facade passes a state-like record without them
    matrix = None if params is None else params.get(get_spec(state.architecture).input_embeddings)
    if matrix is None or matrix.dim() < 2:
        return getattr(state.config, "vocab_size", None)
    return int(matrix.shape[-2])


def _check_extra_ids(state: ModelState, extra: dict, shape: tuple, cache) -> None:
    """`token_type_ids` within the type vocabulary, and for learned positions (GPT-2, BERT)
    the positions within the table: what an embedding lookup would otherwise fail on."""
    from .models import get_spec

    types = extra.get("token_type_ids")
    if types is not None:
        check_token_ids(types, getattr(state.config, "type_vocab_size", None), "forward(token_type_ids)")
    table = get_spec(state.architecture).position_embeddings
    params = getattr(state, "params", None)
    if table is None:
        return
    if params is not None and table in params:
        rows = int(params[table].shape[-2])
    else:
        rows = getattr(state.config, "max_position_embeddings", None)
        if not isinstance(rows, int):
            return
    positions = extra.get("position_ids")
    if positions is not None:
        check_token_ids(positions, rows, "forward(position_ids)")
        return
    end = shape[1] + (cache.length if isinstance(cache, KVCache) else 0)
    if end > rows:
        raise InvalidArgumentError(
            f"forward: {state.architecture} has {rows} learned positions (max_position_embeddings); "
            f"the input reaches position {end - 1}. Shorten it or resize_position_embeddings"
        )


def check_options(input_ids, inputs_embeds, position_ids, logits_to_keep, training, head_mask) -> None:
    """The non-tensor options and the optional tensors of a forward: types and shapes."""
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, (int, torch.Tensor)):
        raise ArgumentTypeError(
            f"forward(logits_to_keep) must be an int >= 0 (or a 1-D tensor of positions), got {describe(logits_to_keep)}"
        )
    if isinstance(logits_to_keep, int) and logits_to_keep < 0:
        raise InvalidArgumentError(
            f"forward(logits_to_keep) must be >= 0 (0 keeps every position), got {logits_to_keep}"
        )
    if not isinstance(training, bool):
        raise ArgumentTypeError(f"forward(training) must be True or False, got {describe(training)}")
    if inputs_embeds is not None and not inputs_embeds.is_floating_point():
        raise ArgumentTypeError(
            f"forward(inputs_embeds) must be a floating tensor, got dtype {inputs_embeds.dtype}"
        )
    ref = input_ids if input_ids is not None else inputs_embeds
    if position_ids is not None:
        if not isinstance(position_ids, torch.Tensor):
            raise ArgumentTypeError(
                f"forward(position_ids) must be a tensor [batch, seq], got {describe(position_ids)}"
            )
        batch, seq = ref.shape[0], ref.shape[1]
        if position_ids.dim() != 2 or position_ids.shape[1] != seq or position_ids.shape[0] not in (1, batch):
            raise InvalidArgumentError(
                f"forward(position_ids) must be [{batch} or 1, {seq}] like the inputs, got {list(position_ids.shape)}"
            )
    if head_mask is not None and not isinstance(head_mask, torch.Tensor):
        raise ArgumentTypeError(
            f"forward(head_mask) must be a tensor [heads] or [layers, heads], got {describe(head_mask)}"
        )


def check_module_inputs(module: nn.Module, names, prefix: str | None = None) -> None:
    """Keyword inputs the model's forward does not take (`token_type_ids` for a Llama, a typo)
    are a named error instead of the module's TypeError. A head whose forward passes **kwargs
    on to its base model (at `prefix`) is checked against both. Skipped under torch.compile."""
    if not names or torch.compiler.is_compiling():
        return
    accepted = _forward_parameters(type(module))
    if accepted is not None and accepted[1] and prefix:
        base = getattr(module, prefix, None)
        inner = None if base is None else _forward_parameters(type(base))
        accepted = None if inner is None else (accepted[0] | inner[0], inner[1])
    if accepted is None or accepted[1]:
        return
    unknown = sorted(n for n in names if n not in accepted[0])
    if unknown:
        raise ArgumentTypeError(
            f"forward: {type(module).__name__} takes no input {unknown[0]!r}"
            f"{f' (nor {unknown[1:]})' if unknown[1:] else ''}; it takes "
            f"{sorted(accepted[0] - {'self', 'input_ids', 'attn', 'kwargs'})}"
        )


@functools.lru_cache(maxsize=256)
def _forward_parameters(cls: type) -> tuple[frozenset[str], bool] | None:
    """(the keyword names `cls.forward` declares, whether it also takes **kwargs); None when it
    cannot be read. Per class, a runtime cache that never changes a result."""
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return None
    names = frozenset(
        n
        for n, p in params.items()
        if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    )
    return names, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def check_head_mask(state, head_mask: torch.Tensor) -> None:
    """[heads] or [layers, heads] (or Transformers' 5-D form) of the unpruned model."""
    heads, layers = state.config.num_attention_heads, state.config.num_hidden_layers
    shape = list(head_mask.shape)
    if head_mask.dim() == 5 or shape == [heads] or shape == [layers, heads]:
        return
    raise InvalidArgumentError(
        f"forward(head_mask): expected {layers} layers and {heads} heads: shape [{heads}] or "
        f"[{layers}, {heads}], got {shape}"
    )
