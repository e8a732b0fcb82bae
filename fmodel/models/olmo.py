"""OLMo and OLMo 2 on the shared decoder (configs: `fmodel.config.olmo`).

OLMo: pre-norm layers whose LayerNorms have no weight or bias (eps 1e-5), q/k/v projections
clamped to [-clip_qkv, clip_qkv] when the config sets it (before anything else reads them).
OLMo 2: norms after each sublayer (x + norm(attn(x)), x + norm(mlp(x))), RMSNorms over the whole
q and k projections (before the heads are split), and an RMSNorm that multiplies by its weight
in float32 before casting back. Both rotate q and k with float32 tables, as Transformers'
`OlmoRotaryEmbedding` (the rotated q and k are cast back to the activations' dtype).
"""

from __future__ import annotations

import torch

from .decoder import DecoderForCausalLM, DecoderLayer, DecoderModel, DecoderParts, register_decoder_family
from .norms import RMSNorm, weightless_layer_norm

__all__ = [
    "Olmo2DecoderLayer",
    "Olmo2ForCausalLM",
    "Olmo2Model",
    "Olmo2RMSNorm",
    "OlmoDecoderLayer",
    "OlmoForCausalLM",
    "OlmoModel",
]


class Olmo2RMSNorm(RMSNorm):
    """x / rms(x) * weight with the product in float32, cast back last (Transformers'
    `Olmo2RMSNorm`; the Llama norm casts before the product). Equal to `RMSNorm` in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h).to(x.dtype)


def olmo2_rms_norm(config, size: int) -> Olmo2RMSNorm:
    return Olmo2RMSNorm(size, config.rms_norm_eps)


class OlmoDecoderLayer(DecoderLayer):
    parts = DecoderParts(norm=weightless_layer_norm)


class OlmoModel(DecoderModel):
    layer_class = OlmoDecoderLayer
    rope_dtype = torch.float32


class OlmoForCausalLM(DecoderForCausalLM):
    model_class = OlmoModel


class Olmo2DecoderLayer(DecoderLayer):
    parts = DecoderParts(norm=olmo2_rms_norm, placement="post", qk_norm="projection")


class Olmo2Model(DecoderModel):
    layer_class = Olmo2DecoderLayer
    rope_dtype = torch.float32


class Olmo2ForCausalLM(DecoderForCausalLM):
    model_class = Olmo2Model


register_decoder_family("olmo", "Olmo", OlmoModel, OlmoForCausalLM)
register_decoder_family("olmo2", "Olmo2", Olmo2Model, Olmo2ForCausalLM)
