"""Hostile and damaged TensorFlow / Flax checkpoints: nothing in them runs, nothing outside them is
read, and every way they can be bad is a named `FModelError` (never h5py's OSError, msgpack's
FormatError or a bare shape error)."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import fmodel
from fmodel.errors import CheckpointError, CorruptFileError, FModelError, ShapeMismatchError, SizeLimitError

h5py = pytest.importorskip("h5py")
msgpack = pytest.importorskip("msgpack")

ROOT = Path(__file__).parent / "fixtures" / "legacy"
ATOL = 1e-5


def copy(name: str, tmp_path: Path) -> Path:
    folder = tmp_path / name.replace("/", "-")
    shutil.copytree(ROOT / name, folder)
    return folder


def logits_close(folder: Path, name: str) -> bool:
    want = load_file(str(ROOT / name / "expected.safetensors"))
    state = fmodel.load(folder, attn_implementation="eager")
    out = fmodel.forward(state, want["input_ids"], attention_mask=want["attention_mask"])
    key = "logits" if "logits" in want else "last_hidden_state"
    return float((getattr(out, key) - want[key]).abs().max()) <= ATOL


class _Bomb:
    """Unpickling it creates `marker`: the proof that something was unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def bomb(marker: Path) -> np.void:
    return np.void(pickle.dumps(_Bomb(marker)))


# ---- TensorFlow h5 ---------------------------------------------------------------------------


def test_pickled_and_keras_config_attributes_are_data_never_run(tmp_path):
    folder = copy("tf/bert-mlm", tmp_path)
    marker = tmp_path / "unpickled"
    with h5py.File(folder / "tf_model.h5", "r+") as f:
        f.attrs["model_config"] = bomb(marker)
        f.attrs["training_config"] = bomb(marker)
        f.attrs["keras_config"] = json.dumps({"class_name": "Lambda", "config": {"function": "eval"}})
        f["bert"].attrs["extra"] = bomb(marker)
        f["bert/tf_bert_for_masked_lm/bert/embeddings/LayerNorm/beta:0"].attrs["x"] = bomb(marker)
    assert logits_close(folder, "tf/bert-mlm")
    with h5py.File(folder / "tf_model.h5", "r+") as f:
        f.attrs["layer_names"] = bomb(marker)  # the one attribute read: refused, not unpickled
    with pytest.raises(CorruptFileError, match="layer_names"):
        fmodel.load(folder)
    assert not marker.exists()


def _whole_file(path: Path, layers: dict[str, object]) -> None:
    """A minimal Keras-layout h5 whose layers are given objects (links, datasets)."""
    with h5py.File(path, "w") as f:
        for name, make in layers.items():
            make(f, name)
        f.attrs["layer_names"] = [n.encode() for n in layers]


def test_links_out_of_the_file_are_refused(tmp_path):
    folder = copy("tf/bert-base", tmp_path)
    original = tmp_path / "original.h5"
    shutil.move(folder / "tf_model.h5", original)
    target = folder / "tf_model.h5"

    def external(f, name):
        f[name] = h5py.ExternalLink(str(original), "/bert")

    _whole_file(target, {"bert": external})
    with pytest.raises(CorruptFileError, match="ExternalLink"):
        fmodel.load(folder)

    shutil.copy(original, target)
    with h5py.File(target, "r+") as f:
        f["alias"] = h5py.SoftLink("/bert")
        f.attrs["layer_names"] = [b"alias"]
    with pytest.raises(CorruptFileError, match="SoftLink"):
        fmodel.load(folder)

    shutil.copy(original, target)
    name = "bert/tf_bert_model/bert/embeddings/LayerNorm/beta:0"
    with h5py.File(target, "r+") as f:
        del f[name]
        f[name] = h5py.ExternalLink(str(original), "/" + name)
    with pytest.raises(CorruptFileError, match="ExternalLink"):
        fmodel.load(folder)


