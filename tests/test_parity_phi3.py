"""Parity with Transformers 4.57 for Phi-3 (`Phi3ForCausalLM`, `Phi3Model`).

Transformers builds each tiny random model and saves it; fmodel loads it. "plain": fused
`qkv_proj` / `gate_up_proj`, grouped key/value heads (4 query heads, 2 key/value heads).
"longrope": `partial_rotary_factor=0.5` (8 of each head's 16 features rotate), longrope
scaling with short and long factors that differ and `original_max_position_embeddings=8`, so
an 11-token sequence runs on the long factors and a 7-token one on the short ones, one
key/value head. "sliding": a sliding window of 4 on every layer, tied embeddings. Logits must
agree to 1e-5 (float32) on every real position of a batch padded on the left (row 0) and the
right (row 1), for eager, sdpa and flex attention; greedy and seeded-sampled generation token
for token; fmodel's save reloads in Transformers with the same logits.

Generation across the longrope switch: Transformers 4.57's `Phi3ForCausalLM` drops its cache
when the sequence reaches original_max_position_embeddings + 1 tokens and runs the whole
sequence again (keys then rotate with the long factors). That rerun passes one cache position
for the whole sequence, so its eager path (and its sdpa path with a padding mask) builds a
one-row mask and lets every token attend to later ones; without padding its sdpa path skips
the mask and is causal. fmodel reruns causally: its generation equals Transformers' sdpa
generation on unpadded prompts and Transformers' cache-free generation (every step a full
forward) on padded ones.
"""

from __future__ import annotations

import functools

import pytest
import torch

import fmodel
from fmodel import facade

from . import parity_helpers
from .conftest import TINY, padded_batch, requires_transformers, transformers
from .parity_helpers import (
    NEW,
    assert_bfloat16_matches,
    assert_facade_forward_and_save_match,
    assert_facade_generation_matches,
    assert_fmodel_save_loads_in_transformers,
    assert_greedy_generation_matches,
    assert_logits_match,
    assert_same_grads,
    decode_in_pieces,
    hf_generate,
    hf_logits,
    max_diff,
    save_variants,
    training_grads,
)

pytestmark = [requires_transformers, pytest.mark.usefixtures("one_thread")]

TOL = 1e-5
ATTENTIONS = ["eager", "sdpa", "flex_attention"]
ORIGINAL = 8  # longrope's original_max_position_embeddings

BASE = dict(TINY, pad_token_id=0, bos_token_id=1, eos_token_id=2)
VARIANTS = {
    "plain": {},
    "longrope": dict(
        num_key_value_heads=1,
        partial_rotary_factor=0.5,
        original_max_position_embeddings=ORIGINAL,
        rope_scaling={
            "type": "longrope",
            "short_factor": [1.0, 1.25, 1.5, 2.0],
            "long_factor": [1.5, 3.0, 6.0, 12.0],
        },
    ),
    "sliding": dict(sliding_window=4, tie_word_embeddings=True),
}


