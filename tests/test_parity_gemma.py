"""Parity with Transformers 4.57 for Gemma 2 (Gemma2ForCausalLM, Gemma2Model) and Gemma 3's
text decoder (Gemma3ForCausalLM, Gemma3TextModel).

Transformers builds tiny random models with every special feature on: attention and final-logit
soft-capping at values that change the logits, a sliding window (4) shorter than the sequences
(11 tokens, 7 + 8 generated), Gemma 3's mix of local and global layers with distinct rope bases
and a linear rope scaling on the global one, q/k norms, and norms perturbed away from zero.
Every fmodel attention implementation is compared with Transformers' eager attention: its sdpa
path silently drops Gemma 2's attention soft-capping (checked below), fmodel's does not. Logits
must agree to 1e-5 (float32) on the real positions of a batch padded on the left (row 0) and on
the right (row 1).
"""

from __future__ import annotations

import json

import pytest
import torch

import fmodel
from fmodel import facade
from fmodel.attention import builtin
from fmodel.errors import ArgumentTypeError, AttentionUnavailableError, ConfigError

from .conftest import padded_batch, requires_transformers, transformers
from .parity_helpers import (
    NEW,  # generated tokens: prompt 7 + 8 > window 4
    assert_bfloat16_matches,
    assert_logits_match,
    assert_same_grads,
    hf_generate,
    hf_logits,
    max_diff,
    prompts,
    reload_in_transformers,
    save_variants,
    training_grads,
)

pytestmark = requires_transformers

TOL = 1e-5
ATTENTIONS = ["eager", "sdpa", "flex_attention"]

TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    sliding_window=4,
    query_pre_attn_scalar=24,
    initializer_range=0.1,  # large enough that both soft-caps bend the numbers
    attn_logit_softcapping=1.0,
    final_logit_softcapping=5.0,
)
VARIANTS = {
    # Gemma 2's default layer_types: sliding, full, sliding, full
    "gemma2": ("Gemma2", {}),
    "gemma2-mqa-layer-types": (
        "Gemma2",
        {
            "num_key_value_heads": 1,
            "layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        },
    ),
    # sliding_window_pattern 2: local, global, local, global; the softcaps are set but Transformers'
    # Gemma 3 applies only the final one
    "gemma3": (
        "Gemma3",
        {
            "sliding_window_pattern": 2,
            "rope_theta": 500.0,
            "rope_local_base_freq": 20.0,
            "rope_scaling": {"rope_type": "linear", "factor": 2.0},
        },
    ),
}


def make_gemma(family: str, seed: int = 0, **overrides):
    if family == "Gemma2":
        config_cls, model_cls = transformers.Gemma2Config, transformers.Gemma2ForCausalLM
    else:
        config_cls, model_cls = transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**TINY, **overrides})).eval()
    with torch.no_grad():  # Gemma's norms start at zero ((1 + w) scales): move them
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def _hf(model):
    """Transformers' model on its eager attention, the reference (its sdpa drops Gemma 2's
    attention soft-cap)."""
    model.config._attn_implementation = "eager"
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{variant: (folder, Transformers model)}, each saved by Transformers."""
    return save_variants(
        tmp_path_factory,
        VARIANTS,
        lambda variant, seed: make_gemma(VARIANTS[variant][0], seed, **VARIANTS[variant][1]),
    )


# --------------------------------------------------------------------------- logits


@pytest.mark.parametrize("attn", ATTENTIONS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers_eager(saved, variant, attn):
    folder, hf_model = saved[variant]
    state = fmodel.load(folder, attn_implementation=attn)
    assert state.architecture == f"{VARIANTS[variant][0]}ForCausalLM"
    assert_logits_match(state, hf_model, TOL, hf_attn="eager")
    ids, _ = padded_batch(seq=11)
    unpadded = fmodel.forward(state, ids).logits
    assert max_diff(unpadded, hf_logits(hf_model, ids, None), None) <= TOL


def test_the_soft_caps_change_the_logits_and_transformers_sdpa_drops_gemma2s(saved):
    """Checks the tests above can fail: each soft-cap moves the logits by far more than TOL,
    and Transformers 4.57's Gemma 2 sdpa differs from its eager by the attention soft-cap
    (fmodel's sdpa gives eager's result; see above)."""
    folder, hf_model = saved["gemma2"]
    ids, mask = padded_batch(seq=11)
    eager = hf_logits(hf_model, ids, mask)
    assert max_diff(hf_logits(hf_model, ids, mask, "sdpa"), eager, mask) > 0.05
    state = fmodel.load(folder)
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):
        uncapped = state.replace(config=state.config.replace(**{field: None}))
        assert max_diff(fmodel.forward(uncapped, ids, attention_mask=mask).logits, eager, mask) > 0.05, field


def test_gemma3_ignores_attention_softcapping_as_transformers(saved):
    folder, hf_model = saved["gemma3"]
    state = fmodel.load(folder)
    assert state.config.attn_logit_softcapping == 1.0 and state.config.attention_softcap is None
    ids, mask = padded_batch(seq=11)
    uncapped = make_gemma("Gemma3", seed=2, **{**VARIANTS["gemma3"][1], "attn_logit_softcapping": None})
    assert torch.equal(hf_logits(uncapped, ids, mask), hf_logits(hf_model, ids, mask))


@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_base_model_hidden_states_and_attentions_match(saved, variant):
    folder, hf_model = saved[variant]
    family = VARIANTS[variant][0]
    base = fmodel.load(folder, architecture=f"{family}Model" if family == "Gemma2" else "Gemma3TextModel")
    ids, mask = padded_batch(seq=11)
    ours = fmodel.forward(base, ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        theirs = _hf(hf_model).model(
            input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True
        )
    assert max_diff(ours.last_hidden_state, theirs.last_hidden_state, mask) <= TOL
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 5
    for a, b in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        assert max_diff(a, b, mask) <= TOL
    keep = mask.bool()[:, None, :, None]
    for a, b in zip(ours.attentions, theirs.attentions, strict=True):
        assert ((a - b).abs() * keep).max().item() <= TOL


@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_inputs_embeds_are_scaled_as_transformers(saved, variant):
    """Gemma 2 scales a user's inputs_embeds by sqrt(hidden); Gemma 3 scales only token lookups."""
    folder, hf_model = saved[variant]
    state = fmodel.load(folder, attn_implementation="sdpa")
    ids, mask = padded_batch(seq=11)
    embeds = state.params["model.embed_tokens.weight"][ids]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ours = fmodel.forward(state, inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    with torch.no_grad():
        theirs = _hf(hf_model)(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    assert max_diff(ours, theirs, mask) <= TOL
    from_ids = fmodel.forward(state, ids, attention_mask=mask, position_ids=positions).logits
    scaled_equal = max_diff(from_ids, ours, mask) <= TOL
    assert scaled_equal == (variant == "gemma2")


@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_bfloat16_matches_transformers_bfloat16(saved, variant):
    folder, _ = saved[variant]
    assert_bfloat16_matches(folder, 2e-2, attn="eager")


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_greedy_generation_matches_transformers(saved, variant, attn):
    folder, hf_model = saved[variant]
    state = fmodel.load(folder, attn_implementation=attn)
    ids, mask = prompts()
    ours = fmodel.generate(state, ids, attention_mask=mask, max_new_tokens=NEW)
    theirs = hf_generate(hf_model, ids, mask, "eager", max_new_tokens=NEW, do_sample=False)
    assert torch.equal(ours, theirs)
    model = facade.AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn)
    assert type(model).__name__ == state.architecture
    with torch.no_grad():
        assert torch.equal(
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False), theirs
        )


def test_flex_generation_and_sampling_run(saved):
    folder, hf_model = saved["gemma3"]
    ids, mask = prompts()
    flex = fmodel.load(folder, attn_implementation="flex_attention")
    theirs = hf_generate(hf_model, ids, mask, "eager", max_new_tokens=4, do_sample=False)
    assert torch.equal(fmodel.generate(flex, ids, attention_mask=mask, max_new_tokens=4), theirs)
    state = fmodel.load(folder)
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, do_sample=True, top_k=20, temperature=0.9)
    a = fmodel.generate(state, ids, generator=torch.Generator().manual_seed(1), **kwargs)
    b = fmodel.generate(state, ids, generator=torch.Generator().manual_seed(1), **kwargs)
    assert a.shape == (2, 7 + NEW) and torch.equal(a, b) and torch.equal(a[:, :7], ids)
    assert int(a.max()) < 96


