"""Ensembles as data: stack states of one architecture along a new leading axis and run them
all in one call with `torch.func.vmap`.

`vmap_forward(stacked, ids)` is the short way. To write the vmap yourself (other inputs per
member, a loss, gradients), vectorise over the stacked tensors and rebuild one member inside
with `replace_params` on any unstacked member (the template must have per-member shapes):

    >>> template = states[0]                      # or fmodel.unstack_state(stacked)[0]
    >>> def run(params):
    ...     return fmodel.forward(fmodel.replace_params(template, params), ids).logits
    >>> logits = torch.func.vmap(run)(stacked.unique_params())   # [n, B, T, vocab]

The buffers of fmodel's families depend only on the config (rotary frequencies, position
ids), so the template's own buffers serve every member.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import torch
from torch.func import vmap

from .._checks import check_state, check_token_ids, describe
from ..errors import ArgumentTypeError, FModelError
from ..forward import ModelOutput, forward
from ..state import ModelState
from ._common import spec_of, with_params

__all__ = ["StackError", "stack_states", "unstack_state", "vmap_forward"]

# ModelState fields compared as values; the tensors are compared name by name.
_TENSOR_FIELDS = ("params", "buffers")


class StackError(FModelError, ValueError):
    """States that cannot be stacked (different architecture, config, ties, tensor names, shapes,
    dtypes or devices), or a state that is not a stack."""


def stack_states(states: Sequence[ModelState]) -> ModelState:
    """One state whose every tensor is the members' tensors stacked on a new axis 0.

    Every state must have the same architecture, config, ties, attention implementation and
    tensor names, shapes, dtypes and devices. Ties hold in the result: each stacked alias is
    the very tensor object of its stacked source. The result is meant for `vmap_forward` (or
    your own `torch.func.vmap`); a plain `forward` of it is not defined.

    Pure, and copies nothing it need not copy: a tensor that differs between members is
    copied once by `torch.stack` into new storage; a tensor that is the *same object* in every
    member (frozen parts shared by variants made with `replace_params`, config-derived
    buffers) becomes a stride-0 `expand` view of it, so it costs no memory. The config and
    the other fields are shared with `states[0]`.

    Arguments:
        states: one or more `ModelState`s (unchanged).

    Returns:
        A new state whose tensors have shape [n, *shape] (dtype and device kept), n = len(states).

    Raises:
        ArgumentTypeError: `states` is not a sequence of `ModelState`s (a single state: wrap it
            in a list).
        StackError: no states, or the first difference found, named: the state's index and the
            field (`config.<field>` for configs), tie or tensor that differs.

    Example:
        >>> ensemble = fmodel.stack_states([fmodel.init(config, seed=s) for s in range(4)])
        >>> ensemble.params["model.norm.weight"].shape
        torch.Size([4, 32])
        >>> fmodel.vmap_forward(ensemble, ids).logits.shape   # [4, B, T, vocab]
    """
    if isinstance(states, (str, bytes, ModelState)) or not isinstance(states, Iterable):
        raise ArgumentTypeError(f"stack_states(states) must be a list of ModelState, got {describe(states)}")
    states = list(states)
    for i, member in enumerate(states):
        check_state(member, f"stack_states(states[{i}])")
    if not states:
        raise StackError("stack_states: no states given")
    first = states[0]
    for i, other in enumerate(states[1:], start=1):
        _check_same(first, other, i)
    n = len(states)

    def stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
        t = tensors[0]
        if all(u is t for u in tensors):
            return t.expand(n, *t.shape)
        return torch.stack(tensors)

    params = {name: stacked([s.params[name] for s in states]) for name in first.unique_params()}
    buffers = {name: stacked([s.buffers[name] for s in states]) for name in first.buffers}
    return with_params(first, params, buffers=buffers)


def unstack_state(stacked: ModelState) -> list[ModelState]:
    """The member states of a stacked state, in order: the inverse of `stack_states`.

    Member tensors are views (`stacked_tensor[i]`), no copy: they share storage with the
    stacked state (and, for a tensor `stack_states` expanded, with the original tensor).
    States are never written into, so this is safe; `fmodel.save` copies such views into
    storage of their own. Ties hold in each member.

    Arguments:
        stacked: a state whose every tensor has the same leading size n (unchanged).

    Returns:
        A list of n new states, tensors of shape `shape[1:]`; config and other fields shared.

    Raises:
        ArgumentTypeError: `stacked` is not a `ModelState`.
        StackError: a tensor is a scalar, or leading sizes differ (not a stacked state).

    Example:
        >>> members = fmodel.unstack_state(fmodel.stack_states([a, b]))
        >>> torch.equal(members[1].params["model.norm.weight"], b.params["model.norm.weight"])
        True
    """
    check_state(stacked, "unstack_state(stacked)")
    tensors = stacked.tensors
    scalars = sorted(name for name, t in tensors.items() if t.dim() == 0)
    if scalars:
        raise StackError(f"unstack_state: {scalars[:5]} are scalars; not a stacked state")
    sizes: dict[int, str] = {}
    for name, t in tensors.items():
        sizes.setdefault(t.shape[0], name)
    if len(sizes) > 1:
        named = ", ".join(f"{name!r} has {size}" for size, name in sorted(sizes.items()))
        raise StackError(
            f"unstack_state: tensors have different leading sizes ({named}); not a stacked state"
        )
    n = next(iter(sizes), 0)
    return [
        with_params(
            stacked,
            {name: t[i] for name, t in stacked.unique_params().items()},
            buffers={name: t[i] for name, t in stacked.buffers.items()},
        )
        for i in range(n)
    ]


def vmap_forward(stacked: ModelState, input_ids: torch.Tensor | None = None, **kwargs: Any) -> ModelOutput:
    """`forward` of every member of a stacked state in one vectorised call (`torch.func.vmap`).

    Inputs are shared by all members, not stacked. Pure; works under `torch.func.grad`.

    Arguments:
        stacked: a `stack_states` result with n members.
        input_ids: [B, T], as for `forward`.
        **kwargs: any other `forward` argument (`attention_mask` [B, T], `attn_implementation`,
            `output_hidden_states`, ...), the same for every member.

    Returns:
        ModelOutput whose tensors gain a leading member axis: logits [n, B, T, vocab], and
        tuples of [n, ...] for hidden states / attentions. Member i equals
        `forward(unstack_state(stacked)[i], input_ids, **kwargs)`.

    Raises:
        ArgumentTypeError: `stacked` is not a `ModelState`, `input_ids` not an integer tensor.
        StackError: `stacked` is a plain state, not a `stack_states` result.
        TokenIdError: an id outside the vocabulary (which id, where, the vocabulary size).
        FModelError: whatever `forward` raises for these inputs.

    Example:
        >>> logits = fmodel.vmap_forward(ensemble, ids, attention_mask=mask).logits
        >>> probs = logits.softmax(-1).mean(0)   # the ensemble's averaged prediction
    """

    check_state(stacked, "vmap_forward(stacked)")
    embeddings = stacked.params.get(spec_of(stacked).input_embeddings)
    if embeddings is not None and embeddings.dim() != 3:
        raise StackError(
            f"vmap_forward: the state is not stacked (its input embeddings are {list(embeddings.shape)}, "
            "a stack's are [n, vocab, hidden]); make one with fmodel.stack_states([...]) or call fmodel.forward"
        )
    if input_ids is not None:
        check_token_ids(
            input_ids, None if embeddings is None else embeddings.shape[-2], "vmap_forward(input_ids)"
        )

    def run(params, buffers):
        member = with_params(stacked, params, buffers=buffers)
        out = forward(member, input_ids, **kwargs)
        return {k: v for k, v in attrs.asdict(out, recurse=False).items() if v is not None}

    out = vmap(run)(stacked.unique_params(), dict(stacked.buffers))
    return ModelOutput(**out)


def _check_same(first: ModelState, other: ModelState, i: int) -> None:
    where = f"stack_states: state {i} differs from state 0 in"
    for field in attrs.fields(ModelState):
        if field.name in _TENSOR_FIELDS:
            continue
        a, b = getattr(first, field.name), getattr(other, field.name)
        if field.name == "config":
            _check_same_config(a, b, where)
        elif field.name == "ties":
            if dict(a) != dict(b):
                alias = min(set(a.items()) ^ set(b.items()))[0]
                there, here = (repr(t[alias]) if alias in t else "untied" for t in (b, a))
                raise StackError(f"{where} the tie of {alias!r}: {there} there, {here} in state 0")
        elif a != b:
            raise StackError(f"{where} {field.name!r}: {b!r} there, {a!r} in state 0")
    for kind in _TENSOR_FIELDS:
        mine, theirs = getattr(first, kind), getattr(other, kind)
        extra, missing = sorted(set(theirs) - set(mine)), sorted(set(mine) - set(theirs))
        if extra or missing:
            name, how = (extra[0], "has") if extra else (missing[0], "lacks")
            raise StackError(f"{where} {kind}: it {how} {name!r}")
        for name, t in theirs.items():
            u = mine[name]
            for what in ("shape", "dtype", "device"):
                there, here = getattr(t, what), getattr(u, what)
                if there != here:
                    if what == "shape":
                        there, here = list(there), list(here)
                    raise StackError(f"{where} tensor {name!r}: {what} {there} there, {here} in state 0")


def _check_same_config(a: Any, b: Any, where: str) -> None:
    if a == b:
        return
    if type(a) is not type(b) or not attrs.has(type(a)):
        raise StackError(f"{where} 'config': {type(b).__name__} there, {type(a).__name__} in state 0")
    for field in attrs.fields(type(a)):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if x != y:
            raise StackError(f"{where} 'config.{field.name}': {y!r} there, {x!r} in state 0")
    raise StackError(f"{where} 'config'")
