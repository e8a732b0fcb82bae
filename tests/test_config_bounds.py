"""Config fields are typed and bounded: a hostile config.json (a list where a str belongs, a
size of 2**64+1, zero heads) is a `ConfigError` naming the field, the value and the bound,
and the bounds admit every real model."""

from __future__ import annotations

import time

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fmodel
from fmodel.config import CONFIG_CLASSES, base
from fmodel.errors import ConfigError

from .families import model_types, tiny_config, tiny_config_dict

# generic size field -> the bound every family's field of that meaning has
GENERIC_BOUNDS = {
    "vocab_size": base.VOCAB_MAX,
    "hidden_size": base.WIDTH_MAX,
    "intermediate_size": base.FFN_MAX,
    "num_hidden_layers": base.LAYERS_MAX,
    "num_attention_heads": base.HEADS_MAX,
    "num_key_value_heads": base.HEADS_MAX,
    "head_dim": base.HEAD_DIM_MAX,
    "max_position_embeddings": base.POSITIONS_MAX,
}
# family-specific size fields that are no alias of a generic one
OWN_BOUNDED = [
    ("gpt2", "intermediate_size", "n_inner", base.FFN_MAX),
    ("bert", "type_vocab_size", "type_vocab_size", base.VOCAB_MAX),
]


def _bounded() -> list[tuple[str, str, str, int]]:
    """(model_type, generic field, the family's own name, bound) for every registered family
    and every generic size field its config has, then the family-specific rows."""
    rows = []
    for model_type in model_types():
        cls = CONFIG_CLASSES[model_type]
        for generic, bound in GENERIC_BOUNDS.items():
            own = cls.field_aliases.get(generic, generic)
            if own in cls.modelled_keys():
                rows.append((model_type, generic, own, bound))
    return rows + OWN_BOUNDED


BOUNDED = _bounded()
# every integer field of every registered config class (annotated `int` or `int | None`)
INTEGER_FIELDS = [
    (model_type, field.name)
    for model_type in model_types()
    for field in attrs.fields(CONFIG_CLASSES[model_type])
    if isinstance(field.type, str) and field.type.startswith("int")
]


def test_every_registered_family_has_its_generic_size_fields_bounded():
    covered = {model_type for model_type, *_ in BOUNDED}
    assert covered == set(model_types())
    for model_type in model_types():
        generic = {g for mt, g, _, _ in BOUNDED if mt == model_type}
        assert {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"} <= generic, (
            model_type
        )


@pytest.mark.parametrize(("model_type", "field"), INTEGER_FIELDS)
def test_every_integer_field_is_bounded(model_type, field):
    with pytest.raises(ConfigError, match=rf"{field!r} is an integer of 65 bits.*, beyond the bound"):
        fmodel.config_from_dict({"model_type": model_type, field: 2**64 + 1})


@pytest.mark.parametrize(("model_type", "generic", "field", "bound"), BOUNDED)
@pytest.mark.parametrize("value", [2**64 + 1, 10**12])
def test_absurd_sizes_name_field_value_and_bound(model_type, generic, field, bound, value):
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        fmodel.config_from_dict({"model_type": model_type, field: value}, source="cfg.json")
    message = str(info.value)
    assert time.perf_counter() - start < 0.1
    assert "cfg.json" in message and repr(field) in message and str(bound) in message
    assert (str(value) if value < 2**64 else "bits") in message


@pytest.mark.parametrize(("model_type", "generic", "field", "bound"), BOUNDED)
def test_zero_and_negative_are_refused_as_non_positive(model_type, generic, field, bound):
    for value in (0, -1):
        with pytest.raises(ConfigError, match=rf"{field!r} expected a positive integer"):
            fmodel.config_from_dict({"model_type": model_type, field: value})


