"""Functional pipelines: stacked ensembles under vmap, gradients w.r.t. a state, replace_params,
and the worked example."""

from __future__ import annotations

import itertools
import runpy
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fmodel
from fmodel.config.encoder import BertConfig, GPT2Config

from .test_transforms import assert_ties_hold, assert_unchanged, snapshot, tiny_config

SETTINGS = settings(max_examples=10, deadline=None)
SEEDS = {s: fmodel.init(tiny_config(tied=True), seed=s) for s in range(3)}
UNTIED = fmodel.init(tiny_config(tied=False), seed=7)
IDS = torch.tensor([[1, 5, 9, 3, 7, 2], [4, 4, 8, 0, 1, 39], [6, 2, 2, 9, 30, 11]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
TIED = "lm_head.weight", "model.embed_tokens.weight"
UNIQUE = sorted(SEEDS[0].unique_params())


def logits(state, ids=IDS, mask=MASK, attn="eager"):
    return fmodel.forward(state, ids, attention_mask=mask, attn_implementation=attn).logits


def loss_of(state, params, ids=IDS, mask=None):
    out = fmodel.forward(fmodel.replace_params(state, params), ids, attention_mask=mask)
    return F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def max_diff(a, b):
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------- stack / unstack


RECIPES = st.lists(
    st.tuples(
        st.sampled_from(list(SEEDS)),
        st.lists(st.sampled_from(UNIQUE), max_size=3, unique=True),
        st.floats(0.5, 2.0),
    ),
    min_size=1,
    max_size=3,
)


def members(recipes):
    """States of one config: some from different seeds, some variants of one another that
    share every tensor they did not change (as `replace_params` leaves them)."""
    return [
        fmodel.replace_params(SEEDS[seed], {n: SEEDS[seed].params[n] * scale for n in changed})
        for seed, changed, scale in recipes
    ]


@SETTINGS
@given(recipes=RECIPES, attn=st.sampled_from(["eager", "sdpa"]))
def test_stack_is_pure_shares_and_vmap_forward_equals_each_forward(recipes, attn):
    states = members(recipes)
    snaps = [snapshot(s) for s in states]
    stacked = fmodel.stack_states(states)
    n = len(states)
    assert_ties_hold(stacked)
    assert stacked.params[TIED[0]] is stacked.params[TIED[1]]
    assert stacked.config is states[0].config and dict(stacked.ties) == dict(states[0].ties)
    for name, t in stacked.tensors.items():
        sources = [s.tensors[name] for s in states]
        assert t.shape == (n, *sources[0].shape) and t.dtype == sources[0].dtype, name
        if all(u is sources[0] for u in sources):  # the same tensor everywhere: a view, no copy
            assert t.data_ptr() == sources[0].data_ptr() and (n == 1 or t.stride(0) == 0), name
    stacked_snap = snapshot(stacked)

    out = fmodel.vmap_forward(stacked, IDS, attention_mask=MASK, attn_implementation=attn).logits
    assert out.shape == (n, *IDS.shape, 40)
    for i, state in enumerate(states):
        assert max_diff(out[i], logits(state, attn=attn)) <= 1e-5

    back = fmodel.unstack_state(stacked)
    assert len(back) == n
    for member, state in zip(back, states, strict=True):
        assert_ties_hold(member)
        assert member.params[TIED[0]] is member.params[TIED[1]]
        assert set(member.tensors) == set(state.tensors)
        assert all(torch.equal(member.tensors[k], t) for k, t in state.tensors.items())
        assert max_diff(logits(member, attn=attn), logits(state, attn=attn)) <= 1e-5
    for state, snap in zip(states, snaps, strict=True):
        assert_unchanged(state, snap)
    assert_unchanged(stacked, stacked_snap)


def test_stacked_hidden_states_and_attentions_gain_a_member_axis():
    stacked = fmodel.stack_states([SEEDS[0], SEEDS[1]])
    out = fmodel.vmap_forward(stacked, IDS, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (2, 3, 6, 32)
    assert out.attentions[1].shape == (2, 3, 4, 6, 6)
    single = fmodel.forward(SEEDS[1], IDS, output_attentions=True)
    assert max_diff(out.attentions[1][1], single.attentions[1]) <= 1e-6


def test_custom_vmap_over_stacked_params_with_a_member_template():
    stacked = fmodel.stack_states([SEEDS[0], SEEDS[2]])
    template = SEEDS[0]
    out = torch.func.vmap(lambda p: logits(fmodel.replace_params(template, p)))(stacked.unique_params())
    assert max_diff(out[1], logits(SEEDS[2])) <= 1e-5


def _without(state, name):
    return state.replace(params={k: v for k, v in state.params.items() if k != name})


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (lambda s: fmodel.init(tiny_config(rms_norm_eps=1e-5), seed=0), r"'config\.rms_norm_eps'"),
        (lambda s: UNTIED, r"'config\.tie_word_embeddings'"),
        (lambda s: s.replace(architecture="LlamaModel"), "'architecture'"),
        (lambda s: s.replace(attn_implementation="eager"), "'attn_implementation': 'eager' there"),
        (
            lambda s: s.replace(ties={}, params={**s.params, TIED[0]: s.params[TIED[0]].clone()}),
            "the tie of 'lm_head.weight': untied there, 'model.embed_tokens.weight' in state 0",
        ),
        (lambda s: _without(s, "model.norm.weight"), "params: it lacks 'model.norm.weight'"),
        (
            lambda s: fmodel.to(s, dtype=torch.bfloat16),
            r"tensor '.*': dtype torch.bfloat16 there, torch.float32",
        ),
        (
            lambda s: s.replace(params={**s.params, "model.norm.weight": torch.ones(2, 16)}),
            r"tensor 'model.norm.weight': shape \[2, 16\] there, \[32\] in state 0",
        ),
    ],
)
def test_stack_refuses_different_models_naming_the_difference(other, message):
    state = SEEDS[0]
    snap = snapshot(state)
    with pytest.raises(fmodel.StackError, match=r"state 2 differs from state 0 in " + message):
        fmodel.stack_states([state, SEEDS[1], other(state)])
    assert_unchanged(state, snap)


def test_unstacked_members_save_and_load(tmp_path):
    """Members are views into the stack (or into a tensor stack_states expanded); save copies."""
    variant = fmodel.replace_params(SEEDS[0], {"model.norm.weight": SEEDS[0].params["model.norm.weight"] * 2})
    for i, member in enumerate(fmodel.unstack_state(fmodel.stack_states([SEEDS[1], SEEDS[0], variant]))):
        fmodel.save(member, tmp_path / str(i))
        back = fmodel.load(tmp_path / str(i))
        assert_ties_hold(back)
        assert dict(back.ties) == dict(member.ties)
        assert max_diff(logits(back), logits(member)) == 0


def test_stack_and_unstack_refuse_non_states():
    with pytest.raises(fmodel.StackError, match="no states"):
        fmodel.stack_states([])
    with pytest.raises(fmodel.StackError, match="different leading sizes"):
        fmodel.unstack_state(SEEDS[0])
    assert issubclass(fmodel.StackError, fmodel.FModelError)


@pytest.mark.parametrize(
    ("config", "architecture"),
    [
        (tiny_config(), None),
        (GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=4, n_positions=32), None),
        (
            BertConfig(
                vocab_size=40,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=48,
                max_position_embeddings=32,
            ),
            "BertForMaskedLM",
        ),
    ],
    ids=["llama", "gpt2", "bert"],
)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_forward_under_vmap_over_inputs_with_padding(config, architecture, attn):
    """Masks are built without branching on tensor values when vmap hides them."""
    state = fmodel.init(config, seed=0, architecture=architecture)
    per_row = torch.func.vmap(lambda i, m: logits(state, i[None], m[None], attn)[0])(IDS, MASK)
    assert max_diff(per_row, logits(state, attn=attn)) <= 1e-5
    ensemble = fmodel.stack_states([state, fmodel.init(config, seed=1, architecture=architecture)])
    out = fmodel.vmap_forward(ensemble, IDS, attention_mask=MASK, attn_implementation=attn).logits
    assert max_diff(out[0], logits(state, attn=attn)) <= 1e-5


