"""Configs of the rotary decoder families: Llama, Mistral, Qwen2 (Transformers' names and defaults).

Both rope spellings load: Transformers 4 (`rope_theta` + `rope_scaling`) and Transformers 5
(`rope_parameters`, which carries `rope_theta` inside); a config is written back in the
spelling it was read in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import attrs

from .._frozen import FrozenDict, thaw
from ..errors import ConfigError
from .base import (
    ACTIVATIONS as _ACTIVATIONS,
)
from .base import (
    FFN_MAX,
    HEAD_DIM_MAX,
    HEADS_MAX,
    LAYERS_MAX,
    POSITIONS_MAX,
    VOCAB_MAX,
    WIDTH_MAX,
    BaseConfig,
    _is_float,
    bool_field,
    float_field,
    frozen_field,
    int_field,
    register_config,
    str_field,
    token_id_field,
)

__all__ = ["DecoderConfig", "LlamaConfig", "MistralConfig", "Qwen2Config"]

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
_ROPE_REQUIRED = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@attrs.frozen(kw_only=True)
class DecoderConfig(BaseConfig):
    """Fields shared by the rotary decoder families (Llama, Qwen2, Mistral)."""

    vocab_size: int = int_field(32000, maximum=VOCAB_MAX)
    hidden_size: int = int_field(4096, maximum=WIDTH_MAX)
    intermediate_size: int = int_field(11008, maximum=FFN_MAX)
    num_hidden_layers: int = int_field(32, maximum=LAYERS_MAX)
    num_attention_heads: int = int_field(32, maximum=HEADS_MAX)
    num_key_value_heads: int | None = int_field(None, nullable=True, maximum=HEADS_MAX)
    head_dim: int | None = int_field(None, nullable=True, maximum=HEAD_DIM_MAX)
    hidden_act: str = str_field("silu")
    max_position_embeddings: int = int_field(2048, maximum=POSITIONS_MAX)
    rms_norm_eps: float = float_field(1e-6)
    tie_word_embeddings: bool = bool_field(False)
    rope_theta: float = float_field(10000.0)
    rope_scaling: FrozenDict | None = frozen_field(None)
    attention_dropout: float = float_field(0.0)
    bos_token_id: Any = token_id_field(1)
    eos_token_id: Any = token_id_field(2)
    rope_spelling: str = attrs.field(default="rope_scaling", repr=False)
    # The config field holding the MLP's activation (Gemma's is `hidden_activation`).
    activation_field: ClassVar[str] = "hidden_act"

    # -- derived values -------------------------------------------------------------

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (`num_key_value_heads`, defaulting to the query heads)."""
        return self.num_key_value_heads if self.num_key_value_heads is not None else self.num_attention_heads

    @property
    def head_size(self) -> int:
        """Per-head width: `head_dim` when set, else `hidden_size // num_attention_heads`."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def mlp_activation(self) -> str:
        """The MLP's activation name: the field `activation_field` names (`hidden_act`)."""
        return getattr(self, self.activation_field)

    @property
    def qkv_bias(self) -> bool:
        """q/k/v projections carry a bias: the family's `attention_bias` field, False without one."""
        return bool(getattr(self, "attention_bias", False))

    @property
    def o_bias(self) -> bool:
        """The output projection carries a bias: the family's `attention_bias`, False without one."""
        return bool(getattr(self, "attention_bias", False))

    @property
    def mlp_has_bias(self) -> bool:
        return False

    def layer_sliding_window(self, layer_idx: int) -> int | None:
        """The sliding-window width of layer `layer_idx`, or None for full causal attention."""
        return None

    def layer_rope(self, layer_idx: int) -> str:
        """The rotary module (attribute of the model) whose tables layer `layer_idx` uses."""
        return "rotary_emb"

    @property
    def attention_scaling(self) -> float:
        """The factor on q.k: head_size ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)."""
        return self.head_size**-0.5

    @property
    def attention_softcap(self) -> float | None:
        """Attention scores become tanh(s / cap) * cap before the mask (Gemma 2), or None."""
        return None

    @property
    def logit_softcap(self) -> float | None:
        """The logits become tanh(l / cap) * cap (Gemma 2/3), or None."""
        return None

    @property
    def qkv_clip(self) -> float | None:
        """q, k and v projections are clamped to [-clip, clip] (OLMo's clip_qkv), or None."""
        return None

    # -- validation -------------------------------------------------------------------

    def _validate(self) -> None:
        self._validate_shapes()
        self._validate_activation(self.activation_field, self.mlp_activation)
        self._validate_rope()
        self._validate_pruned_heads()

    def _validate_activation(self, field: str, value: str) -> None:
        if value not in _ACTIVATIONS:
            raise ConfigError(
                f"{type(self).__name__}: field {field!r} is {value!r}; fmodel implements {sorted(_ACTIVATIONS)}"
            )

    def _validate_shapes(self) -> None:
        name = type(self).__name__
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"{name}: field 'hidden_size' ({self.hidden_size}) must be divisible by "
                f"'num_attention_heads' ({self.num_attention_heads}) when 'head_dim' is not set"
            )
        if self.num_attention_heads % self.kv_heads:
            raise ConfigError(
                f"{name}: field 'num_key_value_heads' ({self.kv_heads}) must divide "
                f"'num_attention_heads' ({self.num_attention_heads})"
            )
        if self.head_size % 2:
            raise ConfigError(
                f"{name}: rotary embeddings need an even head size, got head size {self.head_size}"
            )

    def _validate_pruned_heads(self) -> None:
        groups = self.num_attention_heads // self.kv_heads
        for layer, heads in self.pruned_heads.items():
            if not 0 <= layer < self.num_hidden_layers or any(
                not 0 <= h < self.num_attention_heads for h in heads
            ):
                raise ConfigError(
                    f"{type(self).__name__}: field 'pruned_heads' entry {layer}: {list(heads)} is out of range "
                    f"({self.num_hidden_layers} layers of {self.num_attention_heads} heads)"
                )
            partial = sorted({h // groups for h in heads if any(g not in heads for g in _group(h, groups))})
            if partial:
                raise ConfigError(
                    f"{type(self).__name__}: field 'pruned_heads' entry {layer}: {list(heads)} splits key/value "
                    f"group(s) {partial}; with {groups} query heads per key/value head only whole groups can be pruned"
                )

    def _validate_rope(self) -> None:
        where = "rope_parameters" if self.rope_spelling == "rope_parameters" else "rope_scaling"
        rope_type = self.rope_type
        if rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"{type(self).__name__}: field '{where}.rope_type' is {rope_type!r}; expected one of {ROPE_TYPES}"
            )
        if rope_type == "longrope":
            self._validate_longrope(where)
        for key in _ROPE_REQUIRED.get(rope_type, ()):
            value = self.rope_scaling.get(key)
            if not _is_float(value) or value <= 0:
                raise ConfigError(
                    f"{type(self).__name__}: rope type {rope_type!r} needs a positive number in field "
                    f"'{where}.{key}', got {value!r}"
                )

    def _validate_longrope(self, where: str) -> None:
        """`short_factor` / `long_factor`: one positive number per rotated frequency pair;
        `attention_factor` positive when given. Where the original length comes from is the
        family's (`_validate_longrope_original`)."""
        name, params = type(self).__name__, self.rope_scaling
        rotated = int(self.head_size * getattr(self, "partial_rotary_factor", 1.0))  # rope.rotary_dim
        pairs = (rotated + 1) // 2
        for key in ("short_factor", "long_factor"):
            value = params.get(key)
            if not (
                isinstance(value, tuple)
                and len(value) == pairs
                and all(_is_float(x) and x > 0 for x in value)
            ):
                raise ConfigError(
                    f"{name}: rope type 'longrope' needs field '{where}.{key}': a list of {pairs} positive "
                    f"numbers (one per rotated pair of the head size), got {value!r}"
                )
        attention_factor = params.get("attention_factor")
        if attention_factor is not None and (not _is_float(attention_factor) or attention_factor <= 0):
            raise ConfigError(
                f"{name}: field '{where}.attention_factor' must be a positive number, got {attention_factor!r}"
            )
        self._validate_longrope_original(where)

    def _validate_longrope_original(self, where: str) -> None:
        # Transformers 4.57 reads the original length only from a top-level config attribute
        # (which these families model nowhere) and then uses `factor`; it ignores the key in
        # rope_scaling. Either key here would make the two disagree silently.
        name = type(self).__name__
        if "original_max_position_embeddings" in (self.rope_scaling or {}) or (
            "original_max_position_embeddings" in self.extra
        ):
            raise ConfigError(
                f"{name}: rope type 'longrope' with 'original_max_position_embeddings' is not supported for "
                f"model type {self.model_type!r} (Transformers 4.57 reads it only for Phi-3); scale with "
                f"'{where}.factor'"
            )
        factor = self.rope_scaling.get("factor")
        if self.rope_scaling.get("attention_factor") is None and (not _is_float(factor) or factor <= 0):
            raise ConfigError(
                f"{name}: rope type 'longrope' needs a positive number in field '{where}.factor' "
                f"(or '{where}.attention_factor'), got {factor!r}"
            )

    # -- rope spellings ------------------------------------------------------------------

    @classmethod
    def _read_json(cls, data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        if "rope_parameters" not in data:
            return data, {}
        params = data.pop("rope_parameters")
        if not isinstance(params, Mapping):
            raise ConfigError(f"{cls.__name__}: field 'rope_parameters' expected a mapping, got {params!r}")
        params = dict(params)
        if "rope_theta" in params:
            data["rope_theta"] = params.pop("rope_theta")
        data["rope_scaling"] = params
        return data, {"rope_spelling": "rope_parameters"}

    def transformers4_rope_scaling(self, scaling: dict[str, Any]) -> dict[str, Any] | None:
        """The Transformers 4 `rope_scaling` a save writes beside Transformers 5's
        `rope_parameters` (without `rope_theta`), so 4.x reads the same model; None for default."""
        return None if scaling.get("rope_type", "default") == "default" else scaling

    def _write_json(self, out: dict[str, Any]) -> dict[str, Any]:
        if self.rope_spelling == "rope_parameters":
            params = thaw(self.rope_scaling) if self.rope_scaling is not None else {"rope_type": "default"}
            if "rope_theta" in out:  # given, or changed from the default
                params["rope_theta"] = out.pop("rope_theta")
            out.pop("rope_scaling", None)
            out["rope_parameters"] = params
        return out


def _group(head: int, groups: int) -> range:
    start = head // groups * groups
    return range(start, start + groups)


@register_config
@attrs.frozen(kw_only=True)
class LlamaConfig(DecoderConfig):
    """Llama (`model_type: llama`), defaults as Transformers' `LlamaConfig`."""

    model_type: ClassVar[str] = "llama"

    attention_bias: bool = bool_field(False)
    mlp_bias: bool = bool_field(False)

    @property
    def mlp_has_bias(self) -> bool:
        return self.mlp_bias


@register_config
@attrs.frozen(kw_only=True)
class MistralConfig(DecoderConfig):
    """Mistral (`model_type: mistral`): sliding-window attention on every layer."""

    model_type: ClassVar[str] = "mistral"

    intermediate_size: int = int_field(14336, maximum=FFN_MAX)
    num_key_value_heads: int | None = int_field(8, nullable=True, maximum=HEADS_MAX)
    max_position_embeddings: int = int_field(4096 * 32, maximum=POSITIONS_MAX)
    sliding_window: int | None = int_field(4096, nullable=True)

    def layer_sliding_window(self, layer_idx: int) -> int | None:
        return self.sliding_window


@register_config
@attrs.frozen(kw_only=True)
class Qwen2Config(DecoderConfig):
    """Qwen2 (`model_type: qwen2`): bias on q/k/v, optional sliding window per `layer_types`."""

    model_type: ClassVar[str] = "qwen2"

    vocab_size: int = int_field(151936, maximum=VOCAB_MAX)
    intermediate_size: int = int_field(22016, maximum=FFN_MAX)
    num_key_value_heads: int | None = int_field(32, nullable=True, maximum=HEADS_MAX)
    max_position_embeddings: int = int_field(32768, maximum=POSITIONS_MAX)
    bos_token_id: Any = token_id_field(None)
    eos_token_id: Any = token_id_field(None)
    use_sliding_window: bool = bool_field(False)
    sliding_window: int | None = int_field(4096, nullable=True)
    max_window_layers: int = int_field(28, positive=False)
    layer_types: tuple[str, ...] | None = frozen_field(
        None,
        kind="a list of 'full_attention' / 'sliding_attention'",
        accept=lambda v: (
            isinstance(v, tuple) and all(x in ("full_attention", "sliding_attention") for x in v)
        ),
    )

    def _validate(self) -> None:
        super()._validate()
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"{type(self).__name__}: field 'layer_types' has {len(self.layer_types)} entries, "
                f"expected num_hidden_layers={self.num_hidden_layers}"
            )

    @property
    def qkv_bias(self) -> bool:
        return True

    def layer_sliding_window(self, layer_idx: int) -> int | None:
        # As Transformers: the window applies only when use_sliding_window is on, and then to the
        # layers `layer_types` marks as sliding (by default those at index >= max_window_layers).
        if not self.use_sliding_window or self.sliding_window is None:
            return None
        if self.layer_types is not None:
            sliding = self.layer_types[layer_idx] == "sliding_attention"
        else:
            sliding = layer_idx >= self.max_window_layers
        return self.sliding_window if sliding else None
