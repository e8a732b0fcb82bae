"""The T5 family: weightless skeletons (`T5ForConditionalGeneration`, `T5Model`,
`T5EncoderModel`) and their ArchSpecs.

Names are Transformers' own (`shared`, `encoder.block.0.layer.0.SelfAttention.q`, ...), so
checkpoints move both ways unrenamed. What T5 does differently from the other families:

- no absolute positions: layer 0 of each stack holds `relative_attention_bias`, a table of
  [buckets, heads] learned biases indexed by the bucket of (key position - query position)
  (bidirectional buckets in the encoder, causal ones in the decoder); the stack computes the
  bias once and every layer adds it to its scores;
- unscaled attention (scale 1.0), T5's RMS norm without mean (`T5LayerNorm`), no biases;
- an encoder-decoder: the decoder's blocks add cross-attention over the encoder output.

Attention: the bias (with the padding / causal mask folded in, as Transformers' eager code
does) reaches the registry function as a float additive mask, which eager and sdpa both
take (sdpa with `scale=1.0`), and flex as a `score_mod`; flash attention has no additive
bias and is refused. Transformers' T5 has only eager; fmodel's other implementations give
its result.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

import torch
from torch import nn

from ..attention import AttentionFunction, MaskInputs
from ..errors import InvalidArgumentError
from ._stack import run_layers, with_logits
from .activations import ACTIVATIONS
from .init import TRANSFORMERS_INIT, Draw, TransformersInit, construction_draws, post_order
from .linear import Linear
from .spec import ArchSpec, register_architecture

__all__ = [
    "T5EncoderModel",
    "T5ForConditionalGeneration",
    "T5Model",
    "relative_position_bucket",
    "shift_right",
]


class T5LayerNorm(nn.Module):
    """weight * x / rms(x), the mean square taken in float32 (Transformers' T5LayerNorm)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """Transformers' `T5Attention._relative_position_bucket` (Mesh TensorFlow's): int64 buckets
    in [0, num_buckets) of `relative_position` (key position - query position); exact buckets
    for small distances, log-spaced ones up to `max_distance`, one bucket beyond it."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    if_large = max_exact + (
        torch.log(relative_position.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    if_large = torch.min(if_large, torch.full_like(if_large, num_buckets - 1))
    return buckets + torch.where(is_small, relative_position, if_large)


class T5DenseActDense(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.wi = Linear(config.d_model, config.d_ff, bias=False)
        self.wo = Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(_to_weight_dtype(self.dropout(self.act(self.wi(x))), self.wo))


class T5DenseGatedActDense(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.wi_0 = Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = Linear(config.d_model, config.d_ff, bias=False)
        self.wo = Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.dropout(self.act(self.wi_0(x)) * self.wi_1(x))
        return self.wo(_to_weight_dtype(hidden, self.wo))


def _to_weight_dtype(x: torch.Tensor, linear: nn.Module) -> torch.Tensor:
    """As Transformers: the input of `wo` takes its floating weight's dtype (a float32 `wo`
    kept beside half-precision layers); quantized weights are left to their layer."""
    weight = getattr(linear, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point() and x.dtype != weight.dtype:
        return x.to(weight.dtype)
    return x


class T5LayerFF(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(config) if config.gated else T5DenseActDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.DenseReluDense(self.layer_norm(x)))


class T5Attention(nn.Module):
    """Unscaled multi-head attention; carries what registry functions read from `module`."""

    def __init__(self, config, has_relative_attention_bias: bool, layer_idx: int, is_decoder: bool) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.is_decoder = is_decoder
        self.has_relative_attention_bias = has_relative_attention_bias
        self.num_heads = config.num_heads
        self.head_dim = config.d_kv
        self.num_key_value_groups = 1
        self.scaling = 1.0
        self.is_causal = False  # the bias always carries the mask: functions never infer one
        self.attention_dropout = config.dropout_rate
        inner = config.inner_dim
        self.q = Linear(config.d_model, inner, bias=False)
        self.k = Linear(config.d_model, inner, bias=False)
        self.v = Linear(config.d_model, inner, bias=False)
        self.o = Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(
                config.relative_attention_num_buckets, config.num_heads
            )

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, inner] -> [B, H, T, D]."""
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def compute_bias(self, q_positions: torch.Tensor, key_length: int) -> torch.Tensor:
        """[1, H, T, S] learned bias of queries at `q_positions` over keys 0..S-1."""
        memory = torch.arange(key_length, dtype=torch.long, device=q_positions.device)[None, :]
        buckets = relative_position_bucket(
            memory - q_positions[:, None],
            bidirectional=not self.is_decoder,
            num_buckets=self.config.relative_attention_num_buckets,
            max_distance=self.config.relative_attention_max_distance,
        )
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def forward(self, hidden, bias, attn: AttentionFunction, kv, cache, output_attentions: bool):
        """`kv`: (keys, values) [B, H, S, D] for cross-attention, None for self-attention
        (then this step's keys/values, written into `cache` when one is given)."""
        b, t, _ = hidden.shape
        q = self.heads(self.q(hidden))  # [B, H, T, D]
        if kv is None:
            k, v = self.heads(self.k(hidden)), self.heads(self.v(hidden))
            if cache is not None:
                k, v = cache.write(self.layer_idx, k, v)  # [B, H, S, D]
        else:
            k, v = kv
        dropout = self.attention_dropout if self.training else 0.0
        if attn.mask_kind == "block":  # flex: the bias as a score_mod, no block mask
            full = bias.expand(b, self.num_heads, t, k.shape[2])

            def score_mod(score, batch, head, q_idx, kv_idx):
                return score + full[batch, head, q_idx, kv_idx]

            out, weights = attn.fn(self, q, k, v, None, scaling=1.0, dropout=dropout, score_mod=score_mod)
        else:
            out, weights = attn.fn(
                self, q, k, v, bias, scaling=1.0, dropout=dropout, output_attentions=output_attentions
            )
        return self.o(out.reshape(b, t, -1)), weights  # out: [B, T, H, D]


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config, has_relative_attention_bias: bool, layer_idx: int, is_decoder: bool) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias, layer_idx, is_decoder)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, hidden, bias, attn, cache, output_attentions):
        out, weights = self.SelfAttention(self.layer_norm(hidden), bias, attn, None, cache, output_attentions)
        return hidden + self.dropout(out), weights


class T5LayerCrossAttention(nn.Module):
    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.EncDecAttention = T5Attention(config, False, layer_idx, True)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, hidden, bias, attn, kv, output_attentions):
        out, weights = self.EncDecAttention(self.layer_norm(hidden), bias, attn, kv, None, output_attentions)
        return hidden + self.dropout(out), weights


def _clamp_half(hidden: torch.Tensor) -> torch.Tensor:
    """Transformers' float16 guard after each sublayer: clamp to the finite range (a little
    inside it when an inf already appeared)."""
    if hidden.dtype != torch.float16:
        return hidden
    top = torch.finfo(torch.float16).max
    clamp = torch.where(torch.isinf(hidden).any(), top - 1000, top)
    return torch.clamp(hidden, min=-clamp, max=clamp)


class T5Block(nn.Module):
    """Self-attention, (decoder) cross-attention, feed-forward: each pre-norm with a residual."""

    def __init__(self, config, has_relative_attention_bias: bool, layer_idx: int, is_decoder: bool) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.is_decoder = is_decoder
        layers = [T5LayerSelfAttention(config, has_relative_attention_bias, layer_idx, is_decoder)]
        if is_decoder:
            layers.append(T5LayerCrossAttention(config, layer_idx))
        layers.append(T5LayerFF(config))
        self.layer = nn.ModuleList(layers)

    def forward(self, hidden, self_bias, cross_bias, cross_kv, attn, cache, output_attentions):
        hidden, weights = self.layer[0](hidden, self_bias, attn, cache, output_attentions)
        hidden = _clamp_half(hidden)
        cross_weights = None
        if self.is_decoder:
            kv = cross_kv[self.layer_idx]
            hidden, cross_weights = self.layer[1](hidden, cross_bias, attn, kv, output_attentions)
            hidden = _clamp_half(hidden)
        hidden = _clamp_half(self.layer[-1](hidden))
        return hidden, (weights, cross_weights)


def _additive(mask_inputs: MaskInputs, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, T, S]: 0 where attention is allowed, the dtype's minimum elsewhere (Transformers'
    extended / 4-D causal masks have exactly these values)."""
    zero = torch.zeros((), dtype=dtype, device=mask_inputs.device)
    return torch.where(mask_inputs.bool_mask(None), zero, torch.finfo(dtype).min)


def _check_attention(attn: AttentionFunction) -> None:
    """Refuse, by name, an attention function that cannot add T5's bias to its scores: a
    padding-mask kernel (flash attention), or a block-mask function without a `score_mod`
    parameter (`**kwargs` would swallow the bias silently)."""
    if attn.mask_kind == "padding":
        raise InvalidArgumentError(
            f"T5 cannot run with {attn.name!r}: its attention adds a learned relative position bias "
            "to the scores, and flash attention kernels take no additive bias; use 'eager', 'sdpa' "
            "or 'flex_attention'"
        )
    if attn.mask_kind == "block" and not _takes_score_mod(attn.fn):
        raise InvalidArgumentError(
            f"T5 cannot run with {attn.name!r}: T5 hands a block-mask function its relative position "
            "bias as a `score_mod`, and this function names no `score_mod` parameter"
        )


def _names_score_mod(fn) -> bool:
    try:
        return "score_mod" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


_cached_names_score_mod = functools.lru_cache(maxsize=64)(_names_score_mod)


def _takes_score_mod(fn) -> bool:
    """True when `fn` names a `score_mod` parameter (read once per function, a runtime cache;
    an unhashable callable is read each time)."""
    try:
        return _cached_names_score_mod(fn)
    except TypeError:
        return _names_score_mod(fn)


class T5Stack(nn.Module):
    """The encoder (`is_decoder=False`) or decoder stack: embeddings, blocks, final norm."""

    def __init__(self, config, is_decoder: bool) -> None:
        super().__init__()
        self.config = config
        self.is_decoder = is_decoder
        layers = config.decoder_layers if is_decoder else config.num_layers
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)  # tied to `shared`
        self.block = nn.ModuleList(T5Block(config, i == 0, i, is_decoder) for i in range(layers))
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def _final(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.final_layer_norm(hidden))

    def cross_kv(
        self, encoder_hidden: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Per decoder layer, the cross-attention keys and values [B, H, S, D] of the encoder output."""
        keys, values = [], []
        for block in self.block:
            cross = block.layer[1].EncDecAttention
            keys.append(cross.heads(cross.k(encoder_hidden)))
            values.append(cross.heads(cross.v(encoder_hidden)))
        return tuple(keys), tuple(values)

    def forward(
        self,
        input_ids,
        attention_mask,
        inputs_embeds,
        *,
        attn: AttentionFunction,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        cross_kv=None,
        cache=None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        gradient_checkpointing: bool = False,
    ) -> dict[str, Any]:
        _check_attention(attn)
        side = "decoder_" if self.is_decoder else ""
        if (input_ids is None) == (inputs_embeds is None):
            raise InvalidArgumentError(f"pass exactly one of {side}input_ids or {side}inputs_embeds")
        embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, C]
        b, t = embeds.shape[:2]
        start = 0 if cache is None else cache.length
        q_positions = torch.arange(start, start + t, device=embeds.device)
        mask_inputs = MaskInputs(attention_mask, q_positions, start + t, b, causal=self.is_decoder)
        rel = self.block[0].layer[0].SelfAttention.compute_bias(q_positions, start + t)  # [1, H, T, S]
        self_bias = rel + _additive(mask_inputs, embeds.dtype) if self._needs_mask(mask_inputs) else rel
        cross_bias = None
        if self.is_decoder:
            s = encoder_hidden_states.shape[1]
            enc_inputs = MaskInputs(encoder_attention_mask, q_positions, s, b, causal=False)
            cross_bias = torch.zeros(1, self.config.num_heads, t, s, dtype=embeds.dtype, device=embeds.device)
            if enc_inputs.padding_mask is not None:
                cross_bias = cross_bias + _additive(enc_inputs, embeds.dtype)
            if cross_kv is None:
                cross_kv = self.cross_kv(encoder_hidden_states)
            cross_kv = tuple(zip(*cross_kv, strict=True))
        out = run_layers(
            self.block,
            self.dropout(embeds),
            self_bias,
            cross_bias,
            cross_kv,
            attn,
            cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            final=self._final,
            gradient_checkpointing=gradient_checkpointing,
        )
        if output_attentions:
            pairs = out["attentions"]
            out["attentions"] = tuple(w for w, _ in pairs)
            out["cross_attentions"] = tuple(c for _, c in pairs) if self.is_decoder else None
        return out

    def _needs_mask(self, mask_inputs: MaskInputs) -> bool:
        """The encoder without padding attends everywhere; a decoder is always causal (one
        query over its cache, T == 1, sees every key)."""
        if mask_inputs.padding_mask is not None:
            return True
        return self.is_decoder and mask_inputs.q_positions.shape[0] > 1


