"""Pluggable attention: a registry of functions with Transformers' attention signature."""

from . import builtin  # noqa: F401  (registers the built-ins)
from .builtin import eager_attention, flex_attention, repeat_kv, sdpa_attention
from .masks import MaskInputs, build_mask
from .registry import AttentionFunction, available, get, register, unregister

__all__ = [
    "AttentionFunction",
    "MaskInputs",
    "available",
    "build_mask",
    "eager_attention",
    "flex_attention",
    "get",
    "register",
    "repeat_kv",
    "sdpa_attention",
    "unregister",
]
