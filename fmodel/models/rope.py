"""Rotary position embeddings: inverse frequencies for each rope type, as Transformers computes them.

Pure functions of the config (and, for `dynamic` and `longrope`, of the sequence length). A
config with `partial_rotary_factor` < 1 (Phi-3) rotates only the first
`int(head_size * partial_rotary_factor)` features of each head; the rest pass through.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "apply_rotary",
    "longrope_original_length",
    "rope_inv_freq",
    "rotary_cos_sin",
    "rotary_dim",
    "rotary_tables",
    "rotate_half",
    "rotate_with_tables",
]


def _default(config, dim: int) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    return 1.0 / (config.rope_theta**exponents)


def rotary_dim(config) -> int:
    """The rotated width of each head: `int(head_size * partial_rotary_factor)` (Transformers'
    expression; the factor is 1 unless the config has one)."""
    return int(config.head_size * getattr(config, "partial_rotary_factor", 1.0))


def longrope_original_length(config) -> int:
    """The length past which `longrope` switches to its long factors: the config's top-level
    `original_max_position_embeddings` when it has one (Phi-3), else `max_position_embeddings`,
    as Transformers 4.57 reads it (it ignores a `rope_scaling["original_max_position_embeddings"]`)."""
    return getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings


def rope_inv_freq(config, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [ceil(rotary_dim / 2)] (float32, CPU) and the attention scaling for `config`.

    Arguments:
        config: a decoder config (`rope_theta`, `rope_scaling`, `head_size`, `max_position_embeddings`).
        seq_len: only for `dynamic` and `longrope`: the sequence length to scale for (None = the
            trained length; `longrope` uses its long factors only past `longrope_original_length`).
    """
    dim = rotary_dim(config)
    params = config.rope_scaling or {}
    rope_type = config.rope_type
    if rope_type == "default":
        return _default(config, dim), 1.0
    if rope_type == "longrope":
        return _longrope(config, dim, params, seq_len)
    factor = float(params["factor"])
    if rope_type == "linear":
        return _default(config, dim) / factor, 1.0
    if rope_type == "dynamic":
        max_pos = config.max_position_embeddings
        seq_len = max(seq_len or max_pos, max_pos)
        base = config.rope_theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
        return 1.0 / (base**exponents), 1.0
    if rope_type == "llama3":
        return _llama3(config, dim, params, factor), 1.0
    if rope_type == "yarn":
        return _yarn(config, dim, params, factor)
    raise ValueError(f"unknown rope type {rope_type!r}")  # configs validate this earlier


def _llama3(config, dim, params, factor) -> torch.Tensor:
    inv_freq = _default(config, dim)
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    old_len = params["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _longrope(config, dim, params, seq_len) -> tuple[torch.Tensor, float]:
    # Transformers' _compute_longrope_parameters: with a top-level original length (Phi-3) the
    # factor is max_position_embeddings / original, else rope_scaling's `factor`.
    original = getattr(config, "original_max_position_embeddings", None)
    if original:
        factor = config.max_position_embeddings / original
    else:
        original, factor = config.max_position_embeddings, params.get("factor")
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    long = seq_len is not None and seq_len > original
    ext_factors = torch.tensor(params["long_factor" if long else "short_factor"], dtype=torch.float32)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (ext_factors * config.rope_theta**exponents), float(attention_factor)


def _yarn(config, dim, params, factor) -> tuple[torch.Tensor, float]:
    base = config.rope_theta
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    original_max = params.get("original_max_position_embeddings") or config.max_position_embeddings

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(original_max / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero, as Transformers does
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def rotary_cos_sin(
    inv_freq: torch.Tensor, position_ids: torch.Tensor, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, D] for `position_ids` [B, T], computed in float32 and cast to `dtype`."""
    freqs = (
        position_ids[:, :, None].to(torch.float32) * inv_freq.to(torch.float32)[None, None, :]
    )  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scaling != 1.0:
        cos, sin = cos * scaling, sin * scaling
    return cos.to(dtype), sin.to(dtype)


def rotary_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What `rotate_with_tables` takes, from `rotary_cos_sin`'s [B, T, D]: cos [B, 1, T, D] and
    the signed sin [B, 1, T, D] (first half negated), computed once per forward for every layer."""
    half = sin.shape[-1] // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos[:, None], signed[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_with_tables(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor):
    """Rotate q [B, H, T, D] and k [B, H_kv, T, D] by the `rotary_tables` cos / signed sin
    [B, 1, T, R]: `x * cos + rotate_half(x) * sin`, as Transformers, bit for bit, in fewer
    operations per layer: `rotate_half(x) * sin == roll(x, R/2) * signed_sin` exactly, since
    negating a factor only flips the product's sign. With R < D (a partial rotary factor) only
    the first R features rotate and the rest pass through, as Transformers' Phi-3 does."""
    rot = cos.shape[-1]
    if rot < q.shape[-1]:
        q_rot, k_rot = rotate_with_tables(q[..., :rot], k[..., :rot], cos, signed_sin)
        return torch.cat((q_rot, q[..., rot:]), dim=-1), torch.cat((k_rot, k[..., rot:]), dim=-1)
    half = rot // 2
    return q * cos + q.roll(half, -1) * signed_sin, k * cos + k.roll(half, -1) * signed_sin


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q [B, H, T, D] and k [B, H_kv, T, D] by `rotary_cos_sin`'s cos/sin [B, T, D]
    (Transformers' `apply_rotary_pos_emb`). The models build the tables once per forward and
    call `rotate_with_tables` per layer."""
    return rotate_with_tables(q, k, *rotary_tables(cos, sin))
