"""The Llama family (llama, qwen2, mistral) on the shared decoder: pre-norm layers, RMSNorm,
separate q/k/v projections, a gated MLP. What differs between the three (q/k/v biases, sliding
windows) is in their configs (`fmodel.config.decoder`)."""

from __future__ import annotations

from .decoder import DecoderForCausalLM, DecoderLayer, DecoderModel, DecoderParts, register_decoder_family

__all__ = ["LlamaDecoderLayer", "LlamaForCausalLM", "LlamaModel"]


class LlamaDecoderLayer(DecoderLayer):
    parts = DecoderParts()


class LlamaModel(DecoderModel):
    layer_class = LlamaDecoderLayer


class LlamaForCausalLM(DecoderForCausalLM):
    model_class = LlamaModel


for _model_type, _prefix in (("llama", "Llama"), ("qwen2", "Qwen2"), ("mistral", "Mistral")):
    register_decoder_family(_model_type, _prefix, LlamaModel, LlamaForCausalLM)
