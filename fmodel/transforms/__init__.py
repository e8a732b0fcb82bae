"""Pure `state -> new state` transforms. None writes into a tensor it was given; each shares
every tensor it does not change with its input."""

from .attn import set_attn_implementation
from .device import to
from .embeddings import (
    get_input_embeddings,
    get_output_embeddings,
    resize_position_embeddings,
    resize_token_embeddings,
    set_input_embeddings,
    set_output_embeddings,
)
from .init import init, init_weights
from .prune import prune_heads
from .ties import tie_weights, untie_weights

__all__ = [
    "get_input_embeddings",
    "get_output_embeddings",
    "init",
    "init_weights",
    "prune_heads",
    "resize_position_embeddings",
    "resize_token_embeddings",
    "set_attn_implementation",
    "set_input_embeddings",
    "set_output_embeddings",
    "tie_weights",
    "to",
    "untie_weights",
]
