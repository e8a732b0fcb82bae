"""`LoadReport`: what a load did besides reading tensors under their own names."""

from __future__ import annotations

import attrs

__all__ = ["LoadReport"]


@attrs.frozen
class LoadReport:
    """What a load did besides reading tensors under their own names.

    Attributes:
        missing: expected tensors absent from the checkpoint (initialised; only with allow_missing).
        unexpected: checkpoint tensors the architecture has no place for (only when strict=False).
        mismatched: (name, checkpoint shape, expected shape), re-initialised (ignore_mismatched_sizes).
        renamed: (checkpoint name, new name) for legacy renames and base-prefix changes.
        unused: head tensors dropped because a head checkpoint was loaded as the base model,
            tied aliases stored redundantly, and known-harmless extras (old rotary buffers).
    """

    source: str
    architecture: str
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()
    renamed: tuple[tuple[str, str], ...] = ()
    unused: tuple[str, ...] = ()
