"""Parity with Transformers 4.57 for the mixture-of-experts decoders: Mixtral and Qwen3-MoE.

Transformers builds each tiny random model with its family's features switched on and saves
it; fmodel loads it. Every variant has more experts than top-k (4 experts, top-2). Mixtral: a
sliding window (4) shorter than the sequence, routing weights renormalised. Qwen3-MoE: q/k
RMSNorm per head, `norm_topk_prob` on with a dense layer (`mlp_only_layers=[1]`), and off with
attention biases, `decoder_sparse_step=2` (layer 0 dense) and a sliding window of 4
(`use_sliding_window`). Logits, router logits and the load-balancing loss (with the attention
mask) must agree to 1e-5 (float32) on every real position of a batch padded on the left (row
0) and the right (row 1), for eager, sdpa and flex attention; the facade's loss with labels
includes `router_aux_loss_coef * aux_loss` as Transformers'; greedy and seeded-sampled
generation token for token; fmodel's save reloads in Transformers with the same logits.
"""

from __future__ import annotations

import json

import pytest
import torch

import fmodel
from fmodel import facade
from fmodel.config.moe import EXPERTS_MAX, MOE_EXPERT_MLPS_MAX
from fmodel.errors import ArgumentTypeError, ConfigError
from fmodel.losses import load_balancing_loss

from .conftest import padded_batch, requires_transformers, transformers
from .parity_helpers import (
    NEW,
    assert_facade_generation_matches,
    assert_fmodel_save_loads_in_transformers,
    assert_greedy_generation_matches,
    decode_in_pieces,
    hf_forward,
    hf_generate,
    max_diff,
    prompts,
    real_labels,
    save_variants,
    training_grads,
)

pytestmark = [requires_transformers, pytest.mark.usefixtures("one_thread")]

TOL = 1e-5
ATTENTIONS = ["eager", "sdpa", "flex_attention"]
TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=80,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    num_experts_per_tok=2,
    router_aux_loss_coef=0.25,  # large enough that a missing aux term shows in the loss
)

# variant: (model_type, config overrides)
VARIANTS = {
    "mixtral": ("mixtral", dict(num_local_experts=4, sliding_window=4)),
    "qwen3moe-norm-dense": (
        "qwen3_moe",
        dict(num_experts=4, moe_intermediate_size=48, norm_topk_prob=True, mlp_only_layers=[1]),
    ),
    "qwen3moe-sliding": (
        "qwen3_moe",
        dict(
            num_experts=4,
            moe_intermediate_size=48,
            norm_topk_prob=False,
            decoder_sparse_step=2,
            attention_bias=True,
            use_sliding_window=True,
            sliding_window=4,
        ),
    ),
}
CLASSES = {"mixtral": "Mixtral", "qwen3_moe": "Qwen3Moe"}
SPARSE_LAYERS = {"mixtral": 3, "qwen3moe-norm-dense": 2, "qwen3moe-sliding": 1}