def test_external_raw_data_and_non_numeric_datasets_are_refused(tmp_path):
    folder = copy("tf/bert-base", tmp_path)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\x01" * 64)
    name = "bert/tf_bert_model/bert/embeddings/LayerNorm/beta:0"
    path = folder / "tf_model.h5"
    with h5py.File(path, "r+") as f:
        del f[name]
        f.create_dataset(name, shape=(8,), dtype="f4", external=[(str(secret), 0, 32)])
    with pytest.raises(CorruptFileError, match="other files"):
        fmodel.load(folder)
    for make in (
        lambda f: f.create_dataset(
            name, data=np.array([b"a", b"b"], dtype=object), dtype=h5py.string_dtype()
        ),
        lambda f: f.create_dataset(name, shape=(8,), dtype=np.dtype([("a", "f4"), ("b", "i4")])),
        lambda f: f.create_group(name),
    ):
        with h5py.File(path, "r+") as f:
            del f[name]
            make(f)
        with pytest.raises(CorruptFileError, match=r"beta:0"):
            fmodel.load(folder)


def test_compressed_datasets_are_read_and_equal(tmp_path):
    folder = copy("tf/gpt2-lm", tmp_path)
    with h5py.File(folder / "tf_model.h5", "r+") as f:
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        for n in names:
            data = f[n][()]
            del f[n]
            f.create_dataset(n, data=data, compression="gzip", chunks=True)
    assert logits_close(folder, "tf/gpt2-lm")


def test_declared_sizes_beyond_memory_are_refused_before_reading(tmp_path):
    folder = copy("tf/gpt2-base", tmp_path)
    with h5py.File(folder / "tf_model.h5", "r+") as f:
        names = []
        f.visititems(lambda n, o: names.append(n) if n.endswith("wte/embeddings:0") else None)
        (name,) = names
        del f[name]
        f.create_dataset(name, shape=(2**21, 2**20), dtype="f4", chunks=(1, 1024), compression="gzip")
    assert os.path.getsize(folder / "tf_model.h5") < 10**6
    with pytest.raises(SizeLimitError, match="wte"):
        fmodel.load(folder)


def test_misshapen_and_contradictory_tensors_get_named_errors(tmp_path):
    folder = copy("tf/bert-base", tmp_path)
    name = "bert/tf_bert_model/bert/encoder/layer_._0/attention/self/query/kernel:0"
    with h5py.File(folder / "tf_model.h5", "r+") as f:
        del f[name]
        f.create_dataset(name, data=np.zeros((8, 9), dtype="f4"))
    with pytest.raises(
        ShapeMismatchError, match=r"encoder.layer.0.attention.self.query.weight: found \[9, 8\]"
    ):
        fmodel.load(folder)

    folder = copy("tf/bert-mlm", tmp_path)
    name = "mlm___cls/tf_bert_for_masked_lm/bert/embeddings/word_embeddings/weight:0"
    with h5py.File(folder / "tf_model.h5", "r+") as f:
        f[name][0, 0] = 123.0  # the second copy of the embeddings now disagrees with the first
    with pytest.raises(CorruptFileError, match="different values"):
        fmodel.load(folder)

    folder = copy("tf/bert-base", tmp_path / "listed-but-absent")
    with h5py.File(folder / "tf_model.h5", "r+") as f:
        del f["bert/tf_bert_model/bert/pooler/dense/bias:0"]
    with pytest.raises(CorruptFileError, match="pooler"):
        fmodel.load(folder)


