"""Transformers' draws, replayed: fresh models, `_init_weights` and vocabulary resizes that use
random numbers exactly as Transformers 4.57 does.

Why a module of its own: fmodel's `init`, `init_weights` and `resize_token_embeddings` are pure
and seeded (a private generator per call; a seed fixes every value) and draw each tensor once,
in name order. Transformers draws differently, and from torch's global generator: constructing
a model runs every submodule's PyTorch default init (nn.Linear: kaiming-uniform weight and
uniform bias; nn.Embedding: normal(0, 1)), then `post_init` redraws each module by the family's
`_init_weights`, base model first (it is a `PreTrainedModel` of its own and runs its `post_init`
before the head's modules exist), then ties. A resize builds a new nn.Embedding / nn.Linear
(whose default init draws), redraws it or samples mean rows, then copies the old rows. Code
written against Transformers (`torch.manual_seed(0); AutoModelForCausalLM.from_config(cfg)`)
expects those very numbers, and the global generator left where Transformers leaves it.

The functions here replay that sequence of draws (same distributions, shapes, dtypes, devices
and order) on plain tensors, module order taken from fmodel's skeleton (the same as
Transformers' for every registered family; the parity tests check each). Each takes
`generator`: None means torch's default generator of the tensors' device. This module is the
one place in fmodel's core that consumes the global RNG, on purpose, for the facade's parity
with Transformers; pass a `torch.Generator` to keep a call pure.

Not replayed: the draws of Transformers' prune step for a config that already lists
`pruned_heads` (it rebuilds the pruned layers, which draws again); such configs get the same
distributions, not the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import constraints

from ..errors import FModelError
from ..io.load import state_from_tensors
from ..models import get_spec
from ..models.init import (
    TRANSFORMERS_INIT,
    Draw,
    TransformersInit,
    construction_draws,
    init_weights_draws,
    run_draws,
)
from ..models.skeleton import _SkipInit, skeleton
from ..state import ModelState
from ._common import spec_of, with_params

__all__ = ["init", "init_module", "initialize_modules", "replaced_modules", "resize_token_embeddings"]


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

    Example:
        >>> torch.manual_seed(0)
        >>> state = hf_init.init(fmodel.LlamaConfig(hidden_size=64, num_hidden_layers=2,
        ...     num_attention_heads=4, intermediate_size=128, vocab_size=100))
    """
    from ..io.load import default_architecture

    architecture = architecture or default_architecture(config)
    spec = get_spec(architecture)
    module = skeleton(config, architecture)
    rules = _rules(spec)
    assigned = _assigned_aliases(spec, config)
    if spec.is_base:
        draws = _constructed(module, "", assigned) + _initialized(module, "", config, rules)
    else:
        first = next(iter(module._modules), None)
        if first != spec.prefix:
            raise FModelError(
                f"hf_init: {architecture}'s first module is {first!r}, expected its base model "
                f"{spec.prefix!r} (Transformers builds and initialises the base model first)"
            )
        base = module.get_submodule(spec.prefix)
        draws = (
            _constructed(base, spec.prefix, assigned)
            + _initialized(base, spec.prefix, config, rules)
            + _constructed(module, "", assigned, skip=spec.prefix)
            + _initialized(module, "", config, rules, skip=spec.prefix)
        )
    draws = [_resolved(d, assigned) for d in draws]
    tensors = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if name not in assigned:
            rule = spec.init_rule(name, config)
            rule = rule[0] if isinstance(rule, tuple) else rule
            fill = {"zeros": torch.zeros, "ones": torch.ones}.get(rule, torch.empty)
            tensors[name] = fill(tuple(param.shape), dtype=dtype)
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
    draws = init_weights_draws(module, name, state.config, _rules(spec))
    return _run_on_state(state, draws, generator)


