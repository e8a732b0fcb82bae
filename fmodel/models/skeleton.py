"""Weightless skeleton modules, built on the meta device and cached per (config, class, mode).
A quantized config (its `quantization_config`, part of the config and so of the key) gets
quantized linear layers.

The cache never changes a result: a skeleton holds no weights, only structure derived from
the (frozen, hashable) config. It is kept per thread because `functional_call` swaps
tensors into the module for the duration of a call.
"""

from __future__ import annotations

import threading
import warnings

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .quant_linear import swap_quantized_linears
from .spec import get_spec

__all__ = ["build_module", "expected_shapes", "skeleton"]

_local = threading.local()

_INIT_FUNCTIONS = frozenset(
    {
        torch.nn.init.normal_,
        torch.nn.init.uniform_,
        torch.nn.init.trunc_normal_,
        torch.nn.init.constant_,
        torch.nn.init.zeros_,
        torch.nn.init.ones_,
        torch.nn.init.kaiming_uniform_,
        torch.nn.init.kaiming_normal_,
        torch.nn.init.xavier_uniform_,
        torch.nn.init.xavier_normal_,
        torch.Tensor.normal_,
        torch.Tensor.uniform_,
        torch.Tensor.fill_,
        torch.Tensor.zero_,
    }
)


class _SkipInit(TorchFunctionMode):
    """Skip parameter initialisation while a skeleton is built: its meta tensors hold no values,
    and drawing them on meta costs an import of torch._dynamo (seconds). Function modes are
    per thread, so nothing outside this build is affected."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INIT_FUNCTIONS:
            return args[0] if args else kwargs.get("tensor", kwargs.get("self"))
        return func(*args, **kwargs)


def skeleton(config, architecture: str, training: bool = False) -> nn.Module:
    """The meta-device module of `architecture` for `config` (cached per thread)."""
    cache = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = {}
    key = (config, architecture, training)
    module = cache.get(key)
    if module is None:
        with torch.device("meta"), _SkipInit(), warnings.catch_warnings():
            # a layer with every head pruned has zero-size projections: fine, say nothing
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            module = build_module(config, architecture)
        module.train(training)
        for p in module.parameters():
            # an attribute write, not `requires_grad_()`, which torch.func refuses: the first
            # forward of a config may run inside `grad` or `vmap`
            p.requires_grad = False
        cache[key] = module
    return module


def build_module(config, architecture: str) -> nn.Module:
    """`spec.build(config)` with the linear layers a quantized config lists swapped for
    quantized ones (`fmodel.models.quant_linear`); call under the device it should live on."""
    return swap_quantized_linears(get_spec(architecture).build(config), config)


def expected_shapes(config, architecture: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{checkpoint key: (shape, default dtype)} for every persistent tensor of `architecture`."""
    module = skeleton(config, architecture)
    return {name: (tuple(t.shape), t.dtype) for name, t in module.state_dict(keep_vars=True).items()}
