"""`MaskHelpersMixin`: Transformers' legacy mask helpers, delegating to the pure functions in
`fmodel.attention.legacy_masks`."""

from __future__ import annotations

import torch

from ..attention import legacy_masks as masks

__all__ = ["MaskHelpersMixin"]


class MaskHelpersMixin:
    """Legacy extended-mask and head-mask helpers; the host class provides `dtype` and `config`."""

    def invert_attention_mask(self, encoder_attention_mask: torch.Tensor) -> torch.Tensor:
        return masks.invert_attention_mask(encoder_attention_mask, self.dtype)

    @staticmethod
    def create_extended_attention_mask_for_decoder(input_shape, attention_mask, device=None) -> torch.Tensor:
        return masks.create_extended_attention_mask_for_decoder(tuple(input_shape), attention_mask, device)

    def get_extended_attention_mask(
        self, attention_mask, input_shape, device=None, dtype=None
    ) -> torch.Tensor:
        is_decoder = bool(self.config.extra.get("is_decoder", False))
        return masks.get_extended_attention_mask(
            attention_mask, tuple(input_shape), is_decoder=is_decoder, dtype=dtype or self.dtype
        )

    def get_head_mask(self, head_mask, num_hidden_layers: int, is_attention_chunked: bool = False):
        return masks.get_head_mask(head_mask, num_hidden_layers, self.dtype, is_attention_chunked)

    def _convert_head_mask_to_5d(self, head_mask: torch.Tensor, num_hidden_layers: int) -> torch.Tensor:
        return masks.convert_head_mask_to_5d(head_mask, num_hidden_layers, self.dtype)
