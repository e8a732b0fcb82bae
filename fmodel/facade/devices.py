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
from .arg_checks import check_to_arguments

if TYPE_CHECKING:
    from .model import PreTrainedModel

__all__ = ["DEVICE_MAP_STRATEGIES", "DeviceMixin", "empty_state", "registers_on_meta"]

# `device_map` strings that name a placement strategy rather than a device (Transformers').
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


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
        """`nn.Module.to`; a dtype argument on a quantized model raises `QuantizedDtypeError`.

        Raises:
            DeviceArgumentError: an unknown device or one not present here (a `RuntimeError`,
                as torch's).
            CastDtypeError: an integer or bool dtype (a `TypeError`, as `nn.Module.to`'s).
            QuantizedDtypeError: any dtype on a quantized model.
        """
        _, dtype = check_to_arguments(args, kwargs)
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

    def _infer_device_map(self, strategy: str, max_memory: dict | None) -> dict[str, Any] | None:
        """Transformers' `_get_device_map` for a strategy name (`device_map="auto"`, ...): the
        same accelerate calls on the same module sizes (`get_balanced_memory` unless
        "sequential", reserved but unused GPU memory added, the user's `max_memory` capping
        each device, `infer_auto_device_map` with `_no_split_modules`), so `hf_device_map` is
        Transformers' map. None when accelerate is not installed."""
        try:
            from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map
        except ImportError:
            return None
        kwargs = {"no_split_module_classes": self._no_split_modules}
        if strategy != "sequential":
            memory = get_balanced_memory(
                self, dtype=self.dtype, low_zero=strategy == "balanced_low_0", max_memory=max_memory, **kwargs
            )
        else:
            memory = get_max_memory(max_memory)
        for name in memory:
            if isinstance(name, int):
                memory[name] += torch.cuda.memory_reserved(name) - torch.cuda.memory_allocated(name)
            if max_memory is not None and name in max_memory:
                memory[name] = min(memory[name], max_memory[name])
        return dict(infer_auto_device_map(self, dtype=self.dtype, max_memory=memory, **kwargs))

    def _place_by_device_map(self, device_map: dict[str, Any]) -> None:
        """Put each module's tensors on its mapped device (`fmodel.place`: "disk" leaves them
        memory-mapped from the checkpoint) and hook the modules so inputs follow them; record
        `hf_device_map` as Transformers does."""
        self._install(transforms.place(self.state, device_map))
        self._add_device_hooks(device_map)
        self.hf_device_map = dict(device_map)
