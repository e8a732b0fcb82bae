"""Parity with Transformers 4.57 for Qwen3, OLMo and OLMo 2.

Transformers builds each tiny random model with its family's features switched on and saves
it; fmodel loads it. Qwen3: q/k RMSNorm per head, an explicit head_dim (24, not hidden / heads),
biases on the attention projections, tied embeddings, and a sliding window (4) shorter than
the sequence on layer 1 (`use_sliding_window`, `max_window_layers=1`). OLMo: weightless
LayerNorms, biases, `clip_qkv=0.5` on attention weights scaled up so that the clamp bites.
OLMo 2: norms after each sublayer, q/k RMSNorm over whole projections, one key/value head,
linear rope scaling in OLMo's own spelling.
Logits must agree to 1e-5 (float32) on every real position of a batch padded on the left (row
0) and the right (row 1), for eager, sdpa and flex attention; greedy and seeded-sampled
generation token for token; the KV cache as the full forward; fmodel's save reloads in
Transformers with the same logits.
"""

from __future__ import annotations

import pytest
import torch

import fmodel
from fmodel import facade

from .conftest import TINY, padded_batch, requires_transformers, transformers
from .parity_helpers import (
    assert_bfloat16_matches,
    assert_facade_forward_and_save_match,
    assert_facade_generation_matches,
    assert_fmodel_save_loads_in_transformers,
    assert_greedy_generation_matches,
    assert_logits_match,
    assert_same_grads,
    decode_in_pieces,
    max_diff,
    prompts,
    save_variants,
    training_grads,
)

pytestmark = [requires_transformers, pytest.mark.usefixtures("one_thread")]

TOL = 1e-5
ATTENTIONS = ["eager", "sdpa", "flex_attention"]

# variant: (model_type, config overrides, factor on the attention projection weights)
VARIANTS = {
    "qwen3": (
        "qwen3",
        dict(
            head_dim=24,
            attention_bias=True,
            tie_word_embeddings=True,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=1,
        ),
        1.0,
    ),
    "olmo": ("olmo", dict(num_key_value_heads=None, attention_bias=True, clip_qkv=0.5), 4.0),
    "olmo2": ("olmo2", dict(num_key_value_heads=1, rope_scaling={"type": "linear", "factor": 2.0}), 1.0),
}
CLASSES = {"qwen3": "Qwen3", "olmo": "Olmo", "olmo2": "Olmo2"}


