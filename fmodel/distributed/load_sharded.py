"""`fmodel.load(path, mesh=mesh)`: a checkpoint straight into a distributed state, each rank
reading only its slices.

For safetensors checkpoints (one file or shards with an index; a folder or a hub id, as
`fmodel.load`) every rank opens the files' headers, builds the state's names, shapes and dtypes
on the meta device, and runs all of `fmodel.load`'s checks on them (`state_from_tensors`:
names, full shapes, dtypes, missing and unexpected tensors, each named) before any tensor data
is read. Then, per tensor, it reads what the plan gives it: for a sharded tensor only its
rank's blocks (the plan's `shard_slice`, one block per section of a packed tensor), read
with `os.preadv` from the offsets of the header safetensors has checked into a tensor of its
own (see `_Headers.blocks` for why not `get_slice`), and for a replicated tensor the whole
tensor, memory-mapped as `fmodel.load` keeps it. A whole sharded tensor is never read on any rank. The local tensors
become DTensors exactly as `fmodel.distribute` makes them (`fmodel.distributed.plan.to_dtensor`
with the plan's placement), so the result equals `fmodel.distribute(fmodel.load(path), mesh)`
tensor for tensor.

Tensors the load draws (`allow_missing`, `ignore_mismatched_sizes`) and the computed buffers
are made whole on each rank, as in `fmodel.load`, and then sliced (their values are seeded,
so every rank draws the same). GGUF files (dequantized as a whole) and pickle `.bin`
checkpoints (a pickle cannot be read in part) load whole on every rank and are then
distributed by `fmodel.distribute`.

Per-rank bytes (`loaded_bytes`): the sum over the state's distinct local tensors, which for a
safetensors checkpoint is exactly this rank's share of each sharded tensor plus every
replicated tensor (`expected_local_bytes`, arithmetic from the plan).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from collections.abc import Mapping
from typing import Any

import torch

from ..config import load_config
from ..errors import ArgumentTypeError, CheckpointError, MeshSizeError
from ..io.read import _check_index_against_shards, read_tensors
from ..io.resolve import resolve_checkpoint
from ..io.shard_index import read_weight_map
from ..models import get_spec
from ..state import ModelState
from .plan import local_shard, placement, shard_slice, to_dtensor

__all__ = ["expected_local_bytes", "load_distributed", "loaded_bytes", "mesh_world_rank"]

# safetensors' dtype names (the header's "dtype" field) -> torch
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "U16": getattr(torch, "uint16", None),
    "U32": getattr(torch, "uint32", None),
    "U64": getattr(torch, "uint64", None),
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
}


def mesh_world_rank(mesh, where: str = "load") -> tuple[int, int]:
    """(mesh size, this rank's index on it) of a 1-D `DeviceMesh` spanning every rank.

    Raises:
        ArgumentTypeError: `mesh` is not a DeviceMesh.
        MeshSizeError: `mesh` is not 1-D, or its size is not the process group's world size
            (named, with both sizes).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(mesh, DeviceMesh):
        raise ArgumentTypeError(
            f"{where}(mesh=...): expected a 1-D torch DeviceMesh (init_device_mesh('cpu', (world_size,))), "
            f"got {type(mesh).__name__}"
        )
    if mesh.ndim != 1:
        raise MeshSizeError(f"{where}(mesh=...): expected a 1-D device mesh, got {mesh.ndim} dimensions")
    world = mesh.size()
    if dist.is_initialized() and world != dist.get_world_size():
        raise MeshSizeError(
            f"{where}(mesh=...): the mesh has {world} rank(s) but the process group has world size "
            f"{dist.get_world_size()}; tensor parallelism here spans every rank"
        )
    return world, mesh.get_local_rank()


# -- reading headers ------------------------------------------------------------------------------


class _Headers:
    """The open safetensors files of a checkpoint: each tensor's full shape and stored dtype (as a
    meta tensor), its file, and the open handle to read slices from."""

    def __init__(self, files, stack: contextlib.ExitStack) -> None:
        from safetensors import safe_open

        self.meta: dict[str, torch.Tensor] = {}
        self.origin: dict[str, str] = {}
        self._handles: dict[str, Any] = {}
        self._offsets: dict[str, dict[str, int]] = {}
        for path in files.weights:
            try:
                handle = stack.enter_context(safe_open(path, framework="pt", device="cpu"))
                names = list(handle.keys())
                headers = {name: handle.get_slice(name) for name in names}
                shapes = {name: (tuple(s.get_shape()), s.get_dtype()) for name, s in headers.items()}
            except Exception as exc:  # OSError, ValueError, safetensors_rust.SafetensorError: all unreadable
                raise CheckpointError(
                    f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})"
                ) from None
            for name, (shape, dtype_name) in shapes.items():
                if name in self.meta:
                    raise CheckpointError(
                        f"tensor {name!r} appears in two shards: {self.origin[name]} and {path}"
                    )
                dtype = _SAFETENSORS_DTYPES.get(dtype_name)
                if dtype is None:
                    raise CheckpointError(
                        f"{path}: tensor {name!r} has dtype {dtype_name}, which torch cannot hold"
                    )
                self.meta[name] = torch.empty(shape, dtype=dtype, device="meta")
                self.origin[name] = path
                self._handles[name] = handle
        if files.index is not None:
            _check_index_against_shards(files.index, read_weight_map(files.index), self.origin)

    def whole(self, name: str) -> torch.Tensor:
        """The whole tensor, memory-mapped (as `fmodel.load` reads it)."""
        return self._handles[name].get_tensor(name)

    def blocks(self, name: str, dim: int, ranges: list[tuple[int, int]]) -> torch.Tensor:
        """The blocks `ranges` (start, stop) along `dim` of tensor `name`, concatenated along `dim`
        in that order, read from its file into a new tensor with `os.preadv`: exactly the
        blocks' bytes are read, nothing else of the tensor.

        Not `get_slice(name)[...]`: safetensors gives a block as a view of the file's memory map,
        so a copy of it maps every page it touches into the process (for a split on dim 1 of rows
        narrower than a page, every page of the tensor), counted in the rank's resident memory;
        read here, the bytes pass through the page cache only."""
        meta = self.meta[name]
        shape, itemsize = tuple(meta.shape), meta.element_size()
        begin = self._data_start(name)
        outer = math.prod(shape[:dim])
        inner = math.prod(shape[dim + 1 :]) * itemsize  # bytes of one index along dim
        width = sum(hi - lo for lo, hi in ranges)
        out = torch.empty((*shape[:dim], width, *shape[dim + 1 :]), dtype=meta.dtype)
        if out.numel() == 0:
            return out
        buffer = memoryview(out.view(-1).view(torch.uint8).numpy()).cast("B")
        with open(self.origin[name], "rb", buffering=0) as f:
            fd = f.fileno()
            for o in range(outer):
                at = o * width * inner
                for lo, hi in ranges:
                    _read_exactly(
                        fd, buffer[at : at + (hi - lo) * inner], begin + (o * shape[dim] + lo) * inner
                    )
                    at += (hi - lo) * inner
        return out

    def _data_start(self, name: str) -> int:
        """The file offset of tensor `name`'s first byte (the header, already checked by
        safetensors: 8 bytes of length, the JSON header, then the data)."""
        path = self.origin[name]
        if path not in self._offsets:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
            self._offsets[path] = {
                key: 8 + length + int(entry["data_offsets"][0])
                for key, entry in header.items()
                if key != "__metadata__"
            }
        return self._offsets[path][name]


