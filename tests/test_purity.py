"""Purity: load, forward and set_attn_implementation never change a tensor of an input state,
states cannot be reassigned or mutated, and declared ties are checked.

After every call, whether it returns or raises, each tensor of the input is checked to be the
same object with the same `_version`, `data_ptr()` and values (the habit of torch.func's
own tests).
"""

from __future__ import annotations

import functools
import importlib.util

import attrs
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fmodel
from fmodel import attention

TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
CONFIGS = {
    "llama": fmodel.LlamaConfig(**TINY),
    "llama-tied": fmodel.LlamaConfig(**TINY, tie_word_embeddings=True),
    "llama-dynamic-rope": fmodel.LlamaConfig(
        **{**TINY, "max_position_embeddings": 8}, rope_scaling={"rope_type": "dynamic", "factor": 2.0}
    ),
    "qwen2-sliding": fmodel.Qwen2Config(
        **TINY, use_sliding_window=True, sliding_window=3, max_window_layers=1
    ),
    "mistral-sliding": fmodel.MistralConfig(**TINY, sliding_window=4),
}
ATTENTIONS = ["eager", "sdpa", "flex_attention"]
SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(SETTINGS, max_examples=10)  # for properties that run several forwards per example


@functools.cache
def make_state(name: str, architecture: str | None = None) -> fmodel.ModelState:
    state, _ = fmodel.io.state_from_tensors(
        CONFIGS[name], {}, architecture=architecture, allow_missing=True, seed=len(name)
    )
    return state


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("purity") / "tied"
    fmodel.save(make_state("llama-tied"), folder, max_shard_size="60KB")
    return folder


@functools.cache
def loaded_state(folder: str) -> fmodel.ModelState:
    return fmodel.load(folder)  # memory-mapped tensors


# --------------------------------------------------------------------------- recording


def record(tensors: dict[str, torch.Tensor | None]) -> dict:
    return {
        name: (t, t._version, t.data_ptr(), t.detach().clone())
        for name, t in tensors.items()
        if isinstance(t, torch.Tensor)
    }


