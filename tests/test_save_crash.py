"""Crash-safe saves: a saving subprocess killed at many points leaves the complete old or the
complete new checkpoint at the target, the next save removes every leftover; the two-rename
fallback (no atomic exchange) and its recovery; failed saves; save's argument checks; modes.

The kill machinery is benchmarks/kill_saves.py's `KillHarness` (the script runs many more kills).
"""

from __future__ import annotations

import errno
import importlib.util
import math
import os
import random
import stat
import sys
import threading
from pathlib import Path

import pytest
import torch

import fmodel
from fmodel.errors import ArgumentTypeError, CheckpointError, InvalidArgumentError
from fmodel.io import atomic

from .conftest import TINY

_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "kill_saves.py"
_spec = importlib.util.spec_from_file_location("kill_saves", _SCRIPT)
kill_saves = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("kill_saves", kill_saves)
_spec.loader.exec_module(kill_saves)

posix_only = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill harness forks")


def random_state(seed: int = 0) -> fmodel.ModelState:
    config = fmodel.LlamaConfig(**{**TINY, "num_hidden_layers": 1})
    return fmodel.io.state_from_tensors(config, {}, allow_missing=True, seed=seed, warn_missing=False)[0]


def beside(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name != target.name)


def same_params(a: fmodel.ModelState, b: fmodel.ModelState) -> bool:
    return sorted(a.params) == sorted(b.params) and all(
        a.params[k].dtype == b.params[k].dtype and torch.equal(a.params[k], b.params[k]) for k in a.params
    )


# --------------------------------------------------------------------------- kills


def _spread(points: list[str], count: int) -> list[int]:
    """Point numbers (1-based): every exchange/rename point, the rest evenly spaced."""
    key = [i + 1 for i, label in enumerate(points) if "exchange" in label or "rename" in label]
    rest = [n for n in range(1, len(points) + 1) if n not in key]
    step = len(rest) / max(1, count - len(key))
    return sorted(set(key) | {rest[int(i * step)] for i in range(count - len(key))})


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """One zygote for both kill tests (its start, importing torch, is most of their time)."""
    with kill_saves.KillHarness(tmp_path_factory.mktemp("kills"), layers=1) as h:
        yield h


@posix_only
def test_kills_at_many_points_leave_the_old_or_the_new_checkpoint(harness):
    rng = random.Random(0)
    harness.fallback = False
    points, seconds = harness.points()
    assert any("exchange" in p for p in points) and any("shard write" in p for p in points)
    results = [harness.kill_at(n, points[n - 1]) for n in _spread(points, 20)]
    results += [harness.kill_after(rng.uniform(0, seconds)) for _ in range(3)]
    assert len(results) >= 20
    for r in results:
        assert r.target in ("old", "new"), r  # never missing, never partial
        assert r.loads == r.target, r  # fmodel.load gives that checkpoint, bit for bit
        assert r.leftovers_after == 0, r  # the next save removed every leftover
    assert {r.target for r in results} == {"old", "new"}
    assert [r.target for r in results if r.point == "before exchange"] == ["old"]
    assert [r.target for r in results if r.point == "after exchange"] == ["new"]
    assert any(r.leftovers_before for r in results)  # kills did leave hidden folders behind


@posix_only
def test_kills_in_the_two_rename_fallback_are_recovered_by_load(harness):
    harness.fallback = True
    try:
        points, _ = harness.points()
        renames = [i + 1 for i, label in enumerate(points) if "rename" in label]
        assert len(renames) == 4  # before/after target -> .old, before/after tmp -> target
        results = [harness.kill_at(n, points[n - 1]) for n in renames]
    finally:
        harness.fallback = False
    assert [r.target for r in results] == ["old", "missing", "missing", "new"]
    assert [r.loads for r in results] == ["old", "old", "old", "new"]  # load put the old one back
    assert all(r.leftovers_after == 0 for r in results)


# --------------------------------------------------------------------------- fallback, recovery


