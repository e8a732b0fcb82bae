"""Fresh tensors following an architecture's init rules (used for allowed missing keys and `init`),
and the rules by which Transformers initialises a module (for `fmodel.transforms.hf_init`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator, Mapping, MutableMapping

import attrs
import torch
from torch import nn

__all__ = [
    "TRANSFORMERS_INIT",
    "Draw",
    "TransformersInit",
    "construction_draws",
    "draw_missing_as_transformers",
    "init_tensor",
    "init_weights_draws",
    "missing_keys_draws",
    "post_order",
    "run_draws",
    "transformers_rules",
]


def init_tensor(
    rule: str | tuple,
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype,
    std: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """A new CPU tensor for `rule`: "normal" (mean 0, `std`), ("normal", own_std),
    ("normal", own_std or None, padding_row) (an embedding whose padding row is zero, as
    Transformers initialises `nn.Embedding(padding_idx=...)`), "zeros" or "ones".

    Drawn in float32 from `generator` and then cast, so the values for a seed do not depend on `dtype`.
    """
    zero_row = None
    if isinstance(rule, tuple):
        rule, own_std, *rest = rule
        std = std if own_std is None else own_std
        zero_row = rest[0] if rest else None
    if rule == "zeros":
        return torch.zeros(shape, dtype=dtype)
    if rule == "ones":
        return torch.ones(shape, dtype=dtype)
    if rule == "normal":
        drawn = torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
        if zero_row is not None:
            drawn[zero_row] = 0.0
        return drawn.to(dtype)
    raise ValueError(f"unknown init rule {rule!r}; expected 'normal', 'zeros' or 'ones'")


# --------------------------------------------------------------------------- Transformers' rules


@attrs.frozen
class Draw:
    """One in-place initialisation step on the tensor `name`, as PyTorch or Transformers runs it.

    Attributes:
        name: dotted parameter name.
        op: "normal" (args: mean, std), "kaiming_uniform" (nn.Linear's weight init,
            a = sqrt(5)), "uniform" (args: low, high), "zeros", "ones", "fill" (args: value), or "zero_row"
            (args: row; an embedding's padding row). Only "normal", "kaiming_uniform" and
            "uniform" consume random numbers; "new" (args: shape) replaces the tensor by zeros
            of that shape (a module rebuilt by Transformers' prune step).
        args: the op's arguments.
    """

    name: str
    op: str
    args: tuple = ()


def run_draws(
    draws: list[Draw], tensors: MutableMapping[str, torch.Tensor], generator: torch.Generator | None
) -> None:
    """Apply `draws` in order, in place, to `tensors` (name -> tensor), drawing from `generator`
    (None: torch's default generator of each tensor's device). Each op is the very call PyTorch /
    Transformers makes, on a tensor of the same shape, dtype and device, so the numbers drawn and
    the generator's state afterwards are the same."""
    with torch.no_grad():
        for draw in draws:
            t = tensors[draw.name]
            if draw.op == "normal":
                t.normal_(*draw.args, generator=generator)
            elif draw.op == "kaiming_uniform":
                nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
            elif draw.op == "uniform":
                nn.init.uniform_(t, *draw.args, generator=generator)
            elif draw.op == "zeros":
                t.zero_()
            elif draw.op == "ones":
                t.fill_(1.0)
            elif draw.op == "fill":
                t.fill_(draw.args[0])
            elif draw.op == "zero_row":
                t[draw.args[0]].zero_()
            elif draw.op == "new":
                tensors[draw.name] = torch.zeros(draw.args[0], dtype=t.dtype, device=t.device)
            else:
                raise ValueError(f"unknown draw op {draw.op!r} for {draw.name!r}")


@attrs.frozen
class TransformersInit:
    """A family's Transformers `_init_weights(module)`, as its differences from the base rule of
    `PreTrainedModel._init_weights` (Linear: weight normal(0, initializer_range), bias zero;
    Embedding: the same, padding row zero; LayerNorm/RMSNorm: weight one, bias zero).

    Attributes:
        linear_like: skeleton class names treated as nn.Linear (GPT-2's `Conv1D`).
        zero_bias: skeleton class names whose own `bias` is zeroed (BERT's `BertLMPredictionHead`).
        scaled: config -> {parameter name relative to the module: std}: after a module's own
            rule, each such parameter it has is redrawn normal(0, std) (GPT-2's `c_proj.weight`,
            std / sqrt(2 * n_layer)).
        rebuilt_by_prune: layer index -> names (relative to the base model) of the modules the
            family's `prune_heads` replaces by new ones, in order; None when Transformers'
            family cannot prune (Llama, Qwen2, Mistral).
        norm_weight: what a LayerNorm/RMSNorm weight is set to, "ones" or "zeros" (Gemma's
            (1 + weight) norms: its `_init_weights` zeroes every "RMSNorm" after the base rule).
        module_rule: (module, name, config) -> draws: a family whose `_init_weights` shares
            nothing with the base rule (T5: per-class stds, nn.Linear untouched) gives it whole.
        construction: (skeleton, config) -> draws: the whole of `Arch(config)`'s draws, for a
            family whose construction the generic replay does not describe (T5: each stack is
            a `PreTrainedModel` initialised by its own `post_init` while the model is built).
    """

    linear_like: tuple[str, ...] = ()
    zero_bias: tuple[str, ...] = ()
    scaled: Callable[[object], Mapping[str, float]] = lambda config: {}
    rebuilt_by_prune: Callable[[int], tuple[str, ...]] | None = None
    norm_weight: str = "ones"
    module_rule: Callable[[nn.Module, str, object], list[Draw]] | None = None
    construction: Callable[[nn.Module, object], list[Draw]] | None = None


def _gpt2_scaled(config) -> dict[str, float]:
    return {"c_proj.weight": _std(config) / math.sqrt(2 * config.n_layer)}


# Per model_type; a family not listed follows PreTrainedModel's rule (Llama, Qwen2 and Mistral do).
TRANSFORMERS_INIT: dict[str, TransformersInit] = {
    "gpt2": TransformersInit(
        linear_like=("Conv1D",),
        scaled=_gpt2_scaled,
        rebuilt_by_prune=lambda i: (f"h.{i}.attn.c_attn", f"h.{i}.attn.c_proj"),
    ),
    "bert": TransformersInit(
        zero_bias=("BertLMPredictionHead",),
        rebuilt_by_prune=lambda i: tuple(
            f"encoder.layer.{i}.attention.{leaf}"
            for leaf in ("self.query", "self.key", "self.value", "output.dense")
        ),
    ),
    "gemma2": TransformersInit(norm_weight="zeros"),
    "gemma3_text": TransformersInit(norm_weight="zeros"),
}


def transformers_rules(model_type: str) -> TransformersInit:
    """The `_init_weights` rules of `model_type`'s Transformers family (PreTrainedModel's when
    the family adds none)."""
    return TRANSFORMERS_INIT.get(model_type, TransformersInit())


def _std(config) -> float:
    return getattr(config, "initializer_range", 0.02)


def _join(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


def construction_draws(module: nn.Module, name: str, *, bias_drawn: bool = True) -> list[Draw]:
    """What constructing `module` (one skeleton module, its own parameters only) draws in
    Transformers: nn.Linear's `reset_parameters` (kaiming-uniform weight, then a uniform bias
    unless `bias_drawn` is False, as for a bias Transformers assigns from elsewhere), nn.Embedding's
    (normal(0, 1), padding row zero), GPT-2's Conv1D (normal(0, 0.02)); norms and the rest draw
    nothing."""
    weight = _join(name, "weight")
    if isinstance(module, nn.Linear):
        draws = [Draw(weight, "kaiming_uniform")]
        if module.bias is not None and bias_drawn:
            fan_in = module.weight.shape[1]
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            draws.append(Draw(_join(name, "bias"), "uniform", (-bound, bound)))
        return draws
    if isinstance(module, nn.Embedding):
        draws = [Draw(weight, "normal", (0.0, 1.0))]
        if module.padding_idx is not None:
            draws.append(Draw(weight, "zero_row", (module.padding_idx,)))
        return draws
    if type(module).__name__ == "Conv1D":
        return [Draw(weight, "normal", (0.0, 0.02))]
    return []


def init_weights_draws(module: nn.Module, name: str, config, rules: TransformersInit) -> list[Draw]:
    """What the family's Transformers `_init_weights(module)` does to the skeleton module `module`
    (named `name` in the model), in order."""
    if rules.module_rule is not None:
        return rules.module_rule(module, name, config)
    std = _std(config)
    kind = type(module).__name__
    own = dict(module.named_parameters(recurse=False))
    draws: list[Draw] = []
    if isinstance(module, nn.Linear) or kind in rules.linear_like:
        draws.append(Draw(_join(name, "weight"), "normal", (0.0, std)))
        if own.get("bias") is not None:
            draws.append(Draw(_join(name, "bias"), "zeros"))
    elif isinstance(module, nn.Embedding):
        draws.append(Draw(_join(name, "weight"), "normal", (0.0, std)))
        if module.padding_idx is not None:
            draws.append(Draw(_join(name, "weight"), "zero_row", (module.padding_idx,)))
    elif "LayerNorm" in kind or "RMSNorm" in kind:
        if own.get("weight") is not None:
            draws.append(Draw(_join(name, "weight"), rules.norm_weight))
        if own.get("bias") is not None:
            draws.append(Draw(_join(name, "bias"), "zeros"))
    elif kind in rules.zero_bias and own.get("bias") is not None:
        draws.append(Draw(_join(name, "bias"), "zeros"))
    scaled = rules.scaled(config)
    if scaled:
        for leaf, _ in module.named_parameters():
            if leaf in scaled:
                draws.append(Draw(_join(name, leaf), "normal", (0.0, scaled[leaf])))
    return draws


def post_order(module: nn.Module, name: str = "", skip: str | None = None) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) as Transformers' `smart_apply` visits them: children first, then the module
    itself; the subtree called `skip` (if any) is left out."""
    for child_name, child in module.named_children():
        full = _join(name, child_name)
        if not (skip is not None and (full == skip or full.startswith(skip + "."))):
            yield from post_order(child, full, skip)
    yield name, module


def missing_keys_draws(
    module: nn.Module,
    config,
    rules: TransformersInit,
    missing: Collection[str],
    ties: Mapping[str, str],
) -> list[Draw]:
    """What Transformers 4.57's `from_pretrained` draws for the tensors `missing` (and those
    re-initialised for a size mismatch): `_initialize_missing_keys` runs `_init_weights` on every
    module it has not marked initialised, children first. The loaded tensors are still on the
    meta device then (draws on them consume no random numbers and are overwritten by the
    checkpoint), and construction drew nothing (`no_init_weights`), so the draws that count are
    the family rules' steps on the missing tensors, in module post-order: a missing tensor's
    module is never marked, nor are its ancestors (GPT-2's rule also redraws a child's
    `c_proj.weight`).

    Arguments:
        module: the architecture's skeleton (names as in the checkpoint).
        config: its config.
        rules: the family's rules (`transformers_rules`).
        missing: source names of the tensors the checkpoint did not provide (or provided at
            another shape).
        ties: alias -> source; a step on an alias acts on its source.

    Returns:
        The draws, in order (run them with `run_draws` on CPU tensors of the missing names).
    """
    missing = set(missing)
    draws: list[Draw] = []
    for name, sub in post_order(module):
        for draw in init_weights_draws(sub, name, config, rules):
            source = ties.get(draw.name, draw.name)
            if source in missing:
                draws.append(Draw(source, draw.op, draw.args))
    return draws


def draw_missing_as_transformers(
    module: nn.Module,
    config,
    model_type: str,
    missing: Mapping[str, tuple[int, ...]],
    ties: Mapping[str, str],
    dtype: torch.dtype,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """New CPU tensors for `missing` ({source name: shape}) drawn as Transformers 4.57's
    `from_pretrained` draws them (`missing_keys_draws`), in `dtype`, from `generator` (None:
    torch's global CPU generator, on purpose: the facade's `from_pretrained` parity).

    Returns:
        {name: tensor} for the missing tensors some rule initialises (the others are left out).
    """
    draws = missing_keys_draws(module, config, transformers_rules(model_type), missing, ties)
    tensors = {d.name: torch.empty(missing[d.name], dtype=dtype) for d in draws}
    run_draws(draws, tensors, generator)
    return tensors
