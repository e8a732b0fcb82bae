"""Fresh weights: `init` (a whole new state) and `init_weights` (re-draw chosen tensors)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .._checks import (
    ParameterNameError,
    check_config,
    check_float_dtype,
    check_nonnegative_int,
    check_state,
    check_str,
    describe,
)
from .._limits import check_allocation
from ..errors import ArgumentTypeError, InvalidArgumentError, QuantizationError
from ..io.load import default_architecture, state_from_tensors
from ..models.init import init_tensor
from ..state import ModelState
from . import hf_init
from ._common import spec_of, with_params
from .quantize import is_quantized

__all__ = ["init", "init_weights"]


def init(
    config,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    architecture: str | None = None,
    attn_implementation: str = "sdpa",
    draw_order: str = "fmodel",
    generator: torch.Generator | None = None,
) -> ModelState:
    """A new model with fresh weights drawn by its family's init rules.

    Weights are normal(0, `initializer_range`) (with each family's special cases), biases
    zero, norms one; tied tensors are created once. Deterministic: the same seed gives the
    same tensors, whatever the dtype (values are drawn in float32, then cast).

    `draw_order="transformers"` instead replays Transformers' construction draw for draw
    (`fmodel.transforms.hf_init.init`): the tensors equal Transformers' `XForY(config)` after
    the same `torch.manual_seed`, drawn from `generator`, where None is torch's global
    generator (the facade's constructors use this, for parity; `seed` does not apply).

    Arguments:
        config: a model config.
        seed: the random seed (draw order "fmodel").
        dtype: floating dtype of the weights.
        architecture: class name (default `architectures[0]` of the config, else the family's
            causal-LM class).
        draw_order: "fmodel" (pure, seeded, each tensor drawn once in name order) or
            "transformers" (Transformers' sequence of draws, from `generator`).
        generator: random source for draw order "transformers" (None: torch's global one).

    Raises:
        ArgumentTypeError: `config` is not an fmodel config, or an argument of the wrong type.
        InvalidArgumentError: `dtype` is not a floating dtype (int8, bool, ...), a negative seed.
        SizeLimitError: the weights would not fit in memory (checked before drawing any).
        ValueError: an unknown `draw_order`, a `seed` with draw order "transformers", or a
            `generator` with draw order "fmodel".

    Example:
        >>> state = fmodel.init(fmodel.LlamaConfig(hidden_size=64, num_hidden_layers=2,
        ...     num_attention_heads=4, intermediate_size=128, vocab_size=100), seed=1)
    """
    check_config(config, "init(config)")
    dtype = check_float_dtype(dtype, "init(dtype)") or torch.float32
    check_nonnegative_int(seed, "init(seed)")
    check_str(architecture, "init(architecture)", allow_none=True)
    check_str(attn_implementation, "init(attn_implementation)")
    check_str(draw_order, "init(draw_order)", choices=("fmodel", "transformers"))
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ArgumentTypeError(
            f"init(generator) must be a torch.Generator or None, got {describe(generator)}"
        )
    _check_fits(config, architecture or default_architecture(config), dtype)
    if draw_order == "transformers":
        if seed != 0:
            raise InvalidArgumentError(
                "init: seed applies to draw_order='fmodel'; with 'transformers' pass "
                "generator=torch.Generator().manual_seed(seed) (None draws from torch's global generator)"
            )
        return hf_init.init(
            config,
            architecture=architecture,
            dtype=dtype,
            attn_implementation=attn_implementation,
            generator=generator,
        )
    if draw_order != "fmodel":
        raise InvalidArgumentError(f"init: draw_order must be 'fmodel' or 'transformers', got {draw_order!r}")
    if generator is not None:
        raise InvalidArgumentError(
            "init: generator applies to draw_order='transformers'; pass seed= for 'fmodel'"
        )
    state, _ = state_from_tensors(
        config,
        {},
        architecture=architecture,
        dtype=dtype,
        allow_missing=True,
        seed=seed,
        attn_implementation=attn_implementation,
        source="init",
        warn_missing=False,
    )
    return state


_QUANTIZED_SUFFIXES = (".weight_int8", ".weight_int4", ".weight_scale", ".weight_zero")


def _check_fits(config, architecture: str, dtype: torch.dtype) -> None:
    """Refuse a model whose weights exceed the memory of the CPU (their sizes come from the
    meta skeleton, which holds no storage)."""
    from ..io.expected import estimate_parameter_count
    from ..models.skeleton import skeleton

    # First a lower bound by arithmetic (2/3 of the gated-MLP estimate), so a config too large
    # for memory is refused before a skeleton of its thousand layers is built; then the exact size.
    lower = estimate_parameter_count(config) * 2 // 3
    check_allocation(
        lower * dtype.itemsize,
        what=f"init: the {architecture} weights (at least {lower:,} parameters, {dtype})",
    )
    module = skeleton(config, architecture)
    numel = sum(p.numel() for p in module.parameters())
    itemsize = dtype.itemsize
    check_allocation(
        numel * itemsize, what=f"init: the {architecture} weights ({numel:,} parameters, {dtype})"
    )


def init_weights(state: ModelState, *, seed: int = 0, names: Iterable[str] | None = None) -> ModelState:
    """Re-initialise the named parameters (default: all) by the architecture's init rules.

    A tied alias cannot be re-drawn on its own: name its source (the alias follows).

    Arguments:
        state: the model (unchanged).
        seed: the random seed (names are drawn in sorted order, so a seed fixes every value).
        names: parameter names to re-draw; None means every parameter.

    Returns:
        A new state; the named tensors are new, the others shared.

    Raises:
        ArgumentTypeError: `state` is not a `ModelState`, `names` is not a list of str.
        InvalidArgumentError: a negative seed.
        ParameterNameError: (a KeyError) a name is not a parameter, or is a tied alias.
        QuantizationError: a chosen name is a quantized weight, scale or zero point.
    """
    check_state(state, "init_weights(state)")
    check_nonnegative_int(seed, "init_weights(seed)")
    if names is not None:
        if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
            raise ArgumentTypeError(
                f"init_weights(names) must be a list of parameter names, got {describe(names)}"
            )
        names = list(names)
        for name in names:
            if not isinstance(name, str):
                raise ArgumentTypeError(
                    f"init_weights(names) must hold parameter names (str), got {describe(name)}"
                )
    spec = spec_of(state)
    chosen = sorted(state.unique_params() if names is None else set(names))
    for name in chosen:
        if name in state.ties:
            raise ParameterNameError(
                f"init_weights: {name!r} is tied to {state.ties[name]!r}; re-initialise the source"
            )
        if name not in state.params:
            raise ParameterNameError(
                f"init_weights(names): {name!r} is not a parameter of {state.architecture}"
            )
    packed = [n for n in chosen if n.endswith(_QUANTIZED_SUFFIXES)] if is_quantized(state) else []
    if packed:
        raise QuantizationError(
            f"init_weights: {packed[0]!r} (and {len(packed) - 1} more) are quantized entries; drawing them as "
            "floats would zero the weights. Re-initialise a float model (fmodel.dequantize first) and "
            "quantize it again, or pass names= of unquantized parameters"
        )
    generator = torch.Generator().manual_seed(seed)
    changed = {}
    for name in chosen:
        old = state.params[name]
        fresh = init_tensor(
            spec.init_rule(name, state.config),
            tuple(old.shape),
            dtype=old.dtype,
            std=state.config.initializer_range,
            generator=generator,
        )
        changed[name] = fresh.to(old.device)
    return with_params(state, changed)
