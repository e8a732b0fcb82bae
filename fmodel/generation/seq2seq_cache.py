"""`Seq2SeqCache`: the cache value of an encoder-decoder model (T5).

The decoder's self-attention keys and values grow by one position per step: they live in a
`KVCache` (`fmodel.generation.cache`, same purity contract: written only above its length).
The cross-attention keys and values depend only on the encoder's output, so they are
computed once, on the first cached forward, and carried unchanged by every later value.
"""

from __future__ import annotations

import attrs
import torch

from .._checks import describe
from .cache import CacheError, KVCache

__all__ = ["Seq2SeqCache", "self_attention_cache"]


@attrs.frozen(eq=False)
class Seq2SeqCache:
    """The decoder's self-attention cache plus the cross-attention keys/values.

    Attributes:
        self_attention: a `KVCache` over the decoder layers (`fmodel.init_cache` makes one).
        cross_keys: one [B, heads, S, d_kv] tensor per decoder layer (S = encoder length),
            or None before the first forward computed them.
        cross_values: like `cross_keys`.

    A forward given a `KVCache` or a `Seq2SeqCache` returns a `Seq2SeqCache` whose
    `self_attention` is longer by the new tokens and whose cross keys/values are those it
    was given (computed from the encoder output when it was given none). Equality is identity.
    """

    self_attention: KVCache
    cross_keys: tuple[torch.Tensor, ...] | None = None
    cross_values: tuple[torch.Tensor, ...] | None = None

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.self_attention, KVCache):
            raise CacheError(
                f"Seq2SeqCache(self_attention) must be an fmodel.KVCache, got {describe(self.self_attention)}"
            )
        if (self.cross_keys is None) != (self.cross_values is None):
            raise CacheError("Seq2SeqCache: give both cross_keys and cross_values, or neither")
        if self.cross_keys is not None and len(self.cross_keys) != len(self.self_attention.keys):
            raise CacheError(
                f"Seq2SeqCache: {len(self.cross_keys)} cross-attention layers for "
                f"{len(self.self_attention.keys)} self-attention layers"
            )

    @property
    def length(self) -> int:
        """Decoder positions seen so far."""
        return self.self_attention.length

    @property
    def batch_size(self) -> int:
        return self.self_attention.batch_size

    def reorder(self, rows: torch.Tensor) -> Seq2SeqCache:
        """Row i of the result is row `rows[i]` of this cache (beam search); new buffers."""
        from .cache import reorder_cache

        rows = rows.to(device=self.self_attention.device, dtype=torch.long)
        pick = None if self.cross_keys is None else (lambda ts: tuple(t.index_select(0, rows) for t in ts))
        return Seq2SeqCache(
            reorder_cache(self.self_attention, rows),
            None if pick is None else pick(self.cross_keys),
            None if pick is None else pick(self.cross_values),
        )

    def __repr__(self) -> str:
        cross = "none" if self.cross_keys is None else f"{self.cross_keys[0].shape[2]} encoder positions"
        return f"Seq2SeqCache({self.self_attention!r}, cross: {cross})"


def self_attention_cache(cache: object) -> KVCache | None:
    """The decoder self-attention `KVCache` of `cache` (a `KVCache` or a `Seq2SeqCache`)."""
    if cache is None or isinstance(cache, KVCache):
        return cache
    if isinstance(cache, Seq2SeqCache):
        return cache.self_attention
    raise CacheError(
        "past_key_values of an encoder-decoder model must be an fmodel.KVCache (fmodel.init_cache) "
        f"or a Seq2SeqCache returned by a forward, got {describe(cache)}"
    )