def assert_unchanged(tensors: dict[str, torch.Tensor | None], before: dict) -> None:
    now = {name: t for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    assert sorted(now) == sorted(before)
    for name, (obj, version, ptr, values) in before.items():
        t = now[name]
        assert t is obj, f"{name}: replaced by another tensor object"
        assert t._version == version, f"{name}: written in place (_version {version} -> {t._version})"
        assert t.data_ptr() == ptr, f"{name}: storage moved"
        assert torch.equal(t, values), f"{name}: values changed"


class StateRecord:
    """Everything observable about a state: its tensors and its attributes."""

    def __init__(self, state: fmodel.ModelState) -> None:
        self.state = state
        self.tensors = record(
            {**{f"params.{k}": v for k, v in state.params.items()}}
            | {f"buffers.{k}": v for k, v in state.buffers.items()}
        )
        self.attrs = {f.name: getattr(state, f.name) for f in attrs.fields(fmodel.ModelState)}
        self.ties = dict(state.ties)

    def check(self) -> None:
        s = self.state
        assert_unchanged(
            {f"params.{k}": v for k, v in s.params.items()}
            | {f"buffers.{k}": v for k, v in s.buffers.items()},
            self.tensors,
        )
        for name, value in self.attrs.items():
            assert getattr(s, name) is value, name
        assert dict(s.ties) == self.ties
        for alias, source in s.ties.items():
            assert s.params[alias] is s.params[source]


# --------------------------------------------------------------------------- forward


@st.composite
def forward_calls(draw, vocab: int = 96, hidden: int = 64) -> dict:
    """Keyword arguments of a valid `fmodel.forward` call: random ids or embeddings, masks padded
    left, right or anywhere, explicit positions, extra outputs, attention implementations."""
    batch, seq = draw(st.integers(1, 3)), draw(st.integers(1, 12))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    kwargs: dict = {}
    if draw(st.booleans()):
        kwargs["input_ids"] = torch.randint(0, vocab, (batch, seq), generator=g)
    else:
        kwargs["inputs_embeds"] = torch.randn(batch, seq, hidden, generator=g)
    mask_kind = draw(st.sampled_from(["none", "ones", "left", "right", "random"]))
    if mask_kind != "none":
        mask = torch.ones(batch, seq, dtype=torch.long)
        for row in range(batch):
            pad = draw(st.integers(0, seq - 1))
            if mask_kind == "left":
                mask[row, :pad] = 0
            elif mask_kind == "right":
                mask[row, seq - pad :] = 0
            elif mask_kind == "random":
                mask[row] = torch.randint(0, 2, (seq,), generator=g)
                mask[row, draw(st.integers(0, seq - 1))] = 1
        kwargs["attention_mask"] = mask
    if draw(st.booleans()):
        kwargs["position_ids"] = torch.arange(seq).expand(batch, seq) + draw(st.integers(0, 20))
    kwargs["attn_implementation"] = draw(st.sampled_from([None, *ATTENTIONS]))
    kwargs["output_hidden_states"] = draw(st.booleans())
    kwargs["output_attentions"] = draw(st.booleans())
    if draw(st.booleans()):
        kwargs["logits_to_keep"] = draw(st.integers(1, seq))
    kwargs["training"] = draw(st.booleans())
    return kwargs


@SETTINGS
@given(st.sampled_from(sorted(CONFIGS)), forward_calls())
def test_forward_never_changes_the_state_or_the_inputs(name, kwargs):
    state = make_state(name)
    state_record = StateRecord(state)
    inputs_record = record(kwargs)
    out = fmodel.forward(state, **kwargs)
    state_record.check()
    assert_unchanged(kwargs, inputs_record)
    batch, seq = (kwargs.get("input_ids") if "input_ids" in kwargs else kwargs["inputs_embeds"]).shape[:2]
    keep = kwargs.get("logits_to_keep") or seq
    assert out.logits.shape == (batch, keep, 96)
    assert torch.isfinite(out.logits).all()
    assert (out.hidden_states is not None) is kwargs["output_hidden_states"]
    assert (out.attentions is not None) is kwargs["output_attentions"]


@FEW
@given(forward_calls())
def test_forward_on_a_memory_mapped_state(saved_folder, kwargs):
    state = loaded_state(str(saved_folder))
    state_record = StateRecord(state)
    fmodel.forward(state, **kwargs)
    state_record.check()


@FEW
@given(forward_calls())
def test_base_model_forward_is_pure(kwargs):
    state = make_state("llama", "LlamaModel")
    state_record = StateRecord(state)
    kwargs.pop("logits_to_keep", None)
    out = fmodel.forward(state, **kwargs)
    state_record.check()
    assert out.logits is None and out.last_hidden_state.shape[-1] == 64


def _bad_calls() -> dict[str, tuple[dict, type | tuple[type, ...], str]]:
    """{what is wrong: (forward kwargs, exception class, message pattern)}."""
    ids = torch.randint(0, 96, (2, 5))
    return {
        "mask of the wrong shape": (
            dict(input_ids=ids, attention_mask=torch.ones(2, 4, dtype=torch.long)),
            ValueError,
            r"attention_mask must have shape \[2, 5\] like the inputs, got \[2, 4\]",
        ),
        "ids and embeddings": (
            dict(input_ids=ids, inputs_embeds=torch.randn(2, 5, 64)),
            ValueError,
            "exactly one of input_ids or inputs_embeds",
        ),
        "neither ids nor embeddings": ({}, ValueError, "exactly one of input_ids or inputs_embeds"),
        "float ids": (dict(input_ids=ids.float()), ValueError, r"input_ids must be an integer tensor"),
        "1-d ids": (
            dict(input_ids=ids[0]),
            ValueError,
            r"input_ids must be an integer tensor \[batch, seq\]",
        ),
        "ids beyond the vocabulary": (
            dict(input_ids=ids + 96),
            (IndexError, ValueError),
            "out of range|vocab",
        ),
        "embeddings of the wrong width": (
            dict(inputs_embeds=torch.randn(2, 5, 32)),
            ValueError,
            r"inputs_embeds must be \[batch, seq, 64\], got \[2, 5, 32\]",
        ),
        "unknown attention": (
            dict(input_ids=ids, attn_implementation="no-such-attention"),
            fmodel.AttentionUnavailableError,
            "'no-such-attention' is not registered",
        ),
        "attention that raises": (
            dict(input_ids=ids, attn_implementation="purity-boom"),
            RuntimeError,
            "boom inside attention",
        ),
    }


@pytest.fixture
def raising_attention():
    def boom(module, query, key, value, attention_mask, **kwargs):
        raise RuntimeError("boom inside attention")

    attention.register("purity-boom", boom)
    yield
    attention.unregister("purity-boom")


@pytest.mark.parametrize("call", list(_bad_calls()))
@pytest.mark.parametrize("name", ["llama-tied", "qwen2-sliding"])
def test_forward_that_raises_changes_nothing(raising_attention, name, call):
    state = make_state(name)
    state_record = StateRecord(state)
    kwargs, error, pattern = _bad_calls()[call]
    inputs_record = record(kwargs)
    with pytest.raises(error, match=pattern):
        fmodel.forward(state, **kwargs)
    state_record.check()
    assert_unchanged(kwargs, inputs_record)
    # The cached skeleton holds no tensor of the state after the failure.
    from fmodel.models.skeleton import skeleton

    module = skeleton(state.config, state.architecture)
    assert all(p.is_meta for p in module.parameters())
    # ...and the next call still works and gives the same numbers as before.
    ids = torch.arange(10).reshape(2, 5)
    first = fmodel.forward(state, ids).logits
    assert torch.equal(fmodel.forward(state, ids).logits, first)


# --------------------------------------------------------------------------- load


@SETTINGS
@given(
    dtype=st.sampled_from([None, "auto", "float32", "bfloat16", torch.float16]),
    architecture=st.sampled_from([None, "LlamaForCausalLM", "LlamaModel"]),
    strict=st.booleans(),
    allow_missing=st.booleans(),
)
def test_load_never_changes_an_existing_state(saved_folder, dtype, architecture, strict, allow_missing):
    earlier = loaded_state(str(saved_folder))
    state_record = StateRecord(earlier)
    new = fmodel.load(
        saved_folder, dtype=dtype, architecture=architecture, strict=strict, allow_missing=allow_missing
    )
    state_record.check()
    assert new is not earlier
    for name, t in new.params.items():
        source = earlier.params[name if name in earlier.params else "model." + name]
        assert torch.equal(t.float(), source.to(t.dtype).float()), name


@SETTINGS
@given(
    name=st.sampled_from(sorted(CONFIGS)),
    dtype=st.sampled_from([None, "float32", "bfloat16"]),
    damage=st.sampled_from(["none", "drop", "reshape", "extra"]),
    allow_missing=st.booleans(),
    strict=st.booleans(),
    data=st.data(),
)
def test_state_from_tensors_never_changes_its_input(name, dtype, damage, allow_missing, strict, data):
    source = make_state(name)
    tensors = dict(source.unique_params())
    victim = data.draw(st.sampled_from(sorted(tensors)))
    if damage == "drop":
        del tensors[victim]
    elif damage == "reshape":
        tensors[victim] = tensors[victim].reshape(1, -1)
    elif damage == "extra":
        tensors["model.layers.0.unexpected.weight"] = torch.zeros(3)
    names_before = sorted(tensors)
    tensors_record = record(tensors)
    state_record = StateRecord(source)
    try:
        state, _ = fmodel.io.state_from_tensors(
            source.config, tensors, dtype=dtype, allow_missing=allow_missing, strict=strict
        )
    except fmodel.CheckpointError:
        raised = True
    else:
        raised = False
        for n, t in state.unique_params().items():
            if dtype in (None, "float32") and n in tensors:
                assert t is tensors[n], f"{n}: not shared although no conversion was asked"
    assert raised == (
        (damage == "reshape") or (damage == "drop" and not allow_missing) or (damage == "extra" and strict)
    )
    assert sorted(tensors) == names_before
    assert_unchanged(tensors, tensors_record)
    state_record.check()


def test_load_does_not_write_the_checkpoint(saved_folder):
    before = {p.name: p.read_bytes() for p in saved_folder.iterdir()}
    state = fmodel.load(saved_folder)
    fmodel.forward(state, torch.arange(6)[None])
    fmodel.load(saved_folder, dtype="bfloat16")
    assert {p.name: p.read_bytes() for p in saved_folder.iterdir()} == before


# --------------------------------------------------------------------------- set_attn_implementation


@FEW
@given(st.sampled_from(sorted(CONFIGS)), st.sampled_from(ATTENTIONS))
def test_set_attn_implementation_shares_every_tensor(name, attn):
    state = make_state(name)
    state_record = StateRecord(state)
    new = fmodel.set_attn_implementation(state, attn)
    state_record.check()
    assert state.attn_implementation == "sdpa"
    assert new is not state and new.attn_implementation == attn
    assert new.config is state.config and new.architecture == state.architecture
    assert list(new.params) == list(state.params) and list(new.buffers) == list(state.buffers)
    for n in state.params:
        assert new.params[n] is state.params[n], n
    for n in state.buffers:
        assert new.buffers[n] is state.buffers[n], n
    assert dict(new.ties) == dict(state.ties)
    ids = torch.arange(12).reshape(2, 6)
    assert torch.allclose(
        fmodel.forward(new, ids).logits, fmodel.forward(state, ids, attn_implementation=attn).logits
    )


@SETTINGS
@given(st.text(min_size=1, max_size=20).filter(lambda s: s not in attention.available()))
def test_set_attn_implementation_refuses_unknown_names(name):
    if name in ("flash_attention_2", "flash_attention_3"):
        return
    state = make_state("llama")
    state_record = StateRecord(state)
    with pytest.raises(fmodel.AttentionUnavailableError, match="is not registered"):
        fmodel.set_attn_implementation(state, name)
    state_record.check()


@pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available(),
    reason="flash-attn can run here",
)
def test_set_attn_implementation_unavailable_flash_says_what_is_missing():
    state = make_state("llama")
    state_record = StateRecord(state)
    with pytest.raises(fmodel.AttentionUnavailableError, match=r"'flash_attention_2' cannot run here: .*"):
        fmodel.set_attn_implementation(state, "flash_attention_2")
    state_record.check()
    assert state.attn_implementation == "sdpa"


