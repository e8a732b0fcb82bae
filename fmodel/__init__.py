"""fmodel: a functional model library for PyTorch.

A model is data (`ModelState`); loading, saving and every change are pure functions;
`forward` runs the state through `torch.func.functional_call` with pluggable attention.
"""

from . import attention, stats
from .config import (
    BertConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    OlmoConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
    T5Config,
    config_from_dict,
    load_config,
)
from .distributed.distribute import distribute
from .errors import (
    ArgumentTypeError,
    AttentionUnavailableError,
    CheckpointDtypeError,
    CheckpointError,
    ConfigError,
    CorruptFileError,
    FModelError,
    HubUnavailableError,
    InvalidArgumentError,
    QuantizationError,
    QuantizedDtypeError,
    ShapeMismatchError,
    SizeLimitError,
    TokenIdError,
    UnknownArchitectureError,
)
from .forward import ModelOutput, bind_forward, forward
from .generation.cache import CacheError, KVCache, init_cache, reorder_cache
from .generation.config import GenerationConfig, load_generation_config
from .generation.generate_call import GenerateOutput, generate
from .io import LoadReport, load, load_with_report, save
from .io.gguf import load_gguf
from .state import ModelState, TieError
from .tokenizer import Tokenizer
from .transforms import (
    StackError,
    dequantize,
    get_input_embeddings,
    get_output_embeddings,
    init,
    init_weights,
    prune_heads,
    quantize,
    replace_params,
    resize_position_embeddings,
    resize_token_embeddings,
    set_attn_implementation,
    set_input_embeddings,
    set_output_embeddings,
    stack_states,
    tie_weights,
    to,
    unstack_state,
    untie_weights,
    vmap_forward,
)

__version__ = "0.1.0"

# The Transformers-style facade (nn.Module classes, config views, hub and training mixins) is
# imported on first use: the functional API and the CLI never need it, and it is a tenth of
# `import fmodel`'s own time. `fmodel.AutoModel` etc. and `from fmodel import AutoModel` work as
# before (PEP 562 module `__getattr__`).
_LAZY = {
    "AutoModel": ".facade",
    "AutoModelForCausalLM": ".facade",
    "AutoModelForMaskedLM": ".facade",
    "AutoModelForSeq2SeqLM": ".facade",
    "AutoModelForSequenceClassification": ".facade",
    "PreTrainedModel": ".facade",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    if name == "facade":
        import importlib

        return importlib.import_module(".facade", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | {"facade"})


__all__ = [
    "ArgumentTypeError",
    "AttentionUnavailableError",
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForMaskedLM",
    "AutoModelForSeq2SeqLM",
    "AutoModelForSequenceClassification",
    "BertConfig",
    "CacheError",
    "CheckpointDtypeError",
    "CheckpointError",
    "ConfigError",
    "CorruptFileError",
    "FModelError",
    "GPT2Config",
    "Gemma2Config",
    "Gemma3TextConfig",
    "GenerateOutput",
    "GenerationConfig",
    "HubUnavailableError",
    "InvalidArgumentError",
    "KVCache",
    "LlamaConfig",
    "LoadReport",
    "MistralConfig",
    "MixtralConfig",
    "ModelOutput",
    "ModelState",
    "Olmo2Config",
    "OlmoConfig",
    "Phi3Config",
    "PreTrainedModel",
    "QuantizationError",
    "QuantizedDtypeError",
    "Qwen2Config",
    "Qwen3Config",
    "Qwen3MoeConfig",
    "ShapeMismatchError",
    "SizeLimitError",
    "StackError",
    "T5Config",
    "TieError",
    "TokenIdError",
    "Tokenizer",
    "UnknownArchitectureError",
    "attention",
    "bind_forward",
    "config_from_dict",
    "dequantize",
    "distribute",
    "forward",
    "generate",
    "get_input_embeddings",
    "get_output_embeddings",
    "init",
    "init_cache",
    "init_weights",
    "load",
    "load_config",
    "load_generation_config",
    "load_gguf",
    "load_with_report",
    "prune_heads",
    "quantize",
    "reorder_cache",
    "replace_params",
    "resize_position_embeddings",
    "resize_token_embeddings",
    "save",
    "set_attn_implementation",
    "set_input_embeddings",
    "set_output_embeddings",
    "stack_states",
    "stats",
    "tie_weights",
    "to",
    "unstack_state",
    "untie_weights",
    "vmap_forward",
]