def initialize_modules(
    state: ModelState, names: Iterable[str], *, generator: torch.Generator | None = None
) -> ModelState:
    """Transformers' `initialize_weights()` when only the modules `names` are not yet marked
    initialised: `_init_weights` on each of them, children before parents, in module order.

    Returns:
        A new state (or `state` itself when `names` is empty).
    """
    wanted = set(names)
    if not wanted:
        return state
    module = skeleton(state.config, state.architecture)
    rules = _rules(spec_of(state))
    draws = [
        d
        for sub_name, sub in _post_order(module, "")
        if sub_name in wanted
        for d in init_weights_draws(sub, sub_name, state.config, rules)
    ]
    return _run_on_state(state, draws, generator)


def resize_token_embeddings(
    state: ModelState,
    new_num_tokens: int | None = None,
    *,
    pad_to_multiple_of: int | None = None,
    mean_resizing: bool = True,
    generator: torch.Generator | None = None,
) -> ModelState:
    """Transformers' `resize_token_embeddings`, number for number.

    The new embedding matrix is a new nn.Embedding's (its normal(0, 1) init drawn), then, when
    growing, either redrawn by the family's `_init_weights` (`mean_resizing=False`) or given
    added rows sampled around the old rows' mean with 1e-9 x their covariance (the mean alone
    when that covariance is not positive definite: no draw); then the old rows are copied in.
    An untied output projection (by `config.tie_word_embeddings`, as Transformers decides) is
    then rebuilt the same way as a new nn.Linear (kaiming init drawn, and its bias, if any);
    a tied one follows the embeddings, its bias (BERT) zero-padded or cut. Shrinking draws too
    (the new modules' default inits). `config.vocab_size` becomes the new size.

    Arguments:
        state: the model (unchanged).
        new_num_tokens: the vocabulary size; None keeps it (only padding applies).
        pad_to_multiple_of: round the size up to a multiple of this.
        mean_resizing: sample added rows around the old rows' mean (True) or like `_init_weights`.
        generator: random source; None is torch's default generator of the tensors' device.

    Returns:
        A new state (`state` itself when the size does not change).

    Raises:
        ValueError: a non-integer multiple, or a non-positive size.
    """
    spec = spec_of(state)
    old = state.params[spec.input_embeddings]
    size = new_num_tokens
    if pad_to_multiple_of is not None:
        if not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of <= 0:
            raise ValueError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of!r}")
        size = old.shape[0] if size is None else size
        size = math.ceil(size / pad_to_multiple_of) * pad_to_multiple_of
    if size is None or size == old.shape[0]:
        return state
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"new_num_tokens must be a positive int, got {size!r}")
    config, rules = state.config, _rules(spec)
    grow = dict(mean_resizing=mean_resizing, config=config, rules=rules, generator=generator)
    changed = {spec.input_embeddings: _resized(old, None, size, kind="embedding", **grow)[0]}
    out = spec.output_embeddings
    if out is not None:
        head = skeleton(config, state.architecture).get_submodule(out.rsplit(".", 1)[0])
        bias_name = out.rsplit(".", 1)[0] + ".bias"
        bias_name = state.ties.get(bias_name, bias_name) if head.bias is not None else None
        bias = None if bias_name is None else state.params[bias_name]
        if not config.tie_word_embeddings:
            weight, bias = _resized(state.params[out], bias, size, kind="linear", **grow)
            changed[out] = weight
        elif bias is not None:  # `_tie_or_clone_weights` pads the head's bias with zeros
            bias = F.pad(bias.detach(), (0, size - bias.shape[0]), "constant", 0)
        if bias is not None:
            changed[bias_name] = bias
    new_config = config.replace(vocab_size=size)
    return with_params(state, changed, config=new_config, ties=dict(spec.ties(new_config)))


def replaced_modules(before: ModelState, after: ModelState) -> set[str]:
    """The modules Transformers' `resize_token_embeddings` replaces by new ones, which it has
    not marked initialised (a later `init_weights()` draws them): the untied output projection,
    when the resize changed its size."""
    out = spec_of(before).output_embeddings
    if out is None or out in after.ties or out not in after.params:
        return set()
    if after.params[out].shape == before.params[out].shape:
        return set()
    return {out.rsplit(".", 1)[0]}


