"""Mixtral on the shared decoder: Mistral's attention (an optional sliding window on every
layer) with a sparse block in place of the MLP (`block_sparse_moe`: a router `gate` and
`num_local_experts` experts `w1`/`w2`/`w3`, top-k routing weights always renormalised, and
`router_jitter_noise` on the block's input in training). See `fmodel.models.moe`."""

from __future__ import annotations

from .decoder import DecoderLayer, DecoderParts, register_decoder_family
from .moe import MoeForCausalLM, MoeModel, SparseMoeBlock, SwiGluExpert

__all__ = [
    "MixtralBlockSparseTop2MLP",
    "MixtralDecoderLayer",
    "MixtralForCausalLM",
    "MixtralModel",
    "MixtralSparseMoeBlock",
]


class MixtralBlockSparseTop2MLP(SwiGluExpert):
    pass


class MixtralSparseMoeBlock(SparseMoeBlock):
    expert_class = MixtralBlockSparseTop2MLP


def _sparse_block(config, layer_idx: int, parts: DecoderParts) -> MixtralSparseMoeBlock:
    return MixtralSparseMoeBlock(config, parts)


class MixtralDecoderLayer(DecoderLayer):
    parts = DecoderParts(mlp=_sparse_block, mlp_name="block_sparse_moe")


class MixtralModel(MoeModel):
    layer_class = MixtralDecoderLayer


class MixtralForCausalLM(MoeForCausalLM):
    model_class = MixtralModel


register_decoder_family("mixtral", "Mixtral", MixtralModel, MixtralForCausalLM)
