"""Logits processing for generation: pure functions on next-token scores, equal to Transformers'.

Each function takes scores [B, vocab] (float32 in `generate`) and returns new scores; no
input is written. `process_logits` applies the ones a `GenerationConfig` asks for in
Transformers' order: repetition penalty, min_length, min_new_tokens, then the caller's own
processors, then, when sampling, temperature, top-k, top-p (Transformers' `_get_logits_processor`,
which puts a `generate(logits_processor=...)` list before its sampling warpers).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "apply_repetition_penalty",
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "process_logits",
    "suppress_tokens",
]

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""`(tokens [B, N], scores [B, vocab]) -> scores [B, vocab]`: Transformers' `LogitsProcessor` call."""


def apply_repetition_penalty(scores: torch.Tensor, tokens: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide the positive scores and multiply the negative scores of every token id present in
    `tokens` [B, N] (prompt, padding included, and generated so far) by `penalty` (CTRL's
    repetition penalty; Transformers' `RepetitionPenaltyLogitsProcessor`)."""
    score = torch.gather(scores, 1, tokens)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return scores.scatter(1, tokens, score)


def suppress_tokens(scores: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """`scores` with the columns `token_ids` (a 1-D id tensor) set to -inf: what Transformers'
    `MinLengthLogitsProcessor` / `MinNewTokensLengthLogitsProcessor` do to EOS ids."""
    vocab = torch.arange(scores.shape[-1], device=scores.device)
    return torch.where(torch.isin(vocab, token_ids), -math.inf, scores)


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """scores / temperature (Transformers' `TemperatureLogitsWarper`)."""
    return scores / temperature


def apply_top_k(scores: torch.Tensor, top_k: int, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep the `top_k` highest scores of each row (ties with the k-th kept too), -inf elsewhere
    (Transformers' `TopKLogitsWarper`)."""
    k = min(max(top_k, min_tokens_to_keep), scores.shape[-1])
    kth = torch.topk(scores, k)[0][..., -1, None]
    return scores.masked_fill(scores < kth, -math.inf)


def apply_top_p(scores: torch.Tensor, top_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of highest-probability tokens whose probabilities
    add up to more than `top_p`, -inf elsewhere (Transformers' `TopPLogitsWarper`)."""
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -min_tokens_to_keep:] = False
    remove = remove.scatter(1, sorted_indices, remove)
    return scores.masked_fill(remove, -math.inf)


def process_logits(
    scores: torch.Tensor,
    tokens: torch.Tensor,
    prompt_length: int,
    config,
    eos: torch.Tensor | None,
    custom: Sequence[LogitsProcessor] = (),
    min_tokens_to_keep: int = 1,
) -> torch.Tensor:
    """Apply what `config` asks for, in Transformers' order.

    Arguments:
        scores: [B, vocab] next-token scores (float32; log-probabilities in beam search).
        tokens: [B, N] every token so far: prompt (padding included) + generated.
        prompt_length: P, the prompt's length (for min_new_tokens).
        config: a `GenerationConfig`.
        eos: 1-D tensor of EOS ids, or None (then min_length / min_new_tokens do nothing).
        custom: the caller's processors, run after the built-in ones and before the sampling
            warpers; each gets `(tokens, scores)` and returns scores (it may write into the
            scores it is given, as Transformers' processors may: those are this call's own).
        min_tokens_to_keep: the least top-k / top-p keep (beam sampling keeps EOS count + 1).

    Returns:
        New scores [B, vocab]; the `scores` and `tokens` given are not written by the built-in
        processors (a custom one gets a copy when it would see the caller's `scores`).
    """
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        scores = apply_repetition_penalty(scores, tokens, config.repetition_penalty)
    length = tokens.shape[1]
    if eos is not None:
        if config.min_length and length < config.min_length:
            scores = suppress_tokens(scores, eos)
        if config.min_new_tokens and length - prompt_length < config.min_new_tokens:
            scores = suppress_tokens(scores, eos)
    if custom:
        given = scores
        for processor in custom:
            scores = processor(tokens, scores.clone() if scores is given else scores)
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            scores = apply_temperature(scores, config.temperature)
        if config.top_k:
            scores = apply_top_k(scores, config.top_k, min_tokens_to_keep)
        if config.top_p is not None and config.top_p < 1.0:
            scores = apply_top_p(scores, config.top_p, min_tokens_to_keep)
    return scores


def needs_processing(config, has_eos: bool, custom: Sequence[LogitsProcessor] = ()) -> bool:
    """False when `process_logits` would return the scores unchanged for every step (greedy
    with no penalty, no minimum length and no custom processor): the decode loop then skips it."""
    return bool(
        custom
        or (config.repetition_penalty is not None and config.repetition_penalty != 1.0)
        or (has_eos and (config.min_length or config.min_new_tokens))
        or (
            config.do_sample
            and (
                (config.temperature is not None and config.temperature != 1.0)
                or config.top_k
                or (config.top_p is not None and config.top_p < 1.0)
            )
        )
    )
