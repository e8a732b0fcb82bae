"""Helpers shared by the transforms: building the next state with ties re-pointed."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..models import get_spec
from ..state import ModelState


def with_params(state: ModelState, changed: Mapping[str, torch.Tensor], **changes) -> ModelState:
    """A new state where the tensors in `changed` (source names) replace the old ones and every
    declared alias of a changed source is re-pointed at the new tensor. Other tensors are shared.

    `changes` may replace other fields too (config, ties, buffers).
    """
    ties = changes.get("ties", state.ties)
    params = dict(state.params)
    params.update(changed)
    for alias, source in ties.items():
        params[alias] = params[source]
    return state.replace(params=params, **changes)


def spec_of(state: ModelState):
    return get_spec(state.architecture)


def fresh_generator(generator: torch.Generator | None, seed: int = 0) -> torch.Generator:
    return generator if generator is not None else torch.Generator().manual_seed(seed)