def test_first_forward_of_a_config_may_run_inside_grad_or_vmap():
    """The skeleton cache is per thread: a new thread builds it inside the transform."""
    state = UNTIED
    results = {}

    def run():
        results["grad"] = torch.func.grad(lambda p: loss_of(state, p))(state.unique_params())
        results["vmap"] = torch.func.vmap(lambda i: logits(state, i[None], None)[0])(IDS)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert set(results["grad"]) == set(state.unique_params())
    assert max_diff(results["vmap"], logits(state, mask=None)) <= 1e-5


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("state", [SEEDS[0], UNTIED], ids=["tied", "untied"])
def test_grad_is_keyed_like_unique_params_and_matches_autograd(state):
    snap = snapshot(state)
    params = state.unique_params()
    grads = torch.func.grad(lambda p: loss_of(state, p, mask=MASK))(params)
    assert set(grads) == set(state.params) - set(state.ties)
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in params.items()}
    loss_of(state, leaves, mask=MASK).backward()
    for name, g in grads.items():
        assert g.shape == params[name].shape and torch.allclose(g, leaves[name].grad, atol=1e-6), name
    _, pullback = torch.func.vjp(lambda p: loss_of(state, p, mask=MASK), params)
    (via_vjp,) = pullback(torch.tensor(1.0))
    assert all(torch.allclose(via_vjp[n], g, atol=1e-6) for n, g in grads.items())
    assert_unchanged(state, snap)


