"""Seeded parity, continued (see test_seeded_parity.py): `prune_heads`, `set_input_embeddings` /
`set_output_embeddings` followed by `init_weights()`, `from_pretrained` with missing or
mismatched tensors, and construction in a dtype (`_from_config(dtype=)`, a config's own
`dtype`/`torch_dtype`, the Auto classes' `from_config`) draw from torch's global generator exactly
as Transformers 4.57: bit-equal parameters, and the next `torch.randn` agrees.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
from torch import nn

import fmodel
from fmodel import facade
from fmodel.io import load_with_report
from fmodel.models import ARCHITECTURES, get_spec

from .test_seeded_parity import AUTO, CONFIGS, assert_same_tensors, both

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


def _pair(arch: str, seed: int = 0, **overrides):
    config = CONFIGS[get_spec(arch).model_type](**overrides)
    return both(
        seed, lambda: getattr(transformers, arch)(config), lambda: facade.FAMILY_CLASSES[arch](config)
    )


# --------------------------------------------------------------------------- prune_heads

PRUNABLE = [a for a in sorted(ARCHITECTURES) if get_spec(a).model_type in ("gpt2", "bert")]
# new heads, more heads of a pruned layer and of another one, an empty list (no rebuild), heads
# already pruned (Transformers rebuilds that layer at its current size all the same)
PRUNES = [{1: [0, 2]}, {0: [3], 1: [1]}, {0: []}, {1: [0], 0: [3, 1]}]


@pytest.mark.parametrize("built_pruned", [False, True], ids=["plain", "config-pruned"])
@pytest.mark.parametrize("arch", PRUNABLE)
def test_prune_heads_draws_as_transformers(arch, built_pruned):
    theirs, ours = _pair(arch, **({"pruned_heads": {0: [2]}} if built_pruned else {}))
    for step, heads in enumerate(PRUNES):
        both(
            10 + step,
            functools.partial(theirs.prune_heads, heads),
            functools.partial(ours.prune_heads, heads),
        )
        assert_same_tensors(theirs, ours)  # the kept weights are the model's own, in both
        assert {int(k): sorted(v) for k, v in theirs.config.pruned_heads.items()} == {
            int(k): sorted(v) for k, v in ours.config.pruned_heads.items()
        }
        # the rebuilt layers are new, unmarked modules: `init_weights()` prunes again and draws them
        both(20 + step, theirs.init_weights, ours.init_weights)
        assert_same_tensors(theirs, ours)


def test_prune_heads_of_a_family_transformers_cannot_prune_draws_nothing():
    torch.manual_seed(0)
    model = facade.LlamaForCausalLM(CONFIGS["llama"]())
    expected = fmodel.prune_heads(model.state, {0: [0, 1]}).params  # a whole key/value group
    rng = torch.get_rng_state()
    model.prune_heads({0: [0, 1]})
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(t, expected[n]) for n, t in model.state.params.items())


# --------------------------------------------------------------------------- set_*_embeddings

EMBEDDING_CASES = [
    ("LlamaForCausalLM", {"tie_word_embeddings": True}),
    ("LlamaForCausalLM", {"tie_word_embeddings": False}),
    ("MistralModel", {}),
    ("GPT2LMHeadModel", {}),
    ("BertModel", {"pad_token_id": 0}),  # the user's nn.Embedding has no padding row: row 0 is drawn
    ("BertForMaskedLM", {}),
]


@pytest.mark.parametrize(("arch", "overrides"), EMBEDDING_CASES, ids=[f"{a}-{o}" for a, o in EMBEDDING_CASES])
def test_set_embeddings_leaves_the_new_module_to_the_next_init_weights(arch, overrides):
    theirs, ours = _pair(arch, **overrides)
    config = theirs.config
    # the module that is already there: marked initialised, nothing drawn
    both(1, lambda: theirs.set_input_embeddings(theirs.get_input_embeddings()),
         lambda: ours.set_input_embeddings(ours.get_input_embeddings()))  # fmt: skip
    both(2, theirs.init_weights, ours.init_weights)
    assert_same_tensors(theirs, ours)

    def new_input(model):
        model.set_input_embeddings(nn.Embedding(config.vocab_size, config.hidden_size))

    both(3, lambda: new_input(theirs), lambda: new_input(ours))
    for seed in (4, 5):  # the new module is drawn once, then it is marked
        both(seed, theirs.init_weights, ours.init_weights)
        assert_same_tensors(theirs, ours)
    if theirs.get_output_embeddings() is None:
        return

    def new_output(model):
        old = model.get_output_embeddings()
        model.set_output_embeddings(
            nn.Linear(config.hidden_size, old.weight.shape[0], bias=old.bias is not None)
        )

    both(6, lambda: new_output(theirs), lambda: new_output(ours))
    for seed in (7, 8):  # on a tied model the draw lands in the shared matrix, then it is tied again
        both(seed, theirs.init_weights, ours.init_weights)
        assert_same_tensors(theirs, ours)


# --------------------------------------------------------------------------- from_pretrained


def _save(model, folder, drop=()) -> str:
    model.save_pretrained(folder)
    if drop:
        path = os.path.join(folder, "model.safetensors")
        tensors = safetensors_torch.load_file(path)
        for name in drop:
            del tensors[name]
        safetensors_torch.save_file(tensors, path, metadata={"format": "pt"})
    return str(folder)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny Transformers checkpoints: base models (loaded into head classes they miss the head),
    a 2-label classifier, and head models with some tensors deleted (GPT-2's scaled `c_proj`, a
    norm, an embedding with a padding row)."""
    root = tmp_path_factory.mktemp("seeded-loading")
    torch.manual_seed(0)
    llama_holes = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight")
    gpt2_holes = (
        "transformer.h.0.attn.c_proj.weight",
        "transformer.h.1.mlp.c_proj.bias",
        "transformer.ln_f.weight",
        "transformer.wpe.weight",
    )
    made = {
        "llama-base": (transformers.LlamaModel, {"tie_word_embeddings": False}, ()),
        "llama-tied-base": (transformers.LlamaModel, {"tie_word_embeddings": True}, ()),
        "bert-base": (transformers.BertModel, {"pad_token_id": 0}, ()),
        "bert-cls": (transformers.BertForSequenceClassification, {}, ()),
        "gpt2-base": (transformers.GPT2Model, {}, ()),
        "gpt2-pruned-base": (transformers.GPT2Model, {"pruned_heads": {1: [0, 2]}}, ()),
        "bert-pruned-base": (transformers.BertModel, {"pruned_heads": {0: [1]}}, ()),
        "gpt2-holes": (transformers.GPT2LMHeadModel, {}, gpt2_holes),
        "llama-holes": (
            transformers.LlamaForCausalLM,
            {"tie_word_embeddings": False, "pad_token_id": 3},
            llama_holes,
        ),
    }
    out = {}
    for name, (cls, overrides, drop) in made.items():
        config = CONFIGS[cls.config_class.model_type](**overrides)
        out[name] = _save(cls(config), root / name, drop)
    return out


MISMATCH = {"num_labels": 3, "ignore_mismatched_sizes": True}
LOADS = [
    ("LlamaForCausalLM", "llama-base", {}),  # untied lm_head missing
    ("LlamaForCausalLM", "llama-tied-base", {}),  # nothing missing: the tie provides lm_head
    ("LlamaForCausalLM", "llama-base", {"dtype": torch.bfloat16}),
    ("LlamaForCausalLM", "llama-holes", {}),
    ("GPT2LMHeadModel", "gpt2-base", {}),
    ("GPT2LMHeadModel", "gpt2-holes", {}),
    ("BertForSequenceClassification", "bert-base", {}),
    ("BertForMaskedLM", "bert-base", {}),  # the prediction head, its bias tied to the decoder's
    # built from a config with pruned heads: under `no_init_weights` the prune step draws nothing
    ("GPT2LMHeadModel", "gpt2-pruned-base", {}),
    ("BertForSequenceClassification", "bert-pruned-base", {}),
    ("BertForSequenceClassification", "bert-cls", MISMATCH),
    ("BertForSequenceClassification", "bert-cls", {**MISMATCH, "dtype": torch.bfloat16}),
]


@pytest.mark.parametrize(("arch", "name", "kwargs"), LOADS, ids=[f"{a}-{n}-{k}" for a, n, k in LOADS])
def test_from_pretrained_draws_missing_tensors_as_transformers(checkpoints, arch, name, kwargs):
    theirs, ours = both(
        5,
        lambda: getattr(transformers, arch).from_pretrained(checkpoints[name], **kwargs),
        lambda: facade.FAMILY_CLASSES[arch].from_pretrained(checkpoints[name], **kwargs),
    )
    assert_same_tensors(theirs, ours)
    assert ours.dtype == theirs.dtype
    both(6, theirs.init_weights, ours.init_weights)  # all marked now: only a pruned layer is redrawn
    assert_same_tensors(theirs, ours)


