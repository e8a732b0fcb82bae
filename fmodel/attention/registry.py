"""The attention registry: name -> attention function, looked up at call time.

Every attention function has Transformers' attention-interface signature::

    fn(module, query, key, value, attention_mask, *, scaling, dropout, **kwargs)
        -> (output [B, T, H, D], weights [B, H, T, S] or None)

with `query` [B, H, T, D] and `key`/`value` [B, H_kv, S, D] (grouped-query attention:
`module.num_key_value_groups` = H // H_kv). A function written for Transformers'
`AttentionInterface` therefore registers here unchanged.

Unlike Transformers, a registered function always receives the mask the model built.
`mask_kind` says in which form:

- "additive": float [B, 1, T, S], 0 where attention is allowed and the dtype's minimum
  elsewhere (what Transformers' eager attention takes). The default for user functions.
  With a KV cache, S = cache length + T and row t is the query at cache position S - T + t.
- "bool": bool [B, 1, T, S], True where allowed; None when causal masking aligned to the
  last key is exact: no padding and no window cutting in, and either T == S (the function
  then uses `is_causal`) or T == 1 (one decode step over a KV cache: every key is allowed).
  Transformers' own sdpa function reads None the same way (`is_causal` only when T > 1).
- "block": a `torch.nn.attention.flex_attention.BlockMask`.
- "padding": the 2-D [B, S] padding mask (1 = real token) or None, for varlen kernels.

Keyword arguments a model may add: `sliding_window` (int or None), and `softcap` (a float)
only when the model soft-caps its attention scores (Gemma 2: tanh(s / softcap) * softcap on
the scaled scores, before the mask). A soft-capped model runs only functions that name a
`softcap` parameter; one that would merely receive it in `**kwargs` (where Transformers' own
sdpa drops it) is refused with `AttentionUnavailableError` (`builtin.require_softcap`).

The registry is the one piece of global state fmodel has; users extend it on purpose.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from ..errors import ArgumentTypeError, AttentionUnavailableError, InvalidArgumentError

__all__ = ["AttentionFunction", "available", "get", "register", "unregister"]

MASK_KINDS = ("additive", "bool", "block", "padding")


@attrs.frozen
class AttentionFunction:
    """A registered attention function and the mask form it wants."""

    name: str
    fn: Callable
    mask_kind: str = "additive"
    # Returns None when usable here, or a sentence saying what is missing.
    check: Callable[[], str | None] | None = attrs.field(default=None, eq=False)


_REGISTRY: dict[str, AttentionFunction] = {}


def register(
    name: str,
    fn: Callable,
    *,
    mask_kind: str = "additive",
    check: Callable[[], str | None] | None = None,
) -> None:
    """Register `fn` under `name` (replacing an earlier registration of that name).

    Arguments:
        name: the string users pass as `attn_implementation`.
        fn: an attention function with the signature in this module's docstring.
        mask_kind: which mask form `fn` receives: "additive" (default), "bool", "block" or "padding".
        check: optional; returns None when `fn` can run here, else why not (checked at `get`).

    Raises:
        ArgumentTypeError: (a TypeError) `name` is not a str, `fn` or `check` not callable.
        InvalidArgumentError: (a ValueError) an empty name, an unknown `mask_kind`.

    Example:
        >>> def my_attention(module, q, k, v, mask, scaling=None, dropout=0.0, **kw): ...
        >>> fmodel.attention.register("mine", my_attention)
    """
    if not isinstance(name, str):
        raise ArgumentTypeError(
            f"attention.register(name): the attention name must be a non-empty string, got {name!r:.80}"
        )
    if not name:
        raise InvalidArgumentError(
            f"attention.register(name): the attention name must be a non-empty string, got {name!r}"
        )
    if not callable(fn):
        raise ArgumentTypeError(
            f"attention.register(fn): attention function for {name!r} must be callable, got {type(fn).__name__}"
        )
    if not isinstance(mask_kind, str) or mask_kind not in MASK_KINDS:
        raise InvalidArgumentError(
            f"attention.register(mask_kind): mask_kind for {name!r} must be one of {MASK_KINDS}, got {mask_kind!r:.80}"
        )
    if check is not None and not callable(check):
        raise ArgumentTypeError(
            f"attention.register(check) must be a callable or None, got {type(check).__name__}"
        )
    _REGISTRY[name] = AttentionFunction(name, fn, mask_kind, check)


def unregister(name: str) -> None:
    """Remove a registration (no error if absent).

    Raises:
        ArgumentTypeError: `name` is not a str.
    """
    _check_name(name, "attention.unregister(name)")
    _REGISTRY.pop(name, None)


def available() -> list[str]:
    """Names of the registered attention functions that can run on this machine."""
    return sorted(name for name, entry in _REGISTRY.items() if entry.check is None or entry.check() is None)


def get(name: str) -> AttentionFunction:
    """The registered function `name`.

    Raises:
        ArgumentTypeError: `name` is not a str.
        AttentionUnavailableError: `name` is not registered, or its package / hardware is missing.
    """
    _check_name(name, "attn_implementation")
    entry = _REGISTRY.get(name)
    if entry is None:
        raise AttentionUnavailableError(
            f"attention implementation {name!r} is not registered; registered: {sorted(_REGISTRY)}"
        )
    if entry.check is not None:
        why = entry.check()
        if why is not None:
            raise AttentionUnavailableError(f"attention implementation {name!r} cannot run here: {why}")
    return entry


def known(name: str) -> bool:
    """True when `name` is registered (whether or not it can run here); False for a non-str."""
    return isinstance(name, str) and name in _REGISTRY


def _check_name(name, argument: str) -> None:
    if not isinstance(name, str):
        raise ArgumentTypeError(
            f"{argument} must be the name (str) of a registered attention function, got "
            f"{type(name).__name__} {name!r:.60}; registered: {sorted(_REGISTRY)}"
        )