def test_tied_source_gradient_is_the_sum_over_its_uses():
    state = SEEDS[1]
    grads = torch.func.grad(lambda p: loss_of(state, p))(state.unique_params())
    untied = fmodel.untie_weights(state)
    split = torch.func.grad(lambda p: loss_of(untied, p))(untied.unique_params())
    assert torch.allclose(grads[TIED[1]], split[TIED[0]] + split[TIED[1]], atol=1e-6)


def test_passing_aliases_to_grad_says_what_to_differentiate():
    with pytest.raises(fmodel.TieError, match=r"replace the source.*unique_params"):
        torch.func.grad(lambda p: loss_of(SEEDS[0], p))(dict(SEEDS[0].params))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_per_example_gradients_with_vmap_grad(attn):
    state = fmodel.set_attn_implementation(SEEDS[2], attn)
    params = state.unique_params()

    def example_grad(ids, mask):
        return torch.func.grad(lambda p: loss_of(state, p, ids[None], mask[None]))(params)

    per_example = torch.func.vmap(example_grad)(IDS, MASK)
    assert set(per_example) == set(params)
    for i in range(len(IDS)):
        single = torch.func.grad(lambda p, i=i: loss_of(state, p, IDS[i : i + 1], MASK[i : i + 1]))(params)
        for name in (TIED[1], "model.norm.weight", "model.layers.1.self_attn.q_proj.weight"):
            assert per_example[name].shape == (len(IDS), *params[name].shape)
            assert torch.allclose(per_example[name][i], single[name], atol=1e-5), (i, name)


# --------------------------------------------------------------------------- replace_params


@SETTINGS
@given(
    key=st.sampled_from(["tied", "untied"]),
    names=st.lists(st.sampled_from(UNIQUE), max_size=4, unique=True),
    seed=st.integers(0, 2**16),
)
def test_replace_params_is_pure_and_shares_the_rest(key, names, seed):
    state = SEEDS[0] if key == "tied" else UNTIED
    generator = torch.Generator().manual_seed(seed)
    new = {n: torch.randn(state.params[n].shape, generator=generator) for n in names}
    snap, new_snap = snapshot(state), {n: (t._version, t.clone()) for n, t in new.items()}
    out = fmodel.replace_params(state, new)
    for name, t in out.params.items():
        source = state.ties.get(name, name)
        assert t is (new[source] if source in new else state.params[name]), name
    assert all(out.buffers[n] is t for n, t in state.buffers.items())
    assert out.config is state.config and dict(out.ties) == dict(state.ties)
    assert_ties_hold(out)
    assert_unchanged(state, snap)
    assert all(t._version == new_snap[n][0] and torch.equal(t, new_snap[n][1]) for n, t in new.items())


def test_replace_params_errors_name_the_tensor_and_change_nothing():
    state = SEEDS[2]
    snap = snapshot(state)
    emb = torch.randn(40, 32)
    with pytest.raises(fmodel.TieError, match=r"'lm_head.weight' is a tied alias.*replace the source"):
        fmodel.replace_params(state, {TIED[0]: emb})
    with pytest.raises(
        fmodel.ShapeMismatchError, match=r"'model.embed_tokens.weight' is \[40, 32\].*\[3, 3\]"
    ):
        fmodel.replace_params(state, {TIED[1]: torch.zeros(3, 3)})
    with pytest.raises(
        fmodel.ShapeMismatchError, match=r"torch.float32, the replacement is \[40, 32\] torch.float64"
    ):
        fmodel.replace_params(state, {TIED[1]: emb.double()})
    with pytest.raises(fmodel.CheckpointError, match=r"\['nope', 'zz'\]"):
        fmodel.replace_params(state, {"zz": emb, "nope": emb, TIED[1]: emb})
    with pytest.raises(fmodel.CheckpointError, match="are buffers"):
        fmodel.replace_params(state, {"model.rotary_emb.inv_freq": torch.ones(4)})
    assert fmodel.replace_params(state, {}).params[TIED[1]] is state.params[TIED[1]]
    assert_unchanged(state, snap)


# --------------------------------------------------------------------------- worked example


def test_worked_example_runs_and_learns():
    example = Path(__file__).resolve().parent.parent / "examples" / "functional_training.py"
    losses = runpy.run_path(str(example))["main"]()
    assert len(losses) > 1 and losses[-1] < 0.8 * losses[0]
    assert all(b < a for a, b in itertools.pairwise(losses))
