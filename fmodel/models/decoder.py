"""The rotary decoder, once: the parts every decoder family (Llama, Qwen, Mistral, OLMo, Gemma,
Phi-3, Mixtral, ...) shares, configured by data.

A family is a `DecoderParts` value (which norm, where the norms sit, q/k norms, fused projections,
embedding scale, which MLP), a config class whose properties give the per-layer numbers (sliding
window, rope table, soft-caps, query scale, q/k/v clipping), a few named subclasses (Transformers'
class names: `<Prefix>DecoderLayer`, `<Prefix>Model`, `<Prefix>ForCausalLM`), and one
`register_decoder_family` call. Module and parameter names are Transformers' own, so
`skeleton.state_dict()` keys are the checkpoint keys.

Skeletons are built on the meta device and only ever run through `torch.func.functional_call`
with a state's tensors. Attention goes through the registry: the model builds the mask each
function wants once per call (one per distinct sliding window) and hands them to every layer.

Config properties the parts read (`fmodel.config.DecoderConfig` defines them all):
    hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, kv_heads, head_size,
    vocab_size, hidden_act, attention_dropout, pruned_heads, qkv_bias, o_bias, mlp_has_bias,
    layer_sliding_window(i), layer_rope(i) (the rotary module's attribute name),
    attention_scaling (the query scale), attention_softcap, logit_softcap, qkv_clip.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import torch
from torch import nn

from ..attention import AttentionFunction, build_mask
from ..attention.builtin import require_softcap
from ..distributed.plan import decoder_plan
from ._stack import embed_inputs, run_cached_layers, step_positions, with_logits
from .activations import ACTIVATIONS
from .linear import Linear
from .norms import rms_norm
from .rope import rope_inv_freq, rotary_cos_sin, rotary_tables, rotate_with_tables
from .spec import ArchSpec, HeadLayout, no_ties, register_architecture

if TYPE_CHECKING:
    from ..generation.cache import KVCache

__all__ = [
    "DecoderAttention",
    "DecoderForCausalLM",
    "DecoderLayer",
    "DecoderModel",
    "DecoderParts",
    "GatedMLP",
    "RotaryEmbedding",
    "padding_idx",
    "register_decoder_family",
]

PLACEMENTS = ("pre", "post", "sandwich")
QK_NORMS = (None, "head", "projection")


def _gated_mlp(config, layer_idx: int, parts: DecoderParts) -> nn.Module:
    return GatedMLP(config, parts)


def _decoder_attention(config, layer_idx: int, parts: DecoderParts) -> nn.Module:
    return DecoderAttention(config, layer_idx, parts)


@attrs.frozen
class DecoderParts:
    """How a family assembles the shared decoder, as data.

    Attributes:
        norm: (config, size) -> norm module (`norms.rms_norm`, `offset_rms_norm`, ...).
        placement: where a layer's norms sit (Transformers' names in brackets):
            "pre" (Llama): x + attn(norm(x)), then + mlp(norm(x))
                [input_layernorm, post_attention_layernorm];
            "post" (OLMo 2): x + norm(attn(x)), then + norm(mlp(x))
                [post_attention_layernorm, post_feedforward_layernorm];
            "sandwich" (Gemma 2/3): x + norm(attn(norm(x))), then + norm(mlp(norm(x)))
                [input_layernorm, post_attention_layernorm, pre_feedforward_layernorm,
                post_feedforward_layernorm].
        qk_norm: None; "head" (Qwen3, Gemma 3: a norm over each head's head_dim, shared by the
            heads); "projection" (OLMo 2: a norm over the whole q and k projections).
        fused_qkv: one `qkv_proj` [q | k | v] instead of q_proj/k_proj/v_proj (Phi-3).
        fused_gate_up: one `gate_up_proj` [gate | up] in the gated MLP (Phi-3).
        embed_scale: multiply the input embeddings by sqrt(hidden_size) (Gemma).
        attention: (config, layer_idx, parts) -> the attention module.
        mlp: (config, layer_idx, parts) -> the feed-forward module; it returns a tensor, or
            (tensor, router_logits) for a mixture of experts.
        mlp_name: the feed-forward module's attribute ("mlp"; Mixtral's "block_sparse_moe").
    """

    norm: Callable[[Any, int], nn.Module] = rms_norm
    placement: str = attrs.field(default="pre", validator=attrs.validators.in_(PLACEMENTS))
    qk_norm: str | None = attrs.field(default=None, validator=attrs.validators.in_(QK_NORMS))
    fused_qkv: bool = False
    fused_gate_up: bool = False
    embed_scale: bool = False
    attention: Callable[[Any, int, DecoderParts], nn.Module] = _decoder_attention
    mlp: Callable[[Any, int, DecoderParts], nn.Module] = _gated_mlp
    mlp_name: str = "mlp"


class RotaryEmbedding(nn.Module):
    """Holds `inv_freq` (a computed, non-persistent buffer) and turns positions into the
    rotation tables every layer that uses it shares."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        # Only the scaling is kept: the state supplies `inv_freq` (a computed buffer). Computed on
        # CPU because arithmetic on meta tensors imports torch._dynamo (seconds) on first use.
        with torch.device("cpu"):
            inv_freq, self.attention_scaling = rope_inv_freq(config)
        # one frequency per rotated pair (fewer than head_size // 2 with a partial rotary factor)
        self.register_buffer("inv_freq", torch.empty(inv_freq.shape), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`rope.rotary_tables` for `position_ids` [B, T]: cos and signed sin [B, 1, T, D]."""
        inv_freq, scaling = self.inv_freq, self.attention_scaling
        if self.config.rope_type in ("dynamic", "longrope"):
            # Pure replacement of Transformers' stateful frequency update: the frequencies for
            # this call's length (dynamic NTK past the trained length; longrope's long factors
            # past the original length).
            seq_len = int(position_ids.max()) + 1
            if seq_len > _rope_threshold(self.config):
                inv_freq, scaling = rope_inv_freq(self.config, seq_len)
                inv_freq = inv_freq.to(position_ids.device)
        return rotary_tables(*rotary_cos_sin(inv_freq, position_ids, scaling, dtype))


def _rope_threshold(config) -> int:
    if config.rope_type == "longrope":
        original = (config.rope_scaling or {}).get("original_max_position_embeddings")
        return original or getattr(config, "original_max_position_embeddings", config.max_position_embeddings)
    return config.max_position_embeddings


class DecoderAttention(nn.Module):
    """Multi-head attention with rotary embeddings and grouped key/value heads, and the family
    options of `DecoderParts` (q/k norms, fused qkv) and of the config (clipping, soft-capping,
    query scale, sliding window, which rope table).

    Carries the attributes Transformers' attention functions read from `module`:
    `num_key_value_groups`, `scaling`, `is_causal`, `head_dim`, `layer_idx`, `config`.
    """

    def __init__(self, config, layer_idx: int, parts: DecoderParts) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_size
        # Pruned heads (whole key/value groups, see DecoderConfig) shrink this layer.
        self.num_key_value_groups = config.num_attention_heads // config.kv_heads
        pruned = len(config.pruned_heads.get(layer_idx, ()))
        self.num_heads = config.num_attention_heads - pruned
        self.num_key_value_heads = config.kv_heads - pruned // self.num_key_value_groups
        self.scaling = config.attention_scaling
        self.softcap = config.attention_softcap
        self.qkv_clip = config.qkv_clip
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.sliding_window = config.layer_sliding_window(layer_idx)
        self.rope = config.layer_rope(layer_idx)
        self.qk_norm = parts.qk_norm
        hidden = config.hidden_size
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        # Construction order is Transformers' (it decides the order of seeded random draws):
        # Phi-3 builds o_proj before its fused qkv_proj, the others q, k, v, then o.
        if parts.fused_qkv:
            self.o_proj = Linear(self.q_size, hidden, bias=config.o_bias)
            self.qkv_proj = Linear(hidden, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        else:
            self.q_proj = Linear(hidden, self.q_size, bias=config.qkv_bias)
            self.k_proj = Linear(hidden, self.kv_size, bias=config.qkv_bias)
            self.v_proj = Linear(hidden, self.kv_size, bias=config.qkv_bias)
            self.o_proj = Linear(self.q_size, hidden, bias=config.o_bias)
        if parts.qk_norm == "head":
            self.q_norm, self.k_norm = parts.norm(config, self.head_dim), parts.norm(config, self.head_dim)
        elif parts.qk_norm == "projection":
            self.q_norm, self.k_norm = parts.norm(config, self.q_size), parts.norm(config, self.kv_size)

    def project(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, T, H * D], k and v [B, T, H_kv * D]."""
        if hasattr(self, "qkv_proj"):
            return self.qkv_proj(hidden).split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        return self.q_proj(hidden), self.k_proj(hidden), self.v_proj(hidden)

    def forward(
        self, hidden, cos_sin, masks, attn: AttentionFunction, cache: KVCache | None, output_attentions: bool
    ):
        b, t, _ = hidden.shape
        if self.num_heads == 0:  # every head pruned: only the output bias is left
            return self.o_proj(hidden.new_zeros(b, t, 0)), None
        q, k, v = self.project(hidden)
        if self.qkv_clip is not None:  # OLMo: clamp the projections before anything else
            q, k, v = (x.clamp(-self.qkv_clip, self.qkv_clip) for x in (q, k, v))
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(b, t, self.num_key_value_heads, self.head_dim).transpose(1, 2)  # [B, H_kv, T, D]
        v = v.view(b, t, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate_with_tables(q, k, *cos_sin[self.rope])
        if q.dtype != v.dtype:  # float32 tables (OLMo's `rope_dtype`): back to the activations' dtype
            q, k = q.to(v.dtype), k.to(v.dtype)
        if cache is not None:  # store this step's k/v, attend over everything cached so far
            k, v = cache.write(self.layer_idx, k, v)  # [B, H_kv, S, D]
        extra = {} if self.softcap is None else {"softcap": self.softcap}
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
            **extra,
        )
        return self.o_proj(out.reshape(b, t, -1)), weights  # out: [B, T, H, D]


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) (Llama's MLP; Phi-3's with one fused gate_up projection)."""

    def __init__(self, config, parts: DecoderParts, intermediate_size: int | None = None) -> None:
        super().__init__()
        bias, hidden = config.mlp_has_bias, config.hidden_size
        ffn = config.intermediate_size if intermediate_size is None else intermediate_size
        if parts.fused_gate_up:
            self.gate_up_proj = Linear(hidden, 2 * ffn, bias=bias)
        else:
            self.gate_proj = Linear(hidden, ffn, bias=bias)
            self.up_proj = Linear(hidden, ffn, bias=bias)
        self.down_proj = Linear(ffn, hidden, bias=bias)
        self.act = ACTIVATIONS[config.mlp_activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(up * self.act(gate))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


_NORM_NAMES = {
    "pre": ("input_layernorm", "post_attention_layernorm"),
    "post": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "sandwich": (
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    ),
}


class DecoderLayer(nn.Module):
    """Attention and feed-forward sublayers with residuals; `parts` (a class attribute a family's
    subclass sets) says where the norms sit. Returns (hidden, attention weights, router logits
    or None)."""

    parts: ClassVar[DecoderParts] = DecoderParts()

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        parts = self.parts
        self.self_attn = parts.attention(config, layer_idx, parts)
        setattr(self, parts.mlp_name, parts.mlp(config, layer_idx, parts))
        for name in _NORM_NAMES[parts.placement]:
            setattr(self, name, parts.norm(config, config.hidden_size))

    def forward(self, hidden, cos_sin, masks, attn, cache, output_attentions):
        placement, mlp = self.parts.placement, getattr(self, self.parts.mlp_name)
        if placement == "pre":
            attn_out, weights = self.self_attn(
                self.input_layernorm(hidden), cos_sin, masks, attn, cache, output_attentions
            )
            hidden = hidden + attn_out
            mlp_out = mlp(self.post_attention_layernorm(hidden))
        elif placement == "post":
            attn_out, weights = self.self_attn(hidden, cos_sin, masks, attn, cache, output_attentions)
            hidden = hidden + self.post_attention_layernorm(attn_out)
            mlp_out = mlp(hidden)
        else:  # sandwich
            attn_out, weights = self.self_attn(
                self.input_layernorm(hidden), cos_sin, masks, attn, cache, output_attentions
            )
            hidden = hidden + self.post_attention_layernorm(attn_out)
            mlp_out = mlp(self.pre_feedforward_layernorm(hidden))
        router_logits = None
        if isinstance(mlp_out, tuple):  # a mixture of experts: (output, router logits)
            mlp_out, router_logits = mlp_out
        if placement != "pre":
            mlp_out = self.post_feedforward_layernorm(mlp_out)
        return hidden + mlp_out, weights, router_logits


def padding_idx(config) -> int | None:
    """The embedding's padding row: `pad_token_id` when it is a valid id, else None."""
    pad = config.pad_token_id
    return pad if isinstance(pad, int) and 0 <= pad < config.vocab_size else None


