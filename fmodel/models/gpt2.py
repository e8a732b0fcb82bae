"""The GPT-2 family: weightless skeletons (`GPT2Model`, `GPT2LMHeadModel`) and their ArchSpecs.

Parameter names and layouts are Transformers' own: `Conv1D` weights are [in, out] and the
query/key/value projection is one fused `c_attn`. Positions are learned (`wpe`). Attention
goes through the registry with the scaling the config asks for (1/sqrt(head_dim) when
`scale_attn_weights`, divided by layer_idx + 1 when `scale_attn_by_inverse_layer_idx`), for
every implementation: Transformers applies the layer-index scaling in its eager path only.
With `reorder_and_upcast_attn` and eager attention, scores are computed and softmaxed in
float32 as Transformers' `_upcast_and_reordered_attn` does; other implementations run as usual
(Transformers ignores the option for them too).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..attention import AttentionFunction, build_mask
from ..distributed.plan import gpt2_plan
from ..errors import ConfigError
from ._stack import embed_inputs, run_cached_layers, step_positions, with_logits
from .activations import ACTIVATIONS
from .spec import ArchSpec, HeadLayout, no_buffers, no_ties, register_architecture

if TYPE_CHECKING:
    from ..generation.cache import KVCache

__all__ = ["GPT2LMHeadModel", "GPT2Model"]


class Conv1D(nn.Module):
    """A linear layer with its weight stored [in, out] (GPT-2's checkpoint layout): y = x W + b."""

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1]
        out = torch.addmm(self.bias, x.reshape(rows.numel(), x.shape[-1]), self.weight)
        return out.view(*rows, self.weight.shape[1])


def _upcast_reordered_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    """Eager attention with the scores computed (scale folded into the product) and softmaxed
    in float32 whatever the input dtype, then cast back: Transformers' GPT-2
    `_upcast_and_reordered_attn`. Mask: additive. Returns ([B, T, H, D], weights [B, H, T, S])."""
    b, h, t, d = query.shape
    s = key.shape[2]
    with torch.autocast(query.device.type, enabled=False):
        q = query.reshape(b * h, t, d).float()
        k = key.transpose(-1, -2).reshape(b * h, d, s).float()
        scores = torch.baddbmm(q.new_empty(b * h, t, s), q, k, beta=0, alpha=scaling).view(b, h, t, s)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, :s]
    weights = torch.softmax(scores, dim=-1).to(value.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2), weights


def _layer_heads(config, layer_idx: int) -> int:
    return config.n_head - len(config.pruned_heads.get(layer_idx, ()))


