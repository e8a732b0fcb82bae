"""`KVCache`: an explicit, preallocated key/value cache value for incremental decoding.

A cache is a frozen value: per-layer key and value buffers of a fixed size
[B, kv_heads, max_length, head_dim], and `length`, how many positions of them hold keys and
values. `fmodel.forward(state, ids, past_key_values=cache)` returns a new cache, with
`length` grown by the number of new tokens, in `ModelOutput.past_key_values`.

The purity contract (gpt-fast style: buffers are preallocated and updated by index, so a
decode step allocates nothing per token):

- A cache value exposes positions [0, length) of its buffers and nothing else.
- A forward from a cache of length L writes the new tokens' keys and values into positions
  [L, L + T) of the very buffers it was given, and returns a new value of length L + T over
  those same buffers. It never writes below L, so it never changes what the cache it was
  given, or any other value of length <= L over those buffers, exposes: such a value stays
  valid and can be used again from its own length (branching, retrying, rewinding).
- That later forward writes [L, L + T') again, overwriting what the values of length > L over
  the same buffers expose. Those values (the descendants of the reused one) are then stale.
  To keep two branches alive, `clone()` one first.
- State tensors and input tensors are never written.

A cache is for inference: run it under `torch.no_grad()` or `torch.inference_mode()`
(`fmodel.generate` does). Under autograd the in-place writes would make earlier steps'
saved tensors stale, and backward would say so.
"""

from __future__ import annotations

import functools

import attrs
import torch

from .._checks import check_device, check_float_dtype, check_positive_int, check_state_like, describe
from .._limits import check_allocation
from ..distributed.distribute import local_kv_heads
from ..errors import ArgumentTypeError, FModelError
from ..models import get_spec
from ..state import ModelState

__all__ = ["CacheError", "KVCache", "check_cache", "init_cache", "reorder_cache"]


class CacheError(FModelError, ValueError):
    """A KV cache does not fit the model or the inputs (size, batch, dtype, architecture)."""