def _interrupted_fallback(tmp_path: Path) -> tuple[Path, fmodel.ModelState]:
    """The state a kill between the fallback's two renames leaves: no target, the old
    checkpoint as .ckpt.old-*, the complete new one as .ckpt.tmp-*."""
    old = random_state(1)
    target = tmp_path / "ckpt"
    fmodel.save(old, target)
    fmodel.save(random_state(2), tmp_path / "new")
    os.rename(target, tmp_path / ".ckpt.old-abcd1234")
    os.rename(tmp_path / "new", tmp_path / ".ckpt.tmp-0123abcd")
    return target, old


def test_fallback_without_exchange_saves_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    target = tmp_path / "ckpt"
    fmodel.save(random_state(1), target)
    second = random_state(2)
    fmodel.save(second, target)
    assert same_params(fmodel.load(target), second)
    assert beside(target) == []


def test_load_recovers_the_old_checkpoint_after_a_kill_between_the_fallback_renames(tmp_path):
    target, old = _interrupted_fallback(tmp_path)
    assert same_params(fmodel.load(target), old)
    assert beside(target) == [".ckpt.tmp-0123abcd"]  # load only puts back; the next save cleans
    new = random_state(3)
    fmodel.save(new, target)
    assert same_params(fmodel.load(target), new) and beside(target) == []


def test_save_recovers_and_cleans_after_a_kill_between_the_fallback_renames(tmp_path, monkeypatch):
    target, _ = _interrupted_fallback(tmp_path)
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    (tmp_path / "ckpt2").mkdir()  # another target's and unrelated hidden folders are not touched
    (tmp_path / ".ckpt2.tmp-aaaa1111").mkdir()
    (tmp_path / ".ckpt.tmp-1.tmp-bbbb2222").mkdir()
    new = random_state(3)
    fmodel.save(new, target)
    assert same_params(fmodel.load(target), new)
    assert beside(target) == [".ckpt.tmp-1.tmp-bbbb2222", ".ckpt2.tmp-aaaa1111", "ckpt2"]


def test_leftovers_of_a_save_into_a_leftover_are_removed_too(tmp_path):
    # what a killed `fmodel convert` leaves: its staging folder and its inner save's folders
    target = tmp_path / "out"
    for name in (".out.tmp-aaaa1111", "..out.tmp-aaaa1111.tmp-bbbb2222", "..out.tmp-aaaa1111.old-cccc3333"):
        (tmp_path / name).mkdir()
    (tmp_path / "..out.tmp-aaaa1111.lock").write_text("")
    fmodel.save(random_state(), target)
    assert beside(target) == []
    assert atomic.recover(target) is False


def test_exchange_swaps_two_folders_or_says_it_cannot(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b").mkdir()
    if not atomic.exchange(str(tmp_path / "a"), str(tmp_path / "b")):
        pytest.skip("no atomic exchange on this OS / filesystem")
    assert (tmp_path / "b" / "x").read_text() == "a" and not (tmp_path / "a" / "x").exists()
    with pytest.raises(OSError, match="missing"):
        atomic.exchange(str(tmp_path / "a"), str(tmp_path / "missing"))


def test_concurrent_saves_to_one_target_do_not_corrupt_it(tmp_path):
    target = tmp_path / "ckpt"
    states = [random_state(s) for s in (1, 2, 3)]
    errors: list[BaseException] = []

    def saver(state: fmodel.ModelState) -> None:
        try:
            for _ in range(3):
                fmodel.save(state, target)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=saver, args=(s,)) for s in states]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    loaded = fmodel.load(target)
    assert any(same_params(loaded, s) for s in states)
    assert beside(target) == []


# --------------------------------------------------------------------------- failed saves


@pytest.mark.parametrize(
    "error", [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("serialisation failed")]
)
def test_a_save_function_that_raises_leaves_the_target_as_it_was(tmp_path, error):
    target = tmp_path / "ckpt"
    fmodel.save(random_state(1), target, safe_serialization=False)
    before = kill_saves.snapshot(target)

    def broken(tensors, path):
        torch.save(tensors, path)
        raise error

    with pytest.raises(type(error), match=str(error.args[-1])):
        fmodel.save(random_state(2), target, safe_serialization=False, save_function=broken)
    assert kill_saves.snapshot(target) == before and beside(target) == []


# --------------------------------------------------------------------------- bad arguments


