"""`replace_params`: the pure parameter update behind functional training loops."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import CheckpointError, ShapeMismatchError
from ..state import ModelState, TieError
from ._common import with_params

__all__ = ["replace_params"]


def replace_params(state: ModelState, params: Mapping[str, torch.Tensor]) -> ModelState:
    """A new state whose named parameters are `params`; every other tensor is shared.

    Replacing a tie's source re-points its aliases, so gradients taken with respect to
    `state.unique_params()` flow into the one shared tensor. Works inside `torch.func`
    transforms (`grad`, `vjp`, `vmap`): this is how a loss becomes a function of the
    parameters (see `examples/functional_training.py`).

    Arguments:
        state: the model (unchanged).
        params: {name: tensor} with the shapes of the tensors they replace.

    Returns:
        A new state.

    Raises:
        CheckpointError: a name is not a parameter of the state (the unknown names are listed).
        TieError: a name is a tied alias (replace its source instead).
        ShapeMismatchError: a tensor's shape differs from the one it replaces.

    Example:
        >>> def loss(params):
        ...     logits = fmodel.forward(fmodel.replace_params(state, params), ids).logits
        ...     return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        >>> grads = torch.func.grad(loss)(state.unique_params())   # keyed like state.params
        >>> state = fmodel.replace_params(state, {k: state.params[k] - 0.1 * g for k, g in grads.items()})
    """
    unknown = sorted(name for name in params if name not in state.params)
    if unknown:
        raise CheckpointError(f"replace_params: not parameters of {state.architecture}: {unknown[:10]}")
    for name, tensor in params.items():
        if name in state.ties:
            raise TieError(
                f"replace_params: {name!r} is tied to {state.ties[name]!r}; replace the source instead"
            )
        old = state.params[name]
        if tuple(tensor.shape) != tuple(old.shape):
            raise ShapeMismatchError(
                f"replace_params: {name!r} has shape {list(old.shape)}, the replacement has {list(tensor.shape)}"
            )
    return with_params(state, params)
