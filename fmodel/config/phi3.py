"""Phi-3 (`model_type: phi3`), fields and defaults as Transformers 4.57's `Phi3Config`.

What Phi-3 adds to the shared decoder config: `partial_rotary_factor` (only the first
`int(head_size * partial_rotary_factor)` features of each head rotate), `longrope` scaling
(`rope_scaling = {"type": "longrope", "short_factor": [...], "long_factor": [...]}`, the long
factors once a sequence is longer than the top-level `original_max_position_embeddings`), a
sliding window on every layer when `sliding_window` is set, and residual dropout (`resid_pdrop`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from ..errors import ConfigError
from .base import (
    FFN_MAX,
    HEADS_MAX,
    LAYERS_MAX,
    POSITIONS_MAX,
    VOCAB_MAX,
    WIDTH_MAX,
    float_field,
    int_field,
    register_config,
    token_id_field,
)
from .decoder import DecoderConfig

__all__ = ["Phi3Config"]

# Phi3Config._rope_scaling_adjustment: checkpoints from before "longrope" named it "su" or "yarn".
_LEGACY_LONGROPE = ("su", "yarn")
_LONGROPE_KEYS = frozenset(
    {
        "type",
        "rope_type",
        "short_factor",
        "long_factor",
        "factor",
        "attention_factor",
        "original_max_position_embeddings",
    }
)


@register_config
@attrs.frozen(kw_only=True)
class Phi3Config(DecoderConfig):
    """Phi-3 (`model_type: phi3`): fused qkv and gate/up projections, partial rotary, longrope."""

    model_type: ClassVar[str] = "phi3"

    vocab_size: int = int_field(32064, maximum=VOCAB_MAX)
    hidden_size: int = int_field(3072, maximum=WIDTH_MAX)
    intermediate_size: int = int_field(8192, maximum=FFN_MAX)
    num_hidden_layers: int = int_field(32, maximum=LAYERS_MAX)
    num_attention_heads: int = int_field(32, maximum=HEADS_MAX)
    resid_pdrop: float = float_field(0.0)
    embd_pdrop: float = float_field(0.0)
    max_position_embeddings: int = int_field(4096, maximum=POSITIONS_MAX)
    original_max_position_embeddings: int | None = int_field(4096, nullable=True, maximum=POSITIONS_MAX)
    rms_norm_eps: float = float_field(1e-5)
    partial_rotary_factor: float = float_field(1.0)
    bos_token_id: Any = token_id_field(1)
    eos_token_id: Any = token_id_field(32000)
    pad_token_id: Any = token_id_field(32000)
    sliding_window: int | None = int_field(None, nullable=True)

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        if "rope_type" in self.rope_scaling:
            return self.rope_scaling["rope_type"]
        kind = self.rope_scaling.get("type", "default")
        return "longrope" if kind in _LEGACY_LONGROPE else kind

    def layer_sliding_window(self, layer_idx: int) -> int | None:
        # Phi3Model builds a sliding-window mask for every layer when sliding_window is set.
        return self.sliding_window

    def _validate(self) -> None:
        super()._validate()
        for key in ("resid_pdrop", "embd_pdrop", "attention_dropout"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"Phi3Config: field {key!r} is a probability in [0, 1], got {value!r}")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ConfigError(
                f"Phi3Config: field 'partial_rotary_factor' must be in (0, 1], got {self.partial_rotary_factor!r}"
            )

    def _validate_rope(self) -> None:
        where = "rope_parameters" if self.rope_spelling == "rope_parameters" else "rope_scaling"
        if self.rope_scaling and self.rope_type != "longrope":
            # as Transformers' Phi3Config._rope_scaling_validation
            raise ConfigError(
                f"Phi3Config: field '{where}' type must be 'longrope' (or the legacy 'su' / 'yarn'), "
                f"got {self.rope_type!r}"
            )
        if self.rope_scaling:
            unknown = sorted(set(self.rope_scaling) - _LONGROPE_KEYS)
            if unknown:
                raise ConfigError(
                    f"Phi3Config: field '{where}' has unknown key(s) {unknown}; longrope takes "
                    f"{sorted(_LONGROPE_KEYS)}"
                )
        super()._validate_rope()

    def _validate_longrope_original(self, where: str) -> None:
        # Transformers 4.57 reads the top-level field (the factor is then
        # max_position_embeddings / original_max_position_embeddings) and ignores the one in
        # rope_scaling; a different value there would be read by nobody, or by fmodel alone.
        original = self.original_max_position_embeddings
        if original is None:
            raise ConfigError(
                "Phi3Config: rope type 'longrope' needs field 'original_max_position_embeddings' "
                "(the length the short factors were trained for), got None"
            )
        inner = self.rope_scaling.get("original_max_position_embeddings", original)
        if inner != original:
            raise ConfigError(
                f"Phi3Config: field '{where}.original_max_position_embeddings' ({inner!r}) differs from "
                f"the top-level 'original_max_position_embeddings' ({original}), the one Transformers reads"
            )