def shift_right(config, labels: torch.Tensor) -> torch.Tensor:
    """Transformers' `T5PreTrainedModel._shift_right`: decoder inputs from `labels` [B, T]:
    `decoder_start_token_id` first, the labels moved one right, -100 replaced by the pad id.

    Raises:
        InvalidArgumentError: the config has no `decoder_start_token_id` or no `pad_token_id`.
    """
    start, pad = config.decoder_start_token_id, config.pad_token_id
    if not isinstance(start, int):
        raise InvalidArgumentError(
            "T5: config.decoder_start_token_id has to be defined to shift labels into decoder inputs "
            "(in T5 it is usually the pad_token_id, 0)"
        )
    if not isinstance(pad, int):
        raise InvalidArgumentError("T5: config.pad_token_id has to be defined to shift labels")
    shifted = labels.new_zeros(labels.shape)
    shifted[..., 1:] = labels[..., :-1]
    shifted[..., 0] = start
    return shifted.masked_fill(shifted == -100, pad)


def _encoder_output(encoder_outputs) -> tuple[torch.Tensor, Any, Any]:
    """(last_hidden_state, hidden_states, attentions) of what the caller passed as `encoder_outputs`:
    a tensor, a tuple / list (Transformers' return_dict=False form) or an output object."""
    if isinstance(encoder_outputs, torch.Tensor):
        return encoder_outputs, None, None
    if isinstance(encoder_outputs, (tuple, list)):
        items = [*encoder_outputs, None, None]
        return items[0], items[1], items[2]
    last = getattr(encoder_outputs, "last_hidden_state", None)
    if isinstance(last, torch.Tensor):
        return (
            last,
            getattr(encoder_outputs, "hidden_states", None),
            getattr(encoder_outputs, "attentions", None),
        )
    raise InvalidArgumentError(
        "forward(encoder_outputs) must be the encoder's last hidden state [batch, seq, d_model], a tuple "
        f"starting with it, or an output with last_hidden_state; got {type(encoder_outputs).__name__}"
    )


