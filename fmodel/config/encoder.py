"""Configs of the learned-position families: GPT-2 and BERT (Transformers' names and defaults)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import attrs

from ..errors import ConfigError
from .base import (
    ACTIVATIONS,
    FFN_MAX,
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

__all__ = ["BertConfig", "GPT2Config"]


def _check_common(config, heads: int, hidden: int, act: str) -> None:
    name = type(config).__name__
    if hidden % heads:
        raise ConfigError(f"{name}: hidden size {hidden} must be divisible by the number of heads {heads}")
    if act not in ACTIVATIONS:
        raise ConfigError(
            f"{name}: activation {act!r} is not implemented; fmodel implements {sorted(ACTIVATIONS)}"
        )
    for layer, pruned in config.pruned_heads.items():
        if not 0 <= layer < config.num_hidden_layers or any(not 0 <= h < heads for h in pruned):
            raise ConfigError(
                f"{name}: field 'pruned_heads' entry {layer}: {list(pruned)} is out of range "
                f"({config.num_hidden_layers} layers of {heads} heads)"
            )


@register_config
@attrs.frozen(kw_only=True)
class GPT2Config(BaseConfig):
    """GPT-2 (`model_type: gpt2`). Generic names map to GPT-2's own: hidden_size -> n_embd,
    num_attention_heads -> n_head, num_hidden_layers -> n_layer, max_position_embeddings -> n_positions."""

    model_type: ClassVar[str] = "gpt2"
    field_aliases: ClassVar[Mapping[str, str]] = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
    }

    vocab_size: int = int_field(50257, maximum=VOCAB_MAX)
    n_positions: int = int_field(1024, maximum=POSITIONS_MAX)
    n_embd: int = int_field(768, maximum=WIDTH_MAX)
    n_layer: int = int_field(12, maximum=LAYERS_MAX)
    n_head: int = int_field(12, maximum=HEADS_MAX)
    n_inner: int | None = int_field(None, nullable=True, maximum=FFN_MAX)
    activation_function: str = str_field("gelu_new")
    resid_pdrop: float = float_field(0.1)
    embd_pdrop: float = float_field(0.1)
    attn_pdrop: float = float_field(0.1)
    layer_norm_epsilon: float = float_field(1e-5)
    scale_attn_weights: bool = bool_field(True)
    scale_attn_by_inverse_layer_idx: bool = bool_field(False)
    reorder_and_upcast_attn: bool = bool_field(False)
    bos_token_id: Any = token_id_field(50256)
    eos_token_id: Any = token_id_field(50256)

    @property
    def intermediate_size(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def _validate(self) -> None:
        _check_common(self, self.n_head, self.n_embd, self.activation_function)


@register_config
@attrs.frozen(kw_only=True)
class BertConfig(BaseConfig):
    """BERT (`model_type: bert`), absolute position embeddings."""

    model_type: ClassVar[str] = "bert"

    vocab_size: int = int_field(30522, maximum=VOCAB_MAX)
    hidden_size: int = int_field(768, maximum=WIDTH_MAX)
    num_hidden_layers: int = int_field(12, maximum=LAYERS_MAX)
    num_attention_heads: int = int_field(12, maximum=HEADS_MAX)
    intermediate_size: int = int_field(3072, maximum=FFN_MAX)
    hidden_act: str = str_field("gelu")
    hidden_dropout_prob: float = float_field(0.1)
    attention_probs_dropout_prob: float = float_field(0.1)
    max_position_embeddings: int = int_field(512, maximum=POSITIONS_MAX)
    type_vocab_size: int = int_field(2, maximum=VOCAB_MAX)
    layer_norm_eps: float = float_field(1e-12)
    pad_token_id: Any = token_id_field(0)
    position_embedding_type: str = str_field("absolute")
    classifier_dropout: float | None = float_field(None, nullable=True)

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def _validate(self) -> None:
        _check_common(self, self.num_attention_heads, self.hidden_size, self.hidden_act)
        if self.position_embedding_type != "absolute":
            raise ConfigError(
                f"BertConfig: field 'position_embedding_type' is {self.position_embedding_type!r}; "
                "fmodel implements 'absolute'"
            )