def make_model(variant: str, seed: int = 0):
    """The variant's tiny Transformers Phi-3 (eval, float32), norms perturbed, attention
    weights scaled up so that positions matter."""
    torch.manual_seed(seed)
    config = transformers.Phi3Config(**{**BASE, **VARIANTS[variant]})
    model = transformers.Phi3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("qkv_proj.weight"):
                p.mul_(4.0)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{variant: (folder, Transformers model)}, each saved by Transformers."""
    return save_variants(tmp_path_factory, VARIANTS, make_model)


# 5-token prompts: with 8 new tokens they cross the longrope switch (8)
prompts = functools.partial(parity_helpers.prompts, length=5, vocab=TINY["vocab_size"])


# --------------------------------------------------------------------------- logits


@pytest.mark.parametrize("seq", [7, 11], ids=["short-factors", "long-factors"])
@pytest.mark.parametrize("attn", ATTENTIONS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(saved, variant, attn, seq):
    folder, hf_model = saved[variant]
    state = fmodel.load(folder, attn_implementation=attn)
    assert state.architecture == "Phi3ForCausalLM"
    assert_logits_match(state, hf_model, TOL, seq=seq)


def test_base_model_matches_transformers_base(saved):
    folder, hf_model = saved["longrope"]
    state = fmodel.load(folder, architecture="Phi3Model")
    ids, mask = padded_batch(seq=11)
    ours = fmodel.forward(state, ids, attention_mask=mask).last_hidden_state
    hf_model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        theirs = hf_model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert max_diff(ours, theirs, mask) <= TOL


def test_the_special_features_change_the_logits(saved):
    """The parity above covers each feature: the long factors, the partial rotation and the
    window each move the logits."""
    ids, _ = padded_batch(seq=11)
    state = fmodel.load(saved["longrope"][0])
    # the same 7 tokens, alone (short factors) and as the head of 11 (long factors)
    short = fmodel.forward(state, ids[:, :7]).logits
    long = fmodel.forward(state, ids).logits[:, :7]
    assert (short - long).abs().max().item() > 1e-3
    plain = fmodel.load(saved["plain"][0])
    assert torch.allclose(
        fmodel.forward(plain, ids[:, :7]).logits, fmodel.forward(plain, ids).logits[:, :7], atol=1e-6
    )
    full = state.replace(config=state.config.replace(partial_rotary_factor=1.0, rope_scaling=None))
    assert (fmodel.forward(full, ids).logits - fmodel.forward(state, ids).logits).abs().max().item() > 1e-3
    sliding = fmodel.load(saved["sliding"][0])
    unwindowed = sliding.replace(config=sliding.config.replace(sliding_window=None))
    diff = fmodel.forward(sliding, ids).logits - fmodel.forward(unwindowed, ids).logits
    assert diff[:, :4].abs().max().item() <= 1e-6 < diff[:, 4:].abs().max().item()


def test_longrope_tables_are_transformers(saved):
    """inv_freq and the attention factor below and past the switch, as Transformers' rotary
    module computes them (its attention factor: sqrt(1 + ln(64 / 8) / ln 8))."""
    from fmodel.models.rope import rope_inv_freq

    _, hf_model = saved["longrope"]
    config = fmodel.load(saved["longrope"][0]).config
    rotary = hf_model.model.rotary_emb
    short, scale = rope_inv_freq(config)
    assert torch.equal(short, rotary.original_inv_freq)
    assert scale == rotary.attention_scaling == pytest.approx(2**0.5)
    assert torch.equal(rope_inv_freq(config, ORIGINAL)[0], short)
    x = torch.zeros(1, dtype=torch.float32)
    rotary(x, torch.arange(ORIGINAL + 1)[None])  # Transformers switches its buffer here
    assert torch.equal(rope_inv_freq(config, ORIGINAL + 1)[0], rotary.inv_freq)
    assert not torch.equal(rotary.inv_freq, short)
    rotary(x, torch.arange(ORIGINAL)[None])  # and back


def test_bfloat16_matches_transformers_bfloat16(saved):
    folder, _ = saved["longrope"]
    assert_bfloat16_matches(folder, 1e-3)


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", ["plain", "sliding"])
def test_greedy_generation_matches_transformers(saved, variant, attn):
    folder, hf_model = saved[variant]
    assert_greedy_generation_matches(folder, hf_model, attn, *prompts())


def _logits_steps(out) -> torch.Tensor:
    return torch.stack(out.logits, 1)  # [B, steps, V]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_generation_across_the_longrope_switch(saved, attn):
    """A 5-token prompt and 8 new tokens cross original_max_position_embeddings (8): the cache
    is rebuilt with the long factors at 9 tokens, as Transformers' Phi3ForCausalLM."""
    folder, hf_model = saved["longrope"]
    state = fmodel.load(folder, attn_implementation=attn)
    steps = dict(max_new_tokens=NEW, return_dict_in_generate=True, output_logits=True)
    # unpadded: Transformers' cached sdpa generation (its rerun is causal there)
    ids, mask = prompts(padded=False)
    ours = fmodel.generate(state, ids, attention_mask=mask, pad_token_id=0, **steps)
    theirs = hf_generate(hf_model, ids, mask, "sdpa", do_sample=False, **steps)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert (_logits_steps(ours) - _logits_steps(theirs)).abs().max().item() <= TOL
    beams = dict(max_new_tokens=NEW, num_beams=3, do_sample=False)  # beam search rebuilds too
    assert torch.equal(
        fmodel.generate(state, ids, attention_mask=mask, pad_token_id=0, **beams),
        hf_generate(hf_model, ids, mask, "sdpa", **beams),
    )
    # padded: Transformers without a cache (each step a full forward) is the reference
    ids, mask = prompts(seed=1)
    ours = fmodel.generate(state, ids, attention_mask=mask, pad_token_id=0, **steps)
    theirs = hf_generate(hf_model, ids, mask, attn, do_sample=False, use_cache=False, **steps)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert (_logits_steps(ours) - _logits_steps(theirs)).abs().max().item() <= TOL
    uncached = fmodel.generate(state, ids, attention_mask=mask, pad_token_id=0, use_cache=False, **steps)
    assert torch.equal(uncached.sequences, ours.sequences)


