"""Built-in attention functions: eager, sdpa, flex_attention, flash_attention_2/3.

All follow Transformers' attention-interface signature (see `registry`), so their numbers
match Transformers' functions of the same name.

Soft-capping (Gemma 2: `softcap=c` turns the scaled scores s into tanh(s / c) * c before the
mask) is honoured by every built-in: eager as Transformers' Gemma 2 eager, sdpa through the
same eager math (torch's kernel has no hook for it; Transformers 4.57's sdpa silently drops
it), flex_attention through a `score_mod`, flash_attention_2/3 by flash-attn's own `softcap`.
A model with soft-capping refuses an attention function that does not name a `softcap`
parameter (`require_softcap`), instead of letting `**kwargs` swallow it.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect

import torch
import torch.nn.functional as F

from ..errors import AttentionUnavailableError, InvalidArgumentError
from .registry import AttentionFunction, register

__all__ = [
    "eager_attention",
    "flash_attention",
    "flex_attention",
    "repeat_kv",
    "require_softcap",
    "sdpa_attention",
    "takes_softcap",
]


def takes_softcap(fn) -> bool:
    """True when `fn` names a `softcap` parameter (a function that only has `**kwargs` would
    receive it and could drop it unread, as Transformers' sdpa does)."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read (a C callable)
        return False
    param = parameters.get("softcap")
    return param is not None and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)


_cached_takes_softcap = functools.lru_cache(maxsize=64)(takes_softcap)


def _reads_softcap(fn) -> bool:
    """`takes_softcap`, the signature read once per function (this runs every forward step;
    while torch.compile traces, read directly: dynamo evaluates it once, at trace time)."""
    if torch.compiler.is_compiling():
        return takes_softcap(fn)
    try:
        return _cached_takes_softcap(fn)
    except TypeError:  # an unhashable callable
        return takes_softcap(fn)


def require_softcap(attn: AttentionFunction, model: str) -> None:
    """Refuse to run a soft-capped model (`model` names it) with an attention function that
    cannot honour `softcap`.

    Raises:
        AttentionUnavailableError: `attn.fn` has no `softcap` parameter.
    """
    if not _reads_softcap(attn.fn):
        raise AttentionUnavailableError(
            f"attention implementation {attn.name!r} cannot run {model}: the model soft-caps its "
            "attention scores (tanh(s / cap) * cap) and the function takes no 'softcap' argument; "
            "use eager, sdpa, flex_attention or flash_attention_2/3, or give the function a "
            "softcap parameter and apply it (see fmodel.attention.registry)"
        )


def _softcapped(scores: torch.Tensor, softcap: float) -> torch.Tensor:
    # Transformers' order of operations (Gemma 2's eager_attention_forward).
    return torch.tanh(scores / softcap) * softcap


def repeat_kv(hidden: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, H_kv, S, D] -> [B, H_kv * n_rep, S, D], each key/value head repeated for its query group."""
    if n_rep == 1:
        return hidden
    b, h_kv, s, d = hidden.shape
    return hidden[:, :, None].expand(b, h_kv, n_rep, s, d).reshape(b, h_kv * n_rep, s, d)


def eager_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    dropout=0.0,
    head_mask=None,
    softcap=None,
    **kwargs,
):
    """Matmul-softmax-matmul attention; returns the attention weights too. Mask: additive.
    `head_mask` ([B|1, H, T|1, S|1]) multiplies the weights after dropout, as Transformers.
    `softcap`: the scaled scores become tanh(s / softcap) * softcap before the mask."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # [B, H, T, S]
    if softcap is not None:
        weights = _softcapped(weights, softcap)
    if attention_mask is not None:
        weights = weights + attention_mask[:, :, :, : key.shape[-2]]
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    if head_mask is not None:
        weights = weights * head_mask
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # [B, T, H, D]
    return output, weights


def sdpa_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    dropout=0.0,
    is_causal=None,
    softcap=None,
    **kwargs,
):
    """`torch.nn.functional.scaled_dot_product_attention`. Mask: bool, or None for plain causal.

    With `softcap` (which torch's kernel cannot apply) the call runs the eager math on the
    same mask and returns no weights, so its result is eager's."""
    if softcap is not None:
        return _sdpa_by_eager(module, query, key, value, attention_mask, scaling, dropout, is_causal, softcap)
    extra = {}
    groups = getattr(module, "num_key_value_groups", 1)
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    if groups > 1:
        if attention_mask is None:
            extra["enable_gqa"] = True
        elif not is_causal:
            return _sdpa_grouped(query, key, value, attention_mask, groups, scaling, dropout), None
        else:
            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if is_causal is None:
        is_causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True)
    if not is_causal and _decode_kernel_ok(query, key, value, attention_mask, dropout, query.shape[2]):
        output = _decode_kernels().decode_attention(query, key, value, attention_mask, _scale(query, scaling))
        return output.transpose(1, 2).contiguous(), None
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


