"""Mutated GGUF files: the mutators shared by tests/test_fuzz_gguf.py and benchmarks/fuzz_gguf.py.

A subject is a tiny 2-layer Transformers model written as llama.cpp's converter writes it
(`tests.test_gguf._write`). `Layout` locates every field of its header (with gguf's own
GGUFReader, on the valid file); each mutator takes the file's bytes, its layout and a
`random.Random` (Hypothesis' `st.randoms()` in the test, a seeded one in the script) and returns
(mutated bytes, region). `outcome` loads the mutant with a 1 s budget and sorts the result into
named / silent / unchanged / foreign / hang.
"""

from __future__ import annotations

import logging
import os
import random
import struct
import time
from collections.abc import Callable
from typing import Any

import attrs
import numpy as np
import torch

import fmodel
from fmodel.errors import FModelError
from fmodel.io.gguf import read_gguf

from .test_gguf import _tiny, _write

logging.getLogger("gguf").setLevel(logging.ERROR)  # GGUFWriter warns on each key a rewrite replaces

SUBJECTS = {
    # name: (model_type, overrides, tensor type of the 2-D weights)
    "llama-f32-tied": ("llama", {"tie_word_embeddings": True}, "F32"),
    "llama-q8_0": ("llama", {}, "Q8_0"),
    "llama-f16-mqa": ("llama", {"num_key_value_heads": 1}, "F16"),
    "qwen2-q4_1": ("qwen2", {}, "Q4_1"),
}

# Regions in which a change can load without error and still be "right" for every reader:
# tensor data bytes, and metadata values replaced by other valid values (an epsilon, a token).
# A flipped key byte makes the key another, unknown one: an optional key is then absent.
UNDETECTABLE = ("data", "kv-value", "kv-key", "same-size-type")
# Keys for which any finite positive number is a valid value.
_FREE = ("{a}.context_length", "{a}.rope.freq_base", "{a}.attention.layer_norm_rms_epsilon")


@attrs.frozen
class Layout:
    """Byte positions of a GGUF file's fields (from GGUFReader on the valid file)."""

    kv: tuple[tuple[str, int, int, int, int], ...]  # key, start, type pos, value pos, value type
    tensors: tuple[
        tuple[str, int, int, int, int, int, int], ...
    ]  # name, start, n_dims pos, dims pos, type pos, offset pos, offset
    data_offset: int
    size: int
    vocab: int  # token ids below this are valid values


def layout(path: str) -> Layout:
    import gguf

    r = gguf.GGUFReader(path)
    kv = []
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue
        type_pos = f.offset + 8 + len(f.parts[1])
        kv.append((key, f.offset, type_pos, type_pos + 4, int(f.types[0])))
    tensors = []
    for t in r.tensors:
        f = t.field
        n_dims_pos = f.offset + 8 + len(f.parts[1])
        dims_pos = n_dims_pos + 4
        type_pos = dims_pos + 8 * int(f.parts[2][0])
        tensors.append((t.name, f.offset, n_dims_pos, dims_pos, type_pos, type_pos + 4, int(f.parts[5][0])))
    vocab = len(r.fields["tokenizer.ggml.tokens"].data)
    return Layout(tuple(kv), tuple(tensors), int(r.data_offset), os.path.getsize(path), vocab)


def write_subjects(folder: str) -> dict[str, str]:
    """Write every subject into `folder`; returns {name: path}."""
    out = {}
    for i, (name, (model_type, overrides, qtype)) in enumerate(SUBJECTS.items()):
        out[name] = _write(
            os.path.join(folder, f"{name}.gguf"), _tiny(model_type, seed=i, **overrides), qtype, seed=i
        )
    return out


# --------------------------------------------------------------------------- byte mutators


def _put(data: bytes, pos: int, fmt: str, value: int) -> bytes:
    return data[:pos] + struct.pack(fmt, value) + data[pos + struct.calcsize(fmt) :]


_U64_EDGES = (0, 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 10**9, 10**12)
_U32_EDGES = (0, 1, 5, 13, 255, 2**16, 2**31, 2**32 - 1)


