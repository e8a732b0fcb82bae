"""`fmodel.generate`: greedy, sampled and beam-search decoding with an explicit KV cache.

The loop follows gpt-fast: one prefill forward over the prompt, then one forward per new
token over a cache allocated once for prompt + new tokens (`fmodel.generation.cache`), so a step
allocates no cache memory (beam search reorders it by beam, `fmodel.generation.cache.reorder_cache`).
The state's tensors are bound to the weightless skeleton once per call (one `functional_call`
around the whole loop) instead of once per token, and each step calls the skeleton directly
with prebuilt arguments: the per-token Python work is the model's own layers plus a few ops.

Results equal Transformers' `generate` for the same settings: same logits processing in the
same order (`fmodel.generation.logits_process`, custom processors before the sampling warpers), position
ids from the attention mask, per-row stopping (EOS, custom criteria) with finished rows padded,
`torch.multinomial` on the same probabilities when sampling (so a seeded global RNG gives
Transformers' samples), and Transformers 4.57's vectorised beam search (`fmodel.generation.beam_search`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from .._checks import check_int_tensor, check_state, check_token_ids, describe
from .._limits import check_allocation
from ..errors import ArgumentTypeError, ConfigError, FModelError, InvalidArgumentError
from ..models import get_spec
from ..state import ModelState
from .config import GenerationConfig
from .decode_loop import (
    GenerateOutput,
    Run,
    StoppingCriterion,
    buffer_bytes,
    initial_capacity,
    outside_inference,
)
from .logits_process import LogitsProcessor

__all__ = ["GenerateOutput", "GenerationConfig", "StoppingCriterion", "Streamer", "generate"]

logger = logging.getLogger("fmodel")


class Streamer(Protocol):
    """Transformers' streamer protocol: `put` gets the prompt [B, P] first, then each step's
    new tokens [B] (on the CPU); `end` is called once at the end."""

    def put(self, value: torch.Tensor) -> None: ...

    def end(self) -> None: ...


def generate(
    state: ModelState,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
    min_new_tokens: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    num_beams: int | None = None,
    num_return_sequences: int | None = None,
    length_penalty: float | None = None,
    early_stopping: bool | str | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    use_cache: bool | None = None,
    logits_processor: Sequence[LogitsProcessor] = (),
    stopping_criteria: Sequence[StoppingCriterion] = (),
    return_dict_in_generate: bool | None = None,
    output_scores: bool | None = None,
    output_logits: bool | None = None,
    generator: torch.Generator | None = None,
    streamer: Streamer | None = None,
    generation_config: GenerationConfig | Mapping[str, Any] | None = None,
    max_length: int | None = None,
    min_length: int | None = None,
    module: nn.Module | None = None,
    decoder_input_ids: torch.Tensor | None = None,
    compile: bool = False,
) -> torch.Tensor | GenerateOutput:
    """Continue each prompt; returns prompt + new tokens [B * n, P + N] (int64), as Transformers.

    Arguments:
        state: a causal LM (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM,
            GPT2LMHeadModel, ...) or an encoder-decoder (T5ForConditionalGeneration: the prompts
            are the encoder's input, padded on either side, the result is the decoder's tokens
            from `decoder_start_token_id` on, as Transformers; `fmodel.generation.seq2seq`); its
            attention implementation is used, custom ones included.
        input_ids: [B, P] prompts; batches are left-padded (pad where `attention_mask` is 0).
        attention_mask: [B, P], 1 for real tokens. Default: inferred as Transformers does
            (tokens != pad_token_id when the pad id occurs and differs from EOS, else all ones).
        max_new_tokens: new tokens at most. Default: the generation config's, else
            `max_length` - P, as Transformers (whose default, max_length 20 not passed to
            the call, means 20 new tokens). `max_new_tokens` wins over `max_length`.
        min_new_tokens / min_length: EOS is suppressed until that many new tokens / tokens.
        do_sample: sample with `torch.multinomial` (using `generator`, default the global RNG).
        temperature, top_k, top_p: sampling warpers (top_k=0 and top_p=1.0 turn theirs off;
            None takes the generation config's, whose top_k is 50 as in Transformers).
        repetition_penalty: 1.0 = off.
        num_beams: > 1 runs beam search (beam sampling with `do_sample`), Transformers 4.57's
            algorithm; `length_penalty` and `early_stopping` (True, False or "never") as there.
        num_return_sequences: n rows per prompt, prompt-major (the n best beams, best first;
            or n independent samples; greedy decoding allows only 1, as Transformers).
        eos_token_id: an id or ids; a row stops at its first EOS and is padded after it with
            `pad_token_id` (default: the first EOS id, as Transformers). The call stops once
            every row has stopped (checked each step: one host sync per token on a GPU).
        use_cache: False recomputes the whole sequence every step (same tokens, slower).
        logits_processor: callables `(tokens [N, L], scores [N, V]) -> scores`, applied after
            the built-in processors and before the sampling warpers, as Transformers orders a
            `generate(logits_processor=...)` list.
        stopping_criteria: callables `(tokens [N, L], scores) -> bool [N]` or a bool for all
            rows (Transformers' `StoppingCriteria`; `scores` is the tuple of scores so far with
            `output_scores`, else None). A criterion with an `eos_token_id` attribute makes
            finished rows padded, as in Transformers.
        return_dict_in_generate: return a `GenerateOutput` instead of the tokens; with
            `output_scores` / `output_logits` it carries each step's scores / raw logits.
        generator: the RNG for sampling.
        streamer: Transformers' protocol: `put(prompt)`, `put(new_tokens [B])` per step, `end()`
            (not with beam search, as Transformers).
        generation_config: defaults for every argument left None (a `GenerationConfig`, e.g.
            from `load_generation_config`, or its dict); without one, the model config's
            token ids and Transformers' defaults (`GenerationConfig.from_model_config`).
        max_length / min_length: Transformers' length limits counting the prompt.
        decoder_input_ids: encoder-decoders only: [B, P'] ids the decoder continues (the start
            token is put first unless every row begins with it, as Transformers); default the
            start token alone.
        module: run this module instead of the cached skeleton, as in `fmodel.forward` (the
            facade passes its own module tree, so its hooks fire).
        compile: run each one-token decode step through the compiled step
            (`fmodel.generation.compiled_step`: exported and compiled ahead of time once per
            model shape, dtype and batch size, kept on disk, no Python per layer); prefill,
            logits processing, sampling and beam bookkeeping stay in Python. Same tokens as
            eager (logits equal up to float rounding). A model or setting it cannot run
            (`compiled_step.unsupported_reason`, `use_cache=False`, a `module` of your own, a
            failed compile) runs eagerly with a warning saying why.

    Returns:
        A new int64 tensor [B * n, P + N], N <= max_new_tokens (fewer when every row stopped),
        or, with `return_dict_in_generate`, a `GenerateOutput` holding it.

    Purity: `state`, `input_ids` and `attention_mask` are never written; the KV cache is
    private to the call. The global RNG is consumed only when sampling without `generator`.

    Long generations: the cache and buffers are allocated for at most
    `decode_loop.PREALLOCATED_NEW_TOKENS` new tokens up front and doubled as needed, so a huge
    `max_new_tokens` runs (until EOS) as in Transformers; beam search allocates its buffers
    whole (as Transformers), and what cannot fit in memory is refused before allocating.

    Raises:
        ArgumentTypeError: `state` is not a `ModelState`, `input_ids` / `attention_mask` not
            integer tensors, `generator` / `streamer` / processors of the wrong type.
        TokenIdError: a prompt id outside the vocabulary (which id, where, the vocabulary size).
        InvalidArgumentError: a model with learned positions (GPT-2) cannot address prompt +
            new tokens.
        SizeLimitError: the buffers allocated up front would not fit in the device's memory.
        FModelError: the architecture cannot generate.
        ConfigError: contradictory settings (no room for a new token, num_return_sequences > 1
            with greedy decoding or above num_beams, a streamer with beam search).

    Example:
        >>> out = fmodel.generate(state, ids, attention_mask=mask, max_new_tokens=32)
        >>> new_tokens = out[:, ids.shape[1]:]
        >>> beams = fmodel.generate(state, ids, num_beams=4, num_return_sequences=2, max_new_tokens=8)
    """
    overrides = {
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": min_new_tokens,
        "do_sample": do_sample,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "repetition_penalty": repetition_penalty,
        "num_beams": num_beams,
        "num_return_sequences": num_return_sequences,
        "length_penalty": length_penalty,
        "early_stopping": early_stopping,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "use_cache": use_cache,
        "return_dict_in_generate": return_dict_in_generate,
        "output_scores": output_scores,
        "output_logits": output_logits,
        "max_length": max_length,
        "min_length": min_length,
    }
    check_state(state, "generate(state)")
    if not isinstance(compile, bool):
        raise ArgumentTypeError(f"generate(compile) must be True or False, got {describe(compile)}")
    if module is not None and not isinstance(module, nn.Module):
        raise ArgumentTypeError(f"generate(module) must be a torch.nn.Module or None, got {describe(module)}")
    _check_callables(generator, streamer, logits_processor, stopping_criteria)
    config = _resolve_config(state, generation_config, {k: v for k, v in overrides.items() if v is not None})
    _check_generate(state, input_ids, attention_mask, config)
    if streamer is not None and config.num_beams > 1:
        raise ConfigError("generate: a streamer cannot be used with beam search; use num_beams=1")
    seq2seq = _is_encoder_decoder(state)
    decoder_prompt = None
    if seq2seq:  # the loop runs over decoder tokens, from the start token or a decoder prompt
        from .seq2seq import decoder_prompt_ids

        decoder_prompt = decoder_prompt_ids(state, config, input_ids, decoder_input_ids)
    elif decoder_input_ids is not None:
        raise InvalidArgumentError(
            f"generate(decoder_input_ids) is for encoder-decoders (T5); {state.architecture} continues input_ids"
        )
    p = decoder_prompt.shape[1] if seq2seq else input_ids.shape[1]
    new = _new_tokens(config, p, max_length is not None, state.config)
    if config.min_new_tokens is not None:  # as Transformers: min_new_tokens replaces min_length
        config = config.replace(min_length=p + config.min_new_tokens)
    positions = getattr(state.config, "n_positions", None)
    if positions is not None and p + new > positions:
        raise InvalidArgumentError(
            f"generate: {state.architecture} has {positions} learned positions; the prompt ({p}) plus "
            f"{new} new tokens do not fit (max_new_tokens <= {positions - p})"
        )
    rows = input_ids.shape[0] * max(config.num_beams, config.num_return_sequences)
    capacity = initial_capacity(p, new, config.num_beams)
    device = input_ids.device if state.device.type == "meta" else state.device
    check_allocation(
        buffer_bytes(state, rows, capacity, config),
        what=(
            f"generate(max_new_tokens={new}, num_beams={config.num_beams}, num_return_sequences="
            f"{config.num_return_sequences}): {rows} rows x {capacity} positions of KV cache and buffers"
        ),
        device=device,
    )
    eos = torch.tensor(config.eos_token_ids, device=input_ids.device) if config.eos_token_ids else None
    pad = config.pad_token_id if config.pad_token_id is not None else (config.eos_token_ids or (None,))[0]
    if attention_mask is None:
        attention_mask = _infer_attention_mask(input_ids, pad, config.eos_token_ids)
    expand = max(config.num_beams, config.num_return_sequences)
    if expand > 1 and not seq2seq:  # Transformers' _expand_inputs_for_generation
        input_ids = input_ids.repeat_interleave(expand, dim=0)
        attention_mask = None if attention_mask is None else attention_mask.repeat_interleave(expand, dim=0)
    if seq2seq:  # the encoder runs once, then its output is repeated (fmodel.generation.seq2seq)
        from .seq2seq import Seq2SeqRun

        run = Seq2SeqRun(
            state,
            config,
            p,
            new,
            eos,
            pad,
            tuple(logits_processor),
            tuple(stopping_criteria),
            expand=expand,
            decoder_prompt=decoder_prompt,
        )
    else:
        compiled = _compiled_step(state, config, rows, module) if compile else None
        run = Run(
            state, config, p, new, eos, pad, tuple(logits_processor), tuple(stopping_criteria), compiled
        )
    with torch.inference_mode():
        out = run(input_ids, attention_mask, generator, streamer, module)
    out = outside_inference(out)  # normal tensors autograd can use later
    return out if config.return_dict_in_generate else out.sequences


def _compiled_step(state: ModelState, config: GenerationConfig, rows: int, module):
    """The compiled step for `generate(compile=True)`, or None (eager) with a warning saying why."""
    from ..models.skeleton import skeleton
    from .compiled_step import load_step, unsupported_reason

    reason = unsupported_reason(state)
    if reason is None and not config.use_cache:
        reason = "use_cache=False (the compiled step runs over a KV cache)"
    if reason is None and module is not None and module is not skeleton(state.config, state.architecture):
        reason = "a module of your own was passed (its hooks run only eagerly)"
    if reason is None:
        try:
            return load_step(state, rows, state.dtype)
        except Exception as exc:  # export or compile failed: said, then the eager step runs
            reason = f"compiling it failed ({type(exc).__name__}: {exc})"
    logger.warning("generate(compile=True): decoding eagerly: %s", reason)
    return None


def _resolve_config(state: ModelState, given, overrides: dict[str, Any]) -> GenerationConfig:
    if given is None:
        config = GenerationConfig.from_model_config(state.config)
    elif isinstance(given, GenerationConfig):
        config = given
    elif isinstance(given, Mapping):
        config = GenerationConfig.from_dict(given)
    else:
        raise ArgumentTypeError(
            f"generate(generation_config) must be a GenerationConfig or a dict, got {describe(given)}"
        )
    config = config.replace(**overrides)
    n, beams = config.num_return_sequences, config.num_beams
    if n != 1 and beams == 1 and not config.do_sample:
        raise ConfigError(
            f"generate: greedy decoding returns one sequence per prompt, got num_return_sequences={n}; "
            f"use num_beams >= {n} or do_sample=True"
        )
    if beams > 1 and n > beams:
        raise ConfigError(f"generate: num_return_sequences ({n}) must be <= num_beams ({beams})")
    if beams < 1 or n < 1:
        raise ConfigError(f"generate: num_beams ({beams}) and num_return_sequences ({n}) must be >= 1")
    ignored = config.ignored_fields()
    if ignored:
        logger.warning(
            "generate: fmodel does not implement these generation settings and ignores them: %s", ignored
        )
    return config


def _new_tokens(config: GenerationConfig, prompt: int, explicit_max_length: bool, model_config) -> int:
    """How many tokens to generate at most, by Transformers' `_prepare_generated_length` rules:
    `max_new_tokens` when set; else `max_length` - prompt, except that Transformers' default
    max_length (20, not passed to the call) means 20 new tokens, within the model's
    `max_position_embeddings`."""
    if config.max_new_tokens is not None:
        new = config.max_new_tokens
    elif not explicit_max_length and config.max_length == GenerationConfig().max_length:
        total = prompt + config.max_length
        limit = getattr(model_config, "max_position_embeddings", None)
        new = (min(total, limit) if limit is not None else total) - prompt
    else:
        new = config.max_length - prompt
    if new < 1:
        raise FModelError(
            f"generate: no room for new tokens: max_length={config.max_length} (max_new_tokens="
            f"{config.max_new_tokens}) with a prompt of {prompt} tokens; pass max_new_tokens >= 1"
        )
    return new


def _check_generate(state: ModelState, input_ids, attention_mask, config: GenerationConfig) -> None:
    if get_spec(state.architecture).output not in ("causal_lm", "seq2seq_lm"):
        raise FModelError(
            f"generate: {state.architecture} has no language-model head and cannot generate; load the "
            f"checkpoint as a causal LM (e.g. LlamaForCausalLM, GPT2LMHeadModel) or a seq2seq LM "
            f"(T5ForConditionalGeneration)"
        )
    check_int_tensor(input_ids, "generate(input_ids)")
    if input_ids.dim() != 2:
        raise InvalidArgumentError(
            f"generate: input_ids must be an integer tensor [batch, seq], got {input_ids!r:.80}"
        )
    if input_ids.shape[1] == 0:
        raise InvalidArgumentError("generate: the prompt is empty; pass at least one token (e.g. the BOS id)")
    if input_ids.device != state.device and state.device.type != "meta":  # meta: offloaded (accelerate)
        raise InvalidArgumentError(
            f"generate: input_ids are on {input_ids.device} but the model is on {state.device}"
        )
    check_token_ids(input_ids, _vocab_size(state), "generate(input_ids)")
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise ArgumentTypeError(
            f"generate(attention_mask) must be a tensor [batch, seq], got {describe(attention_mask)}"
        )
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise InvalidArgumentError(
            f"generate: attention_mask must have the prompt's shape {list(input_ids.shape)}, "
            f"got {list(attention_mask.shape)}"
        )


def _is_encoder_decoder(state: ModelState) -> bool:
    return bool(getattr(get_spec(state.architecture).build, "is_encoder_decoder", False))


def _vocab_size(state: ModelState) -> int | None:
    matrix = state.params.get(get_spec(state.architecture).input_embeddings)
    return int(matrix.shape[-2]) if matrix is not None and matrix.dim() >= 2 else None


def _check_callables(generator, streamer, logits_processor, stopping_criteria) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ArgumentTypeError(
            f"generate(generator) must be a torch.Generator or None, got {describe(generator)}"
        )
    if streamer is not None and not (
        callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))
    ):
        raise ArgumentTypeError(
            f"generate(streamer) must have put() and end() methods, got {describe(streamer)}"
        )
    for name, given in (("logits_processor", logits_processor), ("stopping_criteria", stopping_criteria)):
        if isinstance(given, (str, bytes)) or (callable(given) and not isinstance(given, (list, tuple))):
            raise ArgumentTypeError(
                f"generate({name}) must be a list of callables, got {describe(given)}; wrap it in a list"
            )
        try:
            items = list(given or ())
        except TypeError:
            raise ArgumentTypeError(
                f"generate({name}) must be a list of callables, got {describe(given)}"
            ) from None
        for item in items:
            if not callable(item):
                raise ArgumentTypeError(f"generate({name}) must hold callables, got {describe(item)}")


def _infer_attention_mask(
    input_ids: torch.Tensor, pad: int | None, eos: tuple[int, ...]
) -> torch.Tensor | None:
    """Transformers' `_prepare_attention_mask_for_generation`: mask out the pad id when it occurs
    and is not an EOS id; otherwise every token is real (None)."""
    if pad is None or pad in eos or not bool((input_ids == pad).any()):
        return None
    return (input_ids != pad).long()