# --------------------------------------------------------------------------- frozen states

FIELDS = [f.name for f in attrs.fields(fmodel.ModelState)]


@SETTINGS
@given(
    st.sampled_from(sorted(CONFIGS)),
    st.sampled_from(FIELDS) | st.from_regex(r"[a-z_][a-z0-9_]{0,12}", fullmatch=True),
    st.sampled_from([None, "eager", 0, {}, torch.zeros(1)]),
)
def test_state_attributes_cannot_be_assigned_or_deleted(name, attribute, value):
    state = make_state(name)
    state_record = StateRecord(state)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        setattr(state, attribute, value)
    if attribute in FIELDS:
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            delattr(state, attribute)
    state_record.check()


@SETTINGS
@given(st.sampled_from(sorted(CONFIGS)), st.sampled_from(["params", "buffers", "ties"]), st.data())
def test_state_mappings_are_read_only(name, which, data):
    state = make_state(name)
    state_record = StateRecord(state)
    mapping = getattr(state, which)
    key = data.draw(st.sampled_from(sorted(mapping)) | st.just("new.weight")) if mapping else "new.weight"
    with pytest.raises(TypeError):
        mapping[key] = torch.zeros(1)
    if key in mapping:
        with pytest.raises(TypeError):
            del mapping[key]
    for method in ("update", "pop", "popitem", "clear", "setdefault"):
        assert not hasattr(mapping, method), method
    copy = state.tensors  # a fresh dict: changing it cannot reach the state
    copy["new.weight"] = torch.zeros(1)
    copy.clear()
    state_record.check()