def _u64(rng: random.Random) -> int:
    return rng.choice(_U64_EDGES) if rng.random() < 0.7 else rng.getrandbits(64)


def _u32(rng: random.Random) -> int:
    return rng.choice(_U32_EDGES) if rng.random() < 0.7 else rng.getrandbits(32)


def header_field(data: bytes, lay: Layout, rng: random.Random) -> tuple[bytes, str]:
    which = rng.choice(("magic", "version", "tensor_count", "kv_count"))
    if which == "magic":
        return data[:0] + rng.randbytes(4) + data[4:], "header"
    if which == "version":
        return _put(data, 4, "<I", rng.choice((0, 1, 4, 2**24 * 3, 2**32 - 1, rng.getrandbits(32)))), "header"
    pos = 8 if which == "tensor_count" else 16
    old = struct.unpack_from("<Q", data, pos)[0]
    return _put(data, pos, "<Q", rng.choice((old + 1, max(old - 1, 0), _u64(rng)))), "header"


def kv_field(data: bytes, lay: Layout, rng: random.Random) -> tuple[bytes, str]:
    key, start, type_pos, value_pos, vtype = rng.choice(lay.kv)
    which = rng.choice(("key_length", "value_type", "value", "value", "length"))
    if which == "key_length":
        return _put(data, start, "<Q", _u64(rng)), "kv"
    if which == "value_type":
        return _put(
            data, type_pos, "<I", rng.choice((rng.randrange(13), rng.randrange(13, 2**32), _u32(rng)))
        ), "kv"
    if vtype == 9 and which == "length":  # array: item type or count
        if rng.random() < 0.5:
            return _put(data, value_pos, "<I", rng.choice((rng.randrange(13), _u32(rng)))), "kv"
        return _put(data, value_pos + 4, "<Q", _u64(rng)), "kv"
    if vtype == 8:  # a string's length
        return _put(data, value_pos, "<Q", _u64(rng)), "kv"
    if vtype in (4, 5, 6):  # uint32 / int32 / float32 values: other numbers
        new = _u32(rng)
        if key.endswith("_token_id") and vtype == 4 and new < lay.vocab:
            return _put(data, value_pos, "<I", new), "kv-value"  # another valid token id
        return _put(data, value_pos, "<I", new), value_region(key)
    if vtype in (10, 11, 12):
        return _put(data, value_pos, "<Q", _u64(rng)), value_region(key)
    pos = value_pos + rng.randrange(min(16, len(data) - value_pos))
    return data[:pos] + bytes([rng.getrandbits(8)]) + data[pos + 1 :], region_of(pos, lay)


def _same_size(a: int, b: int) -> bool:
    import gguf

    try:
        return (
            gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(a)]
            == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(b)]
        )
    except (ValueError, KeyError):
        return False