# --------------------------------------------------------------------------- helpers


def _rules(spec) -> TransformersInit:
    return TRANSFORMERS_INIT.get(spec.model_type, TransformersInit())


def _assigned_aliases(spec, config) -> dict[str, str]:
    """Ties Transformers makes by assignment while building (BERT's decoder bias is the head's
    `bias`), as opposed to the output-embedding tie `tie_weights` makes at the end."""
    return {a: s for a, s in spec.ties(config).items() if a != spec.output_embeddings}


def _resolved(draw: Draw, aliases: dict[str, str]) -> Draw:
    source = aliases.get(draw.name)
    return draw if source is None else Draw(source, draw.op, draw.args)


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


def _post_order(module: nn.Module, name: str, skip: str | None = None) -> Iterator[tuple[str, nn.Module]]:
    """Modules as Transformers' `smart_apply` visits them: children first, then the module."""
    for child_name, child in module.named_children():
        full = f"{name}.{child_name}" if name else child_name
        if not _within(full, skip):
            yield from _post_order(child, full, skip)
    yield name, module


def _initialized(root: nn.Module, prefix: str, config, rules, skip: str | None = None) -> list[Draw]:
    """`post_init`'s `initialize_weights` over `root` (minus the already initialised `skip`)."""
    return [
        d
        for name, module in _post_order(root, prefix, skip)
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


def _resized(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    size: int,
    *,
    kind: str,
    mean_resizing: bool,
    config,
    rules: TransformersInit,
    generator,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Transformers' `_get_resized_embeddings` (kind "embedding") / `_get_resized_lm_head`
    ("linear", not transposed): [rows, d] -> [size, d] (and the bias [rows] -> [size])."""
    rows, dim = weight.shape
    with torch.device("meta"), _SkipInit():
        module = (
            nn.Embedding(size, dim) if kind == "embedding" else nn.Linear(dim, size, bias=bias is not None)
        )
    like = dict(dtype=weight.dtype, device=weight.device)
    new = {"weight": torch.empty(size, dim, **like)}
    if bias is not None:
        new["bias"] = torch.empty(size, **like)
    draws = construction_draws(module, "")
    added = size - rows
    if added > 0 and not mean_resizing:
        draws += init_weights_draws(module, "", config, rules)
    run_draws(draws, new, generator)
    with torch.no_grad():
        if added > 0 and mean_resizing:
            new["weight"][-added:] = _mean_rows(weight.detach(), added, generator).to(weight.dtype)
            if bias is not None:
                b = bias.detach()
                mean = torch.mean(b, axis=0, dtype=torch.float32)
                std = torch.std(b, axis=0).to(torch.float32)
                new["bias"][-added:].normal_(mean=mean, std=1e-9 * std, generator=generator)
        keep = min(rows, size)
        new["weight"][:keep] = weight.detach()[:keep]
        if bias is not None:
            new["bias"][:keep] = bias.detach()[:keep]
    return new["weight"], new.get("bias")


def _mean_rows(old: torch.Tensor, added: int, generator) -> torch.Tensor:
    """Transformers' `_init_added_embeddings_weights_with_mean` (float32): a sample of
    N(mean, 1e-9 * covariance) of `old`'s rows, computed with the same operations as
    `MultivariateNormal(...).sample((added,))`; the mean alone (no draw) when that covariance
    is not positive definite."""
    x = old.to(torch.float32)
    mean = torch.mean(x, axis=0)
    centered = x - mean
    covariance = centered.T @ centered / x.shape[0]
    epsilon = 1e-9
    if not constraints.positive_definite.check(epsilon * covariance).all():
        return mean[None, :].repeat(added, 1)
    scale_tril = torch.linalg.cholesky(epsilon * covariance)
    eps = torch.empty((added, x.shape[1]), dtype=mean.dtype, device=mean.device).normal_(generator=generator)
    return mean + torch.matmul(scale_tril, eps.unsqueeze(-1)).squeeze(-1)
