"""The checks `fmodel.forward` (and `bind_forward`, and the facade's forward through
`prepare_call`) runs on its inputs before any kernel: types, shapes, token ids within the
vocabulary (one min/max reduction, skipped under torch.compile), learned positions within the
table, and the KV cache against the model. `state` may be a state-like record without `params`
(the facade's), in which case the sizes come from the config."""

from __future__ import annotations

import torch

from ._checks import check_int_tensor, check_token_ids, describe
from .cache import KVCache, check_cache
from .errors import ArgumentTypeError, InvalidArgumentError
from .state import ModelState

__all__ = ["check_inputs", "check_not_stacked", "vocab_size"]


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
