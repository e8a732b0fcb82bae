"""`ArchSpec`: the declarative description of one model class (e.g. `LlamaForCausalLM`).

A spec says how to build the weightless skeleton, which names are tied and embedded,
the base-model prefix, legacy checkpoint key renames, which unexpected keys are harmless,
which buffers are computed rather than stored, and how each tensor is initialised.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import attrs
import torch
from torch import nn

from ..errors import UnknownArchitectureError

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "HeadLayout",
    "get_spec",
    "no_buffers",
    "no_ties",
    "register_architecture",
    "specs_for_model_type",
]


@attrs.frozen
class HeadLayout:
    """Where the attention heads of one layer live in the state's tensors (for `prune_heads`).

    Attributes:
        heads: query heads the layer has now (after any pruning recorded in the config).
        kv_heads: key/value heads it has now (== heads without grouped-query attention).
        head_dim: width of one head.
        original_heads: query heads before any pruning (head ids in `pruned_heads` refer to these).
        slices: (tensor name, axis, section): the tensor's `axis` is made of head blocks of
            `head_dim`. section "q" / "k" / "v" / "o" holds one block per query (q, o) or
            key/value (k, v) head; "qkv" is q, k and v concatenated (GPT-2's fused c_attn); "q|k|v" the same with
            grouped key/value heads (Phi-3's qkv_proj: H query then H_kv key and value blocks).
            "o" is the input axis of the output projection; its bias is never sliced.
        unprunable: why heads of this layer cannot be removed exactly (`prune_heads` refuses
            with it), or None. The layout still gives the cache its shapes.
    """

    heads: int
    kv_heads: int
    head_dim: int
    original_heads: int
    slices: tuple[tuple[str, int, str], ...]
    unprunable: str | None = None


@attrs.frozen
class ArchSpec:
    """What fmodel needs to know about a model class, as data.

    Attributes:
        name: the Transformers class name (`architectures[0]` in config.json).
        model_type: the config `model_type` it belongs to.
        build: config -> nn.Module; called under `torch.device("meta")`, so it holds no weights.
        prefix: the attribute holding the base model in the family's head classes ("model" for
            Llama); checkpoint keys of a head class start with it, a base class's keys do not.
        is_base: True for the bare base model (no head), whose keys carry no prefix.
        ties: config -> {alias: source} tensor names that share one tensor.
        input_embeddings: name of the input embedding matrix.
        output_embeddings: name of the output projection (None for base models).
        key_renames: (regex, replacement) pairs for legacy checkpoint names; applied and reported.
        ignore_unexpected: regexes of checkpoint keys that are dropped without error
            (e.g. old `rotary_emb.inv_freq` entries).
        computed_buffers: (config, device) -> {name: tensor}: non-persistent buffers derived from
            the config (never saved).
        init_rule: (name, config) -> "normal" | ("normal", std) | "zeros" | "ones": how a tensor
            is initialised ("normal" uses the config's `initializer_range`).
        output: "causal_lm" (logits), "masked_lm" (logits), "sequence_classification"
            (logits [B, num_labels]) or "base" (last_hidden_state).
        position_embeddings: name of the learned position matrix (GPT-2, BERT), else None.
        position_ids_buffer: name of a `position_ids` buffer sized like it (BERT), else None.
        output_bias: name of the output projection's bias over the vocabulary, else None.
        head_layout: (config, layer index) -> HeadLayout, for `prune_heads`; None if unsupported.
        takes_head_mask: the forward accepts Transformers' `head_mask` (GPT-2, BERT).
        tp_plan: config -> {module pattern: style}, the tensor-parallel plan `fmodel.distribute`
            uses by default (`fmodel.distributed.plan` defines the format); None: none known.
    """

    name: str
    model_type: str
    build: Callable[[object], nn.Module]
    prefix: str
    is_base: bool
    ties: Callable[[object], Mapping[str, str]]
    input_embeddings: str
    output_embeddings: str | None
    computed_buffers: Callable[[object, torch.device | None], Mapping[str, torch.Tensor]]
    init_rule: Callable[[str, object], str | tuple[str, float]]
    output: str
    key_renames: tuple[tuple[str, str], ...] = ()
    ignore_unexpected: tuple[str, ...] = ()
    position_embeddings: str | None = None
    position_ids_buffer: str | None = None
    output_bias: str | None = None
    head_layout: Callable[[object, int], HeadLayout] | None = None
    takes_head_mask: bool = False
    tp_plan: Callable[[object], Mapping[str, str]] | None = None

    def rename_key(self, key: str) -> str:
        for pattern, replacement in self.key_renames:
            key = re.sub(pattern, replacement, key)
        return key

    def is_ignorable(self, key: str) -> bool:
        return any(re.search(pattern, key) for pattern in self.ignore_unexpected)


def no_ties(config) -> dict[str, str]:
    """`ArchSpec.ties` of a class whose tensors are all its own."""
    return {}


def no_buffers(config, device) -> dict[str, torch.Tensor]:
    """`ArchSpec.computed_buffers` of a class without computed buffers."""
    return {}


ARCHITECTURES: dict[str, ArchSpec] = {}


def register_architecture(spec: ArchSpec) -> ArchSpec:
    """Register a spec under its class name (replacing any earlier one)."""
    ARCHITECTURES[spec.name] = spec
    return spec


def get_spec(name: str) -> ArchSpec:
    """The spec of class `name`, e.g. "LlamaForCausalLM".

    Raises:
        UnknownArchitectureError: not implemented; the message lists what is.
    """
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise UnknownArchitectureError(
            f"architecture {name!r} is not implemented; fmodel knows {sorted(ARCHITECTURES)}"
        ) from None


def specs_for_model_type(model_type: str) -> list[ArchSpec]:
    return [s for s in ARCHITECTURES.values() if s.model_type == model_type]
