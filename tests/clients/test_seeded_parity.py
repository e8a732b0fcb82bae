"""Seeded parity: every facade call that draws random numbers draws exactly what Transformers
draws, from torch's global generator, in the same order.

After `torch.manual_seed(s)`, constructing a model from a config (the class, `_from_config`, the
Auto class's `from_config`), `apply(_init_weights)`, `init_weights()` and
`resize_token_embeddings` (tied and untied, mean resizing on and off, padding, shrinking) give
parameters bit-equal (float32) to Transformers' for every registered architecture, and leave the
global generator in the same state (the next `torch.randn` agrees). The functional API keeps its
own seeded generators: it never touches the global one. `prune_heads`, `set_*_embeddings`,
`from_pretrained` with missing tensors and construction in a dtype: test_seeded_parity_loading.py.
"""

from __future__ import annotations

import functools

import pytest
import torch

import fmodel
from fmodel import facade
from fmodel.models import ARCHITECTURES, get_spec
from fmodel.transforms import hf_init, hf_resize

from ..conftest import TINY
from ..families import model_types, tiny_config_dict

transformers = pytest.importorskip("transformers")

DECODER = TINY  # tests/conftest.py's tiny Llama-family shape
GPT2 = dict(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=32)
BERT = dict(
    vocab_size=96,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=112,
    max_position_embeddings=32,
)
CONFIGS = {
    "llama": lambda **kw: transformers.LlamaConfig(**DECODER, **kw),
    "qwen2": lambda **kw: transformers.Qwen2Config(**DECODER, **kw),
    "mistral": lambda **kw: transformers.MistralConfig(**DECODER, **kw),
    "gpt2": lambda **kw: transformers.GPT2Config(**GPT2, **kw),
    "bert": lambda **kw: transformers.BertConfig(**BERT, **kw),
}


def _tiny_transformers_config(model_type: str):
    data = tiny_config_dict(model_type)
    del data["model_type"]
    return lambda **kw: transformers.AutoConfig.for_model(model_type, **{**data, **kw})


# every other registered family: its tiny config from the registries (tests/families.py)
CONFIGS |= {mt: _tiny_transformers_config(mt) for mt in model_types() if mt not in CONFIGS}
AUTO = {
    "base": facade.AutoModel,
    "causal_lm": facade.AutoModelForCausalLM,
    "masked_lm": facade.AutoModelForMaskedLM,
    "seq2seq_lm": facade.AutoModelForSeq2SeqLM,
    "sequence_classification": facade.AutoModelForSequenceClassification,
}


def _cases():
    """(architecture, config overrides): every registered class; heads with an output
    projection both tied and untied; Llama also with a padding row and with biases; GPT-2 and BERT also built
    from a config with pruned heads."""
    cases = []
    for arch in sorted(ARCHITECTURES):
        spec = get_spec(arch)
        if spec.output_embeddings is None:
            cases.append((arch, {}))
        else:
            cases += [(arch, {"tie_word_embeddings": True}), (arch, {"tie_word_embeddings": False})]
        if arch == "LlamaForCausalLM":
            cases += [(arch, {"pad_token_id": 3}), (arch, {"attention_bias": True, "mlp_bias": True})]
        if get_spec(arch).model_type in ("gpt2", "bert"):  # Transformers prunes these while building
            cases.append((arch, {"pruned_heads": {1: [0, 2], 0: [3]}}))
    return cases


CASES = _cases()
IDS = [
    f"{arch}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}".replace(" ", "")
    for arch, kw in CASES
]


def _pair(arch: str, overrides: dict, seed: int = 0):
    """Transformers' model and fmodel's facade, each built right after `torch.manual_seed(seed)`."""
    config = CONFIGS[get_spec(arch).model_type](**overrides)
    return both(
        seed, lambda: getattr(transformers, arch)(config), lambda: facade.FAMILY_CLASSES[arch](config)
    )


def both(seed: int, theirs, ours):
    """Run `theirs()` and `ours()` each after `torch.manual_seed(seed)`; the draw after each must
    agree (the global generator was left in the same state)."""
    torch.manual_seed(seed)
    a = theirs()
    after_theirs = torch.randn(3)
    torch.manual_seed(seed)
    b = ours()
    after_ours = torch.randn(3)
    assert torch.equal(after_theirs, after_ours), "the global generator is left in another state"
    return a, b


def assert_same_tensors(theirs, ours) -> None:
    """Bit-equal state dicts (same names), and the same tie between input and output embeddings."""
    a, b = theirs.state_dict(), ours.state_dict()
    assert sorted(a) == sorted(b)
    different = [n for n in a if a[n].shape != b[n].shape or not torch.equal(a[n], b[n])]
    assert different == []
    their_out, our_out = theirs.get_output_embeddings(), ours.get_output_embeddings()
    if their_out is not None:
        tied = their_out.weight is theirs.get_input_embeddings().weight
        assert (our_out.weight is ours.get_input_embeddings().weight) == tied


def test_every_registered_architecture_is_covered():
    assert {arch for arch, _ in CASES} == set(ARCHITECTURES)
    assert {get_spec(a).model_type for a in ARCHITECTURES} <= set(CONFIGS)


@pytest.mark.parametrize(("arch", "overrides"), CASES, ids=IDS)
def test_construction_draws_as_transformers(arch, overrides):
    theirs, ours = _pair(arch, overrides, seed=11)
    assert_same_tensors(theirs, ours)
    config = CONFIGS[get_spec(arch).model_type](**overrides)
    _, via_private = both(
        11,
        lambda: getattr(transformers, arch)(config),
        lambda: facade.FAMILY_CLASSES[arch]._from_config(config),
    )
    assert_same_tensors(theirs, via_private)
    auto = AUTO[get_spec(arch).output]
    if auto._pick(config).architecture == arch:  # the class an Auto class picks for this model_type
        _, via_auto = both(11, lambda: getattr(transformers, arch)(config), lambda: auto.from_config(config))
        assert_same_tensors(theirs, via_auto)


