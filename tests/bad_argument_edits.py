"""Bad calls of the editing transforms (prune, resize, embeddings, params, attention choice,
stacks); see bad_argument_fixtures.py."""

from __future__ import annotations

import torch

import fmodel
from fmodel.errors import (
    ArgumentTypeError,
    AttentionUnavailableError,
    ConfigError,
    FModelError,
    InvalidArgumentError,
    QuantizationError,
    ShapeMismatchError,
    SizeLimitError,
)

from .bad_argument_fixtures import (
    BERT,
    GPT2,
    INT8,
    LLAMA,
    Case,
)
from .bad_argument_fixtures import case as _c


def transform_cases() -> list[Case]:
    L, G, B, f = LLAMA, GPT2, BERT, fmodel
    return [
        # prune_heads
        _c("prune_heads-int8", lambda: f.prune_heads(INT8, {0: [1]}), QuantizationError, "quantized"),
        _c("prune_heads-None", lambda: f.prune_heads(G, None), ArgumentTypeError, "heads_to_prune"),
        _c("prune_heads-str", lambda: f.prune_heads(G, "0:1"), ArgumentTypeError, "heads_to_prune"),
        _c("prune_heads-list", lambda: f.prune_heads(G, [0, 1]), ArgumentTypeError, "heads_to_prune"),
        _c("prune_heads-heads-int", lambda: f.prune_heads(G, {0: 1}), ArgumentTypeError, "heads_to_prune"),
        _c(
            "prune_heads-layer-str", lambda: f.prune_heads(G, {"0": [1]}), ArgumentTypeError, "heads_to_prune"
        ),
        _c("prune_heads-head-str", lambda: f.prune_heads(G, {0: ["1"]}), ArgumentTypeError, "heads_to_prune"),
        _c("prune_heads-layer-range", lambda: f.prune_heads(G, {99: [0]}), InvalidArgumentError, "layer 99"),
        _c(
            "prune_heads-head-range",
            lambda: f.prune_heads(G, {0: [99]}),
            InvalidArgumentError,
            "head ids [99]",
        ),
        _c(
            "prune_heads-head-negative",
            lambda: f.prune_heads(G, {0: [-1]}),
            InvalidArgumentError,
            "head ids [-1]",
        ),
        _c("prune_heads-gqa-group", lambda: f.prune_heads(L, {0: [0]}), ConfigError, "group"),
        # resize_token_embeddings
        _c(
            "resize_tokens-huge",
            lambda: f.resize_token_embeddings(L, 10**12),
            SizeLimitError,
            "new_num_tokens",
        ),
        _c(
            "resize_tokens-astronomic",
            lambda: f.resize_token_embeddings(L, 10**30),
            SizeLimitError,
            "new_num_tokens",
        ),
        _c(
            "resize_tokens-negative",
            lambda: f.resize_token_embeddings(L, -1),
            InvalidArgumentError,
            "new_num_tokens",
        ),
        _c(
            "resize_tokens-zero",
            lambda: f.resize_token_embeddings(L, 0),
            InvalidArgumentError,
            "new_num_tokens",
        ),
        _c(
            "resize_tokens-str",
            lambda: f.resize_token_embeddings(L, "100"),
            ArgumentTypeError,
            "new_num_tokens",
        ),
        _c(
            "resize_tokens-float",
            lambda: f.resize_token_embeddings(L, 100.0),
            ArgumentTypeError,
            "new_num_tokens",
        ),
        _c(
            "resize_tokens-bool",
            lambda: f.resize_token_embeddings(L, True),
            ArgumentTypeError,
            "new_num_tokens",
        ),
        _c(
            "resize_tokens-pad-0",
            lambda: f.resize_token_embeddings(L, 100, pad_to_multiple_of=0),
            InvalidArgumentError,
            "pad_to_multiple_of",
        ),
        _c(
            "resize_tokens-pad-negative",
            lambda: f.resize_token_embeddings(L, 100, pad_to_multiple_of=-8),
            InvalidArgumentError,
            "pad_to_multiple_of",
        ),
        _c(
            "resize_tokens-pad-str",
            lambda: f.resize_token_embeddings(L, 100, pad_to_multiple_of="8"),
            ArgumentTypeError,
            "pad_to_multiple_of",
        ),
        _c(
            "resize_tokens-pad-huge",
            lambda: f.resize_token_embeddings(L, 100, pad_to_multiple_of=10**13),
            SizeLimitError,
            "new_num_tokens",
        ),
        _c(
            "resize_tokens-generator",
            lambda: f.resize_token_embeddings(L, 100, generator=1),
            ArgumentTypeError,
            "generator",
        ),
        _c(
            "resize_tokens-gpt2-huge",
            lambda: f.resize_token_embeddings(G, 10**12),
            SizeLimitError,
            "new_num_tokens",
        ),
        # resize_position_embeddings
        _c(
            "resize_positions-gpt2-huge",
            lambda: f.resize_position_embeddings(G, 10**12),
            SizeLimitError,
            "new_num_position_embeddings",
        ),
        _c(
            "resize_positions-bert-huge",
            lambda: f.resize_position_embeddings(B, 10**12),
            SizeLimitError,
            "new_num_position_embeddings",
        ),
        _c(
            "resize_positions-zero",
            lambda: f.resize_position_embeddings(G, 0),
            InvalidArgumentError,
            "new_num_position_embeddings",
        ),
        _c(
            "resize_positions-negative",
            lambda: f.resize_position_embeddings(L, -5),
            InvalidArgumentError,
            "new_num_position_embeddings",
        ),
        _c(
            "resize_positions-str",
            lambda: f.resize_position_embeddings(G, "32"),
            ArgumentTypeError,
            "new_num_position_embeddings",
        ),
        _c(
            "resize_positions-None",
            lambda: f.resize_position_embeddings(G, None),
            ArgumentTypeError,
            "new_num_position_embeddings",
        ),
        _c(
            "resize_positions-generator",
            lambda: f.resize_position_embeddings(G, 32, generator="g"),
            ArgumentTypeError,
            "generator",
        ),
        # set / get embeddings
        _c("set_input-None", lambda: f.set_input_embeddings(L, None), ArgumentTypeError, "embeddings"),
        _c(
            "set_input-list", lambda: f.set_input_embeddings(L, [[0.0] * 32]), ArgumentTypeError, "embeddings"
        ),
        _c(
            "set_input-int-tensor",
            lambda: f.set_input_embeddings(L, torch.zeros(96, 32, dtype=torch.long)),
            ArgumentTypeError,
            "embeddings",
        ),
        _c(
            "set_input-hidden",
            lambda: f.set_input_embeddings(L, torch.zeros(96, 31)),
            ShapeMismatchError,
            "32",
        ),
        _c("set_input-1d", lambda: f.set_input_embeddings(L, torch.zeros(96)), ShapeMismatchError, "rows"),
        _c("set_output-None", lambda: f.set_output_embeddings(L, None), ArgumentTypeError, "embeddings"),
        _c(
            "set_output-shape",
            lambda: f.set_output_embeddings(L, torch.zeros(90, 32), tie=False),
            ShapeMismatchError,
            "shape",
        ),
        _c(
            "set_output-tie-str",
            lambda: f.set_output_embeddings(L, torch.zeros(96, 32), tie="no"),
            ArgumentTypeError,
            "tie",
        ),
        _c(
            "set_output-tied",
            lambda: f.set_output_embeddings(L, torch.zeros(96, 32)),
            fmodel.TieError,
            "tie=False",
        ),
        _c(
            "set_output-bert-base",
            lambda: f.set_output_embeddings(B, torch.zeros(70, 32)),
            FModelError,
            "output embeddings",
        ),
        # replace_params
        _c("replace_params-None", lambda: f.replace_params(L, None), ArgumentTypeError, "params"),
        _c("replace_params-list", lambda: f.replace_params(L, [torch.zeros(1)]), ArgumentTypeError, "params"),
        _c(
            "replace_params-str-value",
            lambda: f.replace_params(L, {"model.norm.weight": "x"}),
            ArgumentTypeError,
            "model.norm.weight",
        ),
        _c(
            "replace_params-int-key",
            lambda: f.replace_params(L, {1: torch.zeros(32)}),
            ArgumentTypeError,
            "params",
        ),
        _c(
            "replace_params-unknown",
            lambda: f.replace_params(L, {"nope": torch.zeros(1)}),
            fmodel.CheckpointError,
            "nope",
        ),
        _c(
            "replace_params-shape",
            lambda: f.replace_params(L, {"model.norm.weight": torch.zeros(31)}),
            ShapeMismatchError,
            "model.norm.weight",
        ),
        _c(
            "replace_params-dtype",
            lambda: f.replace_params(L, {"model.norm.weight": torch.zeros(32, dtype=torch.int8)}),
            ShapeMismatchError,
            "model.norm.weight",
        ),
        _c(
            "replace_params-alias",
            lambda: f.replace_params(L, {"lm_head.weight": torch.zeros(96, 32)}),
            fmodel.TieError,
            "lm_head.weight",
        ),
        _c(
            "replace_params-buffer",
            lambda: f.replace_params(L, {"model.rotary_emb.inv_freq": torch.zeros(4)}),
            fmodel.CheckpointError,
            "buffers",
        ),
        # attention choice
        _c(
            "set_attn-unknown",
            lambda: f.set_attn_implementation(L, "nope"),
            AttentionUnavailableError,
            "nope",
        ),
        _c("set_attn-None", lambda: f.set_attn_implementation(L, None), ArgumentTypeError, "name"),
        _c("set_attn-int", lambda: f.set_attn_implementation(L, 5), ArgumentTypeError, "name"),
        _c("set_attn-list", lambda: f.set_attn_implementation(L, ["eager"]), ArgumentTypeError, "name"),
        # stacks
        _c("stack_states-empty", lambda: f.stack_states([]), fmodel.StackError, "no states"),
        _c("stack_states-None", lambda: f.stack_states(None), ArgumentTypeError, "states"),
        _c("stack_states-str", lambda: f.stack_states("ab"), ArgumentTypeError, "states"),
        _c("stack_states-one-state", lambda: f.stack_states(L), ArgumentTypeError, "states"),
        _c("stack_states-families", lambda: f.stack_states([L, G]), fmodel.StackError, "state 1"),
        _c(
            "stack_states-configs",
            lambda: f.stack_states([L, fmodel.untie_weights(L)]),
            fmodel.StackError,
            "state 1",
        ),
        _c("unstack_state-plain", lambda: f.unstack_state(L), fmodel.StackError, "not a stacked state"),
    ]
