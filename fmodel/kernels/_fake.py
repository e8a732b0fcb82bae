"""Shape functions ("fake" implementations) of the fmodel ops, so that torch.compile, torch.export
and AOTInductor can trace calls to them: each checks what the C++ op checks about shapes and
dtypes and returns an empty float32 tensor [..., N]. Also their gradients with respect to x
(below), so an input that requires grad (an adapter on a quantized base) gets one."""

from __future__ import annotations

import torch

from ..errors import InvalidArgumentError

__all__ = ["register"]

_registered = False


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise InvalidArgumentError(message)


def _out(x: torch.Tensor, n: int, op: str) -> torch.Tensor:
    _check(x.dtype == torch.float32, f"{op}: x must be float32, got {x.dtype}")
    return x.new_empty((*x.shape[:-1], n))


def _groups(k: int, group_size: int, op: str) -> int:
    _check(group_size >= 1, f"{op}: group_size must be >= 1, got {group_size}")
    return (k + group_size - 1) // group_size


def _scales(scale, zero, n: int, g: int, op: str) -> None:
    for name, t in (("scale", scale), ("zero", zero)):
        if t is not None:
            _check(
                t.dtype in (torch.float32, torch.float16)
                and t.dtype == scale.dtype
                and tuple(t.shape) == (n, g),
                f"{op}: {name} must be float32 or float16 (scale's dtype) [{n}, {g}], got {t.dtype} {tuple(t.shape)}",
            )


def _int4_linear(x, packed, scale, zero, group_size, act_int8):
    op = "fmodel::int4_linear"
    k = x.shape[-1]
    g = _groups(k, group_size, op)
    n = packed.shape[0]
    _check(
        packed.dtype == torch.uint8 and tuple(packed.shape) == (n, (k + 1) // 2),
        f"{op}: packed must be uint8 [out, ceil(in / 2)] for x of width {k}, got {packed.dtype} {tuple(packed.shape)}",
    )
    _scales(scale, zero, n, g, op)
    return _out(x, n, op)


def _int8_linear(x, q, scale, zero, group_size, act_int8):
    op = "fmodel::int8_linear"
    n, k = q.shape
    _check(q.dtype == torch.int8, f"{op}: q must be int8, got {q.dtype}")
    _check(x.shape[-1] == k, f"{op}: x must be [..., {k}] (the weight's in_features), got {tuple(x.shape)}")
    g = _groups(k, group_size, op)
    _scales(scale, zero, n, g, op)
    return _out(x, n, op)


def _dense_linear(x, weight):
    op = "fmodel::dense_linear"
    _check(
        weight.dtype in (torch.float32, torch.bfloat16),
        f"{op}: weight must be float32 or bfloat16, got {weight.dtype}",
    )
    n, k = weight.shape
    _check(x.shape[-1] == k, f"{op}: x must be [..., {k}] (the weight's in_features), got {tuple(x.shape)}")
    if x.dtype == torch.bfloat16:  # taken as it is; the product is float32 all the same
        return x.new_empty((*x.shape[:-1], n), dtype=torch.float32)
    return _out(x, n, op)


def _decode_attention(q, k, v, mask, scale):
    op = "fmodel::decode_attention"
    _check(
        q.dim() == 4 and k.dim() == 4 and v.dim() == 4 and mask.dim() == 4,
        f"{op}: q, k, v and mask must be 4-D",
    )
    _check(q.dtype in (torch.float32, torch.bfloat16), f"{op}: q must be float32 or bfloat16, got {q.dtype}")
    _check(k.dtype == q.dtype and v.dtype == q.dtype, f"{op}: k and v must have q's dtype ({q.dtype})")
    _check(mask.dtype == torch.bool, f"{op}: mask must be bool, got {mask.dtype}")
    b, h, _, d = q.shape
    _check(
        tuple(k.shape[:2]) == (b, h) and k.shape[3] == d and k.shape == v.shape,
        f"{op}: k and v must be [{b}, {h}, S, {d}] alike, got {tuple(k.shape)} and {tuple(v.shape)}",
    )
    return q.new_empty(q.shape).contiguous()


def _quantize_act(x):
    m, k = x.shape
    kb = (k + 31) // 32
    return x.new_empty((m, kb * 32), dtype=torch.int8), x.new_empty((m, kb))


def register() -> None:
    """Register the shape functions (once per process, after the extension is loaded)."""
    global _registered
    if _registered:
        return
    torch.library.register_fake("fmodel::int4_linear")(_int4_linear)
    torch.library.register_fake("fmodel::int8_linear")(_int8_linear)
    torch.library.register_fake("fmodel::dense_linear")(_dense_linear)
    torch.library.register_fake("fmodel::quantize_act")(_quantize_act)
    torch.library.register_fake("fmodel::decode_attention")(_decode_attention)
    register_autograd()
    _registered = True


# --------------------------------------------------------------------------- gradients
# d(x @ W.T)/dx = grad @ W for the dequantized W. With act_int8 this is the straight-through
# gradient: x's rounding to int8 is treated as the identity (its true derivative is 0 almost
# everywhere). No gradient reaches the quantized weights, scales or zeros (they are frozen).


def _expand(t: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """[N, G] per-group values -> [N, K] per column, float32."""
    return t.to(torch.float32).repeat_interleave(group_size, dim=1)[:, :k]


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, k: int, group_size: int):
    """The float32 weight [N, K] of int4_linear's arguments (torch ops only: traceable)."""
    q = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)[:, :k]
    return q.to(torch.float32) * _expand(scale, k, group_size) + _expand(zero, k, group_size)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int):
    """The float32 weight [N, K] of int8_linear's arguments."""
    k = q.shape[1]
    w = q.to(torch.float32) * _expand(scale, k, group_size)
    return w if zero is None else w + _expand(zero, k, group_size)


def _setup_int4(ctx, inputs, output):
    x, packed, scale, zero, group_size, _ = inputs
    ctx.save_for_backward(packed, scale, zero)
    ctx.k, ctx.group_size = x.shape[-1], group_size


def _backward_int4(ctx, grad):
    packed, scale, zero = ctx.saved_tensors
    w = dequantize_int4(packed, scale, zero, ctx.k, ctx.group_size)
    return grad @ w, None, None, None, None, None


def _setup_int8(ctx, inputs, output):
    _, q, scale, zero, group_size, _ = inputs
    ctx.save_for_backward(q, scale, *(() if zero is None else (zero,)))
    ctx.group_size = group_size


def _backward_int8(ctx, grad):
    q, scale, *zero = ctx.saved_tensors
    w = dequantize_int8(q, scale, zero[0] if zero else None, ctx.group_size)
    return grad @ w, None, None, None, None, None


def _setup_dense(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.x_dtype = inputs[0].dtype


def _backward_dense(ctx, grad):
    (weight,) = ctx.saved_tensors
    return (grad @ weight.to(torch.float32)).to(ctx.x_dtype), None


def register_autograd() -> None:
    torch.library.register_autograd("fmodel::int4_linear", _backward_int4, setup_context=_setup_int4)
    torch.library.register_autograd("fmodel::int8_linear", _backward_int8, setup_context=_setup_int8)
    torch.library.register_autograd("fmodel::dense_linear", _backward_dense, setup_context=_setup_dense)
