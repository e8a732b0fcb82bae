"""Transformers' legacy mask helpers as pure functions (the facade's methods and head masks use them).

New code does not need them: `fmodel.forward` builds every mask from the 2-D padding mask.
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgumentError

__all__ = [
    "convert_head_mask_to_5d",
    "create_extended_attention_mask_for_decoder",
    "get_extended_attention_mask",
    "get_head_mask",
    "invert_attention_mask",
]


def invert_attention_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, S] or [B, T, S] keep-mask (1 = attend) -> additive [B, 1, 1, S] / [B, 1, T, S] mask of `dtype`."""
    extended = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
    extended = extended.to(dtype)
    return (1.0 - extended) * torch.finfo(dtype).min


def create_extended_attention_mask_for_decoder(
    input_shape: tuple[int, int], attention_mask: torch.Tensor, device: torch.device | None = None
) -> torch.Tensor:
    """Causal x padding keep-mask [B, 1, T, S] for a 2-D `attention_mask` [B, S]; when S > T the
    first S - T keys (a cached prefix) are visible to every query."""
    batch, seq = input_shape
    device = attention_mask.device if device is None else device
    ids = torch.arange(seq, device=device)
    causal = (ids[None, None, :].repeat(batch, seq, 1) <= ids[None, :, None]).to(attention_mask.dtype)
    prefix = attention_mask.shape[1] - causal.shape[1]
    if prefix > 0:
        causal = torch.cat(
            [torch.ones((batch, seq, prefix), device=device, dtype=causal.dtype), causal], dim=-1
        )
    return causal[:, None, :, :] * attention_mask[:, None, None, :]


def get_extended_attention_mask(
    attention_mask: torch.Tensor, input_shape: tuple[int, int], *, is_decoder: bool, dtype: torch.dtype
) -> torch.Tensor:
    """A broadcastable additive mask from a 2-D or 3-D keep-mask, causal when `is_decoder`.

    Raises:
        ValueError: a mask that is neither 2-D nor 3-D.
    """
    if attention_mask.dim() == 3:
        extended = attention_mask[:, None, :, :]
    elif attention_mask.dim() == 2:
        if is_decoder:
            extended = create_extended_attention_mask_for_decoder(input_shape, attention_mask)
        else:
            extended = attention_mask[:, None, None, :]
    else:
        raise InvalidArgumentError(
            f"Wrong shape for input_ids (shape {tuple(input_shape)}) or attention_mask (shape {tuple(attention_mask.shape)})"
        )
    extended = extended.to(dtype)
    return (1.0 - extended) * torch.finfo(dtype).min


def convert_head_mask_to_5d(
    head_mask: torch.Tensor, num_hidden_layers: int, dtype: torch.dtype
) -> torch.Tensor:
    """[H] -> [L, 1, H, 1, 1] (same for every layer) or [L, H] -> [L, 1, H, 1, 1], cast to `dtype`."""
    if head_mask.dim() == 1:
        head_mask = head_mask[None, None, :, None, None].expand(num_hidden_layers, -1, -1, -1, -1)
    elif head_mask.dim() == 2:
        head_mask = head_mask[:, None, :, None, None]
    if head_mask.dim() != 5:
        raise InvalidArgumentError(f"head_mask must have 1, 2 or 5 dimensions, got {head_mask.dim()}")
    return head_mask.to(dtype)


def get_head_mask(
    head_mask: torch.Tensor | None, num_hidden_layers: int, dtype: torch.dtype, chunked: bool = False
):
    """None -> [None] * layers; else the 5-D mask (with a trailing axis when `chunked`)."""
    if head_mask is None:
        return [None] * num_hidden_layers
    head_mask = convert_head_mask_to_5d(head_mask, num_hidden_layers, dtype)
    return head_mask.unsqueeze(-1) if chunked else head_mask