class GPT2Attention(nn.Module):
    """Causal self-attention with a fused q/k/v projection; honours `config.pruned_heads`."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_size
        self.num_heads = _layer_heads(config, layer_idx)
        self.num_key_value_groups = 1
        self.is_causal = True
        scaling = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scaling /= float(layer_idx + 1)
        self.scaling = scaling
        self.attention_dropout = config.attn_pdrop
        self.reorder_and_upcast_attn = config.reorder_and_upcast_attn
        inner = self.num_heads * self.head_dim
        self.c_attn = Conv1D(3 * inner, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, inner)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden, mask, attn: AttentionFunction, cache: KVCache | None, output_attentions: bool):
        b, t, _ = hidden.shape
        if self.num_heads == 0:  # every head pruned: only the output bias is left
            return self.resid_dropout(self.c_proj(hidden.new_zeros(b, t, 0))), None
        q, k, v = self.c_attn(hidden).split(self.num_heads * self.head_dim, dim=2)
        q, k, v = (
            x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2) for x in (q, k, v)
        )  # [B, H, T, D]
        if cache is not None:  # store this step's k/v, attend over everything cached so far
            k, v = cache.write(self.layer_idx, k, v)  # [B, H, S, D]
        fn = attn.fn
        if self.reorder_and_upcast_attn and attn.name == "eager":
            fn = _upcast_reordered_attention
        out, weights = fn(
            self,
            q,
            k,
            v,
            mask,
            scaling=self.scaling,
            dropout=self.attention_dropout if self.training else 0.0,
            output_attentions=output_attentions,
        )
        return self.resid_dropout(self.c_proj(out.reshape(b, t, -1))), weights  # out: [B, T, H, D]


class GPT2MLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.c_fc = Conv1D(config.intermediate_size, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.intermediate_size)
        self.act = ACTIVATIONS[config.activation_function]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class GPT2Block(nn.Module):
    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, hidden, mask, attn, cache, output_attentions):
        attn_out, weights = self.attn(self.ln_1(hidden), mask, attn, cache, output_attentions)
        hidden = hidden + attn_out
        return hidden + self.mlp(self.ln_2(hidden)), weights


class GPT2Model(nn.Module):
    """Token + learned position embeddings, blocks, final LayerNorm. Returns hidden states [B, T, C].

    With `past_key_values` (a `KVCache` of length L) the inputs sit at cache positions
    L .. L+T-1 and `attention_mask` covers all L + T positions, as in `LlamaModel`.
    """

    supports_cache = True

    def __init__(self, config) -> None:
        super().__init__()
        if config.extra.get("add_cross_attention"):
            raise ConfigError(
                "GPT2Config: field 'add_cross_attention' is true; fmodel implements GPT-2 without "
                "cross-attention layers"
            )
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        *,
        attn: AttentionFunction,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        gradient_checkpointing: bool = False,
        past_key_values: KVCache | None = None,
    ) -> dict[str, Any]:
        hidden = embed_inputs(self.wte, input_ids, inputs_embeds)  # [B, T, C]
        mask_inputs, position_ids = step_positions(hidden, attention_mask, position_ids, past_key_values)
        hidden = hidden + self.wpe(position_ids)
        if token_type_ids is not None:
            hidden = hidden + self.wte(token_type_ids)
        hidden = self.drop(hidden)
        return run_cached_layers(
            self.h,
            hidden,
            build_mask(attn.mask_kind, mask_inputs, None, hidden.dtype),
            attn,
            past_key_values=past_key_values,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            gradient_checkpointing=gradient_checkpointing,
            final=self.ln_f,
        )


class GPT2LMHeadModel(nn.Module):
    """`GPT2Model` plus the (usually tied) LM head. Returns logits [B, T, vocab]."""

    supports_cache = True

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def forward(self, *args: Any, logits_to_keep: int = 0, **kwargs: Any) -> dict[str, Any]:
        return with_logits(self.transformer(*args, **kwargs), self.lm_head, logits_to_keep)


# --------------------------------------------------------------------------- specs


def _init_rule(name: str, config):
    if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
        return "ones"
    if name.endswith(".bias"):
        return "zeros"
    if name.endswith("c_proj.weight"):  # GPT-2's scaled init of residual projections
        return ("normal", config.initializer_range / math.sqrt(2 * config.n_layer))
    return "normal"


def _head_layout(prefix: str):
    def layout(config, layer_idx: int) -> HeadLayout:
        p = f"{prefix}h.{layer_idx}.attn."
        heads = _layer_heads(config, layer_idx)
        return HeadLayout(
            heads=heads,
            kv_heads=heads,
            head_dim=config.head_size,
            original_heads=config.n_head,
            slices=(
                (p + "c_attn.weight", 1, "qkv"),
                (p + "c_attn.bias", 0, "qkv"),
                (p + "c_proj.weight", 0, "o"),
            ),
        )

    return layout


def _lm_ties(config) -> dict[str, str]:
    return {"lm_head.weight": "transformer.wte.weight"} if config.tie_word_embeddings else {}


# Old checkpoints carry the causal-mask buffers Transformers now computes.
_IGNORE = (r"\.attn\.(bias|masked_bias)$",)

register_architecture(
    ArchSpec(
        name="GPT2Model",
        model_type="gpt2",
        build=GPT2Model,
        prefix="transformer",
        is_base=True,
        ties=no_ties,
        input_embeddings="wte.weight",
        output_embeddings=None,
        computed_buffers=no_buffers,
        init_rule=_init_rule,
        output="base",
        ignore_unexpected=_IGNORE,
        position_embeddings="wpe.weight",
        head_layout=_head_layout(""),
        tp_plan=gpt2_plan(""),
        takes_head_mask=True,
    )
)
register_architecture(
    ArchSpec(
        name="GPT2LMHeadModel",
        model_type="gpt2",
        build=GPT2LMHeadModel,
        prefix="transformer",
        is_base=False,
        ties=_lm_ties,
        input_embeddings="transformer.wte.weight",
        output_embeddings="lm_head.weight",
        computed_buffers=no_buffers,
        init_rule=_init_rule,
        output="causal_lm",
        ignore_unexpected=_IGNORE,
        position_embeddings="transformer.wpe.weight",
        head_layout=_head_layout("transformer."),
        tp_plan=gpt2_plan("transformer.", lm_head=True),
        takes_head_mask=True,
    )
)
