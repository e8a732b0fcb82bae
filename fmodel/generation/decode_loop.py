"""The decoding loops behind `fmodel.generate`: the model as a per-step decoder (KV cache or
full recompute), the greedy / sampling loop, and the call into `fmodel.generation.beam_search`.

Everything here runs under `torch.inference_mode()` inside one `generate` call; the cache and
token buffers are private to that call.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import torch
from torch import nn

from .. import attention
from ..errors import ConfigError
from ..forward import run_bound
from ..models.skeleton import skeleton
from ..state import ModelState
from .beam_search import beam_search
from .cache import KVCache, init_cache, reorder_cache
from .config import GenerationConfig
from .logits_process import LogitsProcessor, needs_processing, process_logits

__all__ = ["GenerateOutput", "Run", "StoppingCriterion", "outside_inference"]

StoppingCriterion = Callable[[torch.Tensor, Any], Any]
"""`(tokens [N, L], scores so far or None) -> bool [N] (or one bool for every row)`: Transformers'
`StoppingCriteria` call; a row is finished once any criterion says so."""


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for a generation's token loop, as it was after.
    Each step makes a few container objects (cache values, outputs), so the collector would run
    every few hundred steps' worth, walking every object the process holds (a loaded model's
    modules included): ~5 % of a compiled SmolLM2 decode's time, measured with perf. Reference
    counting still frees everything that is not a cycle; the cycles wait for the next pass."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@attrs.frozen(eq=False)
class GenerateOutput:
    """`generate(..., return_dict_in_generate=True)`: Transformers' `GenerateDecoderOnlyOutput`
    (and, for beam search, `GenerateBeamDecoderOnlyOutput`) fields.

    Attributes:
        sequences: [B * n, P + N] int64 (n = num_return_sequences).
        scores: with `output_scores`, per step the processed scores [B * rows, vocab] (beam
            search: log-probabilities of every running beam), else None.
        logits: with `output_logits`, per step the raw float32 logits, else None.
        sequences_scores: beam search with `output_scores`: [B * n] final beam scores.
        beam_indices: beam search: [B * n, N] int32, the beam each new token came from.
        past_key_values: the final `KVCache` (None with `use_cache=False`).
    """

    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    sequences_scores: torch.Tensor | None = None
    beam_indices: torch.Tensor | None = None
    past_key_values: KVCache | None = None


class _Decoder:
    """The model, one forward per step: with the cache, the tokens it has not seen yet; without,
    the whole sequence. Position ids come from the attention mask (Transformers'
    `prepare_inputs_for_generation`): positions count real tokens only."""

    def __init__(
        self, state, model, mask, rows, total, use_cache, device, capacity=None, compiled=None
    ) -> None:
        self.model = model
        self.state = state
        self.attn = attention.get(state.attn_implementation)
        self.total = total
        self.capacity = total if capacity is None else min(capacity, total)
        self.mask = self.positions = None
        if mask is not None and not bool(mask.all()):
            p = mask.shape[1]
            self.mask = torch.ones(rows, self.capacity, dtype=torch.long, device=mask.device)
            self.mask[:, :p] = mask
            self.positions = _positions(self.mask)
        # weights offloaded by accelerate sit on meta: the cache goes where the inputs run
        device = device if state.device.type == "meta" else None
        self.cache = init_cache(state, rows, self.capacity, device=device) if use_cache else None
        self.seen = 0
        # A family whose rotary tables change with the length (Phi-3's longrope) names the
        # length at which the cache is dropped and the whole sequence runs again, as its
        # Transformers `prepare_inputs_for_generation` does.
        self.recompute_at = getattr(model, "recompute_cache_at", None)
        # A compiled one-token step (`fmodel.generation.compiled_step`) over the same cache, its
        # inputs kept as one list rebuilt only when the cache or mask buffers change.
        self.compiled = compiled if self.cache is not None else None
        self._flat: list[torch.Tensor] | None = None
        self._flat_for: tuple[Any, ...] = ()

    def _grow(self, need: int) -> None:
        """Room for `need` positions: double the capacity (with a compiled step, which attends
        over the whole buffer: grow by half, at least `COMPILED_STEP_SLOTS`), at most `total`,
        copying what the cache and the mask hold. Only long generations (more new tokens than
        were allocated up front, see `initial_capacity`) get here; amortised, a few copies."""
        grown = 2 * self.capacity
        if self.compiled is not None:
            grown = self.capacity + max(COMPILED_STEP_SLOTS, self.capacity // 2)
        size = min(self.total, max(need, grown))
        if self.mask is not None:
            mask = torch.ones(self.mask.shape[0], size, dtype=self.mask.dtype, device=self.mask.device)
            mask[:, : self.capacity] = self.mask
            self.mask, self.positions = mask, _positions(mask)
        if self.cache is not None:
            self.cache = _grown_cache(self.cache, size)
        self.capacity = size

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        if length > self.capacity:
            self._grow(length)
        if (
            self.cache is not None
            and self.recompute_at is not None
            and self.seen < self.recompute_at <= length
        ):
            self.cache, self.seen = self.cache.truncate(0), 0
        start = self.seen if self.cache is not None else 0
        if (
            self.compiled is not None
            and length - start == 1
            and start > 0
            and self.capacity <= self.compiled.max_capacity
        ):
            return self._compiled_step(tokens, start)
        out = self.model(
            tokens[:, start:],
            attention_mask=None if self.mask is None else self.mask[:, :length],
            position_ids=None if self.positions is None else self.positions[:, start:length],
            attn=self.attn,
            past_key_values=self.cache,
            logits_to_keep=1,
        )
        if self.cache is not None:
            self.cache, self.seen = out["past_key_values"], length
        return out["logits"][:, -1].float()  # [N, V]

    def _compiled_step(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """The step for the token at position `start` through the compiled step: same logits
        (up to float rounding), same cache writes, no Python per layer."""
        cache, mask = self.cache, self.mask
        if not self._flat_for or self._flat_for[0] is not cache.keys or self._flat_for[1] is not mask:
            rows = tokens.shape[0]
            self._token = torch.empty(rows, 1, dtype=torch.long, device=tokens.device)
            self._position = torch.empty(rows, 1, dtype=torch.long, device=tokens.device)
            self._slot = torch.empty(1, dtype=torch.long, device=tokens.device)
            padding = (
                mask
                if mask is not None
                else torch.ones(rows, self.capacity, dtype=torch.long, device=tokens.device)
            )
            fixed = self.compiled.inputs(self.state, cache)
            self._flat = [*fixed, self._token, self._position, self._slot, padding.contiguous()]
            self._flat_for = (cache.keys, mask)
        self._token.copy_(tokens[:, start : start + 1])
        if self.positions is None:
            self._position.fill_(start)
        else:
            self._position.copy_(self.positions[:, start : start + 1])
        self._slot.fill_(start)
        logits = self.compiled.run(self._flat)
        self.cache, self.seen = cache.advance(1), start + 1
        return logits  # [N, V] float32

    def reorder(self, rows: torch.Tensor) -> None:
        if self.cache is not None:
            self.cache = reorder_cache(self.cache, rows)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only (padding slots get 1, as Transformers)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def _grown_cache(cache: KVCache, size: int) -> KVCache:
    def grow(t: torch.Tensor) -> torch.Tensor:
        new = t.new_zeros(t.shape[0], t.shape[1], size, t.shape[3])
        new[:, :, : cache.length] = t[:, :, : cache.length]
        return new

    return KVCache(tuple(grow(k) for k in cache.keys), tuple(grow(v) for v in cache.values), cache.length)


PREALLOCATED_NEW_TOKENS = 4096
"""Greedy / sampled generation allocates the cache, mask and token buffers for this many new
tokens up front (all of them when fewer are asked for) and doubles them when a longer
generation gets there: `max_new_tokens=10**9` then runs as in Transformers (until EOS or a
stopping criterion) instead of trying to allocate 10**9 positions. Beam search allocates its
buffers whole, as Transformers' does."""


