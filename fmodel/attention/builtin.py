"""Built-in attention functions: eager, sdpa, flex_attention, flash_attention_2/3.

All follow Transformers' attention-interface signature (see `registry`), so their numbers
match Transformers' functions of the same name.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError
from .registry import register

__all__ = ["eager_attention", "flash_attention", "flex_attention", "repeat_kv", "sdpa_attention"]


def repeat_kv(hidden: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, H_kv, S, D] -> [B, H_kv * n_rep, S, D], each key/value head repeated for its query group."""
    if n_rep == 1:
        return hidden
    b, h_kv, s, d = hidden.shape
    return hidden[:, :, None].expand(b, h_kv, n_rep, s, d).reshape(b, h_kv * n_rep, s, d)


def eager_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, head_mask=None, **kwargs
):
    """Matmul-softmax-matmul attention; returns the attention weights too. Mask: additive.
    `head_mask` ([B|1, H, T|1, S|1]) multiplies the weights after dropout, as Transformers."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # [B, H, T, S]
    if attention_mask is not None:
        weights = weights + attention_mask[:, :, :, : key.shape[-2]]
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    if head_mask is not None:
        weights = weights * head_mask
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # [B, T, H, D]
    return output, weights


def sdpa_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, is_causal=None, **kwargs
):
    """`torch.nn.functional.scaled_dot_product_attention`. Mask: bool, or None for plain causal."""
    extra = {}
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        if attention_mask is None:
            extra["enable_gqa"] = True
        else:
            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    if is_causal is None:
        is_causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True)
    output = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=is_causal,
        **extra,
    )
    return output.transpose(1, 2).contiguous(), None


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention as _flex

    return torch.compile(_flex, dynamic=False)


def flex_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, score_mod=None, **kwargs
):
    """torch's FlexAttention with a BlockMask (runs on CPU too). Mask: block (or None);
    `score_mod` (flex's `(score, b, h, q_idx, kv_idx) -> score`) carries an additive bias."""
    from torch.nn.attention.flex_attention import flex_attention as _flex

    if dropout > 0:
        raise InvalidArgumentError(
            "flex_attention does not support dropout; use eager or sdpa for training with dropout"
        )
    groups = getattr(module, "num_key_value_groups", 1)
    # Compiled, flex fuses the mask into its kernel; uncompiled it materialises the scores.
    # On CPU the uncompiled path is kept: compiling costs seconds per new shape.
    kernel = _compiled_flex() if query.is_cuda else _flex
    output = kernel(
        query, key, value, score_mod=score_mod, block_mask=attention_mask, scale=scaling, enable_gqa=groups > 1
    )
    return output.transpose(1, 2).contiguous(), None


def _flash_check(package: str, label: str):
    def check() -> str | None:
        if importlib.util.find_spec(package) is None:
            return f"the package {package!r} is not installed (pip install {label})"
        if not torch.cuda.is_available():
            return "it needs a CUDA GPU and none is available"
        return None

    return check


def flash_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, **kwargs
):
    """FlashAttention 2 (`flash_attn`) on CUDA. Mask: padding ([B, S] or None).

    Padded batches go through the varlen kernel with the padding removed.
    """
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    return _flash(
        flash_attn_func,
        flash_attn_varlen_func,
        module,
        query,
        key,
        value,
        attention_mask,
        scaling,
        dropout,
        sliding_window,
    )


def flash_attention_3(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, **kwargs
):
    """FlashAttention 3 (`flash_attn_interface`, Hopper GPUs). Mask: padding."""
    from flash_attn_interface import flash_attn_func, flash_attn_varlen_func

    return _flash(
        flash_attn_func,
        flash_attn_varlen_func,
        module,
        query,
        key,
        value,
        attention_mask,
        scaling,
        0.0,
        sliding_window,
    )


def _flash(dense, varlen, module, query, key, value, padding, scaling, dropout, sliding_window):
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # [B, T, H, D]
    causal = getattr(module, "is_causal", True)
    window = (sliding_window - 1, 0) if sliding_window is not None else (-1, -1)
    kwargs = {"softmax_scale": scaling, "causal": causal, "window_size": window}
    if dropout:
        kwargs["dropout_p"] = dropout
    if padding is None:
        return dense(q, k, v, **kwargs), None
    b, t = q.shape[:2]
    s = k.shape[1]
    kv_keep = padding[:, :s].bool()
    q_keep = kv_keep[:, s - t :]  # queries are the last t positions
    cu_k = F.pad(kv_keep.sum(1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
    cu_q = F.pad(q_keep.sum(1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
    out = varlen(
        q[q_keep],
        k[kv_keep],
        v[kv_keep],
        cu_q,
        cu_k,
        int(q_keep.sum(1).max()),
        int(kv_keep.sum(1).max()),
        **kwargs,
    )
    if isinstance(out, tuple):
        out = out[0]
    full = q.new_zeros(b, t, q.shape[2], q.shape[3])
    full[q_keep] = out
    return full, None


register("eager", eager_attention, mask_kind="additive")
register("sdpa", sdpa_attention, mask_kind="bool")
register("flex_attention", flex_attention, mask_kind="block")
register(
    "flash_attention_2", flash_attention, mask_kind="padding", check=_flash_check("flash_attn", "flash-attn")
)
register(
    "flash_attention_3",
    flash_attention_3,
    mask_kind="padding",
    check=_flash_check(
        "flash_attn_interface", "flash-attn-3 (build from hopper/ in the flash-attention repo)"
    ),
)
