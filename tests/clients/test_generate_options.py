"""`generate` as Transformers 4.57 has it, on the facade and functionally: beam search (and beam
sampling) token-equal to Transformers with equal scores, `return_dict_in_generate` outputs,
stopping criteria (Transformers' and custom ones, lm-eval's `generate_until` call), stop
strings, custom logits processors, generation configs in every form, the mutable
`model.generation_config`, `use_cache=False`, `prepare_inputs_for_generation` and
`_prepare_generation_config`. Each checkpoint is written by Transformers and loaded by both
libraries."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import fmodel
from fmodel.facade.generation_config import MutableGenerationConfig

from .conftest import hf_model

transformers = pytest.importorskip("transformers")

P = 7  # prompt length
NEW = 8


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models on one thread


@pytest.fixture(scope="module")
def models(checkpoint):
    """{kind: (fmodel facade model, Transformers model)} for a tiny Llama and a GPT-2."""
    out = {}
    for kind in ("llama-untied", "gpt2"):
        folder = checkpoint(kind)
        out[kind] = (
            fmodel.AutoModelForCausalLM.from_pretrained(folder),
            transformers.AutoModelForCausalLM.from_pretrained(folder).eval(),
        )
    return out


def prompts(seed: int = 0):
    """[2, P] ids and mask; row 0 left-padded by 2 with the pad id 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (2, P), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    ids[0, :2] = 0
    return ids, mask


def both(pair, **kwargs):
    """(ours, theirs) for the same `generate` call, the global RNG seeded alike for each."""
    ours, theirs = pair
    ids, mask = prompts()
    results = []
    for model in (ours, theirs):
        torch.manual_seed(11)
        with torch.no_grad():
            results.append(model.generate(input_ids=ids, attention_mask=mask, **kwargs))
    return results


def close(a, b, tol: float = 1e-4) -> bool:
    """Equal within `tol` where finite, and -inf / nan at the same places."""
    finite = torch.isfinite(b)
    return torch.equal(torch.isfinite(a), finite) and bool(((a - b)[finite].abs() <= tol).all())


def eos_that_occurs(pair) -> list[int]:
    """Two tokens the beams produce early, so that hypotheses finish before max_new_tokens."""
    ours, _ = pair
    ids, mask = prompts()
    free = ours.generate(
        ids, attention_mask=mask, num_beams=4, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0
    )
    return [int(free[0, P + 1]), int(free[1, P + 2])]


# --------------------------------------------------------------------------- beam search


BEAMS = [
    dict(num_beams=2),
    dict(num_beams=3, length_penalty=0.5, early_stopping=True, num_return_sequences=2),
    dict(num_beams=4, length_penalty=2.0, early_stopping="never", num_return_sequences=3),
    dict(num_beams=4, length_penalty=-1.0, num_return_sequences=4),
]