COMPILED_STEP_SLOTS = 64
"""With a compiled step (greedy / sampled), the cache starts with room for this many new tokens
and grows by half (at least this many) as the generation gets there: the compiled step attends
over its whole buffer, masked (it has one shape for every length), so a buffer sized for
`max_new_tokens` up front would cost every early step the attention over empty slots
(SmolLM2-135M: ~7 us per slot per step)."""


def initial_capacity(prompt: int, new: int, num_beams: int, compiled: bool = False) -> int:
    """Positions allocated before the first step (see `PREALLOCATED_NEW_TOKENS` and, for a
    compiled step, `COMPILED_STEP_SLOTS`)."""
    if num_beams > 1:
        return prompt + new
    if compiled:
        return prompt + min(new, COMPILED_STEP_SLOTS)
    return prompt + min(new, PREALLOCATED_NEW_TOKENS)


def buffer_bytes(state: ModelState, rows: int, capacity: int, config: GenerationConfig) -> int:
    """Bytes `generate` allocates up front for `rows` sequences of `capacity` positions: the
    KV cache, the token / mask / position buffers and, for beam search, its running buffers.
    For `fmodel._limits.check_allocation` before anything is allocated."""
    from .cache import _cache_shapes

    itemsize = state.dtype.itemsize
    per_position = 8 * 3  # tokens, mask, positions (int64)
    if config.use_cache:
        per_position += sum(2 * heads * dim for heads, dim in _cache_shapes(state)) * itemsize
    if config.num_beams > 1:
        per_position += 8 * (2 + 2 * max(2, 1 + len(config.eos_token_ids))) + 4 * 2
    return rows * capacity * per_position