def test_auto_from_pretrained_draws_the_new_classifier_as_transformers(checkpoints):
    theirs, ours = both(
        9,
        lambda: transformers.AutoModelForSequenceClassification.from_pretrained(
            checkpoints["bert-base"], num_labels=4
        ),
        lambda: facade.AutoModelForSequenceClassification.from_pretrained(
            checkpoints["bert-base"], num_labels=4
        ),
    )
    assert ours.classifier.weight.shape == (4, 64)
    assert_same_tensors(theirs, ours)


def test_functional_load_keeps_its_own_seeded_init_unless_asked(checkpoints):
    path = checkpoints["bert-cls"]
    rng = torch.get_rng_state()
    state = fmodel.load(path, architecture="BertForSequenceClassification", allow_missing=True, strict=False)
    assert torch.equal(torch.get_rng_state(), rng)  # the default never touches the global generator
    torch.manual_seed(5)
    theirs = transformers.BertForSequenceClassification.from_pretrained(path, **MISMATCH)
    after_theirs = torch.randn(3)
    config = fmodel.config_from_dict({**theirs.config.to_dict(), "num_labels": 3})
    torch.manual_seed(5)
    state, report = load_with_report(
        path, config=config, allow_missing=True, ignore_mismatched_sizes=True, init_missing="transformers"
    )
    assert torch.equal(torch.randn(3), after_theirs)
    assert [m[0] for m in report.mismatched] == ["classifier.bias", "classifier.weight"]
    assert torch.equal(state.params["classifier.weight"], theirs.classifier.weight)
    assert torch.equal(state.params["classifier.bias"], theirs.classifier.bias)
    with pytest.raises(ValueError, match="init_missing"):
        fmodel.load(path, allow_missing=True, init_missing="torch")


# --------------------------------------------------------------------------- dtype


def _dtype_cases():
    """Every class with `dtype=`; one class per family with the config's own dtype, and with a
    config `torch_dtype` overridden by the keyword."""
    cases = [(arch, {}, {"dtype": torch.bfloat16}) for arch in sorted(ARCHITECTURES)]
    for arch in ("LlamaForCausalLM", "GPT2LMHeadModel", "BertForSequenceClassification"):
        cases += [
            (arch, {"dtype": torch.float16}, {}),
            (arch, {"torch_dtype": "bfloat16"}, {"torch_dtype": torch.float16}),
        ]
    return cases


DTYPES = _dtype_cases()


@pytest.mark.parametrize(("arch", "config_kw", "call_kw"), DTYPES, ids=[f"{a}-{c}-{k}" for a, c, k in DTYPES])
def test_from_config_draws_in_the_asked_dtype_as_transformers(arch, config_kw, call_kw):
    config = CONFIGS[get_spec(arch).model_type](**config_kw)
    theirs, ours = both(
        3,
        lambda: getattr(transformers, arch)._from_config(config, **call_kw),
        lambda: facade.FAMILY_CLASSES[arch]._from_config(config, **call_kw),
    )
    assert ours.dtype == theirs.dtype != torch.float32
    assert_same_tensors(theirs, ours)
    auto = AUTO[get_spec(arch).output]
    if auto._pick(config).architecture == arch:
        _, via_auto = both(
            3,
            lambda: getattr(transformers, arch)._from_config(config, **call_kw),
            lambda: auto.from_config(config, **call_kw),
        )
        assert_same_tensors(theirs, via_auto)


def test_the_constructor_ignores_the_config_dtype_as_transformers():
    config = CONFIGS["llama"](dtype=torch.bfloat16)
    theirs, ours = both(
        4, lambda: transformers.LlamaForCausalLM(config), lambda: facade.LlamaForCausalLM(config)
    )
    assert theirs.dtype == ours.dtype == torch.float32
    assert_same_tensors(theirs, ours)
