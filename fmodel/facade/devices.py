"""`DeviceMixin`: device/dtype properties, casts (refused for quantized models, `fmodel.to`'s rule)
and per-module device hooks for a model split by a `device_map`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .. import transforms
from ..errors import QuantizedDtypeError

if TYPE_CHECKING:
    from .model import PreTrainedModel

__all__ = ["DeviceMixin"]


class DeviceMixin:
    """Devices and dtypes; the host class provides `state`."""

    @property
    def device(self) -> torch.device:
        return self.state.device

    @property
    def dtype(self) -> torch.dtype:
        return self.state.dtype

    def _refuse_quantized_cast(self, call: str) -> None:
        if transforms.is_quantized(self.state):
            raise QuantizedDtypeError(
                f"{call}: cannot cast a quantized model to another dtype (its integer weights and "
                "scales only mean something as they are); move it with .to(device), or call "
                ".dequantize() first"
            )

    def half(self) -> PreTrainedModel:
        self._refuse_quantized_cast("half()")
        return super().half()

    def float(self) -> PreTrainedModel:
        self._refuse_quantized_cast("float()")
        return super().float()

    def bfloat16(self) -> PreTrainedModel:
        self._refuse_quantized_cast("bfloat16()")
        return super().bfloat16()

    def double(self) -> PreTrainedModel:
        self._refuse_quantized_cast("double()")
        return super().double()

    def to(self, *args: Any, **kwargs: Any) -> PreTrainedModel:
        """`nn.Module.to`; a dtype argument on a quantized model raises `QuantizedDtypeError`."""
        dtype = torch._C._nn._parse_to(*args, **kwargs)[1]
        if dtype is not None:
            self._refuse_quantized_cast(f"to({dtype})")
        return super().to(*args, **kwargs)

    def _add_device_hooks(self, device_map: dict[str, Any]) -> None:
        """Move each mapped module's tensor inputs to its device before it runs (what
        accelerate's dispatch hooks do), so a model split across devices runs as one."""
        for name, dev in device_map.items():
            if dev == "disk":
                continue
            module = self.get_submodule(name) if name else self
            target = torch.device(dev)

            def to_device(mod, args, kwargs, target=target):
                move = lambda x: x.to(target) if isinstance(x, torch.Tensor) else x  # noqa: E731
                return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}

            module.register_forward_pre_hook(to_device, with_kwargs=True)
