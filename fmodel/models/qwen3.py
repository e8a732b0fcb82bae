"""Qwen3 on the shared decoder: Qwen2's pre-norm layers with an RMSNorm over each head's q and k
(one weight of head_dim shared by the heads) before the rotation. Biases (`attention_bias`) and
sliding windows (`use_sliding_window`, `layer_types`) come from the config
(`fmodel.config.qwen3`)."""

from __future__ import annotations

from .decoder import DecoderForCausalLM, DecoderLayer, DecoderModel, DecoderParts, register_decoder_family

__all__ = ["Qwen3DecoderLayer", "Qwen3ForCausalLM", "Qwen3Model"]


class Qwen3DecoderLayer(DecoderLayer):
    parts = DecoderParts(qk_norm="head")


class Qwen3Model(DecoderModel):
    layer_class = Qwen3DecoderLayer


class Qwen3ForCausalLM(DecoderForCausalLM):
    model_class = Qwen3Model


register_decoder_family("qwen3", "Qwen3", Qwen3Model, Qwen3ForCausalLM)