def _read_exactly(fd: int, into: memoryview, offset: int) -> None:
    while len(into):
        n = os.preadv(fd, [into], offset)
        if n <= 0:
            raise CheckpointError(f"file descriptor {fd}: ended {len(into)} bytes early at offset {offset}")
        into, offset = into[n:], offset + n


# -- the distributed state ------------------------------------------------------------------------


def _convert(t: torch.Tensor, dtype: torch.dtype | None, device) -> torch.Tensor:
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if device is not None:
        t = t.to(device)
    return t


def _shard_read(
    headers: _Headers, ckpt: str, name: str, full: torch.Tensor, plan, world: int, rank: int, dtype, device
):
    """(local tensor, placement) of state tensor `name` stored as `ckpt`: its rank's blocks only."""
    p = placement(name, full.shape, plan)
    if p.dim is None:
        return _convert(headers.whole(ckpt), dtype, device), p
    index = shard_slice(name, full.shape, plan, world, rank)
    ranges = [(idx[p.dim].start, idx[p.dim].stop) for idx in index]
    return _convert(headers.blocks(ckpt, p.dim, ranges), dtype, device), p


def _distributed(
    state: ModelState,
    locals_: Mapping[str, tuple[torch.Tensor, Any]],
    mesh,
) -> ModelState:
    """`state` (full shapes) with each tensor replaced by the DTensor of its local tensor."""
    made: dict[int, torch.Tensor] = {}

    def build(name: str, t: torch.Tensor) -> torch.Tensor:
        if id(t) not in made:  # a tied alias is the very object of its source
            local, p = locals_[name]
            made[id(t)] = to_dtensor(local, p, mesh, t.shape)
        return made[id(t)]

    params = {name: build(name, t) for name, t in state.params.items()}
    buffers = {name: build(name, t) for name, t in state.buffers.items()}
    return state.replace(params=params, buffers=buffers)