# --------------------------------------------------------------------------- save, facade, Auto


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fmodel_save_loads_in_transformers(saved, variant, tmp_path):
    folder, hf_model = saved[variant]
    state = fmodel.load(folder)
    reloaded = reload_in_transformers(state, tmp_path / "resaved", attn_implementation="eager")
    assert reloaded.config.tie_word_embeddings and state.config.tie_word_embeddings
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    ids, mask = padded_batch(seq=11)
    assert torch.equal(hf_logits(hf_model, ids, mask), hf_logits(reloaded.eval(), ids, mask))
    original = json.loads((folder / "config.json").read_text())
    again = json.loads((tmp_path / "resaved" / "config.json").read_text())
    for key in ("layer_types", "sliding_window", "attn_logit_softcapping", "final_logit_softcapping"):
        assert again[key] == original[key], key


@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_facade_auto_class_matches(saved, variant):
    folder, hf_model = saved[variant]
    model = facade.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
    family = VARIANTS[variant][0]
    assert type(model).__name__ == f"{family}ForCausalLM"
    assert model._no_split_modules == [f"{family}DecoderLayer"]
    # the same buffers (Gemma 3's embed_scale too), the same footprint
    theirs_buffers = dict(hf_model.named_buffers())
    ours_buffers = dict(model.named_buffers())
    assert sorted(ours_buffers) == sorted(theirs_buffers)
    assert all(torch.equal(ours_buffers[n], theirs_buffers[n]) for n in ours_buffers)
    assert model.get_memory_footprint() == hf_model.get_memory_footprint()
    ids, mask = padded_batch(seq=11)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
    assert max_diff(ours, hf_logits(hf_model, ids, mask), mask) <= TOL
    base = facade.AutoModel.from_pretrained(folder)
    assert type(base).__name__ == ("Gemma2Model" if family == "Gemma2" else "Gemma3TextModel")
    # Gemma 3's embedding module scales its lookups, Gemma 2's model scales what enters the
    # stack: either way the embedding module's output as inputs_embeds gives the ids' logits
    with torch.no_grad():
        looked_up = model.get_input_embeddings()(ids)
        assert torch.equal(looked_up, hf_model.get_input_embeddings()(ids))
        again = model(inputs_embeds=looked_up, attention_mask=mask).logits
    assert max_diff(again, ours, mask) <= TOL


@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_gradient_checkpointing_gives_the_same_gradients_as_transformers(saved, variant):
    folder, _ = saved[variant]
    family = VARIANTS[variant][0]
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(2))

    cls = getattr(facade, f"{family}ForCausalLM")
    plain, ckpt = (
        training_grads(cls.from_pretrained(folder), c, input_ids=ids, labels=ids) for c in (False, True)
    )
    theirs = training_grads(
        transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager"),
        False,
        input_ids=ids,
        labels=ids,
    )
    assert_same_grads(plain, ckpt)
    assert set(theirs) == set(plain)
    for name in plain:
        assert torch.allclose(plain[name], theirs[name], atol=1e-5), name


# --------------------------------------------------------------------------- transforms


def test_resize_matches_transformers_and_quantized_generation_runs(saved):
    folder, hf_model = saved["gemma2"]
    state = fmodel.load(folder)
    hf = make_gemma("Gemma2", seed=0)
    ours = fmodel.resize_token_embeddings(state, 101, pad_to_multiple_of=8, mean_resizing=False)
    hf.resize_token_embeddings(101, pad_to_multiple_of=8, mean_resizing=False)
    assert ours.config.vocab_size == hf.config.vocab_size == 104
    assert ours.params["lm_head.weight"] is ours.params["model.embed_tokens.weight"]
    ids, mask = padded_batch(seq=11)
    assert torch.equal(
        ours.params["model.embed_tokens.weight"][:96], hf.model.embed_tokens.weight[:96].detach()
    )
    # the new rows are fresh random draws in both; the old vocabulary's logits agree
    resized = fmodel.forward(ours, ids, attention_mask=mask).logits[..., :96]
    assert max_diff(resized, hf_logits(hf, ids, mask)[..., :96], mask) <= TOL
    q = fmodel.quantize(state, "int8")
    out = fmodel.generate(q, *prompts()[:1], attention_mask=prompts()[1], max_new_tokens=4)
    assert out.shape == (2, 11)
    near = fmodel.forward(q, ids, attention_mask=mask).logits
    assert max_diff(near, hf_logits(hf_model, ids, mask), mask) < 0.1


