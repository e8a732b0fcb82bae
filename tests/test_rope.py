"""Rotary embeddings: the per-layer fast form equals Transformers' formula bit for bit."""

from __future__ import annotations

import pytest
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


# --------------------------------------------------------------------------- longrope, partial rotary


def _phi3(**overrides):
    import fmodel

    data = dict(
        model_type="phi3",
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=64,
        original_max_position_embeddings=8,
        partial_rotary_factor=0.5,
        pad_token_id=0,
        rope_scaling={
            "type": "longrope",
            "short_factor": [1.0, 1.5, 2.0, 3.0],
            "long_factor": [2.0, 4.0, 8.0, 16.0],
        },
    )
    data.update(overrides)
    return fmodel.config_from_dict(data)


LONGROPE_CONFIGS = {
    # Phi-3: the factor is max / original (64 / 8), the attention factor sqrt(1 + ln 8 / ln 8)
    "phi3-partial": ("phi3", {}),
    "phi3-full-rotary": (
        "phi3",
        dict(
            partial_rotary_factor=1.0,
            rope_scaling={
                "type": "longrope",
                "short_factor": [1.0 + i / 8 for i in range(8)],
                "long_factor": [2.0**i for i in range(8)],
            },
        ),
    ),
    "phi3-short-context": ("phi3", dict(max_position_embeddings=8)),  # factor 1: attention factor 1
    # Llama: no top-level original length, so rope_scaling's `factor` and max_position_embeddings
    "llama-factor": (
        "llama",
        dict(
            rope_scaling={
                "rope_type": "longrope",
                "short_factor": [1.0] * 8,
                "long_factor": [1.0 + i for i in range(8)],
                "factor": 4.0,
            }
        ),
    ),
    "llama-attention-factor": (
        "llama",
        dict(
            rope_scaling={
                "rope_type": "longrope",
                "short_factor": [1.0] * 8,
                "long_factor": [3.0] * 8,
                "factor": 4.0,
                "attention_factor": 0.75,
            }
        ),
    ),
}


def _configs(name):
    from .conftest import transformers

    model_type, overrides = LONGROPE_CONFIGS[name]
    if model_type == "phi3":
        ours = _phi3(**overrides)
    else:
        import fmodel

        ours = fmodel.config_from_dict(
            dict(
                model_type="llama",
                hidden_size=64,
                num_attention_heads=4,
                max_position_embeddings=8,
                **overrides,
            )
        )
    data = ours.to_diff_dict()  # what config.json holds
    data.pop("model_type")
    theirs = (transformers.Phi3Config if model_type == "phi3" else transformers.LlamaConfig)(**data)
    return ours, theirs


@pytest.mark.parametrize("name", list(LONGROPE_CONFIGS))
def test_longrope_frequencies_and_scaling_are_transformers(name):
    pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from fmodel.models.rope import longrope_original_length, rope_inv_freq

    ours, theirs = _configs(name)
    original = longrope_original_length(ours)
    assert original == getattr(theirs, "original_max_position_embeddings", theirs.max_position_embeddings)
    for seq_len in (None, 1, original, original + 1, 10 * original):
        inv, scale = rope_inv_freq(ours, seq_len)
        ref_inv, ref_scale = ROPE_INIT_FUNCTIONS["longrope"](theirs, None, seq_len=seq_len)
        assert torch.equal(inv, ref_inv), seq_len
        assert scale == ref_scale, seq_len
    short, long = rope_inv_freq(ours, original)[0], rope_inv_freq(ours, original + 1)[0]
    assert not torch.equal(short, long)


def test_llama_longrope_logits_match_transformers_below_and_past_the_switch(tmp_path):
    """The generic decoder path (no top-level original length): Transformers switches past
    max_position_embeddings (8)."""
    import fmodel

    from .conftest import make_hf_model, padded_batch

    rope = {
        "rope_type": "longrope",
        "short_factor": [1.0 + i / 4 for i in range(8)],
        "long_factor": [2.0**i for i in range(8)],
        "factor": 4.0,
    }
    hf = make_hf_model("llama", num_attention_heads=4, max_position_embeddings=8, rope_scaling=rope)
    hf.save_pretrained(tmp_path)
    state = fmodel.load(tmp_path)
    for seq in (7, 11):
        ids, mask = padded_batch(seq=seq)
        with torch.no_grad():
            theirs = hf(input_ids=ids, attention_mask=mask).logits
        ours = fmodel.forward(state, ids, attention_mask=mask).logits
        keep = mask.bool()
        assert (ours[keep] - theirs[keep]).abs().max().item() <= 1e-5, seq


