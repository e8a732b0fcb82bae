"""Parity with Transformers 4.57 for T5: `T5ForConditionalGeneration`, `T5Model`, `T5EncoderModel`.

Transformers builds each tiny random model and saves it; fmodel loads it. Two variants: T5 v1.0
(ReLU feed-forward, LM head tied to `shared`, decoder output scaled by d_model**-0.5) and v1.1
(gated-GELU, untied head, no scaling, a decoder deeper than the encoder). Both have 32 relative
position buckets with max_distance 20 over sequences of 8-12 tokens: the log-spaced buckets and
the one past max_distance are in use (the tables cover more than the sequence). Transformers' T5
has only eager attention; fmodel's eager, sdpa and flex must give its numbers (<= 1e-5, float32)
on encoder batches padded on the left (row 0) and the right (row 1) with a padded decoder mask.
"""

from __future__ import annotations

import pytest
import torch

import fmodel
from fmodel import attention, facade
from fmodel.errors import ConfigError, InvalidArgumentError
from fmodel.generation.seq2seq_cache import Seq2SeqCache
from fmodel.models.t5 import relative_position_bucket

from .conftest import requires_transformers, transformers
from .parity_helpers import assert_same_grads, max_diff, save_variants, training_grads

pytestmark = [requires_transformers, pytest.mark.usefixtures("one_thread")]

TOL = 1e-5
ATTENTIONS = ["eager", "sdpa", "flex_attention"]
VOCAB = 120
TINY = dict(
    vocab_size=VOCAB,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=20,
    decoder_start_token_id=0,
)
VARIANTS = {
    "v1.0": dict(feed_forward_proj="relu"),
    "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_decoder_layers=3),
}


def make_model(variant: str, cls: str = "T5ForConditionalGeneration", seed: int = 0):
    """The variant's tiny Transformers model (eval, float32), layer norms perturbed. An untied
    LM head is scaled by d_model**-0.5: drawn with Transformers' std 1.0 it gives logits near
    20, whose float32 rounding in sdpa's fused kernel alone is ~1e-5 (eager and flex are
    bit-equal to Transformers either way); scaled, the logits are of v1.0's size."""
    torch.manual_seed(seed)
    config = transformers.T5Config(**{**TINY, **VARIANTS[variant]})
    model = getattr(transformers, cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        if hasattr(model, "lm_head") and not config.tie_word_embeddings:
            model.lm_head.weight.mul_(config.d_model**-0.5)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{variant: (folder, Transformers T5ForConditionalGeneration)}, saved by Transformers."""
    return save_variants(tmp_path_factory, VARIANTS, lambda variant, seed: make_model(variant, seed=seed))


def batch(seed: int = 0, source: int = 12, target: int = 8):
    """Encoder ids/mask [2, source] (row 0 left-padded by 3, row 1 right-padded by 4), decoder
    ids [2, target] and a decoder mask with row 1 right-padded by 2."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (2, source), generator=g)
    mask = torch.ones(2, source, dtype=torch.long)
    mask[0, :3] = 0
    mask[1, source - 4 :] = 0
    dec = torch.randint(2, VOCAB, (2, target), generator=g)
    dec_mask = torch.ones(2, target, dtype=torch.long)
    dec_mask[1, target - 2 :] = 0
    return ids, mask, dec, dec_mask


def hf_run(model, **inputs):
    with torch.no_grad():
        return model(**inputs)


def hf_generate(model, ids, mask, **kwargs):
    """Transformers' generate. Its 4.57 generate sizes the decoder cache by `num_layers` (the
    encoder's), so a deeper decoder (v1.1 here) fails with a cache: then without one (the
    same tokens, recomputed)."""
    config = model.config
    if config.num_decoder_layers != config.num_layers:
        kwargs["use_cache"] = False
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, **kwargs)


# --------------------------------------------------------------------------- config


