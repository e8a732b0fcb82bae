"""Mutated safetensors / sharded / pickle checkpoints and their JSON files: every mutant loads
identically, loads different data only where only data bytes changed, or raises a named
`FModelError` within a second. The mutators are `benchmarks/fuzz_checkpoints.py`'s (which
runs a larger campaign); the named cases below pin each rule of issue 12, item 2."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import fmodel
from benchmarks import fuzz_checkpoints as fz
from fmodel.errors import (
    ArgumentTypeError,
    CheckpointDtypeError,
    CheckpointError,
    ConfigError,
    FModelError,
    InvalidArgumentError,
    ShapeMismatchError,
    SizeLimitError,
    UnknownArchitectureError,
)

from .conftest import requires_transformers

pytestmark = requires_transformers


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    logging.getLogger("fmodel").setLevel(logging.ERROR)
    root = tmp_path_factory.mktemp("fuzz")
    folders = fz.build_subjects(str(root / "subjects"))
    refs = {name: fmodel.load(path) for name, path in folders.items()}
    work = root / "mutants"
    work.mkdir()
    return folders, refs, str(work)


def _copy(subjects, name: str, tmp_path):
    target = tmp_path / name
    shutil.copytree(subjects[0][name], target)
    return target


def _timed_error(exc_type, fn, *args, **kwargs):
    start = time.perf_counter()
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    assert time.perf_counter() - start < 1.0
    return str(info.value)


# --------------------------------------------------------------------------- the fuzz


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(family=st.sampled_from(sorted(fz.FAMILIES)), seed=st.integers(0, 2**32 - 1), pick=st.integers(0, 99))
def test_every_mutant_is_named_harmless_or_data_only(subjects, family, seed, pick):
    folders, refs, work = subjects
    names = fz.FAMILIES[family][1]
    subject = names[pick % len(names)]
    folder, region = fz.mutant(folders[subject], work, family, random.Random(seed))
    try:
        result, _, exc = fz.outcome(folder, refs[subject], region)
        assert not os.path.exists(os.path.join(folder, fz.MARKER)), "code from a checkpoint ran"
    finally:
        shutil.rmtree(os.path.dirname(folder), ignore_errors=True)
    assert result in ("named", "identical", "data-only"), (family, subject, seed, result, exc)
    if result == "data-only":
        assert region == "data"


# --------------------------------------------------------------------------- dtypes


def _restore(folder, name, dtype):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8, torch.complex64])
def test_integer_norm_weight_is_a_dtype_error(subjects, tmp_path, dtype):
    folder = _copy(subjects, "llama", tmp_path)
    _restore(folder, "model.norm.weight", dtype)
    message = _timed_error(CheckpointDtypeError, fmodel.load, folder)
    assert "model.norm.weight" in message and "model.safetensors" in message
    assert str(dtype) in message and "floating dtype" in message


def test_header_dtype_f32_to_i32_is_a_dtype_error(subjects, tmp_path):
    folder = _copy(subjects, "gpt2", tmp_path)
    path = str(folder / "model.safetensors")
    header, data = fz.read_safetensors(path)
    header["transformer.ln_f.weight"]["dtype"] = "I32"
    fz.write_safetensors(path, header, data)
    message = _timed_error(CheckpointDtypeError, fmodel.load, folder)
    assert "transformer.ln_f.weight" in message and "torch.int32" in message


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_any_float_dtype_loads_as_stored(subjects, tmp_path, dtype):
    folder = _copy(subjects, "bert", tmp_path)
    name = "bert.embeddings.LayerNorm.weight"
    _restore(folder, name, dtype)
    state = fmodel.load(folder)
    assert state.params[name].dtype == dtype


def test_quantized_int8_weight_must_stay_int8(tmp_path):
    state = fmodel.init(fmodel.LlamaConfig(**fz.TINY, num_key_value_heads=2))
    fmodel.save(fmodel.quantize(state, "int8"), tmp_path / "q")
    assert fmodel.load(tmp_path / "q").params["model.layers.0.mlp.up_proj.weight_int8"].dtype == torch.int8
    name = "model.layers.0.mlp.up_proj.weight_int8"
    _restore(tmp_path / "q", name, torch.float32)
    message = _timed_error(CheckpointDtypeError, fmodel.load, tmp_path / "q")
    assert name in message and "torch.float32" in message and "expected torch.int8" in message


# --------------------------------------------------------------------------- lying configs


def _set_config(folder, **changes):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("layers", [3, 1000])
def test_config_declaring_more_layers_than_the_file_fails_fast(subjects, tmp_path, layers):
    folder = _copy(subjects, "llama", tmp_path)
    _set_config(folder, num_hidden_layers=layers)
    message = _timed_error(CheckpointError, fmodel.load, folder)
    assert f"num_hidden_layers={layers}" in message and "layers [0, 1]" in message


def test_config_beyond_the_layer_bound_is_a_config_error(subjects, tmp_path):
    folder = _copy(subjects, "gpt2", tmp_path)
    _set_config(folder, n_layer=10**9)
    message = _timed_error(ConfigError, fmodel.load, folder)
    assert "config.json" in message and "'n_layer'" in message and "1000000000" in message


def test_config_lying_about_the_vocabulary_names_the_embedding(subjects, tmp_path):
    folder = _copy(subjects, "bert", tmp_path)
    _set_config(folder, vocab_size=2**20)
    message = _timed_error(ShapeMismatchError, fmodel.load, folder)
    assert "word_embeddings.weight" in message and "[1048576, 64]" in message


def test_init_of_a_config_beyond_memory_is_refused_before_building(tmp_path):
    config = fmodel.LlamaConfig(vocab_size=2**24, hidden_size=2**20, num_hidden_layers=1000)
    # what fmodel.init asks (allow_missing=True, no tensors); refused before the skeleton
    message = _timed_error(SizeLimitError, fmodel.io.state_from_tensors, config, {}, allow_missing=True)
    assert "vocab_size=16777216" in message


# --------------------------------------------------------------------------- JSON bytes


@pytest.mark.parametrize("choice", range(fz.JSON_MUTATIONS))
@pytest.mark.parametrize("which", ["config.json", "model.safetensors.index.json"])
def test_hostile_json_bytes_are_named(subjects, tmp_path, choice, which):
    folder = _copy(subjects, "llama-sharded", tmp_path)
    path = folder / which
    path.write_bytes(fz.json_bytes_mutation(random.Random(0), path.read_bytes(), choice))
    try:
        state = fmodel.load(folder)
    except FModelError as exc:
        assert which in str(exc) or which == "config.json"
        return
    assert choice in (10, 11)  # a truncation or flip that happens to stay valid
    del state


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('{"model_type": "llama"}'.encode("utf-16"), "UTF-16 byte-order mark"),
        ('{"model_type": "llama"}'.encode("utf-16-le"), "UTF-16 or UTF-32"),
        (b"\xef\xbb\xbf{}", "UTF-8 byte-order mark"),
        (b'{"model_type": "ll\xffama"}', "not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"model_type": "llama", "vocab_size": ' + b"9" * 1_000_000 + b"}", "not valid JSON"),
        (b'{"model_type": "llama", "x": NaN}', "NaN is not JSON"),
        (b'{"model_type": "llama", "model_type": "gpt2"}', "'model_type' appears twice"),
        (b"[1, 2]", "expected a JSON object"),
    ],
)
def test_config_bytes_give_config_errors_naming_the_file(tmp_path, raw, expected):
    (tmp_path / "config.json").write_bytes(raw)
    message = _timed_error(ConfigError, fmodel.load_config, tmp_path)
    assert "config.json" in message and expected in message


def test_generation_config_bytes_are_config_errors(tmp_path):
    (tmp_path / "generation_config.json").write_bytes(b"[" * 100_000)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    message = _timed_error(ConfigError, fmodel.load_generation_config, tmp_path)
    assert "generation_config.json" in message


# --------------------------------------------------------------------------- index


def _edit_index(folder, fn):
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    fn(index["weight_map"])
    path.write_text(json.dumps(index))


@pytest.mark.parametrize("value", [1, None, ["model-00001-of-00002.safetensors"], {"a": 1}, ""])
def test_index_values_must_be_file_names(subjects, tmp_path, value):
    folder = _copy(subjects, "llama-sharded", tmp_path)
    _edit_index(folder, lambda wm: wm.__setitem__("model.norm.weight", value))
    message = _timed_error(CheckpointError, fmodel.load, folder)
    assert "model.safetensors.index.json" in message and "model.norm.weight" in message


def test_index_paths_are_confined_to_the_folder(subjects, tmp_path):
    folder = _copy(subjects, "llama-sharded", tmp_path)
    shard = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][
        "model.norm.weight"
    ]
    outside = tmp_path / "outside.safetensors"
    shutil.copy(folder / shard, outside)
    for bad in ("../llama-sharded/" + shard, str(outside), "sub/../" + shard):
        _edit_index(folder, lambda wm, bad=bad: wm.__setitem__("model.norm.weight", bad))
        message = _timed_error(CheckpointError, fmodel.load, folder)
        assert "outside the checkpoint folder" in message
        shutil.rmtree(folder)
        folder = _copy(subjects, "llama-sharded", tmp_path)
    (folder / shard).unlink()
    (folder / shard).symlink_to(outside)
    message = _timed_error(CheckpointError, fmodel.load, folder)
    assert "resolves to" in message and "outside the checkpoint folder" in message


def test_hub_snapshot_symlinks_to_blobs_are_fine(subjects, tmp_path):
    repo = tmp_path / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    source = subjects[0]["llama-sharded"]
    for i, name in enumerate(sorted(os.listdir(source))):
        shutil.copy(os.path.join(source, name), blobs / f"blob{i}")
        (snapshot / name).symlink_to(os.path.join("..", "..", "blobs", f"blob{i}"))
    state = fmodel.load(snapshot)
    ref = subjects[1]["llama-sharded"]
    assert all(torch.equal(state.params[n], ref.params[n]) for n in ref.params)


def test_index_and_shards_must_agree(subjects, tmp_path):
    folder = _copy(subjects, "llama-sharded", tmp_path)
    _edit_index(folder, lambda wm: wm.pop("model.norm.weight"))
    assert "does not list: 'model.norm.weight'" in _timed_error(CheckpointError, fmodel.load, folder)
    shutil.rmtree(folder)
    folder = _copy(subjects, "llama-sharded", tmp_path)

    def move(wm):
        shards = sorted(set(wm.values()))
        wm["model.norm.weight"] = next(s for s in shards if s != wm["model.norm.weight"])

    _edit_index(folder, move)
    assert "not in the shard the index names" in _timed_error(CheckpointError, fmodel.load, folder)


# --------------------------------------------------------------------------- pickle


@pytest.mark.parametrize("payload", range(fz.BIN_PAYLOADS))
def test_bin_payloads_are_checkpoint_errors_and_no_code_runs(subjects, tmp_path, payload):
    folder = _copy(subjects, "llama-bin", tmp_path)
    fz.m_bin_payload(random.Random(0), str(folder), payload)
    message = _timed_error(CheckpointError, fmodel.load, folder)
    assert "pytorch_model.bin" in message
    assert not (folder / fz.MARKER).exists()


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"dtype": torch.int8}, InvalidArgumentError),
        ({"dtype": torch.bool}, ConfigError),
        ({"dtype": "banana"}, ConfigError),
        ({"dtype": 3}, InvalidArgumentError),
        ({"device": "nodevice"}, InvalidArgumentError),
        ({"device": [0]}, ArgumentTypeError),
        ({"architecture": 3}, ArgumentTypeError),
        ({"architecture": "LlamaForTimeTravel"}, UnknownArchitectureError),
        ({"strict": "yes"}, ArgumentTypeError),
        ({"allow_missing": None}, ArgumentTypeError),
        ({"attn_implementation": None}, ArgumentTypeError),
        ({"init_missing": "numpy"}, InvalidArgumentError),
    ],
)
def test_bad_load_arguments_are_named(subjects, kwargs, error):
    _timed_error(error, fmodel.load, subjects[0]["llama"], **kwargs)
    _timed_error(error, fmodel.io.load_with_report, subjects[0]["llama"], **kwargs)


@pytest.mark.parametrize("path", [None, 3, ["a"], b"x"])
def test_bad_paths_are_argument_type_errors(path):
    assert "path" in _timed_error(ArgumentTypeError, fmodel.load, path)
    _timed_error(ArgumentTypeError, fmodel.load_config, path)


def test_bad_state_from_tensors_arguments_are_named():
    config = fmodel.LlamaConfig(**fz.TINY)
    _timed_error(ArgumentTypeError, fmodel.io.state_from_tensors, config, [1, 2])
    _timed_error(ArgumentTypeError, fmodel.io.state_from_tensors, config, {"a": 1})
    _timed_error(ArgumentTypeError, fmodel.io.state_from_tensors, config, {3: torch.zeros(1)})
    _timed_error(ArgumentTypeError, fmodel.io.state_from_tensors, {"model_type": "llama"}, {})
    _timed_error(ArgumentTypeError, fmodel.io.state_from_tensors, config, {}, allow_missing=1)
    _timed_error(InvalidArgumentError, fmodel.io.state_from_tensors, config, {}, dtype=torch.int8)
