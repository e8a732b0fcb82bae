"""The generic bad calls, on a tiny state of every registered family's head class
(`FAMILY_STATES`, built from the registries): a family registered later is covered without
being listed. See bad_argument_fixtures.py."""

from __future__ import annotations

import torch

import fmodel
from fmodel.errors import (
    ConfigError,
    InvalidArgumentError,
    ShapeMismatchError,
    TokenIdError,
)
from fmodel.models import get_spec

from .bad_argument_fixtures import FAMILY_STATES, Case
from .bad_argument_fixtures import case as _c
from .families import TINY_SIZES

GENERATIVE = ("causal_lm", "seq2seq_lm")


def family_cases() -> list[Case]:
    f, ids = fmodel, torch.tensor([[1, 2, 3]])
    cases = []
    for model_type, s in FAMILY_STATES.items():
        spec = get_spec(s.architecture)
        vocab = s.config.vocab_size
        width = s.params[spec.input_embeddings].shape[1]
        cases += [
            _c(
                f"forward-{model_type}-ids-too-big",
                lambda s=s, v=vocab: f.forward(s, torch.tensor([[1, v]])),
                TokenIdError,
                f"vocab_size={vocab}",
            ),
            _c(
                f"forward-{model_type}-mask-shape",
                lambda s=s: f.forward(s, ids, attention_mask=torch.ones(1, 5)),
                InvalidArgumentError,
                "attention_mask",
            ),
            _c(
                f"to-{model_type}-int-dtype",
                lambda s=s: f.to(s, dtype=torch.int32),
                InvalidArgumentError,
                "dtype",
            ),
            _c(
                f"resize_token_embeddings-{model_type}-zero",
                lambda s=s: f.resize_token_embeddings(s, 0),
                InvalidArgumentError,
                "new_num_tokens",
            ),
            _c(  # a family without a head layout cannot prune at all (T5)
                f"prune_heads-{model_type}-layer-out-of-range",
                lambda s=s: f.prune_heads(s, {99: [0]}),
                InvalidArgumentError if spec.head_layout else fmodel.FModelError,
                "layer 99" if spec.head_layout else "prune_heads",
            ),
            _c(
                f"set_input_embeddings-{model_type}-width",
                lambda s=s, w=width: f.set_input_embeddings(s, torch.zeros(TINY_SIZES["vocab_size"], w + 1)),
                ShapeMismatchError,
                spec.input_embeddings,
            ),
        ]
        if spec.output in GENERATIVE:
            cases += [
                _c(
                    f"init_cache-{model_type}-zero-batch",
                    lambda s=s: f.init_cache(s, 0, 8),
                    fmodel.CacheError,
                    "batch_size",
                ),
                _c(
                    f"generate-{model_type}-max-new-negative",
                    lambda s=s: f.generate(s, ids, max_new_tokens=-1),
                    ConfigError,
                    "max_new_tokens",
                ),
            ]
    return cases
