"""The config of Qwen3 (`model_type: qwen3`): Qwen2's, with an explicit head width, optional
biases on the attention projections, and a q/k RMSNorm per head in the model (no field)."""

from __future__ import annotations

from typing import ClassVar

import attrs

from .base import HEAD_DIM_MAX, bool_field, int_field, register_config
from .decoder import Qwen2Config

__all__ = ["Qwen3Config"]


@register_config
@attrs.frozen(kw_only=True)
class Qwen3Config(Qwen2Config):
    """Qwen3 (`model_type: qwen3`), defaults as Transformers 4.57's `Qwen3Config`.

    As in Qwen2, the sliding window applies only when `use_sliding_window` is on, and then to
    the layers `layer_types` marks "sliding_attention" (when `layer_types` is not given: those
    at index >= `max_window_layers`). `attention_bias` puts biases on q, k, v and o.
    """

    model_type: ClassVar[str] = "qwen3"

    head_dim: int | None = int_field(128, nullable=True, maximum=HEAD_DIM_MAX)
    attention_bias: bool = bool_field(False)

    @property
    def qkv_bias(self) -> bool:  # not Qwen2's unconditional q/k/v bias
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias
