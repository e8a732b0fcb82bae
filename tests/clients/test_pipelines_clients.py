"""Transformers' pipelines on fmodel's facade: `pipeline(task, model=model, tokenizer=tokenizer)`
with the model loaded once by Transformers and once by fmodel from the same folder; every output
(texts, token ids, scores, features) equal to the Transformers pipeline's.

Tasks: text-generation (a left-padded batch with `batch_size=2`, greedy and the pipeline's default
sampling under one seed; chat messages), feature-extraction (BERT, also `device="cpu"` and
`return_tensors=True`), fill-mask (BERT MLM), text-classification (a BERT classifier with its
own labels). The generating model is drawn with `initializer_range=0.4` so that greedy decoding
does not just repeat the prompt's last token (tiny models at 0.02 do), which would let a broken
pad mask pass.

What the facade has to provide: the config's `_commit_hash`, `task_specific_params`, `prefix`;
a mutable `generation_config` and `_prepare_generation_config`; Transformers' `ModelOutput`
classes (pipelines move outputs between devices by that type).
"""

from __future__ import annotations

import pytest
import torch

import fmodel

from .conftest import bert_tokenizer, hf_model, max_diff

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4
LIBS = {"transformers": transformers, "fmodel": fmodel}
PROMPTS = ["the capital of france is", "paris", "he was in the city of"]  # 5, 1, 6 words
CHAT = [{"role": "user", "content": "what is the capital of france"}]
LABELS = {0: "NEG", 1: "POS", 2: "NEU"}


def _pipelines(task: str, folder: str, auto: str, *, padding_side: str | None = None, **options):
    """The client script for each library: load the model and tokenizer, build the pipeline."""
    made = {}
    for name, lib in LIBS.items():
        extra = {} if padding_side is None else {"padding_side": padding_side}
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **extra)
        model = getattr(lib, auto).from_pretrained(folder)
        made[name] = transformers.pipeline(task, model=model, tokenizer=tokenizer, **options)
    assert isinstance(made["fmodel"].model, fmodel.PreTrainedModel)
    return made["fmodel"], made["transformers"]


@pytest.fixture(scope="module")
def generation_folder(checkpoint):
    return checkpoint("llama", initializer_range=0.4)


def test_text_generation_batched_left_padded(generation_folder):
    ours, theirs = _pipelines(
        "text-generation", generation_folder, "AutoModelForCausalLM", padding_side="left"
    )
    for options in (
        dict(max_new_tokens=6, do_sample=False, return_full_text=False),
        dict(max_new_tokens=6, do_sample=False, return_tensors=True),
    ):
        mine = ours(PROMPTS, batch_size=2, **options)
        assert mine == theirs(PROMPTS, batch_size=2, **options), options
    continuations = [
        out[0]["generated_text"].split()
        for out in ours(PROMPTS, batch_size=2, max_new_tokens=6, do_sample=False, return_full_text=False)
    ]
    assert all(len(set(words)) > 1 for words in continuations), continuations  # not a repeated token
    # one prompt alone equals its row in the padded batch (the pad mask works)
    alone = ours(PROMPTS[1], max_new_tokens=6, do_sample=False, return_full_text=False)
    assert alone[0]["generated_text"].split() == continuations[1]
    # the pipeline's own defaults sample (do_sample=True, temperature=0.7): same seed, same text
    sampled = {}
    for name, pipe in (("fmodel", ours), ("transformers", theirs)):
        torch.manual_seed(3)
        sampled[name] = pipe(PROMPTS, batch_size=2, max_new_tokens=6)
    assert sampled["fmodel"] == sampled["transformers"]


def test_text_generation_chat_messages(generation_folder):
    ours, theirs = _pipelines("text-generation", generation_folder, "AutoModelForCausalLM")
    options = dict(max_new_tokens=12, do_sample=False)
    mine = ours(CHAT, **options)
    assert mine == theirs(CHAT, **options)
    messages = mine[0]["generated_text"]
    assert messages[:-1] == CHAT and messages[-1]["role"] == "assistant"
    assert len(messages[-1]["content"].split()) == 12
    # an end-of-sequence id given to the call stops the answer there, in both
    stop = dict(options, eos_token_id=9, return_tensors=True)
    tokens = ours(CHAT, **stop)
    assert tokens == theirs(CHAT, **stop)
    prompt = transformers.AutoTokenizer.from_pretrained(generation_folder).apply_chat_template(
        CHAT, add_generation_prompt=True
    )
    answer = tokens[0]["generated_token_ids"][len(prompt) :]
    assert answer[-1] == 9 and 1 < len(answer) < 12, answer


@pytest.mark.parametrize("device", [None, "cpu"], ids=["default", "cpu"])
def test_feature_extraction(checkpoint, device):
    ours, theirs = _pipelines("feature-extraction", checkpoint("bert"), "AutoModel", device=device)
    texts = ["paris is the capital of france", "the city"]
    mine, ref = ours(texts), theirs(texts)
    assert (
        [torch.tensor(x).shape for x in mine]
        == [torch.tensor(x).shape for x in ref]
        == [
            (1, 8, 64),
            (1, 4, 64),
        ]
    )
    assert max(max_diff(torch.tensor(a), torch.tensor(b)) for a, b in zip(mine, ref, strict=True)) <= TOL
    tensors = ours(texts[0], return_tensors=True)
    assert (
        isinstance(tensors, torch.Tensor) and max_diff(tensors, theirs(texts[0], return_tensors=True)) <= TOL
    )


def test_fill_mask(checkpoint):
    ours, theirs = _pipelines("fill-mask", checkpoint("bert-mlm"), "AutoModelForMaskedLM")
    for text in ("paris is the [MASK] of france", "the [MASK] is in france"):
        mine, ref = ours(text, top_k=5), theirs(text, top_k=5)
        assert [m["token"] for m in mine] == [r["token"] for r in ref]
        assert [m["sequence"] for m in mine] == [r["sequence"] for r in ref]
        assert max(abs(m["score"] - r["score"]) for m, r in zip(mine, ref, strict=True)) <= TOL


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory):
    """A BERT classifier with three labels of its own (id2label / label2id in config.json)."""
    folder = tmp_path_factory.mktemp("bert-labels")
    hf_model("bert-cls", id2label=LABELS, label2id={v: k for k, v in LABELS.items()}).save_pretrained(folder)
    bert_tokenizer().save_pretrained(folder)
    return str(folder)


def test_text_classification_with_labels(labelled_folder):
    folder = labelled_folder
    ours, theirs = _pipelines("text-classification", folder, "AutoModelForSequenceClassification")
    texts = ["paris is the capital of france", "the city", "he was in the water"]
    for options in ({}, {"top_k": None}):
        mine, ref = ours(texts, **options), theirs(texts, **options)
        flat = lambda out: [d for item in out for d in (item if isinstance(item, list) else [item])]  # noqa: E731
        assert [d["label"] for d in flat(mine)] == [d["label"] for d in flat(ref)]
        assert max(abs(a["score"] - b["score"]) for a, b in zip(flat(mine), flat(ref), strict=True)) <= TOL
    assert {d["label"] for d in flat(ours(texts, top_k=None))} == set(LABELS.values())
