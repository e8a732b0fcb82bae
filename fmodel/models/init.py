"""Fresh tensors following an architecture's init rules (used for allowed missing keys and `init`)."""

from __future__ import annotations

import torch

__all__ = ["init_tensor"]


def init_tensor(
    rule: str | tuple,
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype,
    std: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """A new CPU tensor for `rule`: "normal" (mean 0, `std`), ("normal", own_std),
    ("normal", own_std or None, padding_row) (an embedding whose padding row is zero, as
    Transformers initialises `nn.Embedding(padding_idx=...)`), "zeros" or "ones".

    Drawn in float32 from `generator` and then cast, so the values for a seed do not depend on `dtype`.
    """
    zero_row = None
    if isinstance(rule, tuple):
        rule, own_std, *rest = rule
        std = std if own_std is None else own_std
        zero_row = rest[0] if rest else None
    if rule == "zeros":
        return torch.zeros(shape, dtype=dtype)
    if rule == "ones":
        return torch.ones(shape, dtype=dtype)
    if rule == "normal":
        drawn = torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
        if zero_row is not None:
            drawn[zero_row] = 0.0
        return drawn.to(dtype)
    raise ValueError(f"unknown init rule {rule!r}; expected 'normal', 'zeros' or 'ones'")
