"""Configs of the mixture-of-experts decoders: Mixtral and Qwen3-MoE (Transformers 4.57's names
and defaults).

Both are rotary decoders (`DecoderConfig`) whose feed-forward blocks are sparse: a router
(`gate`) picks `num_experts_per_tok` of the layer's experts for each token. The properties
`moe_experts`, `moe_top_k`, `moe_intermediate`, `moe_renormalise`, `moe_jitter` and
`layer_is_sparse(i)` are what the shared sparse block (`fmodel.models.moe`) reads.
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
    _is_int,
    bool_field,
    float_field,
    frozen_field,
    int_field,
    register_config,
    token_id_field,
)
from .decoder import DecoderConfig

__all__ = ["EXPERTS_MAX", "MOE_EXPERT_MLPS_MAX", "MixtralConfig", "MoeDecoderConfig", "Qwen3MoeConfig"]

# Experts per layer: the largest public models (2025) have 384-512 (Kimi K2, Qwen3-Next).
EXPERTS_MAX = 2**12
# Expert MLPs over all layers (layers x experts): the largest public models have ~25k (Qwen3-Next
# 48 x 512, Kimi K2 61 x 384); a skeleton of 2**15 takes seconds to build, and the bound keeps a
# hostile config (1024 layers x 4096 experts: 4M modules) from building for minutes.
MOE_EXPERT_MLPS_MAX = 2**15


@attrs.frozen(kw_only=True)
class MoeDecoderConfig(DecoderConfig):
    """What the mixture-of-experts families share: the router options and the auxiliary loss."""

    num_experts_per_tok: int = int_field(2, maximum=EXPERTS_MAX)
    output_router_logits: bool = bool_field(False)
    router_aux_loss_coef: float = float_field(0.001)

    # -- what the sparse block reads -------------------------------------------------------

    # `moe_experts` (experts per sparse layer) is a property of each family: its own field.

    @property
    def moe_top_k(self) -> int:
        return self.num_experts_per_tok

    @property
    def moe_intermediate(self) -> int:
        """The width of one expert's gated MLP."""
        return self.intermediate_size

    @property
    def moe_renormalise(self) -> bool:
        """Whether the top-k routing weights are renormalised to sum to one."""
        return True

    @property
    def moe_jitter(self) -> float:
        """Training-time multiplicative noise on the sparse block's input (Mixtral), or 0."""
        return 0.0

    def layer_is_sparse(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` has experts (else a plain gated MLP)."""
        return True

    # -- validation -------------------------------------------------------------------------

    def _validate(self) -> None:
        super()._validate()
        name = type(self).__name__
        sparse = [i for i in range(self.num_hidden_layers) if self.layer_is_sparse(i)]
        if sparse and self.num_experts_per_tok > self.moe_experts:
            raise ConfigError(
                f"{name}: field 'num_experts_per_tok' ({self.num_experts_per_tok}) must be at most "
                f"the number of experts ({self.moe_experts})"
            )
        if len(sparse) * self.moe_experts > MOE_EXPERT_MLPS_MAX:
            raise ConfigError(
                f"{name}: {len(sparse)} sparse layers x {self.moe_experts} experts = "
                f"{len(sparse) * self.moe_experts} expert MLPs, beyond the bound {MOE_EXPERT_MLPS_MAX} "
                f"(2**15) fmodel accepts"
            )


@register_config
@attrs.frozen(kw_only=True)
class MixtralConfig(MoeDecoderConfig):
    """Mixtral (`model_type: mixtral`), defaults as Transformers' `MixtralConfig`: every layer
    sparse (`num_local_experts` experts of `intermediate_size`), routing weights always
    renormalised, an optional sliding window on every layer, `router_jitter_noise` in training."""

    model_type: ClassVar[str] = "mixtral"

    intermediate_size: int = int_field(14336, maximum=FFN_MAX)
    num_key_value_heads: int | None = int_field(8, nullable=True, maximum=HEADS_MAX)
    max_position_embeddings: int = int_field(4096 * 32, maximum=POSITIONS_MAX)
    rms_norm_eps: float = float_field(1e-5)
    rope_theta: float = float_field(1e6)
    sliding_window: int | None = int_field(None, nullable=True)
    num_local_experts: int = int_field(8, maximum=EXPERTS_MAX)
    router_jitter_noise: float = float_field(0.0)

    @property
    def moe_experts(self) -> int:
        return self.num_local_experts

    @property
    def moe_jitter(self) -> float:
        return self.router_jitter_noise

    def layer_sliding_window(self, layer_idx: int) -> int | None:
        return self.sliding_window


def _int_list(value: Any) -> bool:
    return isinstance(value, tuple) and all(_is_int(v) for v in value)


@register_config
@attrs.frozen(kw_only=True)
class Qwen3MoeConfig(MoeDecoderConfig):
    """Qwen3-MoE (`model_type: qwen3_moe`), defaults as Transformers' `Qwen3MoeConfig`: q/k
    RMSNorm per head; layer i is sparse (`num_experts` experts of `moe_intermediate_size`)
    unless it is in `mlp_only_layers` or (i + 1) is not a multiple of `decoder_sparse_step`
    (or `num_experts` is 0), else a gated MLP of `intermediate_size`; the top-k weights are
    renormalised only with `norm_topk_prob`; `sliding_window` applies (to every layer) only
    with `use_sliding_window`, as Transformers sets it to None otherwise."""

    model_type: ClassVar[str] = "qwen3_moe"

    vocab_size: int = int_field(151936, maximum=VOCAB_MAX)
    hidden_size: int = int_field(2048, maximum=WIDTH_MAX)
    intermediate_size: int = int_field(6144, maximum=FFN_MAX)
    num_hidden_layers: int = int_field(24, maximum=LAYERS_MAX)
    num_key_value_heads: int | None = int_field(4, nullable=True, maximum=HEADS_MAX)
    max_position_embeddings: int = int_field(32768, maximum=POSITIONS_MAX)
    bos_token_id: Any = token_id_field(None)
    eos_token_id: Any = token_id_field(None)
    attention_bias: bool = bool_field(False)
    use_sliding_window: bool = bool_field(False)
    sliding_window: int | None = int_field(4096, nullable=True)
    decoder_sparse_step: int = int_field(1)
    moe_intermediate_size: int = int_field(768, maximum=FFN_MAX)
    num_experts_per_tok: int = int_field(8, maximum=EXPERTS_MAX)
    num_experts: int = int_field(128, positive=False, maximum=EXPERTS_MAX)
    norm_topk_prob: bool = bool_field(False)
    mlp_only_layers: tuple[int, ...] = frozen_field((), kind="a list of layer indices", accept=_int_list)

    @property
    def moe_experts(self) -> int:
        return self.num_experts

    @property
    def moe_intermediate(self) -> int:
        return self.moe_intermediate_size

    @property
    def moe_renormalise(self) -> bool:
        return self.norm_topk_prob

    def layer_is_sparse(self, layer_idx: int) -> bool:
        return (
            layer_idx not in (self.mlp_only_layers or ())
            and self.num_experts > 0
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    def layer_sliding_window(self, layer_idx: int) -> int | None:
        return self.sliding_window if self.use_sliding_window else None

    def _validate(self) -> None:
        if self.mlp_only_layers is not None and len(self.mlp_only_layers) > LAYERS_MAX:
            raise ConfigError(
                f"Qwen3MoeConfig: field 'mlp_only_layers' has {len(self.mlp_only_layers)} entries, "
                f"beyond the bound {LAYERS_MAX} (2**10, the most layers) fmodel accepts"
            )
        if self.num_experts < 0:
            raise ConfigError(
                f"Qwen3MoeConfig: field 'num_experts' expected an integer >= 0 (0: every layer dense), "
                f"got {self.num_experts}"
            )
        super()._validate()