@settings(max_examples=30, deadline=None)
@given(
    half=st.integers(1, 8),
    rotated_pairs=st.integers(0, 8),
    length=st.integers(1, 6),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_partial_rotation_is_transformers_phi3_bit_for_bit(half, rotated_pairs, length, dtype, seed):
    """Only the first R = 2 * len(inv_freq) features rotate; the rest pass through."""
    pytest.importorskip("transformers")
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    rotated_pairs = min(rotated_pairs, half)
    dim, rot = 2 * half, 2 * rotated_pairs
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(2, 4, length, dim, generator=gen) * 3).to(dtype)
    k = (torch.randn(2, 2, length, dim, generator=gen) * 3).to(dtype)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rot, 2, dtype=torch.float32) / max(rot, 1)))
    positions = torch.arange(3, 3 + length)[None].expand(2, length)
    cos, sin = rotary_cos_sin(inv_freq, positions, 1.25, dtype)  # [B, T, R]
    q_rot, k_rot = rotate_with_tables(q, k, *rotary_tables(cos, sin))
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(q_rot, q_ref) and torch.equal(k_rot, k_ref)
    assert torch.equal(q_rot[..., rot:], q[..., rot:])


BAD_PHI3 = {
    "short-factor-length": (
        dict(rope_scaling={"type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 4}),
        r"'rope_scaling.short_factor': a list of 4 positive numbers",
    ),
    "long-factor-negative": (
        dict(
            rope_scaling={"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0, -2.0, 1.0, 1.0]}
        ),
        r"'rope_scaling.long_factor'",
    ),
    "long-factor-missing": (
        dict(rope_scaling={"type": "longrope", "short_factor": [1.0] * 4}),
        r"'rope_scaling.long_factor'.*got None",
    ),
    "factor-strings": (
        dict(rope_scaling={"type": "longrope", "short_factor": ["1"] * 4, "long_factor": [1.0] * 4}),
        r"'rope_scaling.short_factor'",
    ),
    "not-longrope": (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), r"type must be 'longrope'"),
    "unknown-key": (
        dict(
            rope_scaling={"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0] * 4, "low": 1}
        ),
        r"unknown key\(s\) \['low'\]",
    ),
    "inner-original-differs": (
        dict(
            rope_scaling={
                "type": "longrope",
                "short_factor": [1.0] * 4,
                "long_factor": [1.0] * 4,
                "original_max_position_embeddings": 16,
            }
        ),
        r"differs from the top-level 'original_max_position_embeddings' \(8\)",
    ),
    "no-original": (
        dict(original_max_position_embeddings=None),
        r"needs field 'original_max_position_embeddings'",
    ),
    "attention-factor-zero": (
        dict(
            rope_scaling={
                "type": "longrope",
                "short_factor": [1.0] * 4,
                "long_factor": [1.0] * 4,
                "attention_factor": 0,
            }
        ),
        r"'rope_scaling.attention_factor' must be a positive number",
    ),
    "partial-zero": (
        dict(partial_rotary_factor=0.0, rope_scaling=None),
        r"'partial_rotary_factor' must be in \(0, 1\]",
    ),
    "partial-above-one": (dict(partial_rotary_factor=1.5, rope_scaling=None), r"'partial_rotary_factor'"),
    "dropout": (dict(resid_pdrop=1.5), r"'resid_pdrop' is a probability"),
}


@pytest.mark.parametrize("case", list(BAD_PHI3))
def test_bad_phi3_rope_configs_are_named_config_errors(case):
    from fmodel.errors import ConfigError

    overrides, message = BAD_PHI3[case]
    with pytest.raises(ConfigError, match=message):
        _phi3(**overrides)


def test_phi3_rope_spellings():
    """Legacy "su" / "yarn" types are longrope (Transformers' Phi3Config renames them); the
    Transformers 5 spelling (`rope_parameters` with `rope_type`) loads and writes back."""
    factors = {"short_factor": [1.0] * 4, "long_factor": [2.0] * 4}
    for legacy in ("su", "yarn"):
        config = _phi3(rope_scaling={"type": legacy, **factors})
        assert config.rope_type == "longrope"
        assert config.to_diff_dict()["rope_scaling"]["type"] == legacy
    import fmodel

    data = _phi3().to_diff_dict()
    data.pop("rope_scaling")
    data["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 500.0, **factors}
    config = fmodel.config_from_dict(data)
    assert (config.rope_type, config.rope_theta) == ("longrope", 500.0)
    assert config.to_diff_dict()["rope_parameters"] == data["rope_parameters"]
    assert _phi3(rope_scaling=None).rope_type == "default"


def test_llama_longrope_refuses_an_original_length_transformers_would_ignore_or_read_alone():
    import fmodel
    from fmodel.errors import ConfigError

    rope = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    base = dict(model_type="llama", hidden_size=64, num_attention_heads=4)
    with pytest.raises(ConfigError, match=r"needs a positive number in field 'rope_scaling.factor'"):
        fmodel.config_from_dict({**base, "rope_scaling": rope})
    for extra in (
        {"rope_scaling": {**rope, "factor": 2.0, "original_max_position_embeddings": 16}},
        {"rope_scaling": {**rope, "factor": 2.0}, "original_max_position_embeddings": 16},
    ):
        with pytest.raises(ConfigError, match="original_max_position_embeddings"):
            fmodel.config_from_dict({**base, **extra})