def _same_config(config):
    return config


class DecoderModel(nn.Module):
    """The decoder stack: embeddings, layers, final norm. Returns hidden states [B, T, hidden].

    With `past_key_values` (a `KVCache` of length L) the T inputs are the tokens at cache
    positions L .. L+T-1, `attention_mask` covers all L + T positions, and the returned
    `past_key_values` has length L + T (see `fmodel.generation.cache` for what is written where).

    Class attributes a family's subclass sets:
        layer_class: its `DecoderLayer` subclass.
        rotaries: {attribute name: config -> the config that rotary module uses}; each layer
            reads the table `config.layer_rope(i)` names (Gemma 3 adds a local one).
        rope_dtype: the dtype of the rotation tables; None: the activations' (Llama). OLMo's
            are float32, and the rotated q and k are cast back to the activations' dtype.
    """

    supports_cache = True
    layer_class: ClassVar[type[DecoderLayer]] = DecoderLayer
    rotaries: ClassVar[Mapping[str, Callable[[Any], Any]]] = {"rotary_emb": _same_config}
    rope_dtype: ClassVar[torch.dtype | None] = None

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        parts = self.layer_class.parts
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx(config))
        self.layers = nn.ModuleList(self.layer_class(config, i) for i in range(config.num_hidden_layers))
        self.norm = parts.norm(config, config.hidden_size)
        for name, derive in self.rotaries.items():
            setattr(self, name, RotaryEmbedding(derive(config)))
        self.embed_scale = config.hidden_size**0.5 if parts.embed_scale else None
        self.windows = sorted({layer.self_attn.sliding_window for layer in self.layers}, key=lambda w: w or 0)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, T, hidden] of `input_ids` [B, T]."""
        return self.embed_tokens(input_ids)

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
        if self.config.attention_softcap is not None:  # a function that would drop it is refused
            require_softcap(attn, type(self).__name__)
        hidden = embed_inputs(self.embed, input_ids, inputs_embeds)  # [B, T, C]
        if self.embed_scale is not None:  # Gemma: in the activations' dtype, as Transformers
            hidden = hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)
        mask_inputs, position_ids = step_positions(hidden, attention_mask, position_ids, past_key_values)
        masks = {w: build_mask(attn.mask_kind, mask_inputs, w, hidden.dtype) for w in self.windows}
        rope_dtype = self.rope_dtype or hidden.dtype
        cos_sin = {name: getattr(self, name)(position_ids, rope_dtype) for name in self.rotaries}
        return run_cached_layers(
            self.layers,
            hidden,
            cos_sin,
            masks,
            attn,
            past_key_values=past_key_values,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            gradient_checkpointing=gradient_checkpointing,
            final=self.norm,
        )


class DecoderForCausalLM(nn.Module):
    """The decoder plus the LM head. Returns logits [B, T, vocab], soft-capped
    (`tanh(logits / cap) * cap`) when the config's `logit_softcap` is set (Gemma 2/3)."""

    supports_cache = True
    model_class: ClassVar[type[DecoderModel]] = DecoderModel

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.model = self.model_class(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.logit_softcap = config.logit_softcap

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def forward(self, *args: Any, logits_to_keep: int = 0, **kwargs: Any) -> dict[str, Any]:
        return with_logits(self.model(*args, **kwargs), self.head, logits_to_keep)


# --------------------------------------------------------------------------- specs


def decoder_init_rule(name: str, config) -> str | tuple:
    """Transformers' default init: normal weights (padding row zero), norms one, biases zero.
    A family whose norms start elsewhere (Gemma: zeros) passes its own rule."""
    if name.endswith("embed_tokens.weight") and padding_idx(config) is not None:
        return ("normal", None, padding_idx(config))
    if name.endswith("norm.weight"):
        return "ones"
    if name.endswith(".bias"):
        return "zeros"
    return "normal"


def _head_layout(prefix: str, parts: DecoderParts):
    def layout(config, layer_idx: int) -> HeadLayout:
        p = f"{prefix}layers.{layer_idx}.self_attn."
        groups = config.num_attention_heads // config.kv_heads
        pruned = len(config.pruned_heads.get(layer_idx, ()))
        slices: list[tuple[str, int, str]] = []
        if parts.fused_qkv:
            slices += [(p + "qkv_proj.weight", 0, "q|k|v")]
            if config.qkv_bias:
                slices += [(p + "qkv_proj.bias", 0, "q|k|v")]
        else:
            slices += [(p + f"{s}_proj.weight", 0, s) for s in "qkv"]
            if config.qkv_bias:
                slices += [(p + f"{s}_proj.bias", 0, s) for s in "qkv"]
        slices.append((p + "o_proj.weight", 1, "o"))
        return HeadLayout(
            heads=config.num_attention_heads - pruned,
            kv_heads=config.kv_heads - pruned // groups,
            head_dim=config.head_size,
            original_heads=config.num_attention_heads,
            slices=tuple(slices),
            # A norm over the whole q/k projection (OLMo 2) mixes the heads: removing some
            # changes what the others compute, so such a model cannot be pruned exactly.
            unprunable=(
                "its q/k norms span every head (qk_norm='projection'), so removing heads would change "
                "the remaining heads' outputs"
                if parts.qk_norm == "projection"
                else None
            ),
        )

    return layout


def _computed_buffers(prefix: str, model_class: type[DecoderModel]):
    def buffers(config, device) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}{name}.inv_freq": rope_inv_freq(derive(config))[0].to(device)
            for name, derive in model_class.rotaries.items()
        }

    return buffers


