"""Choosing the attention implementation of a state."""

from __future__ import annotations

from .. import attention
from ..state import ModelState

__all__ = ["set_attn_implementation"]


def set_attn_implementation(state: ModelState, name: str) -> ModelState:
    """A new state whose forward uses the registered attention function `name`.

    Tensors are shared with `state`, which is unchanged. Switching is a change of a string:
    no module is rebuilt.

    Raises:
        AttentionUnavailableError: `name` is not registered or cannot run here (says what is missing).

    Example:
        >>> eager_state = fmodel.set_attn_implementation(state, "eager")
    """
    attention.get(name)
    return state.replace(attn_implementation=name)
