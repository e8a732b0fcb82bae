"""Qwen3-MoE on the shared decoder: Qwen3's attention (RMSNorm over each head's q and k, an
optional bias, a sliding window on every layer only with `use_sliding_window`) and, per layer,
either a sparse block (`mlp`: a router `gate` and `num_experts` experts of
`moe_intermediate_size`, top-k weights renormalised only with `norm_topk_prob`) or a plain
gated MLP of `intermediate_size` (layers in `mlp_only_layers`, or off the `decoder_sparse_step`
grid). See `fmodel.models.moe` and `fmodel.config.Qwen3MoeConfig.layer_is_sparse`."""

from __future__ import annotations

from .decoder import DecoderLayer, DecoderParts, GatedMLP, register_decoder_family
from .moe import DenseOrSparse, MoeForCausalLM, MoeModel, SparseMoeBlock

__all__ = [
    "Qwen3MoeDecoderLayer",
    "Qwen3MoeForCausalLM",
    "Qwen3MoeMLP",
    "Qwen3MoeModel",
    "Qwen3MoeSparseMoeBlock",
]


class Qwen3MoeMLP(GatedMLP):
    pass


class Qwen3MoeSparseMoeBlock(SparseMoeBlock):
    expert_class = Qwen3MoeMLP


class Qwen3MoeDecoderLayer(DecoderLayer):
    parts = DecoderParts(qk_norm="head", mlp=DenseOrSparse(Qwen3MoeSparseMoeBlock, Qwen3MoeMLP))


class Qwen3MoeModel(MoeModel):
    layer_class = Qwen3MoeDecoderLayer


class Qwen3MoeForCausalLM(MoeForCausalLM):
    model_class = Qwen3MoeModel


register_decoder_family("qwen3_moe", "Qwen3Moe", Qwen3MoeModel, Qwen3MoeForCausalLM)
