"""What each spawned rank of tests/test_distributed_io.py runs (kept apart from the test module so
a rank imports torch and fmodel only, not Transformers), and the spawning itself."""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import fmodel
from fmodel.distributed.load_sharded import expected_local_bytes, loaded_bytes
from fmodel.distributed.plan import layout_of
from fmodel.models import get_spec

from . import spawn_ranks

TIMEOUT = 90  # seconds for one spawned run: a hang fails the test instead of blocking CI


# -- spawning ---------------------------------------------------------------------------------


def spawn(target, tmp: Path, *args, world: int) -> list:
    """`spawn_ranks.spawn` with this module's timeout."""
    return spawn_ranks.spawn(target, tmp, *args, world=world, timeout=TIMEOUT)


# -- measuring --------------------------------------------------------------------------------


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM, RssAnon, RssFile)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: "5" into /proc/self/clear_refs); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return status_kib("VmHWM") <= status_kib("VmRSS") + 64


def measured_load(path, mesh, **kwargs) -> tuple[fmodel.ModelState, dict[str, Any]]:
    """`fmodel.load(path, mesh=mesh, **kwargs)` with its time and peak RSS growth (bytes)."""
    gc.collect()
    exact = reset_peak_rss()
    before = status_kib("VmRSS")
    start = time.perf_counter()
    state = fmodel.load(path, mesh=mesh, **kwargs)
    seconds = time.perf_counter() - start
    peak = (status_kib("VmHWM") - before) * 1024
    return state, {"load_s": seconds, "peak_rss_growth": peak, "peak_exact": exact}


# -- comparing --------------------------------------------------------------------------------


def assert_same_distributed(got: fmodel.ModelState, want: fmodel.ModelState) -> int:
    """The two distributed states equal tensor for tensor: names, params vs buffers, ties, and for
    each DTensor its global shape, placements, recorded layout, dtype, device and local values.
    Returns the number of tensors compared."""
    from torch.distributed.tensor import DTensor

    assert sorted(got.params) == sorted(want.params)
    assert sorted(got.buffers) == sorted(want.buffers)
    assert dict(got.ties) == dict(want.ties)
    assert (got.config, got.architecture, got.attn_implementation) == (
        want.config,
        want.architecture,
        want.attn_implementation,
    )
    for alias, src in got.ties.items():
        assert got.params[alias] is got.params[src], alias
    for name, w in want.tensors.items():
        g = got.tensors[name]
        assert type(g) is type(w), name
        if isinstance(w, DTensor):
            assert g.shape == w.shape and g.stride() == w.stride(), name
            assert g.placements == w.placements, (name, g.placements, w.placements)
            assert layout_of(g) == layout_of(w), name
            g, w = g.to_local(), w.to_local()
        assert g.dtype == w.dtype and g.device == w.device and g.requires_grad == w.requires_grad, name
        assert g.shape == w.shape and torch.equal(g, w), name
    return len(want.tensors)


def owns_only_its_share(state: fmodel.ModelState) -> list[str]:
    """Names of sharded tensors whose local tensor's storage holds more than the local tensor
    (a view of a whole tensor would); empty when every shard has memory of its own size."""
    from torch.distributed.tensor import DTensor, Shard

    bad = []
    for name, t in state.tensors.items():
        if isinstance(t, DTensor) and isinstance(t.placements[0], Shard):
            local = t.to_local()
            if local.untyped_storage().nbytes() != local.numel() * local.element_size():
                bad.append(name)
    return bad


# -- the ranks' checks ------------------------------------------------------------------------


def _mesh(world: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))


