"""Choosing the attention implementation of a state."""

from __future__ import annotations

from .. import attention
from .._checks import check_state, check_str
from ..state import ModelState

__all__ = ["set_attn_implementation"]


def set_attn_implementation(state: ModelState, name: str) -> ModelState:
    """A new state whose forward uses the registered attention function `name`.

    Tensors are shared with `state`, which is unchanged. Switching is a change of a string:
    no module is rebuilt.

    Raises:
        ArgumentTypeError: `state` is not a `ModelState`, `name` is not a str.
        AttentionUnavailableError: `name` is not registered or cannot run here (says what is missing).

    Example:
        >>> eager_state = fmodel.set_attn_implementation(state, "eager")
    """
    check_state(state, "set_attn_implementation(state)")
    check_str(name, "set_attn_implementation(name)")
    attention.get(name)
    return state.replace(attn_implementation=name)