@attrs.frozen(eq=False)
class KVCache:
    """Per-layer preallocated key/value buffers and the number of positions they hold.

    Attributes:
        keys: one [B, kv_heads_l, max_length, head_dim] tensor per layer (kv_heads_l is the
            layer's key/value head count after any pruning; 0 for a fully pruned layer).
        values: like `keys`.
        length: positions [0, length) hold the keys/values of the tokens seen so far (padding
            slots of left-padded prompts included: the attention mask hides them).

    Build one with `init_cache`. Equality is identity.
    """

    keys: tuple[torch.Tensor, ...] = attrs.field(converter=tuple)
    values: tuple[torch.Tensor, ...] = attrs.field(converter=tuple)
    length: int = 0

    def __attrs_post_init__(self) -> None:
        if len(self.keys) != len(self.values) or not self.keys:
            raise CacheError(
                f"KVCache: {len(self.keys)} key and {len(self.values)} value buffers; need one per layer"
            )
        if not 0 <= self.length <= self.max_length:
            raise CacheError(f"KVCache: length {self.length} outside [0, max_length={self.max_length}]")

    @property
    def max_length(self) -> int:
        """Positions the buffers have room for."""
        return self.keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    def write(
        self, layer_idx: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer `layer_idx`'s new `key`/`value` [B, H_kv, T, D] at positions
        [length, length + T) and return views of positions [0, length + T) of that layer
        ([B, H_kv, length + T, D]). The one in-place operation on a cache: it writes only
        above `length` (see the module docstring); the models call it, users need not."""
        start = self.length
        end = start + key.shape[2]
        k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]
        k_buf[:, :, start:end] = key
        v_buf[:, :, start:end] = value
        return k_buf[:, :, :end], v_buf[:, :, :end]

    def advance(self, n: int) -> KVCache:
        """The value of length `length + n` over the same buffers (after a forward wrote them)."""
        return KVCache(self.keys, self.values, self.length + n)

    def truncate(self, length: int) -> KVCache:
        """The value of length `length` (<= this one's) over the same buffers: a rewind, no copy."""
        if not 0 <= length <= self.length:
            raise CacheError(f"KVCache.truncate: length {length} outside [0, {self.length}]")
        return KVCache(self.keys, self.values, length)

    def clone(self) -> KVCache:
        """An independent copy (new buffers), for keeping two branches alive."""
        return KVCache(
            tuple(k.clone() for k in self.keys), tuple(v.clone() for v in self.values), self.length
        )

    def __repr__(self) -> str:
        return (
            f"KVCache({len(self.keys)} layers, batch {self.batch_size}, length {self.length}/"
            f"{self.max_length}, {self.dtype}, {self.device})"
        )


def reorder_cache(cache: KVCache, rows: torch.Tensor) -> KVCache:
    """A new cache whose row i is row `rows[i]` of `cache` (beam search: each surviving beam
    takes over the keys/values of the beam it continues).

    Arguments:
        cache: any cache value.
        rows: [B'] int64 row indices into the cache's batch (repeats allowed).

    Returns:
        A `KVCache` of batch B' and the same length and capacity over new buffers; `cache` and
        its buffers are not written (they stay valid).

    Raises:
        ArgumentTypeError: `cache` is not a `KVCache`, `rows` not a tensor.
        CacheError: `rows` is not a 1-D integer tensor of indices in [0, batch).
    """
    if not isinstance(cache, KVCache):
        raise ArgumentTypeError(f"reorder_cache(cache) must be an fmodel.KVCache, got {describe(cache)}")
    if not isinstance(rows, torch.Tensor):
        raise ArgumentTypeError(f"reorder_cache(rows) must be a 1-D integer tensor, got {describe(rows)}")
    if rows.dim() != 1 or rows.is_floating_point():
        raise CacheError(
            f"reorder_cache: rows must be a 1-D integer tensor, got {rows.dtype} {list(rows.shape)}"
        )
    if rows.numel() and not (int(rows.min()) >= 0 and int(rows.max()) < cache.batch_size):
        raise CacheError(
            f"reorder_cache: row indices must lie in [0, {cache.batch_size}), got {rows.tolist()}"
        )
    rows = rows.to(device=cache.device, dtype=torch.long)
    return KVCache(
        tuple(k.index_select(0, rows) for k in cache.keys),
        tuple(v.index_select(0, rows) for v in cache.values),
        cache.length,
    )


def _cache_shapes(state: ModelState) -> list[tuple[int, int]]:
    """(kv_heads, head_dim) per layer: the skeleton's `cache_shapes()` when it has one (an
    encoder-decoder sizes the cache for its decoder), else the architecture's head layout."""
    from ..models.skeleton import skeleton

    spec = get_spec(state.architecture)
    own = getattr(skeleton(state.config, state.architecture), "cache_shapes", None)
    if own is not None and supports_cache(state):
        return list(own())
    if not supports_cache(state) or spec.head_layout is None:
        raise CacheError(
            f"{state.architecture} is not a generative (causal) model: it takes no KV cache "
            f"and cannot generate; use a decoder such as LlamaForCausalLM or GPT2LMHeadModel, "
            f"or an encoder-decoder such as T5ForConditionalGeneration"
        )
    config, local = state.config, local_kv_heads(state)  # a distributed state caches its local heads
    layouts = [spec.head_layout(config, i) for i in range(config.num_hidden_layers)]
    return [(layout.kv_heads if local is None else local[i], layout.head_dim) for i, layout in enumerate(layouts)]


def supports_cache(state: ModelState) -> bool:
    """True when the state's architecture runs with a KV cache (causal decoders)."""
    from ..models.skeleton import skeleton

    return bool(getattr(skeleton(state.config, state.architecture), "supports_cache", False))


def init_cache(
    state: ModelState,
    batch_size: int,
    max_length: int,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> KVCache:
    """An empty cache (length 0) with room for `max_length` positions.

    Arguments:
        state: a causal decoder (Llama family, GPT-2), or an encoder-decoder (T5), whose
            cache is its decoder's self-attention (one buffer pair per decoder layer).
        batch_size: B, the rows the forwards will run.
        max_length: positions to allocate: prompt + new tokens, padding included.
        dtype: of the buffers; default the state's floating dtype (the activations' dtype).
        device: default the state's device.

    Returns:
        A `KVCache` whose per-layer buffers are [B, kv_heads, max_length, head_dim] zeros
        (zeros, so that no uninitialised memory ever reaches a kernel, even a masked one).

    Raises:
        ArgumentTypeError: `state` is not a `ModelState`, a size not an int, a `dtype` /
            `device` of the wrong type.
        CacheError: the architecture is not generative (BERT), or a size is not positive.
        InvalidArgumentError: `dtype` is not a floating dtype, `device` does not exist here.
        SizeLimitError: the buffers would not fit in the device's memory (before allocating).

    Example:
        >>> cache = fmodel.init_cache(state, batch_size=1, max_length=64)
        >>> out = fmodel.forward(state, prompt, past_key_values=cache)
        >>> out.past_key_values.length == prompt.shape[1]
        True
    """
    check_state_like(state, "init_cache(state)")
    check_positive_int(batch_size, "init_cache(batch_size)", minimum=-(2**63))
    check_positive_int(max_length, "init_cache(max_length)", minimum=-(2**63))
    if batch_size < 1 or max_length < 1:
        raise CacheError(f"init_cache: batch_size ({batch_size}) and max_length ({max_length}) must be >= 1")
    dtype = check_float_dtype(dtype, "init_cache(dtype)") or state.dtype
    device = check_device(device, "init_cache(device)") or state.device
    shapes = _cache_shapes(state)
    itemsize = dtype.itemsize
    if not torch.compiler.is_compiling():  # sizes are static under compile; the eager call checked
        check_allocation(
            2 * batch_size * max_length * sum(h * d for h, d in shapes) * itemsize,
            what=f"init_cache(batch_size={batch_size}, max_length={max_length})",
            device=device,
        )
    keys = tuple(torch.zeros(batch_size, h, max_length, d, dtype=dtype, device=device) for h, d in shapes)
    values = tuple(torch.zeros(batch_size, h, max_length, d, dtype=dtype, device=device) for h, d in shapes)
    return KVCache(keys, values, 0)


@functools.lru_cache(maxsize=64)
def _layer_shapes(config, architecture: str) -> tuple[tuple[int, int, int], ...]:
    """(layer, kv_heads, head_dim) of the first and last layer and of every layer whose shape
    differs from the one before it (pruned layers): what `_check_layer_shapes` compares.
    Cached per (config, architecture): configs are frozen and hashable, so this runtime cache
    never changes a result; it spares a per-layer walk in every decode step."""
    shapes = _cache_shapes(ModelState(config, architecture, {}))
    last = len(shapes) - 1
    return tuple((i, *shape) for i, shape in enumerate(shapes) if i in (0, last) or shape != shapes[i - 1])


def _check_layer_shapes(state: ModelState, cache: KVCache) -> None:
    """Each layer's buffers are [B, kv_heads, max_length, head_dim] of this model (a cache made
    for another model, e.g. GPT-2's given to a Llama, fails here instead of deep in the
    attention). Checks the layers where the model's shapes change (first, last, pruned ones)."""
    batch, length, local = cache.batch_size, cache.max_length, local_kv_heads(state)
    for i, kv_heads, head_dim in _layer_shapes(state.config, state.architecture):
        if local is not None:  # a distributed state's cache holds this rank's kv heads
            kv_heads = local[i]
        for kind, buffers in (("keys", cache.keys), ("values", cache.values)):
            shape = tuple(buffers[i].shape)
            if shape != (batch, kv_heads, length, head_dim):
                raise CacheError(
                    f"KV cache {kind}[{i}] has shape {list(shape)}; layer {i} of this {state.architecture} "
                    f"needs [batch {batch}, {kv_heads} kv heads, max_length {length}, {head_dim} head dim]: "
                    "was the cache made for another model? Make it with fmodel.init_cache(state, ...)"
                )


def check_cache(
    state: ModelState, cache: KVCache, batch_size: int, new_tokens: int, dtype: torch.dtype
) -> None:
    """Raise a `CacheError` naming the mismatch when `cache` cannot take `new_tokens` more
    positions of a [batch_size, new_tokens] input to `state` computing in `dtype`."""
    if not isinstance(cache, KVCache):
        raise CacheError(
            f"past_key_values must be an fmodel.KVCache (see fmodel.init_cache), got {type(cache).__name__}"
        )
    if not supports_cache(state):
        _cache_shapes(state)  # raises the "not generative" error
    layers = _layer_shapes(state.config, state.architecture)[-1][0] + 1
    if len(cache.keys) != layers:
        raise CacheError(f"KV cache has {len(cache.keys)} layers, the model {layers}")
    _check_layer_shapes(state, cache)
    if cache.batch_size != batch_size:
        raise CacheError(
            f"KV cache was made for batch size {cache.batch_size}, the input has {batch_size} rows"
        )
    if cache.length + new_tokens > cache.max_length:
        raise CacheError(
            f"KV cache is full: it holds {cache.length} of {cache.max_length} positions and "
            f"{new_tokens} more do not fit; make it with init_cache(..., max_length>="
            f"{cache.length + new_tokens})"
        )
    if cache.dtype != dtype:
        raise CacheError(
            f"KV cache holds {cache.dtype} but the model computes in {dtype}; "
            f"make it with init_cache(state, ..., dtype={dtype})"
        )
