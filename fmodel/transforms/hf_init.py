"""Transformers' draws, replayed: fresh models and `_init_weights` that use random numbers
exactly as Transformers 4.57 does (vocabulary resizes: `hf_resize`).

Why a module of its own: fmodel's `init`, `init_weights` and `resize_token_embeddings` are pure
and seeded (a private generator per call; a seed fixes every value) and draw each tensor once,
in name order. Transformers draws differently, and from torch's global generator: constructing
a model runs every submodule's PyTorch default init (nn.Linear: kaiming-uniform weight and
uniform bias; nn.Embedding: normal(0, 1)), then `post_init` redraws each module by the family's
`_init_weights`, base model first (it is a `PreTrainedModel` of its own and runs its `post_init`
before the head's modules exist), then ties. Code
written against Transformers (`torch.manual_seed(0); AutoModelForCausalLM.from_config(cfg)`)
expects those very numbers, and the global generator left where Transformers leaves it.

The functions here replay that sequence of draws (same distributions, shapes, dtypes, devices
and order) on plain tensors, module order taken from fmodel's skeleton (the same as
Transformers' for every registered family; the parity tests check each). Each takes
`generator`: None means torch's default generator of the tensors' device. This module is the
one place in fmodel's core that consumes the global RNG, on purpose, for the facade's parity
with Transformers; pass a `torch.Generator` to keep a call pure.

A config that lists `pruned_heads` is replayed too for the families whose Transformers
classes prune at construction (GPT-2, BERT: the pruned layers are rebuilt, twice for a head
class); Transformers' Llama, Qwen2 and Mistral cannot be built from such a config (no
`_prune_heads`), so fmodel draws their pruned layers in the same order without a prune step.
`prune_heads` is `fmodel.prune_heads` plus the draws of the modules Transformers rebuilds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .._checks import check_state
from ..errors import FModelError, QuantizationError
from ..io.load import state_from_tensors
from ..models import get_spec
from ..models.init import (
    Draw,
    TransformersInit,
    construction_draws,
    init_weights_draws,
    post_order,
    run_draws,
    transformers_rules,
)
from ..models.quant_linear import quantization_config
from ..models.skeleton import skeleton
from ..state import ModelState
from ._common import spec_of, with_params
from .prune import _checked_request
from .prune import prune_heads as _pure_prune_heads

__all__ = ["init", "init_module", "init_weights", "prune_heads"]


def init(
    config,
    *,
    architecture: str | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    generator: torch.Generator | None = None,
) -> ModelState:
    """A new model whose tensors are those of Transformers' `XForY(config)` after the same seed.

    Replays construction (PyTorch default inits, module by module), the base model's `post_init`,
    the head's modules and its `post_init`, then ties; every draw is made in `dtype` on CPU (as
    Transformers under that default dtype). Tied aliases are drawn as their own tensor first,
    as Transformers does, then dropped for the source.

    Arguments:
        config: a model config.
        architecture: class name (default `architectures[0]` of the config, else the family's
            causal-LM class).
        dtype: floating dtype of the weights.
        generator: random source; None is torch's global CPU generator (so `torch.manual_seed(s)`
            gives Transformers' numbers and leaves the generator where Transformers does).

    Returns:
        A new state.

    Raises:
        QuantizationError: the config is quantized (Transformers builds full precision first).
        FModelError: the architecture has a module no Transformers init rule covers.

    Example:
        >>> torch.manual_seed(0)
        >>> state = hf_init.init(fmodel.LlamaConfig(hidden_size=64, num_hidden_layers=2,
        ...     num_attention_heads=4, intermediate_size=128, vocab_size=100))
    """
    from ..io.load import default_architecture

    architecture = architecture or default_architecture(config)
    if quantization_config(config) is not None:
        raise QuantizationError(
            f"hf_init: the config is quantized ({quantization_config(config)['scheme']}); build the "
            "model from the config without quantization_config, then quantize it (fmodel.quantize)"
        )
    spec = get_spec(architecture)
    assigned = _assigned_aliases(spec, config)
    draws, shapes = _construction_sequence(
        config, architecture, spec, transformers_rules(spec.model_type), assigned
    )
    draws = [_resolved(d, assigned) for d in draws]
    tensors = {}
    for name, shape in shapes.items():
        if name not in assigned:
            rule = spec.init_rule(name, config)
            rule = rule[0] if isinstance(rule, tuple) else rule
            fill = {"zeros": torch.zeros, "ones": torch.ones}.get(rule, torch.empty)
            tensors[name] = fill(shape, dtype=dtype)
    run_draws(draws, tensors, generator)
    drawn = {d.name for d in draws}
    undrawn = sorted(n for n in tensors if n not in drawn)
    if undrawn:
        raise FModelError(
            f"hf_init: no Transformers init rule covers {undrawn[:10]} of {architecture}; "
            "add the family's rule to fmodel.models.init.TRANSFORMERS_INIT"
        )
    late = set(spec.ties(config)) - set(assigned)  # tied by `tie_weights` at the end
    kept = {n: t for n, t in tensors.items() if n not in late}
    state, _ = state_from_tensors(
        config,
        kept,
        architecture=architecture,
        attn_implementation=attn_implementation,
        allow_missing=True,  # only the buffers, which draw nothing
        source="init",
        warn_missing=False,
    )
    return state


def _construction_sequence(config, architecture: str, spec, rules: TransformersInit, assigned) -> tuple:
    """(draws, {parameter: shape as first built}) of Transformers' `Arch(config)`: the base
    model's modules built, its `post_init` (prune, then `initialize_weights`), then the head's
    modules and the head's `post_init`, which prunes again: each pruned layer is rebuilt once
    more (a new, unmarked module: its default init draws, then `_init_weights` redraws it)."""
    module = skeleton(config, architecture)
    if rules.construction is not None:  # a family that describes its own construction (T5)
        shapes = {name: tuple(p.shape) for name, p in module.named_parameters(remove_duplicate=False)}
        return rules.construction(module, config), shapes
    pruned = [layer for layer, heads in config.pruned_heads.items() if heads]
    pruned = pruned if rules.rebuilt_by_prune is not None else []
    built = skeleton(config.replace(pruned_heads={}), architecture) if pruned else module
    prefix = "" if spec.is_base else spec.prefix
    if not spec.is_base and next(iter(module._modules), None) != spec.prefix:
        raise FModelError(
            f"hf_init: {architecture}'s first module is {next(iter(module._modules), None)!r}, expected "
            f"its base model {spec.prefix!r} (Transformers builds and initialises the base model first)"
        )
    rebuilt = [_join(prefix, rel) for layer in pruned for rel in rules.rebuilt_by_prune(layer)]
    base_built = built if spec.is_base else built.get_submodule(prefix)
    base = module if spec.is_base else module.get_submodule(prefix)
    draws = _constructed(base_built, prefix, assigned) + _rebuilt(module, rebuilt)
    draws += _initialized(base, prefix, config, rules)
    if not spec.is_base:
        fresh = set(rebuilt)
        draws += _constructed(module, "", assigned, skip=prefix) + _rebuilt(module, rebuilt)
        draws += [
            d
            for name, sub in post_order(module, "")
            if name in fresh or not _within(name, prefix)
            for d in init_weights_draws(sub, name, config, rules)
        ]
    shapes = {name: tuple(p.shape) for name, p in built.named_parameters(remove_duplicate=False)}
    return draws, shapes


def _rebuilt(module: nn.Module, names: list[str]) -> list[Draw]:
    """Transformers' prune step rebuilding the modules `names` at their pruned shapes (new
    tensors, then the new module's default-init draws; the kept values it copies in are
    redrawn by `initialize_weights` right after, so they are not replayed)."""
    draws: list[Draw] = []
    for name in names:
        sub = module.get_submodule(name)
        draws += [Draw(_join(name, leaf), "new", (tuple(p.shape),)) for leaf, p in sub.named_parameters()]
        draws += construction_draws(sub, name)
    return draws


def init_module(state: ModelState, name: str, *, generator: torch.Generator | None = None) -> ModelState:
    """Transformers' `model._init_weights(module)` for the module called `name` ("" for the
    root): its family rule applied to its own parameters (and, for GPT-2, its `c_proj.weight`).

    A tied alias is redrawn as its source (they are one tensor). Draws happen on each tensor's
    device, in its dtype.

    Arguments:
        state: the model (unchanged).
        name: dotted module name, as in `model.named_modules()`.
        generator: random source; None is torch's default generator of the tensors' device.

    Returns:
        A new state; the module's tensors are new, all others shared.

    Raises:
        AttributeError: `name` is not a module of the architecture.
    """
    spec = spec_of(state)
    module = skeleton(state.config, state.architecture).get_submodule(name)
    draws = init_weights_draws(module, name, state.config, transformers_rules(spec.model_type))
    return _run_on_state(state, draws, generator)


def init_weights(
    state: ModelState,
    uninitialized: Iterable[str] | Mapping[str, nn.Module | None] = (),
    *,
    generator: torch.Generator | None = None,
) -> ModelState:
    """Transformers' `model.init_weights()` on a built model: its prune step (GPT-2 and BERT
    rebuild each layer the config lists in `pruned_heads` as new modules, whose default inits
    draw), then `initialize_weights`: `_init_weights` on every module not marked initialised
    (those rebuilt, and `uninitialized`), children before parents, in module order. After
    construction or loading every module is marked, so without pruned heads nothing is drawn.

    Arguments:
        state: the model (unchanged).
        uninitialized: names of modules Transformers would not have marked initialised (e.g. the
            output projection a resize replaced: see `replaced_modules`), or a mapping from such
            names to the module a user put there (`set_input_embeddings(nn.Embedding(...))`):
            its own kind decides the rule (an embedding without `padding_idx` keeps its row
            0 drawn); None means the architecture's module.
        generator: random source; None is torch's default generator of the tensors' device.

    Returns:
        A new state (or `state` itself when nothing is drawn).
    """
    spec = spec_of(state)
    rules = transformers_rules(spec.model_type)
    module = skeleton(state.config, state.architecture)
    prefix = "" if spec.is_base else spec.prefix
    pruned = [layer for layer, heads in state.config.pruned_heads.items() if heads]
    pruned = pruned if rules.rebuilt_by_prune is not None else []
    rebuilt = [_join(prefix, rel) for layer in pruned for rel in rules.rebuilt_by_prune(layer)]
    given = dict(uninitialized) if isinstance(uninitialized, Mapping) else dict.fromkeys(uninitialized)
    fresh = set(rebuilt) | set(given)
    draws = _rebuilt(module, rebuilt) + [
        d
        for name, sub in post_order(module, "")
        if name in fresh
        for d in init_weights_draws(
            sub if given.get(name) is None else given[name], name, state.config, rules
        )
        if d.name in state.params  # a user's module may have a tensor fmodel did not take (a bias)
    ]
    return _run_on_state(state, draws, generator)


def prune_heads(
    state: ModelState,
    heads_to_prune: Mapping[int, Iterable[int]],
    *,
    generator: torch.Generator | None = None,
) -> ModelState:
    """`fmodel.prune_heads`, consuming random numbers as Transformers' `model.prune_heads` does.

    Transformers (GPT-2, BERT) rebuilds each attention projection of every layer listed with a
    non-empty head list as a new module (`prune_conv1d_layer` / `prune_linear_layer`), whose
    PyTorch default init draws (CPU, torch's default dtype) before the kept rows are copied in;
    a layer whose listed heads are all pruned already is rebuilt too. The kept values are the
    model's own, exactly as `fmodel.prune_heads` gives them: only the generator moves. Families
    Transformers cannot prune (Llama, Qwen2, Mistral) draw nothing.

    Arguments:
        state: the model (unchanged).
        heads_to_prune: {layer index: [head ids of the unpruned model]}.
        generator: random source; None is torch's global CPU generator.

    Returns:
        `fmodel.prune_heads(state, heads_to_prune)`.

    Raises:
        FModelError, ConfigError: as `fmodel.prune_heads`, before anything is drawn.
    """
    check_state(state, "prune_heads(state)")
    heads_to_prune = _checked_request(heads_to_prune)
    pruned = _pure_prune_heads(state, heads_to_prune)
    spec = spec_of(state)
    rules = transformers_rules(spec.model_type)
    if rules.rebuilt_by_prune is None:
        return pruned
    prefix = "" if spec.is_base else spec.prefix
    module = skeleton(pruned.config, pruned.architecture)
    draws: list[Draw] = []
    scratch: dict[str, torch.Tensor] = {}  # the new modules' tensors: drawn, then overwritten
    for layer, heads in heads_to_prune.items():
        for rel in rules.rebuilt_by_prune(layer) if heads else ():
            name = _join(prefix, rel)
            sub = module.get_submodule(name)
            for leaf, p in sub.named_parameters():
                scratch[_join(name, leaf)] = torch.empty(p.shape, dtype=torch.get_default_dtype())
            draws += construction_draws(sub, name)
    run_draws(draws, scratch, generator)
    return pruned


# --------------------------------------------------------------------------- helpers


def _assigned_aliases(spec, config) -> dict[str, str]:
    """Ties Transformers makes by assignment while building (BERT's decoder bias is the head's
    `bias`), as opposed to the output-embedding tie `tie_weights` makes at the end."""
    return {a: s for a, s in spec.ties(config).items() if a != spec.output_embeddings}


def _resolved(draw: Draw, aliases: dict[str, str]) -> Draw:
    source = aliases.get(draw.name)
    return draw if source is None else Draw(source, draw.op, draw.args)


def _join(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


def _within(name: str, skip: str | None) -> bool:
    return skip is not None and (name == skip or name.startswith(skip + "."))


def _constructed(
    root: nn.Module, prefix: str, assigned: dict[str, str], skip: str | None = None
) -> list[Draw]:
    """The default-init draws of building `root`'s modules, in construction (registration) order."""
    draws: list[Draw] = []
    for name, module in root.named_modules(prefix=prefix):
        if not _within(name, skip):
            bias = f"{name}.bias" if name else "bias"
            draws += construction_draws(module, name, bias_drawn=bias not in assigned)
    return draws


def _initialized(root: nn.Module, prefix: str, config, rules, skip: str | None = None) -> list[Draw]:
    """`post_init`'s `initialize_weights` over `root` (minus the already initialised `skip`)."""
    return [
        d
        for name, module in post_order(root, prefix, skip)
        for d in init_weights_draws(module, name, config, rules)
    ]


def _run_on_state(state: ModelState, draws: list[Draw], generator) -> ModelState:
    draws = [_resolved(d, dict(state.ties)) for d in draws]
    if not draws:
        return state
    work = {}
    for d in draws:
        if d.name not in work:
            work[d.name] = state.params[d.name].detach().clone()
    run_draws(draws, work, generator)
    return with_params(state, work)