def test_config_defaults_and_names_are_transformers():
    ours, theirs = fmodel.T5Config(), transformers.T5Config()
    for field in (
        "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "dropout_rate",
        "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon",
        "initializer_factor", "feed_forward_proj", "is_encoder_decoder", "pad_token_id",
        "eos_token_id", "decoder_start_token_id", "tie_word_embeddings", "classifier_dropout",
    ):  # fmt: skip
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.decoder_layers == theirs.num_decoder_layers
    assert (ours.dense_act_fn, ours.is_gated_act) == (theirs.dense_act_fn, theirs.is_gated_act)
    v11 = fmodel.T5Config(feed_forward_proj="gated-gelu")
    assert (v11.dense_act_fn, v11.is_gated_act) == ("gelu_new", True)
    # generic names as Transformers' attribute_map; a config.json's dense_act_fn wins as there
    read = fmodel.config_from_dict(
        {"model_type": "t5", "hidden_size": 48, "num_attention_heads": 6, "num_hidden_layers": 3,
         "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu"}
    )  # fmt: skip
    assert (read.d_model, read.num_heads, read.num_layers, read.hidden_size) == (48, 6, 3, 48)
    assert (
        read.dense_act_fn
        == transformers.T5Config(feed_forward_proj="gated-gelu", dense_act_fn="gelu").dense_act_fn
    )
    assert read.to_diff_dict()["dense_act_fn"] == "gelu"  # kept as the file had it


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"feed_forward_proj": "gated-gelu-x"}, "feed_forward_proj"),
        ({"feed_forward_proj": "swiglu"}, "not implemented"),
        ({"relative_attention_num_buckets": 2}, "at least 4"),
        ({"relative_attention_num_buckets": 32, "relative_attention_max_distance": 16}, "log"),
        ({"pruned_heads": {"0": [1]}}, "pruned"),
        ({"is_gated_act": "yes"}, "is_gated_act"),
        ({"d_model": 2**40}, "beyond the bound"),
        ({"num_decoder_layers": 0}, "positive"),
    ],
)
def test_bad_configs_are_refused_with_a_config_error(fields, match):
    with pytest.raises(ConfigError, match=match):
        fmodel.config_from_dict({"model_type": "t5", **fields})


def test_relative_buckets_equal_transformers_beyond_max_distance():
    """Every distance from -40 to 40 (twice max_distance) in both directions' bucketing."""
    rel = torch.arange(-40, 41)[None, :] - torch.arange(0, 3)[:, None]
    for bidirectional in (True, False):
        ours = relative_position_bucket(rel, bidirectional, 32, 20)
        theirs = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
            rel, bidirectional=bidirectional, num_buckets=32, max_distance=20
        )
        assert torch.equal(ours, theirs)
        assert len(ours.unique()) > 12  # exact, log-spaced and saturated buckets all occur


# --------------------------------------------------------------------------- forward parity


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("attn", ATTENTIONS)
def test_logits_and_encoder_states_match_transformers(saved, variant, attn):
    folder, model = saved[variant]
    state = fmodel.load(folder, attn_implementation=attn)
    ids, mask, dec, dec_mask = batch()
    ref = hf_run(
        model, input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask
    )
    out = fmodel.forward(
        state, ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask
    )
    assert max_diff(out.logits, ref.logits, dec_mask) <= TOL
    assert max_diff(out.encoder_last_hidden_state, ref.encoder_last_hidden_state, mask) <= TOL


@pytest.mark.parametrize("variant", VARIANTS)
def test_hidden_states_attentions_and_cross_attentions_match(saved, variant):
    folder, model = saved[variant]
    state = fmodel.load(folder)
    ids, mask, dec, _ = batch(1)
    flags = dict(output_hidden_states=True, output_attentions=True)
    ref = hf_run(model, input_ids=ids, attention_mask=mask, decoder_input_ids=dec, **flags)
    out = fmodel.forward(state, ids, attention_mask=mask, decoder_input_ids=dec, **flags)
    pairs = [
        (out.hidden_states, ref.decoder_hidden_states),
        (out.attentions, ref.decoder_attentions),
        (out.cross_attentions, ref.cross_attentions),
        (out.encoder_hidden_states, ref.encoder_hidden_states),
        (out.encoder_attentions, ref.encoder_attentions),
    ]
    for ours, theirs in pairs:
        assert len(ours) == len(theirs)
        assert max(max_diff(a, b) for a, b in zip(ours, theirs, strict=True)) <= TOL


