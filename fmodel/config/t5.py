"""The T5 config (`model_type: t5`): Transformers 4.57's `T5Config` fields and defaults.

T5 v1.0 (`feed_forward_proj: "relu"`, tied LM head) and v1.1 / Flan-T5 (`"gated-gelu"`,
`tie_word_embeddings: false`) are the same class. Generic names map to T5's own, as
Transformers' `attribute_map`: hidden_size -> d_model, num_attention_heads -> num_heads,
num_hidden_layers -> num_layers, head_dim -> d_kv.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import attrs

from ..errors import ConfigError
from .base import (
    ACTIVATIONS,
    FFN_MAX,
    HEAD_DIM_MAX,
    HEADS_MAX,
    LAYERS_MAX,
    POSITIONS_MAX,
    VOCAB_MAX,
    WIDTH_MAX,
    BaseConfig,
    bool_field,
    float_field,
    int_field,
    register_config,
    str_field,
    token_id_field,
)

__all__ = ["T5Config"]


@register_config
@attrs.frozen(kw_only=True)
class T5Config(BaseConfig):
    """T5 (`model_type: t5`): an encoder-decoder with relative position buckets.

    `num_decoder_layers` None means as many as `num_layers` (Transformers resolves it on
    construction and writes the number; `decoder_layers` gives it here). `dense_act_fn` and
    `is_gated_act` are derived from `feed_forward_proj` unless config.json sets them (then,
    as in Transformers, the file's values win; they are kept with the file's other keys).
    """

    model_type: ClassVar[str] = "t5"
    field_aliases: ClassVar[Mapping[str, str]] = {
        "hidden_size": "d_model",
        "num_attention_heads": "num_heads",
        "num_hidden_layers": "num_layers",
        "head_dim": "d_kv",
    }

    vocab_size: int = int_field(32128, maximum=VOCAB_MAX)
    d_model: int = int_field(512, maximum=WIDTH_MAX)
    d_kv: int = int_field(64, maximum=HEAD_DIM_MAX)
    d_ff: int = int_field(2048, maximum=FFN_MAX)
    num_layers: int = int_field(6, maximum=LAYERS_MAX)
    num_decoder_layers: int | None = int_field(None, nullable=True, maximum=LAYERS_MAX)
    num_heads: int = int_field(8, maximum=HEADS_MAX)
    relative_attention_num_buckets: int = int_field(32, maximum=POSITIONS_MAX)
    relative_attention_max_distance: int = int_field(128, maximum=POSITIONS_MAX)
    dropout_rate: float = float_field(0.1)
    classifier_dropout: float = float_field(0.0)
    layer_norm_epsilon: float = float_field(1e-6)
    initializer_factor: float = float_field(1.0)
    feed_forward_proj: str = str_field("relu")
    is_encoder_decoder: bool = bool_field(True)
    pad_token_id: Any = token_id_field(0)
    eos_token_id: Any = token_id_field(1)
    decoder_start_token_id: Any = token_id_field(None)

    # -- derived values -------------------------------------------------------------

    @property
    def decoder_layers(self) -> int:
        """Layers of the decoder stack (`num_decoder_layers`, defaulting to `num_layers`)."""
        return self.num_decoder_layers if self.num_decoder_layers is not None else self.num_layers

    @property
    def dense_act_fn(self) -> str:
        """The feed-forward activation's ACT2FN name, as Transformers resolves it: config.json's
        `dense_act_fn` when it has one (Transformers sets it after deriving its own), else
        from `feed_forward_proj` ("gated-gelu" means "gelu_new", its backwards-compatible rule)."""
        given = self.extra.get("dense_act_fn")
        if given is not None:
            return given
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]

    @property
    def is_gated_act(self) -> bool:
        """True for the gated feed-forward (wi_0, wi_1, wo) of T5 v1.1: config.json's
        `is_gated_act` when it has one, else from `feed_forward_proj`."""
        given = self.extra.get("is_gated_act")
        if given is not None:
            return given
        return self.feed_forward_proj.split("-")[0] == "gated"

    @property
    def activation(self) -> str:
        return self.dense_act_fn

    @property
    def gated(self) -> bool:
        return self.is_gated_act

    @property
    def inner_dim(self) -> int:
        """num_heads * d_kv: the width of the attention projections."""
        return self.num_heads * self.d_kv

    @property
    def intermediate_size(self) -> int:
        """The generic name of `d_ff` (what size checks and messages read)."""
        return self.d_ff

    def parameter_estimate(self) -> int:
        """Parameters this config declares, by arithmetic (for memory checks before a load):
        shared embeddings (+ an untied LM head), the encoder and decoder blocks, the two
        relative-bias tables."""
        d, inner, ff = self.d_model, self.inner_dim, self.d_ff
        mlp = (3 if self.gated else 2) * d * ff
        encoder = self.num_layers * (4 * d * inner + mlp + 2 * d)
        decoder = self.decoder_layers * (8 * d * inner + mlp + 3 * d)
        heads = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return heads + encoder + decoder + 2 * d + 2 * self.relative_attention_num_buckets * self.num_heads

    # -- validation -------------------------------------------------------------------

    def _validate(self) -> None:
        for key, kind, ok in (
            ("dense_act_fn", "a string", lambda v: isinstance(v, str)),
            ("is_gated_act", "true or false", lambda v: isinstance(v, bool)),
        ):
            value = self.extra.get(key)
            if value is not None and not ok(value):
                raise ConfigError(f"T5Config: field {key!r} expected {kind} or null, got {value!r:.80}")
        parts = self.feed_forward_proj.split("-")
        if (len(parts) > 1 and parts[0] != "gated") or len(parts) > 2:
            raise ConfigError(
                f"T5Config: field 'feed_forward_proj' is {self.feed_forward_proj!r}; it must be "
                "'gated-{ACT_FN}' or '{ACT_FN}', e.g. 'gated-gelu' or 'relu' (as Transformers)"
            )
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"T5Config: activation {self.activation!r} (from 'feed_forward_proj' / 'dense_act_fn') "
                f"is not implemented; fmodel implements {sorted(ACTIVATIONS)}"
            )
        buckets, distance = self.relative_attention_num_buckets, self.relative_attention_max_distance
        if buckets < 4:
            raise ConfigError(
                f"T5Config: field 'relative_attention_num_buckets' is {buckets}; the bidirectional "
                "encoder buckets need at least 4 (half per direction, half of those exact)"
            )
        if distance in (buckets // 2, buckets // 4):
            raise ConfigError(
                f"T5Config: field 'relative_attention_max_distance' ({distance}) equals the exact-bucket "
                f"count of a stack ({buckets // 4} encoder, {buckets // 2} decoder), which divides by "
                "log(1) = 0 in the bucket formula"
            )
        if self.pruned_heads:
            raise ConfigError(
                "T5Config: field 'pruned_heads' is not empty; pruned T5 heads are not supported "
                "(Transformers 4.57's T5 prune_heads does not run either)"
            )
