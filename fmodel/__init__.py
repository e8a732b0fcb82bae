"""fmodel: a functional model library for PyTorch.

A model is data (`ModelState`); loading, saving and every change are pure functions;
`forward` runs the state through `torch.func.functional_call` with pluggable attention.
"""

from . import attention
from .config import (
    BertConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    config_from_dict,
    load_config,
)
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
from .facade import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
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

__all__ = [
    "ArgumentTypeError",
    "AttentionUnavailableError",
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForMaskedLM",
    "AutoModelForSequenceClassification",
    "BertConfig",
    "CacheError",
    "CheckpointDtypeError",
    "CheckpointError",
    "ConfigError",
    "CorruptFileError",
    "FModelError",
    "GPT2Config",
    "GenerateOutput",
    "GenerationConfig",
    "HubUnavailableError",
    "InvalidArgumentError",
    "KVCache",
    "LlamaConfig",
    "LoadReport",
    "MistralConfig",
    "ModelOutput",
    "ModelState",
    "PreTrainedModel",
    "QuantizationError",
    "QuantizedDtypeError",
    "Qwen2Config",
    "ShapeMismatchError",
    "SizeLimitError",
    "StackError",
    "TieError",
    "TokenIdError",
    "Tokenizer",
    "UnknownArchitectureError",
    "attention",
    "bind_forward",
    "config_from_dict",
    "dequantize",
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
    "tie_weights",
    "to",
    "unstack_state",
    "untie_weights",
    "vmap_forward",
]