def test_state_copies_the_dict_it_was_built_from():
    source = make_state("llama")
    params = dict(source.params)
    state = fmodel.ModelState(source.config, source.architecture, params, source.buffers)
    params["model.norm.weight"] = torch.zeros(64)
    del params["lm_head.weight"]
    assert state.params["model.norm.weight"] is source.params["model.norm.weight"]
    assert "lm_head.weight" in state.params


# --------------------------------------------------------------------------- ties


@SETTINGS
@given(st.sampled_from(sorted(CONFIGS)), st.data())
def test_a_tie_whose_alias_is_another_tensor_is_refused(name, data):
    state = make_state(name)
    names = sorted(state.unique_params())
    source = data.draw(st.sampled_from(names))
    alias = data.draw(st.sampled_from([n for n in names if n != source]))
    copy_kind = data.draw(st.sampled_from(["clone", "view", "other"]))
    params = dict(state.params)
    params[alias] = {
        "clone": params[source].clone(),  # equal values, different object
        "view": params[source].view(params[source].shape),  # same storage, different object
        "other": params[alias],
    }[copy_kind]
    with pytest.raises(
        fmodel.TieError, match=rf"tie '{alias}' -> '{source}': '{alias}' must be the very tensor"
    ):
        fmodel.ModelState(state.config, state.architecture, params, state.buffers, {alias: source})
    params[alias] = params[source]
    tied = fmodel.ModelState(state.config, state.architecture, params, state.buffers, {alias: source})
    assert tied.params[alias] is tied.params[source]