@pytest.mark.parametrize("kind", ["llama-untied", "gpt2"])
@pytest.mark.parametrize("settings", range(len(BEAMS)))
def test_beam_search_matches_transformers(models, kind, settings):
    pair = models[kind]
    kwargs = dict(
        BEAMS[settings],
        max_new_tokens=NEW,
        eos_token_id=eos_that_occurs(pair),
        pad_token_id=0,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    ours, theirs = both(pair, **kwargs)
    assert type(ours) is type(theirs) is transformers.generation.GenerateBeamDecoderOnlyOutput
    assert ours.sequences.shape[0] == 2 * kwargs.get("num_return_sequences", 1)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert torch.equal(ours.beam_indices, theirs.beam_indices) and ours.beam_indices.dtype == torch.int32
    assert (ours.sequences_scores - theirs.sequences_scores).abs().max().item() <= 1e-4
    assert len(ours.scores) == len(theirs.scores) == len(ours.logits)
    assert all(close(a, b) for a, b in zip(ours.scores, theirs.scores, strict=True))
    assert all(close(a, b) for a, b in zip(ours.logits, theirs.logits, strict=True))
    if settings in (1, 3):  # hypotheses finished early (EOS) while others ran on: the padding path
        assert (ours.beam_indices == -1).any()


def test_beam_sampling_and_sampled_return_sequences_match(models):
    pair = models["llama-untied"]
    for kwargs in (
        dict(num_beams=3, do_sample=True, top_k=10, num_return_sequences=2),
        dict(do_sample=True, top_p=0.9, num_return_sequences=3),
    ):
        ours, theirs = both(pair, max_new_tokens=NEW, pad_token_id=0, **kwargs)
        assert ours.shape[0] == 2 * kwargs["num_return_sequences"] and torch.equal(ours, theirs)
    for model in pair:  # greedy gives one sequence per prompt, in both libraries
        with pytest.raises(ValueError, match="num_return_sequences"):
            model.generate(prompts()[0], num_return_sequences=2, max_new_tokens=2)


def test_use_cache_false_gives_the_same_tokens(models):
    pair = models["gpt2"]
    for kwargs in (dict(), dict(num_beams=3, num_return_sequences=2)):
        cached, theirs = both(pair, max_new_tokens=NEW, pad_token_id=0, **kwargs)
        uncached, theirs_uncached = both(pair, max_new_tokens=NEW, pad_token_id=0, use_cache=False, **kwargs)
        assert (
            torch.equal(cached, uncached)
            and torch.equal(uncached, theirs)
            and torch.equal(theirs, theirs_uncached)
        )


def test_functional_beam_search_equals_the_facade(models):
    ours, _ = models["llama-untied"]
    ids, mask = prompts()
    kwargs = dict(num_beams=3, num_return_sequences=2, max_new_tokens=NEW, length_penalty=0.8, pad_token_id=0)
    facade_out = ours.generate(
        ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True, **kwargs
    )
    functional = fmodel.generate(
        ours.state, ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True, **kwargs
    )
    assert torch.equal(functional.sequences, facade_out.sequences)
    assert torch.equal(functional.sequences_scores, facade_out.sequences_scores)
    assert isinstance(functional.past_key_values, fmodel.KVCache)


# --------------------------------------------------------------------------- outputs, criteria, processors


def test_return_dict_scores_and_logits_greedy(models):
    pair = models["llama-untied"]
    kwargs = dict(max_new_tokens=NEW, repetition_penalty=1.3, return_dict_in_generate=True, pad_token_id=0)
    ours, theirs = both(pair, output_scores=True, output_logits=True, **kwargs)
    assert type(ours) is type(theirs) is transformers.generation.GenerateDecoderOnlyOutput
    assert torch.equal(ours.sequences, theirs.sequences)
    assert all(close(a, b) for a, b in zip(ours.scores, theirs.scores, strict=True))
    assert all(close(a, b) for a, b in zip(ours.logits, theirs.logits, strict=True))
    plain, _ = both(pair, **kwargs)  # without the flags: no scores, as Transformers
    assert plain.scores is None and plain.logits is None and torch.equal(plain.sequences, ours.sequences)


class StopAfterToken:
    """A custom criterion: a row is done once it produced `token` (a BoolTensor per row)."""

    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids[:, P:] == self.token).any(dim=1)


def test_stopping_criteria_transformers_and_custom(models):
    pair = models["gpt2"]
    ids, mask = prompts()
    free = pair[0].generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=0, eos_token_id=None)
    token = int(free[1, P + 2])
    for criteria in (
        [transformers.MaxLengthCriteria(max_length=P + 4)],  # replaces the length limit
        transformers.StoppingCriteriaList([StopAfterToken(token)]),
    ):
        for extra in (dict(), dict(num_beams=2)):
            ours, theirs = both(pair, max_new_tokens=NEW, pad_token_id=0, stopping_criteria=criteria, **extra)
            assert torch.equal(ours, theirs)
    assert (
        both(pair, max_new_tokens=NEW, stopping_criteria=[transformers.MaxLengthCriteria(P + 4)])[0].shape[1]
        == P + 4
    )


def test_lm_eval_generate_until_call(models, tokenizer):
    """What lm-eval's `HFLM._model_generate` passes: its multi-token stop criteria (returning a
    bool), max_length, pad_token_id, use_cache, do_sample=False and the attention mask."""
    utils_hf = pytest.importorskip("lm_eval.models.utils_hf")
    ours, theirs = models["llama-untied"]
    ids, mask = prompts(seed=3)
    free = ours.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=0, eos_token_id=None)
    stop = tokenizer.decode([int(free[0, P + 2])])
    outs = []
    for model in (ours, theirs):
        criteria = utils_hf.stop_sequences_criteria(tokenizer, [stop], ids.shape[1], ids.shape[0])
        outs.append(
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_length=P + NEW,
                stopping_criteria=criteria,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
                do_sample=False,
            )
        )
    assert torch.equal(outs[0], outs[1]) and outs[0].shape[1] <= P + NEW