def test_truncated_and_garbled_h5_files(tmp_path):
    folder = copy("tf/mistral-lm", tmp_path)
    path = folder / "tf_model.h5"
    data = path.read_bytes()
    for cut in (0, 8, 1000, len(data) // 2, len(data) - 100):
        path.write_bytes(data[:cut])
        with pytest.raises(CorruptFileError):
            fmodel.load(folder)
    path.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n")
    with pytest.raises(CorruptFileError, match="HDF5"):
        fmodel.load(folder)


def test_a_file_that_crashes_the_hdf5_library_is_refused_without_crashing(tmp_path):
    """One flipped byte (found by fuzzing) in a shard's `layer_names` strings makes HDF5 1.14
    (h5py 3.16) die of SIGSEGV when h5py reads the attribute; the child process takes it."""
    folder = copy("tf/gpt2-lm-sharded", tmp_path)
    path = folder / "tf_model-00002-of-00003.h5"
    data = bytearray(path.read_bytes())
    data[19897] ^= 136
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=r"00002-of-00003.h5: the HDF5 library crashed .*SIGSEGV"):
        fmodel.load(folder)


@pytest.mark.parametrize("name", ["tf/gpt2-lm-sharded", "flax/llama-lm-sharded"])
def test_shard_index_must_agree_with_the_shards(name, tmp_path):
    suffix = ".h5" if name.startswith("tf/") else ".msgpack"
    index_name = "tf_model.h5.index.json" if suffix == ".h5" else "flax_model.msgpack.index.json"
    for edit, message in (
        ("move", "not in the shard the index names"),
        ("drop", "does not list"),
        ("add", "no shard holds"),
    ):
        folder = copy(name, tmp_path / edit)
        index = json.loads((folder / index_name).read_text())
        weight_map = index["weight_map"]
        first = sorted(weight_map)[0]
        shards = sorted(set(weight_map.values()))
        if edit == "move":
            weight_map[first] = next(s for s in shards if s != weight_map[first])
        elif edit == "drop":
            del weight_map[first]
        else:
            weight_map[first.rsplit("/", 1)[0] + "/nothing"] = shards[0]
        (folder / index_name).write_text(json.dumps(index))
        with pytest.raises(CheckpointError, match=message):
            fmodel.load(folder)


# ---- Flax msgpack ----------------------------------------------------------------------------


def _array_ext(shape, dtype: bytes, data: bytes, code: int = 1):
    return msgpack.ExtType(code, msgpack.packb((list(shape), dtype, data), use_bin_type=True))


def _flax_params(folder: Path) -> dict:
    with open(folder / "flax_model.msgpack", "rb") as f:
        return msgpack.unpackb(f.read(), raw=False, ext_hook=msgpack.ExtType)


def _write_flax(folder: Path, tree) -> None:
    (folder / "flax_model.msgpack").write_bytes(msgpack.packb(tree, use_bin_type=True))


def test_hostile_msgpack_leaves_are_refused(tmp_path):
    folder = copy("flax/gpt2-lm", tmp_path)
    tree = _flax_params(folder)
    bias = tree["transformer"]["ln_f"]["bias"]
    assert isinstance(bias, msgpack.ExtType) and bias.code == 1
    cases = [
        (msgpack.ExtType(42, b"\x00"), "extension type 42"),
        (msgpack.ExtType(2, msgpack.packb((1.0, 2.0))), "complex"),
        (_array_ext((8,), b"object", b"\x00" * 64), "dtype"),
        (_array_ext((8,), b"<f4", b"\x00" * 32), "dtype"),
        (_array_ext((9,), b"float32", b"\x00" * 32), "bytes"),
        (_array_ext((-1,), b"float32", b"\x00" * 32), "shape"),
        (msgpack.ExtType(1, b"\xc1"), "not msgpack"),
        (msgpack.ExtType(1, msgpack.packb([1, 2])), "not \\(shape, dtype, bytes\\)"),
        (3, "holds a int"),
        ("eval('1')", "holds a str"),
        ([1, 2], "holds a list"),
    ]
    for leaf, message in cases:
        tree["transformer"]["ln_f"]["bias"] = leaf
        _write_flax(folder, tree)
        with pytest.raises(CorruptFileError, match=message):
            fmodel.load(folder)
    tree["transformer"]["ln_f"]["bias"] = bias
    for top, message in (([tree], "top level"), ({1: tree}, "readable Flax"), ({"": tree}, "parameter name")):
        _write_flax(folder, top)
        with pytest.raises(CorruptFileError, match=message):
            fmodel.load(folder)
    (folder / "flax_model.msgpack").write_bytes(msgpack.packb(tree, use_bin_type=True) + b"\x00")
    with pytest.raises(CorruptFileError, match="ExtraData"):
        fmodel.load(folder)
    (folder / "flax_model.msgpack").write_bytes(b"")
    with pytest.raises(CorruptFileError, match="empty"):
        fmodel.load(folder)


