"""Configs of the Gemma 2 and Gemma 3 (text) decoders: Transformers 4.57's names and defaults.

What the shared decoder reads from them (`DecoderConfig`'s properties):
    attention_scaling: `query_pre_attn_scalar ** -0.5` (not head_dim's);
    attention_softcap: Gemma 2's `attn_logit_softcapping` (scores become tanh(s / cap) * cap
        before the mask). Gemma 3 keeps the field but Transformers 4.57's Gemma3Attention never
        passes it to the attention function, so it is None there too (same numerics);
    logit_softcap: `final_logit_softcapping`, both families;
    layer_sliding_window(i): `sliding_window` on the layers `layer_types` marks
        "sliding_attention" (Gemma 2 default: every other layer from the first; Gemma 3: all but
        every `sliding_window_pattern`-th);
    layer_rope(i) (Gemma 3): sliding layers rotate with `rope_local_base_freq` and no scaling
        (the model's `rotary_emb_local`), full ones with `rope_theta` / `rope_scaling`.

The activation is `hidden_activation` (Gemma's name). `hidden_act`, which Gemma 2 checkpoints
sometimes carry too, is kept for the round trip and read by nothing, as in Transformers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import attrs

from .._frozen import thaw
from ..errors import ConfigError
from .base import (
    FFN_MAX,
    HEAD_DIM_MAX,
    HEADS_MAX,
    LAYERS_MAX,
    POSITIONS_MAX,
    VOCAB_MAX,
    WIDTH_MAX,
    _is_float,
    _short,
    bool_field,
    float_field,
    frozen_field,
    int_field,
    register_config,
    str_field,
    token_id_field,
)
from .decoder import DecoderConfig

__all__ = ["Gemma2Config", "Gemma3TextConfig"]

LAYER_TYPES = ("full_attention", "sliding_attention")


def _layer_types_field() -> Any:
    return frozen_field(
        None,
        kind="a list of 'full_attention' / 'sliding_attention'",
        accept=lambda v: isinstance(v, tuple) and all(x in LAYER_TYPES for x in v),
    )


@attrs.frozen(kw_only=True)
class _GemmaConfig(DecoderConfig):
    """Fields and rules Gemma 2 and Gemma 3 share (Gemma 2's defaults)."""

    activation_field: ClassVar[str] = "hidden_activation"
    vocab_size: int = int_field(256000, maximum=VOCAB_MAX)
    hidden_size: int = int_field(2304, maximum=WIDTH_MAX)
    intermediate_size: int = int_field(9216, maximum=FFN_MAX)
    num_hidden_layers: int = int_field(26, maximum=LAYERS_MAX)
    num_attention_heads: int = int_field(8, maximum=HEADS_MAX)
    num_key_value_heads: int | None = int_field(4, nullable=True, maximum=HEADS_MAX)
    head_dim: int | None = int_field(256, nullable=True, maximum=HEAD_DIM_MAX)
    hidden_activation: str = str_field("gelu_pytorch_tanh")
    hidden_act: str | None = str_field(None, nullable=True)  # not read (Transformers neither)
    max_position_embeddings: int = int_field(8192, maximum=POSITIONS_MAX)
    rms_norm_eps: float = float_field(1e-6)
    pad_token_id: Any = token_id_field(0)
    eos_token_id: Any = token_id_field(1)
    bos_token_id: Any = token_id_field(2)
    tie_word_embeddings: bool = bool_field(True)
    attention_bias: bool = bool_field(False)
    query_pre_attn_scalar: float = float_field(256.0)
    sliding_window: int | None = int_field(4096, nullable=True)
    layer_types: tuple[str, ...] | None = _layer_types_field()
    final_logit_softcapping: float | None = float_field(30.0, nullable=True)
    attn_logit_softcapping: float | None = float_field(50.0, nullable=True)

    def _default_layer_type(self, layer_idx: int) -> str:
        return "sliding_attention" if (layer_idx + 1) % 2 else "full_attention"

    # -- derived values -------------------------------------------------------------

    def layer_type(self, layer_idx: int) -> str:
        """'sliding_attention' or 'full_attention' for layer `layer_idx` (`layer_types`, else
        the family's default pattern, as Transformers fills `layer_types`)."""
        if self.layer_types is not None:
            return self.layer_types[layer_idx]
        return self._default_layer_type(layer_idx)

    def layer_sliding_window(self, layer_idx: int) -> int | None:
        return self.sliding_window if self.layer_type(layer_idx) == "sliding_attention" else None

    @property
    def attention_scaling(self) -> float:
        return self.query_pre_attn_scalar**-0.5

    @property
    def attention_softcap(self) -> float | None:
        return self.attn_logit_softcapping

    @property
    def logit_softcap(self) -> float | None:
        return self.final_logit_softcapping

    # -- validation -------------------------------------------------------------------

    def _validate(self) -> None:
        name = type(self).__name__
        super()._validate()  # the activation checked is `hidden_activation` (activation_field)
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"{name}: field 'layer_types' has {len(self.layer_types)} entries, "
                f"expected num_hidden_layers={self.num_hidden_layers}"
            )
        for field in ("query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping"):
            value = getattr(self, field)
            if value is not None and value <= 0:
                raise ConfigError(f"{name}: field {field!r} must be a positive number or null, got {value!r}")

    # -- serialisation ----------------------------------------------------------------

    def _write_json(self, out: dict[str, Any]) -> dict[str, Any]:
        if self.hidden_act is None and "hidden_act" not in self.given:
            out.pop("hidden_act", None)  # Transformers' Gemma configs have no such field
        return super()._write_json(out)


