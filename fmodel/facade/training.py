"""`TrainingMixin`: train/eval, gradient checkpointing and input-gradient hooks for the facade."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import InvalidArgumentError

if TYPE_CHECKING:
    from .model import PreTrainedModel

__all__ = ["TrainingMixin"]


class TrainingMixin:
    """Training switches; the host class provides `_tree` and `get_input_embeddings`."""

    def train(self, mode: bool = True) -> PreTrainedModel:
        super().train(mode)
        tree = self.__dict__.get("_tree")
        if tree is not None:
            tree.train(mode)
        return self

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(self.__dict__.get("_gradient_checkpointing", False))

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each layer's activations in the backward pass (training mode only).

        Always non-reentrant: Transformers' reentrant default gives no gradients when the
        embeddings are frozen; `use_reentrant=True` in the kwargs is therefore refused."""
        if (gradient_checkpointing_kwargs or {}).get("use_reentrant"):
            raise InvalidArgumentError(
                "fmodel checkpoints non-reentrantly only (reentrant loses gradients with frozen inputs)"
            )
        self.__dict__["_gradient_checkpointing"] = True

    def gradient_checkpointing_disable(self) -> None:
        self.__dict__["_gradient_checkpointing"] = False

    def enable_input_require_grads(self) -> None:
        """Make the input embeddings' output require grad (for adapters on a frozen base with
        gradient checkpointing), through a forward hook as Transformers does."""

        def hook(module, inputs, output):
            output.requires_grad_(True)

        self.__dict__["_require_grads_hook"] = self.get_input_embeddings().register_forward_hook(hook)

    def disable_input_require_grads(self) -> None:
        handle = self.__dict__.pop("_require_grads_hook", None)
        if handle is not None:
            handle.remove()