class T5Model(nn.Module):
    """Shared embeddings, encoder and decoder. Returns the decoder's last_hidden_state
    [B, T, d_model] and the encoder's as encoder_last_hidden_state [B, S, d_model]."""

    supports_cache = True
    is_encoder_decoder = True
    _keep_in_fp32_modules = ("wo",)  # as Transformers: loaded as float16, `wo` stays float32

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, is_decoder=False)
        self.decoder = T5Stack(config, is_decoder=True)

    def cache_shapes(self) -> list[tuple[int, int]]:
        """(heads, head_dim) of each decoder layer: what `fmodel.init_cache` allocates."""
        return [(self.config.num_heads, self.config.d_kv)] * self.config.decoder_layers

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        *,
        attn: AttentionFunction,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        gradient_checkpointing: bool = False,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        encoder_outputs: Any = None,
        past_key_values: Any = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> dict[str, Any]:
        if position_ids is not None:
            raise InvalidArgumentError("T5 takes no position_ids: its positions are relative buckets")
        flags = dict(
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            gradient_checkpointing=gradient_checkpointing,
        )
        if encoder_outputs is None:
            enc = self.encoder(input_ids, attention_mask, inputs_embeds, attn=attn, **flags)
            enc_last, enc_hidden, enc_attn = enc["last_hidden_state"], enc["hidden_states"], enc["attentions"]
        else:
            enc_last, enc_hidden, enc_attn = _encoder_output(encoder_outputs)
        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = shift_right(self.config, labels)
        from ..generation.seq2seq_cache import Seq2SeqCache, self_attention_cache

        cache = self_attention_cache(past_key_values)
        cross_kv = None
        if isinstance(past_key_values, Seq2SeqCache) and past_key_values.cross_keys is not None:
            cross_kv = (past_key_values.cross_keys, past_key_values.cross_values)
        elif cache is not None:
            cross_kv = self.decoder.cross_kv(enc_last)
        dec = self.decoder(
            decoder_input_ids,
            decoder_attention_mask,
            decoder_inputs_embeds,
            attn=attn,
            encoder_hidden_states=enc_last,
            encoder_attention_mask=attention_mask,
            cross_kv=cross_kv,
            cache=cache,
            **flags,
        )
        out = {
            **dec,
            "encoder_last_hidden_state": enc_last,
            "encoder_hidden_states": enc_hidden,
            "encoder_attentions": enc_attn,
        }
        if cache is not None:
            t = dec["last_hidden_state"].shape[1]
            out["past_key_values"] = Seq2SeqCache(cache.advance(t), *cross_kv)
        return out


