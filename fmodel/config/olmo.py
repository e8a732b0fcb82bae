"""The configs of OLMo (`model_type: olmo`) and OLMo 2 (`olmo2`), Transformers 4.57's fields and
defaults. OLMo's norms have no weights and no eps field (eps is 1e-5); OLMo 2's RMSNorms read
`rms_norm_eps`. In Transformers 4's spelling both accept only the rope scaling Transformers 4.57
accepts for them, `{"type": "linear" or "dynamic", "factor": a float > 1}`; Transformers 5's
`rope_parameters` follow the generic rules (`fmodel.config.decoder`)."""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from ..errors import ConfigError
from .base import (
    HEADS_MAX,
    VOCAB_MAX,
    bool_field,
    float_field,
    int_field,
    register_config,
    token_id_field,
)
from .decoder import DecoderConfig

__all__ = ["Olmo2Config", "OlmoConfig"]

_ROPE_SCALINGS = ("linear", "dynamic")


@attrs.frozen(kw_only=True)
class _OlmoFamilyConfig(DecoderConfig):
    """The fields OLMo and OLMo 2 share (Transformers' `OlmoConfig` without `clip_qkv`)."""

    vocab_size: int = int_field(50304, maximum=VOCAB_MAX)
    num_key_value_heads: int | None = int_field(None, nullable=True, maximum=HEADS_MAX)
    pad_token_id: Any = token_id_field(1)
    bos_token_id: Any = token_id_field(None)
    eos_token_id: Any = token_id_field(50279)
    attention_bias: bool = bool_field(False)

    def _validate_rope(self) -> None:
        if self.rope_spelling == "rope_parameters":  # Transformers 5's spelling: its generic rules
            super()._validate_rope()
            return
        # Transformers 4.57's `OlmoConfig._rope_scaling_validation`: exactly {"type", "factor"}.
        scaling = self.rope_scaling
        if scaling is None:
            return
        name = type(self).__name__
        kind, factor = scaling.get("type"), scaling.get("factor")
        if len(scaling) != 2 or kind not in _ROPE_SCALINGS:
            raise ConfigError(
                f"{name}: field 'rope_scaling' must be {{'type': one of {list(_ROPE_SCALINGS)}, "
                f"'factor': a float > 1}}, got {dict(scaling)!r}"
            )
        if not isinstance(factor, float) or factor <= 1.0:
            raise ConfigError(f"{name}: field 'rope_scaling.factor' must be a float > 1, got {factor!r}")

    def transformers4_rope_scaling(self, scaling: dict[str, Any]) -> dict[str, Any] | None:
        # 4.57's OLMo accepts exactly {"type", "factor"} (no "rope_type" key)
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        return None if kind == "default" else {"type": kind, "factor": scaling.get("factor")}


@register_config
@attrs.frozen(kw_only=True)
class OlmoConfig(_OlmoFamilyConfig):
    """OLMo (`model_type: olmo`): weightless LayerNorms (eps 1e-5; `rms_norm_eps` is not read),
    and `clip_qkv`: q, k and v projections clamped to [-clip_qkv, clip_qkv] when set."""

    model_type: ClassVar[str] = "olmo"

    clip_qkv: float | None = float_field(None, nullable=True)

    def _validate(self) -> None:
        super()._validate()
        if self.clip_qkv is not None and self.clip_qkv <= 0:
            raise ConfigError(
                f"OlmoConfig: field 'clip_qkv' must be a positive number or null, got {self.clip_qkv}"
            )

    @property
    def qkv_clip(self) -> float | None:
        return self.clip_qkv


@register_config
@attrs.frozen(kw_only=True)
class Olmo2Config(_OlmoFamilyConfig):
    """OLMo 2 (`model_type: olmo2`): RMSNorms after each sublayer and on the whole q and k
    projections, all with `rms_norm_eps`; no `clip_qkv` (Transformers deletes it)."""

    model_type: ClassVar[str] = "olmo2"

    rms_norm_eps: float = float_field(1e-5)
