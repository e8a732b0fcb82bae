"""The stateful, Transformers-compatible facade: `PreTrainedModel`, per-family and Auto classes.

Where Transformers is installed the facade uses it for what only a real Transformers class can
give a client (an `isinstance(model, transformers.PreTrainedModel)` in Trainer and PEFT, an
`isinstance(output, transformers.ModelOutput)` in pipelines, a real `GenerationConfig` that
pipelines deep-copy and update): see interop.py for the choice and why. Without it (or with
`FMODEL_NO_TRANSFORMERS=1`) every piece has an fmodel stand-in with the same behaviour; nothing
outside this package imports Transformers.
"""

from .auto import (
    FAMILY_CLASSES,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
)
from .model import PreTrainedModel
from .outputs import ModelOutput

globals().update(FAMILY_CLASSES)  # LlamaForCausalLM, GPT2LMHeadModel, BertModel, ...

__all__ = [
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForMaskedLM",
    "AutoModelForSeq2SeqLM",
    "AutoModelForSequenceClassification",
    "ModelOutput",
    "PreTrainedModel",
    *sorted(FAMILY_CLASSES),
]