class T5ForConditionalGeneration(T5Model):
    """`T5Model` plus the LM head. Returns logits [B, T, vocab] over the decoder positions;
    with tied embeddings the decoder output is scaled by d_model**-0.5 first (as Transformers)."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.config.tie_word_embeddings:
            hidden = hidden * (self.config.d_model**-0.5)
        return self.lm_head(hidden)

    def forward(self, *args: Any, logits_to_keep: int = 0, **kwargs: Any) -> dict[str, Any]:
        return with_logits(super().forward(*args, **kwargs), self.head, logits_to_keep)


class T5EncoderModel(nn.Module):
    """Shared embeddings and the encoder. Returns last_hidden_state [B, S, d_model]."""

    _keep_in_fp32_modules = ("wo",)

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, is_decoder=False)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        *,
        attn: AttentionFunction,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        gradient_checkpointing: bool = False,
    ) -> dict[str, Any]:
        if position_ids is not None:
            raise InvalidArgumentError("T5 takes no position_ids: its positions are relative buckets")
        return self.encoder(
            input_ids,
            attention_mask,
            inputs_embeds,
            attn=attn,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            gradient_checkpointing=gradient_checkpointing,
        )


# --------------------------------------------------------------------------- specs


def _init_rule(name: str, config) -> str | tuple:
    """Transformers' `T5PreTrainedModel._init_weights` stds (times `initializer_factor`)."""
    f, d, kv, heads = config.initializer_factor, config.d_model, config.d_kv, config.num_heads
    if name.endswith("layer_norm.weight"):
        return "ones"
    if name in ("shared.weight", "lm_head.weight") or name.endswith("embed_tokens.weight"):
        return ("normal", f * 1.0)
    if name.endswith("relative_attention_bias.weight"):
        return ("normal", f * d**-0.5)
    leaf = name.rsplit(".", 2)[-2]
    stds = {
        "q": f * (d * kv) ** -0.5,
        "k": f * d**-0.5,
        "v": f * d**-0.5,
        "o": f * (heads * kv) ** -0.5,
        "wi": f * d**-0.5,
        "wi_0": f * d**-0.5,
        "wi_1": f * d**-0.5,
        "wo": f * config.d_ff**-0.5,
    }
    return ("normal", stds[leaf]) if leaf in stds else "normal"