@pytest.mark.parametrize(("arch", "overrides"), CASES, ids=IDS)
def test_init_weights_and_apply_init_weights_draw_as_transformers(arch, overrides):
    theirs, ours = _pair(arch, overrides)
    both(1, theirs.init_weights, ours.init_weights)  # everything is initialised already: no draw
    assert_same_tensors(theirs, ours)
    both(2, lambda: theirs.apply(theirs._init_weights), lambda: ours.apply(ours._init_weights))
    assert_same_tensors(theirs, ours)
    embed = (theirs.get_input_embeddings(), ours.get_input_embeddings())
    both(3, lambda: theirs._init_weights(embed[0]), lambda: ours._init_weights(embed[1]))
    assert_same_tensors(theirs, ours)


# (new_num_tokens, pad_to_multiple_of, mean_resizing): grow by mean rows, grow padded by
# `_init_weights`, shrink, pad only, grow again without mean resizing, the same size
RESIZES = [
    (101, None, True),
    (110, 8, False),
    (90, None, True),
    (None, 16, False),
    (120, None, False),
    (120, None, True),
]


@pytest.mark.parametrize(("arch", "overrides"), CASES, ids=IDS)
def test_resize_token_embeddings_draws_as_transformers(arch, overrides):
    theirs, ours = _pair(arch, overrides)
    for step, (n, multiple, mean) in enumerate(RESIZES):
        resize = dict(new_num_tokens=n, pad_to_multiple_of=multiple, mean_resizing=mean)
        got = both(
            20 + step,
            functools.partial(theirs.resize_token_embeddings, **resize),
            functools.partial(ours.resize_token_embeddings, **resize),
        )
        assert got[0].weight.shape == got[1].weight.shape
        assert ours.config.vocab_size == theirs.config.vocab_size
        assert_same_tensors(theirs, ours)
        # an untied output projection is a new module Transformers has not marked initialised:
        # the next `init_weights()` draws it, the one after draws nothing
        for seed in (40, 41):
            both(seed, theirs.init_weights, ours.init_weights)
            assert_same_tensors(theirs, ours)


def test_mean_resizing_without_a_positive_definite_covariance_draws_nothing_else():
    """Fewer rows than dimensions: Transformers uses the mean alone (no sample drawn)."""
    config = transformers.LlamaConfig(**{**DECODER, "vocab_size": 16})
    theirs, ours = both(
        0, lambda: transformers.LlamaForCausalLM(config), lambda: facade.LlamaForCausalLM(config)
    )
    both(5, lambda: theirs.resize_token_embeddings(20), lambda: ours.resize_token_embeddings(20))
    assert_same_tensors(theirs, ours)
    mean = theirs.model.embed_tokens.weight[:16].mean(0)
    assert torch.allclose(ours.model.embed_tokens.weight[16:], mean.expand(4, -1))


def test_hf_init_with_its_own_generator_is_pure_and_matches_the_seeded_global_draws():
    config = CONFIGS["gpt2"](tie_word_embeddings=True)
    torch.manual_seed(5)
    theirs = transformers.GPT2LMHeadModel(config)
    fm_config = fmodel.config_from_dict(config.to_dict())
    rng = torch.get_rng_state()
    state = hf_init.init(
        fm_config, architecture="GPT2LMHeadModel", generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(torch.get_rng_state(), rng)
    expected = theirs.state_dict()
    assert all(torch.equal(t, expected[n]) for n, t in state.params.items())
    assert state.params["lm_head.weight"] is state.params["transformer.wte.weight"]
    same = fmodel.init(fm_config, draw_order="transformers", generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(t, same.params[n]) for n, t in state.params.items())
    resized = hf_resize.resize_token_embeddings(state, 100, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), rng) and resized.config.vocab_size == 100
    assert state.params["transformer.wte.weight"].shape == (96, 64)  # the input state is unchanged


def test_hf_init_bfloat16_matches_transformers_under_that_dtype():
    config = CONFIGS["llama"]()
    fm_config = fmodel.config_from_dict(config.to_dict())
    theirs, state = both(
        7,
        lambda: transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16),
        lambda: hf_init.init(fm_config, architecture="LlamaForCausalLM", dtype=torch.bfloat16),
    )
    expected = theirs.state_dict()
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, expected[n]) for n, t in state.params.items())


def test_the_functional_api_keeps_its_own_generators():
    config = fmodel.LlamaConfig(**DECODER, tie_word_embeddings=False)
    rng = torch.get_rng_state()
    state = fmodel.init(config)
    assert all(torch.equal(t, fmodel.init(config, seed=0).params[n]) for n, t in state.params.items())
    fmodel.init_weights(state, names=["model.layers.0.mlp.up_proj.weight"])
    fmodel.resize_token_embeddings(state, 101)
    fmodel.resize_token_embeddings(state, 101, mean_resizing=False)
    assert torch.equal(torch.get_rng_state(), rng)
    with pytest.raises(ValueError, match="draw_order"):
        fmodel.init(config, draw_order="torch")
    with pytest.raises(ValueError, match="generator"):
        fmodel.init(config, generator=torch.Generator())
    with pytest.raises(ValueError, match="seed"):
        fmodel.init(config, seed=3, draw_order="transformers")
