"""Rotary embeddings: the per-layer fast form equals Transformers' formula bit for bit."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fmodel.models.rope import apply_rotary, rotary_cos_sin, rotary_tables, rotate_half, rotate_with_tables

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 4),
    kv_heads=st.integers(1, 2),
    length=st.integers(1, 9),
    half=st.integers(1, 8),
    start=st.integers(0, 5000),
    scaling=st.sampled_from([1.0, 0.5, 1.3]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_apply_rotary_is_transformers_formula_bit_for_bit(
    batch, heads, kv_heads, length, half, start, scaling, dtype, seed
):
    gen = torch.Generator().manual_seed(seed)
    dim = 2 * half
    q = (torch.randn(batch, heads, length, dim, generator=gen) * 3).to(dtype)
    k = (torch.randn(batch, kv_heads, length, dim, generator=gen) * 3).to(dtype)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    positions = torch.arange(start, start + length)[None].expand(batch, length)
    cos, sin = rotary_cos_sin(inv_freq, positions, scaling, dtype)  # [B, T, D]

    q_rot, k_rot = rotate_with_tables(q, k, *rotary_tables(cos, sin))

    c, s = cos[:, None], sin[:, None]  # Transformers' apply_rotary_pos_emb
    assert torch.equal(q_rot, q * c + rotate_half(q) * s)
    assert torch.equal(k_rot, k * c + rotate_half(k) * s)
    assert q_rot.dtype == dtype and k_rot.shape == k.shape
    q_plain, k_plain = apply_rotary(q, k, cos, sin)  # the [B, T, D] form keeps its meaning
    assert torch.equal(q_plain, q_rot) and torch.equal(k_plain, k_rot)


def test_rotary_tables_leave_their_inputs_alone():
    cos, sin = torch.rand(1, 3, 8), torch.rand(1, 3, 8)
    before = (cos.clone(), sin.clone(), cos._version, sin._version)
    rotary_tables(cos, sin)
    assert torch.equal(cos, before[0]) and torch.equal(sin, before[1])
    assert (cos._version, sin._version) == before[2:]
