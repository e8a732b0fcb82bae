"""Token and position embeddings: get, set and resize, as pure functions of a state."""

from __future__ import annotations

import math

import torch

from .._checks import check_positive_int, check_state, describe
from .._limits import check_allocation
from ..errors import ArgumentTypeError, FModelError, ShapeMismatchError
from ..models.init import init_tensor
from ..state import ModelState, TieError
from ._common import fresh_generator, spec_of, with_params

__all__ = [
    "get_input_embeddings",
    "get_output_embeddings",
    "resize_position_embeddings",
    "resize_token_embeddings",
    "set_input_embeddings",
    "set_output_embeddings",
]


def get_input_embeddings(state: ModelState) -> torch.Tensor:
    """The input embedding matrix [vocab, hidden] (the state's own tensor; do not write into it).

    Raises:
        ArgumentTypeError: `state` is not a `ModelState`.
    """
    check_state(state, "get_input_embeddings(state)")
    _refuse_quantized_embeddings(state, "get_input_embeddings")
    return state.params[spec_of(state).input_embeddings]


def get_output_embeddings(state: ModelState) -> torch.Tensor | None:
    """The output projection [vocab, hidden], or None for models without an LM head.

    Raises:
        ArgumentTypeError: `state` is not a `ModelState`.
    """
    check_state(state, "get_output_embeddings(state)")
    _refuse_quantized_embeddings(state, "get_output_embeddings")
    name = spec_of(state).output_embeddings
    return None if name is None else state.params[name]


def _refuse_quantized_embeddings(state: ModelState, what: str) -> None:
    """Raise QuantizationError for a state whose token embedding is stored quantized (a GGUF
    loaded with quantized=True): it has no float matrix to get, set or resize."""
    from ..errors import QuantizationError
    from ..models.quant_linear import quantization_config

    qc = quantization_config(state.config)
    embedding = spec_of(state).input_embeddings.rsplit(".", 1)[0]
    if qc is not None and embedding in qc.get("modules", ()):
        raise QuantizationError(
            f"{what}: the token embedding {embedding!r} of this state is quantized (it has no float "
            "matrix); call fmodel.dequantize(state) first"
        )


def _is_tied(state: ModelState) -> bool:
    spec = spec_of(state)
    return (
        spec.output_embeddings is not None and state.ties.get(spec.output_embeddings) == spec.input_embeddings
    )


def set_input_embeddings(state: ModelState, embeddings: torch.Tensor) -> ModelState:
    """A new state whose input embeddings are `embeddings` [vocab', hidden].

    A tied output projection follows (the tie is kept). The config's `vocab_size` becomes
    vocab'; with an untied output projection vocab' must equal its rows (resize first).

    Raises:
        ArgumentTypeError: `state` is not a `ModelState`, `embeddings` not a floating tensor.
        ShapeMismatchError: wrong hidden size, or vocab' disagrees with an untied output projection.
    """
    check_state(state, "set_input_embeddings(state)")
    _refuse_quantized_embeddings(state, "set_input_embeddings")
    _check_float_matrix(embeddings, "set_input_embeddings(embeddings)")
    spec = spec_of(state)
    old = state.params[spec.input_embeddings]
    _check_matrix(embeddings, old.shape[1], spec.input_embeddings)
    out_name = spec.output_embeddings
    if (
        out_name is not None
        and not _is_tied(state)
        and state.params[out_name].shape[0] != embeddings.shape[0]
    ):
        raise ShapeMismatchError(
            f"set_input_embeddings: new vocabulary {embeddings.shape[0]} differs from the untied "
            f"{out_name!r} ({state.params[out_name].shape[0]} rows); use resize_token_embeddings"
        )
    config = state.config.replace(vocab_size=embeddings.shape[0])
    return with_params(state, {spec.input_embeddings: embeddings}, config=config)


def set_output_embeddings(
    state: ModelState, embeddings: torch.Tensor, *, tie: bool | None = None
) -> ModelState:
    """A new state whose output projection is `embeddings` [vocab, hidden].

    Arguments:
        tie: for a tied model: False breaks the tie (records `tie_word_embeddings=False`);
            True/None keep it, which is only possible when `embeddings` is the input matrix.

    Raises:
        ArgumentTypeError: `state` is not a `ModelState`, `embeddings` not a floating tensor,
            `tie` not a bool or None.
        TieError: the model is tied and `embeddings` is another tensor, without tie=False.
        ShapeMismatchError: the shape differs from the current output projection.
        FModelError: the model has no output projection.
    """
    check_state(state, "set_output_embeddings(state)")
    _refuse_quantized_embeddings(state, "set_output_embeddings")
    _check_float_matrix(embeddings, "set_output_embeddings(embeddings)")
    if tie is not None and not isinstance(tie, bool):
        raise ArgumentTypeError(
            f"set_output_embeddings(tie) must be True, False or None, got {describe(tie)}"
        )
    spec = spec_of(state)
    name = spec.output_embeddings
    if name is None:
        raise FModelError(f"set_output_embeddings: {state.architecture} has no output embeddings")
    old = state.params[name]
    if tuple(embeddings.shape) != tuple(old.shape):
        raise ShapeMismatchError(
            f"set_output_embeddings: {name!r} must keep shape {list(old.shape)}, got {list(embeddings.shape)}"
        )
    if not _is_tied(state):
        return with_params(state, {name: embeddings})
    if embeddings is state.params[spec.input_embeddings] and tie is not False:
        return state
    if tie is not False:
        raise TieError(
            f"set_output_embeddings: {name!r} is tied to {spec.input_embeddings!r}; pass tie=False to break "
            "the tie, or use set_input_embeddings to change both"
        )
    ties = {a: s for a, s in state.ties.items() if a != name}
    config = state.config.replace(tie_word_embeddings=False)
    return with_params(state, {name: embeddings}, ties=ties, config=config)


