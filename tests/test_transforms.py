"""Pure model surgery: tie, resize, prune, init, to — properties and Transformers differentials."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fmodel
from fmodel.transforms._common import with_params

from .conftest import make_hf_model, requires_transformers

SETTINGS = settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def tiny_config(tied: bool = True, kv_heads: int = 2, **kw) -> fmodel.LlamaConfig:
    return fmodel.LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=32,
        tie_word_embeddings=tied,
        **kw,
    )


STATES = {
    "tied": fmodel.init(tiny_config(tied=True), seed=0),
    "untied": fmodel.init(tiny_config(tied=False), seed=1),
    "mha": fmodel.init(tiny_config(tied=False, kv_heads=4, attention_bias=True), seed=2),
}
IDS = torch.tensor([[1, 5, 9, 3, 7, 2], [4, 4, 8, 0, 1, 39]])


def snapshot(state):
    return {name: (t, t._version, t.data_ptr(), t.clone()) for name, t in state.tensors.items()}


def assert_unchanged(state, snap):
    for name, (t, version, ptr, values) in snap.items():
        now = state.tensors[name]
        assert now is t and now._version == version and now.data_ptr() == ptr, name
        assert torch.equal(now, values), name


def assert_shared_except(before, after, changed):
    for name, t in before.params.items():
        if name not in changed and name in after.params:
            assert after.params[name] is t, f"{name} was not shared"


def assert_ties_hold(state):
    for alias, source in state.ties.items():
        assert state.params[alias] is state.params[source]


def logits(state, ids=IDS):
    return fmodel.forward(state, ids).logits


# --------------------------------------------------------------------------- properties


@SETTINGS
@given(
    key=st.sampled_from(list(STATES)),
    n=st.integers(8, 80),
    mean=st.booleans(),
    multiple=st.sampled_from([None, 8]),
)
def test_resize_token_embeddings_is_pure_and_round_trips(key, n, mean, multiple):
    state = STATES[key]
    snap = snapshot(state)
    resized = fmodel.resize_token_embeddings(state, n, pad_to_multiple_of=multiple, mean_resizing=mean)
    assert_unchanged(state, snap)
    size = n if multiple is None else -(-n // multiple) * multiple
    assert resized.config.vocab_size == size
    emb = fmodel.get_input_embeddings(resized)
    assert emb.shape == (size, 32)
    keep = min(size, 40)
    assert torch.equal(emb[:keep], fmodel.get_input_embeddings(state)[:keep])
    out = fmodel.get_output_embeddings(resized)
    assert out.shape == (size, 32)
    assert torch.equal(out[:keep], fmodel.get_output_embeddings(state)[:keep])  # trained head rows kept
    assert_ties_hold(resized)
    assert_shared_except(state, resized, {"model.embed_tokens.weight", "lm_head.weight"})
    back = fmodel.resize_token_embeddings(resized, 40)
    if size >= 40:
        assert torch.equal(fmodel.get_input_embeddings(back), fmodel.get_input_embeddings(state))
        assert torch.equal(logits(back), logits(state))


def test_resize_token_embeddings_mean_rows_are_near_the_mean_and_seeded():
    state = STATES["untied"]
    a = fmodel.resize_token_embeddings(state, 45, generator=torch.Generator().manual_seed(3))
    b = fmodel.resize_token_embeddings(state, 45, generator=torch.Generator().manual_seed(3))
    mean = fmodel.get_input_embeddings(state).mean(0)
    new = fmodel.get_input_embeddings(a)[40:]
    assert torch.equal(new, fmodel.get_input_embeddings(b)[40:])
    assert (new - mean).abs().max() < 1e-3
    assert fmodel.resize_token_embeddings(state, 40) is state


@SETTINGS
@given(key=st.sampled_from(list(STATES)), n=st.integers(4, 64))
def test_resize_position_embeddings_for_rotary_only_changes_config(key, n):
    state = STATES[key]
    snap = snapshot(state)
    resized = fmodel.resize_position_embeddings(state, n)
    assert_unchanged(state, snap)
    assert resized.config.max_position_embeddings == n
    assert_shared_except(state, resized, set())


@SETTINGS
@given(layer=st.integers(0, 1), groups=st.sets(st.integers(0, 1), max_size=2))
def test_prune_gqa_groups_equals_zeroing_those_heads(layer, groups):
    state = STATES["tied"]  # 4 heads, 2 kv heads: groups {0, 1} = heads {0, 1}, {2, 3}
    heads = sorted(h for g in groups for h in (2 * g, 2 * g + 1))
    snap = snapshot(state)
    pruned = fmodel.prune_heads(state, {layer: heads})
    assert_unchanged(state, snap)
    prefix = f"model.layers.{layer}.self_attn."
    touched = {prefix + n for n in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")}
    assert_shared_except(state, pruned, touched if heads else set())
    assert pruned.params[prefix + "q_proj.weight"].shape[0] == 8 * (4 - len(heads))
    o = state.params[prefix + "o_proj.weight"].clone()
    for h in heads:
        o[:, 8 * h : 8 * (h + 1)] = 0
    zeroed = with_params(state, {prefix + "o_proj.weight": o})
    assert (logits(pruned) - logits(zeroed)).abs().max() < 1e-5
    again = fmodel.prune_heads(pruned, {layer: heads})  # already pruned: no-op
    assert all(again.params[n] is pruned.params[n] for n in pruned.params)


@SETTINGS
@given(
    heads=st.sets(st.integers(0, 3), min_size=1, max_size=4), second=st.sets(st.integers(0, 3), max_size=4)
)
def test_prune_mha_in_two_steps_equals_one(heads, second):
    state = STATES["mha"]
    once = fmodel.prune_heads(state, {0: sorted(heads | second)})
    twice = fmodel.prune_heads(fmodel.prune_heads(state, {0: sorted(heads)}), {0: sorted(second)})
    assert once.config.pruned_heads == twice.config.pruned_heads
    for name in once.params:
        assert torch.equal(once.params[name], twice.params[name]), name
    assert torch.allclose(logits(once), logits(twice), atol=1e-6)


def test_prune_every_head_of_a_layer_leaves_only_the_output_bias():
    state = STATES["mha"]
    pruned = fmodel.prune_heads(state, {1: [0, 1, 2, 3]})
    prefix = "model.layers.1.self_attn."
    assert pruned.params[prefix + "q_proj.weight"].shape == (0, 32)
    o = torch.zeros_like(state.params[prefix + "o_proj.weight"])
    zeroed = with_params(state, {prefix + "o_proj.weight": o})
    assert (logits(pruned) - logits(zeroed)).abs().max() < 1e-5


def test_prune_errors_name_the_problem():
    state = STATES["tied"]
    with pytest.raises(fmodel.ConfigError, match=r"splits key/value group"):
        fmodel.prune_heads(state, {0: [1]})
    with pytest.raises(fmodel.FModelError, match=r"layer 5 is out of range"):
        fmodel.prune_heads(state, {5: [0]})
    with pytest.raises(fmodel.FModelError, match=r"head ids \[7\] out of range"):
        fmodel.prune_heads(state, {0: [7]})


def test_pruned_llama_saves_and_reloads(tmp_path):
    pruned = fmodel.prune_heads(STATES["mha"], {0: [1, 3]})
    fmodel.save(pruned, tmp_path / "p")
    again = fmodel.load(tmp_path / "p")
    assert again.config.pruned_heads == {0: (1, 3)}
    assert torch.equal(logits(again), logits(pruned))


@SETTINGS
@given(key=st.sampled_from(list(STATES)), dtype=st.sampled_from([torch.bfloat16, torch.float16]))
def test_to_round_trip_keeps_shapes_ties_and_integer_buffers(key, dtype):
    state = STATES[key]
    snap = snapshot(state)
    low = fmodel.to(state, dtype=dtype)
    assert_unchanged(state, snap)
    assert low.dtype == dtype and all(t.dtype == dtype for t in low.params.values())
    assert low.buffers["model.rotary_emb.inv_freq"].dtype == torch.float32
    back = fmodel.to(low, dtype=torch.float32)
    assert_ties_hold(low)
    assert_ties_hold(back)
    assert {n: t.shape for n, t in back.params.items()} == {n: t.shape for n, t in state.params.items()}
    assert fmodel.to(state, dtype=torch.float32, device="cpu") is state


def test_tie_and_untie():
    tied = STATES["tied"]
    untied = fmodel.untie_weights(tied)
    assert not untied.ties and untied.config.tie_word_embeddings is False
    assert untied.params["lm_head.weight"] is not untied.params["model.embed_tokens.weight"]
    assert torch.equal(untied.params["lm_head.weight"], tied.params["lm_head.weight"])
    assert untied.params["model.embed_tokens.weight"] is tied.params["model.embed_tokens.weight"]
    assert torch.equal(logits(untied), logits(tied))
    retied = fmodel.tie_weights(untied.replace(config=untied.config.replace(tie_word_embeddings=True)))
    assert retied.params["lm_head.weight"] is retied.params["model.embed_tokens.weight"]
    assert fmodel.tie_weights(tied) is tied


def test_set_embeddings_keep_or_break_ties_explicitly():
    tied = STATES["tied"]
    new = torch.randn(40, 32)
    s = fmodel.set_input_embeddings(tied, new)
    assert s.params["lm_head.weight"] is new and s.params["model.embed_tokens.weight"] is new
    with pytest.raises(fmodel.TieError, match="tie=False"):
        fmodel.set_output_embeddings(tied, torch.randn(40, 32))
    broken = fmodel.set_output_embeddings(tied, new, tie=False)
    assert broken.params["lm_head.weight"] is new and not broken.ties
    assert broken.params["model.embed_tokens.weight"] is tied.params["model.embed_tokens.weight"]
    with pytest.raises(fmodel.ShapeMismatchError, match=r"\[rows, 32\]"):
        fmodel.set_input_embeddings(tied, torch.randn(40, 31))
    with pytest.raises(fmodel.ShapeMismatchError, match="resize_token_embeddings"):
        fmodel.set_input_embeddings(STATES["untied"], torch.randn(41, 32))


def test_init_is_deterministic_per_seed_and_dtype_independent():
    a = fmodel.init(tiny_config(), seed=5)
    b = fmodel.init(tiny_config(), seed=5)
    c = fmodel.init(tiny_config(), seed=6)
    h = fmodel.init(tiny_config(), seed=5, dtype=torch.bfloat16)
    emb = "model.embed_tokens.weight"
    assert torch.equal(a.params[emb], b.params[emb]) and not torch.equal(a.params[emb], c.params[emb])
    assert torch.equal(h.params[emb], a.params[emb].to(torch.bfloat16))
    assert (a.params["model.norm.weight"] == 1).all()
    assert a.params[emb].std().item() == pytest.approx(0.02, rel=0.2)
    assert a.params["lm_head.weight"] is a.params[emb]


def test_init_weights_redraws_only_named_tensors():
    state = STATES["untied"]
    snap = snapshot(state)
    name = "model.layers.0.mlp.up_proj.weight"
    redrawn = fmodel.init_weights(state, seed=9, names=[name])
    assert_unchanged(state, snap)
    assert not torch.equal(redrawn.params[name], state.params[name])
    assert_shared_except(state, redrawn, {name})
    with pytest.raises(KeyError, match="tied"):
        fmodel.init_weights(STATES["tied"], names=["lm_head.weight"])


TRANSFORMS = [
    lambda s: fmodel.resize_token_embeddings(s, 48, mean_resizing=False),
    lambda s: fmodel.resize_token_embeddings(s, 36),
    lambda s: fmodel.untie_weights(s),
    lambda s: fmodel.prune_heads(s, {1: [2, 3]}),
    lambda s: fmodel.resize_position_embeddings(s, 48),
    lambda s: fmodel.to(s, dtype=torch.float64),
    lambda s: fmodel.to(s, dtype=torch.float32),
    lambda s: fmodel.init_weights(s, seed=1, names=["model.norm.weight"]),
]


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.integers(0, len(TRANSFORMS) - 1), max_size=5))
def test_any_transform_sequence_survives_save_and_load(steps, tmp_path_factory):
    state = STATES["tied"]
    snap = snapshot(state)
    for step in steps:
        state = TRANSFORMS[step](state)
        assert_ties_hold(state)
    assert_unchanged(STATES["tied"], snap)
    folder = tmp_path_factory.mktemp("seq")
    fmodel.save(state, folder)
    again = fmodel.load(folder)
    assert dict(again.ties) == dict(state.ties)
    ids = IDS.clamp(max=state.config.vocab_size - 1)
    assert torch.allclose(logits(again, ids), logits(state, ids), atol=1e-6)


# --------------------------------------------------------------------------- Transformers


@requires_transformers
@pytest.mark.parametrize("tied", [True, False])
def test_resize_token_embeddings_matches_transformers(tied, tmp_path):
    hf = make_hf_model("llama", tie_word_embeddings=tied)
    hf.save_pretrained(tmp_path)
    state = fmodel.load(tmp_path)
    ours = fmodel.resize_token_embeddings(state, 101, pad_to_multiple_of=8, mean_resizing=False)
    hf.resize_token_embeddings(101, pad_to_multiple_of=8, mean_resizing=False)
    assert ours.config.vocab_size == hf.config.vocab_size == 104
    old = state.config.vocab_size
    for name, theirs in (
        ("model.embed_tokens.weight", hf.model.embed_tokens.weight),
        ("lm_head.weight", hf.lm_head.weight),
    ):
        assert ours.params[name].shape == theirs.shape
        assert torch.equal(ours.params[name][:old], theirs[:old].detach())
    assert (ours.params["lm_head.weight"] is ours.params["model.embed_tokens.weight"]) == tied
    ids = torch.randint(0, old, (2, 6))
    with torch.no_grad():
        expected = hf(ids).logits[..., :old]
    assert (fmodel.forward(ours, ids).logits[..., :old] - expected).abs().max() < 1e-4
