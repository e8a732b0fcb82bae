"""Quantized token embeddings, and an output projection tied to one.

`QuantEmbedding` stores an embedding table in a quantized linear layout (`Layout` of
`fmodel.models.quant_linear`: int8 per row or per group of columns, with or without a zero, or
int4 per group; GGUF's Q8_0 `token_embd` is int8 g32) under the entries `<m>.weight_int8` /
`<m>.weight_int4`, `<m>.weight_scale` (and `<m>.weight_zero`). A lookup gathers the rows of
the ids and dequantizes only those rows, with the reference math of the layout, so its result
equals a lookup in the dequantized float table bit for bit.

`TiedQuantLinear` is the output projection of a model whose head is tied to such an embedding
(the config's `quantization_config["tied_modules"]`, e.g. {"lm_head": "model.embed_tokens"}):
it owns no weight entries and multiplies by the embedding's quantized tensors (read at call
time, so `torch.func.functional_call` swaps them in as usual) through the linear module of the
same layout (`Int8Linear.linear` / `Int4Linear.linear`: its kernel and reference paths). The
state holds the table once; there is no float copy.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .quant_linear import (
    Layout,
    _detach,
    _frozen_param,
    dequantize_int4,
    dequantize_int8,
    make_linear,
)

__all__ = ["QuantEmbedding", "TiedQuantLinear"]


class QuantEmbedding(nn.Module):
    """`nn.Embedding` over a quantized table [num_embeddings, embedding_dim] (see the module
    docstring).

    The rows are dequantized in float32 and come out in the model's float dtype: the scales'
    dtype, except that float16 scales give float32 rows. Float16 scales are a storage format,
    not the model's dtype: GGUF's float16 block scales, kept as stored (`fmodel.io.gguf_quant`)
    in a model that computes in float32; no fmodel transform makes a quantized embedding of a
    float16 model (`fmodel.quantize` leaves embeddings float).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        layout: Layout,
        dtype: torch.dtype,
        padding_idx: int | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.layout = layout
        n, d = num_embeddings, embedding_dim
        if layout.scheme == "int8":
            self.weight_int8 = _frozen_param(n, d, dtype=torch.int8)
        else:
            self.weight_int4 = _frozen_param(n, math.ceil(d / 2), dtype=torch.uint8)
        groups = None if layout.group_size is None else math.ceil(d / layout.group_size)
        self.weight_scale = _frozen_param(n, *(() if groups is None else (groups,)), dtype=dtype)
        self.weight_zero = _frozen_param(n, groups, dtype=dtype) if layout.zero else None

    @property
    def table(self) -> torch.Tensor:
        """The stored integer table (`weight_int8` or `weight_int4`)."""
        return self.weight_int8 if self.layout.scheme == "int8" else self.weight_int4

    def rows(self, flat_ids: torch.Tensor) -> torch.Tensor:
        """Dequantized float32 rows [n, embedding_dim] of the ids [n] (float16 or float32
        scales widen exactly: the layout's reference math)."""
        scale = self.weight_scale.detach().index_select(0, flat_ids)
        zero = None if self.weight_zero is None else self.weight_zero.detach().index_select(0, flat_ids)
        q = self.table.detach().index_select(0, flat_ids)
        if self.layout.scheme == "int8":
            return dequantize_int8(q, scale, zero, self.layout.group_size)
        return dequantize_int4(q, scale, zero, self.embedding_dim, self.layout.group_size)

    def output_dtype(self) -> torch.dtype:
        """The dtype `forward` returns (see the class docstring)."""
        dtype = self.weight_scale.dtype
        return torch.float32 if dtype == torch.float16 else dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Ids [...] (integers) -> rows [..., embedding_dim] in `output_dtype()`."""
        flat = input_ids.reshape(-1)
        out = self.rows(flat).to(self.output_dtype())
        return out.view(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.layout}"


class TiedQuantLinear(nn.Module):
    """The output projection tied to a `QuantEmbedding`: `x @ table.T` through the linear module
    of the table's layout (see the module docstring). Owns only its bias, if any."""

    def __init__(self, embedding: QuantEmbedding, bias: bool, dtype: torch.dtype, activations: str) -> None:
        super().__init__()
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings
        self.activations = activations
        # Held in tuples so that nn.Module does not register them: the embedding's tensors are
        # its own entries (named under the embedding), and the twin only lends its forward.
        self._source = (embedding,)
        self._twin = (
            make_linear(embedding.layout, self.in_features, self.out_features, False, dtype, activations),
        )
        self.bias = _frozen_param(self.out_features, dtype=dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self._source[0]
        return self._twin[0].linear(x, e.table, e.weight_scale, _detach(e.weight_zero), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to the quantized embedding"
