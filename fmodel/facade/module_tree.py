"""Helpers for the facade's module tree: set and get a tensor by its dotted name (parameters
through `register_parameter`, which accelerate's `init_empty_weights` patches), and move hooks
from a module to its replacement."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["get_param", "move_hooks", "set_tensor"]


def set_tensor(
    root: nn.Module, dotted: str, value: torch.Tensor, *, parameter: bool, register: bool = True
) -> None:
    owner_name, _, leaf = dotted.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    if parameter:
        if register:
            owner._parameters.pop(leaf, None)
            owner.register_parameter(leaf, value)  # what init_empty_weights patches
        else:  # a tied alias: the very Parameter its source got
            owner._parameters[leaf] = value
    else:
        owner._buffers[leaf] = value


def get_param(root: nn.Module, dotted: str) -> nn.Parameter:
    owner_name, _, leaf = dotted.rpartition(".")
    return (root.get_submodule(owner_name) if owner_name else root)._parameters[leaf]


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def move_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give `new` the hook dicts of `old` (the same dict objects, so existing handles still
    remove them), plus attributes hooks recorded on it (e.g. memory-hook counters)."""
    for attr in _HOOK_DICTS:
        hooks = getattr(old, attr, None)
        if hooks:
            setattr(new, attr, hooks)
    for attr in ("mem_rss_pre_forward", "mem_rss_post_forward", "mem_rss_diff"):
        if attr in old.__dict__:
            new.__dict__[attr] = old.__dict__[attr]
