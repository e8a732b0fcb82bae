"""Mutators of safetensors files and of a checkpoint's JSON files (config.json, the shard
index), shared by `benchmarks/fuzz_checkpoints.py` and `tests/test_fuzz_checkpoints.py`.

Each `m_*` takes a `random.Random` and a checkpoint folder (a copy: it is changed in place)
and returns the region it touched: "header", "structure", "data", "config" or "index".
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct

import torch

# --------------------------------------------------------------------------- file helpers


def _weights(folder: str, ext: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(ext))


def read_safetensors(path: str) -> tuple[dict, bytes]:
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_safetensors(path: str, header: dict, data: bytes, *, pad: bool = True) -> None:
    text = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write_bytes(path: str, raw: bytes) -> None:
    with open(path, "wb") as f:
        f.write(raw)


def _read_json(path: str):
    return json.loads(_read_bytes(path))


def _tensor_names(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def _pick_safetensors(rng: random.Random, folder: str) -> str:
    return rng.choice(_weights(folder, ".safetensors"))


def _flip(raw: bytearray, rng: random.Random, start: int, end: int, count: int) -> None:
    for _ in range(count):
        i = rng.randrange(start, end)
        raw[i] ^= 1 << rng.randrange(8)


# --------------------------------------------------------------------------- safetensors


DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "U32", "F8_E4M3", "XX"]


def m_header_dtype(rng: random.Random, folder: str) -> str:
    """A tensor's header dtype changed (offsets kept: the size may no longer match)."""
    path = _pick_safetensors(rng, folder)
    header, data = read_safetensors(path)
    name = rng.choice(_tensor_names(header))
    header[name]["dtype"] = rng.choice(["I32", "U32"] if rng.random() < 0.5 else DTYPES)
    write_safetensors(path, header, data)
    return "header"


def m_dtype_restored(rng: random.Random, folder: str) -> str:
    """A tensor re-stored, validly, in another dtype (an int64 norm weight, a bool, f16, f64)."""
    from safetensors.torch import load_file, save_file

    path = _pick_safetensors(rng, folder)
    tensors = load_file(path)
    name = rng.choice(sorted(tensors))
    dtype = rng.choice(
        [
            torch.int64,
            torch.int32,
            torch.int8,
            torch.uint8,
            torch.bool,
            torch.float16,
            torch.bfloat16,
            torch.float64,
        ]
    )
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, path, metadata={"format": "pt"})
    return "header"


