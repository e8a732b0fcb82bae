"""Head masks (Transformers' `head_mask` argument): scale each head's attention weights.

A head mask is a per-layer multiplier on the attention probabilities, applied after softmax
and dropout, as Transformers' eager attention does. It needs the weights, so a forward with a
head mask runs fmodel's eager attention for that call, whatever implementation the state names
(Transformers' GPT-2 sdpa path silently ignores head masks; fmodel does not).
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgumentError
from .builtin import eager_attention
from .legacy_masks import convert_head_mask_to_5d
from .registry import AttentionFunction

__all__ = ["with_head_mask"]


def with_head_mask(head_mask: torch.Tensor, num_layers: int, dtype: torch.dtype) -> AttentionFunction:
    """Eager attention that multiplies layer i's weights by `head_mask` for layer i.

    Arguments:
        head_mask: [H] (every layer), [L, H], or [L, B|1, H, T|1, S|1]; 1 keeps a head, 0 drops it.
        num_layers: L, the model's layer count.
        dtype: the dtype the mask is cast to (the model's activation dtype).

    The attention modules it runs in must carry their `layer_idx`.
    """
    per_layer = convert_head_mask_to_5d(head_mask, num_layers, dtype)
    if per_layer.shape[0] != num_layers:
        raise InvalidArgumentError(
            f"head_mask: expected {num_layers} layers in dimension 0, got shape {list(head_mask.shape)}"
        )

    def eager_with_head_mask(module, query, key, value, attention_mask, softcap=None, **kwargs):
        kwargs["head_mask"] = per_layer[module.layer_idx].to(query.device)
        return eager_attention(module, query, key, value, attention_mask, softcap=softcap, **kwargs)

    return AttentionFunction("eager_head_mask", eager_with_head_mask, "additive")
