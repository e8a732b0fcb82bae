"""GPT-2 parity with Transformers: logits and hidden states for every attention implementation
and config option, both load directions, legacy checkpoints, pruned checkpoints both ways."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import fmodel
from fmodel.attention import MaskInputs, build_mask
from fmodel.io import state_from_tensors
from fmodel.models.gpt2 import _upcast_reordered_attention
from fmodel.models.skeleton import skeleton

from .conftest import padded_batch, requires_transformers, transformers
from .parity_helpers import max_diff, save_variants

pytestmark = requires_transformers

TOL = 1e-4
ATTNS = ["eager", "sdpa", "flex_attention"]
VARIANTS = {
    "tied": {},
    "untied": {"tie_word_embeddings": False},
    "unscaled": {"scale_attn_weights": False},
    "inverse-layer-scaling": {"scale_attn_by_inverse_layer_idx": True},
    "reorder-upcast": {"reorder_and_upcast_attn": True},
}
TINY = dict(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=32)


def make_gpt2(seed: int = 0, **overrides):
    """A tiny random Transformers GPT2LMHeadModel in eval mode, biases and norms perturbed."""
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def hf_reference(model, attn: str) -> str:
    """The Transformers attention to compare `attn` against. Its flex compiles on CPU (slow), and
    its sdpa path ignores `scale_attn_weights=False` and `scale_attn_by_inverse_layer_idx` (it
    passes no scaling): fmodel applies the config's scaling everywhere, as Transformers' eager."""
    config = model.config
    if attn == "flex_attention" or config.scale_attn_by_inverse_layer_idx or not config.scale_attn_weights:
        return "eager"
    return attn


def hf_run(model, ids, mask, attn: str, **kwargs):
    model.config._attn_implementation = hf_reference(model, attn)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs)


def weights_diff(a, b, mask):
    """Max |a - b| over the real query rows of attention weights [B, H, T, S]."""
    return max_diff(a.transpose(1, 2), b.transpose(1, 2), mask)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_variants(
        tmp_path_factory, VARIANTS, lambda name, seed: make_gpt2(seed=seed, **VARIANTS[name])
    )


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lm_logits_match(saved, variant, attn):
    folder, model = saved[variant]
    state = fmodel.load(folder, attn_implementation=attn)
    assert (state.params["lm_head.weight"] is state.params["transformer.wte.weight"]) == (variant != "untied")
    ids, mask = padded_batch(seq=9)
    ours = fmodel.forward(state, ids, attention_mask=mask).logits
    assert max_diff(ours, hf_run(model, ids, mask, attn).logits, mask) <= TOL


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "untied"])
def test_base_model_matches(saved, variant, attn):
    folder, model = saved[variant]
    state = fmodel.load(folder, architecture="GPT2Model", attn_implementation=attn)
    assert "wte.weight" in state.params and "lm_head.weight" not in state.params
    ids, mask = padded_batch(seq=9)
    ours = fmodel.forward(state, ids, attention_mask=mask).last_hidden_state
    model.config._attn_implementation = hf_reference(model, attn)
    with torch.no_grad():
        theirs = model.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
    assert max_diff(ours, theirs, mask) <= TOL


@pytest.mark.parametrize("variant", ["tied", "inverse-layer-scaling", "reorder-upcast"])
def test_hidden_states_and_attentions_match(saved, variant):
    folder, model = saved[variant]
    state = fmodel.load(folder, attn_implementation="sdpa")  # weights asked: the call runs eager
    ids, mask = padded_batch(seq=9)
    ours = fmodel.forward(state, ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    theirs = hf_run(model, ids, mask, "eager", output_hidden_states=True, output_attentions=True)
    # embeddings, block 1, block 2 after ln_f (Transformers replaces the last block's output)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 3
    for a, b in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        assert max_diff(a, b, mask) <= TOL
    assert torch.equal(ours.hidden_states[-1], ours.last_hidden_state)
    assert len(ours.attentions) == len(theirs.attentions) == 2
    for a, b in zip(ours.attentions, theirs.attentions, strict=True):
        assert a.shape == b.shape == (2, 4, 9, 9)
        assert weights_diff(a, b, mask) <= 1e-5


def test_position_ids_and_logits_to_keep(saved):
    folder, model = saved["tied"]
    state = fmodel.load(folder)
    ids, mask = padded_batch(seq=9)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ours = fmodel.forward(state, ids, attention_mask=mask, position_ids=positions).logits
    theirs = hf_run(model, ids, mask, "sdpa", position_ids=positions).logits
    assert max_diff(ours, theirs, mask) <= TOL
    last = fmodel.forward(state, ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits
    assert last.shape == (2, 1, 96) and torch.allclose(last, ours[:, -1:], atol=1e-6)


def test_dropout_only_when_training(saved):
    folder, _ = saved["tied"]
    state = fmodel.load(folder, attn_implementation="eager")
    ids, mask = padded_batch(seq=9)
    first = fmodel.forward(state, ids, attention_mask=mask).logits
    assert torch.equal(first, fmodel.forward(state, ids, attention_mask=mask).logits)
    torch.manual_seed(0)
    trained = fmodel.forward(state, ids, attention_mask=mask, training=True).logits
    assert max_diff(trained, first, mask) > 1e-3


def test_upcast_attention_equals_transformers_in_bfloat16():
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention as HFAttention

    config = transformers.GPT2Config(
        **TINY, reorder_and_upcast_attn=True, scale_attn_by_inverse_layer_idx=True
    )
    theirs = HFAttention(config, layer_idx=1).eval()
    ours = skeleton(fmodel.config_from_dict(config.to_dict()), "GPT2Model").h[1].attn
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 16, generator=g).to(torch.bfloat16) for _ in range(3))
    _, mask = padded_batch(seq=9)
    additive = build_mask("additive", MaskInputs(mask, torch.arange(9), 9, 2), None, torch.bfloat16)
    out, weights = _upcast_reordered_attention(ours, q, k, v, additive, ours.scaling, 0.0)
    ref_out, ref_weights = theirs._upcast_and_reordered_attn(q, k, v, additive)
    assert out.dtype == weights.dtype == torch.bfloat16
    assert max_diff(out, ref_out, mask) == 0.0 and weights_diff(weights, ref_weights, mask) == 0.0


def test_upcast_path_runs_in_the_bfloat16_forward(saved):
    """End to end in bfloat16 the attention weights equal Transformers' bit for bit (the plain
    eager path rounds the scores to bfloat16 and differs in the second layer)."""
    folder, _ = saved["reorder-upcast"]
    state = fmodel.load(folder, dtype=torch.bfloat16, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ids, mask = padded_batch(seq=9)
    ours = fmodel.forward(state, ids, attention_mask=mask, output_attentions=True)
    theirs = hf_run(model, ids, mask, "eager", output_attentions=True)
    for a, b in zip(ours.attentions, theirs.attentions, strict=True):
        assert a.dtype == torch.bfloat16 and weights_diff(a, b, mask) == 0.0
    # the rest differs by bfloat16 rounding only (Transformers' gelu_new is the tanh formula spelled out)
    assert max_diff(ours.logits.float(), theirs.logits.float(), mask) <= 1e-2


@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_fmodel_save_loads_in_transformers(saved, variant, tmp_path):
    folder, model = saved[variant]
    fmodel.save(fmodel.load(folder), tmp_path / "out")
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    ids, mask = padded_batch(seq=9)
    assert torch.equal(hf_run(again, ids, mask, "eager").logits, hf_run(model, ids, mask, "eager").logits)
    assert (again.lm_head.weight.data_ptr() == again.transformer.wte.weight.data_ptr()) == (variant == "tied")


def test_legacy_checkpoint_without_prefix_and_with_mask_buffers_loads(saved, tmp_path):
    """Old GPT-2 checkpoints (the hub's gpt2) store base-model keys and the causal-mask buffers."""
    _, model = saved["tied"]
    tensors = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items()}
    del tensors["lm_head.weight"]
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32)
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    model.config.to_json_file(tmp_path / "config.json")
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    state, report = fmodel.load_with_report(tmp_path)
    assert state.architecture == "GPT2LMHeadModel" and not report.unexpected
    assert state.params["lm_head.weight"] is state.params["transformer.wte.weight"]
    ids, mask = padded_batch(seq=9)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    expected = hf_run(theirs, ids, mask, "eager").logits
    assert max_diff(fmodel.forward(state, ids, attention_mask=mask).logits, expected, mask) <= TOL
    base = fmodel.load(tmp_path, architecture="GPT2Model")
    assert set(base.params) == {k for k in tensors if not k.endswith((".attn.bias", "masked_bias"))}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_checkpoint_pruned_by_transformers_loads_in_fmodel(tmp_path, attn):
    model = make_gpt2(seed=7)
    model.prune_heads({0: [1], 1: [0, 2]})
    model.save_pretrained(tmp_path)
    state = fmodel.load(tmp_path, attn_implementation=attn)
    assert state.config.pruned_heads == {0: (1,), 1: (0, 2)}
    assert state.params["transformer.h.1.attn.c_attn.weight"].shape == (64, 3 * 2 * 16)
    assert state.params["transformer.h.1.attn.c_proj.weight"].shape == (2 * 16, 64)
    ids, mask = padded_batch(seq=9)
    expected = hf_run(model, ids, mask, attn).logits
    assert max_diff(fmodel.forward(state, ids, attention_mask=mask).logits, expected, mask) <= TOL


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
    expected = hf_run(model, ids, mask, "eager").logits
    assert max_diff(hf_run(reloaded, ids, mask, "eager").logits, expected, mask) <= TOL
    assert max_diff(fmodel.forward(ours, ids, attention_mask=mask).logits, expected, mask) <= TOL


