"""Phi-3 on the shared decoder: pre-norm layers, RMSNorm, one fused `qkv_proj` [q | k | v] and one
fused `gate_up_proj` [gate | up], residual dropout after attention and after the MLP
(`resid_pdrop`). Partial rotary, longrope and the sliding window are config data
(`fmodel.config.phi3`, `fmodel.models.rope`).

Generation across the longrope switch follows Transformers 4.57's
`Phi3ForCausalLM.prepare_inputs_for_generation`: when the sequence first reaches
`original_max_position_embeddings + 1` tokens with a shorter cache, the cache (keys rotated
with the short factors) is dropped and the whole sequence runs again, now with the long
factors (`recompute_cache_at`, read by `fmodel.generation.decode_loop`).
"""

from __future__ import annotations

from torch import nn

from .decoder import (
    DecoderAttention,
    DecoderForCausalLM,
    DecoderLayer,
    DecoderModel,
    DecoderParts,
    GatedMLP,
    register_decoder_family,
)

__all__ = ["Phi3Attention", "Phi3DecoderLayer", "Phi3ForCausalLM", "Phi3MLP", "Phi3Model"]


class Phi3Attention(DecoderAttention):
    """Fused-qkv attention whose output goes through the residual dropout (Transformers'
    `Phi3DecoderLayer.resid_attn_dropout`, applied before the residual sum)."""

    def __init__(self, config, layer_idx: int, parts: DecoderParts) -> None:
        super().__init__(config, layer_idx, parts)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, *args, **kwargs):
        out, weights = super().forward(*args, **kwargs)
        return self.resid_dropout(out), weights


class Phi3MLP(GatedMLP):
    """`down(up * act(gate))` from one `gate_up_proj`, then the residual dropout
    (`Phi3DecoderLayer.resid_mlp_dropout`)."""

    def __init__(self, config, parts: DecoderParts) -> None:
        super().__init__(config, parts)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x):
        return self.resid_dropout(super().forward(x))


def _attention(config, layer_idx: int, parts: DecoderParts) -> nn.Module:
    return Phi3Attention(config, layer_idx, parts)


def _mlp(config, layer_idx: int, parts: DecoderParts) -> nn.Module:
    return Phi3MLP(config, parts)


class Phi3DecoderLayer(DecoderLayer):
    parts = DecoderParts(fused_qkv=True, fused_gate_up=True, attention=_attention, mlp=_mlp)


class Phi3Model(DecoderModel):
    layer_class = Phi3DecoderLayer


class Phi3ForCausalLM(DecoderForCausalLM):
    model_class = Phi3Model

    def __init__(self, config) -> None:
        super().__init__(config)
        # Transformers drops the cache when `rope_scaling` is set and the sequence reaches
        # original_max_position_embeddings + 1 tokens while the cache holds at most that many.
        self.recompute_cache_at = config.original_max_position_embeddings + 1 if config.rope_scaling else None


register_decoder_family("phi3", "Phi3", Phi3Model, Phi3ForCausalLM)
