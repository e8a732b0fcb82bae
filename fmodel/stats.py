"""Counting a model: parameters, memory footprint, tokens and training FLOPs (pure functions)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ._checks import check_state
from .models.skeleton import skeleton
from .state import ModelState

__all__ = [
    "current_rss",
    "embedding_names",
    "estimate_tokens",
    "floating_point_ops",
    "get_memory_footprint",
    "num_parameters",
]


def embedding_names(state: ModelState) -> set[str]:
    """Names of every `nn.Embedding` weight (tokens, positions, token types), as Transformers
    counts embeddings for `exclude_embeddings`."""
    module = skeleton(state.config, state.architecture)
    return {f"{name}.weight" for name, m in module.named_modules() if isinstance(m, nn.Embedding)}


def num_parameters(
    state: ModelState, *, only_trainable: bool = False, exclude_embeddings: bool = False
) -> int:
    """Number of parameters, each tied tensor once (as Transformers' `num_parameters`).

    A quantized weight counts as the logical [out, in] weight it stores (so quantizing does not
    change the count); its scales and zero points are not parameters.

    Arguments:
        only_trainable: count only tensors with `requires_grad`.
        exclude_embeddings: leave out every embedding matrix.

    Raises:
        ArgumentTypeError: `state` is not a `ModelState`.
    """
    check_state(state, "num_parameters(state)")
    skip = embedding_names(state) if exclude_embeddings else set()
    logical = _quantized_numel(state)
    return sum(
        logical.get(name, t.numel())
        for name, t in state.unique_params().items()
        if name not in skip and (t.requires_grad or not only_trainable)
    )


def _quantized_numel(state: ModelState) -> dict[str, int]:
    """For a quantized state: {name: logical parameter count} of its quantization entries. A
    quantized weight counts as the [out, in] weight it stands for (a packed int4 tensor as its
    unpacked values, as Transformers counts 4-bit weights); scales and zero points count 0."""
    from .models.quant_linear import Int4Linear, Int8Linear, quantization_config

    if quantization_config(state.config) is None:
        return {}
    out: dict[str, int] = {}
    for name, m in skeleton(state.config, state.architecture).named_modules():
        if isinstance(m, (Int8Linear, Int4Linear)):
            data = "weight_int8" if isinstance(m, Int8Linear) else "weight_int4"
            out[f"{name}.{data}"] = m.in_features * m.out_features
            out[f"{name}.weight_scale"] = 0
            out[f"{name}.weight_zero"] = 0
    return out


def get_memory_footprint(state: ModelState, *, return_buffers: bool = True) -> int:
    """Bytes held by the model's distinct tensors (tied tensors once), buffers included by default.

    Real bytes as stored: a quantized weight counts its int8 / packed uint8 data and its scales
    and zero points (the CPU kernels' packed copies, a runtime cache, are not counted).

    Raises:
        ArgumentTypeError: `state` is not a `ModelState`.
    """
    check_state(state, "get_memory_footprint(state)")
    tensors = state.tensors if return_buffers else dict(state.params)
    seen: set[int] = set()
    total = 0
    for t in tensors.values():
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def estimate_tokens(inputs: Mapping[str, Any]) -> int:
    """Tokens in a batch: the element count of `input_ids` (or of `inputs_embeds` without its
    hidden axis); 0 when neither is given (Transformers warns and returns 0 too)."""
    if "input_ids" in inputs and isinstance(inputs["input_ids"], torch.Tensor):
        return inputs["input_ids"].numel()
    if "inputs_embeds" in inputs and isinstance(inputs["inputs_embeds"], torch.Tensor):
        return inputs["inputs_embeds"].shape[:-1].numel()
    return 0


def floating_point_ops(
    state: ModelState, inputs: Mapping[str, Any], *, exclude_embeddings: bool = True
) -> int:
    """Training FLOPs of one forward+backward over `inputs`: 6 x tokens x parameters (the
    Kaplan et al. estimate Transformers uses)."""
    return 6 * estimate_tokens(inputs) * num_parameters(state, exclude_embeddings=exclude_embeddings)


def current_rss() -> int:
    """This process's resident memory now, in bytes (psutil when installed, else /proc on
    Linux; elsewhere the peak from `resource`, the closest the standard library offers)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return psutil.Process(os.getpid()).memory_info().rss
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
