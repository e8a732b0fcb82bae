"""lm-eval's Hugging Face backend (`lm_eval.models.huggingface.HFLM`) scoring the facade, as a
user evaluates an already-loaded model: `HFLM(pretrained=model, tokenizer=tok, batch_size=2)`,
then `loglikelihood`, `loglikelihood_rolling` and `generate_until` on hand-built `Instance`s (no
task, no dataset download). Each runs on Transformers' model and on fmodel's from the same folder:
log-likelihoods equal within 1e-4, greedy flags equal, generated strings equal, and the token
tensors `generate` returned equal (so lm-eval's stop-sequence criteria stopped both at the same
step)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

import fmodel  # noqa: E402

LIBS = {"transformers": transformers, "fmodel": fmodel}
# A larger init scale than the default 0.02 so that greedy text varies (the default tiny models
# repeat their last word) and the stop strings below end generations midway.
KINDS = {"llama": {"initializer_range": 0.2}, "gpt2": {"initializer_range": 0.2}}

CONTEXTS = ["the capital of france is", "he said that", "paris is a city of", "they were not"]
LOGLIKELIHOOD = [
    ("the capital of france is", " paris"),
    ("paris is a", " city of france"),
    ("he said", " that it was"),
    ("", "the"),  # an empty context: lm-eval scores the continuation after the EOS token
    ("they were not", " not"),
    ("the capital of france is", " first but"),  # greedy for the llama checkpoint
    ("the capital of france is", " from find"),  # greedy for the gpt2 one
]
ROLLING = [
    "the capital of france is paris and paris is a city of france that is the capital",
    "he was the one",
    "what is it that they said about the city when we were in paris with his people",
]
GENERATE = [
    (context, {"until": ["which", "could", "other", "from"], "max_gen_toks": 10, "do_sample": False})
    for context in CONTEXTS
] + [(context, {"until": ["paris"], "max_gen_toks": 3}) for context in CONTEXTS[:3]]


class RecordingHFLM(HFLM):
    """HFLM that keeps each tensor `model.generate` returned, to compare where generation stopped."""

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        out = super()._model_generate(context, max_length, stop, **generation_kwargs)
        self.__dict__.setdefault("generated", []).append((context.shape[1], out))
        return out


def requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=args, idx=0) for args in arguments]


@pytest.fixture(scope="module", params=sorted(KINDS))
def evaluators(request, checkpoint, tokenizer):
    """{library: RecordingHFLM} over the same checkpoint, max_length 16 (rolling windows)."""
    folder = checkpoint(request.param, **KINDS[request.param])
    return {
        name: RecordingHFLM(
            pretrained=lib.AutoModelForCausalLM.from_pretrained(folder),
            tokenizer=tokenizer,
            batch_size=2,
            max_length=16,
        )
        for name, lib in LIBS.items()
    }


def test_the_facade_is_taken_as_a_transformers_model(evaluators):
    fm, hf = evaluators["fmodel"], evaluators["transformers"]
    assert isinstance(fm.model, fmodel.PreTrainedModel)
    assert (fm.backend, fm.max_length, fm.device, fm.eot_token_id) == (
        hf.backend,
        hf.max_length,
        hf.device,
        hf.eot_token_id,
    )


def test_loglikelihood(evaluators):
    results = {
        name: lm.loglikelihood(requests("loglikelihood", LOGLIKELIHOOD)) for name, lm in evaluators.items()
    }
    assert len(results["fmodel"]) == len(LOGLIKELIHOOD)
    for (fm_ll, fm_greedy), (hf_ll, hf_greedy) in zip(
        results["fmodel"], results["transformers"], strict=True
    ):
        assert abs(fm_ll - hf_ll) < 1e-4
        assert fm_greedy == hf_greedy
    assert any(greedy for _, greedy in results["transformers"])  # both flags are exercised


def test_loglikelihood_rolling(evaluators):
    """Texts longer than max_length=16 are scored in rolling windows, batched two at a time."""
    results = {
        name: lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in ROLLING]))
        for name, lm in evaluators.items()
    }
    assert len(results["fmodel"]) == len(ROLLING)
    for fm_ll, hf_ll in zip(results["fmodel"], results["transformers"], strict=True):
        assert abs(fm_ll - hf_ll) < 1e-4


def test_generate_until(evaluators):
    """Batches of two contexts of different lengths (left padding), stop strings passed to
    `generate` as lm-eval's `stopping_criteria`, and `max_gen_toks`."""
    results = {}
    for name, lm in evaluators.items():
        lm.__dict__["generated"] = []
        results[name] = lm.generate_until(requests("generate_until", GENERATE))
    assert results["fmodel"] == results["transformers"]
    assert any(text for text in results["fmodel"]) and len(set(results["fmodel"])) > 2
    generated = {name: lm.generated for name, lm in evaluators.items()}
    assert len(generated["fmodel"]) == len(generated["transformers"]) > 1
    for (_, fm), (_, hf) in zip(generated["fmodel"], generated["transformers"], strict=True):
        assert torch.equal(fm, hf)
    # the stop strings ended some batch of the max_gen_toks=10 group early
    new_tokens = [out.shape[1] - prompt for prompt, out in generated["fmodel"]]
    assert any(n < 10 for n in new_tokens if n != 3), new_tokens
