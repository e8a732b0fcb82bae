"""Beam search (and beam sampling) as Transformers 4.57's vectorised `_beam_search`.

Every step keeps, per prompt, the `num_beams` best running hypotheses and the `num_beams` best
finished ones, all in static-shaped tensors: running sequences [B, beams, max_length], their
accumulated log-probabilities, the finished sequences and their length-penalised scores. Each
step takes the top K = max(2, 1 + number of EOS ids) * beams continuations over all beams
(or samples K of them without replacement), marks those that hit a stopping criterion,
keeps the best `beams` unfinished ones as the next running beams and merges the best finished
ones into the finished set. The helpers below are Transformers' own steps (same names, same
arithmetic, same -1e9 masking), so tokens and scores come out equal.

The model is reached through a `Decoder`: given the running sequences it returns the next-token
logits for each row, and `reorder(rows)` tells it which row each next-step row continues (so a
KV cache follows its beams; `fmodel.generate` passes a decoder over `fmodel.generation.cache.reorder_cache`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import attrs
import torch

__all__ = ["BeamResult", "Decoder", "beam_search"]

_NEG = -1.0e9  # Transformers' "impossible" score


class Decoder(Protocol):
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token float32 logits [N, vocab] for each row of `tokens` [N, L]."""
        ...

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i of the next call continues row `rows[i]` of this one."""
        ...


@attrs.frozen(eq=False)
class BeamResult:
    """What beam search returns (Transformers' `GenerateBeamDecoderOnlyOutput` fields).

    Attributes:
        sequences: [B * num_return_sequences, P + N] int64, best first within each prompt.
        sequences_scores: [B * num_return_sequences] float32, the length-penalised scores.
        beam_indices: [B * num_return_sequences, N] int32: per new token, the flat beam row
            (batch index * beams + beam) it was produced from; -1 past a sequence's end.
        scores: per step, the processed log-probabilities [B * beams, vocab], or None.
        logits: per step, the raw logits [B * beams, vocab], or None.
    """

    sequences: torch.Tensor
    sequences_scores: torch.Tensor
    beam_indices: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None
    logits: tuple[torch.Tensor, ...] | None


def beam_search(
    decoder: Decoder,
    input_ids: torch.Tensor,
    *,
    num_beams: int,
    max_length: int,
    process: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    stops: Callable[[torch.Tensor, tuple[torch.Tensor, ...] | None], torch.Tensor],
    eos_count: int,
    fill_value: int,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    do_sample: bool = False,
    generator: torch.Generator | None = None,
    num_return_sequences: int = 1,
    output_scores: bool = False,
    output_logits: bool = False,
) -> BeamResult:
    """Beam search over `decoder` from prompts already repeated per beam.

    Arguments:
        decoder: the model (see `Decoder`).
        input_ids: [B * num_beams, P], each prompt repeated `num_beams` times in a row.
        num_beams: beams per prompt.
        max_length: P + new tokens at most (the running buffers' width).
        process: `(tokens [N, L], log_probs [N, V]) -> log_probs`: the logits processors.
        stops: `(tokens [N, L], scores so far or None) -> bool [N]`: the stopping criteria
            (max length, EOS, custom ones) for candidate sequences.
        eos_count: how many EOS ids there are (sets how many candidates each step keeps).
        fill_value: the id after a sequence's end (Transformers: the pad id, or the first EOS
            id when the pad id is 0 or unset, or -1 without EOS).
        length_penalty, early_stopping: as `GenerationConfig`.
        do_sample: sample candidates (`torch.multinomial` with `generator`) instead of top-k.
        num_return_sequences: best finished beams returned per prompt (<= num_beams).
        output_scores / output_logits: keep each step's processed / raw scores.

    Returns:
        A `BeamResult`. Nothing given is written.
    """
    flat_batch, prompt = input_ids.shape
    batch = flat_batch // num_beams
    device = input_ids.device
    beams_to_keep = max(2, 1 + eos_count) * num_beams
    top_num_beam_mask = torch.cat(
        (torch.ones(num_beams, dtype=torch.bool), torch.zeros(beams_to_keep - num_beams, dtype=torch.bool))
    ).to(device)
    all_scores: tuple[torch.Tensor, ...] | None = () if output_scores else None
    raw_logits: tuple[torch.Tensor, ...] | None = () if output_logits else None

    running_sequences = torch.full(
        (batch, num_beams, max_length), fill_value, dtype=torch.int64, device=device
    )
    running_sequences[:, :, :prompt] = input_ids.reshape(batch, num_beams, prompt)
    sequences = running_sequences.clone()
    running_beam_scores = torch.zeros((batch, num_beams), dtype=torch.float, device=device)
    running_beam_scores[:, 1:] = _NEG  # only the first beam's tokens count at the first step
    beam_scores = torch.full((batch, num_beams), _NEG, dtype=torch.float, device=device)
    is_sent_finished = torch.zeros((batch, num_beams), dtype=torch.bool, device=device)
    heuristic_unsatisfied = torch.ones((batch, 1), dtype=torch.bool, device=device)
    running_beam_indices = torch.full(
        (batch, num_beams, max_length - prompt), -1, dtype=torch.int32, device=device
    )
    beam_indices = running_beam_indices.clone()

    cur_len = prompt
    finished = False
    while not finished:
        flat_running = _flatten(running_sequences[:, :, :cur_len])
        logits = decoder(flat_running)  # [B * beams, V] float32
        vocab = logits.shape[-1]
        log_probs = process(flat_running, torch.log_softmax(logits, dim=-1))
        if raw_logits is not None:
            raw_logits += (logits.clone(),)
        if all_scores is not None:
            all_scores += (log_probs.clone(),)
        log_probs = log_probs.reshape(batch, num_beams, vocab) + running_beam_scores[:, :, None]
        log_probs = log_probs.reshape(batch, num_beams * vocab)

        topk_log_probs, topk_sequences, topk_beam_indices = _top_k_continuations(
            log_probs, running_sequences, running_beam_indices, cur_len, prompt, do_sample, generator,
            beams_to_keep, num_beams, vocab,
        )  # fmt: skip
        hits = stops(_flatten(topk_sequences[:, :, : cur_len + 1]), all_scores)
        hits = hits.reshape(batch, beams_to_keep)

        running_sequences, running_beam_scores, running_beam_indices = _running_beams_for_next_step(
            topk_log_probs, topk_sequences, topk_beam_indices, hits, num_beams
        )
        sequences, beam_scores, beam_indices, is_sent_finished = _update_finished_beams(
            sequences, topk_sequences, beam_scores, topk_log_probs, beam_indices, topk_beam_indices,
            heuristic_unsatisfied, is_sent_finished, hits, top_num_beam_mask, num_beams, cur_len, prompt,
            length_penalty, early_stopping,
        )  # fmt: skip
        decoder.reorder(_flatten(running_beam_indices[..., cur_len - prompt]).long())
        cur_len += 1
        heuristic_unsatisfied = _check_early_stop_heuristic(
            heuristic_unsatisfied, running_beam_scores, beam_scores, is_sent_finished, cur_len, max_length,
            prompt, early_stopping, length_penalty,
        )  # fmt: skip
        finished = not bool(_has_unfinished(heuristic_unsatisfied, is_sent_finished, hits, early_stopping))

    sequences = _flatten(sequences[:, :num_return_sequences, :])
    beam_scores = _flatten(beam_scores[:, :num_return_sequences])
    beam_indices = _flatten(beam_indices[:, :num_return_sequences, :])
    # beam_indices is -1 past each sequence's end: its widest row is the output's new length
    generated = int((beam_indices + 1).bool().sum(dim=1).max())
    return BeamResult(
        sequences=sequences[:, : prompt + generated],
        sequences_scores=beam_scores,
        beam_indices=beam_indices[:, :generated],
        scores=all_scores,
        logits=raw_logits,
    )


# --------------------------------------------------------------------------- Transformers' steps


def _flatten(tensor: torch.Tensor) -> torch.Tensor:
    """[B, beams, ...] -> [B * beams, ...]"""
    return tensor.reshape(tensor.shape[0] * tensor.shape[1], *tensor.shape[2:])


def _gather_beams(tensor: torch.Tensor, beam_indices: torch.Tensor) -> torch.Tensor:
    """tensor[b, beam_indices[b, j], ...] for each b, j."""
    while beam_indices.dim() < tensor.dim():
        beam_indices = beam_indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, beam_indices, dim=1)


def _top_k_continuations(
    log_probs,
    running_sequences,
    running_beam_indices,
    cur_len,
    prompt,
    do_sample,
    generator,
    k,
    num_beams,
    vocab,
):
    if do_sample:
        topk_indices = torch.multinomial(torch.softmax(log_probs, dim=-1), num_samples=k, generator=generator)
        topk_log_probs = torch.gather(log_probs, 1, topk_indices)
    else:
        topk_log_probs, topk_indices = torch.topk(log_probs, k=k)
    beam = topk_indices // vocab
    topk_beam_indices = _gather_beams(running_beam_indices, beam)
    topk_sequences = _gather_beams(running_sequences, beam)
    topk_sequences[:, :, cur_len] = topk_indices % vocab
    offset = torch.arange(log_probs.shape[0], device=log_probs.device).view(-1, 1) * num_beams
    topk_beam_indices[:, :, cur_len - prompt] = (beam + offset).to(topk_beam_indices.dtype)
    return topk_log_probs, topk_sequences, topk_beam_indices


def _running_beams_for_next_step(topk_log_probs, topk_sequences, topk_beam_indices, hits, num_beams):
    # finished candidates must not run on
    running_log_probs = topk_log_probs + hits.to(torch.float32) * _NEG
    best = torch.topk(running_log_probs, k=num_beams)[1]
    return (
        _gather_beams(topk_sequences, best),
        _gather_beams(running_log_probs, best),
        _gather_beams(topk_beam_indices, best),
    )


def _update_finished_beams(
    sequences, topk_sequences, beam_scores, topk_log_probs, beam_indices, topk_beam_indices,
    heuristic_unsatisfied, is_sent_finished, hits, top_num_beam_mask, num_beams, cur_len, prompt,
    length_penalty, early_stopping,
):  # fmt: skip
    # only the top `num_beams` candidates may become finished hypotheses
    just_finished = hits & top_num_beam_mask[None, :]
    scores = topk_log_probs / ((cur_len + 1 - prompt) ** length_penalty)
    full = torch.all(is_sent_finished, dim=-1, keepdim=True) & (early_stopping is True)
    scores = scores + full.to(torch.float32) * _NEG
    scores = scores + (~heuristic_unsatisfied).to(torch.float32) * _NEG
    scores = scores + (~just_finished) * _NEG
    merged_scores = torch.cat((beam_scores, scores), dim=1)
    best = torch.topk(merged_scores, k=num_beams)[1]
    return (
        _gather_beams(torch.cat((sequences, topk_sequences), dim=1), best),
        _gather_beams(merged_scores, best),
        _gather_beams(torch.cat((beam_indices, topk_beam_indices), dim=1), best),
        _gather_beams(torch.cat((is_sent_finished, just_finished), dim=1), best),
    )


def _check_early_stop_heuristic(
    heuristic_unsatisfied, running_beam_scores, beam_scores, is_sent_finished, cur_len, max_length, prompt,
    early_stopping, length_penalty,
):  # fmt: skip
    """Can a running beam still beat the worst finished one? (Transformers' heuristic: the best
    running score at the current length, or at `max_length` for "never" with a positive penalty.)"""
    if early_stopping == "never" and length_penalty > 0.0:
        best_length = max_length - prompt
    else:
        best_length = cur_len - prompt
    best_running = running_beam_scores[:, :1] / (best_length**length_penalty)
    worst_finished = torch.where(is_sent_finished, torch.min(beam_scores, dim=1, keepdim=True)[0], _NEG)
    return heuristic_unsatisfied & torch.any(best_running > worst_finished, dim=-1, keepdim=True)


def _has_unfinished(heuristic_unsatisfied, is_sent_finished, hits, early_stopping) -> torch.Tensor:
    improvement_possible = torch.any(heuristic_unsatisfied)
    open_beam = ~(torch.all(is_sent_finished) & (early_stopping is True))
    valid_continuations = ~torch.all(hits)
    return improvement_possible & open_beam & valid_continuations
