"""Frozen, hashable model configs that read and write Hugging Face `config.json` losslessly.

A config class lists the fields fmodel models, with Transformers' names and defaults.
Every other key of the source `config.json` is kept verbatim in `extra`, and the keys the
source spelled out are remembered in `given`, so `config_from_dict(d).to_diff_dict() == d`
(a family's generic alias, GPT-2's `num_attention_heads`, comes back under the family's own
name, `n_head`, as Transformers writes it).
"""

from .base import CONFIG_CLASSES, BaseConfig, config_from_dict, load_config, register_config
from .decoder import DecoderConfig, LlamaConfig, MistralConfig, Qwen2Config
from .encoder import BertConfig, GPT2Config
from .gemma import Gemma2Config, Gemma3TextConfig
from .moe import MixtralConfig, Qwen3MoeConfig
from .olmo import Olmo2Config, OlmoConfig
from .phi3 import Phi3Config
from .qwen3 import Qwen3Config
from .t5 import T5Config

__all__ = [
    "CONFIG_CLASSES",
    "BaseConfig",
    "BertConfig",
    "DecoderConfig",
    "GPT2Config",
    "Gemma2Config",
    "Gemma3TextConfig",
    "LlamaConfig",
    "MistralConfig",
    "MixtralConfig",
    "Olmo2Config",
    "OlmoConfig",
    "Phi3Config",
    "Qwen2Config",
    "Qwen3Config",
    "Qwen3MoeConfig",
    "T5Config",
    "config_from_dict",
    "load_config",
    "register_config",
]
