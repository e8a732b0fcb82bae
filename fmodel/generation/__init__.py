"""Generation: decoding loops, the KV cache, logits processors and the generation config.

- `cache`: `KVCache`, `init_cache`, `check_cache`, `reorder_cache` (the forward's cache contract).
- `seq2seq_cache`: `Seq2SeqCache`, an encoder-decoder's decoder cache plus its cross-attention
  keys/values; `seq2seq`: encoder-decoder decoding (T5).
- `generate_call`: `fmodel.generate` (greedy, sampled, beam search) and `GenerateOutput`.
- `decode_loop`, `beam_search`: the loops behind it.
- `logits_process`: Transformers' processors and warpers, in its order.
- `config`: the frozen `GenerationConfig` and `load_generation_config`.

The forward pass imports `cache` from here, and `generate` imports the forward, so the modules
that run a model (`generate`, `decode_loop`, `beam_search`) are imported on first use of their
names rather than with the package: no import cycle between the forward and generation.
"""

from __future__ import annotations

import importlib
from typing import Any

from .cache import CacheError, KVCache, check_cache, init_cache, reorder_cache
from .config import GenerationConfig, load_generation_config
from .seq2seq_cache import Seq2SeqCache

__all__ = [
    "CacheError",
    "GenerateOutput",
    "GenerationConfig",
    "KVCache",
    "Seq2SeqCache",
    "check_cache",
    "generate",
    "init_cache",
    "load_generation_config",
    "reorder_cache",
]

_LAZY = {"generate": ".generate_call", "GenerateOutput": ".generate_call"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
