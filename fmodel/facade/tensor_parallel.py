"""Transformers' tensor-parallel loading for the facade: `from_pretrained(path, tp_plan="auto")`.

As Transformers 4.57 (`modeling_utils.from_pretrained`, `integrations.tensor_parallel.
initialize_tensor_parallelism`): `tp_plan="auto"` (or a `distributed_config`) shards the model by
its family's plan over every rank; with no process group yet, one is started from torchrun's
environment (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`: gloo on CPU, nccl on CUDA, the rank's GPU made
current); `device_mesh` (1-D, or n-D with a "tp" dimension) names the ranks instead, `tp_size`
their number (it must be the world size: fmodel shards over every rank). Unlike 4.57, fmodel also
takes a plan as a dict (module pattern -> style, as the family's `tp_plan` in
`fmodel.distributed.plan`). The model's tensors are DTensors sharded by the plan
(`fmodel.load(path, mesh=)`: each rank reads its slices); `model.tp_size`, `model.tp_plan` and
`model._device_mesh` say how, as in Transformers, and `save_pretrained` from every rank writes
one ordinary checkpoint (`fmodel.save` of a distributed state: gathered, rank 0 writes).

A tensor-parallel model's parameters are the state's DTensors (each keeping how it was split,
`as_parameter`); its forward and generate run fmodel's tensor-parallel skeleton over the local
tensors (`fmodel.distributed.distribute`), not the facade's own module tree, so forward hooks
registered on its submodules do not fire, and training it (autograd through the collectives)
is not what this is for: train with FSDP2 (`fmodel.distributed.fsdp`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import attrs
import torch

from ..errors import ArgumentTypeError, DistributedError, InvalidArgumentError, MeshSizeError, PlanError

__all__ = [
    "TensorParallelMixin",
    "TensorParallelRequest",
    "as_parameter",
    "distributed_tensors",
    "keep_tensor_parallel",
    "mesh_device",
    "pop_tp_arguments",
    "record_tensor_parallel",
    "tensor_parallel_mesh",
]

_TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


@attrs.frozen
class TensorParallelRequest:
    """What `from_pretrained`'s tensor-parallel arguments ask for: the plan ("auto": the
    family's own, or a dict), the number of ranks and a mesh, each None when not given."""

    plan: Any
    tp_size: int | None
    device_mesh: Any

    @property
    def explicit_plan(self) -> Mapping[str, str] | None:
        return None if self.plan == "auto" else dict(self.plan)


