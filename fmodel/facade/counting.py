"""`CountingMixin`: parameter counts, memory footprint, token and FLOP estimates, memory hooks
(Transformers' `ModuleUtilsMixin`), all computed by `fmodel.stats` on `self.state`."""

from __future__ import annotations

from typing import Any

from torch import nn

from .. import stats

__all__ = ["CountingMixin"]


class CountingMixin:
    """Counting methods; the host class provides `state`."""

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        return stats.num_parameters(
            self.state, only_trainable=only_trainable, exclude_embeddings=exclude_embeddings
        )

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        return stats.get_memory_footprint(self.state, return_buffers=return_buffers)

    def estimate_tokens(self, input_dict: dict[str, Any]) -> int:
        return stats.estimate_tokens(input_dict)

    def floating_point_ops(self, input_dict: dict[str, Any], exclude_embeddings: bool = True) -> int:
        return stats.floating_point_ops(self.state, input_dict, exclude_embeddings=exclude_embeddings)

    @staticmethod
    def _hook_rss_memory_pre_forward(module: nn.Module, *args: Any, **kwargs: Any) -> None:
        module.mem_rss_pre_forward = stats.current_rss()

    @staticmethod
    def _hook_rss_memory_post_forward(module: nn.Module, *args: Any, **kwargs: Any) -> None:
        module.mem_rss_post_forward = stats.current_rss()
        diff = module.mem_rss_post_forward - module.mem_rss_pre_forward
        module.mem_rss_diff = diff + getattr(module, "mem_rss_diff", 0)

    def add_memory_hooks(self) -> None:
        """Record each module's resident-memory increase over its forward in `mem_rss_diff`
        (bytes, accumulated; `reset_memory_hooks_state` zeroes it)."""
        for module in self.modules():
            module.register_forward_pre_hook(self._hook_rss_memory_pre_forward)
            module.register_forward_hook(self._hook_rss_memory_post_forward)
        self.reset_memory_hooks_state()

    def reset_memory_hooks_state(self) -> None:
        for module in self.modules():
            module.mem_rss_diff = 0
            module.mem_rss_post_forward = 0
            module.mem_rss_pre_forward = 0
