"""fmodel.bind_forward: many forwards under one binding of the state's tensors."""

from __future__ import annotations

import importlib

import pytest
import torch

import fmodel
from fmodel.models.skeleton import skeleton

CONFIG = fmodel.LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2,
)
STATE = fmodel.init(CONFIG, architecture="LlamaForCausalLM", seed=1)
IDS = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
STEPS = 6
forward_module = importlib.import_module("fmodel.forward")  # the module (fmodel.forward is the function)


def _greedy(forward) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A hand-written greedy loop over a KV cache; `forward` is fmodel.forward's shape."""
    out = forward(IDS, past_key_values=fmodel.init_cache(STATE, 2, 5 + STEPS), logits_to_keep=1)
    tokens, logits = [IDS], []
    for _ in range(STEPS):
        logits.append(out.logits)
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(next_ids)
        out = forward(next_ids, past_key_values=out.past_key_values, logits_to_keep=1)
    return torch.cat(tokens, 1), logits


def test_equals_a_loop_of_plain_forwards_and_generate():
    with torch.inference_mode():
        bound_tokens, bound_logits = fmodel.bind_forward(STATE, _greedy)
        plain_tokens, plain_logits = _greedy(lambda ids, **kw: fmodel.forward(STATE, ids, **kw))
    assert torch.equal(bound_tokens, plain_tokens)
    assert all(torch.equal(a, b) for a, b in zip(bound_logits, plain_logits, strict=True))
    generated = fmodel.generate(STATE, IDS, max_new_tokens=STEPS, generation_config=fmodel.GenerationConfig())
    assert torch.equal(bound_tokens, generated)


def test_binds_once_for_every_forward_inside(monkeypatch):
    calls = []
    real = forward_module.functional_call

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(forward_module, "functional_call", counting)
    with torch.inference_mode():
        fmodel.bind_forward(STATE, _greedy)
    assert len(calls) == 1  # STEPS + 1 forwards, one binding


def test_is_pure_and_unbinds_even_when_fn_raises():
    stamps = {name: (t.data_ptr(), t._version, t.clone()) for name, t in STATE.params.items()}

    def fails(forward):
        forward(IDS)
        raise KeyError("inside")

    with pytest.raises(KeyError, match="inside"):
        fmodel.bind_forward(STATE, fails)
    for name, t in STATE.params.items():
        ptr, version, copy = stamps[name]
        assert t.data_ptr() == ptr and t._version == version and torch.equal(t, copy), name
    skel = skeleton(STATE.config, STATE.architecture)
    assert all(p.is_meta for p in skel.parameters())  # nothing of the state left in the skeleton


def test_gradients_flow_through_a_binding():
    params = {k: v.clone().requires_grad_(True) for k, v in STATE.unique_params().items()}
    state = fmodel.replace_params(STATE, params)
    loss = fmodel.bind_forward(state, lambda forward: forward(IDS).logits.sum() + forward(IDS[:, :2]).logits.sum())
    loss.backward()
    assert all(p.grad is not None for p in params.values())


@pytest.mark.parametrize("fixed", ["module", "training"])
def test_the_bindings_own_settings_are_refused_per_call(fixed):
    with pytest.raises(TypeError, match=fixed):
        fmodel.bind_forward(STATE, lambda forward: forward(IDS, **{fixed: None}))