def test_init_zeroes_the_offset_norms_and_hf_init_matches_transformers():
    config = fmodel.Gemma3TextConfig(**{**TINY, "sliding_window_pattern": 2})
    state = fmodel.init(config, seed=0)
    norms = [n for n in state.params if n.endswith("norm.weight")]
    assert "model.layers.0.self_attn.q_norm.weight" in norms
    assert all(torch.count_nonzero(state.params[n]) == 0 for n in norms)
    torch.manual_seed(5)
    ours = fmodel.init(config, draw_order="transformers")
    torch.manual_seed(5)
    theirs = transformers.Gemma3ForCausalLM(
        transformers.Gemma3TextConfig(**{**TINY, "sliding_window_pattern": 2})
    )
    for name, p in theirs.state_dict().items():
        assert torch.equal(ours.params[name], p), name


@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_stack_states_and_vmap_forward(saved, variant):
    folder, hf_model = saved[variant]
    state = fmodel.load(folder)
    other = fmodel.replace_params(state, {n: t * 1.01 for n, t in state.unique_params().items()})
    stacked = fmodel.stack_states([state, other])
    ids, _ = padded_batch(seq=11)
    out = fmodel.vmap_forward(stacked, ids).logits
    assert max_diff(out[0], hf_logits(hf_model, ids, None), None) <= TOL
    assert max_diff(out[1], fmodel.forward(other, ids).logits, None) <= TOL


# --------------------------------------------------------------------------- attention functions


def test_a_function_without_softcap_is_refused_and_one_with_it_runs(saved):
    folder, hf_model = saved["gemma2"]
    state = fmodel.load(folder)
    ids, mask = padded_batch(seq=11)

    def swallows(module, query, key, value, attention_mask, **kwargs):
        return builtin.eager_attention(module, query, key, value, attention_mask, **kwargs)

    def honours(module, query, key, value, attention_mask, softcap=None, **kwargs):
        return builtin.eager_attention(module, query, key, value, attention_mask, softcap=softcap, **kwargs)

    fmodel.attention.register("test-gemma-swallows", swallows)
    fmodel.attention.register("test-gemma-honours", honours)
    try:
        with pytest.raises(AttentionUnavailableError, match="softcap"):
            fmodel.forward(state, ids, attention_mask=mask, attn_implementation="test-gemma-swallows")
        ours = fmodel.forward(
            state, ids, attention_mask=mask, attn_implementation="test-gemma-honours"
        ).logits
        assert max_diff(ours, hf_logits(hf_model, ids, mask), mask) <= TOL
        # Gemma 3 does not soft-cap its attention: any function runs
        gemma3 = fmodel.load(saved["gemma3"][0])
        fmodel.forward(gemma3, ids, attention_mask=mask, attn_implementation="test-gemma-swallows")
    finally:
        fmodel.attention.unregister("test-gemma-swallows")
        fmodel.attention.unregister("test-gemma-honours")
    with pytest.raises(ArgumentTypeError, match="takes no input 'token_type_ids'"):
        fmodel.forward(state, ids, token_type_ids=torch.zeros_like(ids))


