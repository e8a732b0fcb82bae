"""Generation with an explicit KV cache: token-for-token parity with Transformers' `generate`,
cached forwards equal to full recomputes, logits processors equal to Transformers', and the
purity contract of the cache (an old cache value stays valid)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fmodel
from fmodel import attention
from fmodel.facade.generation import GenerationMixin
from fmodel.generation.cache import reorder_cache
from fmodel.generation.logits_process import (
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    suppress_tokens,
)

from .conftest import make_hf_model, requires_transformers, transformers

pytestmark = requires_transformers

NEW = 10
VARIANTS = {
    "llama-gqa-tied": ("llama", {"tie_word_embeddings": True}),
    "qwen2": ("qwen2", {}),
    # the window (4) is shorter than prompt + new tokens: decoding runs past it
    "mistral-sliding": ("mistral", {"sliding_window": 4}),
    "gpt2": ("gpt2", {}),
}
FEW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine every parallel
    region of a decode step can wait a scheduler slice for it (10x slower tests)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{variant: (folder, Transformers model)}, each saved by Transformers."""
    out = {}
    for i, (name, (model_type, overrides)) in enumerate(VARIANTS.items()):
        model = make_gpt2(i) if model_type == "gpt2" else make_hf_model(model_type, seed=i, **overrides)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (folder, model)
    return out


