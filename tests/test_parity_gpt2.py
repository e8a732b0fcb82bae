"""GPT-2 parity with Transformers: logits, both load directions, pruned checkpoints both ways."""

from __future__ import annotations

import pytest
import torch

import fmodel
from fmodel.transforms._common import with_params

from .conftest import padded_batch, requires_transformers, transformers

pytestmark = requires_transformers

TOL = 1e-4
VARIANTS = {
    "tied": {},
    "untied": {"tie_word_embeddings": False},
    "inverse-layer-scaling": {"scale_attn_by_inverse_layer_idx": True},
    "reorder-upcast": {"reorder_and_upcast_attn": True},
}


def make_gpt2(seed: int = 0, head: bool = True, **overrides):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=32, **overrides
    )
    model = (transformers.GPT2LMHeadModel if head else transformers.GPT2Model)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def hf_output(model, ids, mask, attn: str, field: str = "logits"):
    # Transformers applies scale_attn_by_inverse_layer_idx in its eager path only, and compiles
    # flex attention on CPU: compare those against its eager attention.
    inverse = model.config.scale_attn_by_inverse_layer_idx
    model.config._attn_implementation = "eager" if attn == "flex_attention" or inverse else attn
    with torch.no_grad():
        return getattr(model(input_ids=ids, attention_mask=mask), field)


def max_diff(a, b, mask):
    keep = mask.bool()
    return (a[keep] - b[keep]).abs().max().item()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for i, (name, overrides) in enumerate(VARIANTS.items()):
        model = make_gpt2(seed=i, **overrides)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (folder, model)
    return out


@pytest.mark.parametrize("attn", ["eager", "sdpa", "flex_attention"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lm_logits_match(saved, variant, attn):
    folder, model = saved[variant]
    state = fmodel.load(folder, attn_implementation=attn)
    assert (state.params["lm_head.weight"] is state.params["transformer.wte.weight"]) == (variant != "untied")
    ids, mask = padded_batch(seq=9)
    ours = fmodel.forward(state, ids, attention_mask=mask).logits
    assert max_diff(ours, hf_output(model, ids, mask, attn), mask) <= TOL


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_base_model_and_hidden_states_match(saved, attn):
    folder, model = saved["tied"]
    state = fmodel.load(folder, architecture="GPT2Model", attn_implementation=attn)
    ids, mask = padded_batch(seq=9)
    ours = fmodel.forward(state, ids, attention_mask=mask, output_hidden_states=True)
    model.config._attn_implementation = attn
    with torch.no_grad():
        theirs = model.transformer(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert max_diff(ours.last_hidden_state, theirs.last_hidden_state, mask) <= TOL
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 3
    for a, b in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        assert max_diff(a, b, mask) <= TOL


@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_fmodel_save_loads_in_transformers(saved, variant, tmp_path):
    folder, model = saved[variant]
    fmodel.save(fmodel.load(folder), tmp_path / "out")
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    ids, mask = padded_batch(seq=9)
    assert torch.equal(hf_output(again, ids, mask, "eager"), hf_output(model, ids, mask, "eager"))
    assert (again.lm_head.weight.data_ptr() == again.transformer.wte.weight.data_ptr()) == (variant == "tied")


def test_checkpoint_pruned_by_transformers_loads_in_fmodel(tmp_path):
    model = make_gpt2(seed=7)
    model.prune_heads({0: [1], 1: [0, 2]})
    model.save_pretrained(tmp_path)
    state = fmodel.load(tmp_path)
    assert state.config.pruned_heads == {0: (1,), 1: (0, 2)}
    ids, mask = padded_batch(seq=9)
    assert (
        max_diff(
            fmodel.forward(state, ids, attention_mask=mask).logits, hf_output(model, ids, mask, "eager"), mask
        )
        <= TOL
    )


def test_fmodel_prune_matches_transformers_prune_both_ways(tmp_path):
    model = make_gpt2(seed=8)
    model.save_pretrained(tmp_path / "full")
    ours = fmodel.prune_heads(fmodel.load(tmp_path / "full"), {0: [1, 3], 1: [2]})
    model.prune_heads({0: [1, 3], 1: [2]})
    for name, tensor in model.state_dict().items():
        if name in ours.params:
            assert torch.equal(ours.params[name], tensor), name
    fmodel.save(ours, tmp_path / "pruned")
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "pruned").eval()
    ids, mask = padded_batch(seq=9)
    expected = hf_output(model, ids, mask, "eager")
    assert max_diff(hf_output(reloaded, ids, mask, "eager"), expected, mask) <= TOL
    assert max_diff(fmodel.forward(ours, ids, attention_mask=mask).logits, expected, mask) <= TOL


def test_every_head_of_a_layer_pruned_runs(saved):
    folder, _ = saved["tied"]
    full = fmodel.load(folder)
    pruned = fmodel.prune_heads(full, {0: [0, 1, 2, 3]})
    assert pruned.params["transformer.h.0.attn.c_attn.weight"].shape == (64, 0)
    # equal to the unpruned model with layer 0's attention reduced to its output bias
    weight = full.params["transformer.h.0.attn.c_proj.weight"]
    zeroed = with_params(full, {"transformer.h.0.attn.c_proj.weight": torch.zeros_like(weight)})
    ids, mask = padded_batch(seq=9)
    got = fmodel.forward(pruned, ids, attention_mask=mask).logits
    assert max_diff(got, fmodel.forward(zeroed, ids, attention_mask=mask).logits, mask) <= 1e-5


def test_init_uses_gpt2_scaled_residual_init():
    config = fmodel.config_from_dict(
        {"model_type": "gpt2", "n_embd": 64, "n_layer": 8, "n_head": 4, "vocab_size": 500}
    )
    state = fmodel.init(config, seed=0)
    assert state.architecture == "GPT2LMHeadModel"
    proj = state.params["transformer.h.0.mlp.c_proj.weight"].std().item()
    fc = state.params["transformer.h.0.mlp.c_fc.weight"].std().item()
    assert proj == pytest.approx(0.02 / 4, rel=0.1) and fc == pytest.approx(0.02, rel=0.1)
    assert state.params["lm_head.weight"] is state.params["transformer.wte.weight"]


def test_resize_position_embeddings_keeps_rows_and_matches_a_bigger_transformers_model(saved, tmp_path):
    folder, model = saved["tied"]
    state = fmodel.resize_position_embeddings(fmodel.load(folder), 48)
    wpe = state.params["transformer.wpe.weight"]
    assert wpe.shape == (48, 64) and state.config.n_positions == 48
    assert torch.equal(wpe[:32], model.transformer.wpe.weight.detach())
    fmodel.save(state, tmp_path / "long")
    bigger = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "long").eval()
    assert bigger.config.n_positions == 48
    ids = torch.randint(0, 96, (1, 40))
    with torch.no_grad():
        expected = bigger(ids).logits
    assert (fmodel.forward(state, ids).logits - expected).abs().max().item() <= TOL