def test_the_bounds_admit_real_models():
    # Llama-3.1-405B, Gemma-3 vocabularies, Llama-4 Scout's 10M context
    fmodel.config_from_dict(
        {
            "model_type": "llama",
            "vocab_size": 262144,
            "hidden_size": 16384,
            "intermediate_size": 53248,
            "num_hidden_layers": 126,
            "num_attention_heads": 128,
            "num_key_value_heads": 8,
            "max_position_embeddings": 10485760,
        }
    )
    at_bound = {"model_type": "llama", "vocab_size": base.VOCAB_MAX, "num_hidden_layers": base.LAYERS_MAX}
    assert fmodel.config_from_dict(at_bound).vocab_size == base.VOCAB_MAX
    with pytest.raises(ConfigError, match=r"'vocab_size' is 16777217, beyond the bound 16777216 \(2\*\*24\)"):
        fmodel.config_from_dict({**at_bound, "vocab_size": base.VOCAB_MAX + 1})


@pytest.mark.parametrize("value", [["llama"], {"a": 1}, 3, None, b"llama"])
def test_model_type_must_be_a_string(value):
    with pytest.raises(ConfigError, match=r"field 'model_type' expected a string"):
        fmodel.config_from_dict({"model_type": value})


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        (
            {"num_attention_heads": 5},
            r"'hidden_size' \(64\) must be divisible by 'num_attention_heads' \(5\)",
        ),
        ({"num_key_value_heads": 3}, r"'num_key_value_heads' \(3\) must divide"),
        ({"head_dim": 10**12}, r"'head_dim' is 1000000000000, beyond the bound 16384"),
        ({"num_attention_heads": 0}, r"'num_attention_heads' expected a positive integer, got 0"),
        ({"vocab_size": "96"}, r"'vocab_size' expected a positive integer, got '96' \(str\)"),
        ({"vocab_size": 96.0}, r"'vocab_size' expected a positive integer"),
        ({"vocab_size": True}, r"'vocab_size' expected a positive integer"),
    ],
)
def test_llama_heads_and_types(changes, pattern):
    data = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, **changes}
    with pytest.raises(ConfigError, match=pattern):
        fmodel.config_from_dict(data)


def test_gpt2_and_bert_heads_must_divide_the_width():
    with pytest.raises(ConfigError, match=r"hidden size 64 must be divisible by the number of heads 5"):
        fmodel.config_from_dict({"model_type": "gpt2", "n_embd": 64, "n_head": 5})
    with pytest.raises(ConfigError, match=r"hidden size 64 must be divisible by the number of heads 3"):
        fmodel.config_from_dict({"model_type": "bert", "hidden_size": 64, "num_attention_heads": 3})


def test_a_million_digit_value_is_described_not_printed():
    with pytest.raises(ConfigError) as info:
        fmodel.config_from_dict({"model_type": "llama", "vocab_size": 10**5000})
    assert len(str(info.value)) < 400 and "bits" in str(info.value)


def test_deeply_nested_python_values_are_config_errors():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ConfigError, match="nested too deeply"):
        fmodel.config_from_dict({"model_type": "llama", "rope_scaling": {"x": deep}})


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    row=st.sampled_from(
        [(mt, f) for mt, _, f, _ in BOUNDED] + [("llama", "rms_norm_eps"), ("llama", "rope_theta")]
    ),
    value=st.one_of(
        st.integers(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=5),
        st.none(),
        st.booleans(),
        st.lists(st.integers(), max_size=3),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    ),
)
def test_any_field_value_builds_or_is_a_config_error(row, value):
    model_type, field = row
    try:
        config = fmodel.config_from_dict({**tiny_config_dict(model_type), field: value})
    except ConfigError:
        return
    assert getattr(config, field) == value or field in ("rms_norm_eps", "rope_theta")


@pytest.mark.parametrize("model_type", model_types())
def test_parameter_estimate_bounds_every_family_from_above(model_type):
    """The arithmetic that refuses an oversized config before any module is built must not
    undercount a family (a mixture of experts once counted one MLP per layer)."""
    from fmodel.io.expected import estimate_parameter_count

    config = tiny_config(model_type)
    for spec in fmodel.models.specs_for_model_type(model_type):
        state = fmodel.init(config, architecture=spec.name, seed=0)
        distinct = {id(t): t.numel() for t in state.params.values()}  # a tied tensor once
        assert estimate_parameter_count(config) >= sum(distinct.values()), spec.name
