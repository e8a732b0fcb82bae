"""`quantize` / `dequantize`: weight-only int8 and int4 quantization as pure state transforms.

The quantized weights are ordinary state entries (see `fmodel.models.quant_linear` for the
layout and the exact reference semantics), and what was quantized is recorded in the config's
`quantization_config` (saved in config.json), so a quantized state saves, loads, moves and
dequantizes as data. Loading such a checkpoint builds the quantized skeleton.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
from torch import nn

from .._checks import check_float_dtype, check_state, describe
from ..errors import ArgumentTypeError, InvalidArgumentError, QuantizationError
from ..models.quant_embedding import QuantEmbedding
from ..models.quant_linear import (
    QUANT_METHOD,
    Int4Linear,
    Int8Linear,
    Layout,
    check_activations,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantization_config,
)
from ..models.skeleton import skeleton
from ..state import ModelState
from ._common import spec_of
from .device import to

__all__ = ["SCHEMES", "dequantize", "is_quantized", "quantize"]

SCHEMES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)
_LAYER_PATH = re.compile(r"\.\d+\.")  # a module inside a layer stack (`model.layers.3.mlp.up_proj`)


def is_quantized(state: ModelState) -> bool:
    """True when `state` carries fmodel-quantized weights (its config has a `quantization_config`)."""
    return quantization_config(state.config) is not None


def quantize(
    state: ModelState,
    scheme: str,
    *,
    group_size: int = 128,
    skip: Iterable[str] | None = None,
    include_lm_head: bool = False,
    activations: str = "float",
) -> ModelState:
    """Weight-only quantization of the linear projections of the decoder layers.

    Which layers: every `nn.Linear` inside a layer stack (`...layers.N...`: attention q/k/v/o
    and MLP projections), plus the output projection with `include_lm_head=True`. Embeddings,
    norms, poolers and classifiers stay as they are; GPT-2's Conv1D layers are not linear
    modules and are not quantized. Biases stay floating.

    Schemes (reference semantics in `fmodel.models.quant_linear`):
        "int8": symmetric per output channel: `scale = max|W[o]| / 127`,
            `weight_int8 = round(W / scale)` in -127..127. Entries `<m>.weight_int8` [out, in]
            int8 and `<m>.weight_scale` [out] replace `<m>.weight`.
        "int4": asymmetric per group of `group_size` input columns (the last group may be
            shorter): `scale = (max - min) / 15`, `zero = min` (a float offset, as llama.cpp's
            Q4_1, so both ends of the range are exact), `q = clamp(round((W - min) / scale), 0, 15)`. Entries
            `<m>.weight_int4` [out, ceil(in / 2)] uint8 (two values per byte), `<m>.weight_scale`
            and `<m>.weight_zero` [out, ceil(in / group_size)] replace `<m>.weight`.
    Scales are kept in the weight's dtype, so the state's dtype stays the model's.

    The config gains `quantization_config`: {"quant_method": "fmodel", "scheme", "group_size"
    (None for int8), "modules": quantized module names, "skipped_modules": linear modules left
    floating, "activations"}. A tied output projection quantized with `include_lm_head` is untied first (the
    embeddings stay floating; `tie_word_embeddings` becomes false).

    Pure: `state` and its tensors are not modified; every tensor not quantized is shared.

    Arguments:
        state: an unquantized model.
        scheme: "int8" or "int4".
        group_size: int4 group width, one of 32, 64, 128 (ignored for int8).
        skip: regular expressions; a module whose name matches one (`re.search`) is left floating,
            e.g. `["mlp.down_proj", r"layers\\.0\\."]`.
        include_lm_head: quantize the output projection too (the largest matrix of a small
            model, so the biggest saving and speed-up; also the biggest accuracy cost).
        activations: "float" (default: float32 activations, weight-only products) or "int8"
            (activations rounded per block of 32 as llama.cpp's integer dot products do, see
            `fmodel.models.quant_linear.quantize_activations_q8`); recorded in the config.

    Returns:
        A new, quantized `ModelState`.

    Raises:
        ArgumentTypeError: `state` is not a `ModelState`, `scheme` not a str, `skip` not a list
            of str.
        QuantizationError: unknown scheme, group size not in (32, 64, 128), an already quantized
            state, a `skip` pattern that is no regular expression, or nothing to quantize.

    Example:
        >>> q = fmodel.quantize(state, "int4", group_size=64)
        >>> fmodel.forward(q, input_ids=ids).logits
    """
    check_state(state, "quantize(state)")
    if not isinstance(scheme, str):
        raise ArgumentTypeError(f"quantize(scheme) must be one of {list(SCHEMES)}, got {describe(scheme)}")
    if scheme not in SCHEMES:
        raise QuantizationError(f"quantize: unknown scheme {scheme!r}; expected one of {list(SCHEMES)}")
    if not isinstance(activations, str):
        raise ArgumentTypeError(
            f"quantize(activations) must be one of ['float', 'int8'], got {describe(activations)}"
        )
    try:
        check_activations(activations, "quantize(activations)")
    except InvalidArgumentError as exc:
        raise QuantizationError(str(exc)) from None
    if scheme == "int4" and (isinstance(group_size, bool) or group_size not in INT4_GROUP_SIZES):
        raise QuantizationError(
            f"quantize: group_size={group_size!r} is not supported for int4; use one of {list(INT4_GROUP_SIZES)}"
        )
    if is_quantized(state):
        raise QuantizationError(
            f"quantize: the state is already quantized ({dict(quantization_config(state.config))['scheme']}); "
            "call fmodel.dequantize first"
        )
    patterns = _skip_patterns(skip)
    spec = spec_of(state)
    head = spec.output_embeddings.rsplit(".", 1)[0] if spec.output_embeddings else None
    module = skeleton(state.config, state.architecture)
    chosen: list[str] = []
    skipped: list[str] = []
    for name, sub in module.named_modules():
        if not isinstance(sub, nn.Linear):
            continue
        wanted = bool(_LAYER_PATH.search(f".{name}.")) or (include_lm_head and name == head)
        if not wanted or any(p.search(name) for p in patterns) or sub.weight.numel() == 0:
            skipped.append(name)
        else:
            chosen.append(name)
    if not chosen:
        raise QuantizationError(
            f"quantize: {state.architecture} has no linear layer to quantize"
            f"{' after skip=' + repr(list(skip or ())) if skip else ''} (GPT-2's Conv1D layers are not supported)"
        )

    config, ties = state.config, dict(state.ties)
    untie = [
        alias
        for alias, source in ties.items()
        if alias.rsplit(".", 1)[0] in chosen or source.rsplit(".", 1)[0] in chosen
    ]
    for alias in untie:
        del ties[alias]
    if untie and hasattr(config, "tie_word_embeddings"):
        config = config.replace(tie_word_embeddings=False)
    removed: set[str] = set()
    added: dict[str, torch.Tensor] = {}
    for name in chosen:
        weight = state.params[f"{name}.weight"]
        removed.add(f"{name}.weight")
        if scheme == "int8":
            q, scale = _quantize_int8(weight)
            added.update({f"{name}.weight_int8": q, f"{name}.weight_scale": scale})
        else:
            packed, scale, zero = _quantize_int4(weight, group_size)
            added.update(
                {f"{name}.weight_int4": packed, f"{name}.weight_scale": scale, f"{name}.weight_zero": zero}
            )
    qc = {
        "quant_method": QUANT_METHOD,
        "scheme": scheme,
        "group_size": group_size if scheme == "int4" else None,
        "modules": chosen,
        "skipped_modules": skipped,
        "activations": activations,
    }
    config = config.replace(extra=config.extra | {"quantization_config": qc})
    added_by_module: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in added.items():
        added_by_module.setdefault(k.rsplit(".", 1)[0], {})[k] = v
    params = {}
    for n, t in state.params.items():  # each layer's new entries take its weight's place
        if n in removed:
            params.update(added_by_module.get(n.rsplit(".", 1)[0], {}))
        else:
            params[n] = t
    return state.replace(config=config, params=params, ties=ties)


def dequantize(state: ModelState, dtype: torch.dtype | str | None = None) -> ModelState:
    """Undo `quantize` (or a quantized GGUF load): each quantized module gets a floating
    `<m>.weight` again, equal to the reference dequantized value of its layout
    (`fmodel.models.quant_linear`: int8 per channel or per group, with or without a zero,
    int4 per group; quantized embeddings alike), not the original weight: quantization is
    lossy. The config loses its `quantization_config`. A tied output projection that
    `quantize` untied stays untied; one the record ties to a quantized embedding
    ("tied_modules") is tied again to the dequantized embedding (`tie_word_embeddings` true).

    Pure: `state` and its tensors are not modified; every other tensor is shared.

    Arguments:
        state: a quantized model.
        dtype: None keeps the model's dtype (`state.dtype`); otherwise the whole dequantized state is
            cast to `dtype` (as `fmodel.to(..., dtype=dtype)`).

    Returns:
        A new, unquantized `ModelState`.

    Raises:
        ArgumentTypeError: `state` is not a `ModelState`.
        InvalidArgumentError: `dtype` is not a floating dtype (int8, bool, ...).
        QuantizationError: the state is not quantized.

    Example:
        >>> float_again = fmodel.dequantize(fmodel.quantize(state, "int8"))
    """
    check_state(state, "dequantize(state)")
    check_float_dtype(dtype, "dequantize(dtype)")
    qc = quantization_config(state.config)
    if qc is None:
        raise QuantizationError(
            "dequantize: the state is not quantized (its config has no fmodel quantization_config)"
        )
    module = skeleton(state.config, state.architecture)
    p = state.params
    model_dtype = state.dtype  # not the scales' (a GGUF load keeps float16 block scales)
    restored: dict[str, torch.Tensor] = {}
    removed: set[str] = set()
    for name in qc["modules"]:
        layer = module.get_submodule(name)
        scale = p[f"{name}.weight_scale"]
        zero = p.get(f"{name}.weight_zero")
        if isinstance(layer, QuantEmbedding):
            layout, width = layer.layout, layer.embedding_dim
        elif isinstance(layer, (Int8Linear, Int4Linear)):
            layout = Layout(
                "int8" if isinstance(layer, Int8Linear) else "int4", layer.group_size, zero is not None
            )
            width = layer.in_features
        else:  # pragma: no cover - the skeleton is built from the same config
            raise QuantizationError(f"dequantize: {name!r} is not a quantized module")
        if layout.scheme == "int8":
            weight = dequantize_int8(p[f"{name}.weight_int8"], scale, zero, layout.group_size)
        else:
            weight = dequantize_int4(p[f"{name}.weight_int4"], scale, zero, width, layout.group_size)
        removed |= {f"{name}.{suffix}" for suffix in layout.entries()}
        restored[f"{name}.weight"] = weight.to(model_dtype)
    extra = {k: v for k, v in state.config.extra.items() if k != "quantization_config"}
    config = state.config.replace(extra=extra)
    ties = dict(state.ties)
    tied = qc.get("tied_modules") or {}
    if tied:  # the tie lived in the record: back to the architecture's declared tie
        config = config.replace(tie_word_embeddings=True)
        wanted = dict(spec_of(state).ties(config))
        for head, source in tied.items():
            alias = f"{head}.weight"
            if wanted.get(alias) != f"{source}.weight":
                raise QuantizationError(
                    f"dequantize: the record ties {head!r} to {source!r}, which {state.architecture} "
                    f"does not declare as a tie ({wanted})"
                )
            ties[alias] = f"{source}.weight"
    params = {}
    for n, t in state.params.items():
        if n in removed:
            key = n.rsplit(".", 1)[0] + ".weight"
            if key in restored and key not in params:
                params[key] = restored[key]
        else:
            params[n] = t
    for alias, source in ties.items():
        params[alias] = params[source]
    out = state.replace(config=config, params=params, ties=ties)
    return out if dtype is None else to(out, dtype=dtype)


def _skip_patterns(skip) -> list[re.Pattern]:
    if skip is None:
        return []
    if isinstance(skip, (str, bytes)) or not isinstance(skip, Iterable):
        raise ArgumentTypeError(
            f"quantize(skip) must be a list of regular expressions (str), got {describe(skip)}"
            + ("; wrap it in a list" if isinstance(skip, str) else "")
        )
    patterns = []
    for p in skip:
        if not isinstance(p, str):
            raise ArgumentTypeError(f"quantize(skip) must hold regular expressions (str), got {describe(p)}")
        try:
            patterns.append(re.compile(p))
        except re.error as err:
            raise QuantizationError(f"quantize(skip): {p!r} is not a regular expression ({err})") from None
    return patterns


# --------------------------------------------------------------------------- the math


def _quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight.detach().to(torch.float32)
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax)).to(weight.dtype)
    q = torch.round(w / scale.to(torch.float32)[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, in_features = weight.shape
    groups = math.ceil(in_features / group_size)
    w = weight.detach().to(torch.float32)
    w = torch.nn.functional.pad(w, (0, groups * group_size - in_features)).view(out, groups, group_size)
    low = w.amin(dim=-1)
    span = w.amax(dim=-1) - low
    scale = torch.where(span > 0, span / 15, torch.ones_like(span)).to(weight.dtype)
    minimum = low.to(weight.dtype)  # a float offset (as llama.cpp's Q4_1): min and max are exact
    s, m = scale.to(torch.float32), minimum.to(torch.float32)
    q = torch.round((w - m[..., None]) / s[..., None]).clamp_(0, 15)
    q = q.reshape(out, groups * group_size)[:, :in_features]
    return pack_int4(q), scale, minimum
