"""`prune_heads`: remove attention heads from the projections, recorded in the config."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from .._checks import check_state, describe
from ..errors import ArgumentTypeError, FModelError, InvalidArgumentError, QuantizationError
from ..models.quant_linear import quantization_config
from ..state import ModelState
from ._common import spec_of, with_params

__all__ = ["prune_heads"]


def _block_index(positions: list[int], head_dim: int, offset: int = 0) -> list[int]:
    return [offset + p * head_dim + i for p in positions for i in range(head_dim)]


def _checked_request(heads_to_prune) -> dict[int, list[int]]:
    """{layer: [heads]} as plain lists, or an `ArgumentTypeError` naming what is wrong."""
    if not isinstance(heads_to_prune, Mapping):
        raise ArgumentTypeError(
            f"prune_heads(heads_to_prune) must be a mapping {{layer: [head ids]}}, got {describe(heads_to_prune)}"
        )
    request = {}
    for layer, heads in heads_to_prune.items():
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ArgumentTypeError(
                f"prune_heads(heads_to_prune): layer keys must be ints, got {describe(layer)}"
            )
        if isinstance(heads, (str, bytes, Mapping)) or not isinstance(heads, Iterable):
            raise ArgumentTypeError(
                f"prune_heads(heads_to_prune)[{layer}] must be a list of head ids, got {describe(heads)}"
            )
        heads = list(heads)
        for h in heads:
            if isinstance(h, bool) or not isinstance(h, int):
                raise ArgumentTypeError(
                    f"prune_heads(heads_to_prune)[{layer}]: head ids must be ints, got {describe(h)}"
                )
        request[layer] = heads
    return request


def prune_heads(state: ModelState, heads_to_prune: Mapping[int, Iterable[int]]) -> ModelState:
    """Remove attention heads. Head ids are those of the unpruned model, as in Transformers.

    The query/key/value rows and the output projection's input columns of each removed head
    are dropped (GPT-2's fused `c_attn` too) and `config.pruned_heads` records them, so a
    saved pruned model reloads with the right shapes in fmodel and in Transformers. The
    pruned model computes what the unpruned one computes with those heads' outputs zeroed.
    Pruning every head of a layer is allowed (its attention then adds only the output
    bias); pruning an already-pruned head is a no-op. With grouped-query attention only
    whole key/value groups can go.

    Arguments:
        state: the model (unchanged).
        heads_to_prune: {layer index: [head ids]}.

    Returns:
        A new state; only the attention tensors of the touched layers are new.

    Raises:
        ArgumentTypeError: `state` is not a `ModelState`, `heads_to_prune` is not a mapping of
            int layers to lists of int head ids.
        QuantizationError: the state is quantized (its projections are packed integers:
            dequantize, prune, then quantize again).
        FModelError: the architecture does not support pruning.
        InvalidArgumentError: (an FModelError) a layer or head id is out of range.
        ConfigError: a grouped-query layer would lose part of a key/value group (the message
            lists the groups).

    Example:
        >>> pruned = fmodel.prune_heads(state, {0: [1, 2], 3: [0]})
        >>> dict(pruned.config.pruned_heads)
        {0: (1, 2), 3: (0,)}
    """
    check_state(state, "prune_heads(state)")
    heads_to_prune = _checked_request(heads_to_prune)
    if quantization_config(state.config) is not None:
        raise QuantizationError(
            f"prune_heads: the state is quantized ({quantization_config(state.config)['scheme']}); its "
            "projections are packed integers. Call fmodel.dequantize first, prune, then quantize again"
        )
    spec = spec_of(state)
    if spec.head_layout is None:
        raise FModelError(
            f"prune_heads: {state.architecture} does not declare a head layout; it cannot be pruned"
        )
    config = state.config
    n_layers = config.num_hidden_layers
    pruned = {layer: set(heads) for layer, heads in config.pruned_heads.items()}
    changed: dict[str, torch.Tensor] = {}
    new_pruned = dict(pruned)
    for layer, heads in heads_to_prune.items():
        if not isinstance(layer, int) or not 0 <= layer < n_layers:
            raise InvalidArgumentError(
                f"prune_heads: layer {layer!r} is out of range (the model has {n_layers} layers)"
            )
        layout = spec.head_layout(config, layer)
        if layout.unprunable:
            raise FModelError(f"prune_heads: {state.architecture} cannot be pruned: {layout.unprunable}")
        heads = set(heads)
        bad = sorted(h for h in heads if not isinstance(h, int) or not 0 <= h < layout.original_heads)
        if bad:
            raise InvalidArgumentError(
                f"prune_heads: layer {layer}: head ids {bad} out of range 0..{layout.original_heads - 1}"
            )
        new_pruned[layer] = pruned.get(layer, set()) | heads
    # Validate the whole request (e.g. whole key/value groups) before building any tensor.
    new_config = config.replace(pruned_heads={k: sorted(v) for k, v in new_pruned.items() if v})
    for layer in heads_to_prune:
        old_layout = spec.head_layout(config, layer)
        already = sorted(pruned.get(layer, set()))
        remaining = [h for h in range(old_layout.original_heads) if h not in already]
        keep_q = [pos for pos, h in enumerate(remaining) if h not in new_pruned[layer]]
        if len(keep_q) == len(remaining):
            continue
        groups = old_layout.heads // old_layout.kv_heads if old_layout.kv_heads else 1
        keep_kv = sorted({pos // groups for pos in keep_q})
        d = old_layout.head_dim
        for name, axis, section in old_layout.slices:
            index = {
                "q": _block_index(keep_q, d),
                "o": _block_index(keep_q, d),
                "k": _block_index(keep_kv, d),
                "v": _block_index(keep_kv, d),
                "qkv": _block_index(keep_q, d)
                + _block_index(keep_q, d, old_layout.heads * d)
                + _block_index(keep_q, d, 2 * old_layout.heads * d),
                # [q | k | v] with grouped key/value heads (Phi-3's qkv_proj)
                "q|k|v": _block_index(keep_q, d)
                + _block_index(keep_kv, d, old_layout.heads * d)
                + _block_index(keep_kv, d, (old_layout.heads + old_layout.kv_heads) * d),
            }[section]
            tensor = state.params[name]
            changed[name] = tensor.index_select(
                axis, torch.tensor(index, dtype=torch.long, device=tensor.device)
            )
    return with_params(state, changed, config=new_config)
