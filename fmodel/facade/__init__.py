"""The stateful, Transformers-compatible facade: `PreTrainedModel`, per-family and Auto classes."""

from .auto import (
    FAMILY_CLASSES,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)
from .model import PreTrainedModel
from .outputs import ModelOutput

globals().update(FAMILY_CLASSES)  # LlamaForCausalLM, GPT2LMHeadModel, BertModel, ...

__all__ = [
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForMaskedLM",
    "AutoModelForSequenceClassification",
    "ModelOutput",
    "PreTrainedModel",
    *sorted(FAMILY_CLASSES),
]