def m_header_shape(rng: random.Random, folder: str) -> str:
    """A tensor's header shape changed (same element count or not)."""
    path = _pick_safetensors(rng, folder)
    header, data = read_safetensors(path)
    name = rng.choice(_tensor_names(header))
    shape = header[name]["shape"]
    choice = rng.randrange(5)
    if choice == 0 and len(shape) == 2:
        shape = shape[::-1]
    elif choice == 1:
        shape = [*shape, 1]
    elif choice == 2:
        shape = [int(s) // 2 for s in shape]
    elif choice == 3:
        shape = [rng.choice([0, 1, 2**31, 2**63 - 1, 10**12]), *shape[1:]]
    else:
        shape = [max(1, int(sum(shape)))]
    header[name]["shape"] = shape
    write_safetensors(path, header, data)
    return "header"


def m_header_offsets(rng: random.Random, folder: str) -> str:
    """A tensor's data_offsets moved (to 0, overlapping, past the end, reversed, 2**64-1)."""
    path = _pick_safetensors(rng, folder)
    header, data = read_safetensors(path)
    name = rng.choice(_tensor_names(header))
    start, end = header[name]["data_offsets"]
    size = end - start
    choice = rng.randrange(5)
    if choice == 0:
        header[name]["data_offsets"] = [0, size]
    elif choice == 1:
        header[name]["data_offsets"] = [end, start]
    elif choice == 2:
        header[name]["data_offsets"] = [len(data), len(data) + size]
    elif choice == 3:
        header[name]["data_offsets"] = [2**64 - 1, 2**64 - 1 + size]
    else:
        shift = rng.choice([-4, 4, 1])
        header[name]["data_offsets"] = [max(0, start + shift), max(0, end + shift)]
    write_safetensors(path, header, data)
    return "header"


def m_header_bytes(rng: random.Random, folder: str) -> str:
    """Random bits flipped in a header's JSON text."""
    path = _pick_safetensors(rng, folder)
    raw = bytearray(_read_bytes(path))
    (n,) = struct.unpack("<Q", raw[:8])
    _flip(raw, rng, 8, 8 + n, rng.choice([1, 1, 2, 8]))
    _write_bytes(path, raw)
    return "header"


def m_header_length(rng: random.Random, folder: str) -> str:
    """The 8-byte header length prefix changed."""
    path = _pick_safetensors(rng, folder)
    raw = bytearray(_read_bytes(path))
    (n,) = struct.unpack("<Q", raw[:8])
    n = rng.choice([0, 1, n - 1, n + 1, n + 8, len(raw), 2**32, 2**63, 2**64 - 1])
    raw[:8] = struct.pack("<Q", n % 2**64)
    _write_bytes(path, raw)
    return "header"


def m_header_keys(rng: random.Random, folder: str) -> str:
    """A header entry renamed, removed or duplicated under a new name; or junk added."""
    path = _pick_safetensors(rng, folder)
    header, data = read_safetensors(path)
    name = rng.choice(_tensor_names(header))
    choice = rng.randrange(4)
    if choice == 0:
        header[name + ".x"] = header.pop(name)
    elif choice == 1:
        del header[name]
    elif choice == 2:
        header["model.layers.7.mlp.up_proj.weight"] = dict(header[name])
    else:
        header[name]["junk"] = [1, 2, 3]
    write_safetensors(path, header, data)
    return "header"


def m_truncate(rng: random.Random, folder: str) -> str:
    """A weight file cut short (or emptied)."""
    path = rng.choice(_weights(folder, ".safetensors") + _weights(folder, ".bin"))
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(rng.choice([0, 4, 8, rng.randrange(size), size - 1]))
    return "structure"


def m_data_bytes(rng: random.Random, folder: str) -> str:
    """Bits flipped in tensor data only (no reader can see this without checksums)."""
    path = _pick_safetensors(rng, folder)
    raw = bytearray(_read_bytes(path))
    (n,) = struct.unpack("<Q", raw[:8])
    _flip(raw, rng, 8 + n, len(raw), rng.choice([1, 4, 64]))
    _write_bytes(path, raw)
    return "data"


# --------------------------------------------------------------------------- config.json / JSON bytes

HOSTILE_VALUES = [
    None, 0, -1, 1, 3, 2**64 + 1, 10**9, 10**12, 1.5, float("nan"), "64", [64], {"a": 1}, True, "",
]  # fmt: skip
CONFIG_FIELDS = [
    "model_type", "vocab_size", "hidden_size", "n_embd", "num_hidden_layers", "n_layer",
    "num_attention_heads", "n_head", "num_key_value_heads", "intermediate_size", "head_dim",
    "max_position_embeddings", "n_positions", "rms_norm_eps", "tie_word_embeddings", "architectures",
    "rope_scaling", "hidden_act", "pruned_heads", "id2label", "type_vocab_size", "n_inner",
]  # fmt: skip


def m_config_field(rng: random.Random, folder: str) -> str:
    """A config.json field set to a hostile value (or removed)."""
    path = os.path.join(folder, "config.json")
    data = _read_json(path)
    key = rng.choice(CONFIG_FIELDS)
    if rng.random() < 0.1:
        data.pop(key, None)
    else:
        data[key] = rng.choice(HOSTILE_VALUES)
    # NaN is not JSON: written as Python writes it (the reader must refuse the literal)
    _write_bytes(path, json.dumps(data).encode())
    return "config"


def m_config_lie(rng: random.Random, folder: str) -> str:
    """A config that is valid on its own but lies about the weights (more/fewer layers, sizes)."""
    path = os.path.join(folder, "config.json")
    data = _read_json(path)
    layers = "n_layer" if "n_layer" in data else "num_hidden_layers"
    hidden = "n_embd" if "n_embd" in data else "hidden_size"
    key, value = rng.choice(
        [
            (layers, 10**9),
            (layers, 1000),
            (layers, 3),
            (layers, 1),
            ("vocab_size", 2**20),
            ("vocab_size", 95),
            (hidden, 128),
            (hidden, 2**19),
            ("intermediate_size", 2**19),
        ]
    )
    data[key] = value
    _write_bytes(path, json.dumps(data).encode())
    return "config"


JSON_MUTATIONS = 12


def json_bytes_mutation(rng: random.Random, raw: bytes, choice: int | None = None) -> bytes:
    """Hostile bytes for a small JSON file: other encodings, deep nesting, huge numbers, NaN,
    duplicate keys, a non-object top level, truncation, flipped bits (`choice` picks one of
    the `JSON_MUTATIONS`; None draws it)."""
    text = raw.decode()
    choice = rng.randrange(JSON_MUTATIONS) if choice is None else choice
    if choice == 0:
        return text.encode("utf-16")  # with BOM
    if choice == 1:
        return text.encode("utf-16-le")  # without BOM
    if choice == 2:
        return b"\xef\xbb\xbf" + raw
    if choice == 3:
        return raw[:-2] + b'"\xff\xfe\xc3": 1}'
    if choice == 4:
        return b"[" * 100_000 + b"]" * 100_000
    if choice == 5:
        return raw[:-1].rstrip().rstrip(b"}") + b', "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    if choice == 6:
        return raw.rstrip()[:-1] + b', "big": ' + b"9" * 1_000_000 + b"}"
    if choice == 7:
        return raw.rstrip()[:-1] + rng.choice([b', "x": NaN}', b', "x": Infinity}', b', "x": -Infinity}'])
    if choice == 8:
        data = json.loads(raw)
        key = rng.choice(sorted(data))
        return (
            raw.rstrip()[:-1]
            + b", "
            + json.dumps(key).encode()
            + b": "
            + json.dumps(data[key]).encode()
            + b"}"
        )
    if choice == 9:
        return rng.choice([b"[]", b'"config"', b"42", b"null", b"", b"   "])
    if choice == 10:
        return raw[: rng.randrange(len(raw))]
    out = bytearray(raw)
    _flip(out, rng, 0, len(out), rng.choice([1, 3]))
    return bytes(out)


def m_config_bytes(rng: random.Random, folder: str) -> str:
    """config.json's bytes mutated (see `json_bytes_mutation`)."""
    path = os.path.join(folder, "config.json")
    raw = _read_bytes(path)
    _write_bytes(path, json_bytes_mutation(rng, raw))
    return "config"


# --------------------------------------------------------------------------- shard index


def _index(folder: str) -> str:
    return os.path.join(folder, "model.safetensors.index.json")


def m_index_entry(rng: random.Random, folder: str) -> str:
    """A weight_map value or key made hostile, the map reshaped, or a shard path escaping."""
    path = _index(folder)
    index = _read_json(path)
    weight_map = index["weight_map"]
    name = rng.choice(sorted(weight_map))
    shard = weight_map[name]
    outside = os.path.join(os.path.dirname(folder), "outside.safetensors")
    choice = rng.randrange(11)
    if choice == 0:
        weight_map[name] = rng.choice([1, None, [shard], {"f": shard}, "", True])
    elif choice == 1:
        weight_map[name] = "../" + os.path.basename(folder) + "/" + shard
    elif choice == 2:
        shutil.copy(os.path.join(folder, shard), outside)
        weight_map = {k: (outside if v == shard else v) for k, v in weight_map.items()}
    elif choice == 3:
        shutil.copy(os.path.join(folder, shard), outside)
        os.remove(os.path.join(folder, shard))
        os.symlink(outside, os.path.join(folder, shard))
    elif choice == 4:
        del weight_map[name]
    elif choice == 5:
        weight_map["model.layers.9.mlp.up_proj.weight"] = shard
    elif choice == 6:
        other = sorted(set(weight_map.values()) - {shard}) or [shard]
        weight_map[name] = other[0]
    elif choice == 7:
        weight_map = rng.choice([[], "x", 1, None])
    elif choice == 8:
        weight_map[name] = "/etc/passwd"
    elif choice == 9:
        weight_map[name] = "missing-shard.safetensors"
    else:
        weight_map[name] = "sub/../" + shard  # ".." refused even where it stays inside
    index["weight_map"] = weight_map
    _write_bytes(path, json.dumps(index).encode())
    return "index"


def m_index_bytes(rng: random.Random, folder: str) -> str:
    """The index's bytes mutated (see `json_bytes_mutation`)."""
    path = _index(folder)
    raw = _read_bytes(path)
    _write_bytes(path, json_bytes_mutation(rng, raw))
    return "index"