def bpe_tokenizer():
    """A byte-level BPE tokenizer (Transformers' StopStringCriteria needs real subword tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(["the capital of france is paris, a city on the seine"] * 10, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")


def test_stop_strings_with_a_tokenizer(tmp_path):
    tok = bpe_tokenizer()
    hf_model("llama-untied", seed=4, vocab_size=len(tok)).save_pretrained(tmp_path)
    ours = fmodel.AutoModelForCausalLM.from_pretrained(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([tok("the capital of")["input_ids"]])
    free = ours.generate(ids, max_new_tokens=NEW, eos_token_id=None)
    text = tok.decode(free[0, ids.shape[1] :])
    stop = text[len(tok.decode(free[0, ids.shape[1] : ids.shape[1] + 2])) :][:2]  # inside the 3rd token on
    outs = [m.generate(ids, max_new_tokens=NEW, stop_strings=[stop], tokenizer=tok) for m in (ours, theirs)]
    assert torch.equal(outs[0], outs[1]) and outs[0].shape[1] < free.shape[1]
    assert tok.decode(outs[0][0, ids.shape[1] :]).endswith(stop) or stop in tok.decode(outs[0][0])
    with pytest.raises(ValueError, match="tokenizer"):
        ours.generate(ids, max_new_tokens=2, stop_strings="x")


class Boost:
    """A custom processor: `token` becomes the most likely one (before the sampling warpers it
    survives top-k; after them it would stay -inf)."""

    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.token] = scores.max() + 5.0
        return scores


def test_custom_logits_processors(models):
    pair = models["llama-untied"]
    for kwargs in (
        dict(logits_processor=[Boost(17)], do_sample=True, top_k=3),
        # Transformers' own type replaces the built-in one made from repetition_penalty
        dict(logits_processor=transformers.LogitsProcessorList([transformers.RepetitionPenaltyLogitsProcessor(2.5)]),
             repetition_penalty=1.2),
        dict(logits_processor=[Boost(17)], num_beams=2),
    ):  # fmt: skip
        ours, theirs = both(pair, max_new_tokens=NEW, pad_token_id=0, **kwargs)
        assert torch.equal(ours, theirs), kwargs
    assert (ours[:, P:] == 17).any()


# --------------------------------------------------------------------------- configs


def test_generation_config_in_every_form(models):
    pair = models["llama-untied"]
    given = dict(max_new_tokens=5, num_beams=2, length_penalty=0.3, pad_token_id=0)
    _, expected = both(pair, generation_config=transformers.GenerationConfig(**given))
    ids, mask = prompts()
    for form in (transformers.GenerationConfig(**given), given, fmodel.GenerationConfig(**given)):
        ours = pair[0].generate(ids, copy.deepcopy(form), attention_mask=mask)
        assert torch.equal(ours, expected), type(form)
    # an explicit kwarg wins over the config; an unknown one is a model kwarg and is refused
    assert (
        both(pair, generation_config=transformers.GenerationConfig(**given), max_new_tokens=2)[0].shape[1]
        == P + 2
    )
    for model in pair:
        with pytest.raises(ValueError, match=r"not used by the model: \['typo'\]"):
            model.generate(prompts()[0], max_new_tokens=2, typo=3)


def test_mutable_generation_config_persists_and_saves(models, checkpoint, tmp_path):
    folder = checkpoint("gpt2")
    ours = fmodel.AutoModelForCausalLM.from_pretrained(folder)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    config = ours.generation_config
    assert isinstance(config, transformers.GenerationConfig) and ours.generation_config is config
    for model in (ours, theirs):  # what TRL and pipelines do to it
        model.generation_config.pad_token_id = 0
        model.generation_config.max_new_tokens = 3
    assert ours.generation_config.max_new_tokens == 3
    ids, mask = prompts()
    assert torch.equal(ours.generate(ids, attention_mask=mask), theirs.generate(ids, attention_mask=mask))
    assert ours.generate(ids, attention_mask=mask).shape[1] == P + 3
    copied = copy.deepcopy(ours.generation_config)
    assert copied.update(num_beams=2, foo=1) == {"foo": 1}
    assert torch.equal(
        ours.generate(ids, generation_config=copied), theirs.generate(ids, generation_config=copied)
    )
    assert ours.generation_config.num_beams == 1  # the copy was changed, not the model's
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    written = json.loads((tmp_path / "ours" / "generation_config.json").read_text())
    assert written == json.loads((tmp_path / "theirs" / "generation_config.json").read_text())
    assert written["max_new_tokens"] == 3
    reloaded = fmodel.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert reloaded.generation_config.max_new_tokens == 3 and reloaded.generation_config.pad_token_id == 0
    ours.generation_config = {"max_new_tokens": 4}  # a dict (or fmodel's frozen config) is accepted too
    assert ours.generate(ids).shape[1] == P + 4


def test_prepare_generation_config_as_pipelines_call_it(models):
    """The text-generation pipeline's call: its own defaults, the model's filling them."""
    ours, theirs = models["llama-untied"]
    for model in (ours, theirs):
        model.generation_config.temperature = 0.6
    mask = torch.ones(1, 3, dtype=torch.long)
    results = []
    for model in (ours, theirs):
        default = transformers.GenerationConfig(max_new_tokens=256, do_sample=True)
        results.append(
            model._prepare_generation_config(default, use_model_defaults=True, top_k=7, attention_mask=mask)
        )
    (config, kwargs), (expected, expected_kwargs) = results
    assert config.to_diff_dict() == expected.to_diff_dict() and config.temperature == 0.6
    assert list(kwargs) == list(expected_kwargs) == ["attention_mask"]
    for model in (ours, theirs):
        model.generation_config.temperature = 1.0


def test_prepare_inputs_for_generation(models):
    ours, theirs = models["llama-untied"]
    ids, mask = prompts()
    inputs = ours.prepare_inputs_for_generation(ids, attention_mask=mask, use_cache=True)
    expected = theirs.prepare_inputs_for_generation(
        ids, attention_mask=mask, use_cache=True, cache_position=torch.arange(P)
    )
    assert set(inputs) == set(expected) - {"cache_position", "past_key_values"}
    assert torch.equal(inputs["position_ids"], expected["position_ids"])
    with torch.no_grad():
        full = ours(**inputs).logits
        assert (full - theirs(**expected).logits)[mask.bool()].abs().max().item() <= 1e-4
        # with a cache: only the unseen token goes in, and its logits are the full forward's
        prefix = ours.prepare_inputs_for_generation(
            ids[:, :-1],
            past_key_values=fmodel.init_cache(ours.state, 2, P),
            attention_mask=mask[:, :-1],
            cache_position=torch.arange(P - 1),
        )
        cache = ours(**prefix).past_key_values
        step = ours.prepare_inputs_for_generation(
            ids, past_key_values=cache, attention_mask=mask, cache_position=torch.tensor([P - 1])
        )
        assert step["input_ids"].shape == (2, 1) and step["position_ids"].shape == (2, 1)
        assert (ours(**step).logits[:, -1] - full[:, -1]).abs().max().item() <= 1e-4


def test_fallback_generation_config_matches_transformers():
    """The class the facade uses without Transformers behaves as Transformers' GenerationConfig."""
    for kwargs in (dict(), dict(max_new_tokens=5, num_beams=3, eos_token_id=[2, 5], custom_key=1)):
        ours, theirs = MutableGenerationConfig(**kwargs), transformers.GenerationConfig(**kwargs)
        strip = lambda d: {k: v for k, v in d.items() if k != "transformers_version"}  # noqa: E731
        assert strip(ours.to_diff_dict()) == strip(theirs.to_diff_dict())
        assert strip(ours.to_dict()) == strip(theirs.to_dict())
        assert ours.update(top_k=3, bogus=2) == theirs.update(top_k=3, bogus=2) == {"bogus": 2}
        assert ours.get_generation_mode() == theirs.get_generation_mode()
        assert copy.deepcopy(ours) == ours and hash(copy.deepcopy(ours)) == hash(ours)
    for bad in (dict(early_stopping="sometimes"), dict(num_return_sequences=2), dict(max_new_tokens=0)):
        with pytest.raises(ValueError):
            MutableGenerationConfig(**bad)
        with pytest.raises(ValueError):
            transformers.GenerationConfig(**bad)
    with pytest.raises(ValueError, match="temperature"):
        MutableGenerationConfig(temperature=0.5).validate(strict=True)


