"""Ensembles as data: stack states of one architecture along a new leading axis and run them
all in one call with `torch.func.vmap`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch
from torch.func import vmap

from ..errors import FModelError
from ..forward import ModelOutput, forward
from ..state import ModelState
from ._common import with_params

__all__ = ["StackError", "stack_states", "unstack_state", "vmap_forward"]


class StackError(FModelError, ValueError):
    """States that cannot be stacked: different architectures, configs, ties or tensor shapes."""


def stack_states(states: Sequence[ModelState]) -> ModelState:
    """One state whose every tensor is the inputs' tensors stacked on a new axis 0.

    All states must share architecture, config, ties and attention implementation. Ties
    hold in the result (each stacked alias is its stacked source). The result is for
    `vmap_forward` (or your own `torch.func.vmap`); a plain `forward` of it is not defined.

    Returns:
        A new state with tensors of shape [n, *shape]; the inputs are unchanged.

    Raises:
        StackError: the first differing field or tensor is named.

    Example:
        >>> ensemble = fmodel.stack_states([fmodel.init(config, seed=s) for s in range(4)])
        >>> fmodel.vmap_forward(ensemble, ids).logits.shape   # [4, B, T, vocab]
    """
    if not states:
        raise StackError("stack_states: no states given")
    first = states[0]
    for i, other in enumerate(states[1:], start=1):
        for field in ("architecture", "config", "attn_implementation"):
            if getattr(other, field) != getattr(first, field):
                raise StackError(f"stack_states: state {i} differs from state 0 in {field!r}")
        if dict(other.ties) != dict(first.ties):
            raise StackError(
                f"stack_states: state {i} has ties {dict(other.ties)}, state 0 has {dict(first.ties)}"
            )
        for name, t in other.tensors.items():
            if t.shape != first.tensors[name].shape:
                raise StackError(
                    f"stack_states: tensor {name!r} has shape {list(t.shape)} in state {i}, "
                    f"{list(first.tensors[name].shape)} in state 0"
                )
    params = {name: torch.stack([s.params[name] for s in states]) for name in first.unique_params()}
    buffers = {name: torch.stack([s.buffers[name] for s in states]) for name in first.buffers}
    return with_params(first, params, buffers=buffers)


def unstack_state(stacked: ModelState) -> list[ModelState]:
    """The states a `stack_states` result holds, in order. Their tensors are views into the
    stacked tensors (no copy); `fmodel.save` copies views into their own storage."""
    sizes = {t.shape[0] for t in stacked.tensors.values()}
    if len(sizes) != 1:
        raise StackError(
            f"unstack_state: tensors have different leading sizes {sorted(sizes)}; not a stacked state"
        )
    (n,) = sizes
    return [
        with_params(
            stacked,
            {name: t[i] for name, t in stacked.unique_params().items()},
            buffers={name: t[i] for name, t in stacked.buffers.items()},
        )
        for i in range(n)
    ]


def vmap_forward(stacked: ModelState, input_ids: torch.Tensor | None = None, **kwargs: Any) -> ModelOutput:
    """`forward` of every member of a stacked state in one vectorised call.

    Inputs are shared by all members (not stacked); outputs gain a leading member axis.

    Returns:
        ModelOutput whose tensors are [n, ...] (tuples of such for hidden states / attentions).
    """

    def run(params, buffers):
        member = with_params(stacked, params, buffers=buffers)
        out = forward(member, input_ids, **kwargs)
        return {k: v for k, v in attrs.asdict(out, recurse=False).items() if v is not None}

    out = vmap(run)(stacked.unique_params(), dict(stacked.buffers))
    return ModelOutput(**out)
