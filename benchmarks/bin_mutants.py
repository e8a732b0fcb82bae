"""Mutators of pickle checkpoints (`pytorch_model.bin`): bytes of the zip (pickle opcodes,
zip structure, tensor data), payloads that are not a {str: tensor} dict or carry code, and
torch's legacy (non-zip) format. Same contract as `benchmarks/checkpoint_mutants.py`."""

from __future__ import annotations

import io
import os
import pickle
import random
import struct
import zipfile

import torch

from benchmarks.checkpoint_mutants import _flip, _read_bytes, _write_bytes

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

    class _Skip(pickle.Unpickler):
        def persistent_load(self, pid):
            return None

        def find_class(self, module, name):
            return lambda *a, **k: None

    f = io.BytesIO(raw)
    for _ in range(5):
        _Skip(f).load()
    return f.tell()
