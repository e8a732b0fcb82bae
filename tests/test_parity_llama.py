"""Parity with Transformers for the Llama family (llama, qwen2, mistral).

Transformers builds a tiny random model and saves it; fmodel loads it; logits must agree to
1e-4 (float32) on every real (non-padding) position of a batch padded on the left (row 0)
and on the right (row 1). fmodel's own save must load back in Transformers with the same
logits. Outputs at padding positions are not compared: they depend on how each kernel
treats fully-masked rows and no caller reads them.
"""

from __future__ import annotations

import pytest
import torch

import fmodel

from .conftest import make_hf_model, padded_batch, requires_transformers
from .parity_helpers import (
    assert_bfloat16_matches,
    assert_logits_match,
    hf_logits,
    max_diff,
    reload_in_transformers,
    save_variants,
)

pytestmark = requires_transformers

TOL = 1e-4
ATTENTIONS = ["eager", "sdpa", "flex_attention"]

VARIANTS = {
    "llama-gqa": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    "llama-mqa-bias": ("llama", {"num_key_value_heads": 1, "attention_bias": True, "mlp_bias": True}),
    "llama-head-dim": ("llama", {"head_dim": 24}),
    "qwen2-bias": ("qwen2", {}),
    "qwen2-sliding-layers": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
    ),
    "mistral-sliding": ("mistral", {"sliding_window": 4}),
    "rope-linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    # max_position_embeddings below the input length makes dynamic scaling kick in
    "rope-dynamic": (
        "llama",
        {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings": 8},
    ),
    "rope-llama3": (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        },
    ),
    "rope-yarn": (
        "llama",
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}},
    ),
}


@pytest.fixture(scope="module")
def saved_variants(tmp_path_factory):
    """{variant: (folder, hf_model)} built once per module."""
    return save_variants(
        tmp_path_factory,
        VARIANTS,
        lambda variant, seed: make_hf_model(VARIANTS[variant][0], seed=seed, **VARIANTS[variant][1]),
    )


@pytest.mark.parametrize("attn", ATTENTIONS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(saved_variants, variant, attn):
    folder, hf_model = saved_variants[variant]
    state = fmodel.load(folder, attn_implementation=attn)
    assert_logits_match(state, hf_model, TOL)


@pytest.mark.parametrize("variant", ["llama-gqa", "qwen2-bias", "mistral-sliding"])
def test_unpadded_batch_matches_everywhere(saved_variants, variant):
    folder, hf_model = saved_variants[variant]
    state = fmodel.load(folder)
    ids, _ = padded_batch(seq=11)
    ours = fmodel.forward(state, ids).logits
    theirs = hf_logits(hf_model, ids, None, "sdpa")
    assert (ours - theirs).abs().max().item() <= TOL


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fmodel_save_loads_in_transformers(saved_variants, variant, tmp_path):
    folder, hf_model = saved_variants[variant]
    state = fmodel.load(folder)
    reloaded = reload_in_transformers(state, tmp_path / "resaved", attn_implementation="eager")
    ids, mask = padded_batch(seq=11)
    original = hf_logits(hf_model, ids, mask, "eager")
    again = hf_logits(reloaded.eval(), ids, mask, "eager")
    assert torch.equal(original, again)
    assert reloaded.config.tie_word_embeddings == state.config.tie_word_embeddings
    if state.config.tie_word_embeddings:
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


def test_hidden_states_and_attentions_match(saved_variants):
    folder, hf_model = saved_variants["llama-gqa"]
    state = fmodel.load(folder, attn_implementation="eager")
    ids, mask = padded_batch(seq=11)
    ours = fmodel.forward(state, ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    hf_model.config._attn_implementation = "eager"
    with torch.no_grad():
        theirs = hf_model(
            input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True
        )
    assert len(ours.hidden_states) == len(theirs.hidden_states) == hf_model.config.num_hidden_layers + 1
    for a, b in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        assert max_diff(a, b, mask) <= TOL
    keep = mask.bool()[:, None, :, None]  # compare attention rows of real query tokens
    for a, b in zip(ours.attentions, theirs.attentions, strict=True):
        assert ((a - b).abs() * keep).max().item() <= TOL


def test_sdpa_state_still_returns_attention_weights(saved_variants):
    folder, _ = saved_variants["llama-gqa"]
    state = fmodel.load(folder, attn_implementation="sdpa")
    ids, mask = padded_batch(seq=11)
    out = fmodel.forward(state, ids, attention_mask=mask, output_attentions=True)
    assert out.attentions is not None and out.attentions[0].shape == (2, 4, 11, 11)


def test_base_model_matches_transformers_base(saved_variants):
    folder, hf_model = saved_variants["qwen2-bias"]
    state = fmodel.load(folder, architecture="Qwen2Model")
    ids, mask = padded_batch(seq=11)
    ours = fmodel.forward(state, ids, attention_mask=mask)
    assert ours.logits is None
    with torch.no_grad():
        theirs = hf_model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert max_diff(ours.last_hidden_state, theirs, mask) <= TOL


def test_explicit_position_ids_and_inputs_embeds(saved_variants):
    folder, hf_model = saved_variants["llama-gqa"]
    state = fmodel.load(folder)
    ids, mask = padded_batch(seq=11)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    embeds = state.params["model.embed_tokens.weight"][ids]
    ours = fmodel.forward(state, inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    with torch.no_grad():
        theirs = hf_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    assert max_diff(ours, theirs, mask) <= TOL


def test_bfloat16_load_is_close_to_transformers_bfloat16(saved_variants):
    folder, _ = saved_variants["llama-gqa"]
    assert_bfloat16_matches(folder, 2e-2)
