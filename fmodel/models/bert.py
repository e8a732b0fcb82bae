"""The BERT family: weightless skeletons (`BertModel`, `BertForMaskedLM`,
`BertForSequenceClassification`) and their ArchSpecs.

Names are Transformers' own. Attention is bidirectional: the mask comes from padding only.
The MLM decoder's weight is tied to the word embeddings (when `tie_word_embeddings`) and its
bias is always the head's `cls.predictions.bias` (Transformers ties the two).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..attention import AttentionFunction, build_mask
from ..distributed.plan import bert_plan
from ._stack import require_one_input, run_layers, step_positions, with_logits
from .activations import ACTIVATIONS
from .decoder import padding_idx as _padding_idx
from .spec import ArchSpec, HeadLayout, no_ties, register_architecture

__all__ = ["BertForMaskedLM", "BertForSequenceClassification", "BertModel"]


def _layer_heads(config, layer_idx: int) -> int:
    return config.num_attention_heads - len(config.pruned_heads.get(layer_idx, ()))


class BertEmbeddings(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, _padding_idx(config))
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # Computed, non-persistent buffers (as in Transformers): the state supplies them.
        self.register_buffer(
            "position_ids", torch.empty(1, config.max_position_embeddings, dtype=torch.long), persistent=False
        )
        self.register_buffer(
            "token_type_ids",
            torch.empty(1, config.max_position_embeddings, dtype=torch.long),
            persistent=False,
        )

    def forward(self, input_ids, token_type_ids, position_ids, inputs_embeds):
        embeds = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, C]
        b, t = embeds.shape[:2]
        if position_ids is None:
            position_ids = self.position_ids[:, :t]
        if token_type_ids is None:
            token_type_ids = self.token_type_ids[:, :t].expand(b, t)
        hidden = embeds + self.token_type_embeddings(token_type_ids) + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(hidden))


class BertSelfAttention(nn.Module):
    """Bidirectional multi-head attention; carries what registry functions read from `module`."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_size
        self.num_heads = _layer_heads(config, layer_idx)
        self.num_key_value_groups = 1
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.attention_dropout = config.attention_probs_dropout_prob
        inner = self.num_heads * self.head_dim
        self.query = nn.Linear(config.hidden_size, inner)
        self.key = nn.Linear(config.hidden_size, inner)
        self.value = nn.Linear(config.hidden_size, inner)

    def forward(self, hidden, mask, attn: AttentionFunction, output_attentions: bool):
        b, t, _ = hidden.shape
        if self.num_heads == 0:  # every head pruned: the output projection adds only its bias
            return hidden.new_zeros(b, t, 0), hidden.new_zeros(b, 0, t, t) if output_attentions else None
        q, k, v = (
            proj(hidden).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
            for proj in (self.query, self.key, self.value)
        )
        out, weights = attn.fn(
            self,
            q,
            k,
            v,
            mask,
            scaling=self.scaling,
            dropout=self.attention_dropout if self.training else 0.0,
            output_attentions=output_attentions,
        )
        return out.reshape(b, t, -1), weights  # out: [B, T, H, D]


class BertAddNorm(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual): Transformers' BertSelfOutput / BertOutput."""

    def __init__(self, config, in_features: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.self = BertSelfAttention(config, layer_idx)
        self.output = BertAddNorm(config, self.self.num_heads * config.head_size)

    def forward(self, hidden, mask, attn, output_attentions):
        context, weights = self.self(hidden, mask, attn, output_attentions)
        return self.output(context, hidden), weights


class BertIntermediate(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.attention = BertAttention(config, layer_idx)
        self.intermediate = BertIntermediate(config)
        self.output = BertAddNorm(config, config.intermediate_size)

    def forward(self, hidden, mask, attn, output_attentions):
        attended, weights = self.attention(hidden, mask, attn, output_attentions)
        return self.output(self.intermediate(attended), attended), weights


class BertEncoder(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config, i) for i in range(config.num_hidden_layers))


class BertPooler(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class BertModel(nn.Module):
    """Embeddings + encoder (+ pooler). Returns last_hidden_state [B, T, C] and pooler_output [B, C]."""

    def __init__(self, config, add_pooling_layer: bool = True) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None

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
    ) -> dict[str, Any]:
        require_one_input(input_ids, inputs_embeds)
        hidden = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)
        mask_inputs, _ = step_positions(hidden, attention_mask, position_ids, causal=False)
        out = run_layers(
            self.encoder.layer,
            hidden,
            build_mask(attn.mask_kind, mask_inputs, None, hidden.dtype),
            attn,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            gradient_checkpointing=gradient_checkpointing,
        )
        out["pooler_output"] = self.pooler(out["last_hidden_state"]) if self.pooler is not None else None
        return out


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)  # its bias is tied to `bias`
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(config)


