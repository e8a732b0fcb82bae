"""Fresh tensors following an architecture's init rules (used for allowed missing keys and `init`)."""

from __future__ import annotations

import torch

__all__ = ["init_tensor"]


def init_tensor(
    rule: str | tuple[str, float],
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype,
    std: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """A new CPU tensor for `rule`: "normal" (mean 0, `std`), ("normal", own_std), "zeros" or "ones".

    Drawn in float32 from `generator` and then cast, so the values for a seed do not depend on `dtype`.
    """
    if isinstance(rule, tuple):
        rule, std = rule
    if rule == "zeros":
        return torch.zeros(shape, dtype=dtype)
    if rule == "ones":
        return torch.ones(shape, dtype=dtype)
    if rule == "normal":
        return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=generator).to(dtype)
    raise ValueError(f"unknown init rule {rule!r}; expected 'normal', 'zeros' or 'ones'")
