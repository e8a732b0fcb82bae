"""Pure `state -> new state` transforms. None writes into a tensor it was given; each shares
every tensor it does not change with its input."""

from .attn import set_attn_implementation
from .device import place, to
from .embeddings import (
    get_input_embeddings,
    get_output_embeddings,
    resize_position_embeddings,
    resize_token_embeddings,
    set_input_embeddings,
    set_output_embeddings,
)
from .init import init, init_weights
from .params import replace_params
from .prune import prune_heads
from .quantize import dequantize, is_quantized, quantize
from .stack import StackError, stack_states, unstack_state, vmap_forward
from .ties import tie_weights, untie_weights

__all__ = [
    "StackError",
    "dequantize",
    "get_input_embeddings",
    "get_output_embeddings",
    "init",
    "init_weights",
    "is_quantized",
    "place",
    "prune_heads",
    "quantize",
    "replace_params",
    "resize_position_embeddings",
    "resize_token_embeddings",
    "set_attn_implementation",
    "set_input_embeddings",
    "set_output_embeddings",
    "stack_states",
    "tie_weights",
    "to",
    "unstack_state",
    "untie_weights",
    "vmap_forward",
]