def pop_tp_arguments(kwargs: dict[str, Any], device_map: Any, where: str) -> TensorParallelRequest | None:
    """Take `tp_plan`, `tp_size`, `device_mesh` and `distributed_config` out of `kwargs`; None
    when no tensor parallelism is asked for.

    Raises:
        PlanError: `tp_plan` is neither "auto" nor a dict of str -> str.
        InvalidArgumentError: `tp_size` or `device_mesh` without `tp_plan`, `tp_plan` with a
            `device_map` (Transformers: mutually exclusive), `tp_size` not a positive int.
    """
    plan = kwargs.pop("tp_plan", None)
    tp_size = kwargs.pop("tp_size", None)
    mesh = kwargs.pop("device_mesh", None)
    if kwargs.pop("distributed_config", None) is not None and plan is None:
        plan = "auto"  # as Transformers: a distributed_config means the model's own plan
    if plan is None:
        for name, value in (("tp_size", tp_size), ("device_mesh", mesh)):
            if value is not None:
                raise InvalidArgumentError(f"{where}: {name} is only used with tp_plan (pass tp_plan='auto')")
        return None
    if isinstance(plan, Mapping):
        bad = [(k, v) for k, v in plan.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise PlanError(
                f"{where}: tp_plan maps module patterns to style names (str -> str), got {bad[0]}"
            )
    elif plan != "auto":
        raise PlanError(
            f"{where}: tp_plan must be 'auto' (the family's plan) or a dict of module pattern -> style, "
            f"got {plan!r}"
        )
    if device_map is not None:
        raise InvalidArgumentError(
            f"{where}: tp_plan and device_map are mutually exclusive (each rank's device follows from "
            "the mesh); choose one"
        )
    if tp_size is not None and (isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1):
        raise InvalidArgumentError(f"{where}: tp_size must be a positive int, got {tp_size!r}")
    return TensorParallelRequest(plan, tp_size, mesh)


def tensor_parallel_mesh(request: TensorParallelRequest, where: str):
    """The 1-D device mesh to shard over: `request.device_mesh` (its "tp" dimension if n-D), else
    one over every rank, the process group started from torchrun's environment if none is.

    Raises:
        DistributedError: no process group and no torchrun environment to start one from.
        MeshSizeError: an n-D mesh without a "tp" dimension; `tp_size` other than the mesh's
            size or the world size.
        ArgumentTypeError: `device_mesh` is not a DeviceMesh.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    mesh = request.device_mesh
    if mesh is not None:
        if not isinstance(mesh, DeviceMesh):
            raise ArgumentTypeError(
                f"{where}: device_mesh must be a torch DeviceMesh, got {type(mesh).__name__}"
            )
        if mesh.ndim > 1:
            if "tp" not in (mesh.mesh_dim_names or ()):
                raise MeshSizeError(
                    f"{where}: an n-D device_mesh needs a 'tp' dimension to shard over, "
                    f"got dimensions {mesh.mesh_dim_names}"
                )
            mesh = mesh["tp"]
        if request.tp_size is not None and request.tp_size != mesh.size():
            raise MeshSizeError(
                f"{where}: tp_size={request.tp_size} but the device_mesh has {mesh.size()} ranks"
            )
        return mesh
    if not dist.is_available():
        raise DistributedError(f"{where}: tp_plan needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        missing = [name for name in _TORCHRUN_ENV if name not in os.environ]
        if missing:
            raise DistributedError(
                f"{where}: tp_plan needs a process group: launch with torchrun (it sets RANK, LOCAL_RANK "
                f"and WORLD_SIZE; {', '.join(missing)} unset here) or call "
                "torch.distributed.init_process_group first"
            )
        device_type = _accelerator_type()
        backend = {"cuda": "nccl", "xpu": "xccl"}.get(device_type, "gloo")
        dist.init_process_group(
            backend=backend, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"])
        )
    device_type = _process_group_device_type()
    if device_type != "cpu":
        getattr(torch, device_type).set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    world = dist.get_world_size()
    if request.tp_size is not None and request.tp_size != world:
        raise MeshSizeError(
            f"{where}: tp_size={request.tp_size} but the world has {world} ranks; fmodel shards over every "
            "rank (pass a device_mesh with a 'tp' dimension to shard over some of them)"
        )
    return init_device_mesh(device_type, (world,))


def as_parameter(tensor: torch.Tensor) -> torch.nn.Parameter:
    """`tensor` as the facade's parameter: itself if one already, else an `nn.Parameter` sharing
    its storage (requiring grad when floating). A DTensor of a distributed state keeps how it was
    split (`fmodel.distributed.plan.layout_of`, which `nn.Parameter`'s new object would not
    have): the parameter is a DTensor over the same local tensor, made by `plan.to_dtensor`."""
    if isinstance(tensor, torch.nn.Parameter):
        return tensor
    grad = tensor.is_floating_point()
    layout = _layout(tensor)
    if layout is None:
        return torch.nn.Parameter(tensor, requires_grad=grad)
    from ..distributed.plan import to_dtensor

    param = to_dtensor(tensor.to_local(), layout, tensor.device_mesh, tensor.shape).requires_grad_(grad)
    param._is_param = True  # what nn.Parameter does for a tensor subclass (a new object, here ours)
    return param


def keep_tensor_parallel(state, model: torch.nn.Module):
    """After `model` installed the tensors of `state`: the mesh of a tensor-parallel `state`
    (None for any other), its plan recorded for the model's own parameters too."""
    from ..distributed.distribute import mesh_of, register_plan, state_plan

    mesh = mesh_of(state)
    if mesh is not None:
        register_plan(model.state, state_plan(state))
    return mesh


def _layout(tensor: torch.Tensor):
    import sys

    module = sys.modules.get("torch.distributed.tensor")  # no DTensor exists before it is imported
    if module is None or not isinstance(tensor, module.DTensor):
        return None
    from ..distributed.plan import layout_of

    return layout_of(tensor)


def mesh_device(mesh) -> torch.device:
    """This rank's device on `mesh`: the CPU, or the current device of the mesh's accelerator."""
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, getattr(torch, mesh.device_type).current_device())


def record_tensor_parallel(model: torch.nn.Module, mesh, request: TensorParallelRequest) -> None:
    """What Transformers keeps on a tensor-parallel model: `_tp_size`, `_device_mesh`, `_tp_plan`."""
    plan = request.explicit_plan
    if plan is None:
        plan = family_plan(model)
    model.__dict__["_tp_size"] = mesh.size()
    model.__dict__["_device_mesh"] = mesh
    model.__dict__["_tp_plan"] = dict(plan)


def family_plan(model: torch.nn.Module) -> dict[str, str]:
    """The family's tensor-parallel plan for `model`'s config ({} for a family without one)."""
    from ..models import get_spec

    plan_of = getattr(get_spec(model._architecture), "tp_plan", None)
    return {} if plan_of is None else dict(plan_of(model._frozen_config))


class TensorParallelMixin:
    """Transformers' tensor-parallel attributes: `tp_size` (None unless sharded by `tp_plan`),
    `tp_plan` (the plan used, else the family's), `supports_tp_plan`."""

    @property
    def tp_size(self) -> int | None:
        return self.__dict__.get("_tp_size")

    @property
    def tp_plan(self) -> dict[str, str]:
        plan = self.__dict__.get("_tp_plan")
        return dict(plan) if plan is not None else family_plan(self)

    @property
    def supports_tp_plan(self) -> bool:
        return bool(family_plan(self))


def distributed_tensors(model: torch.nn.Module) -> bool:
    """Whether any parameter or buffer of `model` is a DTensor (tensor parallel or FSDP)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed
        return False
    return any(isinstance(t, DTensor) for t in (*model.parameters(), *model.buffers()))


def _accelerator_type() -> str:
    accelerator = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    return "cpu" if accelerator is None else accelerator.type


def _process_group_device_type() -> str:
    """The device the started process group's backend communicates on: gloo's CPU tensors, else
    the accelerator's."""
    import torch.distributed as dist

    return "cpu" if dist.get_backend() == "gloo" else _accelerator_type()
