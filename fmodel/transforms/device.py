"""`to`: move a state to a device and/or cast its floating tensors; `place`: per-module devices."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .._checks import check_device, check_float_dtype, check_state
from ..errors import ArgumentTypeError, InvalidArgumentError, QuantizedDtypeError
from ..models.quant_linear import quantization_config
from ..state import ModelState
from ._common import spec_of

__all__ = ["place", "to"]


def to(
    state: ModelState, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None
) -> ModelState:
    """Move tensors to `device` and cast floating parameters and buffers to `dtype`.

    Integer buffers keep their dtype; buffers computed from the config (rotary frequencies)
    stay float32 for precision. Ties hold: each tied tensor is converted once and every
    alias points at the result.

    Raises:
        ArgumentTypeError: `state` is not a `ModelState`, or `device` / `dtype` of the wrong type.
        InvalidArgumentError: `dtype` is not a floating dtype (int8, bool, ...), or `device` is
            not one torch knows or that exists here ("nodevice", cuda without a GPU).
        QuantizedDtypeError: `dtype` is given and the state is quantized (a device move is fine).

    Returns:
        `state` itself when nothing would change, else a new state (tensors already on the
        device and dtype are shared).

    Example:
        >>> half = fmodel.to(state, dtype=torch.bfloat16)
    """
    check_state(state, "to(state)")
    target = check_float_dtype(dtype, "to(dtype)")
    device = check_device(device, "to(device)")
    if target is not None and quantization_config(state.config) is not None:
        raise QuantizedDtypeError(
            f"to: cannot cast a quantized model ({quantization_config(state.config)['scheme']}) to {target}: "
            "its integer weights and scales only mean something as they are. Move it with "
            "fmodel.to(state, device=...) (no dtype), or fmodel.dequantize(state, dtype=...) first"
        )
    computed = set(spec_of(state).computed_buffers(state.config, "meta"))
    converted: dict[int, torch.Tensor] = {}

    def convert(name: str, t: torch.Tensor) -> torch.Tensor:
        if id(t) in converted:
            return converted[id(t)]
        new = t
        if target is not None and t.is_floating_point() and t.dtype != target and name not in computed:
            new = new.to(target)
        if device is not None and new.device != device:
            new = new.to(device)
        converted[id(t)] = new
        return new

    params = {name: convert(name, t) for name, t in state.params.items()}
    buffers = {name: convert(name, t) for name, t in state.buffers.items()}
    if all(params[n] is state.params[n] for n in params) and all(
        buffers[n] is state.buffers[n] for n in buffers
    ):
        return state
    return state.replace(params=params, buffers=buffers)


def place(state: ModelState, device_map: Mapping[str, torch.device | str | int]) -> ModelState:
    """Put each tensor on the device its module is mapped to (Transformers' `device_map` dict).

    `device_map` maps module names (prefixes of tensor names, "" for everything) to a device;
    the longest matching prefix wins. "disk" leaves a tensor where it is: tensors fmodel loads
    are memory-mapped from the checkpoint, so they stay on disk until touched. A tied alias
    follows its source.

    Raises:
        ArgumentTypeError: `device_map` is not a mapping of str to devices.
        InvalidArgumentError: (a ValueError) a tensor no entry covers (names the first few), or a
            device torch rejects or that does not exist here.
    """
    check_state(state, "place(state)")
    if not isinstance(device_map, Mapping):
        raise ArgumentTypeError(
            f"device_map must be a mapping {{module name: device}}, got {type(device_map).__name__}"
        )
    resolved = {}
    for prefix, dev in device_map.items():
        if not isinstance(prefix, str):
            raise ArgumentTypeError(f"device_map keys must be module names (str), got {prefix!r:.60}")
        resolved[prefix] = (
            None if dev == "disk" else check_device(dev, f"device_map[{prefix!r}]", allow_none=False)
        )
    entries = sorted(resolved.items(), key=lambda kv: len(kv[0]), reverse=True)

    def device_for(name: str):
        for prefix, dev in entries:
            if prefix == "" or name == prefix or name.startswith(prefix + "."):
                return dev
        return _UNMAPPED

    names = [*state.params, *state.buffers]
    unmapped = [n for n in names if n not in state.ties and device_for(n) is _UNMAPPED]
    if unmapped:
        raise InvalidArgumentError(
            f"device_map does not cover {len(unmapped)} tensor(s), e.g. {unmapped[:5]}; "
            'add their modules (or "" for the rest)'
        )

    def move(t: torch.Tensor, name: str) -> torch.Tensor:
        dev = device_for(name)
        return t if dev is None or t.device == dev else t.to(dev)

    params = {n: move(t, n) for n, t in state.params.items() if n not in state.ties}
    params.update({alias: params[src] for alias, src in state.ties.items()})
    buffers = {n: move(t, n) for n, t in state.buffers.items()}
    return state.replace(params=params, buffers=buffers)


_UNMAPPED = object()
