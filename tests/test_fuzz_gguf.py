"""Mutated GGUF files: each one loads the original state or fails fast with a named error.

The subjects are tiny 2-layer models written as llama.cpp's converter writes them (F32 tied,
Q8_0, F16 with one KV head, Qwen2 in Q4_1); the mutators (tests/gguf_mutants.py) are shared with
benchmarks/fuzz_gguf.py. First the cases the issue names, each with the error it must get; then
Hypothesis over header fields, metadata values and types, the tensor table (offsets, type ids,
dims, names), truncation and byte flips. A mutant may load only when it changed nothing a
reader can check: tensor data bytes, a metadata value swapped for another valid value, or a
tensor type swapped for one with the same block size.
"""

from __future__ import annotations

import pytest

import fmodel
from fmodel.errors import CheckpointError, ConfigError, CorruptFileError, ShapeMismatchError

from .test_gguf import HAS_GGUF, requires_gguf

pytestmark = requires_gguf

if HAS_GGUF:
    import gguf
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from . import gguf_mutants as gm


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    """{name: (path, original state, layout, bytes)}."""
    folder = tmp_path_factory.mktemp("fuzz-gguf")
    out = {}
    for name, path in gm.write_subjects(str(folder)).items():
        with open(path, "rb") as f:
            out[name] = (path, fmodel.load(path), gm.layout(path), f.read())
    return out


def _mutant(subjects, tmp_path, data: bytes) -> str:
    path = str(tmp_path / "mutant.gguf")
    with open(path, "wb") as f:
        f.write(data)
    return path


def _tensor(lay, name):
    return next(t for t in lay.tensors if t[0] == name)


# --------------------------------------------------------------------------- valid files


def _reader_view(path):
    """(metadata, tensor table) as gguf's own GGUFReader reads them: the reference."""
    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    table = [
        (t.name, t.tensor_type, t.shape.tolist(), t.data_offset, t.data.shape, t.data.dtype)
        for t in r.tensors
    ]
    return meta, table, r.tensors


def _agrees_with_gguf_reader(path):
    meta, table, tensors = _reader_view(path)
    ours = fmodel.io.read_gguf(path)
    assert dict(ours.metadata) == meta
    mine = [
        (t.name, t.tensor_type, t.shape.tolist(), t.data_offset, t.data.shape, t.data.dtype)
        for t in ours.tensors
    ]
    assert mine == table
    assert all((a.data == b.data).all() for a, b in zip(tensors, ours.tensors, strict=True))


def test_the_parser_agrees_with_gguf_reader_on_valid_files(subjects):
    # On SmolLM2 (49k tokens, 272 tensors) test_gguf.py compares every tensor with Transformers,
    # which reads the file with GGUFReader; GGUFReader alone takes ~5 s there, too slow for here.
    for path, *_ in subjects.values():
        _agrees_with_gguf_reader(path)


# --------------------------------------------------------------------------- the named cases


@pytest.mark.parametrize("where", ["zero", "one", "into-next", "wraparound", "past-end"])
def test_moved_tensor_offsets_are_refused(subjects, tmp_path, where):
    _, _, lay, data = subjects["llama-q8_0"]
    name, _, _, _, _, offset_pos, offset = lay.tensors[3]
    others = [t[6] for t in lay.tensors if t[6] > offset]
    new = {"zero": 0, "one": 1, "into-next": others[0] + 32, "wraparound": 2**64 - 1, "past-end": 2**40}[
        where
    ]
    path = _mutant(subjects, tmp_path, gm._put(data, offset_pos, "<Q", new))
    with pytest.raises(CorruptFileError) as info:
        fmodel.load(path)
    message = str(info.value)
    assert message.startswith(path) and repr(name) in message  # the file and the moved tensor
    assert "offset" in message and str(len(data)) in message  # where, and the file size


@pytest.mark.parametrize(
    ("subject", "tensor", "qtype"),
    [
        ("llama-f32-tied", "blk.0.attn_norm.weight", "F16"),  # half the bytes: a hole behind it
        ("llama-f32-tied", "output_norm.weight", "F16"),  # the last tensor: bytes left over
        ("llama-q8_0", "blk.1.ffn_up.weight", "Q4_0"),
        ("llama-q8_0", "blk.0.attn_q.weight", "F32"),  # 4x the bytes: overlaps the next
        ("qwen2-q4_1", "blk.0.attn_k.weight", "Q6_K"),  # rows of 64 are not whole K blocks
    ],
)
def test_changed_type_ids_are_refused(subjects, tmp_path, subject, tensor, qtype):
    _, _, lay, data = subjects[subject]
    type_pos = _tensor(lay, tensor)[4]
    path = _mutant(subjects, tmp_path, gm._put(data, type_pos, "<I", gguf.GGMLQuantizationType[qtype].value))
    with pytest.raises(CorruptFileError, match=r"tensor '"):
        fmodel.load(path)