class BertForMaskedLM(nn.Module):
    """BERT without pooler plus the MLM head. Returns logits [B, T, vocab]."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)

    def forward(self, *args: Any, logits_to_keep: int = 0, **kwargs: Any) -> dict[str, Any]:
        return with_logits(self.bert(*args, **kwargs), self.cls.predictions, logits_to_keep)


class BertForSequenceClassification(nn.Module):
    """BERT with pooler, dropout and a linear classifier. Returns logits [B, num_labels]."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        dropout = (
            config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        out = self.bert(*args, **kwargs)
        return {**out, "logits": self.classifier(self.dropout(out["pooler_output"]))}


# --------------------------------------------------------------------------- specs


def _init_rule(name: str, config) -> str | tuple:
    if name.endswith("word_embeddings.weight") and _padding_idx(config) is not None:
        return ("normal", None, _padding_idx(config))
    if "LayerNorm.weight" in name:
        return "ones"
    if name.endswith("bias"):
        return "zeros"
    return "normal"


def _computed_buffers(prefix: str):
    def buffers(config, device) -> dict[str, torch.Tensor]:
        positions = torch.arange(config.max_position_embeddings, device=device).expand(1, -1)
        return {
            f"{prefix}embeddings.position_ids": positions,
            f"{prefix}embeddings.token_type_ids": torch.zeros_like(positions),
        }

    return buffers


def _head_layout(prefix: str):
    def layout(config, layer_idx: int) -> HeadLayout:
        p = f"{prefix}encoder.layer.{layer_idx}.attention."
        heads = _layer_heads(config, layer_idx)
        slices = tuple(
            (f"{p}self.{proj}.{kind}", 0, section)
            for proj, section in (("query", "q"), ("key", "k"), ("value", "v"))
            for kind in ("weight", "bias")
        )
        return HeadLayout(
            heads=heads,
            kv_heads=heads,
            head_dim=config.head_size,
            original_heads=config.num_attention_heads,
            slices=(*slices, (p + "output.dense.weight", 1, "o")),
        )

    return layout


def _mlm_ties(config) -> dict[str, str]:
    ties = {"cls.predictions.decoder.bias": "cls.predictions.bias"}
    if config.tie_word_embeddings:
        ties["cls.predictions.decoder.weight"] = "bert.embeddings.word_embeddings.weight"
    return ties


# Legacy TensorFlow-era names Transformers renames on load, and buffers it no longer stores.
_RENAMES = ((r"LayerNorm\.gamma$", "LayerNorm.weight"), (r"LayerNorm\.beta$", "LayerNorm.bias"))
_IGNORE = (r"embeddings\.(position_ids|token_type_ids)$",)
# Pre-training checkpoints (bert-base-uncased and kin) also hold the heads a class does not use:
# Transformers loads them with a warning, fmodel lists them as unused in the load report.
_IGNORE_MLM = (*_IGNORE, r"^bert\.pooler\.", r"^cls\.seq_relationship\.")
_IGNORE_CLASSIFIER = (*_IGNORE, r"^cls\.")


def _spec(
    name: str,
    build,
    *,
    is_base: bool,
    output: str,
    ties=no_ties,
    output_embeddings=None,
    output_bias=None,
    ignore_unexpected=_IGNORE,
):
    p = "" if is_base else "bert."
    return ArchSpec(
        name=name,
        model_type="bert",
        build=build,
        prefix="bert",
        is_base=is_base,
        ties=ties,
        input_embeddings=f"{p}embeddings.word_embeddings.weight",
        output_embeddings=output_embeddings,
        computed_buffers=_computed_buffers(p),
        init_rule=_init_rule,
        output=output,
        key_renames=_RENAMES,
        ignore_unexpected=ignore_unexpected,
        position_embeddings=f"{p}embeddings.position_embeddings.weight",
        position_ids_buffer=f"{p}embeddings.position_ids",
        output_bias=output_bias,
        head_layout=_head_layout(p),
        tp_plan=bert_plan(p),
        takes_head_mask=True,
    )


register_architecture(_spec("BertModel", BertModel, is_base=True, output="base"))
register_architecture(
    _spec(
        "BertForMaskedLM",
        BertForMaskedLM,
        is_base=False,
        output="masked_lm",
        ties=_mlm_ties,
        output_embeddings="cls.predictions.decoder.weight",
        output_bias="cls.predictions.bias",
        ignore_unexpected=_IGNORE_MLM,
    )
)
register_architecture(
    _spec(
        "BertForSequenceClassification",
        BertForSequenceClassification,
        is_base=False,
        output="sequence_classification",
        ignore_unexpected=_IGNORE_CLASSIFIER,
    )
)