def make_model(variant: str, seed: int = 0):
    """The variant's tiny Transformers causal LM (eval, float32), norms and biases perturbed."""
    model_type, overrides, attention_scale = VARIANTS[variant]
    prefix = CLASSES[model_type]
    torch.manual_seed(seed)
    config = getattr(transformers, f"{prefix}Config")(**{**TINY, **overrides})
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if "self_attn" in name and name.endswith("proj.weight"):
                p.mul_(attention_scale)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{variant: (folder, Transformers model)}, each saved by Transformers."""
    return save_variants(tmp_path_factory, VARIANTS, make_model)


# --------------------------------------------------------------------------- configs


# Fields whose stored value Transformers derives (compared by their effect below) or fills in.
DERIVED = {"id2label", "layer_types", "sliding_window", "num_key_value_heads"}


@pytest.mark.parametrize(
    ("ours", "overrides"),
    [
        (fmodel.Qwen3Config, {}),
        (fmodel.Qwen3Config, {"use_sliding_window": True, "max_window_layers": 20}),
        (fmodel.OlmoConfig, {}),
        (fmodel.Olmo2Config, {}),
    ],
)
def test_config_defaults_are_transformers(ours, overrides):
    theirs = getattr(transformers, ours.__name__)(**overrides)
    config = ours(**overrides)
    stored = theirs.to_dict()
    for key in set(ours.modelled_keys()) - DERIVED:
        if key in stored:
            assert getattr(config, key) == stored[key], key
    assert config.kv_heads == theirs.num_key_value_heads
    assert config.head_size == getattr(theirs, "head_dim", theirs.hidden_size // theirs.num_attention_heads)
    windows = [
        theirs.sliding_window if kind == "sliding_attention" else None
        for kind in getattr(theirs, "layer_types", ["full_attention"] * theirs.num_hidden_layers)
    ]
    assert [config.layer_sliding_window(i) for i in range(config.num_hidden_layers)] == windows
    assert config.qkv_clip is None
    assert "clip_qkv" not in fmodel.Olmo2Config.modelled_keys()  # Transformers deletes it


@pytest.mark.parametrize(
    ("cls", "fields", "match"),
    [
        (fmodel.OlmoConfig, {"clip_qkv": -1.0}, "clip_qkv"),
        (fmodel.OlmoConfig, {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
        (fmodel.Olmo2Config, {"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope_scaling"),
        (fmodel.Olmo2Config, {"rope_scaling": {"type": "linear", "factor": 1.0}}, "factor"),
        (fmodel.Qwen3Config, {"layer_types": ["full_attention"]}, "Qwen3Config: field 'layer_types'"),
        (fmodel.Qwen3Config, {"head_dim": 23}, "even head size"),
    ],
)
def test_bad_configs_are_refused_with_a_config_error(cls, fields, match):
    with pytest.raises(fmodel.ConfigError, match=match):
        cls(num_hidden_layers=2, **fields)


def test_olmo_rope_in_both_spellings():
    tf5 = {"model_type": "olmo", "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    config = fmodel.config_from_dict(tf5)
    assert (config.rope_type, config.rope_theta) == ("default", 5e5) and config.to_diff_dict() == tf5
    tf4 = {"model_type": "olmo2", "rope_scaling": {"type": "dynamic", "factor": 4.0}}
    assert fmodel.config_from_dict(tf4).rope_type == "dynamic"


# --------------------------------------------------------------------------- logits


@pytest.mark.parametrize("attn", ATTENTIONS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(saved, variant, attn):
    folder, hf_model = saved[variant]
    state = fmodel.load(folder, attn_implementation=attn)
    assert state.architecture == f"{CLASSES[variant]}ForCausalLM"
    assert_logits_match(state, hf_model, TOL)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_base_model_matches_transformers_base(saved, variant):
    folder, hf_model = saved[variant]
    state = fmodel.load(folder, architecture=f"{CLASSES[variant]}Model")
    ids, mask = padded_batch(seq=11)
    ours = fmodel.forward(state, ids, attention_mask=mask).last_hidden_state
    hf_model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        theirs = hf_model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert max_diff(ours, theirs, mask) <= TOL


def test_the_special_features_change_the_logits(saved):
    """The parity above covers each feature: switching it off moves fmodel's logits."""
    ids, mask = padded_batch(seq=11)
    for variant, off in (
        ("olmo", {"clip_qkv": None}),  # the clamp bites
        ("qwen3", {"use_sliding_window": False}),  # the window is shorter than the sequence
    ):
        state = fmodel.load(saved[variant][0])
        changed = state.replace(config=state.config.replace(**off))
        a = fmodel.forward(state, ids, attention_mask=mask).logits
        b = fmodel.forward(changed, ids, attention_mask=mask).logits
        assert max_diff(a, b, mask) > 1e-3, variant
    config = fmodel.load(saved["qwen3"][0]).config
    assert [config.layer_sliding_window(i) for i in range(2)] == [None, 4]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bfloat16_matches_transformers_bfloat16(saved, variant):
    """Also in bfloat16 the rounding steps are Transformers' (both equal here on CPU): OLMo's
    float32 rotation tables (rotating with bfloat16 tables instead: 4e-3 off) and OLMo 2's
    weight product in float32 before the cast."""
    folder, _ = saved[variant]
    assert_bfloat16_matches(folder, 1e-3)


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generation_matches_transformers(saved, variant, attn):
    folder, hf_model = saved[variant]
    assert_greedy_generation_matches(folder, hf_model, attn, *prompts())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_facade_generate_and_sampling_match_transformers(saved, variant):
    folder, hf_model = saved[variant]
    model = facade.AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == f"{CLASSES[variant]}ForCausalLM"
    assert model._no_split_modules == [f"{CLASSES[variant]}DecoderLayer"]
    assert_facade_generation_matches(model, hf_model, *prompts(seed=1))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_decode_equals_full_forward(saved, variant, attn):
    folder, _ = saved[variant]
    state = fmodel.load(folder, attn_implementation=attn)
    ids, mask = prompts(seed=2, length=11)  # past the window of 4 (Qwen3's layer 1)
    full, pieces = decode_in_pieces(state, ids, mask, ((0, 5), (5, 6), (6, 9), (9, 10), (10, 11)))
    assert max_diff(torch.cat([p.logits for p in pieces], 1), full, mask) <= TOL