@pytest.mark.parametrize("attn", ATTNS)
def test_config_with_every_head_of_a_layer_pruned_runs(attn):
    """Transformers divides by zero building such a layer; fmodel builds it, and its attention
    contributes only c_proj's bias: the same as full heads with a zero c_proj weight."""
    base = {"model_type": "gpt2", **TINY, "architectures": ["GPT2LMHeadModel"]}
    config = fmodel.config_from_dict({**base, "pruned_heads": {"0": [0, 1, 2, 3]}})
    pruned, report = state_from_tensors(
        config, {}, allow_missing=True, warn_missing=False, attn_implementation=attn
    )
    assert "transformer.h.0.attn.c_attn.weight" in report.missing
    assert pruned.params["transformer.h.0.attn.c_attn.weight"].shape == (64, 0)
    assert pruned.params["transformer.h.0.attn.c_proj.weight"].shape == (0, 64)
    full_tensors = dict(pruned.params) | {
        "transformer.h.0.attn.c_attn.weight": torch.randn(64, 192),
        "transformer.h.0.attn.c_attn.bias": torch.randn(192),
        "transformer.h.0.attn.c_proj.weight": torch.zeros(64, 64),
    }
    full, _ = state_from_tensors(fmodel.config_from_dict(base), full_tensors, attn_implementation=attn)
    ids, mask = padded_batch(seq=9)
    got = fmodel.forward(pruned, ids, attention_mask=mask, output_hidden_states=True)
    assert torch.isfinite(got.logits).all()
    assert max_diff(got.logits, fmodel.forward(full, ids, attention_mask=mask).logits, mask) <= 1e-5


