"""Configs: lossless config.json round trips (both rope spellings), frozen and hashable
objects, Transformers' defaults, and a `ConfigError` naming the field for every bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fmodel
from fmodel.config import CONFIG_CLASSES

from .conftest import requires_transformers, transformers
from .families import model_types, tiny_config_dict

FIXTURES = Path(__file__).parent / "fixtures"
TF5_LLAMA = FIXTURES / "tiny-llama-tf5"

CLASSES = {"llama": fmodel.LlamaConfig, "qwen2": fmodel.Qwen2Config, "mistral": fmodel.MistralConfig}
MODELLED = {key for cls in CLASSES.values() for key in cls.modelled_keys()}
RESERVED = MODELLED | {"model_type", "rope_parameters", "rope_scaling", "rope_theta"}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
ACTIVATIONS = ["silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "tanh"]

# --------------------------------------------------------------------------- strategies

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
unknown_keys = st.text("abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=14).filter(
    lambda k: k not in RESERVED
)
# Keys real config.json files carry that fmodel does not model.
realistic_extras = st.fixed_dictionaries(
    {},
    optional={
        "transformers_version": st.sampled_from(["4.57.6", "5.0.0"]),
        "use_cache": st.booleans(),
        "pretraining_tp": st.integers(1, 4),
        "_name_or_path": st.text(max_size=10),
        "quantization_config": st.dictionaries(st.sampled_from(["bits", "group_size"]), st.integers(1, 128)),
        "id2label": st.just({"0": "LABEL_0", "1": "LABEL_1"}),
        "pruned_heads": st.just({}),
        "torchscript": st.booleans(),
    },
)
positive = st.integers(1, 10**6)
token_ids = st.none() | st.integers(0, 10**6) | st.lists(st.integers(0, 10**6), min_size=1, max_size=3)
numbers = st.floats(1e-3, 1e3, allow_nan=False) | st.integers(1, 1000)


@st.composite
def rope_entries(draw) -> dict:
    """The rope keys of a config.json, in the Transformers 4 or the Transformers 5 spelling."""
    rope_type = draw(st.sampled_from(ROPE_TYPES))
    theta = draw(st.floats(1.0, 1e7) | st.integers(1, 10**7))
    params: dict = {}
    if rope_type in ("linear", "dynamic", "yarn", "llama3"):
        params["factor"] = draw(numbers)
    if rope_type == "llama3":
        params["low_freq_factor"] = draw(numbers)
        params["high_freq_factor"] = draw(numbers)
        params["original_max_position_embeddings"] = draw(st.integers(1, 10**5))
    if rope_type == "yarn":
        optional = {
            "original_max_position_embeddings": st.integers(1, 10**5),
            "beta_fast": numbers,
            "beta_slow": numbers,
            "attention_factor": numbers,
        }
        params.update(draw(st.fixed_dictionaries({}, optional=optional)))
    if draw(st.booleans()):  # Transformers 5: rope_parameters, which carries rope_theta
        return {"rope_parameters": {"rope_type": rope_type, "rope_theta": theta, **params}}
    out: dict = {}
    if rope_type != "default" or draw(st.booleans()):
        # Transformers 4 wrote "type" (old), "rope_type" (new) or both.
        for key in draw(st.sampled_from([("rope_type",), ("type",), ("type", "rope_type")])):
            params[key] = rope_type
        out["rope_scaling"] = params
    elif draw(st.booleans()):
        out["rope_scaling"] = None
    if draw(st.booleans()):
        out["rope_theta"] = theta
    return out


@st.composite
def config_dicts(draw) -> dict:
    """A valid config.json dict of the Llama family, with unknown keys mixed in."""
    model_type = draw(st.sampled_from(sorted(CLASSES)))
    kv_heads = draw(st.integers(1, 4))
    heads = kv_heads * draw(st.integers(1, 4))
    d: dict = {"model_type": model_type, "num_attention_heads": heads}
    if model_type != "llama" or draw(st.booleans()):  # mistral/qwen2 default kv heads need not divide
        d["num_key_value_heads"] = kv_heads
    if draw(st.booleans()):
        d["head_dim"] = 2 * draw(st.integers(1, 64))
        d["hidden_size"] = draw(positive)
    else:
        d["hidden_size"] = heads * 2 * draw(st.integers(1, 64))
    optional = {
        "vocab_size": positive,
        "intermediate_size": positive,
        "max_position_embeddings": positive,
        "hidden_act": st.sampled_from(ACTIVATIONS),
        "initializer_range": st.floats(0, 1) | st.integers(0, 1),
        "rms_norm_eps": st.floats(1e-12, 1e-2),
        "tie_word_embeddings": st.booleans(),
        "attention_dropout": st.floats(0, 1),
        "pad_token_id": token_ids,
        "bos_token_id": token_ids,
        "eos_token_id": token_ids,
        "architectures": st.none() | st.lists(st.sampled_from(["LlamaForCausalLM", "X"]), max_size=2),
    }
    if model_type == "llama":
        optional |= {"attention_bias": st.booleans(), "mlp_bias": st.booleans()}
    else:
        optional |= {"sliding_window": st.none() | positive}
    if model_type == "qwen2":
        optional |= {"use_sliding_window": st.booleans(), "max_window_layers": st.integers(0, 100)}
    d.update(draw(st.fixed_dictionaries({}, optional=optional)))
    if model_type == "qwen2" and draw(st.booleans()):
        d["num_hidden_layers"] = layers = draw(st.integers(1, 6))
        kinds = st.sampled_from(["full_attention", "sliding_attention"])
        d["layer_types"] = draw(st.lists(kinds, min_size=layers, max_size=layers))
    elif draw(st.booleans()):
        d["num_hidden_layers"] = draw(st.integers(1, 100))
    d.update(draw(rope_entries()))
    dtype_key = draw(st.sampled_from(["dtype", "torch_dtype", None]))
    if dtype_key:
        d[dtype_key] = draw(st.sampled_from(["float32", "bfloat16", "float16", None]))
    d.update(draw(realistic_extras))
    d.update(draw(st.dictionaries(unknown_keys, json_values, max_size=4)))
    return d


# --------------------------------------------------------------------------- round trips


@settings(max_examples=150, deadline=None)
@given(config_dicts())
def test_round_trip_is_lossless(d):
    before = copy.deepcopy(d)
    config = fmodel.config_from_dict(d)
    assert d == before, "config_from_dict must not modify its input"
    assert type(config) is CLASSES[d["model_type"]]
    assert config.to_diff_dict() == d
    assert json.loads(config.to_json_string()) == d
    again = fmodel.config_from_dict(config.to_diff_dict())
    assert again == config
    assert hash(again) == hash(config)


@settings(max_examples=60, deadline=None)
@given(config_dicts())
def test_rope_spellings_read_the_same_values(d):
    config = fmodel.config_from_dict(d)
    if "rope_parameters" in d:
        params = d["rope_parameters"]
        assert config.rope_theta == params["rope_theta"]
        assert config.rope_type == params["rope_type"]
        assert dict(config.rope_scaling) == {k: v for k, v in params.items() if k != "rope_theta"}
        assert "rope_scaling" not in config.to_diff_dict()
    else:
        assert config.rope_theta == d.get("rope_theta", 10000.0)
        scaling = d.get("rope_scaling")
        expected_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        assert config.rope_type == expected_type
        assert "rope_parameters" not in config.to_diff_dict()
    assert isinstance(config.rope_theta, float)


@settings(max_examples=60, deadline=None)
@given(config_dicts())
def test_equal_dicts_give_equal_hashable_configs(d):
    a = fmodel.config_from_dict(copy.deepcopy(d))
    b = fmodel.config_from_dict(copy.deepcopy(d))
    assert a == b
    assert hash(a) == hash(b)
    assert {a: "x"}[b] == "x"


@settings(max_examples=30, deadline=None)
@given(config_dicts(), st.data())
def test_configs_are_frozen(d, data):
    config = fmodel.config_from_dict(d)
    field = data.draw(st.sampled_from([f.name for f in attrs.fields(type(config))]))
    before = getattr(config, field)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        setattr(config, field, before)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        del config.hidden_size
    if config.rope_scaling:
        with pytest.raises(TypeError):
            config.rope_scaling["factor"] = 3.0
    assert getattr(config, field) is before
    assert config.to_diff_dict() == d


@settings(max_examples=40, deadline=None)
@given(config_dicts(), st.integers(1, 10**5))
def test_replace_returns_a_new_config_and_writes_the_change(d, vocab):
    config = fmodel.config_from_dict(d)
    changed = config.replace(vocab_size=vocab)
    assert changed.vocab_size == vocab
    assert config.to_diff_dict() == d  # unchanged
    assert changed.to_diff_dict() == {**d, "vocab_size": vocab}


def test_configs_built_in_code_write_only_changed_fields():
    config = fmodel.MistralConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, sliding_window=8
    )
    assert config.to_diff_dict() == {
        "model_type": "mistral",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "sliding_window": 8,
    }
    assert fmodel.config_from_dict(config.to_diff_dict()).sliding_window == 8


def test_tf5_rope_parameters_without_explicit_default_type_round_trips():
    d = {"model_type": "llama", "rope_parameters": {"rope_theta": 500000.0}}
    config = fmodel.config_from_dict(d)
    assert config.rope_theta == 500000.0
    assert config.rope_type == "default"
    assert config.to_diff_dict() == d


def test_tf5_rope_parameters_without_rope_theta_round_trips():
    d = {"model_type": "llama", "rope_parameters": {"rope_type": "linear", "factor": 2.0}}
    config = fmodel.config_from_dict(d)
    assert config.rope_theta == 10000.0
    assert config.to_diff_dict() == d


# --------------------------------------------------------------------------- Transformers


@requires_transformers
@pytest.mark.parametrize("model_type", model_types())
def test_defaults_are_transformers_defaults(model_type):
    """Every registered family's defaults are its Transformers class's: the `__init__` default,
    or, where that is None and Transformers fills the value in (`mlp_only_layers=None` -> []),
    the value its default config holds."""
    import inspect

    hf_cls = transformers.CONFIG_MAPPING[model_type]
    signature = inspect.signature(hf_cls.__init__).parameters
    ours = {f.name: f.default for f in attrs.fields(CONFIG_CLASSES[model_type]) if f.name in signature}
    assert len(ours) >= 10
    default = hf_cls()
    for name, value in ours.items():
        filled = getattr(default, name, None)
        filled = tuple(filled) if isinstance(filled, list) else filled
        assert value == signature[name].default or (signature[name].default is None and value == filled), name


@requires_transformers
@pytest.mark.parametrize("model_type", model_types())
def test_every_family_config_json_from_transformers_round_trips(tmp_path, model_type):
    data = tiny_config_dict(model_type)
    data.pop("model_type")
    hf_config = transformers.AutoConfig.for_model(model_type, **data)
    hf_config.save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "config.json").read_text())
    config = fmodel.load_config(tmp_path)
    assert type(config) is CONFIG_CLASSES[model_type]
    assert config.to_diff_dict() == on_disk
    for key in type(config).modelled_keys():
        if key in on_disk:
            expected = getattr(hf_config, key)
            assert getattr(config, key) == (tuple(expected) if isinstance(expected, list) else expected), key


@requires_transformers
@pytest.mark.parametrize(
    "model_type, kwargs",
    [
        ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "head_dim": 24}),
        ("llama", {"tie_word_embeddings": True, "attention_bias": True}),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
        ("mistral", {"sliding_window": 4, "rope_theta": 1e6}),
    ],
)
def test_transformers_config_json_round_trips(tmp_path, model_type, kwargs):
    hf_cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "mistral": transformers.MistralConfig,
    }[model_type]
    hf_config = hf_cls(
        vocab_size=96,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        **kwargs,
    )
    hf_config.save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "config.json").read_text())
    config = fmodel.load_config(tmp_path)
    assert config.to_diff_dict() == on_disk
    for key in type(config).modelled_keys():
        if key in on_disk:
            expected = getattr(hf_config, key)
            assert getattr(config, key) == (tuple(expected) if isinstance(expected, list) else expected), key


# --------------------------------------------------------------------------- fixture in TF5 spelling


def test_tf5_fixture_loads_and_round_trips():
    on_disk = json.loads((TF5_LLAMA / "config.json").read_text())
    config = fmodel.load_config(TF5_LLAMA)
    assert isinstance(config, fmodel.LlamaConfig)
    assert config.rope_theta == 500000.0
    assert config.rope_type == "llama3"
    assert config.rope_scaling["factor"] == 8.0
    assert config.tie_word_embeddings is True
    assert config.head_size == 16 and config.kv_heads == 2
    assert config.extra["dtype"] == "float32"
    assert config.to_diff_dict() == on_disk
    assert fmodel.load_config(TF5_LLAMA / "config.json") == config


def test_tf5_fixture_saves_in_its_own_spelling(tmp_path):
    config = fmodel.load_config(TF5_LLAMA)
    state, _ = fmodel.io.state_from_tensors(config, {}, allow_missing=True)
    fmodel.save(state, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    original = json.loads((TF5_LLAMA / "config.json").read_text())
    # the Transformers 4 keys are added beside rope_parameters so 4.x reads the same rope
    params = dict(original["rope_parameters"])
    compat = {"rope_theta": params.pop("rope_theta"), "rope_scaling": params}
    assert written == {**original, **compat}
    loaded = fmodel.load(tmp_path / "out")
    assert loaded.config == config
    assert loaded.config.to_diff_dict()["rope_parameters"] == original["rope_parameters"]


def test_both_rope_spellings_give_the_same_rotary_frequencies():
    tf5 = json.loads((TF5_LLAMA / "config.json").read_text())
    tf4 = {k: v for k, v in tf5.items() if k != "rope_parameters"}
    params = dict(tf5["rope_parameters"])
    tf4["rope_theta"] = params.pop("rope_theta")
    tf4["rope_scaling"] = params
    a, _ = fmodel.io.state_from_tensors(fmodel.config_from_dict(tf5), {}, allow_missing=True)
    b, _ = fmodel.io.state_from_tensors(fmodel.config_from_dict(tf4), {}, allow_missing=True)
    name = "model.rotary_emb.inv_freq"
    assert a.buffers[name].equal(b.buffers[name])
    default, _ = fmodel.io.state_from_tensors(
        fmodel.config_from_dict({**tf4, "rope_scaling": None}), {}, allow_missing=True
    )
    assert not default.buffers[name].equal(a.buffers[name])  # the llama3 scaling did apply


# --------------------------------------------------------------------------- bad configs

BASE = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4}


def _wrong_value(field: str):
    return 5 if field == "architectures" else ["not", "valid"]


@pytest.mark.parametrize(
    "model_type, field",
    [(mt, f) for mt in model_types() for f in CONFIG_CLASSES[mt].modelled_keys()],
)
def test_wrong_type_names_the_field(model_type, field):
    d = {**tiny_config_dict(model_type), field: _wrong_value(field)}
    with pytest.raises(fmodel.ConfigError, match=f"'{field}'"):
        fmodel.config_from_dict(d)


@pytest.mark.parametrize(
    "changes, pattern",
    [
        ({"hidden_size": "64"}, r"'hidden_size' expected a positive integer.*'64'"),
        ({"hidden_size": 0}, r"'hidden_size' expected a positive integer"),
        ({"vocab_size": True}, r"'vocab_size' expected a positive integer"),
        ({"vocab_size": 9.0}, r"'vocab_size' expected a positive integer"),
        ({"rms_norm_eps": float("nan")}, r"'rms_norm_eps' expected a finite number"),
        ({"rope_theta": float("inf")}, r"'rope_theta' expected a finite number"),
        ({"rms_norm_eps": "1e-6"}, r"'rms_norm_eps' expected a finite number"),
        ({"tie_word_embeddings": 1}, r"'tie_word_embeddings' expected true or false"),
        ({"hidden_act": 3}, r"'hidden_act' expected a string"),
        ({"hidden_act": "swish2"}, r"'hidden_act' is 'swish2'"),
        ({"eos_token_id": [1, "2"]}, r"'eos_token_id' expected a token id"),
        ({"architectures": "LlamaForCausalLM"}, r"'architectures' expected a list of class names"),
        ({"num_key_value_heads": 3}, r"'num_key_value_heads' \(3\) must divide 'num_attention_heads' \(4\)"),
        ({"hidden_size": 66}, r"'hidden_size' \(66\) must be divisible by 'num_attention_heads' \(4\)"),
        ({"head_dim": 15}, r"even head size, got head size 15"),
        ({"rope_scaling": {"rope_type": "ntk"}}, r"'rope_scaling.rope_type' is 'ntk'; expected one of"),
        ({"rope_scaling": {"type": "ntk"}}, r"'rope_scaling.rope_type' is 'ntk'"),
        (
            {"rope_scaling": {"rope_type": "linear"}},
            r"'linear' needs a positive number in field 'rope_scaling.factor'",
        ),
        ({"rope_scaling": {"rope_type": "yarn", "factor": -1.0}}, r"'rope_scaling.factor', got -1.0"),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}},
            r"'rope_scaling.low_freq_factor', got None",
        ),
        ({"rope_scaling": [1, 2]}, r"'rope_scaling' expected a mapping"),
        (
            {"rope_parameters": {"rope_type": "ntk", "rope_theta": 1.0}},
            r"'rope_parameters.rope_type' is 'ntk'",
        ),
        (
            {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1.0}},
            r"'rope_parameters.factor', got None",
        ),
        ({"rope_parameters": "default"}, r"'rope_parameters' expected a mapping"),
        ({"rope_parameters": {"rope_theta": "big"}}, r"'rope_theta' expected a finite number"),
    ],
)
def test_bad_values_raise_config_error_naming_the_field(changes, pattern):
    with pytest.raises(fmodel.ConfigError, match=pattern):
        fmodel.config_from_dict({**BASE, **changes})


def test_qwen2_layer_types_must_cover_every_layer():
    d = {"model_type": "qwen2", "num_hidden_layers": 3, "layer_types": ["full_attention"]}
    with pytest.raises(
        fmodel.ConfigError, match=r"'layer_types' has 1 entries, expected num_hidden_layers=3"
    ):
        fmodel.config_from_dict(d)
    with pytest.raises(fmodel.ConfigError, match=r"'layer_types' expected a list of 'full_attention'"):
        fmodel.config_from_dict({**d, "layer_types": ["full_attention", "local", "full_attention"]})


@pytest.mark.parametrize("data", [{"hidden_size": 64}, {}, [], "llama", None])
def test_missing_model_type(data):
    with pytest.raises(fmodel.ConfigError, match=r"missing field 'model_type'"):
        fmodel.config_from_dict(data)


def test_unknown_model_type_is_an_unknown_architecture():
    with pytest.raises(
        fmodel.UnknownArchitectureError, match=r"model_type 'rwkv9' is not implemented.*llama"
    ):
        fmodel.config_from_dict({"model_type": "rwkv9"})


def test_config_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(fmodel.ConfigError, match=r"nowhere.*no such config file"):
        fmodel.load_config(missing / "config.json")
    missing.mkdir()
    with pytest.raises(fmodel.ConfigError, match=r"nowhere/config.json: no such config file"):
        fmodel.load_config(missing)

    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(fmodel.ConfigError, match=r"config.json: not valid JSON"):
        fmodel.load_config(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps({**BASE, "num_key_value_heads": 3}))
    with pytest.raises(fmodel.ConfigError, match=r"config.json: LlamaConfig: field 'num_key_value_heads'"):
        fmodel.load_config(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(fmodel.ConfigError, match=r"config.json: missing field 'model_type'"):
        fmodel.load_config(tmp_path)


def test_config_written_by_transformers5_round_trips():
    path = FIXTURES / "tiny-llama-tf5-checkpoint" / "config.json"  # saved by Transformers 5.24
    on_disk = json.loads(path.read_text())
    config = fmodel.load_config(path)
    assert config.rope_spelling == "rope_parameters"
    assert (config.rope_type, config.rope_theta, config.rope_scaling["factor"]) == ("llama3", 500000.0, 8.0)
    assert config.extra["dtype"] == "float32"
    assert config.to_diff_dict() == on_disk
    assert config.to_json_string() == json.dumps(on_disk, indent=2, sort_keys=True) + "\n"


def test_every_family_config_class_is_exported_at_the_top_level():
    from fmodel.config import CONFIG_CLASSES

    assert CONFIG_CLASSES  # the registry is populated on import
    for model_type, cls in CONFIG_CLASSES.items():
        assert getattr(fmodel, cls.__name__, None) is cls, (
            f"fmodel.{cls.__name__} ({model_type}) is not exported"
        )
        assert cls.__name__ in fmodel.__all__
