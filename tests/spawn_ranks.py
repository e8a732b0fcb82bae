"""Running a function on N spawned gloo ranks (CPU), for the multi-process tests.

`spawn(target, tmp, *args, world=N)` starts N processes (the "spawn" start method: nothing of the
parent's state is inherited), each initialising a gloo process group over a file store in
`tmp`, running `target(rank, world, *args)` with one torch thread, and sending back its result
(pickled in the rank: a tensor sent as is would be shared through a file descriptor that dies
with the rank) or its traceback. The parent fails with the first rank's traceback, or with a
timeout instead of hanging, and always joins or kills every rank and destroys their groups.
`target` must be importable by name (a module-level function).
"""

from __future__ import annotations

import os
import pickle
import queue as queue_module
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_TIMEOUT = 120  # seconds for one spawned run


def _rank_main(target, rank: int, world: int, store: str, results, args) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        results.put((rank, True, pickle.dumps(target(rank, world, *args))))
    except BaseException:  # reported to the parent, which fails the test with it
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(target, tmp: Path, *args: Any, world: int, timeout: float = DEFAULT_TIMEOUT) -> list:
    """`target(rank, world, *args)` on `world` spawned gloo ranks; their results, by rank."""
    ctx = mp.get_context("spawn")
    results_queue = ctx.Queue()
    store = Path(tmp) / f"store-{os.urandom(4).hex()}"
    procs = [
        ctx.Process(target=_rank_main, args=(target, r, world, str(store), results_queue, args), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: list = [None] * world
    try:
        for _ in procs:
            try:
                rank, ok, payload = results_queue.get(timeout=timeout)
            except queue_module.Empty:
                raise AssertionError(f"{world} spawned ranks did not finish in {timeout} s") from None
            if not ok:
                raise AssertionError(f"rank {rank} failed:\n{payload}")
            results[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return results
