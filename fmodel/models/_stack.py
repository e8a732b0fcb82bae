"""Pieces every family's skeleton shares: running the layer stack and applying a head."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


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
