"""Encoder-decoder decoding (T5) for `fmodel.generate`.

As Transformers' `generate` for an encoder-decoder: the encoder runs once over the prompts
(then its output and mask are repeated per beam / returned sequence), the decoder starts
from `decoder_start_token_id` and runs one token per step over a `KVCache` of its
self-attention keys/values, with the cross-attention keys/values computed from the encoder
output on the first step and carried in a `Seq2SeqCache`. The token loop, the logits
processing, the stopping rules and beam search are `fmodel.generation.decode_loop`'s own,
over the decoder's tokens: what comes back is [rows, 1 + N], the start token then the new
tokens, as Transformers returns.
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

from ..errors import ConfigError
from ..forward import run_bound
from ..models.skeleton import skeleton
from .cache import KVCache, reorder_cache
from .config import GenerationConfig
from .decode_loop import GenerateOutput, Run, _Decoder, _grown_cache, collector_paused, initial_capacity
from .seq2seq_cache import Seq2SeqCache

__all__ = ["Seq2SeqRun", "decoder_prompt_ids", "decoder_start_token_id", "is_encoder_decoder"]


def is_encoder_decoder(state) -> bool:
    """True for an architecture whose skeleton is an encoder-decoder (T5ForConditionalGeneration)."""
    from ..models import get_spec

    return bool(getattr(get_spec(state.architecture).build, "is_encoder_decoder", False))


def decoder_start_token_id(config: GenerationConfig, model_config) -> int:
    """Transformers' `_get_decoder_start_token_id`: the generation config's
    `decoder_start_token_id`, else the model config's, else the BOS id.

    Raises:
        ConfigError: none of them is set.
    """
    for value in (
        config.extra.get("decoder_start_token_id"),
        getattr(model_config, "decoder_start_token_id", None),
        config.bos_token_id,
    ):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise ConfigError(
        "generate: an encoder-decoder needs a decoder_start_token_id (or bos_token_id) in its "
        "generation config or model config; T5 uses the pad id, 0"
    )


class _Seq2SeqDecoder(_Decoder):
    """The decoder, one forward per step over the encoder output (see the module docstring)."""

    def __init__(self, state, model, encoder_hidden, encoder_mask, rows, total, use_cache, device, capacity):
        super().__init__(state, model, None, rows, total, use_cache, device, capacity)
        self.encoder_hidden = encoder_hidden
        self.encoder_mask = encoder_mask

    def _grow(self, need: int) -> None:
        size = min(self.total, max(need, 2 * self.capacity))
        cache = self.cache
        if isinstance(cache, Seq2SeqCache):
            self.cache = Seq2SeqCache(
                _grown_cache(cache.self_attention, size), cache.cross_keys, cache.cross_values
            )
        elif isinstance(cache, KVCache):
            self.cache = _grown_cache(cache, size)
        self.capacity = size

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        if length > self.capacity:
            self._grow(length)
        start = self.seen if self.cache is not None else 0
        out = self.model(
            None,
            attention_mask=self.encoder_mask,
            attn=self.attn,
            decoder_input_ids=tokens[:, start:],
            encoder_outputs=self.encoder_hidden,
            past_key_values=self.cache,
            logits_to_keep=1,
        )
        if self.cache is not None:
            self.cache, self.seen = out["past_key_values"], length
        return out["logits"][:, -1].float()  # [N, V]

    def reorder(self, rows: torch.Tensor) -> None:
        # Beam search reorders within each prompt's beams, whose encoder outputs (and so their
        # cross-attention keys/values) are the same rows repeated: only the self-attention moves.
        cache = self.cache
        if isinstance(cache, Seq2SeqCache):
            self.cache = Seq2SeqCache(
                reorder_cache(cache.self_attention, rows), cache.cross_keys, cache.cross_values
            )
        elif cache is not None:
            self.cache = reorder_cache(cache, rows)


def decoder_prompt_ids(state, config: GenerationConfig, input_ids: torch.Tensor, decoder_input_ids=None):
    """Transformers' `_prepare_decoder_input_ids_for_generation`: the decoder's prompt [B, P'],
    the start token [B, 1] when none is given, else the given ids with the start token put first
    unless every row already begins with it.

    Raises:
        ArgumentTypeError / InvalidArgumentError / TokenIdError: `decoder_input_ids` is not an
            integer tensor [B, P'] of the prompts' batch and the vocabulary's ids.
        ConfigError: no decoder start token is set (`decoder_start_token_id`).
    """
    from .._checks import check_int_tensor, check_token_ids
    from ..errors import InvalidArgumentError
    from ..forward_checks import vocab_size

    start = decoder_start_token_id(config, state.config)
    first = torch.full((input_ids.shape[0], 1), start, dtype=torch.long, device=input_ids.device)
    if decoder_input_ids is None:
        return first
    check_int_tensor(decoder_input_ids, "generate(decoder_input_ids)")
    if decoder_input_ids.dim() != 2 or decoder_input_ids.shape[0] != input_ids.shape[0]:
        raise InvalidArgumentError(
            f"generate(decoder_input_ids) must be [{input_ids.shape[0]}, length] (a row per prompt), got "
            f"{list(decoder_input_ids.shape)}"
        )
    check_token_ids(decoder_input_ids, vocab_size(state), "generate(decoder_input_ids)")
    ids = decoder_input_ids.to(device=input_ids.device, dtype=torch.long)
    if ids.shape[1] == 0 or bool((ids[:, 0] != start).all()):
        ids = torch.cat([first, ids], dim=1)
    return ids


@attrs.frozen
class Seq2SeqRun(Run):
    """`Run` for an encoder-decoder: `input_ids` are the encoder's prompts [B, S] (not yet
    repeated), the loop runs over decoder tokens from `decoder_prompt` [B, P'] (P' == `prompt`;
    the start token by default), and every prompt gives `expand` rows."""

    expand: int = 1
    decoder_prompt: torch.Tensor | None = attrs.field(default=None, eq=False)

    def __call__(self, input_ids, mask, generator, streamer, module) -> GenerateOutput:
        rows = input_ids.shape[0] * self.expand
        total = self.prompt + self.new
        capacity = initial_capacity(self.prompt, self.new, self.config.num_beams)
        if module is None:
            module = skeleton(self.state.config, self.state.architecture)

        def loop(model: nn.Module) -> GenerateOutput:
            decoder = _Seq2SeqDecoder(
                self.state, model, None, None, rows, total, self.config.use_cache, input_ids.device, capacity
            )
            encoded = model.encoder(input_ids, mask, None, attn=decoder.attn)["last_hidden_state"]
            enc_mask = mask
            if self.expand > 1:  # Transformers' _expand_inputs_for_generation, after the encoder
                encoded = encoded.repeat_interleave(self.expand, dim=0)
                enc_mask = None if mask is None else mask.repeat_interleave(self.expand, dim=0)
            decoder.encoder_hidden, decoder.encoder_mask = encoded, enc_mask
            start = self.decoder_prompt.repeat_interleave(self.expand, dim=0)
            with collector_paused():
                if self.config.num_beams > 1:
                    out = self._beams(decoder, start, generator)
                else:
                    out = self._sample(decoder, start, generator, streamer)
            return attrs.evolve(out, past_key_values=decoder.cache)

        return run_bound(self.state, module, loop)
