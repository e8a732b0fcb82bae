"""The tiny states, caches and the `Case` record behind tests/test_bad_arguments.py, and the
cases that pass a non-state where a state belongs. The states are built once here; the runner
checks they never change. The other cases: bad_argument_cases.py (transforms, init, caches,
registry), bad_argument_calls.py (forward, generate), bad_argument_edits.py (prune, resize,
embeddings, params, attention choice, stacks), bad_argument_families.py (the same few bad calls
on every registered family).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch

import fmodel
from fmodel.errors import (
    ArgumentTypeError,
)

from .families import head_architecture, model_types, tiny_config

TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
LLAMA_CONFIG = fmodel.LlamaConfig(**TINY, tie_word_embeddings=True)
GPT2_CONFIG = fmodel.config_from_dict(
    {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 16, "vocab_size": 80}
)
BERT_CONFIG = fmodel.config_from_dict(
    {
        "model_type": "bert",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "vocab_size": 70,
        "max_position_embeddings": 16,
        "type_vocab_size": 2,
    }
)

LLAMA = fmodel.init(LLAMA_CONFIG, seed=1)
GPT2 = fmodel.init(GPT2_CONFIG, seed=2)
BERT = fmodel.init(BERT_CONFIG, seed=3, architecture="BertModel")
INT8 = fmodel.quantize(LLAMA, "int8")
STACKED = fmodel.stack_states([LLAMA, fmodel.init(LLAMA_CONFIG, seed=4)])
# one tiny state of every registered family's head class (bad_argument_families.py), so a
# family registered later gets the generic bad calls too
FAMILY_STATES = {
    model_type: fmodel.init(tiny_config(model_type), architecture=head_architecture(model_type), seed=5)
    for model_type in model_types()
}
STATES = {
    "llama": LLAMA,
    "gpt2": GPT2,
    "bert": BERT,
    "int8": INT8,
    "stacked": STACKED,
    **{f"family-{model_type}": state for model_type, state in FAMILY_STATES.items()},
}

IDS = torch.tensor([[1, 2, 3, 4]])
GPT2_CACHE = fmodel.init_cache(GPT2, 1, 8)
LLAMA_CACHE = fmodel.init_cache(LLAMA, 1, 8)
FULL_CACHE = fmodel.init_cache(LLAMA, 1, 2)
HUGE = fmodel.LlamaConfig(
    vocab_size=10**6, hidden_size=2**20, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4
)
HAS_CUDA = torch.cuda.is_available()


@attrs.frozen
class Case:
    """One bad call: `call()` must raise `error` (an FModelError subclass) whose message
    contains `names` (the argument, as the caller spells it)."""

    id: str
    call: Callable[[], Any]
    error: type[BaseException]
    names: str


def attn_fn(*args, **kwargs):
    return args[3].transpose(1, 2), None


NOT_A_STATE = {"None": None, "str": "path/to/model", "list": [], "dict": {}, "int": 42}

# functions whose first argument is a state, with the rest of a call that would otherwise work
STATE_FUNCTIONS: dict[str, Callable[[Any], Any]] = {
    "to": lambda s: fmodel.to(s, dtype=torch.float16),
    "dequantize": lambda s: fmodel.dequantize(s),
    "quantize": lambda s: fmodel.quantize(s, "int8"),
    "init_weights": lambda s: fmodel.init_weights(s),
    "init_cache": lambda s: fmodel.init_cache(s, 1, 8),
    "forward": lambda s: fmodel.forward(s, IDS),
    "vmap_forward": lambda s: fmodel.vmap_forward(s, IDS),
    "bind_forward": lambda s: fmodel.bind_forward(s, lambda f: f(IDS)),
    "generate": lambda s: fmodel.generate(s, IDS, max_new_tokens=2),
    "prune_heads": lambda s: fmodel.prune_heads(s, {0: [1]}),
    "resize_token_embeddings": lambda s: fmodel.resize_token_embeddings(s, 100),
    "resize_position_embeddings": lambda s: fmodel.resize_position_embeddings(s, 32),
    "get_input_embeddings": lambda s: fmodel.get_input_embeddings(s),
    "get_output_embeddings": lambda s: fmodel.get_output_embeddings(s),
    "set_input_embeddings": lambda s: fmodel.set_input_embeddings(s, torch.zeros(96, 32)),
    "set_output_embeddings": lambda s: fmodel.set_output_embeddings(s, torch.zeros(96, 32), tie=False),
    "tie_weights": lambda s: fmodel.tie_weights(s),
    "untie_weights": lambda s: fmodel.untie_weights(s),
    "replace_params": lambda s: fmodel.replace_params(s, {}),
    "set_attn_implementation": lambda s: fmodel.set_attn_implementation(s, "eager"),
    "unstack_state": lambda s: fmodel.unstack_state(s),
    "stack_states": lambda s: fmodel.stack_states([LLAMA, s]),
}


def state_cases() -> list[Case]:
    cases = []
    for fn, call in STATE_FUNCTIONS.items():
        for label, value in NOT_A_STATE.items():
            names = {"vmap_forward": "stacked", "unstack_state": "stacked", "stack_states": "states[1]"}
            cases.append(
                Case(
                    f"{fn}-state-{label}",
                    lambda c=call, v=value: c(v),
                    ArgumentTypeError,
                    names.get(fn, "state"),
                )
            )
    return cases


def case(id: str, call: Callable[[], Any], error: type[BaseException], names: str) -> Case:
    return Case(id, call, error, names)