def test_tie_to_missing_names_is_refused():
    state = make_state("llama-tied")
    params = dict(state.params)
    with pytest.raises(fmodel.TieError, match=r"the source 'model.nope.weight' is not a parameter"):
        fmodel.ModelState(
            state.config, state.architecture, params, state.buffers, {"lm_head.weight": "model.nope.weight"}
        )
    del params["lm_head.weight"]
    with pytest.raises(fmodel.TieError, match=r"the alias 'lm_head.weight' is not a parameter"):
        fmodel.ModelState(state.config, state.architecture, params, state.buffers, state.ties)


def test_replacing_a_tied_source_without_its_alias_is_refused():
    state = make_state("llama-tied")
    assert dict(state.ties) == {"lm_head.weight": "model.embed_tokens.weight"}
    new_embed = state.params["model.embed_tokens.weight"] * 2
    stale = dict(state.params) | {"model.embed_tokens.weight": new_embed}
    with pytest.raises(fmodel.TieError, match=r"'lm_head.weight' -> 'model.embed_tokens.weight'"):
        state.replace(params=stale)
    good = state.replace(params=stale | {"lm_head.weight": new_embed})
    assert good.params["lm_head.weight"] is new_embed
    assert state.params["lm_head.weight"] is state.params["model.embed_tokens.weight"] is not new_embed


# --------------------------------------------------------------------------- no hidden state


def test_concurrent_forwards_of_same_config_states_do_not_mix():
    # The skeleton cache is keyed by config: states sharing a config must never see each
    # other's tensors, even when their forwards run at the same time.
    from concurrent.futures import ThreadPoolExecutor

    config = CONFIGS["llama"]
    states = [fmodel.io.state_from_tensors(config, {}, allow_missing=True, seed=s)[0] for s in range(4)]
    ids = torch.arange(24).reshape(2, 12) % 96
    expected = [fmodel.forward(s, ids).logits for s in states]
    assert not torch.equal(expected[0], expected[1])
    records = [StateRecord(s) for s in states]

    def run(i: int) -> torch.Tensor:
        return fmodel.forward(states[i % 4], ids, attn_implementation=ATTENTIONS[i % 3]).logits

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, range(24)))
    for i, logits in enumerate(results):
        torch.testing.assert_close(logits, expected[i % 4], atol=1e-5, rtol=1e-5)
    for r in records:
        r.check()


def test_gradients_reach_the_state_tensors_without_changing_them():
    source = make_state("llama-tied")
    params = {n: t.detach().clone().requires_grad_(True) for n, t in source.unique_params().items()}
    params["lm_head.weight"] = params["model.embed_tokens.weight"]
    state = source.replace(params=params)
    state_record = StateRecord(state)
    ids = torch.arange(12).reshape(2, 6)
    loss = fmodel.forward(state, ids, training=True).logits.logsumexp(-1).mean()
    loss.backward()
    state_record.check()
    for name, t in state.unique_params().items():
        assert t.grad is not None and torch.isfinite(t.grad).all(), name
    assert state.params["lm_head.weight"].grad is state.params["model.embed_tokens.weight"].grad