def test_transformers_eager_rerun_is_not_causal_and_fmodel_is(saved):
    """What the module docstring says of Transformers 4.57: at the rerun step (9 tokens) its
    eager generation scores the last token with a mask that lets earlier tokens see later ones,
    so its logits leave those of its own full forward; fmodel's stay on them."""
    folder, hf_model = saved["longrope"]
    ids, mask = prompts(padded=False)
    steps = dict(max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, output_logits=True)
    theirs = hf_generate(hf_model, ids, mask, "eager", **steps)
    rerun = ORIGINAL + 1 - ids.shape[1]  # the step that runs the 9 tokens again
    prefix = theirs.sequences[:, : ORIGINAL + 1]
    full = hf_logits(hf_model, prefix, None, "eager")[:, -1]
    assert (theirs.logits[rerun] - full).abs().max().item() > 1e-3
    ours = fmodel.generate(
        fmodel.load(folder, attn_implementation="eager"), ids, attention_mask=mask, pad_token_id=0, **steps
    )
    assert torch.equal(ours.sequences[:, : ORIGINAL + 1], prefix)  # the same tokens up to the rerun
    assert (ours.logits[rerun] - full).abs().max().item() <= TOL


def test_keeping_the_short_cache_would_differ(saved):
    """The rebuild matters: cached decoding past the switch over keys rotated with the short
    factors gives other logits than the full forward."""
    folder, _ = saved["longrope"]
    state = fmodel.load(folder)
    ids = prompts(length=11, padded=False)[0]
    full = fmodel.forward(state, ids).logits
    cache = fmodel.init_cache(state, 2, 11)
    head = fmodel.forward(state, ids[:, :ORIGINAL], past_key_values=cache)
    tail = fmodel.forward(state, ids[:, ORIGINAL:], past_key_values=head.past_key_values).logits
    assert torch.allclose(head.logits, fmodel.forward(state, ids[:, :ORIGINAL]).logits, atol=TOL)
    assert (tail - full[:, ORIGINAL:]).abs().max().item() > 1e-3


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_facade_generate_and_sampling_match_transformers(saved, variant):
    folder, hf_model = saved[variant]
    model = facade.AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == "Phi3ForCausalLM"
    assert model._no_split_modules == ["Phi3DecoderLayer"]
    padded = variant != "longrope"  # Transformers' cached rerun is causal only without padding
    assert_facade_generation_matches(model, hf_model, *prompts(seed=2, padded=padded))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", ["plain", "sliding"])
def test_cached_decode_equals_full_forward(saved, variant, attn):
    folder, _ = saved[variant]
    state = fmodel.load(folder, attn_implementation=attn)
    ids, mask = prompts(seed=3, length=11)  # past the window of 4
    full, pieces = decode_in_pieces(state, ids, mask, ((0, 5), (5, 6), (6, 9), (9, 10), (10, 11)))
    assert max_diff(torch.cat([p.logits for p in pieces], 1), full, mask) <= TOL


# --------------------------------------------------------------------------- save, facade, training


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fmodel_save_loads_in_transformers(saved, variant, tmp_path):
    folder, hf_model = saved[variant]
    state, reloaded = assert_fmodel_save_loads_in_transformers(folder, hf_model, tmp_path / "resaved")
    assert reloaded.config.tie_word_embeddings == state.config.tie_word_embeddings
    assert reloaded.config.rope_scaling == hf_model.config.rope_scaling


def test_facade_forward_and_save_match_transformers(saved, tmp_path):
    assert_facade_forward_and_save_match(*saved["longrope"], tmp_path, TOL)


def test_gradient_checkpointing_gives_the_same_gradients(saved):
    folder, _ = saved["longrope"]
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3))

    plain, checkpointed = (
        training_grads(facade.AutoModelForCausalLM.from_pretrained(folder), c, input_ids=ids, labels=ids)
        for c in (False, True)
    )
    assert any(name.endswith("qkv_proj.weight") for name in plain)
    assert_same_grads(plain, checkpointed)


