"""What the CPU fast paths share: when a packed kernel may run, the cache of packed weights, and
whether fmodel's own kernel extension (`fmodel.kernels`) is loaded.

A packed weight is a runtime form derived from a stored tensor (a oneDNN-blocked bfloat16
matrix, tinygemm's int4 layout): built on first use, kept per tensor object while that tensor
lives, rebuilt if the tensor is written in place. It is never part of a state, never saved,
and the stored tensor is never changed. Each cache entry costs about the stored tensor's bytes
again; the entries die with their tensors.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

logger = logging.getLogger("fmodel")

__all__ = [
    "KERNEL_MAX_ROWS",
    "PackCache",
    "fast_path_ok",
    "float32_linear",
    "fmodel_kernels",
    "no_grad_wanted",
    "traced_input_ok",
    "versions",
]

# The weight-only kernels beat the plain matmul up to about this many rows (measured on 2 AMD
# EPYC cores: int8 6x faster at 1 row, equal at 16-32, 2x slower at 128). Decode steps are 1 row.
KERNEL_MAX_ROWS = 16

_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)


def fast_path_ok(x: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """A packed kernel may run: not while torch.compile traces (the runtime cache is not
    traceable), CPU tensors of plain types (not fake, not functorch-wrapped), and no gradient
    wanted for the input. Callers check their weights' own `requires_grad`. (Called per layer
    per decode step: written for speed.)"""
    if torch.compiler.is_compiling():
        return False
    if not x.is_cpu or type(x) not in _PLAIN_TENSORS or (x.requires_grad and torch.is_grad_enabled()):
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        return False
    return all(t.is_cpu and type(t) in _PLAIN_TENSORS for t in tensors)


_HAS_ONEDNN = torch.backends.mkldnn.is_available()


def no_grad_wanted(weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """No gradient is wanted for a layer's weight or bias (grad mode off, or they are frozen)."""
    return not (
        torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad))
    )


def float32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for a matrix product of many rows: oneDNN's float32 product on
    the stored weight (`torch.ops.mkldnn._linear_pointwise`, no packed copy) for plain float32
    CPU tensors that want no gradient, else `F.linear` itself. On AMD CPUs MKL's float32 GEMM,
    which `F.linear` calls, takes a slower path: measured 92 GFLOP/s against oneDNN's 215 on a
    Zen 5 core ([128 x 576] x [576 x 1536]); on Intel CPUs the two are alike. The results differ
    from `F.linear`'s by float32 summation order only."""
    if (
        _HAS_ONEDNN
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and weight.dim() == 2
        and weight.shape[0] > 0
        and fast_path_ok(x, weight, *(() if bias is None else (bias,)))
        and no_grad_wanted(weight, bias)
    ):
        return torch.ops.mkldnn._linear_pointwise(
            x, weight.detach(), None if bias is None else bias.detach(), "none", [], ""
        )
    return F.linear(x, weight, bias)


def traced_input_ok(x: torch.Tensor) -> bool:
    """While torch.compile / torch.export traces: a CPU input that wants no gradient, so an
    `fmodel.kernels` custom op (fake implementation: shapes only) may stand in for the plain path.
    The runtime pack caches are never traced."""
    return (
        torch.compiler.is_compiling()
        and x.device.type == "cpu"
        and not (x.requires_grad and torch.is_grad_enabled())
    )


@functools.cache
def fmodel_kernels():
    """`fmodel.kernels` when its extension is built and loaded (it builds on first use, once per
    machine, and logs why once when it cannot; `FMODEL_KERNELS=0` turns it off), else None: the
    layers then run torch's own kernels or the reference. Decided once per process."""
    from .. import kernels

    return kernels if kernels.available() else None


class PackCache:
    """Packed kernel weights keyed by the stored tensor object; an entry dies with its tensor
    and is rebuilt when the tensors' version counters show an in-place write. A failed pack
    (an unsupported shape) is remembered as None: that tensor always runs the plain path."""

    def __init__(self) -> None:
        self._entries = WeakIdKeyDictionary()

    def get(self, key: torch.Tensor, stamp: tuple[int, ...], build: Callable[[], Any]) -> Any:
        entry = self._entries.get(key)
        if entry is None or entry[0] != stamp:
            try:
                packed = build()
            except (RuntimeError, AttributeError, NotImplementedError) as exc:  # torch refused the shape
                logger.debug(
                    "packed kernel weight not built (%s: %s); the plain path runs", type(exc).__name__, exc
                )
                packed = None
            entry = (stamp, packed)
            self._entries[key] = entry
        return entry[1]

    def __len__(self) -> int:
        return len(self._entries)


def versions(*tensors: torch.Tensor) -> tuple[int, ...]:
    """In-place write counters (inference-mode tensors have none: -1)."""
    return tuple(-1 if t.is_inference() else t._version for t in tensors)