def _check_float_matrix(t, argument: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ArgumentTypeError(f"{argument} must be a floating tensor [rows, hidden], got {describe(t)}")
    if not t.is_floating_point():
        raise ArgumentTypeError(
            f"{argument} must be a floating tensor (embeddings are looked up, not indexed), got dtype {t.dtype}"
        )


def _check_matrix(t: torch.Tensor, hidden: int, name: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != hidden:
        got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ShapeMismatchError(f"{name!r}: expected a matrix [rows, {hidden}], got {got}")


def _check_generator(generator, argument: str) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ArgumentTypeError(f"{argument} must be a torch.Generator or None, got {describe(generator)}")


def _check_rows_fit(old: torch.Tensor, rows: int, copies: int, what: str) -> None:
    """Refuse before allocating: `copies` matrices of `rows` rows like `old` (and, growing, the
    drawn rows) must fit in the memory of `old`'s device."""
    row_bytes = math.prod(old.shape[1:]) * old.element_size()
    check_allocation(2 * copies * rows * row_bytes, what=what, device=old.device)


def _grow_rows(
    old: torch.Tensor, new_rows: int, *, mean_resizing: bool, std: float, generator: torch.Generator
) -> torch.Tensor:
    """[old_rows, d] -> [new_rows, d]: first rows copied, added rows drawn. Never writes into `old`."""
    old_rows = old.shape[0]
    if new_rows <= old_rows:
        return old[:new_rows].clone()
    added = new_rows - old_rows
    if mean_resizing:
        extra = _mean_rows(old, added, generator)
    else:
        extra = init_tensor("normal", (added, *old.shape[1:]), dtype=old.dtype, std=std, generator=generator)
    return torch.cat([old, extra.to(device=old.device, dtype=old.dtype)], dim=0)


def _mean_rows(old: torch.Tensor, added: int, generator: torch.Generator) -> torch.Tensor:
    """Rows from N(mean, 1e-9 * covariance) of `old`'s rows, as Transformers' mean resizing
    (the mean alone when that covariance is not positive definite). Drawn from `generator`."""
    x = old.detach().to(device="cpu", dtype=torch.float32)
    if x.dim() == 1:  # a bias: N(mean, (1e-9 * std)^2)
        noise = torch.randn(added, generator=generator)
        return x.mean() + 1e-9 * x.std() * noise
    mean = x.mean(0)
    centered = x - mean
    cov = 1e-9 * (centered.T @ centered) / x.shape[0]
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info) != 0:
        return mean.expand(added, -1).clone()
    noise = torch.randn(added, x.shape[1], generator=generator)
    return mean + noise @ chol.T


def resize_token_embeddings(
    state: ModelState,
    new_num_tokens: int | None = None,
    *,
    pad_to_multiple_of: int | None = None,
    mean_resizing: bool = True,
    generator: torch.Generator | None = None,
) -> ModelState:
    """A new state with a vocabulary of `new_num_tokens` rows (Transformers' semantics).

    The size is rounded up to a multiple of `pad_to_multiple_of` when given (with
    `new_num_tokens=None` the current size is rounded). Shrinking keeps the first rows;
    growing keeps every old row and draws the new ones from a normal with the old rows' mean
    and (1e-9 x) covariance when `mean_resizing`, else as `init` would
    (normal with `initializer_range`). The output projection is resized with it: tied, it
    follows; untied, it keeps its trained rows (Transformers re-initialised them) and grows
    the same way; an output bias grows with its mean. `config.vocab_size` is updated.

    Arguments:
        state: the model (unchanged).
        new_num_tokens: the vocabulary size; None keeps it (only padding applies).
        pad_to_multiple_of: round the size up to a multiple of this.
        mean_resizing: draw new rows around the old rows' mean (True) or like `init` (False).
        generator: random source for new rows (default: seeded with 0, so results repeat).

    Returns:
        A new state; only the embedding, output projection and output bias are new tensors.

    Raises:
        ArgumentTypeError: `state` is not a `ModelState`, a size that is not an int, a
            `generator` that is not a `torch.Generator`.
        InvalidArgumentError: (a ValueError) a non-positive size or multiple.
        SizeLimitError: the new matrices would not fit in memory (checked before allocating).

    Example:
        >>> bigger = fmodel.resize_token_embeddings(state, 32003, pad_to_multiple_of=64)
        >>> bigger.config.vocab_size
        32064
    """
    check_state(state, "resize_token_embeddings(state)")
    _refuse_quantized_embeddings(state, "resize_token_embeddings")
    check_positive_int(new_num_tokens, "resize_token_embeddings(new_num_tokens)", allow_none=True)
    check_positive_int(pad_to_multiple_of, "resize_token_embeddings(pad_to_multiple_of)", allow_none=True)
    _check_generator(generator, "resize_token_embeddings(generator)")
    if not isinstance(mean_resizing, bool):
        raise ArgumentTypeError(
            f"resize_token_embeddings(mean_resizing) must be True or False, got {describe(mean_resizing)}"
        )
    spec = spec_of(state)
    old = state.params[spec.input_embeddings]
    size = old.shape[0] if new_num_tokens is None else int(new_num_tokens)
    if pad_to_multiple_of is not None:
        size = -(-size // int(pad_to_multiple_of)) * int(pad_to_multiple_of)  # exact for huge ints
    if size == old.shape[0]:
        return state
    untied = spec.output_embeddings is not None and not _is_tied(state)
    _check_rows_fit(old, size, (2 if untied else 1), f"resize_token_embeddings(new_num_tokens={size})")
    generator = fresh_generator(generator)
    std = state.config.initializer_range
    grow = dict(mean_resizing=mean_resizing, std=std, generator=generator)
    changed = {spec.input_embeddings: _grow_rows(old, size, **grow)}
    if spec.output_embeddings is not None and not _is_tied(state):
        changed[spec.output_embeddings] = _grow_rows(state.params[spec.output_embeddings], size, **grow)
    if spec.output_bias is not None and spec.output_bias in state.params:
        bias = state.params[spec.output_bias]
        if size <= bias.shape[0] or mean_resizing:
            changed[spec.output_bias] = _grow_rows(bias, size, **grow)
        else:
            changed[spec.output_bias] = torch.cat([bias, bias.new_zeros(size - bias.shape[0])])
    return with_params(state, changed, config=state.config.replace(vocab_size=size))


def resize_position_embeddings(
    state: ModelState, new_num_position_embeddings: int, *, generator: torch.Generator | None = None
) -> ModelState:
    """A new state that accepts `new_num_position_embeddings` positions.

    Learned positions (GPT-2 `wpe`, BERT `position_embeddings` and its `position_ids`
    buffer) keep their old rows when growing (new rows initialised as `init` would) and keep
    the first rows when shrinking. Rotary families have no position weights: only
    `max_position_embeddings` changes (and buffers derived from it are recomputed).

    Raises:
        ArgumentTypeError: `state` is not a `ModelState`, the size is not an int.
        InvalidArgumentError: (a ValueError) a non-positive size.
        SizeLimitError: a learned table of that size would not fit in memory.
    """
    check_state(state, "resize_position_embeddings(state)")
    check_positive_int(new_num_position_embeddings, "resize_position_embeddings(new_num_position_embeddings)")
    _check_generator(generator, "resize_position_embeddings(generator)")
    n = int(new_num_position_embeddings)
    if n == state.config.max_position_embeddings:
        return state
    spec = spec_of(state)
    what = f"resize_position_embeddings(new_num_position_embeddings={n})"
    if spec.position_embeddings is not None:
        _check_rows_fit(state.params[spec.position_embeddings], n, 1, what)
    if spec.position_ids_buffer is not None:
        check_allocation(2 * n * 8, what=what)  # the position_ids / token_type_ids buffers
    config = state.config.replace(max_position_embeddings=n)
    changed = {}
    if spec.position_embeddings is not None:
        old = state.params[spec.position_embeddings]
        changed[spec.position_embeddings] = _grow_rows(
            old,
            n,
            mean_resizing=False,
            std=state.config.initializer_range,
            generator=fresh_generator(generator),
        )
    buffers = dict(state.buffers)
    if spec.position_ids_buffer is not None and spec.position_ids_buffer in buffers:
        ids = buffers[spec.position_ids_buffer]
        buffers[spec.position_ids_buffer] = torch.arange(n, dtype=ids.dtype, device=ids.device).expand(1, -1)
    for name, value in spec.computed_buffers(config, None).items():
        buffers[name] = value.to(state.buffers[name].device) if name in state.buffers else value
    return with_params(state, changed, config=config, buffers=buffers)