def test_residual_dropout_runs_in_training_only(saved):
    folder, _ = saved["plain"]
    state = fmodel.load(folder)
    dropped = state.replace(config=state.config.replace(resid_pdrop=0.5))
    ids = torch.randint(0, TINY["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(6))
    base = fmodel.forward(state, ids).logits
    assert torch.equal(fmodel.forward(dropped, ids).logits, base)  # inference: no dropout
    torch.manual_seed(0)
    assert not torch.allclose(fmodel.forward(dropped, ids, training=True).logits, base, atol=1e-3)
    assert torch.allclose(fmodel.forward(state, ids, training=True).logits, base, atol=1e-6)


# --------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resize_init_and_quantize_run(saved, variant, tmp_path):
    state = fmodel.load(saved[variant][0])
    ids = torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(4))
    base = fmodel.forward(state, ids).logits
    grown = fmodel.resize_token_embeddings(state, 104, mean_resizing=False)
    assert fmodel.forward(grown, ids).logits.shape[-1] == 104
    assert torch.allclose(fmodel.forward(grown, ids).logits[..., :96], base, atol=1e-5)
    fresh = fmodel.init(state.config, architecture=state.architecture, seed=0)
    assert set(fresh.params) == set(state.params)
    assert fmodel.forward(fresh, ids).logits.isfinite().all()
    for scheme, tol in (("int8", 0.1), ("int4", 1.5)):
        quantized = fmodel.quantize(state, scheme, group_size=32)
        names = quantized.config.extra["quantization_config"]["modules"]
        assert "model.layers.0.self_attn.qkv_proj" in names and "model.layers.0.mlp.gate_up_proj" in names
        assert (fmodel.forward(quantized, ids).logits - base).abs().max().item() < tol
        fmodel.save(quantized, tmp_path / scheme)
        assert torch.equal(
            fmodel.forward(fmodel.load(tmp_path / scheme), ids).logits, fmodel.forward(quantized, ids).logits
        )


def _unfused_llama(hf_phi3, folder):
    """A Llama checkpoint with Phi-3 "plain"'s weights, qkv_proj and gate_up_proj split."""
    c = hf_phi3.config
    config = transformers.LlamaConfig(
        **{**TINY, "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "pad_token_id": 0}
    )
    llama = transformers.LlamaForCausalLM(config).eval()
    q, kv = c.num_attention_heads * 16, c.num_key_value_heads * 16
    weights = {}
    for name, tensor in hf_phi3.state_dict().items():
        if name.endswith("qkv_proj.weight"):
            for part, piece in zip("qkv", tensor.split((q, kv, kv)), strict=True):
                weights[name.replace("qkv_proj", f"{part}_proj")] = piece
        elif name.endswith("gate_up_proj.weight"):
            gate, up = tensor.chunk(2)
            weights[name.replace("gate_up_proj", "gate_proj")] = gate
            weights[name.replace("gate_up_proj", "up_proj")] = up
        else:
            weights[name] = tensor
    llama.load_state_dict(weights)
    llama.save_pretrained(folder)
    return folder


def test_prune_heads_equals_pruning_the_unfused_weights(saved, tmp_path):
    """Pruning the fused q|k|v rows (a whole key/value group) removes what pruning Llama's
    separate q/k/v projections removes: same weights after, same logits."""
    folder, hf_model = saved["plain"]
    phi3 = fmodel.load(folder)
    llama = fmodel.load(_unfused_llama(hf_model, tmp_path / "llama"))
    ids, mask = padded_batch(seq=11)
    assert (
        max_diff(
            fmodel.forward(phi3, ids, attention_mask=mask).logits,
            fmodel.forward(llama, ids, attention_mask=mask).logits,
            mask,
        )
        <= TOL
    )
    heads = {0: [2, 3], 1: [0, 1]}  # 2 query heads per key/value head: whole groups
    fused, split = fmodel.prune_heads(phi3, heads), fmodel.prune_heads(llama, heads)
    for layer in range(2):
        p = f"model.layers.{layer}.self_attn."
        expected = torch.cat([split.params[p + f"{s}_proj.weight"] for s in "qkv"])
        assert fused.params[p + "qkv_proj.weight"].shape == (
            2 * 16 + 2 * 16,
            64,
        )  # 2 query heads, 1 key and 1 value head left
        assert torch.equal(fused.params[p + "qkv_proj.weight"], expected)
        assert torch.equal(fused.params[p + "o_proj.weight"], split.params[p + "o_proj.weight"])
    ours = fmodel.forward(fused, ids, attention_mask=mask).logits
    assert max_diff(ours, fmodel.forward(split, ids, attention_mask=mask).logits, mask) <= TOL
    # (Transformers' decoders cannot prune heads, so the pruned checkpoint is fmodel's alone)
    fmodel.save(fused, tmp_path / "pruned")
    assert torch.equal(
        fmodel.forward(fmodel.load(tmp_path / "pruned"), ids, attention_mask=mask).logits, ours
    )


def test_stack_states_and_vmap_forward(saved):
    a = fmodel.load(saved["longrope"][0])
    b = fmodel.init(a.config, architecture=a.architecture, seed=1)
    stacked = fmodel.stack_states([a, b])
    ids, mask = padded_batch(seq=11)
    both = fmodel.vmap_forward(stacked, ids, attention_mask=mask).logits
    assert both.shape[0] == 2
    for i, member in enumerate((a, b)):
        alone = fmodel.forward(member, ids, attention_mask=mask).logits
        assert max_diff(both[i], alone, mask) <= TOL


def test_gguf_reader_does_not_claim_phi3():
    """fmodel's GGUF reader loads no Phi-3 file: it refuses one by name, not as a Llama."""
    from types import SimpleNamespace

    from fmodel.io import gguf

    assert "phi3" not in gguf.GGUF_ARCHITECTURES
    with pytest.raises(fmodel.CheckpointError, match="'phi3'"):
        gguf._arch(SimpleNamespace(architecture="phi3", path="model.gguf"))