def check_loads(
    rank: int, world: int, cases: list[tuple[str, str, dict]], save_to: str | None, **save_kwargs: Any
) -> dict:
    """For each (label, path, load kwargs): the sharded load against distribute(load), its bytes
    against the plan's arithmetic, each shard owning only its memory; then `fmodel.save` of the
    first case's state into `save_to` from every rank. Returns measurements by label."""
    mesh = _mesh(world)
    out: dict[str, Any] = {}
    first = None
    for label, path, kwargs in cases:
        got, measured = measured_load(path, mesh, **kwargs)
        plain = fmodel.load(path, **{k: v for k, v in kwargs.items() if k != "plan"})
        want = fmodel.distribute(plain, mesh, kwargs.get("plan"))
        compared = assert_same_distributed(got, want)
        spec = get_spec(plain.architecture)
        plan = kwargs.get("plan") or spec.tp_plan(plain.config)
        share = expected_local_bytes(plain, plan, world, rank)
        measured.update(share)
        measured["loaded_bytes"] = loaded_bytes(got)
        measured["compared"] = compared
        measured["not_own_memory"] = owns_only_its_share(got)
        out[label] = measured
        first = got if first is None else first
        del plain, want
    if save_to is not None:
        returned = fmodel.save(first, save_to, **save_kwargs)
        # every rank returns after the write: the files are there on every rank
        measured = out[cases[0][0]]
        measured["saved"] = returned
        measured["saved_files"] = sorted(os.listdir(save_to))
    return out


def check_memory(rank: int, world: int, path: str, warmup: str) -> dict:
    """One sharded load of a larger checkpoint, measured first thing in a fresh rank after a load
    of the tiny `warmup` (the imports; it leaves no freed memory the measured load could reuse)."""
    mesh = _mesh(world)
    fmodel.load(warmup, mesh=mesh)
    gc.collect()
    state, measured = measured_load(path, mesh)
    plain = fmodel.load(path)
    plan = get_spec(plain.architecture).tp_plan(plain.config)
    measured.update(expected_local_bytes(plain, plan, world, rank))
    measured["loaded_bytes"] = loaded_bytes(state)
    measured["not_own_memory"] = owns_only_its_share(state)
    return measured


def check_errors(rank: int, world: int, path: str, folder: str) -> dict[str, str]:
    """The named errors, each raised on every rank (none hangs): a 2-D mesh, a writer that fails
    in the middle of a save, a save into a file."""
    from torch.distributed.device_mesh import init_device_mesh

    from fmodel.errors import CheckpointError, MeshSizeError

    caught: dict[str, str] = {}
    mesh = _mesh(world)
    try:
        fmodel.load(path, mesh=init_device_mesh("cpu", (1, world)))
    except MeshSizeError as exc:
        caught["2-D mesh"] = str(exc)
    state = fmodel.load(path, mesh=mesh, plan={"model.layers.*.mlp.gate_proj": "colwise"})

    def failing_writer(tensors, file):
        raise OSError(28, "No space left on device (test)")

    try:
        fmodel.save(
            state, os.path.join(folder, "out"), safe_serialization=False, save_function=failing_writer
        )
    except OSError as exc:
        caught["writer"] = f"{type(exc).__name__}: {exc}"
    caught["after writer"] = str(sorted(os.listdir(folder)))
    dist.barrier()  # every rank has looked before rank 0 writes the file below
    blocker = os.path.join(folder, "a-file")
    if rank == 0:
        Path(blocker).write_text("not a folder")
    dist.barrier()
    try:
        fmodel.save(state, blocker)
    except CheckpointError as exc:
        caught["file"] = str(exc)
    return caught


def two_ranks(rank: int, world: int, big: str, cases, save_to: str, errors_path: str, folder: str) -> dict:
    """tests/test_distributed_io.py's 2-rank run: memory, loads and a save, errors."""
    return {
        "memory": check_memory(rank, world, big, cases[0][1]),
        "loads": check_loads(rank, world, cases, save_to),
        "errors": check_errors(rank, world, errors_path, folder),
    }


def four_ranks(rank: int, world: int, big: str, cases, save_to: str, gqa_4_2: str) -> dict:
    """The 4-rank run: memory, loads and a sharded save (an index), kv heads 4 ranks do not divide."""
    from fmodel.errors import PlanDivisibilityError

    out = {
        "memory": check_memory(rank, world, big, cases[0][1]),
        "loads": check_loads(rank, world, cases, save_to, max_shard_size="20KB"),
    }
    try:
        fmodel.load(gqa_4_2, mesh=_mesh(world))
    except PlanDivisibilityError as exc:
        out["heads"] = str(exc)
    return out
