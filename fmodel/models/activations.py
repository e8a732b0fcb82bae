"""Activation functions by Transformers' `ACT2FN` name (the ones fmodel's families use)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "gelu_tanh", "new_gelu"]


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (Transformers' gelu_new / gelu_pytorch_tanh). A named
    function, not a lambda, so modules holding it pickle."""
    return F.gelu(x, approximate="tanh")


def new_gelu(x: torch.Tensor) -> torch.Tensor:
    """Transformers' `NewGELUActivation` (ACT2FN["gelu_new"]: GPT-2, T5 v1.1), its formula op for
    op: the same function as `gelu_tanh`, but in bfloat16 it rounds differently from
    `F.gelu(approximate="tanh")` (Transformers' `gelu_pytorch_tanh`)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": new_gelu,
    "gelu_pytorch_tanh": gelu_tanh,
    "relu": F.relu,
    "tanh": torch.tanh,
}