def test_chunked_arrays_are_joined(tmp_path):
    """flax.serialization splits arrays over 1 GiB into chunks; the same layout, small."""
    folder = copy("flax/gpt2-lm", tmp_path)
    tree = _flax_params(folder)
    ext = tree["transformer"]["wte"]["embedding"]
    shape, dtype, data = msgpack.unpackb(ext.data, raw=True)
    assert dtype == b"float32"
    flat = np.frombuffer(data, dtype=np.float32)
    parts = np.array_split(flat, 3)
    tree["transformer"]["wte"]["embedding"] = {
        "__msgpack_chunked_array__": True,
        "shape": {str(i): d for i, d in enumerate(shape)},
        "chunks": {str(i): _array_ext(p.shape, b"float32", p.tobytes()) for i, p in enumerate(parts)},
    }
    _write_flax(folder, tree)
    assert logits_close(folder, "flax/gpt2-lm")
    tree["transformer"]["wte"]["embedding"]["shape"]["0"] += 1
    _write_flax(folder, tree)
    with pytest.raises(CorruptFileError, match="chunks that do not make one array"):
        fmodel.load(folder)


def test_bfloat16_flax_weights_keep_their_dtype(tmp_path):
    folder = copy("flax/llama-base", tmp_path)
    tree = _flax_params(folder)
    ext = tree["norm"]["weight"]
    shape, _, data = msgpack.unpackb(ext.data, raw=True)
    values = torch.frombuffer(bytearray(data), dtype=torch.float32)
    tree["norm"]["weight"] = _array_ext(
        shape, b"bfloat16", values.bfloat16().view(torch.int16).numpy().tobytes()
    )
    _write_flax(folder, tree)
    state = fmodel.load(folder)
    assert state.params["norm.weight"].dtype == torch.bfloat16
    assert torch.equal(state.params["norm.weight"], values.bfloat16())


# ---- fuzzing: truncation and byte flips never raise anything but FModelError -----------------

FUZZ = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TARGETS = [
    ("tf/bert-mlm", "tf_model.h5"),
    ("tf/gpt2-lm-sharded", "tf_model-00002-of-00003.h5"),
    ("flax/mistral-lm", "flax_model.msgpack"),
    ("flax/bert-cls-sharded", "flax_model-00001-of-00002.msgpack"),
]


def _fuzz_load(name: str, file: str, mutate) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = copy(name, Path(tmp))
        path = folder / file
        path.write_bytes(mutate(path.read_bytes()))
        with contextlib.suppress(FModelError):  # anything else fails the test
            fmodel.load(folder)


@pytest.mark.parametrize(("name", "file"), TARGETS)
def test_fixture_files_named_in_targets_exist(name, file):
    assert (ROOT / name / file).is_file()


@pytest.mark.parametrize(("name", "file"), TARGETS)
@FUZZ
@given(cut=st.floats(0.0, 1.0, exclude_max=True))
def test_fuzz_truncation(name, file, cut):
    _fuzz_load(name, file, lambda data: data[: int(len(data) * cut)])


@pytest.mark.parametrize(("name", "file"), TARGETS)
@FUZZ
@given(
    flips=st.lists(
        st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=8
    )
)
def test_fuzz_byte_flips(name, file, flips):
    def mutate(data: bytes) -> bytes:
        out = bytearray(data)
        for where, xor in flips:
            out[int(len(out) * where)] ^= xor
        return bytes(out)

    _fuzz_load(name, file, mutate)