def test_flash_passes_softcap_to_the_kernel_or_refuses():
    class Module:
        is_causal = True

    seen = {}

    def dense(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0):
        seen.update(softcap=softcap, window_size=window_size, softmax_scale=softmax_scale)
        return q

    def varlen(
        q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0
    ):
        seen.update(varlen_softcap=softcap)
        return q

    def old_dense(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1)):
        return q

    q = torch.randn(2, 4, 5, 8)
    builtin._flash(dense, varlen, Module(), q, q, q, None, 0.5, 0.0, 4, 2.5)
    assert seen == {"softcap": 2.5, "window_size": (3, 0), "softmax_scale": 0.5}
    builtin._flash(dense, varlen, Module(), q, q, q, torch.ones(2, 5, dtype=torch.long), 0.5, 0.0, None, 2.5)
    assert seen["varlen_softcap"] == 2.5
    seen.clear()
    builtin._flash(dense, varlen, Module(), q, q, q, None, 0.5, 0.0, None, None)
    assert seen["softcap"] == 0.0  # not passed: the kernel's default, no capping
    with pytest.raises(AttentionUnavailableError, match="softcap"):
        builtin._flash(old_dense, varlen, Module(), q, q, q, None, 0.5, 0.0, None, 2.5)
    assert builtin.takes_softcap(builtin.flash_attention) and builtin.takes_softcap(builtin.flash_attention_3)
    if "flash_attention_2" not in fmodel.attention.available():
        with pytest.raises(AttentionUnavailableError, match="cannot run here"):
            fmodel.attention.get("flash_attention_2")


# --------------------------------------------------------------------------- configs


def test_transformers_configs_round_trip_and_defaults(saved):
    for variant, (folder, hf_model) in saved.items():
        data = json.loads((folder / "config.json").read_text())
        config = fmodel.config_from_dict(data)
        assert config.to_diff_dict() == data, variant
        assert [config.layer_sliding_window(i) for i in range(4)] == [
            4 if t == "sliding_attention" else None for t in hf_model.config.layer_types
        ]
    for ours, theirs in (
        (fmodel.Gemma2Config(), transformers.Gemma2Config()),
        (fmodel.Gemma3TextConfig(), transformers.Gemma3TextConfig()),
    ):
        for key in (
            *GEMMA_FIELDS,
            "vocab_size",
            "max_position_embeddings",
            "rope_theta",
            "tie_word_embeddings",
        ):
            if hasattr(theirs, key):
                assert getattr(ours, key) == getattr(theirs, key), key
        assert [ours.layer_type(i) for i in range(ours.num_hidden_layers)] == theirs.layer_types
        assert "hidden_act" not in ours.to_dict()
    assert fmodel.Gemma3TextConfig().layer_rope(5) == "rotary_emb"
    assert fmodel.Gemma3TextConfig().layer_rope(0) == "rotary_emb_local"


GEMMA_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_activation",
    "rms_norm_eps",
    "pad_token_id",
    "eos_token_id",
    "bos_token_id",
    "attention_bias",
    "attention_dropout",
    "query_pre_attn_scalar",
    "sliding_window",
    "final_logit_softcapping",
    "attn_logit_softcapping",
    "rope_scaling",
    "rope_local_base_freq",
    "use_bidirectional_attention",
    "initializer_range",
)


@pytest.mark.parametrize(
    ("model_type", "changes", "pattern"),
    [
        (
            "gemma2",
            {"num_hidden_layers": 3, "layer_types": ["full_attention"] * 2},
            "'layer_types' has 2 entries",
        ),
        ("gemma2", {"layer_types": ["global"]}, "'layer_types' expected a list"),
        ("gemma2", {"attn_logit_softcapping": 0}, "'attn_logit_softcapping' must be a positive"),
        ("gemma2", {"final_logit_softcapping": -1.0}, "'final_logit_softcapping' must be a positive"),
        ("gemma2", {"query_pre_attn_scalar": 0}, "'query_pre_attn_scalar' must be a positive"),
        ("gemma2", {"hidden_activation": "gelu_fast"}, "'hidden_activation' is 'gelu_fast'"),
        ("gemma3_text", {"use_bidirectional_attention": True}, "causal decoder only"),
        ("gemma3_text", {"sliding_window_pattern": 0}, "'sliding_window_pattern' expected a positive"),
        ("gemma3_text", {"rope_local_base_freq": -5.0}, "'rope_local_base_freq' must be positive"),
        ("gemma3_text", {"head_dim": 2**20}, "'head_dim' is 1048576, beyond the bound"),
    ],
)
def test_bad_configs_are_named_errors(model_type, changes, pattern):
    with pytest.raises(ConfigError, match=pattern):
        fmodel.config_from_dict({"model_type": model_type, **changes})


