"""Every registered family, for the generic tables (config bounds, config round trips, bad
arguments, checkpoint fuzzing): tiny configs and models built from the registries
(`fmodel.config.CONFIG_CLASSES`, `fmodel.models.ARCHITECTURES`), so a family registered later
is covered by each table without being listed there.

A tiny config sets each size field of `TINY_SIZES` the family's config has (under the family's
own name: GPT-2's `n_embd` for `hidden_size`), the rest stays at Transformers' defaults.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

import fmodel
from fmodel.config import CONFIG_CLASSES
from fmodel.models import ARCHITECTURES

__all__ = [
    "TINY_SIZES",
    "head_architecture",
    "model_types",
    "tiny_config",
    "tiny_config_dict",
    "tiny_hf_model",
]

# Field name (generic or a family's own) -> its tiny value, where a config has the field.
TINY_SIZES: dict[str, Any] = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 64,
    # families' own size fields whose defaults are large
    "d_ff": 64,
    "num_local_experts": 4,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
}


def model_types() -> list[str]:
    """Every registered `model_type`, sorted."""
    return sorted(CONFIG_CLASSES)


def head_architecture(model_type: str) -> str:
    """The family's first registered class with a head (its LM head class), else its first class."""
    specs = [s for s in ARCHITECTURES.values() if s.model_type == model_type]
    heads = [s for s in specs if s.output != "base"]
    return (heads or specs)[0].name


def tiny_config_dict(model_type: str, **overrides: Any) -> dict[str, Any]:
    """A `config.json` dict of a tiny `model_type` model (the family's own field names)."""
    cls = CONFIG_CLASSES[model_type]
    fields = set(cls.modelled_keys())
    data: dict[str, Any] = {"model_type": model_type}
    for name, value in TINY_SIZES.items():
        own = cls.field_aliases.get(name, name)
        if own in fields:
            data[own] = value
    defaults = {f.name: f.default for f in attrs.fields(cls)}
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        # a default id past the tiny vocabulary (Phi-3's pad 32000) would not index an embedding
        default = defaults.get(name)
        if isinstance(default, int) and default >= TINY_SIZES["vocab_size"]:
            data[name] = None
    return {**data, **overrides}


def tiny_config(model_type: str, **overrides: Any):
    """fmodel's config of `tiny_config_dict(model_type, **overrides)`."""
    return fmodel.config_from_dict(tiny_config_dict(model_type, **overrides))


def tiny_hf_model(model_type: str, architecture: str | None = None, seed: int = 0, **overrides: Any):
    """Transformers' tiny random `architecture` (default: `head_architecture`) in eval mode."""
    import transformers

    data = tiny_config_dict(model_type, **overrides)
    data.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **data)
    torch.manual_seed(seed)
    return getattr(transformers, architecture or head_architecture(model_type))(config).eval()
