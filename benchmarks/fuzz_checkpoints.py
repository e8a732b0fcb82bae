"""Mutant campaign over safetensors / sharded / pickle .bin checkpoints and their JSON files.

Usage:
    python benchmarks/fuzz_checkpoints.py [--per-family N] [--seed S]

Subjects: tiny Transformers-written checkpoints (Llama, GPT-2, BERT as model.safetensors, a
Llama sharded with an index, a Llama as pytorch_model.bin). Each mutation family takes a
`random.Random` and a copy of a subject's folder and damages one thing in place (a header
dtype, shape or offset, header bytes, the header length, data bytes, a truncation, a
config.json field or its bytes, an index entry or its bytes, the zip / pickle of a .bin),
returning the region it touched. `outcome` then loads the mutant with `fmodel.load` and
sorts the result:

- named: a `FModelError` subclass was raised;
- identical: it loaded and every tensor equals the pristine subject's (the mutation was
  harmless: a byte of whitespace, metadata, a valid config change that no file can refute);
- data-only: it loaded with different tensor values and only data bytes were touched, which
  no reader can detect without checksums (undetectable by design);
- silent: it loaded with different tensors after a header / structure change (must be 0);
- foreign: any other exception;
- hang: the load took more than `HANG_S` (1 s).

The test (`tests/test_fuzz_checkpoints.py`) drives the same mutators with Hypothesis; this
script runs a larger seeded campaign and prints a table per family: tried, each outcome,
the slowest rejection in ms and the growth of the process's peak RSS during the family.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fmodel
from fmodel.errors import FModelError

HANG_S = 1.0
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4)
SAFE_SUBJECTS = ("llama", "gpt2", "bert")
ALL_SUBJECTS = (*SAFE_SUBJECTS, "llama-sharded", "llama-bin")


# --------------------------------------------------------------------------- subjects


def build_subject(name: str, folder: str) -> str:
    """Write subject `name` (a tiny random Transformers model) into `folder`; returns it."""
    import transformers

    torch.manual_seed(0)
    if name.startswith("llama"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, num_key_value_heads=2))
    elif name == "gpt2":
        config = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64)
        model = transformers.GPT2LMHeadModel(config)
    elif name == "bert":
        model = transformers.BertForMaskedLM(transformers.BertConfig(**TINY, max_position_embeddings=64))
    else:
        raise ValueError(name)
    kwargs = {"max_shard_size": "40KB"} if name == "llama-sharded" else {}
    if name == "llama-bin":
        kwargs["safe_serialization"] = False
    model.eval().save_pretrained(folder, **kwargs)
    return folder


def build_subjects(root: str, names=ALL_SUBJECTS) -> dict[str, str]:
    return {name: build_subject(name, os.path.join(root, name)) for name in names}


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


# --------------------------------------------------------------------------- pickle .bin

MARKER = "fmodel-fuzz-code-ran"


class _Evil:
    """A pickled object whose unpickling would run code (creates a marker file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bin(folder: str) -> str:
    return os.path.join(folder, "pytorch_model.bin")


def _zip_regions(path: str) -> dict[str, tuple[int, int]]:
    """{entry suffix: (start, end) of its stored bytes} of a torch zip file."""
    out = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            with open(path, "rb") as f:
                f.seek(info.header_offset + 26)
                name_len, extra_len = struct.unpack("<HH", f.read(4))
            start = info.header_offset + 30 + name_len + extra_len
            out[info.filename] = (start, start + info.compress_size)
    return out


def m_bin_bytes(rng: random.Random, folder: str) -> str:
    """Bits flipped in a .bin: in its pickle (opcodes), its zip structure, or tensor data."""
    path = _bin(folder)
    regions = _zip_regions(path)
    raw = bytearray(_read_bytes(path))
    where = rng.choice(["pickle", "structure", "data"])
    if where == "pickle":
        start, end = next(v for k, v in regions.items() if k.endswith("data.pkl"))
    elif where == "data":
        start, end = rng.choice([v for k, v in regions.items() if "/data/" in k and v[1] > v[0]])
    else:
        start, end = max(end for _, end in regions.values()), len(raw)
    _flip(raw, rng, start, end, rng.choice([1, 2, 8]))
    _write_bytes(path, raw)
    return "data" if where == "data" else where


BIN_PAYLOADS = 10


def m_bin_payload(rng: random.Random, folder: str, which: int | None = None) -> str:
    """A .bin whose payload is not a {str: tensor} dict, or carries code (`which` picks one of
    the `BIN_PAYLOADS`; None draws it)."""
    path = _bin(folder)
    good = torch.load(path, weights_only=True)
    name = rng.choice(sorted(good))
    marker = os.path.join(folder, MARKER)
    payloads = [
        list(good.values()),
        good[name],
        42,
        {**good, name: good[name].tolist()},
        {**good, name: "weights"},
        {**good, 7: good[name]},
        {**good, name: {"nested": good[name]}},
        {**good, name: _Evil(marker)},
        _Evil(marker),
        {**good, name: good[name].to_sparse()},
    ]
    payload = payloads[rng.randrange(BIN_PAYLOADS) if which is None else which]
    torch.save(payload, path)
    return "payload"


def m_bin_legacy(rng: random.Random, folder: str) -> str:
    """A .bin in torch's legacy (non-zip) format, cut or flipped."""
    path = _bin(folder)
    good = torch.load(path, weights_only=True)
    torch.save(good, path, _use_new_zipfile_serialization=False)
    raw = bytearray(_read_bytes(path))
    data_start = _legacy_data_start(bytes(raw))
    if rng.random() < 0.5:
        raw = raw[: rng.randrange(len(raw))]
        region = "structure"
    elif rng.random() < 0.7:
        _flip(raw, rng, 0, data_start, rng.choice([1, 4]))
        region = "pickle"
    else:
        _flip(raw, rng, data_start, len(raw), rng.choice([1, 4]))
        region = "data"
    _write_bytes(path, raw)
    return region


def _legacy_data_start(raw: bytes) -> int:
    """Where the storages' bytes begin in a legacy torch file: after its five pickles."""
    import io
    import pickle

    class _Skip(pickle.Unpickler):
        def persistent_load(self, pid):
            return None

        def find_class(self, module, name):
            return lambda *a, **k: None

    f = io.BytesIO(raw)
    for _ in range(5):
        _Skip(f).load()
    return f.tell()


# --------------------------------------------------------------------------- families

Mutator = Callable[[random.Random, str], str]
FAMILIES: dict[str, tuple[Mutator, tuple[str, ...]]] = {
    "header dtype": (m_header_dtype, SAFE_SUBJECTS),
    "dtype re-stored": (m_dtype_restored, SAFE_SUBJECTS),
    "header shape": (m_header_shape, SAFE_SUBJECTS),
    "header offsets": (m_header_offsets, SAFE_SUBJECTS),
    "header bytes": (m_header_bytes, SAFE_SUBJECTS),
    "header length": (m_header_length, SAFE_SUBJECTS),
    "header keys": (m_header_keys, SAFE_SUBJECTS),
    "truncated": (m_truncate, (*SAFE_SUBJECTS, "llama-bin")),
    "data bytes": (m_data_bytes, SAFE_SUBJECTS),
    "config field": (m_config_field, SAFE_SUBJECTS),
    "config lie": (m_config_lie, SAFE_SUBJECTS),
    "config bytes": (m_config_bytes, SAFE_SUBJECTS),
    "index entry": (m_index_entry, ("llama-sharded",)),
    "index bytes": (m_index_bytes, ("llama-sharded",)),
    "bin bytes": (m_bin_bytes, ("llama-bin",)),
    "bin payload": (m_bin_payload, ("llama-bin",)),
    "bin legacy": (m_bin_legacy, ("llama-bin",)),
}
OUTCOMES = ("named", "identical", "data-only", "silent", "foreign", "hang")


class _Timeout(BaseException):
    pass


def _alarm(signum, frame):
    raise _Timeout


def load_reference(folder: str) -> fmodel.ModelState:
    return fmodel.load(folder)


def _same_tensors(a: fmodel.ModelState, b: fmodel.ModelState) -> bool:
    ta, tb = {**a.params, **a.buffers}, {**b.params, **b.buffers}
    if sorted(ta) != sorted(tb):
        return False
    for name, x in ta.items():
        y = tb[name]
        if x.shape != y.shape or x.dtype.is_floating_point != y.dtype.is_floating_point:
            return False
        # a float tensor re-stored in another float dtype loads as that dtype (allowed):
        # compare against the reference rounded the same way
        if not torch.equal(x.to(y.dtype), y):
            return False
    return True


def outcome(folder: str, reference: fmodel.ModelState, region: str, *, hard_limit_s: int = 20):
    """Load the mutant at `folder`: (outcome, seconds, exception or None). See the module doc."""
    old = signal.signal(signal.SIGALRM, _alarm) if hasattr(signal, "SIGALRM") else None
    if old is not None:
        signal.alarm(hard_limit_s)
    start = time.perf_counter()
    try:
        state = fmodel.load(folder)
    except _Timeout:
        return "hang", time.perf_counter() - start, None
    except FModelError as exc:
        took = time.perf_counter() - start
        return ("hang" if took > HANG_S else "named"), took, exc
    except Exception as exc:
        return "foreign", time.perf_counter() - start, exc
    finally:
        if old is not None:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
    took = time.perf_counter() - start
    if took > HANG_S:
        return "hang", took, None
    if _same_tensors(reference, state):
        return "identical", took, None
    return ("data-only" if region == "data" else "silent"), took, None


def mutant(subject_folder: str, work: str, family: str, rng: random.Random) -> tuple[str, str]:
    """Copy the subject to a fresh folder under `work`, apply `family`; (folder, region)."""
    folder = tempfile.mkdtemp(dir=work)
    target = os.path.join(folder, "ckpt")
    shutil.copytree(subject_folder, target)
    region = FAMILIES[family][0](rng, target)
    return target, region


def _peak_rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def campaign(per_family: int, seed: int, root: str, families=None) -> dict[str, dict]:
    families = families or list(FAMILIES)
    needed = sorted({name for family in families for name in FAMILIES[family][1]})
    subjects = build_subjects(os.path.join(root, "subjects"), needed)
    references = {name: load_reference(path) for name, path in subjects.items()}
    work = os.path.join(root, "mutants")
    os.makedirs(work)
    rows = {}
    for family in families:
        names = FAMILIES[family][1]
        row = dict.fromkeys(OUTCOMES, 0) | {"tried": 0, "slowest_ms": 0.0, "rss_kb": 0, "examples": []}
        before = _peak_rss_kb()
        for i in range(per_family):
            rng = random.Random(f"{seed}-{family}-{i}")
            subject = names[i % len(names)]
            folder, region = mutant(subjects[subject], work, family, rng)
            result, took, exc = outcome(folder, references[subject], region)
            row["tried"] += 1
            row[result] += 1
            if result == "named":
                row["slowest_ms"] = max(row["slowest_ms"], took * 1000)
            if result in ("silent", "foreign", "hang") and len(row["examples"]) < 3:
                row["examples"].append(f"{subject}#{i}: {type(exc).__name__ if exc else result}: {exc}"[:300])
            if os.path.exists(os.path.join(folder, MARKER)):
                raise SystemExit(f"code from a checkpoint ran: {family} #{i}")
            shutil.rmtree(os.path.dirname(folder), ignore_errors=True)
        row["rss_kb"] = _peak_rss_kb() - before
        rows[family] = row
    return rows


def print_table(rows: dict[str, dict]) -> None:
    cols = ("tried", *OUTCOMES)
    print(f"{'family':<16}" + "".join(f"{c:>10}" for c in cols) + f"{'slowest ms':>12}{'RSS +MB':>9}")
    total = dict.fromkeys(cols, 0)
    slowest = 0.0
    for family, row in rows.items():
        print(
            f"{family:<16}"
            + "".join(f"{row[c]:>10}" for c in cols)
            + f"{row['slowest_ms']:>12.1f}{row['rss_kb'] / 1024:>9.1f}"
        )
        for c in cols:
            total[c] += row[c]
        slowest = max(slowest, row["slowest_ms"])
    print(f"{'total':<16}" + "".join(f"{total[c]:>10}" for c in cols) + f"{slowest:>12.1f}")
    print("(data-only: tensor data bytes changed, undetectable by design without checksums)")
    for family, row in rows.items():
        for line in row["examples"]:
            print(f"  {family}: {line}")


def main(argv=None) -> int:
    import argparse
    import logging

    logging.getLogger("fmodel").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-family", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--families", default="", help="comma-separated subset (default: all)")
    args = parser.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()] or None
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        rows = campaign(args.per_family, args.seed, root, families)
    print_table(rows)
    bad = sum(row["silent"] + row["foreign"] + row["hang"] for row in rows.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