def _transformers_rule(module: nn.Module, name: str, config) -> list[Draw]:
    """Transformers' `T5PreTrainedModel._init_weights(module)`, as draws: a rule per T5 class;
    every other module (nn.Linear, nn.Embedding, the stacks) is left as it is."""
    f, d, kv, heads = config.initializer_factor, config.d_model, config.d_kv, config.num_heads
    kind = type(module).__name__
    at = (lambda leaf: f"{name}.{leaf}") if name else (lambda leaf: leaf)

    def normal(leaf: str, std: float) -> Draw:
        return Draw(at(leaf), "normal", (0.0, std))

    if kind == "T5LayerNorm":
        return [Draw(at("weight"), "fill", (f * 1.0,))]
    if kind in ("T5Model", "T5ForConditionalGeneration", "T5EncoderModel"):
        draws = [normal("shared.weight", f * 1.0)]
        if hasattr(module, "lm_head") and not config.tie_word_embeddings:
            draws.append(normal("lm_head.weight", f * 1.0))
        return draws
    if kind == "T5DenseActDense":
        return [normal("wi.weight", f * d**-0.5), normal("wo.weight", f * config.d_ff**-0.5)]
    if kind == "T5DenseGatedActDense":
        return [
            normal("wi_0.weight", f * d**-0.5),
            normal("wi_1.weight", f * d**-0.5),
            normal("wo.weight", f * config.d_ff**-0.5),
        ]
    if kind == "T5Attention":
        draws = [
            normal("q.weight", f * (d * kv) ** -0.5),
            normal("k.weight", f * d**-0.5),
            normal("v.weight", f * d**-0.5),
            normal("o.weight", f * (heads * kv) ** -0.5),
        ]
        if module.has_relative_attention_bias:
            draws.append(normal("relative_attention_bias.weight", f * d**-0.5))
        return draws
    return []


