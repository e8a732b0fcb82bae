"""Gemma 2 and Gemma 3 (text) on the shared decoder, with Transformers 4.57's numerics.

What both share: (1 + weight) RMSNorms initialised to zeros (`norms.offset_rms_norm`),
sandwich norms (input / post-attention / pre-feedforward / post-feedforward), a gated MLP with
`hidden_activation` (gelu_pytorch_tanh), the query scale `query_pre_attn_scalar ** -0.5`,
sliding windows on the layers `layer_types` marks, an explicit `head_dim`, soft-capped logits
(`final_logit_softcapping`), tied embeddings by default, and embeddings scaled by
sqrt(hidden_size) in the activations' dtype.

Where they differ (all in their configs, `fmodel.config.gemma`, except the embedding):
- Gemma 2 soft-caps the attention scores (`attn_logit_softcapping`: tanh(s / cap) * cap after
  the query scale, before the mask) and scales whatever enters the stack, a user's
  `inputs_embeds` included (`hidden * normalizer`).
- Gemma 3 norms each head's q and k (`q_norm`, `k_norm`, offset norms over head_dim), rotates
  the sliding layers with a second rotary table (`rotary_emb_local`: `rope_local_base_freq`,
  unscaled), and scales only token lookups (`Gemma3TextScaledWordEmbedding`): a user's
  `inputs_embeds` enter unscaled.

Every attention implementation fmodel accepts gives the eager result under soft-capping
(Transformers 4.57's Gemma 2 sdpa path drops it); a registered function that does not take a
`softcap` argument is refused (`DecoderModel.forward` calls `attention.builtin.require_softcap`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import attrs
import torch
from torch import nn

from .decoder import (
    DecoderForCausalLM,
    DecoderLayer,
    DecoderModel,
    DecoderParts,
    GatedMLP,
    decoder_init_rule,
    padding_idx,
    register_decoder_family,
)
from .norms import offset_rms_norm
from .spec import ARCHITECTURES, register_architecture

__all__ = [
    "Gemma2DecoderLayer",
    "Gemma2ForCausalLM",
    "Gemma2MLP",
    "Gemma2Model",
    "Gemma3DecoderLayer",
    "Gemma3ForCausalLM",
    "Gemma3MLP",
    "Gemma3TextModel",
    "Gemma3TextScaledWordEmbedding",
]


class Gemma2MLP(GatedMLP):
    """`GatedMLP` (gate, up, down without bias) with Gemma's activation, `hidden_activation`
    (the config's `activation_field`)."""


class Gemma3MLP(Gemma2MLP):
    pass


def _gemma2_mlp(config, layer_idx: int, parts: DecoderParts) -> Gemma2MLP:
    return Gemma2MLP(config, parts)


def _gemma3_mlp(config, layer_idx: int, parts: DecoderParts) -> Gemma3MLP:
    return Gemma3MLP(config, parts)


class Gemma2DecoderLayer(DecoderLayer):
    parts = DecoderParts(norm=offset_rms_norm, placement="sandwich", embed_scale=True, mlp=_gemma2_mlp)


class Gemma3DecoderLayer(DecoderLayer):
    # embed_scale is off: Gemma 3 scales inside its embedding (`Gemma3TextScaledWordEmbedding`).
    parts = DecoderParts(norm=offset_rms_norm, placement="sandwich", qk_norm="head", mlp=_gemma3_mlp)


class Gemma2Model(DecoderModel):
    layer_class = Gemma2DecoderLayer


def _local_rope(config):
    return config.local_rope_config()


def _global_rope(config):
    return config


class Gemma3TextScaledWordEmbedding(nn.Embedding):
    """Transformers' Gemma 3 embedding: the lookup times `embed_scale` (sqrt(hidden_size), a
    float32 scalar buffer, computed from the config and never saved) cast to the weight's
    dtype. Only token lookups are scaled (a user's `inputs_embeds` enter the stack as given),
    and `get_input_embeddings()(ids)` returns scaled rows, as in Transformers."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, embed_scale: float
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.register_buffer("embed_scale", torch.tensor(embed_scale), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)


class Gemma3TextModel(DecoderModel):
    layer_class = Gemma3DecoderLayer
    rotaries: ClassVar[Mapping[str, Callable[[Any], Any]]] = {
        "rotary_emb": _global_rope,
        "rotary_emb_local": _local_rope,
    }

    def __init__(self, config) -> None:
        super().__init__(config)
        self.embed_tokens = Gemma3TextScaledWordEmbedding(
            config.vocab_size, config.hidden_size, padding_idx(config), config.hidden_size**0.5
        )


class Gemma2ForCausalLM(DecoderForCausalLM):
    model_class = Gemma2Model


class Gemma3ForCausalLM(DecoderForCausalLM):
    model_class = Gemma3TextModel


def gemma_init_rule(name: str, config) -> str | tuple:
    """Transformers' Gemma init: as the decoder's, but the (1 + weight) norms start at zero."""
    if name.endswith("norm.weight"):
        return "zeros"
    return decoder_init_rule(name, config)


register_decoder_family("gemma2", "Gemma2", Gemma2Model, Gemma2ForCausalLM, init_rule=gemma_init_rule)


# Transformers' text-only Gemma 3 classes are Gemma3TextModel (Gemma3Model is the multimodal
# one) and Gemma3ForCausalLM: registered under the "Gemma3Text" prefix, the head renamed.
# Their computed buffers add the embedding's `embed_scale` to the rotary tables' `inv_freq`.
def _with_embed_scale(spec, prefix: str):
    rotary = spec.computed_buffers

    def buffers(config, device) -> dict[str, torch.Tensor]:
        scale = torch.tensor(config.hidden_size**0.5, dtype=torch.float32, device=device)
        return {**rotary(config, device), f"{prefix}embed_tokens.embed_scale": scale}

    return buffers


_base, _causal = register_decoder_family(
    "gemma3_text", "Gemma3Text", Gemma3TextModel, Gemma3ForCausalLM, init_rule=gemma_init_rule
)
del ARCHITECTURES[_causal.name]
register_architecture(attrs.evolve(_base, computed_buffers=_with_embed_scale(_base, "")))
register_architecture(
    attrs.evolve(_causal, name="Gemma3ForCausalLM", computed_buffers=_with_embed_scale(_causal, "model."))
)
