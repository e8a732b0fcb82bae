"""`ModelState`: a model as data — a config, named tensors, declared ties.

A state is frozen: its attributes cannot be reassigned and its mappings are read-only.
Every change is a function returning a new state (`state.replace(...)` or a transform in
`fmodel.transforms`), sharing every tensor it does not change.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Mapping
from typing import Any

import attrs
import torch

from ._frozen import FrozenDict
from .errors import FModelError

__all__ = ["ModelState", "TieError", "quantization_entries"]


class TieError(FModelError, ValueError):
    """A declared tie is inconsistent: the alias is missing or is not the source's tensor."""


def _frozen_tensors(value: Mapping[str, torch.Tensor]) -> FrozenDict:
    return value if isinstance(value, FrozenDict) else FrozenDict(value)


def quantization_entries(config: Any) -> frozenset[str]:
    """The scale and zero entry names (`<m>.weight_scale`, `<m>.weight_zero`) of the modules
    `config`'s fmodel `quantization_config` lists (empty for an unquantized config): storage,
    left out wherever the model's float dtype is read off its tensors (`ModelState.dtype`).
    Cached per config (frozen, hashable): the forward reads `ModelState.dtype` every call."""
    try:
        return _cached_quantization_entries(config)
    except TypeError:  # an unhashable config object
        return _find_quantization_entries(config)


def _find_quantization_entries(config: Any) -> frozenset[str]:
    from .models.quant_linear import quantization_config

    qc = quantization_config(config)
    if qc is None:
        return frozenset()
    return frozenset(
        f"{m}.{suffix}" for m in qc.get("modules", ()) for suffix in ("weight_scale", "weight_zero")
    )


_cached_quantization_entries = functools.lru_cache(maxsize=32)(_find_quantization_entries)


@attrs.frozen(eq=False, repr=False)
class ModelState:
    """An immutable model: config + tensors + ties.

    Attributes:
        config: a frozen config (e.g. `LlamaConfig`).
        architecture: the class name it runs as, e.g. "LlamaForCausalLM".
        params: read-only {name: tensor}, Transformers' `state_dict()` names. A tied alias is
            present too and is the *same* tensor object as its source.
        buffers: read-only {name: tensor} of buffers (persistent or computed from the config).
        ties: read-only {alias: source}, e.g. {"lm_head.weight": "model.embed_tokens.weight"}.
        attn_implementation: name of the registered attention function the forward uses.

    Equality is identity (tensors have no cheap value equality); compare fields explicitly.

    Raises:
        TieError: a tie's alias or source is missing, or the alias is not the source tensor.
    """

    config: Any
    architecture: str
    params: FrozenDict = attrs.field(converter=_frozen_tensors)
    buffers: FrozenDict = attrs.field(factory=FrozenDict, converter=_frozen_tensors)
    ties: FrozenDict = attrs.field(factory=FrozenDict, converter=_frozen_tensors)
    attn_implementation: str = "sdpa"

    def __attrs_post_init__(self) -> None:
        for alias, source in self.ties.items():
            if source not in self.params:
                raise TieError(
                    f"tie {alias!r} -> {source!r}: the source {source!r} is not a parameter of the state"
                )
            if alias not in self.params:
                raise TieError(
                    f"tie {alias!r} -> {source!r}: the alias {alias!r} is not a parameter of the state"
                )
            if self.params[alias] is not self.params[source]:
                raise TieError(
                    f"tie {alias!r} -> {source!r}: {alias!r} must be the very tensor object of {source!r}; "
                    f"build the state with params[{alias!r}] = params[{source!r}] or call fmodel.tie_weights"
                )
        overlap = set(self.params) & set(self.buffers)
        if overlap:
            raise FModelError(f"names are both parameters and buffers: {sorted(overlap)}")

    # -- reading ------------------------------------------------------------------------

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """A new dict of every parameter and buffer (aliases included)."""
        return {**self.params, **self.buffers}

    @property
    def device(self) -> torch.device:
        """The device of the parameters (the most common one if they are spread out)."""
        devices = Counter(t.device for t in self.params.values())
        return devices.most_common(1)[0][0] if devices else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in: that of its floating-point parameters (the most
        common one if mixed), leaving out the scales and zeros of quantized modules (the
        `<m>.weight_scale` / `<m>.weight_zero` of the modules an fmodel `quantization_config`
        lists), which are storage and may be of another dtype (GGUF's float16 block scales,
        kept as stored in a model that computes in float32). A state with no other floating
        parameter takes its scales' dtype; one with none at all, float32."""
        params = self.params
        quant = quantization_entries(self.config)
        dtypes = Counter(t.dtype for n, t in params.items() if n not in quant and t.is_floating_point())
        if not dtypes and quant:
            dtypes = Counter(t.dtype for t in params.values() if t.is_floating_point())
        return dtypes.most_common(1)[0][0] if dtypes else torch.float32

    def unique_params(self) -> dict[str, torch.Tensor]:
        """Parameters with tied aliases left out: each tensor once."""
        return {name: t for name, t in self.params.items() if name not in self.ties}

    def num_bytes(self) -> int:
        """Bytes of the distinct parameter and buffer tensors (tied tensors counted once)."""
        seen: set[int] = set()
        total = 0
        for t in self.tensors.values():
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    # -- changing -----------------------------------------------------------------------

    def replace(self, **changes: Any) -> ModelState:
        """A new state with `changes` applied (`attrs.evolve`); this state is unchanged."""
        return attrs.evolve(self, **changes)

    def __repr__(self) -> str:
        n = sum(t.numel() for t in self.unique_params().values())
        return (
            f"ModelState({self.architecture}, {self.config.model_type}, {n:,} parameters, "
            f"{self.dtype}, {self.device}, attn={self.attn_implementation!r}, ties={dict(self.ties)})"
        )