def prompts(seed: int = 0, rows: int = 2, length: int = 7, pad: int = 0):
    """input_ids [rows, length] and a mask; row 0 is left-padded by 2 (when rows > 1)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    if rows > 1:
        mask[0, :2] = 0
        ids[0, :2] = pad
    return ids, mask


def hf_generate(model, attn: str, ids, mask, **kwargs):
    model.config._attn_implementation = "eager" if attn == "flex_attention" else attn
    kwargs.setdefault("pad_token_id", 0)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, **kwargs)


# --------------------------------------------------------------------------- greedy parity


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_matches_transformers(saved, variant, attn):
    folder, model = saved[variant]
    state = fmodel.load(folder, attn_implementation=attn)
    ids, mask = prompts()
    ours = fmodel.generate(state, ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=0)
    theirs = hf_generate(model, attn, ids, mask, max_new_tokens=NEW, do_sample=False)
    assert ours.dtype == torch.long
    assert torch.equal(ours, theirs)


def test_greedy_flex_attention_matches(saved):
    # flex builds a BlockMask per step (uncompiled on CPU: slow), so one variant, few tokens;
    # its cached masks are the same `MaskInputs` rule the other tests check at length
    folder, model = saved["mistral-sliding"]
    state = fmodel.load(folder, attn_implementation="flex_attention")
    ids, mask = prompts()
    ours = fmodel.generate(state, ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0)
    assert torch.equal(ours, hf_generate(model, "eager", ids, mask, max_new_tokens=4))


def test_transformers_attention_functions_registered_unchanged(saved):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import eager_attention_forward

    folder, model = saved["llama-gqa-tied"]
    state = fmodel.load(folder)
    ids, mask = prompts()
    expected = hf_generate(model, "sdpa", ids, mask, max_new_tokens=NEW)
    try:
        attention.register("hf_eager_gen", eager_attention_forward)
        attention.register("hf_sdpa_gen", sdpa_attention_forward, mask_kind="bool")
        for name in ("hf_eager_gen", "hf_sdpa_gen"):
            custom = fmodel.set_attn_implementation(state, name)
            for m in (mask, None):  # padded (a mask each step) and unpadded (None when exact)
                rows = slice(None) if m is not None else slice(1, 2)
                got = fmodel.generate(
                    custom, ids[rows], attention_mask=None if m is None else m, max_new_tokens=NEW
                )
                want = (
                    expected[rows]
                    if m is not None
                    else hf_generate(model, "sdpa", ids[rows], None, max_new_tokens=NEW)
                )
                assert torch.equal(got, want), name
    finally:
        attention.unregister("hf_eager_gen")
        attention.unregister("hf_sdpa_gen")


@pytest.mark.parametrize("variant", ["llama-gqa-tied", "mistral-sliding", "gpt2"])
def test_left_padded_batch_equals_each_prompt_alone(saved, variant):
    folder, _ = saved[variant]
    state = fmodel.load(folder)
    g = torch.Generator().manual_seed(1)
    lengths = [3, 8, 5]
    rows = [torch.randint(3, 96, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    batch = fmodel.generate(state, ids, attention_mask=mask, max_new_tokens=NEW)
    for i, row in enumerate(rows):
        alone = fmodel.generate(state, row[None], max_new_tokens=NEW)[0, len(row) :]
        # alone, the call stops at EOS; in the batch, the row is padded after it (pad = EOS here)
        assert torch.equal(batch[i, width : width + len(alone)], alone)
        assert (batch[i, width + len(alone) :] == state.config.eos_token_id).all()


def test_attention_mask_inferred_from_pad_token_as_transformers(saved):
    folder, model = saved["qwen2"]
    state = fmodel.load(folder)
    ids, mask = prompts(pad=5)
    ours = fmodel.generate(state, ids, max_new_tokens=NEW, pad_token_id=5, eos_token_id=7)
    theirs = hf_generate(model, "sdpa", ids, None, max_new_tokens=NEW, pad_token_id=5, eos_token_id=7)
    assert torch.equal(ours, theirs)
    assert torch.equal(
        ours,
        fmodel.generate(state, ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=7, pad_token_id=5),
    )


# --------------------------------------------------------------------------- cached forward


@FEW
@given(data=st.data())
@pytest.mark.parametrize("variant", ["llama-gqa-tied", "mistral-sliding", "gpt2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cached_forward_equals_full_recompute(saved, variant, attn, data):
    folder, _ = saved[variant]
    state = fmodel.load(folder, attn_implementation=attn)
    total = data.draw(st.integers(2, 14), label="length")
    cuts = sorted(data.draw(st.sets(st.integers(1, total - 1), max_size=4), label="cuts"))
    padded = data.draw(st.booleans(), label="left padding")
    ids, mask = prompts(seed=total, length=total)
    if not padded:
        mask = torch.ones_like(mask)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    full = fmodel.forward(state, ids, attention_mask=mask, position_ids=positions).logits
    cache = fmodel.init_cache(state, 2, total + 3)
    pieces = []
    with torch.no_grad():
        for start, end in zip([0, *cuts], [*cuts, total], strict=True):
            out = fmodel.forward(
                state,
                ids[:, start:end],
                attention_mask=mask[:, :end],
                position_ids=positions[:, start:end],
                past_key_values=cache,
            )
            assert out.past_key_values.length == end and cache.length == start
            cache = out.past_key_values
            pieces.append(out.logits)
    keep = mask.bool()
    assert (torch.cat(pieces, 1) - full)[keep].abs().max().item() <= 1e-5


def test_old_cache_stays_valid_and_is_reusable(saved):
    folder, _ = saved["llama-gqa-tied"]
    state = fmodel.load(folder)
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        prefix = fmodel.forward(state, ids[:, :6], past_key_values=fmodel.init_cache(state, 1, 16))
        cache6 = prefix.past_key_values
        snapshot = [k[:, :, :6].clone() for k in cache6.keys]
        first = fmodel.forward(state, ids[:, 6:9], past_key_values=cache6)
        assert cache6.length == 6 and first.past_key_values.length == 9
        # the forward wrote only above the old cache's length
        assert all(torch.equal(k[:, :, :6], s) for k, s in zip(cache6.keys, snapshot, strict=True))
        other = torch.randint(3, 96, (1, 4), generator=torch.Generator().manual_seed(4))
        again = fmodel.forward(state, other, past_key_values=cache6)  # branch from the old value
    expected = fmodel.forward(state, torch.cat([ids[:, :6], other], 1)).logits[:, 6:]
    assert (again.logits - expected).abs().max().item() <= 1e-5
    assert again.past_key_values.length == 10
    # truncate is a rewind over the same buffers; clone gives independent ones
    assert cache6.truncate(4).keys[0] is cache6.keys[0]
    assert cache6.clone().keys[0].data_ptr() != cache6.keys[0].data_ptr()


def test_cache_errors_are_clear(saved, tmp_path):
    folder, _ = saved["llama-gqa-tied"]
    state = fmodel.load(folder)
    cache = fmodel.init_cache(state, 1, 4)
    with pytest.raises(fmodel.CacheError, match=r"full.*max_length>=6"):
        fmodel.forward(state, torch.ones(1, 6, dtype=torch.long), past_key_values=cache)
    with pytest.raises(fmodel.CacheError, match=r"batch size 1.*2 rows"):
        fmodel.forward(state, torch.ones(2, 2, dtype=torch.long), past_key_values=cache)
    with pytest.raises(fmodel.CacheError, match="bfloat16"):
        fmodel.forward(
            fmodel.to(state, dtype=torch.bfloat16), torch.ones(1, 2, dtype=torch.long), past_key_values=cache
        )
    with pytest.raises(ValueError, match="cover the cached"):
        fmodel.forward(
            state,
            torch.ones(1, 2, dtype=torch.long),
            attention_mask=torch.ones(1, 2),
            past_key_values=cache.advance(1),
        )
    bert = fmodel.init(
        fmodel.config_from_dict(
            {
                "model_type": "bert",
                "vocab_size": 96,
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 37,
            }
        ),
        architecture="BertModel",
    )
    with pytest.raises(fmodel.CacheError, match="BertModel is not a generative"):
        fmodel.init_cache(bert, 1, 8)
    with pytest.raises(fmodel.CacheError, match="not a generative"):
        fmodel.forward(bert, torch.ones(1, 2, dtype=torch.long), past_key_values=cache)
    base = fmodel.load(folder, architecture="LlamaModel")
    with pytest.raises(fmodel.FModelError, match="no language-model head"):
        fmodel.generate(base, torch.ones(1, 2, dtype=torch.long), max_new_tokens=2)


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("variant", ["llama-gqa-tied", "gpt2"])
def test_seeded_sampling_matches_transformers(saved, variant):
    folder, model = saved[variant]
    state = fmodel.load(folder)
    ids, mask = prompts()
    settings_ = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=NEW)
    torch.manual_seed(123)
    ours = fmodel.generate(state, ids, attention_mask=mask, pad_token_id=0, **settings_)
    torch.manual_seed(123)
    theirs = hf_generate(model, "sdpa", ids, mask, **settings_)
    assert torch.equal(ours, theirs)
    g1, g2 = (torch.Generator().manual_seed(7) for _ in range(2))
    a = fmodel.generate(state, ids, attention_mask=mask, generator=g1, **settings_)
    b = fmodel.generate(state, ids, attention_mask=mask, generator=g2, **settings_)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- stopping


def _greedy_free(state, ids, mask, new=NEW):
    """Greedy tokens with no EOS at all (a generation config without token ids)."""
    return fmodel.generate(
        state, ids, attention_mask=mask, max_new_tokens=new, generation_config=fmodel.GenerationConfig()
    )


def test_eos_stops_rows_and_pads_finished_ones(saved):
    folder, model = saved["llama-gqa-tied"]
    state = fmodel.load(folder)
    ids, mask = prompts(seed=2)
    free = _greedy_free(state, ids, mask)
    p = ids.shape[1]
    eos = int(free[0, p + 2])  # row 0 makes this token at its 3rd step
    ours = fmodel.generate(
        state, ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=1
    )
    theirs = hf_generate(model, "sdpa", ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=1)
    assert torch.equal(ours, theirs)
    first = (free[0, p:] == eos).nonzero()[0].item()
    assert ours[0, p + first] == eos and (ours[0, p + first + 1 :] == 1).all()
    # every row finished: the call stops early, like Transformers
    both = [int(free[0, p + 1]), int(free[1, p + 1])]
    stopped = fmodel.generate(state, ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=both)
    assert stopped.shape[1] < p + NEW
    assert torch.equal(stopped, hf_generate(model, "sdpa", ids, mask, max_new_tokens=NEW, eos_token_id=both))


def test_min_new_tokens_suppresses_eos(saved):
    folder, model = saved["gpt2"]
    state = fmodel.load(folder)
    ids, mask = prompts(seed=4)
    free = _greedy_free(state, ids, mask)
    p = ids.shape[1]
    eos = int(free[1, p])  # row 1's first new token
    kwargs = dict(max_new_tokens=NEW, eos_token_id=eos, min_new_tokens=4)
    ours = fmodel.generate(state, ids, attention_mask=mask, pad_token_id=0, **kwargs)
    assert torch.equal(ours, hf_generate(model, "sdpa", ids, mask, **kwargs))
    assert not (ours[:, p : p + 4] == eos).any()


def test_generation_config_json_defaults_are_honoured(saved, tmp_path):
    import shutil

    folder, _ = saved["qwen2"]
    copy = tmp_path / "with-gen-config"
    shutil.copytree(folder, copy)
    gen = {
        "max_new_tokens": 6,
        "repetition_penalty": 1.5,
        "eos_token_id": [7, 9],
        "pad_token_id": 3,
        "no_repeat_ngram_size": 0,
    }
    (copy / "generation_config.json").write_text(json.dumps(gen))
    config = fmodel.load_generation_config(copy)
    assert (
        config.max_new_tokens == 6
        and config.eos_token_id == (7, 9)
        and config.extra == {"no_repeat_ngram_size": 0}
    )
    state = fmodel.load(copy)
    ids, mask = prompts(seed=5)
    ours = fmodel.generate(state, ids, attention_mask=mask, generation_config=config)
    hf = transformers.AutoModelForCausalLM.from_pretrained(copy).eval()
    with torch.no_grad():
        theirs = hf.generate(input_ids=ids, attention_mask=mask)
    assert torch.equal(ours, theirs) and ours.shape[1] <= ids.shape[1] + 6
    # without a generation_config.json: the model config's token ids and Transformers' defaults
    plain = fmodel.load_generation_config(folder)
    assert plain.eos_token_id == state.config.eos_token_id and plain.top_k == 50
    # a call argument wins over the file; max_new_tokens wins over max_length
    assert (
        fmodel.generate(state, ids, generation_config=config, max_new_tokens=2).shape[1] <= ids.shape[1] + 2
    )
    assert config.replace(max_new_tokens=None).to_dict()["eos_token_id"] == [7, 9]


def test_default_length_is_twenty_new_tokens(saved):
    folder, _ = saved["llama-gqa-tied"]
    state = fmodel.load(folder)
    ids, mask = prompts()
    ours = fmodel.generate(state, ids, attention_mask=mask, generation_config=fmodel.GenerationConfig())
    assert ours.shape[1] == ids.shape[1] + 20
    assert (
        fmodel.generate(state, ids, max_length=9, generation_config=fmodel.GenerationConfig()).shape[1] == 9
    )


# --------------------------------------------------------------------------- logits processing


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 1000),
    penalty=st.floats(0.5, 2.0),
    top_k=st.integers(1, 40),
    top_p=st.floats(0.05, 1.0),
    temperature=st.floats(0.2, 3.0),
)
def test_logits_processors_equal_transformers(seed, penalty, top_k, top_p, temperature):
    from transformers.generation import logits_process as lp

    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(3, 32, generator=g) * 3
    tokens = torch.randint(0, 32, (3, 9), generator=g)
    before = scores.clone()
    pairs = [
        (apply_repetition_penalty(scores, tokens, penalty), lp.RepetitionPenaltyLogitsProcessor(penalty)),
        (apply_temperature(scores, temperature), lp.TemperatureLogitsWarper(temperature)),
        (apply_top_k(scores, top_k), lp.TopKLogitsWarper(top_k)),
        (apply_top_p(scores, top_p), lp.TopPLogitsWarper(top_p)),
        (suppress_tokens(scores, torch.tensor([4, 7])), lp.MinLengthLogitsProcessor(20, [4, 7])),
    ]
    for ours, processor in pairs:
        assert torch.equal(ours, processor(tokens, scores.clone())), type(processor).__name__
    assert torch.equal(scores, before)  # inputs are not written


def test_repetition_penalty_and_top_k_match_transformers_generate(saved):
    folder, model = saved["mistral-sliding"]
    state = fmodel.load(folder)
    ids, mask = prompts(seed=6)
    kwargs = dict(max_new_tokens=NEW, repetition_penalty=1.8)
    assert torch.equal(
        fmodel.generate(state, ids, attention_mask=mask, pad_token_id=0, **kwargs),
        hf_generate(model, "sdpa", ids, mask, **kwargs),
    )


# --------------------------------------------------------------------------- streamer, purity, facade


class Recorder:
    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []
        self.ended = 0

    def put(self, value: torch.Tensor) -> None:
        self.values.append(value.clone())

    def end(self) -> None:
        self.ended += 1


def test_streamer_receives_prompt_then_each_token(saved):
    folder, model = saved["gpt2"]
    state = fmodel.load(folder)
    ids, mask = prompts()
    ours, theirs = Recorder(), Recorder()
    out = fmodel.generate(state, ids, attention_mask=mask, max_new_tokens=5, streamer=ours)
    hf_generate(model, "sdpa", ids, mask, max_new_tokens=5, streamer=theirs)
    assert ours.ended == theirs.ended == 1
    assert len(ours.values) == len(theirs.values) == 6
    assert all(torch.equal(a, b) for a, b in zip(ours.values, theirs.values, strict=True))
    assert torch.equal(torch.stack(ours.values[1:], 1), out[:, ids.shape[1] :])


def test_generate_is_pure(saved):
    folder, _ = saved["llama-gqa-tied"]
    state = fmodel.load(folder)
    ids, mask = prompts()
    ids_before, mask_before = ids.clone(), mask.clone()
    seen = {name: (t._version, t.data_ptr(), t.clone()) for name, t in state.tensors.items()}
    out = fmodel.generate(state, ids, attention_mask=mask, max_new_tokens=4)
    assert torch.equal(ids, ids_before) and torch.equal(mask, mask_before)
    for name, t in state.tensors.items():
        version, ptr, value = seen[name]
        assert (t._version, t.data_ptr()) == (version, ptr) and torch.equal(t, value), name
    assert not out.is_inference()  # usable by autograd afterwards
    assert torch.equal(out, fmodel.generate(state, ids, attention_mask=mask, max_new_tokens=4))


def _facade_class(base):
    return base if issubclass(base, GenerationMixin) else type(base.__name__, (GenerationMixin, base), {})


def test_facade_generate_matches_transformers(saved):
    from fmodel import facade

    folder, model = saved["llama-gqa-tied"]
    ours = _facade_class(facade.LlamaForCausalLM).from_pretrained(folder)
    ids, mask = prompts()
    inputs = {"input_ids": ids, "attention_mask": mask}
    kwargs = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0, num_beams=1, use_cache=True)
    assert torch.equal(ours.generate(**inputs, **kwargs), hf_generate(model, "sdpa", ids, mask, **kwargs))
    assert ours.generation_config.eos_token_id == 2
    ours.generation_config.max_new_tokens = 3  # a mutable config: the write persists
    assert ours.generate(ids).shape[1] == ids.shape[1] + 3
    assert ours.generate(ids, top_k=None, do_sample=True, max_new_tokens=2).shape[1] == ids.shape[1] + 2
    with pytest.raises(fmodel.errors.UnsupportedOptionError, match="num_beam_groups"):
        ours.generate(ids, num_beams=2, num_beam_groups=2, diversity_penalty=1.0)
    with pytest.raises(fmodel.errors.UnsupportedOptionError, match="no_repeat_ngram_size"):
        ours.generate(ids, no_repeat_ngram_size=2)  # asked for, not implemented: refused, not ignored
    with pytest.raises(fmodel.errors.UnsupportedOptionError, match="output_attentions"):
        ours.generate(ids, return_dict_in_generate=True, output_attentions=True)
    with pytest.raises(ValueError, match=r"not used by the model: \['typo'\]"):
        ours.generate(ids, typo=3)


# --------------------------------------------------------------------------- beam search


@pytest.mark.parametrize("variant", ["llama-gqa-tied", "mistral-sliding"])
def test_functional_beam_search_matches_transformers(saved, variant):
    folder, model = saved[variant]
    state = fmodel.load(folder)
    ids, mask = prompts(seed=7)
    kwargs = dict(
        num_beams=3, num_return_sequences=2, max_new_tokens=NEW, length_penalty=0.6, early_stopping=True
    )
    free = fmodel.generate(state, ids, attention_mask=mask, max_new_tokens=NEW, num_beams=3, pad_token_id=0)
    eos = int(free[0, ids.shape[1] + 2])  # a token the beams produce: hypotheses finish early
    outs = fmodel.generate(
        state, ids, attention_mask=mask, eos_token_id=eos, pad_token_id=0, return_dict_in_generate=True,
        output_scores=True, **kwargs,
    )  # fmt: skip
    theirs = hf_generate(
        model, "sdpa", ids, mask, eos_token_id=eos, return_dict_in_generate=True, output_scores=True, **kwargs
    )
    assert torch.equal(outs.sequences, theirs.sequences) and torch.equal(
        outs.beam_indices, theirs.beam_indices
    )
    assert (outs.sequences_scores - theirs.sequences_scores).abs().max().item() <= 1e-4
    with pytest.raises(fmodel.ConfigError, match="num_return_sequences"):
        fmodel.generate(state, ids, num_beams=2, num_return_sequences=3, max_new_tokens=2)
    with pytest.raises(fmodel.ConfigError, match="streamer"):
        fmodel.generate(state, ids, num_beams=2, max_new_tokens=2, streamer=Recorder())


@FEW
@given(data=st.data())
def test_reorder_cache_gathers_rows_and_leaves_the_input(saved, data):
    folder, _ = saved["gpt2"]
    state = fmodel.load(folder)
    batch = data.draw(st.integers(1, 4), label="batch")
    rows = data.draw(st.lists(st.integers(0, batch - 1), min_size=1, max_size=6), label="rows")
    cache = fmodel.init_cache(state, batch, 6)
    with torch.no_grad():
        cache = fmodel.forward(state, torch.randint(0, 96, (batch, 3)), past_key_values=cache).past_key_values
    before = [k.clone() for k in cache.keys]
    out = reorder_cache(cache, torch.tensor(rows))
    assert out.length == cache.length and out.max_length == cache.max_length and out.batch_size == len(rows)
    for k, new, old in zip(cache.keys, out.keys, before, strict=True):
        assert torch.equal(k, old) and torch.equal(new, old[rows]) and new.data_ptr() != k.data_ptr()
    with pytest.raises(fmodel.CacheError, match="row indices"):
        reorder_cache(cache, torch.tensor([batch]))
