"""`to`: move a state to a device and/or cast its floating tensors."""

from __future__ import annotations

import torch

from ..io.load import resolve_dtype
from ..state import ModelState
from ._common import spec_of

__all__ = ["to"]


def to(
    state: ModelState, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None
) -> ModelState:
    """Move tensors to `device` and cast floating parameters and buffers to `dtype`.

    Integer buffers keep their dtype; buffers computed from the config (rotary frequencies)
    stay float32 for precision. Ties hold: each tied tensor is converted once and every
    alias points at the result.

    Returns:
        `state` itself when nothing would change, else a new state (tensors already on the
        device and dtype are shared).

    Example:
        >>> half = fmodel.to(state, dtype=torch.bfloat16)
    """
    target = resolve_dtype(dtype)
    device = torch.device(device) if device is not None else None
    computed = set(spec_of(state).computed_buffers(state.config, "meta"))
    converted: dict[int, torch.Tensor] = {}

    def convert(name: str, t: torch.Tensor) -> torch.Tensor:
        if id(t) in converted:
            return converted[id(t)]
        new = t
        if target is not None and t.is_floating_point() and t.dtype != target and name not in computed:
            new = new.to(target)
        if device is not None and new.device != device:
            new = new.to(device)
        converted[id(t)] = new
        return new

    params = {name: convert(name, t) for name, t in state.params.items()}
    buffers = {name: convert(name, t) for name, t in state.buffers.items()}
    if all(params[n] is state.params[n] for n in params) and all(
        buffers[n] is state.buffers[n] for n in buffers
    ):
        return state
    return state.replace(params=params, buffers=buffers)
