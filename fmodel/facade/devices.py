"""`DeviceMixin`: device/dtype properties, casts (refused for quantized models, `fmodel.to`'s rule)
and per-module device hooks for a model split by a `device_map`; `empty_state` and
`registers_on_meta` for models built inside accelerate's `init_empty_weights`.

Big-model inference with accelerate (`init_empty_weights`, `load_checkpoint_and_dispatch`,
`dispatch_model`, `cpu_offload`, `disk_offload`) needs nothing else from the facade: the module
tree holds the state's tensors as ordinary `nn.Parameter`s (installed with `register_parameter`,
which `init_empty_weights` patches), so accelerate's loader and hooks replace and move them as
on any module, and the forward runs that tree (the hooks fire). `model.state` then reads the
loaded tensors back; a tie whose two sides stopped being one tensor is left out of it, and
accelerate re-ties (`retie_parameters`) after loading and after attaching its hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import transforms
from ..errors import QuantizedDtypeError
from ..io.load import state_from_tensors
from ..models import get_spec
from ..models.skeleton import skeleton
from ..state import ModelState

if TYPE_CHECKING:
    from .model import PreTrainedModel

__all__ = ["DeviceMixin", "empty_state", "registers_on_meta"]


def registers_on_meta() -> bool:
    """Whether a parameter registered now lands on the meta device: True inside accelerate's
    `init_empty_weights` (it patches `nn.Module.register_parameter`) or `init_on_device("meta")`,
    where drawing initial weights would only allocate memory that is thrown away."""
    probe = nn.Module()
    probe.register_parameter("weight", nn.Parameter(torch.empty(0)))
    return probe.weight.device.type == "meta"


def empty_state(config, architecture: str, attn_implementation: str = "sdpa") -> ModelState:
    """The state of `architecture` for `config` with every parameter on the meta device (shapes
    and default dtypes, no values, no memory; ties declared as usual), and the buffers computed
    on the CPU as a fresh model's (rotary tables), as Transformers' model under
    `init_empty_weights` (which leaves buffers real by default).

    Raises:
        ConfigError: `architecture` does not belong to the config's model_type.
    """
    tied = set(dict(get_spec(architecture).ties(config)))
    params = {
        name: torch.empty(tuple(p.shape), dtype=p.dtype, device="meta")
        for name, p in skeleton(config, architecture).named_parameters(remove_duplicate=False)
        if name not in tied
    }
    state, _ = state_from_tensors(
        config,
        params,
        architecture=architecture,
        attn_implementation=attn_implementation,
        allow_missing=True,
        warn_missing=False,
        source="init_empty_weights",
    )
    return state



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
