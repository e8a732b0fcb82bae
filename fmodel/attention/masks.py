"""Attention masks built from a padding mask, query positions and an optional sliding window.

The rule (the same as Transformers' `masking_utils`): query at cache position `q` of batch
row `b` may attend key `k` when `padding[b, k]`, `k <= q` (causal), and, with a sliding
window `w`, `k > q - w`. Masks are built once per forward per distinct window and shared
by all layers.

With a KV cache the T queries sit at cache positions `L .. L+T-1` (`q_positions`) over
`S = L + T` keys: the same rule, with the query offset carried by `q_positions`.
"""

from __future__ import annotations

import torch

__all__ = ["MaskInputs", "build_mask"]


class MaskInputs:
    """What a mask is built from.

    Arguments:
        padding_mask: [B, S] with 1/True for real tokens, or None (no padding).
        q_positions: [T] int64, the cache positions of the queries (0..T-1 without a cache).
        kv_len: S, the number of keys.
        batch_size: B.
        causal: False for bidirectional (encoder) attention.
    """

    __slots__ = ("batch_size", "causal", "device", "kv_len", "padding_mask", "q_positions")

    def __init__(
        self,
        padding_mask: torch.Tensor | None,
        q_positions: torch.Tensor,
        kv_len: int,
        batch_size: int,
        causal: bool = True,
    ) -> None:
        if padding_mask is not None and _all_real(padding_mask):
            padding_mask = None  # all real tokens: the cheap paths apply
        self.padding_mask = None if padding_mask is None else padding_mask.to(torch.bool)
        self.q_positions = q_positions
        self.kv_len = kv_len
        self.batch_size = batch_size
        self.causal = causal
        self.device = q_positions.device

    @property
    def is_plain_causal(self) -> bool:
        """True when `is_causal=True` over the whole key sequence is the exact mask."""
        t = self.q_positions.shape[0]
        return self.padding_mask is None and self.causal and t == self.kv_len

    def needs_no_mask(self, sliding_window: int | None) -> bool:
        """True when causal masking aligned to the last key (what a function does with a None
        mask: `is_causal` when T > 1, nothing when T == 1) is exact: no padding, no window
        cutting in, and either no cache offset (T == S) or a single query (one decode step,
        which attends every key)."""
        t = self.q_positions.shape[0]
        return (
            self.padding_mask is None
            and self.causal
            and (t == self.kv_len or t == 1)
            and (sliding_window is None or self.kv_len <= sliding_window)
        )

    def bool_mask(self, sliding_window: int | None) -> torch.Tensor:
        """[B, 1, T, S] bool, True where attention is allowed."""
        k = torch.arange(self.kv_len, device=self.device)
        q = self.q_positions[:, None]
        allowed = torch.ones(q.shape[0], self.kv_len, dtype=torch.bool, device=self.device)
        if self.causal:
            allowed = k[None, :] <= q
            if sliding_window is not None:
                allowed = allowed & (k[None, :] > q - sliding_window)
        allowed = allowed[None, None]  # [1, 1, T, S]
        if self.padding_mask is not None:
            allowed = allowed & self.padding_mask[:, None, None, : self.kv_len]
        return allowed.expand(self.batch_size, 1, -1, -1)


def _all_real(padding_mask: torch.Tensor) -> bool:
    """True when the mask marks every token real. Inside `torch.func` transforms (vmap over
    inputs, per-example gradients) the mask is a wrapped tensor whose values Python cannot
    branch on, and while torch.compile traces, branching on them would break the graph (as
    Transformers' mask shortcuts, which also step aside when tracing); then say False and build
    the full mask, which gives the same result."""
    if torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(padding_mask):
        return False
    return bool(padding_mask.all())


def build_mask(kind: str, inputs: MaskInputs, sliding_window: int | None, dtype: torch.dtype):
    """The mask in the form `kind` wants (see `fmodel.attention.registry`)."""
    if kind == "padding":
        return inputs.padding_mask
    if kind == "block":
        return _block_mask(inputs, sliding_window)
    if kind == "bool":
        if inputs.needs_no_mask(sliding_window):
            return None
        if not inputs.causal and inputs.padding_mask is None:
            return None
        return inputs.bool_mask(sliding_window)
    allowed = inputs.bool_mask(sliding_window)
    zero = torch.zeros((), dtype=dtype, device=inputs.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def _block_mask(inputs: MaskInputs, sliding_window: int | None):
    from torch.nn.attention.flex_attention import create_block_mask

    padding = inputs.padding_mask
    q_positions = inputs.q_positions
    causal = inputs.causal

    def mask_mod(b, h, q_idx, kv_idx):
        q = q_positions[q_idx]
        allowed = kv_idx >= 0
        if causal:
            allowed = kv_idx <= q
            if sliding_window is not None:
                allowed = allowed & (kv_idx > q - sliding_window)
        if padding is not None:
            allowed = allowed & padding[b, kv_idx]
        return allowed

    batch = inputs.batch_size if padding is not None else None
    return create_block_mask(
        mask_mod, batch, None, q_positions.shape[0], inputs.kv_len, device=str(inputs.device)
    )