def test_facade_generation_without_transformers(checkpoint, tokenizer, monkeypatch, tmp_path):
    """With Transformers absent: fmodel's mutable config, fmodel's output class, stop strings
    by decoding; the tokens stay Transformers'."""
    from fmodel.facade import generation_config as gc

    folder = checkpoint("llama-untied")
    ours = fmodel.AutoModelForCausalLM.from_pretrained(folder)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids, mask = prompts()
    kwargs = dict(num_beams=3, num_return_sequences=2, max_new_tokens=NEW, pad_token_id=0)
    with torch.no_grad():
        expected = theirs.generate(
            ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True, **kwargs
        )
    free = theirs.generate(ids[1:], max_new_tokens=NEW, eos_token_id=None, pad_token_id=0)
    monkeypatch.setattr(gc, "config_class", lambda: MutableGenerationConfig)
    for name in ("transformers", "transformers.generation"):
        monkeypatch.setitem(__import__("sys").modules, name, None)  # importing it raises ImportError
    config = ours.generation_config
    assert type(config) is MutableGenerationConfig and ours.generation_config is config
    out = ours.generate(ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True, **kwargs)
    assert type(out) is fmodel.facade.outputs.ModelOutput and torch.equal(out.sequences, expected.sequences)
    assert (out.sequences_scores - expected.sequences_scores).abs().max().item() <= 1e-4
    word = tokenizer.decode([int(free[0, P + 2])])
    stopped = ours.generate(
        ids[1:], max_new_tokens=NEW, eos_token_id=None, stop_strings=word, tokenizer=tokenizer
    )
    assert stopped.shape[1] == P + 3 and torch.equal(stopped, free[:, : P + 3])
    config.max_new_tokens = 2
    assert ours.generate(ids, attention_mask=mask).shape[1] == P + 2
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())["max_new_tokens"] == 2