# --------------------------------------------------------------------------- save, facade, training


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fmodel_save_loads_in_transformers(saved, variant, tmp_path):
    folder, hf_model = saved[variant]
    state, reloaded = assert_fmodel_save_loads_in_transformers(folder, hf_model, tmp_path / "resaved")
    assert reloaded.config.tie_word_embeddings == state.config.tie_word_embeddings


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_facade_forward_and_save_match_transformers(saved, variant, tmp_path):
    assert_facade_forward_and_save_match(*saved[variant], tmp_path, TOL)


@pytest.mark.parametrize("variant", ["qwen3", "olmo2"])
def test_gradient_checkpointing_gives_the_same_gradients(saved, variant):
    folder, _ = saved[variant]
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3))

    plain, checkpointed = (
        training_grads(facade.AutoModelForCausalLM.from_pretrained(folder), c, input_ids=ids, labels=ids)
        for c in (False, True)
    )
    assert_same_grads(plain, checkpointed)


# --------------------------------------------------------------------------- transforms


def test_resize_tie_init_quantize_and_prune_run(saved, tmp_path):
    for variant in VARIANTS:
        state = fmodel.load(saved[variant][0])
        ids = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(4))
        base = fmodel.forward(state, ids).logits
        grown = fmodel.resize_token_embeddings(state, 104, mean_resizing=False)
        assert fmodel.forward(grown, ids).logits.shape[-1] == 104
        assert torch.allclose(fmodel.forward(grown, ids).logits[..., :96], base, atol=1e-5)
        flipped = (
            fmodel.untie_weights(state)
            if state.ties
            else fmodel.tie_weights(state.replace(config=state.config.replace(tie_word_embeddings=True)))
        )
        assert bool(flipped.ties) != bool(state.ties)
        fresh = fmodel.init(state.config, architecture=state.architecture, seed=0)
        assert set(fresh.params) == set(state.params)
        assert fmodel.forward(fresh, ids).logits.isfinite().all()
        quantized = fmodel.quantize(state, "int8")
        assert (fmodel.forward(quantized, ids).logits - base).abs().max().item() < 0.1
        fmodel.save(quantized, tmp_path / variant)
        assert torch.equal(
            fmodel.forward(fmodel.load(tmp_path / variant), ids).logits, fmodel.forward(quantized, ids).logits
        )
        if variant == "olmo2":  # its q/k norms span every head: a pruned one would be another model
            with pytest.raises(fmodel.FModelError, match="q/k norms span every head"):
                fmodel.prune_heads(state, {0: [2, 3]})
        else:
            pruned = fmodel.prune_heads(state, {0: [2, 3]})
            assert fmodel.forward(pruned, ids).logits.isfinite().all()


def test_stack_states_and_vmap_forward(saved):
    for variant in ("qwen3", "olmo"):
        a = fmodel.load(saved[variant][0])
        b = fmodel.init(a.config, architecture=a.architecture, seed=1)
        stacked = fmodel.stack_states([a, b])
        ids, mask = padded_batch(seq=9)
        both = fmodel.vmap_forward(stacked, ids, attention_mask=mask).logits
        assert both.shape[0] == 2
        for i, member in enumerate((a, b)):
            alone = fmodel.forward(member, ids, attention_mask=mask).logits
            assert max_diff(both[i], alone, mask) <= TOL


def test_transformers5_olmo_with_rope_scaling_saves_for_transformers4(tmp_path):
    """A Transformers 5 config (`rope_parameters`) is saved with the Transformers 4 keys beside
    it; 4.57's OLMo accepts only {"type", "factor"} there, which is what is written."""
    import json

    data = {**{k: TINY[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")}}
    data.update(model_type="olmo", intermediate_size=64)
    data["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    state = fmodel.init(fmodel.config_from_dict(data), architecture="OlmoForCausalLM", seed=0)
    fmodel.save(state, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_scaling"] == {"type": "linear", "factor": 2.0}
    assert written["rope_parameters"] == data["rope_parameters"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, TINY["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(theirs(ids).logits, fmodel.forward(state, ids).logits, atol=1e-5)