@attrs.frozen
class Run:
    """One `generate` call's settings; `__call__` runs the decoding (under inference mode)."""

    state: ModelState
    config: GenerationConfig
    prompt: int
    new: int
    eos: torch.Tensor | None
    pad: int | None
    processors: tuple[LogitsProcessor, ...]
    criteria: tuple[StoppingCriterion, ...]
    compiled: Any = None  # a `compiled_step.CompiledStep` for the one-token steps, or None

    def __call__(self, input_ids, mask, generator, streamer, module) -> GenerateOutput:
        rows, total = input_ids.shape[0], self.prompt + self.new
        capacity = initial_capacity(self.prompt, self.new, self.config.num_beams, self.compiled is not None)
        if module is None:
            module = skeleton(self.state.config, self.state.architecture)

        def loop(model: nn.Module) -> GenerateOutput:
            decoder = _Decoder(
                self.state,
                model,
                mask,
                rows,
                total,
                self.config.use_cache,
                input_ids.device,
                capacity,
                self.compiled,
            )
            with collector_paused():
                if self.config.num_beams > 1:
                    out = self._beams(decoder, input_ids, generator)
                else:
                    out = self._sample(decoder, input_ids, generator, streamer)
            return attrs.evolve(out, past_key_values=decoder.cache)

        return run_bound(self.state, module, loop)

    def _process(self, min_tokens_to_keep: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        if not needs_processing(self.config, self.eos is not None, self.processors):
            return lambda tokens, scores: scores
        return lambda tokens, scores: process_logits(
            scores, tokens, self.prompt, self.config, self.eos, self.processors, min_tokens_to_keep
        )

    def _stops(self, tokens: torch.Tensor, scores) -> torch.Tensor:
        """Transformers' stopping criteria: max length, EOS, then the caller's; bool [N]."""
        done = torch.full((tokens.shape[0],), tokens.shape[1] >= self.prompt + self.new, device=tokens.device)
        if self.eos is not None:
            done = done | torch.isin(tokens[:, -1], self.eos)
        for criterion in self.criteria:
            done = done | criterion(tokens, scores)
        return done

    def _sample(self, decoder: _Decoder, input_ids, generator, streamer) -> GenerateOutput:
        config, p = self.config, self.prompt
        rows = input_ids.shape[0]
        tokens = torch.empty(
            rows, min(p + self.new, decoder.capacity), dtype=torch.long, device=input_ids.device
        )
        tokens[:, :p] = input_ids
        # as Transformers: finished rows get padding when a criterion is about EOS
        pad_finished = self.eos is not None or any(hasattr(c, "eos_token_id") for c in self.criteria)
        if pad_finished and self.pad is None:
            raise ConfigError("generate: a stopping criterion has an eos_token_id; pass pad_token_id too")
        process = self._process(1)
        scores = () if config.output_scores else None
        raw = () if config.output_logits else None
        unfinished = torch.ones(rows, dtype=torch.bool, device=input_ids.device)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        length = p
        for _ in range(self.new):
            logits = decoder(tokens[:, :length])
            step_scores = process(tokens[:, :length], logits)
            if scores is not None:
                scores += (step_scores,)
            if raw is not None:
                raw += (logits,)
            if length == tokens.shape[1]:  # a long generation outgrew the first allocation
                wider = torch.empty(
                    rows, min(p + self.new, 2 * length), dtype=torch.long, device=tokens.device
                )
                wider[:, :length] = tokens[:, :length]
                tokens = wider
            if config.do_sample:
                probs = torch.softmax(step_scores, dim=-1)
                next_tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
            else:
                next_tokens = torch.argmax(step_scores, dim=-1)
            if pad_finished:
                next_tokens = torch.where(unfinished, next_tokens, self.pad)
            tokens[:, length] = next_tokens
            length += 1
            if streamer is not None:
                streamer.put(next_tokens.cpu())
            unfinished = unfinished & ~self._stops(tokens[:, :length], scores)
            if not bool(unfinished.any()):
                break
        if streamer is not None:
            streamer.end()
        return GenerateOutput(tokens[:, :length], scores=scores, logits=raw)

    def _beams(self, decoder: _Decoder, input_ids, generator) -> GenerateOutput:
        config, eos = self.config, self.eos
        # Transformers: the pad id, unless it is 0 or unset (then the first EOS id); -1 without EOS
        fill = (self.pad or int(eos[0])) if eos is not None else -1
        result = beam_search(
            decoder,
            input_ids,
            num_beams=config.num_beams,
            max_length=self.prompt + self.new,
            process=self._process(len(eos) + 1 if eos is not None else 2),
            stops=self._stops,
            eos_count=0 if eos is None else len(eos),
            fill_value=fill,
            length_penalty=config.length_penalty,
            early_stopping=config.early_stopping,
            do_sample=config.do_sample,
            generator=generator,
            num_return_sequences=config.num_return_sequences,
            output_scores=config.output_scores,
            output_logits=bool(config.output_logits),
        )
        return GenerateOutput(
            result.sequences,
            scores=result.scores,
            logits=result.logits,
            sequences_scores=result.sequences_scores if config.output_scores else None,
            beam_indices=result.beam_indices,
        )


def outside_inference(out: GenerateOutput) -> GenerateOutput:
    """Copies of the tensors made under inference mode, usable by autograd (the cache stays)."""

    def copy(value):
        if isinstance(value, tuple):
            return tuple(t.clone() for t in value)
        return None if value is None else value.clone()

    return attrs.evolve(
        out,
        sequences=copy(out.sequences),
        scores=copy(out.scores),
        logits=copy(out.logits),
        sequences_scores=copy(out.sequences_scores),
        beam_indices=copy(out.beam_indices),
    )