def _transformers_construction(module: nn.Module, config) -> list[Draw]:
    """The draws of Transformers' `T5...(config)`: `shared` (nn.Embedding's normal(0, 1)); then
    each stack built (its default inits; its `embed_tokens` is `shared` itself) and initialised
    by its own `post_init` (T5Stack is a PreTrainedModel), which marks its modules; then the
    head's nn.Linear; then the model's `post_init`, where only the model's own rule is left:
    `shared` (and an untied lm_head) redrawn."""
    draws = construction_draws(module.shared, "shared")
    for stack_name in ("encoder", "decoder"):
        stack = getattr(module, stack_name, None)
        if stack is None:
            continue
        for name, sub in stack.named_modules(prefix=stack_name):
            if name != f"{stack_name}.embed_tokens":
                draws += construction_draws(sub, name)
        for name, sub in post_order(stack, stack_name):
            draws += _transformers_rule(sub, name, config)
    if hasattr(module, "lm_head"):
        draws += construction_draws(module.lm_head, "lm_head")
    return draws + _transformers_rule(module, "", config)


TRANSFORMERS_INIT["t5"] = TransformersInit(
    module_rule=_transformers_rule, construction=_transformers_construction
)


def _embedding_ties(config, decoder: bool = True) -> dict[str, str]:
    ties = {"encoder.embed_tokens.weight": "shared.weight"}
    if decoder:
        ties["decoder.embed_tokens.weight"] = "shared.weight"
    return ties


def _lm_ties(config) -> dict[str, str]:
    ties = _embedding_ties(config)
    if config.tie_word_embeddings:
        ties["lm_head.weight"] = "shared.weight"
    return ties


# Transformers' _keys_to_ignore_on_load_unexpected: an old checkpoint's stray cross-attention
# bias; the encoder-only class ignores the whole decoder of a full checkpoint.
_IGNORE = (r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$",)
_IGNORE_ENCODER = (r"^decoder\.", r"^lm_head\.")


def _spec(name: str, build, *, output: str, ties, output_embeddings=None, ignore=_IGNORE) -> ArchSpec:
    return ArchSpec(
        name=name,
        model_type="t5",
        build=build,
        prefix="transformer",  # Transformers' base_model_prefix; no T5 class nests its keys under it
        is_base=True,
        ties=ties,
        input_embeddings="shared.weight",
        output_embeddings=output_embeddings,
        computed_buffers=lambda config, device: {},
        init_rule=_init_rule,
        output=output,
        ignore_unexpected=ignore,
    )


# Registration order matters: the first class of a model_type is its default architecture.
register_architecture(
    _spec(
        "T5ForConditionalGeneration",
        T5ForConditionalGeneration,
        output="seq2seq_lm",
        ties=_lm_ties,
        output_embeddings="lm_head.weight",
    )
)
register_architecture(_spec("T5Model", T5Model, output="base", ties=_embedding_ties))
register_architecture(
    _spec(
        "T5EncoderModel",
        T5EncoderModel,
        output="base",
        ties=lambda config: _embedding_ties(config, decoder=False),
        ignore=_IGNORE_ENCODER,
    )
)
