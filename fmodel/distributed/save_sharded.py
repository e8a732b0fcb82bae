"""`fmodel.save` of a distributed state: an ordinary Hugging Face checkpoint, one writer.

Called by every rank of the state's mesh (the tensors are gathered by collectives). The order:

1. every rank checks the arguments (`check_save_arguments`) and the ranks exchange the outcome,
   so a bad argument seen on any rank is raised on every rank before any gather;
2. each sharded tensor is gathered in checkpoint order (`fmodel.distributed.plan.full_tensor`:
   an all-gather, a packed tensor's blocks put back into its sections' order), one tensor at a
   time, in the same (sorted) order on every rank; rank 0 of the mesh keeps it (on CPU), the
   others drop it at once;
3. rank 0 writes the whole state with `fmodel.save` (the same files, sharding, index, config
   and crash safety: a temporary folder swapped in atomically, `fmodel.io.atomic`);
4. rank 0 broadcasts the outcome: every rank returns after the write is complete (the
   broadcast is the barrier), and an error of the writer is raised on every rank (the same
   exception where it can be pickled, else a `DistributedError` with its message), so no
   rank waits forever on a writer that failed.

Why gather to one writer rather than have each rank write its shards: a Hugging Face
checkpoint holds whole tensors, so rank-local shard files would not be one (Transformers and a
single process could not read them), and files written by several ranks into one folder would
need a shared temporary folder, per-rank fsyncs and an agreed index before the one atomic
swap, all over a filesystem every rank sees. One writer keeps the whole of `fmodel.save`'s
guarantee as it is. The cost is memory on the writer: the full state (on CPU) while it writes,
and on every rank one full tensor at a time during the gather.
"""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import DistributedError
from ..state import ModelState
from .plan import full_tensor

__all__ = ["is_distributed", "save_distributed", "state_mesh"]


def _is_dtensor(t: object) -> bool:
    module = sys.modules.get("torch.distributed.tensor")  # no DTensor exists before it is imported
    return module is not None and isinstance(t, module.DTensor)


def is_distributed(state: ModelState, tensors: Mapping[str, torch.Tensor] | None = None) -> bool:
    """Whether `state` (or the `tensors` given to save instead) holds a DTensor."""
    values = list(state.params.values()) + list(state.buffers.values())
    if tensors is not None:
        values += list(tensors.values())
    return any(_is_dtensor(t) for t in values)


def state_mesh(state: ModelState, tensors: Mapping[str, torch.Tensor] | None = None):
    """The one device mesh of the state's DTensors.

    Raises:
        DistributedError: DTensors on different meshes.
    """
    meshes = []
    values = list(state.params.values()) + list(state.buffers.values()) + list((tensors or {}).values())
    for t in values:
        if _is_dtensor(t) and not any(t.device_mesh is m or t.device_mesh == m for m in meshes):
            meshes.append(t.device_mesh)
    if len(meshes) != 1:
        raise DistributedError(
            f"save: the state's DTensors lie on {len(meshes)} different device meshes; expected one"
        )
    return meshes[0]


def _exchange_errors(error: BaseException | None, group) -> None:
    """All ranks learn whether any rank failed; each failing rank raises its own error, the
    others a DistributedError naming the first failed rank and its message."""
    import torch.distributed as dist

    outcomes: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(
        outcomes, None if error is None else f"{type(error).__name__}: {error}", group=group
    )
    if error is not None:
        raise error
    for rank, message in enumerate(outcomes):
        if message is not None:
            raise DistributedError(f"save: rank {rank} of the mesh refused the arguments: {message}")


def _picklable(error: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # an exception that does not survive pickling is sent as its message
        return DistributedError(
            f"save: the writer (rank 0 of the mesh) failed: {type(error).__name__}: {error}"
        )


def save_distributed(state: ModelState, directory: str | os.PathLike, **options: Any) -> str:
    """`fmodel.save(state, directory, **options)` for a state holding DTensors; call it on every
    rank of the mesh. Returns the directory (absolute) on every rank once it is written.

    Raises:
        the errors of `fmodel.save`, on every rank (see the module docstring);
        DistributedError: the state's DTensors lie on several meshes, or another rank failed.
    """
    import torch.distributed as dist

    from ..io.save import save
    from ..io.save_args import check_save_arguments

    mesh = state_mesh(state, options.get("tensors"))
    group = mesh.get_group()
    writer = mesh.get_local_rank() == 0
    error: BaseException | None = None
    try:
        checks = {k: options.get(k) for k in ("max_shard_size", "variant", "tensors", "save_function")}
        checks.update({k: options.get(k) for k in ("generation_config", "model_card")})
        checks["max_shard_size"] = options.get("max_shard_size", "5GB")
        check_save_arguments(state, directory, **checks)
    except Exception as exc:  # raised on every rank after the exchange, never a hang
        error = exc
    _exchange_errors(error, group)

    def gather(mapping: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        done: dict[int, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}
        for name in sorted(mapping):
            t = mapping[name]
            if id(t) not in done:  # a tied alias is gathered once, with its source
                full = full_tensor(t).detach() if _is_dtensor(t) else t
                done[id(t)] = full.cpu() if writer else None  # dropped at once on the other ranks
                del full
            if writer:
                out[name] = done[id(t)]
        return out

    params = gather(state.params)
    buffers = gather(state.buffers)
    given = options.get("tensors")
    if given is not None:
        options = {**options, "tensors": gather(given)}
    outcome: list[Any] = [None]
    if writer:
        try:
            full = state.replace(params=_retie(state, params), buffers=buffers)
            outcome[0] = ("ok", save(full, directory, **options))
        except Exception as exc:
            outcome[0] = ("error", _picklable(exc))
    del params, buffers
    dist.broadcast_object_list(outcome, group_src=0, group=group)
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


def _retie(state: ModelState, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tied alias the very object of its source (as ModelState requires)."""
    out = dict(params)
    for alias, src in state.ties.items():
        out[alias] = out[src]
    return out