def make_model(variant: str, seed: int = 0, **changes):
    """The variant's tiny Transformers causal LM (eval, float32), norms and biases perturbed,
    routers scaled up so that routing is decided by clear margins."""
    model_type, overrides = VARIANTS[variant]
    prefix = CLASSES[model_type]
    torch.manual_seed(seed)
    config = getattr(transformers, f"{prefix}Config")(**{**TINY, **overrides, **changes})
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("gate.weight"):
                p.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{variant: (folder, Transformers model)}, each saved by Transformers."""
    return save_variants(tmp_path_factory, VARIANTS, make_model)


def router_diff(ours, theirs, mask: torch.Tensor) -> float:
    """Largest difference of the router logits [B * T, E] over the real tokens of every layer."""
    assert len(ours) == len(theirs)
    keep = mask.bool().reshape(-1)
    return max((a[keep] - b[keep]).abs().max().item() for a, b in zip(ours, theirs, strict=True))


# --------------------------------------------------------------------------- logits, routers, aux loss


@pytest.mark.parametrize("attn", ATTENTIONS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_router_logits_and_aux_loss_match_transformers(saved, variant, attn):
    folder, hf_model = saved[variant]
    state = fmodel.load(folder, attn_implementation=attn)
    ids, mask = padded_batch(seq=11)
    ours = fmodel.forward(state, ids, attention_mask=mask, output_router_logits=True)
    theirs = hf_forward(hf_model, ids, mask, attn, output_router_logits=True)
    assert ours.logits.shape == theirs.logits.shape
    assert max_diff(ours.logits, theirs.logits, mask) <= TOL
    assert len(ours.router_logits) == SPARSE_LAYERS[variant]
    assert ours.router_logits[0].shape == (2 * 11, 4)
    assert router_diff(ours.router_logits, theirs.router_logits, mask) <= TOL
    assert abs(ours.aux_loss.item() - theirs.aux_loss.item()) <= TOL
    # the mask counts: the loss over every token is another number
    unmasked = load_balancing_loss(ours.router_logits, 4, 2)
    assert abs(unmasked.item() - ours.aux_loss.item()) > 1e-4


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_router_outputs_follow_the_flag_and_the_config(saved, variant):
    folder, hf_model = saved[variant]
    state = fmodel.load(folder)
    ids, _ = padded_batch(seq=11)
    plain = fmodel.forward(state, ids)
    assert plain.router_logits is None and plain.aux_loss is None
    on = state.replace(config=state.config.replace(output_router_logits=True))
    ours = fmodel.forward(on, ids)  # the config's default; no mask: every token counts
    theirs = hf_forward(hf_model, ids, None, output_router_logits=True)
    assert abs(ours.aux_loss.item() - theirs.aux_loss.item()) <= TOL
    assert torch.equal(ours.logits, plain.logits)
    assert fmodel.forward(on, ids, output_router_logits=False).router_logits is None
    with pytest.raises(ArgumentTypeError, match=r"output_router_logits\) must be True, False or None"):
        fmodel.forward(state, ids, output_router_logits="yes")


@pytest.mark.parametrize("variant", ["mixtral", "qwen3moe-sliding"])
def test_hidden_states_and_attentions_match(saved, variant):
    folder, hf_model = saved[variant]
    state = fmodel.load(folder, attn_implementation="eager")
    ids, mask = padded_batch(seq=11)
    ours = fmodel.forward(state, ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    theirs = hf_forward(hf_model, ids, mask, output_hidden_states=True, output_attentions=True)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 4
    for a, b in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        assert max_diff(a, b, mask) <= TOL
    keep = mask.bool()[:, None, :, None]  # attention rows of real query tokens
    for a, b in zip(ours.attentions, theirs.attentions, strict=True):
        assert ((a - b).abs() * keep).max().item() <= TOL


def test_the_special_features_change_the_logits(saved):
    """The sliding window, the dense layer and the renormalisation are each on: switching one
    off changes the logits (so the parity above tests them)."""
    ids, mask = padded_batch(seq=11)
    for variant, change in (
        ("mixtral", {"sliding_window": None}),
        ("qwen3moe-norm-dense", {"norm_topk_prob": False}),
        ("qwen3moe-sliding", {"use_sliding_window": False}),
    ):
        state = fmodel.load(saved[variant][0])
        other = state.replace(config=state.config.replace(**change))
        base = fmodel.forward(state, ids, attention_mask=mask).logits
        assert max_diff(base, fmodel.forward(other, ids, attention_mask=mask).logits, mask) > 1e-3


@pytest.mark.parametrize("variant", ["mixtral", "qwen3moe-norm-dense"])
def test_base_model_matches_transformers_base(saved, variant):
    folder, hf_model = saved[variant]
    state = fmodel.load(folder, architecture=f"{CLASSES[VARIANTS[variant][0]]}Model")
    ids, mask = padded_batch(seq=11)
    ours = fmodel.forward(state, ids, attention_mask=mask, output_router_logits=True)
    assert ours.logits is None and ours.aux_loss is None
    with torch.no_grad():
        theirs = hf_model.model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    assert max_diff(ours.last_hidden_state, theirs.last_hidden_state, mask) <= TOL
    assert router_diff(ours.router_logits, theirs.router_logits, mask) <= TOL


def test_bfloat16_matches_transformers_bfloat16(saved):
    folder, _ = saved["qwen3moe-norm-dense"]
    state = fmodel.load(folder, dtype=torch.bfloat16)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ids, mask = padded_batch(seq=11)
    ours = fmodel.forward(state, ids, attention_mask=mask, output_router_logits=True)
    theirs = hf_forward(hf, ids, mask, "sdpa", output_router_logits=True)
    assert ours.logits.dtype == ours.router_logits[0].dtype == torch.bfloat16
    assert max_diff(ours.logits.float(), theirs.logits.float(), mask) <= 2e-2


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
    prefix = CLASSES[VARIANTS[variant][0]]
    assert type(model).__name__ == f"{prefix}ForCausalLM"
    assert model._no_split_modules == [f"{prefix}DecoderLayer"]
    assert_facade_generation_matches(model, hf_model, *prompts(seed=1))


@pytest.mark.parametrize("variant", ["mixtral", "qwen3moe-sliding"])
def test_cached_decode_equals_full_forward(saved, variant):
    folder, _ = saved[variant]
    state = fmodel.load(folder)
    ids, mask = prompts(seed=2, length=11)  # past the window of 4
    spans = ((0, 5), (5, 6), (6, 9), (9, 11))
    # with router logits: the loss takes each step's part of the mask
    full, pieces = decode_in_pieces(state, ids, mask, spans, output_router_logits=True)
    for (start, end), out in zip(spans, pieces, strict=True):
        assert out.router_logits[0].shape == (2 * (end - start), 4) and out.aux_loss.isfinite()
    assert max_diff(torch.cat([p.logits for p in pieces], 1), full, mask) <= TOL


# --------------------------------------------------------------------------- save, facade, training


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fmodel_save_loads_in_transformers(saved, variant, tmp_path):
    folder, hf_model = saved[variant]
    assert_fmodel_save_loads_in_transformers(folder, hf_model, tmp_path / "resaved")
    written = json.loads((tmp_path / "resaved" / "config.json").read_text())
    original = json.loads((folder / "config.json").read_text())
    assert {k: v for k, v in written.items() if k != "transformers_version"} == {
        k: v for k, v in original.items() if k != "transformers_version"
    }


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_facade_loss_adds_the_aux_loss_as_transformers(saved, variant, tmp_path):
    folder, hf_model = saved[variant]
    model = facade.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
    ids, mask = padded_batch(seq=11)
    labels = real_labels(ids, mask)
    kwargs = dict(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
    with torch.no_grad():
        ours = model(**kwargs)
        theirs = hf_model(**kwargs)
        plain = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert type(ours).__name__ == "MoeCausalLMOutputWithPast"
    assert list(ours.keys()) == ["loss", "aux_loss", "logits", "past_key_values", "router_logits"]
    assert max_diff(ours.logits, theirs.logits, mask) <= TOL
    assert abs(ours.aux_loss.item() - theirs.aux_loss.item()) <= TOL
    assert abs(ours.loss.item() - theirs.loss.item()) <= TOL
    assert abs(plain.loss.item() - (ours.loss - 0.25 * ours.aux_loss).item()) <= TOL
    assert plain.aux_loss is None and plain.router_logits is None
    model.config.output_router_logits = True  # the config's default, as Transformers reads it
    with torch.no_grad():
        assert (
            abs(model(input_ids=ids, attention_mask=mask, labels=labels).loss.item() - theirs.loss.item())
            <= TOL
        )
    with torch.no_grad():
        base = model.model(input_ids=ids, attention_mask=mask)
    assert (
        type(base).__name__ == "MoeModelOutputWithPast" and len(base.router_logits) == SPARSE_LAYERS[variant]
    )
    model.config.output_router_logits = False
    model.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(hf_forward(again, ids, mask).logits, hf_forward(hf_model, ids, mask).logits)


@pytest.mark.parametrize("variant", ["mixtral", "qwen3moe-norm-dense"])
def test_training_gradients_match_transformers_with_checkpointing(saved, variant):
    folder, _ = saved[variant]
    ids, mask = padded_batch(seq=12, seed=3)
    kwargs = dict(input_ids=ids, attention_mask=mask, labels=ids, output_router_logits=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).train()
    hf(**kwargs).loss.backward()
    expected = {n: p.grad for n, p in hf.named_parameters()}
    for checkpointing in (False, True):
        grads = training_grads(facade.AutoModelForCausalLM.from_pretrained(folder), checkpointing, **kwargs)
        assert set(grads) == set(expected)
        for name, grad in grads.items():
            assert grad is not None, name
            assert torch.allclose(grad, expected[name], atol=1e-5), name


def test_mixtral_router_jitter_in_training_as_transformers(saved):
    folder, _ = saved["mixtral"]
    hf = make_model("mixtral", router_jitter_noise=0.2).train()
    state = fmodel.load(folder)
    state = state.replace(config=state.config.replace(router_jitter_noise=0.2))
    ids, mask = padded_batch(seq=11)
    torch.manual_seed(7)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, output_router_logits=True)
    torch.manual_seed(7)
    ours = fmodel.forward(state, ids, attention_mask=mask, training=True, output_router_logits=True)
    assert max_diff(ours.logits, theirs.logits, mask) <= TOL
    assert router_diff(ours.router_logits, theirs.router_logits, mask) <= TOL
    evaluated = fmodel.forward(state, ids, attention_mask=mask)
    assert max_diff(ours.logits, evaluated.logits, mask) > 1e-3  # the noise is on in training only
    assert torch.equal(evaluated.logits, fmodel.forward(state, ids, attention_mask=mask).logits)


# --------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("variant", ["mixtral", "qwen3moe-norm-dense"])
def test_quantize_init_and_resize_run_on_the_experts(saved, variant, tmp_path):
    state = fmodel.load(saved[variant][0])
    ids = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(4))
    base = fmodel.forward(state, ids).logits
    expert = "block_sparse_moe.experts.3.w2" if variant == "mixtral" else "mlp.experts.3.down_proj"
    for scheme in ("int8", "int4"):
        quantized = fmodel.quantize(state, scheme, group_size=32)
        assert f"model.layers.0.{expert}.weight_{scheme}" in quantized.params
        logits = fmodel.forward(quantized, ids).logits
        assert logits.isfinite().all() and (logits - base).abs().mean().item() < 0.1
    fmodel.save(quantized, tmp_path / variant)
    assert torch.equal(fmodel.forward(fmodel.load(tmp_path / variant), ids).logits, logits)
    fresh = fmodel.init(state.config, architecture=state.architecture, seed=0)
    assert set(fresh.params) == set(state.params)
    assert fmodel.forward(fresh, ids).logits.isfinite().all()
    grown = fmodel.resize_token_embeddings(state, 104, mean_resizing=False)
    assert torch.allclose(fmodel.forward(grown, ids).logits[..., :96], base, atol=1e-5)
    pruned = fmodel.prune_heads(state, {0: [2, 3]})
    assert pruned.params["model.layers.0.self_attn.q_proj.weight"].shape[0] == 2 * state.config.head_size
    assert fmodel.forward(pruned, ids).logits.isfinite().all()


def test_stack_states_and_vmap_forward(saved):
    a = fmodel.load(saved["qwen3moe-norm-dense"][0])
    b = fmodel.init(a.config, architecture=a.architecture, seed=1)
    stacked = fmodel.stack_states([a, b])
    ids, mask = padded_batch(seq=9)
    both = fmodel.vmap_forward(stacked, ids, attention_mask=mask, output_router_logits=True)
    assert both.logits.shape[0] == 2
    for i, member in enumerate((a, b)):
        alone = fmodel.forward(member, ids, attention_mask=mask, output_router_logits=True)
        assert max_diff(both.logits[i], alone.logits, mask) <= TOL
        assert abs(both.aux_loss[i].item() - alone.aux_loss.item()) <= TOL


# --------------------------------------------------------------------------- configs


def test_configs_read_transformers_defaults_and_round_trip():
    for prefix in CLASSES.values():
        hf = getattr(transformers, f"{prefix}Config")()
        ours = getattr(fmodel, f"{prefix}Config")()
        for key, value in ours.to_dict().items():
            if key in ("model_type", "rope_scaling", "pruned_heads", "id2label", "architectures", "head_dim"):
                continue
            if prefix == "Qwen3Moe" and key == "sliding_window":
                # Transformers overwrites it with None without use_sliding_window; fmodel keeps
                # the value (a lossless round trip) and applies it only with use_sliding_window
                assert hf.sliding_window is None and ours.layer_sliding_window(0) is None
                continue
            if hasattr(hf, key):
                assert getattr(hf, key) == (list(value) if isinstance(value, tuple) else value), (prefix, key)
        data = json.loads(hf.to_json_string(use_diff=True))
        assert fmodel.config_from_dict(data).to_diff_dict() == data
    windowed = transformers.Qwen3MoeConfig(use_sliding_window=True)
    assert (
        fmodel.Qwen3MoeConfig(use_sliding_window=True).layer_sliding_window(3)
        == windowed.sliding_window
        == 4096
    )


def test_config_bounds_and_cross_checks():
    with pytest.raises(
        ConfigError, match=r"'num_experts_per_tok' \(5\) must be at most the number of experts \(4\)"
    ):
        fmodel.MixtralConfig(num_local_experts=4, num_experts_per_tok=5)
    with pytest.raises(ConfigError, match=rf"'num_local_experts' is {EXPERTS_MAX + 1}, beyond the bound"):
        fmodel.config_from_dict({"model_type": "mixtral", "num_local_experts": EXPERTS_MAX + 1})
    with pytest.raises(ConfigError, match=rf"expert MLPs, beyond the bound {MOE_EXPERT_MLPS_MAX}"):
        fmodel.config_from_dict({"model_type": "qwen3_moe", "num_hidden_layers": 1024, "num_experts": 64})
    with pytest.raises(ConfigError, match=r"'num_experts' expected an integer >= 0"):
        fmodel.config_from_dict({"model_type": "qwen3_moe", "num_experts": -1})
    with pytest.raises(ConfigError, match=r"'mlp_only_layers' expected a list of layer indices"):
        fmodel.config_from_dict({"model_type": "qwen3_moe", "mlp_only_layers": ["1"]})
    with pytest.raises(ConfigError, match=r"'mlp_only_layers' has 2000 entries, beyond the bound 1024"):
        fmodel.config_from_dict({"model_type": "qwen3_moe", "mlp_only_layers": list(range(2000))})
    with pytest.raises(ConfigError, match=r"'decoder_sparse_step' expected a positive integer"):
        fmodel.config_from_dict({"model_type": "qwen3_moe", "decoder_sparse_step": 0})
    # every layer dense: top-k may exceed the (zero) experts, as Transformers builds it
    dense = fmodel.Qwen3MoeConfig(num_experts=0, num_hidden_layers=2)
    assert not any(dense.layer_is_sparse(i) for i in range(2))
    sparse = fmodel.Qwen3MoeConfig(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=(3,))
    assert [sparse.layer_is_sparse(i) for i in range(4)] == [False, True, False, False]
    # the largest public MoE configs load (Qwen3-235B-A22B, Mixtral 8x22B)
    fmodel.config_from_dict(
        {
            "model_type": "qwen3_moe",
            "vocab_size": 151936,
            "hidden_size": 4096,
            "num_hidden_layers": 94,
            "num_attention_heads": 64,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "moe_intermediate_size": 1536,
        }
    )
    fmodel.config_from_dict(
        {"model_type": "mixtral", "hidden_size": 6144, "num_hidden_layers": 56, "num_attention_heads": 48}
    )


def test_all_dense_qwen3_moe_has_no_router_outputs():
    config = fmodel.Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=0,
    )  # fmt: skip
    state = fmodel.init(config, architecture="Qwen3MoeForCausalLM", seed=0)
    assert not any(".experts." in k or ".gate.weight" in k for k in state.params)
    out = fmodel.forward(state, torch.tensor([[1, 2, 3]]), output_router_logits=True)
    assert out.router_logits == () and out.aux_loss is None


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_init_in_transformers_draw_order_matches_transformers(variant):
    model_type, overrides = VARIANTS[variant]
    prefix = CLASSES[model_type]
    config = fmodel.config_from_dict({"model_type": model_type, **TINY, **overrides})
    torch.manual_seed(5)
    ours = fmodel.init(config, draw_order="transformers")
    torch.manual_seed(5)
    theirs = getattr(transformers, f"{prefix}ForCausalLM")(
        getattr(transformers, f"{prefix}Config")(**TINY, **overrides)
    )
    assert set(ours.params) == set(theirs.state_dict())
    for name, p in theirs.state_dict().items():
        assert torch.equal(ours.params[name], p), name


def test_generation_with_router_logits_on_in_the_config(saved):
    """Transformers 4.57 fails here (its loss takes the cache-long mask against one step's router
    logits); fmodel scores each step's tokens and generates what it generates with them off."""
    folder, hf_model = saved["mixtral"]
    state = fmodel.load(folder)
    on = state.replace(config=state.config.replace(output_router_logits=True))
    ids, mask = prompts(seed=3)
    expected = hf_generate(hf_model, ids, mask, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(
        fmodel.generate(on, ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=0), expected
    )
    model = facade.AutoModelForCausalLM.from_pretrained(folder)
    model.config.output_router_logits = True
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0
    )
    assert torch.equal(out, expected)