def test_every_head_pruned_by_the_transform_matches_a_zeroed_projection(saved):
    folder, _ = saved["tied"]
    full = fmodel.load(folder)
    pruned = fmodel.prune_heads(full, {0: [0, 1, 2, 3]})
    assert pruned.params["transformer.h.0.attn.c_attn.weight"].shape == (64, 0)
    weight = full.params["transformer.h.0.attn.c_proj.weight"]
    zeroed = fmodel.replace_params(full, {"transformer.h.0.attn.c_proj.weight": torch.zeros_like(weight)})
    ids, mask = padded_batch(seq=9)
    got = fmodel.forward(pruned, ids, attention_mask=mask).logits
    assert max_diff(got, fmodel.forward(zeroed, ids, attention_mask=mask).logits, mask) <= 1e-5


def test_cross_attention_config_is_refused():
    config = fmodel.config_from_dict({"model_type": "gpt2", **TINY, "add_cross_attention": True})
    with pytest.raises(fmodel.ConfigError, match="add_cross_attention"):
        fmodel.init(config)


def test_init_follows_transformers_gpt2_rules():
    config = fmodel.config_from_dict(
        {"model_type": "gpt2", "n_embd": 64, "n_layer": 8, "n_head": 4, "vocab_size": 500}
    )
    state = fmodel.init(config, seed=0)
    p = state.params
    assert state.architecture == "GPT2LMHeadModel"
    assert p["lm_head.weight"] is p["transformer.wte.weight"]
    for name in ("transformer.h.0.mlp.c_proj.weight", "transformer.h.3.attn.c_proj.weight"):
        assert p[name].std().item() == pytest.approx(0.02 / 4, rel=0.1), name  # 0.02 / sqrt(2 * 8)
    for name in (
        "transformer.h.0.mlp.c_fc.weight",
        "transformer.h.0.attn.c_attn.weight",
        "transformer.wpe.weight",
    ):
        assert p[name].std().item() == pytest.approx(0.02, rel=0.1), name
    assert not p["transformer.h.0.attn.c_proj.bias"].any() and not p["transformer.ln_f.bias"].any()
    assert bool((p["transformer.h.0.ln_1.weight"] == 1).all())


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


def test_generic_config_names_win_over_gpt2_names_as_in_transformers(tmp_path):
    """A GPT-2 config.json spelling `num_attention_heads` / `num_hidden_layers` (some exporters
    do): Transformers' attribute_map sets them after `n_head` / `n_layer`, so they win. The head
    count changes no tensor shape, so reading it wrongly would load silently with other numerics."""
    import json

    model = make_gpt2(n_head=8)
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    data["num_attention_heads"] = data.pop("n_head")
    data["n_head"] = 2  # a stale family-name value the generic one overrides
    path.write_text(json.dumps(data))
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert theirs.config.n_head == 8
    state = fmodel.load(tmp_path)
    assert state.config.n_head == 8 and "num_attention_heads" not in state.config.extra
    ids = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
    got = fmodel.forward(state, ids).logits
    assert (got - want).abs().max() < TOL