def test_unknown_type_id_dims_and_names(subjects, tmp_path):
    _, _, lay, data = subjects["llama-q8_0"]
    _, start, n_dims_pos, dims_pos, type_pos, _, _ = _tensor(lay, "blk.0.ffn_down.weight")
    cases = [
        (
            gm._put(data, type_pos, "<I", 9999),
            r"'blk\.0\.ffn_down\.weight'.*type id 9999, not a ggml tensor type",
        ),
        (
            gm._put(data, n_dims_pos, "<I", 0),
            r"'blk\.0\.ffn_down\.weight' declares 0 dimensions, expected 1 to 4",
        ),
        (gm._put(data, n_dims_pos, "<I", 5), r"declares 5 dimensions"),
        (gm._put(data, dims_pos, "<Q", 0), r"'blk\.0\.ffn_down\.weight' has shape \[0, 64\]"),
        (gm._put(data, dims_pos, "<Q", 2**40), r"'blk\.0\.ffn_down\.weight'.*the file has \d+ bytes"),
    ]
    for mutant, message in cases:
        with pytest.raises(CorruptFileError, match=message):
            fmodel.load(_mutant(subjects, tmp_path, mutant))
    same = _tensor(lay, "blk.1.ffn_down.weight")[0].encode()
    dup = data[: start + 8] + same + data[start + 8 + len(same) :]
    with pytest.raises(CorruptFileError, match=r"'blk\.1\.ffn_down\.weight' appears twice"):
        fmodel.load(_mutant(subjects, tmp_path, dup))


def test_header_fields_are_checked_before_use(subjects, tmp_path):
    _, _, lay, data = subjects["llama-f16-mqa"]
    _, start, type_pos, value_pos, _ = next(k for k in lay.kv if k[0] == "tokenizer.ggml.tokens")
    cases = [
        (b"GGUX" + data[4:], CheckpointError, r"not a GGUF file"),
        (gm._put(data, 4, "<I", 1), CheckpointError, r"GGUF version 1; fmodel reads versions 2 and 3"),
        (gm._put(data, 4, "<I", 3 << 24), CheckpointError, r"big-endian"),
        (
            gm._put(data, 8, "<Q", 2**63),
            CorruptFileError,
            r"declares \d+ metadata entries and 9223372036854775808 tensors",
        ),
        (gm._put(data, 16, "<Q", 10**12), CorruptFileError, r"declares 1000000000000 metadata entries"),
        (
            gm._put(data, start, "<Q", 2**64 - 1),
            CorruptFileError,
            r"the key of metadata entry #\d+ .* file ends at",
        ),
        (
            gm._put(data, type_pos, "<I", 13),
            CorruptFileError,
            r"'tokenizer\.ggml\.tokens' has value type id 13",
        ),
        (
            gm._put(data, value_pos, "<I", 99),
            CorruptFileError,
            r"'tokenizer\.ggml\.tokens' has item type id 99",
        ),
        (
            gm._put(data, value_pos + 4, "<Q", 2**60),
            CorruptFileError,
            r"'tokenizer\.ggml\.tokens' declares 1152921504606846976 items",
        ),
        (
            gm._put(data, value_pos + 12, "<Q", 2**40),
            CorruptFileError,
            r"tokenizer\.ggml\.tokens'\[0\] \(1099511627776 bytes declared\)",
        ),
        (data[: lay.tensors[-1][1] + 10], CorruptFileError, r"tensor #\d+ .* file ends at"),
        (data[:-100], CorruptFileError, r"'output\.weight'.*the file has \d+ bytes.*truncated"),
        (data[:20], CorruptFileError, r"20 bytes, too short for a GGUF header"),
    ]
    for mutant, error, message in cases:
        with pytest.raises(error, match=message):
            fmodel.load(_mutant(subjects, tmp_path, mutant))


def _rewritten(subjects, tmp_path, subject, key, value, vtype):
    out = str(tmp_path / "rewritten.gguf")
    gm.rewrite(subjects[subject][0], out, key, value, None if vtype is None else gguf.GGUFValueType[vtype])
    return out