def test_transformers5_rope_parameters_per_layer_type():
    data = {
        "model_type": "gemma3_text",
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    }
    config = fmodel.config_from_dict(data)
    assert config.rope_theta == 1e6 and config.rope_local_base_freq == 1e4
    assert config.rope_type == "linear" and config.local_rope_config().rope_type == "default"
    assert config.to_diff_dict() == data
    bad = {
        **data,
        "rope_parameters": {**data["rope_parameters"], "sliding_attention": {"rope_type": "linear"}},
    }
    with pytest.raises(ConfigError, match="sliding_attention"):
        fmodel.config_from_dict(bad)


def test_builtins_agree_with_eager_under_softcap_on_raw_tensors():
    """sdpa's and flex's soft-capped paths against eager: grouped heads, a padded bool mask, a
    None mask over a cache (T < S: causal aligned to the last key), and flex's softcap before
    another score_mod (a bias), as eager applies the cap before its additive mask."""

    class Module:
        num_key_value_groups, is_causal, training = 2, True, False

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 3, 8, generator=g) * 3
    k, v = torch.randn(2, 2, 5, 8, generator=g) * 3, torch.randn(2, 2, 5, 8, generator=g)
    allowed = torch.ones(2, 1, 3, 5, dtype=torch.bool).tril(diagonal=2)
    allowed[0, ..., :1] = False  # row 0 left-padded by one
    additive = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
    eager, _ = builtin.eager_attention(Module(), q, k, v, additive, scaling=0.3, softcap=1.5)
    plain, _ = builtin.eager_attention(Module(), q, k, v, additive, scaling=0.3)
    assert (eager - plain).abs().max() > 0.05
    sdpa, weights = builtin.sdpa_attention(Module(), q, k, v, allowed, scaling=0.3, softcap=1.5)
    assert weights is None and torch.allclose(sdpa, eager, atol=1e-6)
    causal = torch.where(
        torch.ones(3, 5, dtype=torch.bool).tril(diagonal=2), 0.0, torch.finfo(torch.float32).min
    )
    no_mask_eager, _ = builtin.eager_attention(
        Module(), q, k, v, causal[None, None], scaling=0.3, softcap=1.5
    )
    no_mask_sdpa, _ = builtin.sdpa_attention(Module(), q, k, v, None, scaling=0.3, softcap=1.5)
    assert torch.allclose(no_mask_sdpa, no_mask_eager, atol=1e-6)
    one_step, _ = builtin.sdpa_attention(Module(), q[:, :, -1:], k, v, None, scaling=0.3, softcap=1.5)
    assert torch.allclose(one_step, no_mask_eager[:, -1:], atol=1e-6)

    bias = torch.randn(4, 3, 5, generator=g)
    with_bias, _ = builtin.eager_attention(Module(), q, k, v, (causal + bias)[None], scaling=0.3, softcap=1.5)

    def add_bias(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx, kv_idx]

    from torch.nn.attention.flex_attention import create_block_mask

    block = create_block_mask(lambda b, h, qi, kv: kv <= qi + 2, None, None, 3, 5, device="cpu")
    flex, _ = builtin.flex_attention(Module(), q, k, v, block, scaling=0.3, score_mod=add_bias, softcap=1.5)
    assert torch.allclose(flex, with_bias, atol=1e-5)


def test_torch_compile_fullgraph_matches(saved):
    """The soft-cap check and Gemma 3's scaled embedding trace without a graph break."""
    ids, mask = padded_batch(seq=11)
    for variant in ("gemma2", "gemma3"):
        folder, hf_model = saved[variant]
        model = facade.AutoModelForCausalLM.from_pretrained(folder)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        with torch.no_grad():
            out = compiled(input_ids=ids, attention_mask=mask).logits
        assert max_diff(out, hf_logits(hf_model, ids, mask), mask) <= TOL
    torch._dynamo.reset()
