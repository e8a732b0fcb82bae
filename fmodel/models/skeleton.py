"""Weightless skeleton modules, built on the meta device and cached per (config, class, mode).

The cache never changes a result: a skeleton holds no weights, only structure derived from
the (frozen, hashable) config. It is kept per thread because `functional_call` swaps
tensors into the module for the duration of a call.
"""

from __future__ import annotations

import threading
import warnings

import torch
from torch import nn

from .spec import get_spec

__all__ = ["expected_shapes", "skeleton"]

_local = threading.local()


def skeleton(config, architecture: str, training: bool = False) -> nn.Module:
    """The meta-device module of `architecture` for `config` (cached per thread)."""
    cache = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = {}
    key = (config, architecture, training)
    module = cache.get(key)
    if module is None:
        with torch.device("meta"), warnings.catch_warnings():
            # a layer with every head pruned has zero-size projections: fine, say nothing
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            module = get_spec(architecture).build(config)
        module.train(training)
        for p in module.parameters():
            p.requires_grad_(False)
        cache[key] = module
    return module


def expected_shapes(config, architecture: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{checkpoint key: (shape, default dtype)} for every persistent tensor of `architecture`."""
    module = skeleton(config, architecture)
    return {name: (tuple(t.shape), t.dtype) for name, t in module.state_dict(keep_vars=True).items()}