def load_distributed(
    path_or_repo_id: str | os.PathLike,
    *,
    mesh,
    plan: Mapping[str, str] | None,
    revision=None,
    cache_dir=None,
    local_files_only=None,
    gguf_file=None,
    dtype=None,
    device=None,
    config=None,
    variant=None,
    **options: Any,
):
    """`fmodel.load_with_report` onto `mesh`: (distributed state, report). The arguments are
    those of `fmodel.load` (already checked by it); `plan` None: the architecture's own
    (`ArchSpec.tp_plan`). See the module docstring for what each rank reads.

    Raises:
        ArgumentTypeError: `mesh` is not a DeviceMesh, `plan` not a mapping.
        MeshSizeError: `mesh` is not 1-D or its size is not the world size.
        PlanError / PlanDivisibilityError: the plan does not fit the config (before any read).
        Every error of `fmodel.load`, on every rank, before any tensor data is read.
    """
    from ..io.load import _is_gguf, load_with_report, state_from_tensors
    from .distribute import distribute, register_plan

    world, rank = mesh_world_rank(mesh)
    if plan is not None and not isinstance(plan, Mapping):
        raise ArgumentTypeError(
            f"load(plan=...): expected a mapping of module pattern to style, got {type(plan).__name__}"
        )
    if gguf_file is not None or _is_gguf(path_or_repo_id):
        state, report = load_with_report(
            path_or_repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
            gguf_file=gguf_file, dtype=dtype, device=device, config=config, variant=variant, **options,
        )  # fmt: skip
        return distribute(state, mesh, plan), report
    files = resolve_checkpoint(
        path_or_repo_id,
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        variant=variant,
        require_config=config is None,
    )
    config = config if config is not None else load_config(files.config)
    common = dict(origin=None, source=files.source, **options)
    if files.format != "safetensors":  # a pickle is read whole
        tensors, origin = read_tensors(files)
        common["origin"] = origin
        state, report = state_from_tensors(config, tensors, dtype=dtype, device=device, **common)
        return distribute(state, mesh, plan), report

    with contextlib.ExitStack() as stack:
        headers = _Headers(files, stack)
        common["origin"] = headers.origin
        # Every check of fmodel.load on the full shapes and stored dtypes, nothing read yet: once
        # as asked (the dtype checks; the drawn tensors in the asked dtype), once without a dtype
        # change, where the state shares the meta tensors given and so names their checkpoint names.
        typed, report = state_from_tensors(config, headers.meta, dtype=dtype, **common)
        shared = typed if dtype is None else state_from_tensors(config, headers.meta, **common)[0]
        # fmodel.distribute's checks (mesh, plan keys and styles, heads / kv heads / FFN width
        # divisible by the mesh size, quantized or pruned states) on the meta state: nothing read yet
        distribute(typed, mesh, plan)
        spec = get_spec(typed.architecture)
        plan = dict(plan) if plan is not None else dict(spec.tp_plan(typed.config))
        by_id = {id(t): name for name, t in headers.meta.items()}
        typed_tensors = typed.tensors
        locals_: dict[str, tuple[torch.Tensor, Any]] = {}
        read: dict[int, tuple[torch.Tensor, Any]] = {}  # a tied alias is its source's object: read once
        tensors = shared.tensors
        # sources before aliases, as fmodel.distribute: a tie's placement is its source's
        names = [n for n in tensors if n not in shared.ties] + [n for n in tensors if n in shared.ties]
        for name in names:
            t = tensors[name]
            if id(t) in read:
                locals_[name] = read[id(t)]
                continue
            want = typed_tensors[name]
            if t.is_meta:
                target = want.dtype if t.is_floating_point() else None
                locals_[name] = _shard_read(headers, by_id[id(t)], name, t, plan, world, rank, target, device)
            else:  # drawn or computed: whole on every rank, then its slice
                p = placement(name, want.shape, plan)
                local = local_shard(want, name, plan, world, rank)
                if p.dim is not None:
                    local = local.clone(memory_format=torch.contiguous_format)
                locals_[name] = (_convert(local, None, device), p)
            read[id(t)] = locals_[name]
        for alias, src in shared.ties.items():
            locals_[alias] = locals_[src]
        out = _distributed(typed, locals_, mesh)
        register_plan(out, plan)
        return out, report


# -- bytes ---------------------------------------------------------------------------------------


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def loaded_bytes(state: ModelState) -> int:
    """Bytes of this rank's local tensors, each distinct tensor once (a tied alias shares its source)."""
    seen: dict[int, torch.Tensor] = {}
    for t in state.tensors.values():
        seen.setdefault(id(t), t)
    return sum(_local(t).numel() * _local(t).element_size() for t in seen.values())


def expected_local_bytes(state: ModelState, plan: Mapping[str, str], world: int, rank: int) -> dict[str, int]:
    """What rank `rank` holds of `state`'s tensors under `plan`, by arithmetic on full shapes:
    {"sharded": its blocks of the sharded tensors, "replicated": the replicated tensors,
    "full_sharded": the sharded tensors whole}; each distinct tensor once."""
    out = {"sharded": 0, "replicated": 0, "full_sharded": 0}
    seen: set[int] = set()
    for name, t in state.tensors.items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        shape = tuple(t.shape)
        p = placement(name, shape, plan)
        itemsize = t.element_size()
        numel = 1
        for s in shape:
            numel *= s
        if p.dim is None:
            out["replicated"] += numel * itemsize
        else:
            local = 1
            for s in p.local_shape(shape, world, rank):
                local *= s
            out["sharded"] += local * itemsize
            out["full_sharded"] += numel * itemsize
    return out
