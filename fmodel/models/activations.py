"""Activation functions by Transformers' `ACT2FN` name (the ones fmodel's families use)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "gelu_tanh"]


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (Transformers' gelu_new / gelu_pytorch_tanh). A named
    function, not a lambda, so modules holding it pickle."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "relu": F.relu,
    "tanh": torch.tanh,
}
