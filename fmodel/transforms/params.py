"""`replace_params`: the pure parameter update behind functional training loops.

Gradients with respect to a state
---------------------------------
A loss is a function of the parameters once `replace_params` puts them into the state, so
`torch.func` differentiates it directly:

    >>> def loss(params):
    ...     logits = fmodel.forward(fmodel.replace_params(state, params), ids).logits
    ...     return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    >>> grads = torch.func.grad(loss)(state.unique_params())
    >>> state = fmodel.replace_params(state, {k: state.params[k] - lr * g for k, g in grads.items()})

Differentiate `state.unique_params()`, not `state.params`: the gradients are keyed like
`state.params` with the tied aliases left out. A tie's source key carries the gradient of the
one shared tensor, which is the sum of what flows through every use (e.g. the input
embedding and the LM head), exactly as `loss.backward()` accumulates it in a tied
`nn.Module`. (Passing `state.params` raises a `TieError`: `torch.func` would treat the alias
as a separate input and split the gradient.) `torch.func.vjp`, `grad_and_value`, `jacrev`,
and `vmap(grad(...))` for per-example gradients work the same way; the state itself is
never written into. `examples/functional_training.py` has SGD, a MAML step, per-example
gradients and an ensemble.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .._checks import check_mapping_of_tensors, check_state
from ..errors import CheckpointError, ShapeMismatchError
from ..state import ModelState, TieError
from ._common import with_params

__all__ = ["replace_params"]


def replace_params(state: ModelState, params: Mapping[str, torch.Tensor]) -> ModelState:
    """A new state whose named parameters are the given tensors; every other tensor is shared.

    Replacing a tie's source re-points its aliases at the new tensor. The tensors are put in
    as they are (no copy, no cast); they may be `torch.func` wrapped tensors, so this works
    inside `grad`, `vjp` and `vmap` (see the module docstring for the gradient pattern).
    Pure: `state` and the given tensors are not written into.

    Arguments:
        state: the model (unchanged).
        params: {name: tensor}, names of `state.params` that are not tied aliases, each tensor
            with the shape and dtype of the one it replaces (an empty mapping is allowed).

    Returns:
        A new state: config, buffers, ties and every unnamed parameter shared with `state`.

    Raises:
        ArgumentTypeError: `state` is not a `ModelState`, `params` not a mapping of names to tensors.
        CheckpointError: names that are not parameters of the state (all listed; buffers are
            pointed out as such).
        TieError: a name is a tied alias; replace its source instead.
        ShapeMismatchError: a tensor's shape or dtype differs from the one it replaces.

    Example:
        >>> new = fmodel.replace_params(state, {"model.norm.weight": torch.ones(32)})
        >>> new.params["model.embed_tokens.weight"] is state.params["model.embed_tokens.weight"]
        True
    """
    check_state(state, "replace_params(state)")
    check_mapping_of_tensors(params, "replace_params(params)")
    unknown = sorted(name for name in params if name not in state.params)
    if unknown:
        buffers = [name for name in unknown if name in state.buffers]
        hint = f"; {buffers} are buffers, not parameters" if buffers else ""
        raise CheckpointError(f"replace_params: not parameters of this {state.architecture}: {unknown}{hint}")
    for name, tensor in params.items():
        if name in state.ties:
            raise TieError(
                f"replace_params: {name!r} is a tied alias of {state.ties[name]!r}; replace the "
                f"source {state.ties[name]!r} instead (its aliases follow it). For gradients, "
                "differentiate state.unique_params(), which leaves aliases out"
            )
        old = state.params[name]
        if tuple(tensor.shape) != tuple(old.shape) or tensor.dtype != old.dtype:
            raise ShapeMismatchError(
                f"replace_params: {name!r} is {list(old.shape)} {old.dtype}, "
                f"the replacement is {list(tensor.shape)} {tensor.dtype}"
            )
    return with_params(state, params)
