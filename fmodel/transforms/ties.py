"""Declared weight ties: `tie_weights` and `untie_weights`."""

from __future__ import annotations

from .._checks import check_state
from ..state import ModelState, TieError
from ._common import spec_of, with_params

__all__ = ["tie_weights", "untie_weights"]


def tie_weights(state: ModelState) -> ModelState:
    """Make every tie the architecture declares for this config hold.

    Each alias (e.g. `lm_head.weight`) is re-pointed at its source tensor (e.g.
    `model.embed_tokens.weight`): the alias's own tensor, if it had one, is dropped. Whether
    the embeddings are tied follows `config.tie_word_embeddings`, as in Transformers; ties
    the config no longer asks for are undone (the alias gets its own copy).

    Arguments:
        state: the model (unchanged).

    Returns:
        A new state (or `state` itself when every tie already holds). Tensors are shared.

    Raises:
        ArgumentTypeError: `state` is not a `ModelState`.
        TieError: a tie's source and alias differ in shape or dtype (they cannot be one tensor).

    Example:
        >>> tied = fmodel.tie_weights(state.replace(config=state.config.replace(tie_word_embeddings=True)))
        >>> tied.params["lm_head.weight"] is tied.params["model.embed_tokens.weight"]
        True
    """
    check_state(state, "tie_weights(state)")
    wanted = dict(spec_of(state).ties(state.config))
    for alias, source in wanted.items():
        if alias in state.ties or alias not in state.params or source not in state.params:
            continue
        a, b = state.params[alias], state.params[source]
        if a.shape != b.shape or a.dtype != b.dtype:
            raise TieError(
                f"tie_weights: {alias!r} ({list(a.shape)} {a.dtype}) cannot be tied to {source!r} "
                f"({list(b.shape)} {b.dtype}); resize or cast one first"
            )
    if wanted == dict(state.ties):
        return state
    changed = {alias: state.params[alias].clone() for alias in state.ties if alias not in wanted}
    return with_params(state, changed, ties=wanted)


def _refuse_quantized_tie(state: ModelState) -> None:
    """A quantized state whose output projection multiplies by its quantized embedding (the
    record's "tied_modules") has no float tensors to copy: refused by name."""
    from ..errors import QuantizationError
    from ..models.quant_linear import quantization_config

    tied = (quantization_config(state.config) or {}).get("tied_modules")
    if tied:
        raise QuantizationError(
            f"untie_weights: the output projection is tied to the quantized embedding ({dict(tied)}); "
            "call fmodel.dequantize(state) first"
        )


def untie_weights(state: ModelState) -> ModelState:
    """Give every tied alias its own copy and record `tie_word_embeddings=False`.

    Ties the architecture keeps whatever the config says (e.g. BERT's MLM decoder bias, which
    Transformers always ties) are kept.

    Returns:
        A new state: each untied alias is a new tensor equal to its source; the sources and
        all other tensors are shared with `state`.

    Raises:
        ArgumentTypeError: `state` is not a `ModelState`.

    Example:
        >>> untied = fmodel.untie_weights(state)
        >>> untied.params["lm_head.weight"] is untied.params["model.embed_tokens.weight"]
        False
    """
    check_state(state, "untie_weights(state)")
    _refuse_quantized_tie(state)
    config = state.config.replace(tie_word_embeddings=False)
    keep = dict(spec_of(state).ties(config))
    if keep == dict(state.ties) and config == state.config:
        return state
    changed = {
        alias: state.params[source].clone() for alias, source in state.ties.items() if alias not in keep
    }
    return with_params(state, changed, ties=keep, config=config)
