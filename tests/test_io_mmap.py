"""`fmodel.load(..., mmap=False)`: tensors copied out of the file mapping into process memory,
the mapped pages they came from dropped, values unchanged; the default keeps them mapped."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

import fmodel
from fmodel.errors import ArgumentTypeError
from fmodel.io.read import owned_copy, read_weight_file

from .test_io import assert_same_params, random_state

linux_only = pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")


def _mappings_of(path: Path) -> list[tuple[int, int]]:
    """The [start, end) address ranges of this process's mappings of `path`."""
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == str(path):
                start, end = (int(a, 16) for a in fields[0].split("-"))
                spans.append((start, end))
    return spans


def _mapped_rss_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of `path` (from /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                inside = line.rstrip().endswith(" " + str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


def _in_file(t: torch.Tensor, spans: list[tuple[int, int]]) -> bool:
    return any(start <= t.data_ptr() < end for start, end in spans)


@pytest.fixture
def big(tmp_path) -> tuple[Path, fmodel.ModelState]:
    """A ~51 MB checkpoint (a large tied embedding) and the state it was saved from."""
    state = random_state(tie=True, vocab_size=200_000)
    folder = tmp_path / "big"
    fmodel.save(state, folder)
    return folder, state


@linux_only
def test_mmap_false_copies_every_tensor_out_of_the_file(big):
    folder, state = big
    path = (folder / "model.safetensors").resolve()
    mapped = fmodel.load(folder)
    spans = _mappings_of(path)
    assert spans and all(_in_file(t, spans) for t in mapped.unique_params().values())  # the control
    del mapped

    owned = fmodel.load(folder, mmap=False)
    assert_same_params(owned, state)
    spans = _mappings_of(path)
    assert not any(_in_file(t, spans) for t in owned.unique_params().values())
    assert owned.params["lm_head.weight"] is owned.params["model.embed_tokens.weight"]  # ties stay


@linux_only
def test_owned_copy_drops_the_mapped_pages_it_copied(big):
    """A copying load must not hold the model twice: each tensor's file pages leave the mapping
    once copied (they stay in the OS page cache, not in this process's RSS)."""
    folder, _ = big
    path = (folder / "model.safetensors").resolve()
    mapped = read_weight_file(str(path))
    table = mapped["model.embed_tokens.weight"]
    assert float(table.sum()) == float(table.sum())  # pages the whole table in
    before = _mapped_rss_kib(path)
    assert before * 1024 > table.nbytes * 0.9

    copy = owned_copy(table)
    assert torch.equal(copy, table)  # reads the file again where it must
    after_copy = _mapped_rss_kib(path)
    # table pages come back by the comparison above; drop them again and measure right away
    owned_copy(table)
    after = _mapped_rss_kib(path)
    assert after * 1024 < table.nbytes * 0.05, f"{after} KiB of the file still mapped"
    assert copy.data_ptr() != table.data_ptr() and after_copy >= after


@linux_only
def test_pickle_checkpoint_mmap_false_is_read_into_memory(tmp_path):
    state = random_state()
    folder = tmp_path / "pickle"
    fmodel.save(state, folder)
    (folder / "model.safetensors").unlink()
    torch.save(dict(state.unique_params()), folder / "pytorch_model.bin")
    path = (folder / "pytorch_model.bin").resolve()
    mapped = fmodel.load(folder)
    assert any(_in_file(t, _mappings_of(path)) for t in mapped.unique_params().values())  # the control
    del mapped
    owned = fmodel.load(folder, mmap=False)
    assert_same_params(owned, state)
    assert not any(_in_file(t, _mappings_of(path)) for t in owned.unique_params().values())


def test_mmap_false_leaves_the_file_unchanged_and_writes_stay_private(big):
    folder, _ = big
    path = folder / "model.safetensors"
    data = path.read_bytes()
    owned = fmodel.load(folder, mmap=False)
    with torch.no_grad():
        owned.params["model.norm.weight"].add_(1.0)
    assert path.read_bytes() == data


@pytest.mark.parametrize("value", ["no", 0, None])
def test_mmap_must_be_a_bool(big, value):
    folder, _ = big
    with pytest.raises(ArgumentTypeError, match="mmap"):
        fmodel.load(folder, mmap=value)