def _causal_lm_ties(config) -> dict[str, str]:
    return {"lm_head.weight": "model.embed_tokens.weight"} if config.tie_word_embeddings else {}


_IGNORE = (r"rotary_emb(_local)?\.inv_freq$",)


def register_decoder_family(
    model_type: str,
    prefix: str,
    model_class: type[DecoderModel],
    causal_lm_class: type[DecoderForCausalLM],
    *,
    init_rule: Callable[[str, Any], str | tuple] = decoder_init_rule,
    **spec_fields: Any,
) -> tuple[ArchSpec, ArchSpec]:
    """Register `<prefix>Model` (keys without the "model." prefix) and `<prefix>ForCausalLM`
    for `model_type`. `spec_fields` go to both `ArchSpec`s (e.g. `key_renames`); a `tp_plan`
    among them is a pair (base plan, causal LM plan) replacing the decoder's
    (`fmodel.distributed.plan.decoder_plan`)."""
    parts = model_class.layer_class.parts
    plan_parts = dict(
        fused_qkv=parts.fused_qkv, fused_gate_up=parts.fused_gate_up, qk_norm=parts.qk_norm, mlp_name=parts.mlp_name
    )
    plans = spec_fields.pop("tp_plan", None) or (
        decoder_plan("", **plan_parts),
        decoder_plan("model.", lm_head=True, **plan_parts),
    )
    common = dict(
        model_type=model_type,
        prefix="model",
        init_rule=init_rule,
        ignore_unexpected=_IGNORE,
        **spec_fields,
    )
    base = ArchSpec(
        name=f"{prefix}Model",
        build=model_class,
        is_base=True,
        ties=no_ties,
        input_embeddings="embed_tokens.weight",
        output_embeddings=None,
        computed_buffers=_computed_buffers("", model_class),
        head_layout=_head_layout("", parts),
        tp_plan=plans[0],
        output="base",
        **common,
    )
    causal = ArchSpec(
        name=f"{prefix}ForCausalLM",
        build=causal_lm_class,
        is_base=False,
        ties=_causal_lm_ties,
        input_embeddings="model.embed_tokens.weight",
        output_embeddings="lm_head.weight",
        computed_buffers=_computed_buffers("model.", model_class),
        head_layout=_head_layout("model.", parts),
        tp_plan=plans[1],
        output="causal_lm",
        **common,
    )
    return register_architecture(base), register_architecture(causal)