@register_config
@attrs.frozen(kw_only=True)
class Gemma2Config(_GemmaConfig):
    """Gemma 2 (`model_type: gemma2`), defaults as Transformers' `Gemma2Config` (gemma-2-2b's
    shape): soft-capped attention (50) and logits (30), a 4096-token window on every other layer."""

    model_type: ClassVar[str] = "gemma2"


@register_config
@attrs.frozen(kw_only=True)
class Gemma3TextConfig(_GemmaConfig):
    """Gemma 3's text decoder (`model_type: gemma3_text`), defaults as Transformers'
    `Gemma3TextConfig`: q/k norms, no soft-capping, five sliding layers (`rope_local_base_freq`)
    to one global layer (`rope_theta`, `rope_scaling`).

    `sliding_window_pattern` (Hub configs' old spelling) sets the layers only when `layer_types`
    is absent: layer i slides unless (i + 1) is a multiple of it. `use_bidirectional_attention`
    (EmbeddingGemma) is refused: fmodel's Gemma 3 is a causal decoder.

    Transformers 5's `rope_parameters` with one entry per layer type ({"full_attention": {...},
    "sliding_attention": {...}}) loads too, and is written back in that spelling.
    """

    model_type: ClassVar[str] = "gemma3_text"

    vocab_size: int = int_field(262_208, maximum=VOCAB_MAX)
    max_position_embeddings: int = int_field(131_072, maximum=POSITIONS_MAX)
    rope_theta: float = float_field(1_000_000.0)
    rope_local_base_freq: float = float_field(10_000.0)
    sliding_window_pattern: int = int_field(6)
    final_logit_softcapping: float | None = float_field(None, nullable=True)
    attn_logit_softcapping: float | None = float_field(None, nullable=True)
    use_bidirectional_attention: bool = bool_field(False)

    def _default_layer_type(self, layer_idx: int) -> str:
        return "sliding_attention" if (layer_idx + 1) % self.sliding_window_pattern else "full_attention"

    def layer_rope(self, layer_idx: int) -> str:
        return "rotary_emb_local" if self.layer_type(layer_idx) == "sliding_attention" else "rotary_emb"

    @property
    def attention_softcap(self) -> float | None:
        # Transformers 4.57's Gemma3Attention does not pass attn_logit_softcapping on.
        return None

    def local_rope_config(self) -> Gemma3TextConfig:
        """The config the sliding layers' rotary module reads: `rope_local_base_freq`, no scaling
        (as Transformers' `rotary_emb_local`)."""
        return attrs.evolve(self, rope_theta=self.rope_local_base_freq, rope_scaling={"rope_type": "default"})

    def _validate(self) -> None:
        super()._validate()
        if self.use_bidirectional_attention:
            raise ConfigError(
                "Gemma3TextConfig: field 'use_bidirectional_attention' is true (EmbeddingGemma); "
                "fmodel implements Gemma 3 as a causal decoder only"
            )
        if self.rope_local_base_freq <= 0:
            raise ConfigError(
                f"Gemma3TextConfig: field 'rope_local_base_freq' must be positive, got {self.rope_local_base_freq!r}"
            )

    # -- Transformers 5's rope_parameters per layer type -----------------------------------

    @classmethod
    def _read_json(cls, data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        params = data.get("rope_parameters")
        if not (isinstance(params, Mapping) and set(params) & set(LAYER_TYPES)):
            return super()._read_json(data)
        data.pop("rope_parameters")
        unknown = sorted(set(params) - set(LAYER_TYPES))
        if unknown:
            raise ConfigError(
                f"Gemma3TextConfig: field 'rope_parameters' mixes layer types with other keys {unknown}"
            )
        full, local = params.get("full_attention", {}), params.get("sliding_attention", {})
        for key, entry in (("full_attention", full), ("sliding_attention", local)):
            if not isinstance(entry, Mapping):
                raise ConfigError(
                    f"Gemma3TextConfig: field 'rope_parameters.{key}' expected a mapping, got {_short(entry)}"
                )
        local = dict(local)
        if local.get("rope_type", "default") != "default" or set(local) - {"rope_type", "rope_theta"}:
            raise ConfigError(
                "Gemma3TextConfig: field 'rope_parameters.sliding_attention' may only set 'rope_theta' "
                f"(fmodel's and Transformers 4.57's local rope is unscaled), got {_short(local)}"
            )
        if "rope_theta" in local:
            if not _is_float(local["rope_theta"]):
                raise ConfigError(
                    "Gemma3TextConfig: field 'rope_parameters.sliding_attention.rope_theta' expected a "
                    f"number, got {_short(local['rope_theta'])}"
                )
            data["rope_local_base_freq"] = local["rope_theta"]
        full = dict(full)
        if "rope_theta" in full:
            data["rope_theta"] = full.pop("rope_theta")
        data["rope_scaling"] = full
        return data, {"rope_spelling": "rope_parameters_by_layer"}

    def _write_json(self, out: dict[str, Any]) -> dict[str, Any]:
        out = super()._write_json(out)
        if self.rope_spelling == "rope_parameters_by_layer":
            full = thaw(self.rope_scaling) if self.rope_scaling is not None else {"rope_type": "default"}
            full["rope_theta"] = out.pop("rope_theta", self.rope_theta)
            local = {
                "rope_type": "default",
                "rope_theta": out.pop("rope_local_base_freq", self.rope_local_base_freq),
            }
            out.pop("rope_scaling", None)
            out["rope_parameters"] = {"full_attention": full, "sliding_attention": local}
        return out