# Query rows per key/value head (the grouped heads of one position) up to which a decode step's
# attention runs `fmodel.kernels`' decode_attention (one pass over the cache for all the rows)
# instead of torch's flash kernel, whose blocking is for long queries: ~5 us a call against ~20
# on SmolLM2's decode step.
DECODE_KERNEL_MAX_ROWS = 64


def _decode_kernels():
    from ..models.cpu_kernels import fmodel_kernels

    return fmodel_kernels()


def _decode_kernel_ok(query, key, value, mask, dropout, positions: int) -> bool:
    """`fmodel.kernels.decode_attention` may stand in for sdpa: one query position (a decode
    step; longer inputs keep torch's kernel, which rounds a bfloat16 prefill at Transformers'
    steps), a bool mask, no dropout, a few query rows, float32 or bfloat16 CPU tensors alike,
    no gradient wanted (eagerly: plain tensors; traced: a CPU input), the extension loaded."""
    if (
        positions != 1
        or mask is None
        or mask.dtype != torch.bool
        or dropout
        or query.shape[2] > DECODE_KERNEL_MAX_ROWS
        or query.dtype not in (torch.float32, torch.bfloat16)
        or key.dtype != query.dtype
        or value.dtype != query.dtype
        or mask.dim() != 4
    ):
        return False
    from ..models.cpu_kernels import fast_path_ok, traced_input_ok

    if torch.compiler.is_compiling():
        ok = traced_input_ok(query) and not (key.requires_grad or value.requires_grad)
    else:
        ok = fast_path_ok(query, key, value, mask) and not (
            torch.is_grad_enabled() and (key.requires_grad or value.requires_grad)
        )
    return ok and _decode_kernels() is not None


def _scale(query: torch.Tensor, scaling) -> float:
    return float(scaling) if scaling is not None else query.shape[-1] ** -0.5


def _sdpa_grouped(query, key, value, mask, groups: int, scaling, dropout) -> torch.Tensor:
    """sdpa with a mask for grouped-query attention, without repeating the keys and values: the
    `groups` query heads of each key/value head are folded into its query rows ([B, H, T, D] ->
    [B, H_kv, groups * T, D]; rows are independent, so this is the same attention). A decode step
    would otherwise copy the whole cache per layer (repeat_kv). Returns [B, T, H, D]."""
    b, h, t, d = query.shape
    kv, s = key.shape[1], key.shape[-2]
    q = query.reshape(b, kv, groups * t, d)
    mb, mh = mask.shape[0], mask.shape[1]
    if mh == 1:  # one mask for every head: the same rows for each folded head
        mask = mask[:, :, None].expand(mb, 1, groups, t, s).reshape(mb, 1, groups * t, s)
    else:  # a mask per query head [B, H, T, S]
        mask = mask.expand(mb, h, t, s).reshape(mb, kv, groups * t, s)
    if _decode_kernel_ok(q, key, value, mask, dropout, t):
        out = _decode_kernels().decode_attention(q, key, value, mask, _scale(query, scaling))
    else:
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.reshape(b, h, t, out.shape[-1]).transpose(1, 2).contiguous()


def _sdpa_by_eager(module, query, key, value, attention_mask, scaling, dropout, is_causal, softcap):
    t, s = query.shape[2], key.shape[2]
    if attention_mask is None:  # sdpa's reading of None: causal aligned to the last key when T > 1
        if is_causal is None:
            is_causal = t > 1 and getattr(module, "is_causal", True)
        if is_causal:
            q = torch.arange(s - t, s, device=query.device)[:, None]
            attention_mask = (torch.arange(s, device=query.device)[None, :] <= q)[None, None]
    additive = None
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            zero = torch.zeros((), dtype=query.dtype, device=query.device)
            additive = torch.where(attention_mask, zero, torch.finfo(query.dtype).min)
        else:  # an additive float mask, as torch's sdpa also takes
            additive = attention_mask
    output, _ = eager_attention(
        module, query, key, value, additive, scaling=scaling, dropout=dropout, softcap=softcap
    )
    return output, None


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention as _flex

    return torch.compile(_flex, dynamic=False)