def tensor_field(data: bytes, lay: Layout, rng: random.Random) -> tuple[bytes, str]:
    import gguf

    name, start, n_dims_pos, dims_pos, type_pos, offset_pos, offset = rng.choice(lay.tensors)
    which = rng.choice(("offset", "offset", "type", "type", "n_dims", "dim", "name"))
    if which == "offset":
        other = rng.choice(lay.tensors)[6]
        new = rng.choice(
            (0, 1, other, other + 32, 2**64 - 1, offset + 32, max(offset - 32, 0), offset + 1, _u64(rng))
        )
        return _put(data, offset_pos, "<Q", new), "tensor"
    if which == "type":
        old = struct.unpack_from("<I", data, type_pos)[0]
        known = [q.value for q in gguf.GGML_QUANT_SIZES]
        new = rng.choice(known) if rng.random() < 0.8 else _u32(rng)
        return _put(data, type_pos, "<I", new), (
            "same-size-type" if new != old and _same_size(old, new) else "tensor"
        )
    if which == "n_dims":
        return _put(data, n_dims_pos, "<I", rng.choice((0, 1, 2, 3, 5, _u32(rng)))), "tensor"
    if which == "dim":
        n = struct.unpack_from("<I", data, n_dims_pos)[0]
        pos = dims_pos + 8 * rng.randrange(n)
        old = struct.unpack_from("<Q", data, pos)[0]
        return _put(data, pos, "<Q", rng.choice((0, 1, old + 1, old * 2, old // 2, _u64(rng)))), "tensor"
    if rng.random() < 0.5:  # another tensor's name of the same length, or a flipped byte
        same = [t[0] for t in lay.tensors if len(t[0]) == len(name) and t[0] != name]
        new = rng.choice(same).encode() if same else name.encode()[::-1]
        return data[: start + 8] + new + data[start + 8 + len(new) :], "tensor"
    pos = start + 8 + rng.randrange(len(name))
    return data[:pos] + bytes([rng.getrandbits(8)]) + data[pos + 1 :], "tensor"


def truncate(data: bytes, lay: Layout, rng: random.Random) -> tuple[bytes, str]:
    cut = rng.choice((rng.randrange(lay.data_offset), rng.randrange(len(data)), len(data) - 1, 24, 3))
    return data[:cut], "truncated"


def flip_byte(data: bytes, lay: Layout, rng: random.Random) -> tuple[bytes, str]:
    in_header = rng.random() < 0.7
    pos = rng.randrange(lay.data_offset) if in_header else rng.randrange(lay.data_offset, len(data))
    new = data[:pos] + bytes([data[pos] ^ (1 << rng.randrange(8))]) + data[pos + 1 :]
    return new, region_of(pos, lay)


def region_of(pos: int, lay: Layout) -> str:
    """ "data", "kv-key" (a key's bytes: the key becomes another, unknown key), "kv-value" (a
    scalar's or string's bytes), "kv" (lengths and type ids), "tensor" or "header"."""
    if pos >= lay.data_offset:
        return "data"
    table = lay.tensors[0][1] if lay.tensors else lay.data_offset
    for i, (_, start, type_pos, value_pos, vtype) in enumerate(lay.kv):
        end = lay.kv[i + 1][1] if i + 1 < len(lay.kv) else table
        if not start <= pos < end:
            continue
        if start + 8 <= pos < type_pos:
            return "kv-key"
        if pos >= value_pos and (vtype in _SCALARS or (vtype == 8 and pos >= value_pos + 8)):
            return value_region(lay.kv[i][0])
        return "kv"
    return "tensor" if pos >= table else "header"


_SCALARS = (0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12)


def value_region(key: str) -> str:
    """ "kv-value" for keys whose value may be any other value of its type (a context length,
    an epsilon, a token string), "kv" for those a reader must check (counts, ids, names)."""
    free = key.endswith((".context_length", ".rope.freq_base", ".layer_norm_rms_epsilon", "general.name"))
    tokenizer = key.startswith("tokenizer.") and not key.endswith("_token_id")
    return "kv-value" if free or tokenizer else "kv"


def where(data: bytes, original: bytes, lay: Layout) -> str:
    """The first byte where `data` differs from `original`, and the field that holds it."""
    pos = next(
        (i for i, (a, b) in enumerate(zip(data, original, strict=False)) if a != b),
        min(len(data), len(original)),
    )
    if len(data) < len(original) and pos == len(data):
        return f"cut at byte {pos}"
    if pos >= lay.data_offset:
        return f"byte {pos} (tensor data)"
    if not lay.tensors or pos < lay.tensors[0][1]:
        key = next((k for k, start, *_ in reversed(lay.kv) if start <= pos), None)
        return f"byte {pos} (metadata {key!r})" if key else f"byte {pos} (header)"
    name = next(n for n, start, *_ in reversed(lay.tensors) if start <= pos)
    return f"byte {pos} (tensor info {name!r})"


# --------------------------------------------------------------------------- metadata rewrites


_KEYS = (
    "general.architecture",
    "{a}.block_count",
    "{a}.attention.head_count",
    "{a}.attention.head_count_kv",
    "{a}.embedding_length",
    "{a}.feed_forward_length",
    "{a}.context_length",
    "{a}.attention.key_length",
    "{a}.rope.dimension_count",
    "{a}.rope.freq_base",
    "{a}.attention.layer_norm_rms_epsilon",
    "{a}.vocab_size",
    "general.alignment",
    "tokenizer.ggml.tokens",
)


def rewrite(path: str, out: str, key: str, value: Any, vtype: Any, drop: tuple[str, ...] = ()) -> None:
    """Copy the GGUF file `path` to `out` with metadata `key` set to `value` of GGUF type
    `vtype` (a `gguf.GGUFValueType`; None drops the key) and the keys in `drop` left out."""
    import gguf

    src = read_gguf(path)
    types = {k: int(f.types[0]) for k, f in gguf.GGUFReader(path).fields.items()}
    w = gguf.GGUFWriter(out, src.metadata["general.architecture"])
    for k, v in src.metadata.items():
        t = gguf.GGUFValueType(types[k])
        sub = None
        if t == gguf.GGUFValueType.ARRAY:
            sub = gguf.GGUFValueType.STRING if v and isinstance(v[0], str) else gguf.GGUFValueType.INT32
        w.add_key_value(k, v, t, sub)
    for k in drop:
        w.kv_data[0].pop(k, None)
    if vtype is None:
        w.kv_data[0].pop(key, None)
    else:
        sub = None
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = (
                gguf.GGUFValueType.STRING if value and isinstance(value[0], str) else gguf.GGUFValueType.INT32
            )
        w.add_key_value(key, value, vtype, sub)
    for t in src.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def metadata_value(path: str, out: str, rng: random.Random) -> tuple[str, str]:
    """Rewrite one model key with a value of the wrong type, an edge value, or drop it."""
    import gguf

    V = gguf.GGUFValueType
    arch = read_gguf(path).metadata["general.architecture"]
    key = rng.choice(_KEYS).format(a=arch)
    value, vtype = rng.choice(
        (
            (None, None),
            ("12", V.STRING),
            ([2, 2], V.ARRAY),
            (["llama"], V.ARRAY),
            (2.5, V.FLOAT32),
            (True, V.BOOL),
            (0, V.UINT32),
            (-1, V.INT32),
            (10**9, V.UINT32),
            (2**32 - 1, V.UINT32),
            (10**12, V.UINT64),
            (2**63 - 1, V.INT64),
            (3, V.UINT32),
            (float("nan"), V.FLOAT32),
            (float("inf"), V.FLOAT64),
            (7, V.UINT8),
        )
    )
    rewrite(path, out, key, value, vtype)
    free = key in [k.format(a=arch) for k in _FREE]
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")
    return (
        "kv-value" if free and number else "kv",
        f"{key} = {value!r} ({'dropped' if vtype is None else vtype.name})",
    )


BYTE_MUTATORS: dict[str, Callable[[bytes, Layout, random.Random], tuple[bytes, str]]] = {
    "header": header_field,
    "kv": kv_field,
    "tensor": tensor_field,
    "truncate": truncate,
    "flip": flip_byte,
}


# --------------------------------------------------------------------------- outcomes


def same_state(a: Any, b: Any) -> bool:
    return (
        a.config == b.config
        and set(a.params) == set(b.params)
        and all(
            a.params[k].shape == b.params[k].shape and torch.equal(a.params[k], b.params[k]) for k in a.params
        )
    )


def outcome(path: str, original: Any, call: Callable[[str], Any] = fmodel.load) -> tuple[str, float, str]:
    """Load the mutant at `path` with `call`: (kind, seconds, detail).

    kind: "named" (an FModelError), "unchanged" (loads the original's very state), "silent"
    (loads something else), "foreign" (another exception), "hang" (over 1 s).
    """
    start = time.perf_counter()
    try:
        state = call(path)
    except FModelError as exc:
        kind, detail = "named", f"{type(exc).__name__}: {exc}"
    except Exception as exc:
        kind, detail = "foreign", f"{type(exc).__name__}: {exc}"
    else:
        kind = "unchanged" if original is None or same_state(state, original) else "silent"
        detail = ""
    seconds = time.perf_counter() - start
    if seconds > 1.0:
        kind = "hang"
    return kind, seconds, detail
