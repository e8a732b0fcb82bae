"""Pieces every family's skeleton shares: embedding the inputs, the positions of a step (with or
without a KV cache), running the layer stack, and applying a head."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..attention import MaskInputs
from ..errors import InvalidArgumentError

if TYPE_CHECKING:
    from ..generation.cache import KVCache


def embed_inputs(
    embed: Callable[[torch.Tensor], torch.Tensor],
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
) -> torch.Tensor:
    """`embed(input_ids)` [B, T, C], or the caller's `inputs_embeds`; exactly one must be given."""
    require_one_input(input_ids, inputs_embeds)
    return embed(input_ids) if inputs_embeds is None else inputs_embeds


def require_one_input(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> None:
    """Raises InvalidArgumentError unless exactly one of the two is given."""
    if (input_ids is None) == (inputs_embeds is None):
        raise InvalidArgumentError("pass exactly one of input_ids or inputs_embeds")


def step_positions(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    past_key_values: KVCache | None = None,
    *,
    causal: bool = True,
) -> tuple[MaskInputs, torch.Tensor]:
    """For the T inputs of `hidden` [B, T, C] continuing a cache of length L (0 without one):
    the `MaskInputs` over all L + T positions and the position ids [B|1, T] (the caller's, or
    L .. L+T-1 for every row: as Transformers, padding does not shift positions)."""
    b, t = hidden.shape[:2]
    start = 0 if past_key_values is None else past_key_values.length
    q_positions = torch.arange(start, start + t, device=hidden.device)  # cache positions
    if position_ids is None:
        position_ids = q_positions[None]
    return MaskInputs(attention_mask, q_positions, start + t, b, causal=causal), position_ids


def run_cached_layers(
    layers: Iterable[nn.Module], hidden: torch.Tensor, *args: Any, past_key_values: KVCache | None, **kwargs: Any
) -> dict[str, Any]:
    """`run_layers` for layers taking the cache as their last argument; with a cache, the output
    carries it advanced by this step's T positions as `past_key_values`."""
    out = run_layers(layers, hidden, *args, past_key_values, **kwargs)
    if past_key_values is not None:
        out["past_key_values"] = past_key_values.advance(hidden.shape[1])
    return out


def run_layers(
    layers: Iterable[nn.Module],
    hidden: torch.Tensor,
    *args: Any,
    output_hidden_states: bool,
    output_attentions: bool,
    final: Callable[[torch.Tensor], torch.Tensor] | None = None,
    gradient_checkpointing: bool = False,
) -> dict[str, Any]:
    """Run `layer(hidden, *args, output_attentions) -> (hidden, weights[, router_logits])` for
    each layer, then `final` (a last norm). Collects, as Transformers does, the input of every
    layer plus the final output as `hidden_states`, each layer's attention weights as
    `attentions`, and the router logits of mixture-of-experts layers (those returning them not
    None) as `router_logits` (the key is there only when some layer returned them).

    With `gradient_checkpointing`, each layer's activations are recomputed in the backward
    pass instead of kept (non-reentrant checkpointing: gradients reach every input and
    parameter, frozen embeddings or not)."""
    all_hidden, all_weights, all_routers = [], [], []
    for layer in layers:
        if output_hidden_states:
            all_hidden.append(hidden)
        if gradient_checkpointing and torch.is_grad_enabled():
            result = checkpoint(layer, hidden, *args, output_attentions, use_reentrant=False)
        else:
            result = layer(hidden, *args, output_attentions)
        hidden, weights = result[0], result[1]
        if output_attentions:
            all_weights.append(weights)
        if len(result) > 2 and result[2] is not None:
            all_routers.append(result[2])
    if final is not None:
        hidden = final(hidden)
    if output_hidden_states:
        all_hidden.append(hidden)
    out = {
        "last_hidden_state": hidden,
        "hidden_states": tuple(all_hidden) if output_hidden_states else None,
        "attentions": tuple(all_weights) if output_attentions else None,
    }
    if all_routers:
        out["router_logits"] = tuple(all_routers)
    return out


def with_logits(
    out: dict[str, Any], head: Callable[[torch.Tensor], torch.Tensor], logits_to_keep: int
) -> dict[str, Any]:
    """`out` plus `logits = head(last_hidden_state)`, for the last `logits_to_keep` positions (0 = all)."""
    hidden = out["last_hidden_state"]
    if logits_to_keep:
        hidden = hidden[:, -logits_to_keep:]
    return {**out, "logits": head(hidden)}