BAD = [
    ({"state": None}, ArgumentTypeError, "state"),
    ({"state": "model"}, ArgumentTypeError, "state"),
    ({"state": {}}, ArgumentTypeError, "state"),
    ({"directory": None}, ArgumentTypeError, "directory"),
    ({"directory": 3}, ArgumentTypeError, "directory"),
    ({"max_shard_size": -1}, InvalidArgumentError, "max_shard_size"),
    ({"max_shard_size": 0}, InvalidArgumentError, "max_shard_size"),
    ({"max_shard_size": "abc"}, InvalidArgumentError, "max_shard_size"),
    ({"max_shard_size": "5XB"}, InvalidArgumentError, "max_shard_size"),
    ({"max_shard_size": "0GB"}, InvalidArgumentError, "max_shard_size"),
    ({"max_shard_size": math.nan}, InvalidArgumentError, "max_shard_size"),
    ({"max_shard_size": None}, ArgumentTypeError, "max_shard_size"),
    ({"variant": "a/b"}, InvalidArgumentError, "variant"),
    ({"variant": ""}, InvalidArgumentError, "variant"),
    ({"variant": ".."}, InvalidArgumentError, "variant"),
    ({"variant": 16}, ArgumentTypeError, "variant"),
    ({"tensors": [1, 2]}, ArgumentTypeError, "tensors"),
    ({"tensors": {"lm_head.weight": [1.0]}}, ArgumentTypeError, "tensors"),
    ({"tensors": {1: torch.zeros(1)}}, ArgumentTypeError, "tensors"),
    ({"save_function": "torch.save"}, ArgumentTypeError, "save_function"),
    ({"generation_config": ["do_sample"]}, ArgumentTypeError, "generation_config"),
    ({"model_card": 5}, ArgumentTypeError, "model_card"),
]


@pytest.mark.parametrize(("change", "error", "names"), BAD, ids=[repr(c) for c, _, _ in BAD])
def test_bad_arguments_are_named_errors_before_anything_is_written(tmp_path, change, error, names):
    state = random_state()
    before = {k: (v._version, v.data_ptr()) for k, v in state.params.items()}
    args = {"state": state, "directory": tmp_path / "out", **change}
    with pytest.raises(error, match=names):
        fmodel.save(args.pop("state"), args.pop("directory"), **args)
    assert list(tmp_path.iterdir()) == []
    assert {k: (v._version, v.data_ptr()) for k, v in state.params.items()} == before


def test_a_file_at_the_target_is_a_checkpoint_error(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(CheckpointError, match="exists and is not a folder"):
        fmodel.save(random_state(), tmp_path / "out")
    assert beside(tmp_path / "out") == []


def test_sizes_with_units_are_decimal():
    from fmodel.io.save_args import shard_size_bytes

    assert shard_size_bytes("5GB") == 5 * 10**9 and shard_size_bytes(" 0.5mb ") == 500_000
    assert shard_size_bytes(123) == 123


# --------------------------------------------------------------------------- modes


@pytest.mark.skipif(os.name != "posix", reason="POSIX modes")
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_and_the_folder_get_normal_modes(tmp_path, umask):
    old = os.umask(umask)
    try:
        for safe in (True, False):
            target = tmp_path / f"safe-{safe}"
            fmodel.save(random_state(), target, safe_serialization=safe, max_shard_size="60KB", tags=["t"])
            assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in target.iterdir()}
            assert len(modes) > 3 and set(modes.values()) == {0o666 & ~umask}, modes
    finally:
        os.umask(old)


# --------------------------------------------------------------------------- generation config


def test_resaving_rewrites_a_stale_generation_config_but_a_loaded_models_survives(tmp_path):
    import json

    import fmodel.facade as facade

    target = tmp_path / "ckpt"
    fmodel.save(random_state(1), target)
    derived = json.loads((target / "generation_config.json").read_text())
    (target / "generation_config.json").write_text('{"max_new_tokens": 5, "do_sample": true}')
    model = facade.AutoModelForCausalLM.from_pretrained(target)
    model.save_pretrained(target)  # the model carries the file it was loaded with
    assert json.loads((target / "generation_config.json").read_text()) == {
        "max_new_tokens": 5,
        "do_sample": True,
    }
    fmodel.save(random_state(2), target)  # a bare state carries none: the config's, not the stale file
    assert json.loads((target / "generation_config.json").read_text()) == derived
    assert beside(target) == []