@pytest.mark.parametrize(
    ("key", "value", "vtype", "error", "message"),
    [
        (
            "llama.block_count",
            10**9,
            "UINT32",
            CheckpointError,
            r"block_count is 1000000000, but the file holds tensors of 2 blocks",
        ),
        (
            "llama.attention.head_count",
            0,
            "UINT32",
            ConfigError,
            r"'llama\.attention\.head_count' is 0, expected a count >= 1",
        ),
        ("llama.attention.head_count_kv", 0, "UINT32", ConfigError, r"head_count_kv' is 0"),
        (
            "llama.attention.head_count",
            3,
            "UINT32",
            ConfigError,
            r"head_count 3 is not a multiple of .*head_count_kv 2",
        ),
        (
            "llama.attention.key_length",
            10**12,
            "UINT64",
            CheckpointError,
            r"rope\.dimension_count is 16 but the head size is 1000000000000",
        ),
        ("llama.embedding_length", 10**12, "UINT64", (ConfigError, CheckpointError), r"1000000000000"),
        (
            "llama.block_count",
            "12",
            "STRING",
            CheckpointError,
            r"'llama\.block_count' holds '12', expected int",
        ),
        (
            "llama.block_count",
            [2, 2],
            "ARRAY",
            CheckpointError,
            r"'llama\.block_count' holds \[2, 2\], expected int",
        ),
        (
            "llama.block_count",
            True,
            "BOOL",
            CheckpointError,
            r"'llama\.block_count' holds True, expected int",
        ),
        (
            "llama.rope.freq_base",
            10000,
            "UINT32",
            CheckpointError,
            r"'llama\.rope\.freq_base' holds 10000, expected float",
        ),
        (
            "llama.rope.freq_base",
            float("nan"),
            "FLOAT32",
            ConfigError,
            r"freq_base' is nan, expected a finite number > 0",
        ),
        ("llama.attention.layer_norm_rms_epsilon", -1.0, "FLOAT32", ConfigError, r"epsilon' is -1\.0"),
        ("general.architecture", None, None, CheckpointError, r"'general\.architecture' is missing"),
        (
            "general.architecture",
            7,
            "UINT32",
            CheckpointError,
            r"'general\.architecture' holds 7, expected str",
        ),
        (
            "general.alignment",
            24,
            "UINT32",
            CorruptFileError,
            r"'general\.alignment' holds 24 \(UINT32\), expected a UINT32 power of two",
        ),
        (
            "tokenizer.ggml.eos_token_id",
            96,
            "UINT32",
            ConfigError,
            r"eos_token_id' is 96, outside the vocabulary of 96",
        ),
    ],
)
def test_metadata_of_the_wrong_type_or_size(subjects, tmp_path, key, value, vtype, error, message):
    path = _rewritten(subjects, tmp_path, "llama-f32-tied", key, value, vtype)
    with pytest.raises(error, match=message) as info:
        fmodel.load(path)
    assert str(info.value).startswith(path)


def test_a_head_size_the_tensors_contradict(subjects, tmp_path):
    out = str(tmp_path / "rewritten.gguf")
    V = gguf.GGUFValueType
    gm.rewrite(
        subjects["llama-q8_0"][0],
        out,
        "llama.attention.key_length",
        10**12,
        V.UINT64,
        drop=("llama.rope.dimension_count",),
    )
    with pytest.raises(
        ShapeMismatchError, match=r"'blk\.0\.attn_q\.weight' has 64 rows.* = 4000000000000 rows"
    ):
        fmodel.load(out)


# --------------------------------------------------------------------------- Hypothesis


def _check(path, subject, region, calls=(fmodel.load,)):
    original = subject[1]
    for call in calls:
        kind, seconds, detail = gm.outcome(path, original, call)
        assert kind in ("named", "unchanged") or (kind == "silent" and region in gm.UNDETECTABLE), (
            kind,
            region,
            detail,
        )
        assert seconds < 1.0, (seconds, detail)


def _inspect(path):
    from fmodel.cli._inspect import describe
    from fmodel.cli._load import load_model

    loaded = load_model(path)
    describe(loaded)
    return loaded.state


FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@FUZZ
@given(
    name=st.sampled_from(sorted(gm.SUBJECTS)) if HAS_GGUF else st.none(),
    mutator=st.sampled_from(sorted(gm.BYTE_MUTATORS)) if HAS_GGUF else st.none(),
    rng=st.randoms(use_true_random=False),
)
def test_byte_mutants_load_the_original_or_fail_named(subjects, tmp_path, name, mutator, rng):
    subject = subjects[name]
    data, region = gm.BYTE_MUTATORS[mutator](subject[3], subject[2], rng)
    path = _mutant(subjects, tmp_path, data)
    _check(path, subject, region, calls=(fmodel.load, fmodel.load_gguf, _inspect))


@settings(FUZZ, max_examples=50)
@given(
    name=st.sampled_from(sorted(gm.SUBJECTS)) if HAS_GGUF else st.none(),
    rng=st.randoms(use_true_random=False),
)
def test_metadata_rewrites_load_the_original_or_fail_named(subjects, tmp_path, name, rng):
    path = str(tmp_path / "rewritten.gguf")
    region, _ = gm.metadata_value(subjects[name][0], path, rng)
    _check(path, subjects[name], region)
