"""Functional pipelines: stacked ensembles under vmap, gradients w.r.t. a state, replace_params."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fmodel

from .test_transforms import assert_unchanged, snapshot, tiny_config

SEEDS = {s: fmodel.init(tiny_config(tied=True), seed=s) for s in range(4)}
IDS = torch.tensor([[1, 5, 9, 3, 7, 2], [4, 4, 8, 0, 1, 39]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])


@settings(max_examples=8, deadline=None)
@given(
    seeds=st.lists(st.sampled_from(list(SEEDS)), min_size=1, max_size=3),
    attn=st.sampled_from(["eager", "sdpa"]),
)
def test_stacked_forward_equals_each_forward(seeds, attn):
    states = [SEEDS[s] for s in seeds]
    snaps = [snapshot(s) for s in states]
    stacked = fmodel.stack_states(states)
    assert stacked.params["lm_head.weight"] is stacked.params["model.embed_tokens.weight"]
    out = fmodel.vmap_forward(stacked, IDS, attention_mask=MASK, attn_implementation=attn).logits
    for i, state in enumerate(states):
        expected = fmodel.forward(state, IDS, attention_mask=MASK, attn_implementation=attn).logits
        assert (out[i] - expected).abs().max().item() <= 1e-5
    for state, snap in zip(states, snaps, strict=True):
        assert_unchanged(state, snap)
    for back, state in zip(fmodel.unstack_state(stacked), states, strict=True):
        assert back.params["lm_head.weight"] is back.params["model.embed_tokens.weight"]
        assert all(torch.equal(back.tensors[n], t) for n, t in state.tensors.items())


def test_stack_refuses_different_models():
    other = fmodel.init(tiny_config(tied=False), seed=0)
    with pytest.raises(fmodel.StackError, match="'config'"):
        fmodel.stack_states([SEEDS[0], other])
    with pytest.raises(fmodel.StackError, match="no states"):
        fmodel.stack_states([])


def loss_of(state, params, ids=IDS):
    logits = fmodel.forward(fmodel.replace_params(state, params), ids, attn_implementation="eager").logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def test_grad_is_keyed_like_params_and_matches_autograd():
    state = SEEDS[0]
    snap = snapshot(state)
    grads = torch.func.grad(lambda p: loss_of(state, p))(state.unique_params())
    assert set(grads) == set(state.unique_params())  # the tied alias appears once, under its source
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in state.unique_params().items()}
    loss_of(state, leaves).backward()
    for name, g in grads.items():
        assert torch.allclose(g, leaves[name].grad, atol=1e-6), name
    assert_unchanged(state, snap)


def test_per_example_gradients_with_vmap():
    state = SEEDS[1]
    per_example = torch.func.vmap(
        lambda ids: torch.func.grad(lambda p: loss_of(state, p, ids[None]))(state.unique_params())
    )(IDS)
    single = torch.func.grad(lambda p: loss_of(state, p, IDS[:1]))(state.unique_params())
    assert per_example["model.norm.weight"].shape == (2, 32)
    assert torch.allclose(per_example["model.norm.weight"][0], single["model.norm.weight"], atol=1e-6)


def test_replace_params_is_pure_shares_and_checks():
    state = SEEDS[2]
    snap = snapshot(state)
    emb = torch.randn(40, 32)
    new = fmodel.replace_params(state, {"model.embed_tokens.weight": emb})
    assert new.params["lm_head.weight"] is emb  # the tie follows its source
    assert new.params["model.norm.weight"] is state.params["model.norm.weight"]
    assert_unchanged(state, snap)
    with pytest.raises(fmodel.TieError, match="replace the source"):
        fmodel.replace_params(state, {"lm_head.weight": emb})
    with pytest.raises(fmodel.ShapeMismatchError, match=r"\[40, 32\].*\[3, 3\]"):
        fmodel.replace_params(state, {"model.embed_tokens.weight": torch.zeros(3, 3)})
    with pytest.raises(fmodel.CheckpointError, match="nope"):
        fmodel.replace_params(state, {"nope": emb})


def test_worked_example_runs_and_learns():
    example = Path(__file__).resolve().parent.parent / "examples" / "functional_training.py"
    losses = runpy.run_path(str(example))["main"]()
    assert losses[-1] < 0.8 * losses[0]
