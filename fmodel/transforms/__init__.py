"""Pure `state -> new state` transforms."""

from .attn import set_attn_implementation

__all__ = ["set_attn_implementation"]
