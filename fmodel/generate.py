"""`fmodel.generate`: greedy / sampled decoding with an explicit, preallocated KV cache.

The loop follows gpt-fast: one prefill forward over the prompt, then one forward per new
token over a cache allocated once for prompt + new tokens (`fmodel.cache`), so a step
allocates no cache memory. The state's tensors are bound to the weightless skeleton once per
call (one `functional_call` around the whole loop) instead of once per token, and each step
calls the skeleton directly with prebuilt arguments: the per-token Python work is the model's
own layers plus a few tensor ops.

Results equal Transformers' `generate` for the same settings: same logits processing in the
same order (`fmodel.logits_process`), position ids from the attention mask, per-row EOS
stopping with finished rows padded, and `torch.multinomial` on the same probabilities when
sampling (so a seeded global RNG gives Transformers' samples).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from . import attention
from .cache import init_cache
from .errors import FModelError
from .forward import run_bound
from .generation_config import GenerationConfig
from .logits_process import needs_processing, process_logits
from .models import get_spec
from .models.skeleton import skeleton
from .state import ModelState

__all__ = ["GenerationConfig", "Streamer", "generate"]

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
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    streamer: Streamer | None = None,
    generation_config: GenerationConfig | Mapping[str, Any] | None = None,
    max_length: int | None = None,
    min_length: int | None = None,
    module: nn.Module | None = None,
) -> torch.Tensor:
    """Continue each prompt; returns prompt + new tokens [B, P + N] (int64), as Transformers.

    Arguments:
        state: a causal LM (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM,
            GPT2LMHeadModel); its attention implementation is used, custom ones included.
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
        eos_token_id: an id or ids; a row stops at its first EOS and is padded after it with
            `pad_token_id` (default: the first EOS id, as Transformers). The call stops once
            every row has stopped (checked each step: one host sync per token on a GPU).
        generator: the RNG for sampling.
        streamer: Transformers' protocol: `put(prompt)`, `put(new_tokens [B])` per step, `end()`.
        generation_config: defaults for every argument left None (a `GenerationConfig`, e.g.
            from `load_generation_config`, or its dict); without one, the model config's
            token ids and Transformers' defaults (`GenerationConfig.from_model_config`).
        max_length / min_length: Transformers' length limits counting the prompt.
        module: run this module instead of the cached skeleton, as in `fmodel.forward` (the
            facade passes its own module tree, so its hooks fire).

    Returns:
        A new int64 tensor [B, P + N], N <= max_new_tokens (fewer when every row hit EOS).

    Purity: `state`, `input_ids` and `attention_mask` are never written; the KV cache is
    private to the call. The global RNG is consumed only when sampling without `generator`.

    Raises:
        FModelError: the architecture cannot generate, or the settings are unsupported
            (num_beams > 1) or contradictory (no room for a new token).

    Example:
        >>> out = fmodel.generate(state, ids, attention_mask=mask, max_new_tokens=32)
        >>> new_tokens = out[:, ids.shape[1]:]
    """
    overrides = {
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": min_new_tokens,
        "do_sample": do_sample,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "repetition_penalty": repetition_penalty,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "max_length": max_length,
        "min_length": min_length,
    }
    config = _resolve_config(state, generation_config, {k: v for k, v in overrides.items() if v is not None})
    _check_generate(state, input_ids, attention_mask, config)
    p = input_ids.shape[1]
    new = _new_tokens(config, p, max_length is not None, state.config)
    if config.min_new_tokens is not None:  # as Transformers: min_new_tokens replaces min_length
        config = config.replace(min_length=p + config.min_new_tokens)
    positions = getattr(state.config, "n_positions", None)
    if positions is not None and p + new > positions:
        raise FModelError(
            f"generate: {state.architecture} has {positions} learned positions; the prompt ({p}) plus "
            f"{new} new tokens do not fit"
        )
    device = input_ids.device
    eos = torch.tensor(config.eos_token_ids, device=device) if config.eos_token_ids else None
    pad = config.pad_token_id if config.pad_token_id is not None else (config.eos_token_ids or (None,))[0]
    if attention_mask is None:
        attention_mask = _infer_attention_mask(input_ids, pad, config.eos_token_ids)
    with torch.inference_mode():
        tokens = _decode(state, input_ids, attention_mask, config, new, eos, pad, generator, streamer, module)
    return tokens.clone()  # outside inference mode: a normal tensor autograd can use later


def _resolve_config(state: ModelState, given, overrides: dict[str, Any]) -> GenerationConfig:
    if given is None:
        config = GenerationConfig.from_model_config(state.config)
    elif isinstance(given, GenerationConfig):
        config = given
    elif isinstance(given, Mapping):
        config = GenerationConfig.from_dict(given)
    else:
        raise TypeError(f"generation_config must be a GenerationConfig or a dict, got {type(given).__name__}")
    config = config.replace(**overrides)
    if config.num_beams != 1:
        raise FModelError(
            f"generate: beam search is not implemented (num_beams={config.num_beams}); use num_beams=1"
        )
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
    if get_spec(state.architecture).output != "causal_lm":
        raise FModelError(
            f"generate: {state.architecture} has no language-model head and cannot generate; load the "
            f"checkpoint as a causal LM (e.g. LlamaForCausalLM, GPT2LMHeadModel)"
        )
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"generate: input_ids must be an integer tensor [batch, seq], got {input_ids!r:.80}")
    if input_ids.shape[1] == 0:
        raise ValueError("generate: the prompt is empty; pass at least one token (e.g. the BOS id)")
    if input_ids.device != state.device:
        raise ValueError(f"generate: input_ids are on {input_ids.device} but the model is on {state.device}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"generate: attention_mask must have the prompt's shape {list(input_ids.shape)}, "
            f"got {list(attention_mask.shape)}"
        )


def _infer_attention_mask(
    input_ids: torch.Tensor, pad: int | None, eos: tuple[int, ...]
) -> torch.Tensor | None:
    """Transformers' `_prepare_attention_mask_for_generation`: mask out the pad id when it occurs
    and is not an EOS id; otherwise every token is real (None)."""
    if pad is None or pad in eos or not bool((input_ids == pad).any()):
        return None
    return (input_ids != pad).long()


def _decode(
    state: ModelState,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    config: GenerationConfig,
    new: int,
    eos: torch.Tensor | None,
    pad: int | None,
    generator: torch.Generator | None,
    streamer: Streamer | None,
    module: nn.Module | None,
) -> torch.Tensor:
    """The prefill + decode loop (under inference mode). Returns tokens [B, P + steps]."""
    b, p = input_ids.shape
    total = p + new
    device = input_ids.device
    tokens = torch.empty(b, total, dtype=torch.long, device=device)
    tokens[:, :p] = input_ids
    padded = attention_mask is not None and not bool(attention_mask.all())
    mask = positions = None
    if padded:  # positions count real tokens only, as Transformers' prepare_inputs_for_generation
        mask = torch.ones(b, total, dtype=torch.long, device=device)
        mask[:, :p] = attention_mask
        positions = (mask[:, :p].cumsum(-1) - 1).masked_fill(mask[:, :p] == 0, 1)
    cache = init_cache(state, b, total)
    attn = attention.get(state.attn_implementation)
    process = needs_processing(config, eos is not None)
    unfinished = torch.ones(b, dtype=torch.bool, device=device)
    if streamer is not None:
        streamer.put(input_ids.cpu())

    def loop(model: nn.Module) -> int:
        nonlocal cache, positions, unfinished
        step_ids = input_ids
        length = p
        for _ in range(new):
            out = model(
                step_ids,
                attention_mask=None if mask is None else mask[:, :length],
                position_ids=positions,
                attn=attn,
                past_key_values=cache,
                logits_to_keep=1,
            )
            cache = out["past_key_values"]
            scores = out["logits"][:, -1].float()  # [B, V]
            if process:
                scores = process_logits(scores, tokens[:, :length], p, config, eos)
            if config.do_sample:
                probs = torch.softmax(scores, dim=-1)
                next_tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
            else:
                next_tokens = torch.argmax(scores, dim=-1)
            if eos is not None:  # finished rows get padding
                next_tokens = torch.where(unfinished, next_tokens, pad)
            tokens[:, length] = next_tokens
            length += 1
            if streamer is not None:
                streamer.put(next_tokens.cpu())
            if eos is not None:
                unfinished = unfinished & ~torch.isin(next_tokens, eos)
                if not bool(unfinished.any()):
                    break
            step_ids = tokens[:, length - 1 : length]
            if positions is not None:
                positions = positions[:, -1:] + 1
        return length

    if module is None:
        module = skeleton(state.config, state.architecture)
    length = run_bound(state, module, loop)
    if streamer is not None:
        streamer.end()
    return tokens[:, :length]