def flex_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    dropout=0.0,
    score_mod=None,
    softcap=None,
    **kwargs,
):
    """torch's FlexAttention with a BlockMask (runs on CPU too). Mask: block (or None);
    `score_mod` (flex's `(score, b, h, q_idx, kv_idx) -> score`) carries an additive bias;
    `softcap` caps the scaled scores first (as eager, where the mask and bias come after)."""
    from torch.nn.attention.flex_attention import flex_attention as _flex

    if dropout > 0:
        raise InvalidArgumentError(
            "flex_attention does not support dropout; use eager or sdpa for training with dropout"
        )
    groups = getattr(module, "num_key_value_groups", 1)
    # Compiled, flex fuses the mask into its kernel; uncompiled it materialises the scores.
    # On CPU the uncompiled path is kept: compiling costs seconds per new shape.
    kernel = _compiled_flex() if query.is_cuda else _flex
    if softcap is not None:
        score_mod = _softcap_score_mod(softcap, score_mod)
    output = kernel(
        query,
        key,
        value,
        score_mod=score_mod,
        block_mask=attention_mask,
        scale=scaling,
        enable_gqa=groups > 1,
    )
    return output.transpose(1, 2).contiguous(), None


def _softcap_score_mod(softcap: float, then=None):
    """flex's score_mod for soft-capping, followed by `then` (another score_mod) if given."""
    if then is None:
        return _plain_softcap_mod(softcap)

    def softcap_then(score, b, h, q_idx, kv_idx):
        return then(torch.tanh(score / softcap) * softcap, b, h, q_idx, kv_idx)

    return softcap_then


@functools.lru_cache(maxsize=64)
def _plain_softcap_mod(softcap: float):
    # One function object per cap, so compiled flex (CUDA) sees the same score_mod every call.
    def softcap_mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / softcap) * softcap

    return softcap_mod


def _flash_check(package: str, label: str):
    def check() -> str | None:
        if importlib.util.find_spec(package) is None:
            return f"the package {package!r} is not installed (pip install {label})"
        if not torch.cuda.is_available():
            return "it needs a CUDA GPU and none is available"
        return None

    return check


def _flash_attention_kernels():
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    return flash_attn_func, flash_attn_varlen_func


def _flash_attention_3_kernels():
    from flash_attn_interface import flash_attn_func, flash_attn_varlen_func

    return flash_attn_func, flash_attn_varlen_func


def _flash_entry(name: str, kernels, takes_dropout: bool, doc: str):
    """An attention function over a flash-attn build: `kernels()` imports its dense and varlen
    kernels (at call time: the package is optional); without `takes_dropout` the `dropout`
    argument is accepted and not used (FlashAttention 3's kernels have no dropout)."""

    def entry(
        module,
        query,
        key,
        value,
        attention_mask,
        scaling=None,
        dropout=0.0,
        sliding_window=None,
        softcap=None,
        **kwargs,
    ):
        dense, varlen = kernels()
        return _flash(
            dense,
            varlen,
            module,
            query,
            key,
            value,
            attention_mask,
            scaling,
            dropout if takes_dropout else 0.0,
            sliding_window,
            softcap,
        )

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = doc
    return entry


flash_attention = _flash_entry(
    "flash_attention",
    _flash_attention_kernels,
    takes_dropout=True,
    doc="""FlashAttention 2 (`flash_attn`) on CUDA. Mask: padding ([B, S] or None).

    Padded batches go through the varlen kernel with the padding removed. `softcap` goes to
    flash-attn's own `softcap` (flash-attn >= 2.6).
    """,
)
flash_attention_3 = _flash_entry(
    "flash_attention_3",
    _flash_attention_3_kernels,
    takes_dropout=False,
    doc="""FlashAttention 3 (`flash_attn_interface`, Hopper GPUs). Mask: padding. `softcap` as
    FlashAttention 2's; `dropout` is not applied (its kernels take none).""",
)


def _flash(dense, varlen, module, query, key, value, padding, scaling, dropout, sliding_window, softcap):
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # [B, T, H, D]
    causal = getattr(module, "is_causal", True)
    window = (sliding_window - 1, 0) if sliding_window is not None else (-1, -1)
    kwargs = {"softmax_scale": scaling, "causal": causal, "window_size": window}
    if dropout:
        kwargs["dropout_p"] = dropout
    if softcap is not None:
        for kernel in (dense, varlen):
            if not _reads_softcap(kernel):
                raise AttentionUnavailableError(
                    f"the installed {kernel.__module__}.{kernel.__name__} takes no 'softcap' "
                    "(flash-attn >= 2.6 does); this model soft-caps its attention scores"
                )
        kwargs["softcap"] = softcap
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
