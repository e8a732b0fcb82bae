"""FSDP2 over a facade model: `torch.distributed.fsdp.fully_shard` per layer, then the root.

The facade's module tree holds the state's tensors as ordinary `nn.Parameter`s and its forward
runs that tree (forward hooks fire on each submodule), so `fully_shard` applies to it as to a
Transformers model: each layer of the model's layer stacks (`model.layers`, BERT's
`encoder.layer`, GPT-2's `h`, T5's encoder and decoder blocks) becomes a unit whose parameters
are gathered for its forward and backward, and the root holds the rest (embeddings, final norm,
head; a tied head stays one parameter). Gradient checkpointing
(`model.gradient_checkpointing_enable()`) recomputes a layer inside its own unit, which gathers
its parameters again for the recomputation. After sharding, `model.parameters()` are DTensors
(`Shard(0)` over the mesh) and `model.state` holds them; optimizers and
`torch.distributed.checkpoint.state_dict.get_state_dict` / `set_state_dict` take the model as it
is (see tests/test_distributed_facade.py for a resumed run).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ArgumentTypeError, InvalidArgumentError

__all__ = ["fully_shard_model", "layer_modules"]


def layer_modules(model: nn.Module) -> list[nn.Module]:
    """The layers of `model`'s layer stacks: the items of each `nn.ModuleList` not inside another
    one (a mixture of experts' expert list stays inside its layer), in module order."""
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"layer_modules: expected an nn.Module, got {type(model).__name__}")
    stacks: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not any(name.startswith(f"{s}.") for s in stacks):
            stacks.append(name)
    return [layer for name in stacks for layer in model.get_submodule(name)]


def fully_shard_model(model: nn.Module, mesh: Any = None, **fsdp_kwargs: Any) -> nn.Module:
    """Apply FSDP2's `fully_shard` to each layer of `model` (see `layer_modules`), then to
    `model` itself, with `mesh` (a 1-D `DeviceMesh`; None: torch's default over every rank) and
    `fsdp_kwargs` (`reshard_after_forward`, `mp_policy`, `offload_policy`) passed on to each
    call. Returns `model`, changed in place, as `fully_shard` does.

    Raises:
        ArgumentTypeError: `model` is not an nn.Module.
        InvalidArgumentError: `model` has no layer stack, or `mesh` is not 1-D.
    """
    from torch.distributed.fsdp import fully_shard

    layers = layer_modules(model)
    if not layers:
        raise InvalidArgumentError(
            f"fully_shard_model: {type(model).__name__} has no layer stack (nn.ModuleList) to shard by"
        )
    if mesh is not None and getattr(mesh, "ndim", 1) != 1:
        raise InvalidArgumentError(
            f"fully_shard_model: expected a 1-D device mesh, got {mesh.ndim} dimensions; pass mesh[name]"
        )
    for layer in layers:
        fully_shard(layer, mesh=mesh, **fsdp_kwargs)
    fully_shard(model, mesh=mesh, **fsdp_kwargs)
    return model
