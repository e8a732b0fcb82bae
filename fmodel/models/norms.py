"""The normalisation layers of the decoder families, as Transformers computes them.

Each takes [..., size] and returns the same shape and dtype. The factories (`rms_norm`,
`offset_rms_norm`, `weightless_layer_norm`) have the signature `DecoderParts.norm` expects:
`(config, size) -> nn.Module`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "OffsetRMSNorm",
    "RMSNorm",
    "WeightlessLayerNorm",
    "offset_rms_norm",
    "rms_norm",
    "weightless_layer_norm",
]


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back before the weight (Llama, Qwen,
    Mistral, OLMo 2, Phi-3, Mixtral: Transformers' LlamaRMSNorm)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32:  # the same operations without the two casts (per layer per step)
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class OffsetRMSNorm(nn.Module):
    """x / rms(x) * (1 + weight), all in float32, cast back at the end (Gemma's RMSNorm: a
    zero weight is the identity scale, and the weight is initialised to zeros)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.float()
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


class WeightlessLayerNorm(nn.Module):
    """LayerNorm without weight or bias, in float32 (OLMo's OlmoLayerNorm, eps 1e-5)."""

    def __init__(self, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.normalized_shape = (size,)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.to(torch.float32), self.normalized_shape, None, None, self.eps).to(x.dtype)


def rms_norm(config, size: int) -> RMSNorm:
    return RMSNorm(size, config.rms_norm_eps)


def offset_rms_norm(config, size: int) -> OffsetRMSNorm:
    return OffsetRMSNorm(size, config.rms_norm_eps)


def weightless_layer_norm(config, size: int) -> WeightlessLayerNorm:
    return WeightlessLayerNorm(size)