@pytest.mark.parametrize("variant", VARIANTS)
def test_base_and_encoder_classes_match_transformers(saved, variant, tmp_path):
    folder, _ = saved[variant]
    ids, mask, dec, dec_mask = batch(2)
    for cls in ("T5Model", "T5EncoderModel"):
        model = make_model(variant, cls, seed=5)
        model.save_pretrained(tmp_path / cls)
        state = fmodel.load(tmp_path / cls)
        assert state.architecture == cls
        if cls == "T5Model":
            ref = hf_run(
                model,
                input_ids=ids,
                attention_mask=mask,
                decoder_input_ids=dec,
                decoder_attention_mask=dec_mask,
            )
            out = fmodel.forward(
                state, ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask
            )
            assert max_diff(out.last_hidden_state, ref.last_hidden_state, dec_mask) <= TOL
            assert max_diff(out.encoder_last_hidden_state, ref.encoder_last_hidden_state, mask) <= TOL
        else:
            ref = hf_run(model, input_ids=ids, attention_mask=mask)
            for attn in ("eager", "sdpa"):
                out = fmodel.forward(state, ids, attention_mask=mask, attn_implementation=attn)
                assert max_diff(out.last_hidden_state, ref.last_hidden_state, mask) <= TOL
    # the encoder of a full checkpoint, loaded as T5EncoderModel (the decoder is ignored)
    encoder = fmodel.load(folder, architecture="T5EncoderModel")
    full = fmodel.forward(fmodel.load(folder), ids, attention_mask=mask, decoder_input_ids=dec)
    assert torch.equal(
        fmodel.forward(encoder, ids, attention_mask=mask).last_hidden_state, full.encoder_last_hidden_state
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_labels_shift_into_decoder_inputs_and_the_loss_matches(saved, variant):
    folder, model = saved[variant]
    ids, mask, labels, _ = batch(3)
    labels[1, 5:] = -100
    ref = hf_run(model, input_ids=ids, attention_mask=mask, labels=labels)
    out = fmodel.forward(fmodel.load(folder), ids, attention_mask=mask, labels=labels)
    assert max_diff(out.logits, ref.logits) <= TOL
    ours = facade.AutoModelForSeq2SeqLM.from_pretrained(folder)(
        input_ids=ids, attention_mask=mask, labels=labels
    )
    assert abs(ours.loss.item() - ref.loss.item()) <= TOL
    assert max_diff(ours.logits, out.logits) <= TOL
    shifted = facade.T5ForConditionalGeneration.from_pretrained(folder).prepare_decoder_input_ids_from_labels(
        labels
    )
    assert torch.equal(shifted, model.prepare_decoder_input_ids_from_labels(labels))


def test_the_relative_bias_and_the_head_scaling_change_the_logits(saved):
    """The features under test are live: zeroing the bias tables, or the v1.0 head's
    d_model**-0.5 scaling, moves the logits far beyond the tolerance."""
    folder, _ = saved["v1.0"]
    state = fmodel.load(folder)
    ids, mask, dec, _ = batch(4)
    base = fmodel.forward(state, ids, attention_mask=mask, decoder_input_ids=dec).logits
    params = dict(state.params)
    for name in [n for n in params if n.endswith("relative_attention_bias.weight")]:
        params[name] = torch.zeros_like(params[name])
    no_bias = state.replace(params=params)
    assert (
        max_diff(fmodel.forward(no_bias, ids, attention_mask=mask, decoder_input_ids=dec).logits, base) > 1e-2
    )
    untied = fmodel.untie_weights(state.replace(config=state.config.replace(tie_word_embeddings=False)))
    unscaled = fmodel.forward(untied, ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert torch.allclose(unscaled * state.config.d_model**-0.5, base, atol=1e-5)


def test_flash_attention_is_refused_with_a_named_error(saved):
    """A padding-mask kernel (what flash attention takes) cannot add T5's bias: named refusal."""
    folder, _ = saved["v1.0"]
    attention.register("t5_test_varlen", attention.sdpa_attention, mask_kind="padding")
    try:
        state = fmodel.load(folder, attn_implementation="t5_test_varlen")
        ids, mask, dec, _ = batch()
        with pytest.raises(InvalidArgumentError, match="relative position bias"):
            fmodel.forward(state, ids, attention_mask=mask, decoder_input_ids=dec)
    finally:
        attention.unregister("t5_test_varlen")
    # a block-mask function that would swallow the bias in **kwargs is refused too
    attention.register("t5_test_block", lambda module, q, k, v, mask, **kwargs: None, mask_kind="block")
    try:
        state = fmodel.load(folder, attn_implementation="t5_test_block")
        with pytest.raises(InvalidArgumentError, match="score_mod"):
            fmodel.forward(state, ids, attention_mask=mask, decoder_input_ids=dec)
    finally:
        attention.unregister("t5_test_block")


# --------------------------------------------------------------------------- cache and generation


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cached_decode_equals_full_forward(saved, variant, attn):
    folder, _ = saved[variant]
    state = fmodel.load(folder, attn_implementation=attn)
    ids, mask, dec, _ = batch(5)
    full = fmodel.forward(state, ids, attention_mask=mask, decoder_input_ids=dec).logits
    cache = fmodel.init_cache(state, 2, dec.shape[1])
    assert len(cache.keys) == state.config.decoder_layers
    out = fmodel.forward(state, ids, attention_mask=mask, decoder_input_ids=dec[:, :3], past_key_values=cache)
    steps, cache, encoded = [out.logits], out.past_key_values, out.encoder_last_hidden_state
    assert isinstance(cache, Seq2SeqCache) and cache.length == 3 and cache.cross_keys is not None
    for t in range(3, dec.shape[1]):
        out = fmodel.forward(
            state, None, attention_mask=mask, decoder_input_ids=dec[:, t : t + 1],
            encoder_outputs=encoded, past_key_values=cache,
        )  # fmt: skip
        assert out.past_key_values.cross_keys is cache.cross_keys  # computed once, carried
        steps.append(out.logits)
        cache = out.past_key_values
    assert max_diff(torch.cat(steps, 1), full) <= TOL


def prompts(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    mask[2, 6:] = 0  # right padding
    return ids, mask


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_greedy_generation_matches_transformers_token_for_token(saved, variant, attn):
    folder, model = saved[variant]
    ids, mask = prompts()
    ref = hf_generate(model, ids, mask, do_sample=False, max_new_tokens=12)
    state = fmodel.load(folder, attn_implementation=attn)
    assert torch.equal(
        fmodel.generate(state, ids, attention_mask=mask, do_sample=False, max_new_tokens=12), ref
    )
    no_cache = fmodel.generate(state, ids, attention_mask=mask, max_new_tokens=12, use_cache=False)
    assert torch.equal(no_cache, ref)
    ours = facade.AutoModelForSeq2SeqLM.from_pretrained(folder, attn_implementation=attn)
    assert torch.equal(ours.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12), ref)


@pytest.mark.parametrize("variant", VARIANTS)
def test_beam_search_and_seeded_sampling_match_transformers(saved, variant):
    folder, model = saved[variant]
    state = fmodel.load(folder)
    ids, mask = prompts(1)
    beams = dict(num_beams=3, num_return_sequences=2, max_new_tokens=8)
    ref = hf_generate(model, ids, mask, **beams)
    assert torch.equal(fmodel.generate(state, ids, attention_mask=mask, **beams), ref)
    sampling = dict(do_sample=True, top_k=30, temperature=0.8, max_new_tokens=10)
    torch.manual_seed(7)
    ref = hf_generate(model, ids, mask, **sampling)
    torch.manual_seed(7)
    assert torch.equal(fmodel.generate(state, ids, attention_mask=mask, **sampling), ref)


# --------------------------------------------------------------------------- save, facade, training


@pytest.mark.parametrize("variant", VARIANTS)
def test_fmodel_save_loads_in_transformers(saved, variant, tmp_path):
    folder, model = saved[variant]
    state = fmodel.load(folder)
    fmodel.save(state, tmp_path)
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    from safetensors import safe_open

    def stored(path):
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            return set(f.keys())

    assert stored(tmp_path) == stored(folder)  # `shared` once; lm_head only when untied
    assert (reloaded.lm_head.weight is reloaded.shared.weight) == state.config.tie_word_embeddings
    ids, mask, dec, _ = batch(6)
    ref = hf_run(model, input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert torch.equal(
        hf_run(reloaded, input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, ref
    )
    assert (tmp_path / "generation_config.json").exists()


@pytest.mark.parametrize("variant", VARIANTS)
def test_facade_forward_cache_and_save_match_transformers(saved, variant, tmp_path):
    folder, model = saved[variant]
    ours = facade.AutoModelForSeq2SeqLM.from_pretrained(folder)
    assert type(ours).__name__ == "T5ForConditionalGeneration" and ours.config.is_encoder_decoder
    assert ours.can_generate() and ours._no_split_modules == ["T5Block"]
    ids, mask, dec, dec_mask = batch(7)
    flags = dict(output_hidden_states=True, output_attentions=True)
    inputs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
    ref = hf_run(model, **inputs, **flags)
    with torch.no_grad():
        out = ours(**inputs, **flags)
    assert type(out).__name__ == "Seq2SeqLMOutput" and list(out.keys()) == list(ref.keys())
    assert max_diff(out.logits, ref.logits, dec_mask) <= TOL
    assert max_diff(out.cross_attentions[-1], ref.cross_attentions[-1]) <= TOL
    encoder = ours.get_encoder()(input_ids=ids, attention_mask=mask)
    assert type(encoder).__name__ == "BaseModelOutput"
    assert max_diff(encoder.last_hidden_state, ref.encoder_last_hidden_state, mask) <= TOL
    decoder_inputs = dict(
        input_ids=dec, attention_mask=dec_mask, encoder_hidden_states=encoder.last_hidden_state,
        encoder_attention_mask=mask, use_cache=False,
    )  # fmt: skip
    decoded = ours.get_decoder()(**decoder_inputs)
    with torch.no_grad():
        hf_decoded = model.get_decoder()(**decoder_inputs)
    assert type(decoded).__name__ == type(hf_decoded).__name__
    assert max_diff(decoded.last_hidden_state, hf_decoded.last_hidden_state, dec_mask) <= TOL
    with torch.no_grad():  # the facade's cache grows as Transformers' DynamicCache
        first = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec[:, :5], use_cache=True)
        rest = ours(
            encoder_outputs=encoder, attention_mask=mask, decoder_input_ids=dec[:, 5:],
            past_key_values=first.past_key_values,
        )  # fmt: skip
    assert max_diff(torch.cat([first.logits, rest.logits], 1), ref.logits, dec_mask) <= TOL
    ours.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert torch.equal(hf_run(reloaded, **inputs).logits, ref.logits)


def test_facade_base_and_encoder_classes(saved):
    folder, model = saved["v1.1"]
    ids, mask, dec, _ = batch(8)
    ref = hf_run(model, input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
    base = facade.AutoModel.from_pretrained(folder)
    assert type(base).__name__ == "T5Model"
    with torch.no_grad():
        out = base(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
    assert type(out).__name__ == "Seq2SeqModelOutput"
    assert max_diff(out.encoder_last_hidden_state, ref.encoder_last_hidden_state, mask) <= TOL
    encoder = facade.T5EncoderModel.from_pretrained(folder)
    with torch.no_grad():
        enc = encoder(input_ids=ids, attention_mask=mask)
    assert type(enc).__name__ == "BaseModelOutput"
    assert max_diff(enc.last_hidden_state, ref.encoder_last_hidden_state, mask) <= TOL


def test_gradient_checkpointing_gives_the_same_gradients(saved):
    folder, _ = saved["v1.1"]
    ids, mask, labels, _ = batch(9)

    # seed 0 in both runs: the same dropout masks (the recomputation replays the RNG)
    plain, checkpointed = (
        training_grads(
            facade.AutoModelForSeq2SeqLM.from_pretrained(folder),
            c,
            seed=0,
            input_ids=ids,
            attention_mask=mask,
            labels=labels,
        )
        for c in (False, True)
    )
    assert_same_grads(plain, checkpointed)


def test_resize_tie_init_quantize_and_vmap(saved, tmp_path):
    folder, _ = saved["v1.1"]
    state = fmodel.load(folder)
    ids, mask, dec, _ = batch(10)
    base = fmodel.forward(state, ids, attention_mask=mask, decoder_input_ids=dec).logits
    grown = fmodel.resize_token_embeddings(state, VOCAB + 8, mean_resizing=False)
    assert grown.params["encoder.embed_tokens.weight"] is grown.params["shared.weight"]
    logits = fmodel.forward(grown, ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert logits.shape[-1] == VOCAB + 8 and torch.equal(logits[..., :VOCAB], base)
    tied = fmodel.tie_weights(state.replace(config=state.config.replace(tie_word_embeddings=True)))
    assert tied.ties["lm_head.weight"] == "shared.weight"
    fresh = fmodel.init(state.config, architecture=state.architecture, seed=0)
    assert set(fresh.params) == set(state.params)
    assert fresh.params["lm_head.weight"].std().item() == pytest.approx(1.0, rel=0.2)  # T5's factor * 1.0
    quantized = fmodel.quantize(state, "int8")
    fmodel.save(quantized, tmp_path / "q")
    again = fmodel.forward(
        fmodel.load(tmp_path / "q"), ids, attention_mask=mask, decoder_input_ids=dec
    ).logits
    assert torch.equal(
        again, fmodel.forward(quantized, ids, attention_mask=mask, decoder_input_ids=dec).logits
    )
    assert (
        max_diff(
            fmodel.to(state, dtype=torch.bfloat16).params["shared.weight"].float(),
            state.params["shared.weight"],
        )
        < 0.05
    )
    stacked = fmodel.stack_states([state, fresh])
    both = fmodel.vmap_forward(stacked, ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert max_diff(both[0], base) <= TOL
    assert (
        max_diff(both[1], fmodel.forward(fresh, ids, attention_mask=mask, decoder_input_ids=dec).logits)
        <= TOL
    )


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("cls", ["T5ForConditionalGeneration", "T5Model", "T5EncoderModel"])
def test_init_in_transformers_draw_order_matches_transformers(variant, cls):
    """Transformers' construction, number for number (each stack is initialised by its own
    post_init while the model is built), and the global generator left where it leaves it."""
    fields = {**TINY, **VARIANTS[variant], "initializer_factor": 0.7}
    torch.manual_seed(5)
    ours = fmodel.init(
        fmodel.config_from_dict({"model_type": "t5", **fields}), architecture=cls, draw_order="transformers"
    )
    after_ours = torch.rand(2)
    torch.manual_seed(5)
    theirs = getattr(transformers, cls)(transformers.T5Config(**fields)).state_dict()
    assert torch.equal(torch.rand(2), after_ours)
    assert set(ours.params) == set(theirs)
    for name, p in theirs.items():
        assert torch.equal(ours.params[name], p), name
    if cls == "T5ForConditionalGeneration":  # the facade's constructor draws the same
        torch.manual_seed(5)
        model = facade.T5ForConditionalGeneration(transformers.T5Config(**fields))
        assert all(torch.equal(p, theirs[n]) for n, p in model.state_dict().items())


def test_facade_generate_dict_is_transformers_encoder_decoder_output(saved):
    folder, model = saved["v1.0"]
    ours = facade.AutoModelForSeq2SeqLM.from_pretrained(folder)
    ids, mask = prompts(2)
    for beams in (1, 2):
        kwargs = dict(max_new_tokens=5, num_beams=beams, return_dict_in_generate=True, output_scores=True)
        got = ours.generate(ids, attention_mask=mask, **kwargs)
        want = hf_generate(model, ids, mask, **kwargs)
        assert type(got).__name__ == type(want).__name__  # Generate[Beam]EncoderDecoderOutput
        assert torch.equal(got.sequences, want.sequences)
        assert max(max_diff(a, b) for a, b in zip(got.scores, want.scores, strict=True)) <= TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_transformers_exactly(saved, dtype):
    """Eager in half precision, op for op: gated-GELU's formula (NewGELUActivation), and in
    float16 `wo` kept in float32 as Transformers' `_keep_in_fp32_modules` loads it. bfloat16 is
    bit for bit; float16's float32 `wo` runs fmodel's float32 products (the dense kernel,
    oneDNN), whose summation order differs from MKL's: within one float16 ulp."""
    folder, _ = saved["v1.1"]
    theirs = transformers.T5ForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()
    state = fmodel.load(folder, dtype=dtype, attn_implementation="eager")
    wo = "encoder.block.0.layer.1.DenseReluDense.wo.weight"
    assert (
        state.params[wo].dtype
        == theirs.get_parameter(wo).dtype
        == (torch.float32 if dtype == torch.float16 else dtype)
    )
    ids, mask, dec, dec_mask = batch(11)
    inputs = dict(attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
    ref = hf_run(theirs, input_ids=ids, **inputs)
    out = fmodel.forward(state, ids, **inputs)
    if dtype == torch.bfloat16:
        assert torch.equal(out.logits, ref.logits) and torch.equal(
            out.encoder_last_hidden_state, ref.encoder_last_hidden_state
        )
    else:
        ulp = dict(rtol=2.0**-10, atol=2.0**-10)
        torch.testing.assert_close(out.logits, ref.logits, **ulp)
        torch.testing.assert_close(out.encoder_last_hidden_state, ref.encoder_last_hidden_state, **ulp)
    ours = facade.T5ForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    assert ours.get_parameter(wo).dtype == state.params[wo].dtype
    assert facade.T5ForConditionalGeneration._keep_in_fp32_modules == ["wo"]


def test_training_with_dropout_matches_transformers(saved):
    """Train mode, eager: the same dropout masks in Transformers' order (embeddings, attention
    weights, each sublayer, the feed-forward inside, the final norm), so loss and gradients agree."""
    folder, _ = saved["v1.1"]
    ours = facade.T5ForConditionalGeneration.from_pretrained(folder, attn_implementation="eager")
    theirs = transformers.T5ForConditionalGeneration.from_pretrained(folder)
    ours.train()
    theirs.train()
    ids, mask, labels, _ = batch(12)
    torch.manual_seed(3)
    want = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    torch.manual_seed(3)
    got = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert abs(got.loss.item() - want.loss.item()) <= TOL
    got.loss.backward()
    want.loss.backward()
    for name, p in theirs.named_parameters():
        assert max_diff(ours.get_parameter(name).grad, p.grad) <= 1e-4, name


def test_generation_from_a_decoder_prompt_matches_transformers(saved):
    """`decoder_input_ids` continue a decoder prompt; the start token goes first unless every
    row begins with it (Transformers' rule, quirk included)."""
    folder, model = saved["v1.0"]
    state = fmodel.load(folder)
    ours = facade.AutoModelForSeq2SeqLM.from_pretrained(folder)
    ids, mask = prompts(3)
    for dec in ([[5, 6], [7, 8], [9, 3]], [[0, 6], [0, 8], [0, 3]], [[0, 6], [7, 8], [0, 3]]):
        dec = torch.tensor(dec)
        for beams in (1, 2):
            kwargs = dict(decoder_input_ids=dec, max_new_tokens=5, num_beams=beams)
            want = hf_generate(model, ids, mask, **kwargs)
            assert torch.equal(fmodel.generate(state, ids, attention_mask=mask, **kwargs), want)
            assert torch.equal(ours.generate(ids, attention_mask=mask, **kwargs), want)
    with pytest.raises(InvalidArgumentError, match="a row per prompt"):
        fmodel.generate(state, ids, decoder_input_ids=torch.tensor([[5, 6]]))
    llama = fmodel.init(fmodel.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2), seed=0)  # fmt: skip
    with pytest.raises(InvalidArgumentError, match="encoder-decoders"):
        fmodel.generate(llama, ids % 64, decoder_input_ids=dec, max_new_tokens=2)
