"""Transformers' `resize_token_embeddings`, replayed number for number (see `hf_init` for why
fmodel replays Transformers' draws, and the `generator` convention: None is torch's default
generator, on purpose, for the facade's parity; the pure `fmodel.resize_token_embeddings` keeps
its own seeded generator).

Transformers builds a new nn.Embedding (its normal(0, 1) default init draws), then, when
growing, redraws it by the family's `_init_weights` or samples the added rows around the old
rows' mean, then copies the old rows in; an untied output projection is rebuilt the same way as
a new nn.Linear (its kaiming init draws).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import constraints

from .._checks import check_positive_int, check_state
from ..models.init import (
    TransformersInit,
    construction_draws,
    init_weights_draws,
    run_draws,
    transformers_rules,
)
from ..models.skeleton import _SkipInit, skeleton
from ..state import ModelState
from ._common import spec_of, with_params
from .embeddings import _check_generator, _check_rows_fit, _refuse_quantized_embeddings

__all__ = ["replaced_modules", "resize_token_embeddings"]


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
        ArgumentTypeError: `state` is not a `ModelState`, a size that is not an int, a
            `generator` that is not a `torch.Generator`.
        InvalidArgumentError: (a ValueError) a non-positive size or multiple.
        SizeLimitError: the new matrices would not fit in memory (checked before allocating).
    """
    check_state(state, "resize_token_embeddings(state)")
    _refuse_quantized_embeddings(state, "resize_token_embeddings")
    check_positive_int(new_num_tokens, "resize_token_embeddings(new_num_tokens)", allow_none=True)
    check_positive_int(pad_to_multiple_of, "resize_token_embeddings(pad_to_multiple_of)", allow_none=True)
    _check_generator(generator, "resize_token_embeddings(generator)")
    spec = spec_of(state)
    old = state.params[spec.input_embeddings]
    size = new_num_tokens
    if pad_to_multiple_of is not None:
        size = old.shape[0] if size is None else size
        size = -(-size // pad_to_multiple_of) * pad_to_multiple_of  # exact for huge ints
    if size is None or size == old.shape[0]:
        return state
    untied = spec.output_embeddings is not None and not state.config.tie_word_embeddings
    _check_rows_fit(old, size, 2 if untied else 1, f"resize_token_embeddings(new_num_tokens={size})")
    config, rules = state.config, transformers_rules(spec.model_type)
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
