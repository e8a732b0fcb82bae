"""`AttentionMixin`: choosing the attention implementation and the faster paths
(BetterTransformer, kernels, compiled calls); switching is `fmodel.set_attn_implementation`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .. import attention, transforms
from ..errors import AttentionUnavailableError, InvalidArgumentError
from ..io.load import logger

if TYPE_CHECKING:
    from .model import PreTrainedModel

__all__ = ["AttentionMixin"]


class AttentionMixin:
    """Attention selection; the host class provides `_apply_transform`, `_attn_implementation`, `_tree`."""

    def set_attn_implementation(self, attn_implementation: str | dict[str, str]) -> None:
        """Switch every attention layer at once (a dict maps sub-model names to names; the
        families here have one model, so its single value, or the "" entry, is used)."""
        name = attn_implementation
        if isinstance(name, dict):
            values = set(name.values())
            if "" not in name and len(values) != 1:
                raise InvalidArgumentError(
                    f"set_attn_implementation: expected one implementation for this model, got {name}"
                )
            name = name.get("", next(iter(values)))
        self._apply_transform(transforms.set_attn_implementation, name)

    def get_correct_attn_implementation(self, requested: str | None, is_init_check: bool = False) -> str:
        """`requested` (default "sdpa") when it can run here; otherwise raises saying why."""
        name = requested or "sdpa"
        attention.get(name)
        return name

    def _can_set_attn_implementation(self) -> bool:
        return True

    def _check_can_dispatch(self, name: str) -> bool:
        attention.get(name)  # raises AttentionUnavailableError with the reason
        return True

    def _sdpa_can_dispatch(self, is_init_check: bool = False) -> bool:
        return self._check_can_dispatch("sdpa")

    def _flash_attn_2_can_dispatch(self, is_init_check: bool = False) -> bool:
        return self._check_can_dispatch("flash_attention_2")

    def _flash_attn_3_can_dispatch(self, is_init_check: bool = False) -> bool:
        return self._check_can_dispatch("flash_attention_3")

    def _flex_attn_can_dispatch(self, is_init_check: bool = False) -> bool:
        return self._check_can_dispatch("flex_attention")

    def to_bettertransformer(self) -> PreTrainedModel:
        """Switch to torch's fused attention (sdpa), which is what BetterTransformer provided;
        `reverse_bettertransformer` restores the previous implementation."""
        if "_pre_bettertransformer" in self.__dict__:
            raise InvalidArgumentError(
                "to_bettertransformer: the model is already using BetterTransformer (sdpa)"
            )
        previous = self._attn_implementation
        self.set_attn_implementation("sdpa")
        self.__dict__["_pre_bettertransformer"] = previous
        return self

    def reverse_bettertransformer(self) -> PreTrainedModel:
        if "_pre_bettertransformer" not in self.__dict__:
            raise InvalidArgumentError(
                "reverse_bettertransformer: to_bettertransformer was not called on this model"
            )
        self.set_attn_implementation(self.__dict__.pop("_pre_bettertransformer"))
        return self

    def kernelize(self) -> None:
        """Use the fastest attention kernel that runs here (flash-attention 3, then 2, on CUDA
        with the package installed; else sdpa). Warns when that is what the model already uses."""
        best = next(n for n in _KERNEL_PREFERENCE if _runs_here(n))
        if best == self._attn_implementation:
            logger.warning("kernelize: no faster kernel than %r is available here; nothing changed", best)
        else:
            self.__dict__.setdefault("_pre_kernelize", self._attn_implementation)
            self.set_attn_implementation(best)
        self.__dict__["_use_kernels"] = True

    @property
    def use_kernels(self) -> bool:
        return bool(self.__dict__.get("_use_kernels", False))

    @use_kernels.setter
    def use_kernels(self, value: bool) -> None:
        if value:
            if not self.use_kernels:
                self.kernelize()
            return
        previous = self.__dict__.pop("_pre_kernelize", None)
        if previous is not None:
            self.set_attn_implementation(previous)
        self.__dict__["_use_kernels"] = False

    def get_compiled_call(self, compile_config: Any = None):
        """`self.__call__` with the module tree run through `torch.compile(**compile_config)`
        (inputs, masks and outputs are handled outside the compiled region); cached until the
        config or the model's shapes change.
        `compile_config`: None, a dict of `torch.compile` arguments, or an object with `to_dict()`
        (Transformers' `CompileConfig`)."""
        options = _compile_options(compile_config)
        key = (id(self._tree), options)
        cached = self.__dict__.get("_compiled_call")
        if cached is None or cached[0] != key:
            compiled_tree = torch.compile(self._tree, **options)

            def compiled_call(*args: Any, **kwargs: Any):
                self.__dict__["_runner"] = compiled_tree
                try:
                    return self(*args, **kwargs)
                finally:
                    self.__dict__.pop("_runner", None)

            cached = (key, compiled_call)
            self.__dict__["_compiled_call"] = cached
        return cached[1]


def _runs_here(name: str) -> bool:
    try:
        attention.get(name)
    except AttentionUnavailableError:
        return False
    return True


_KERNEL_PREFERENCE = ("flash_attention_3", "flash_attention_2", "sdpa")
_COMPILE_KEYS = ("fullgraph", "dynamic", "backend", "mode", "options")


def _compile_options(compile_config: Any) -> dict[str, Any]:
    if compile_config is None:
        return {}
    if hasattr(compile_config, "to_dict"):
        compile_config = compile_config.to_dict()
    return {k: v for k, v in dict(compile_config).items() if k in _COMPILE_KEYS}
