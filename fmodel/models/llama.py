"""The Llama family (llama, qwen2, mistral): weightless skeletons and their ArchSpecs.

Module and parameter names are Transformers' own, so `skeleton.state_dict()` keys are the
checkpoint keys. Skeletons are built on the meta device and only ever run through
`torch.func.functional_call` with a state's tensors. Attention goes through the registry:
the model builds the mask each function wants once per call and hands it to every layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import AttentionFunction, MaskInputs, build_mask
from ..errors import InvalidArgumentError
from ._stack import run_layers, with_logits
from .linear import Linear
from .rope import rope_inv_freq, rotary_cos_sin, rotary_tables, rotate_with_tables
from .spec import ArchSpec, HeadLayout, register_architecture

if TYPE_CHECKING:
    from ..generation.cache import KVCache

__all__ = ["LlamaForCausalLM", "LlamaModel"]


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (Transformers' gelu_new / gelu_pytorch_tanh). A named
    function, not a lambda, so modules holding it pickle."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "relu": F.relu,
    "tanh": torch.tanh,
}


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back (as Transformers' LlamaRMSNorm)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32:  # the same operations without the two casts (per layer per step)
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """Holds `inv_freq` (a computed, non-persistent buffer) and turns positions into cos/sin."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        # Only the scaling is kept: the state supplies `inv_freq` (a computed buffer). Computed on
        # CPU because arithmetic on meta tensors imports torch._dynamo (seconds) on first use.
        with torch.device("cpu"):
            _, self.attention_scaling = rope_inv_freq(config)
        self.register_buffer("inv_freq", torch.empty(config.head_size // 2), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`rope.rotary_tables` for `position_ids` [B, T]: cos and signed sin [B, 1, T, D]."""
        inv_freq, scaling = self.inv_freq, self.attention_scaling
        if self.config.rope_type == "dynamic":
            # Pure replacement of Transformers' stateful cache: scale for this call's length.
            seq_len = int(position_ids.max()) + 1
            if seq_len > self.config.max_position_embeddings:
                inv_freq = rope_inv_freq(self.config, seq_len)[0].to(position_ids.device)
        return rotary_tables(*rotary_cos_sin(inv_freq, position_ids, scaling, dtype))


class LlamaAttention(nn.Module):
    """Multi-head attention with rotary embeddings and grouped key/value heads.

    Carries the attributes Transformers' attention functions read from `module`:
    `num_key_value_groups`, `scaling`, `is_causal`, `head_dim`, `layer_idx`, `config`.
    """

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_size
        # Pruned heads (whole key/value groups, see DecoderConfig) shrink this layer.
        self.num_key_value_groups = config.num_attention_heads // config.kv_heads
        pruned = len(config.pruned_heads.get(layer_idx, ()))
        self.num_heads = config.num_attention_heads - pruned
        self.num_key_value_heads = config.kv_heads - pruned // self.num_key_value_groups
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.sliding_window = config.layer_sliding_window(layer_idx)
        hidden, q_out, kv_out = (
            config.hidden_size,
            self.num_heads * self.head_dim,
            self.num_key_value_heads * self.head_dim,
        )
        self.q_proj = Linear(hidden, q_out, bias=config.qkv_bias)
        self.k_proj = Linear(hidden, kv_out, bias=config.qkv_bias)
        self.v_proj = Linear(hidden, kv_out, bias=config.qkv_bias)
        self.o_proj = Linear(q_out, hidden, bias=config.o_bias)

    def forward(
        self, hidden, cos_sin, masks, attn: AttentionFunction, cache: KVCache | None, output_attentions: bool
    ):
        b, t, _ = hidden.shape
        if self.num_heads == 0:  # every head pruned: only the output bias is left
            return self.o_proj(hidden.new_zeros(b, t, 0)), None
        q = self.q_proj(hidden).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = (
            self.k_proj(hidden).view(b, t, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        )  # [B, H_kv, T, D]
        v = self.v_proj(hidden).view(b, t, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        q, k = rotate_with_tables(q, k, *cos_sin)
        if cache is not None:  # store this step's k/v, attend over everything cached so far
            k, v = cache.write(self.layer_idx, k, v)  # [B, H_kv, S, D]
        out, weights = attn.fn(
            self,
            q,
            k,
            v,
            masks[self.sliding_window],
            scaling=self.scaling,
            dropout=self.attention_dropout if self.training else 0.0,
            sliding_window=self.sliding_window,
            output_attentions=output_attentions,
        )
        return self.o_proj(out.reshape(b, t, -1)), weights  # out: [B, T, H, D]


class LlamaMLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        bias = config.mlp_has_bias
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden, cos_sin, masks, attn, cache, output_attentions):
        attn_out, weights = self.self_attn(
            self.input_layernorm(hidden), cos_sin, masks, attn, cache, output_attentions
        )
        hidden = hidden + attn_out
        hidden = hidden + self.mlp(self.post_attention_layernorm(hidden))
        return hidden, weights


def _padding_idx(config) -> int | None:
    pad = config.pad_token_id
    return pad if isinstance(pad, int) and 0 <= pad < config.vocab_size else None


class LlamaModel(nn.Module):
    """The decoder stack: embeddings, layers, final norm. Returns hidden states [B, T, hidden].

    With `past_key_values` (a `KVCache` of length L) the T inputs are the tokens at cache
    positions L .. L+T-1, `attention_mask` covers all L + T positions, and the returned
    `past_key_values` has length L + T (see `fmodel.generation.cache` for what is written where).
    """

    supports_cache = True

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _padding_idx(config))
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.windows = sorted({layer.self_attn.sliding_window for layer in self.layers}, key=lambda w: w or 0)

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
        past_key_values: KVCache | None = None,
    ) -> dict[str, Any]:
        if (input_ids is None) == (inputs_embeds is None):
            raise InvalidArgumentError("pass exactly one of input_ids or inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, C]
        b, t = hidden.shape[:2]
        start = 0 if past_key_values is None else past_key_values.length
        q_positions = torch.arange(start, start + t, device=hidden.device)  # cache positions
        if position_ids is None:
            position_ids = q_positions[None]  # as Transformers: padding does not shift positions
        mask_inputs = MaskInputs(attention_mask, q_positions, start + t, b)
        masks = {w: build_mask(attn.mask_kind, mask_inputs, w, hidden.dtype) for w in self.windows}
        cos_sin = self.rotary_emb(position_ids, hidden.dtype)

        out = run_layers(
            self.layers,
            hidden,
            cos_sin,
            masks,
            attn,
            past_key_values,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            gradient_checkpointing=gradient_checkpointing,
            final=self.norm,
        )
        if past_key_values is not None:
            out["past_key_values"] = past_key_values.advance(t)
        return out


class LlamaForCausalLM(nn.Module):
    """`LlamaModel` plus the LM head. Returns logits [B, T, vocab]."""

    supports_cache = True

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, *args: Any, logits_to_keep: int = 0, **kwargs: Any) -> dict[str, Any]:
        return with_logits(self.model(*args, **kwargs), self.lm_head, logits_to_keep)


# --------------------------------------------------------------------------- specs


def _init_rule(name: str, config) -> str | tuple:
    if name.endswith("embed_tokens.weight") and _padding_idx(config) is not None:
        return ("normal", None, _padding_idx(config))
    if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
        return "ones"
    if name.endswith(".bias"):
        return "zeros"
    return "normal"


def _head_layout(prefix: str):
    def layout(config, layer_idx: int) -> HeadLayout:
        p = f"{prefix}layers.{layer_idx}.self_attn."
        groups = config.num_attention_heads // config.kv_heads
        pruned = len(config.pruned_heads.get(layer_idx, ()))
        slices = [(p + "q_proj.weight", 0, "q"), (p + "k_proj.weight", 0, "k"), (p + "v_proj.weight", 0, "v")]
        if config.qkv_bias:
            slices += [(p + "q_proj.bias", 0, "q"), (p + "k_proj.bias", 0, "k"), (p + "v_proj.bias", 0, "v")]
        slices.append((p + "o_proj.weight", 1, "o"))
        return HeadLayout(
            heads=config.num_attention_heads - pruned,
            kv_heads=config.kv_heads - pruned // groups,
            head_dim=config.head_size,
            original_heads=config.num_attention_heads,
            slices=tuple(slices),
        )

    return layout


def _computed_buffers(prefix: str):
    def buffers(config, device) -> dict[str, torch.Tensor]:
        inv_freq, _ = rope_inv_freq(config)
        return {f"{prefix}rotary_emb.inv_freq": inv_freq.to(device)}

    return buffers


def _causal_lm_ties(config) -> dict[str, str]:
    return {"lm_head.weight": "model.embed_tokens.weight"} if config.tie_word_embeddings else {}


_IGNORE = (r"rotary_emb\.inv_freq$",)

for _model_type, _prefix in (("llama", "Llama"), ("qwen2", "Qwen2"), ("mistral", "Mistral")):
    register_architecture(
        ArchSpec(
            name=f"{_prefix}Model",
            model_type=_model_type,
            build=LlamaModel,
            prefix="model",
            is_base=True,
            ties=lambda config: {},
            input_embeddings="embed_tokens.weight",
            output_embeddings=None,
            computed_buffers=_computed_buffers(""),
            head_layout=_head_layout(""),
            init_rule=_init_rule,
            output="base",
            ignore_unexpected=_IGNORE,
        )
    )
    register_architecture(
        ArchSpec(
            name=f"{_prefix}ForCausalLM",
            model_type=_model_type,
            build=LlamaForCausalLM,
            prefix="model",
            is_base=False,
            ties=_causal_lm_ties,
            input_embeddings="model.embed_tokens.weight",
            output_embeddings="lm_head.weight",
            computed_buffers=_computed_buffers("model."),
            head_layout=_head_layout("model."),
            init_rule=_init_rule,
            output="causal_lm",
            ignore_unexpected=_IGNORE,
        )
    )
