"""The table of bad calls behind tests/test_bad_arguments.py: every public function of the
functional API (and the attention registry, GenerationConfig) with several bad values per
argument. Each case says which error class it must raise and which word of the message names
the argument. The tiny states are built once here; the runner checks they never change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch

import fmodel
from fmodel import attention
from fmodel.errors import (
    ArgumentTypeError,
    AttentionUnavailableError,
    ConfigError,
    FModelError,
    InvalidArgumentError,
    QuantizationError,
    ShapeMismatchError,
    SizeLimitError,
    TokenIdError,
    UnknownArchitectureError,
)

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
STATES = {"llama": LLAMA, "gpt2": GPT2, "bert": BERT, "int8": INT8, "stacked": STACKED}

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


def _attn(*args, **kwargs):
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


def _state_cases() -> list[Case]:
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


def _c(id: str, call: Callable[[], Any], error: type[BaseException], names: str) -> Case:
    return Case(id, call, error, names)


def _argument_cases() -> list[Case]:
    L, B, Q = LLAMA, BERT, INT8
    f = fmodel
    cases = [
        # to
        _c("to-dtype-int8", lambda: f.to(L, dtype=torch.int8), InvalidArgumentError, "dtype"),
        _c("to-dtype-bool", lambda: f.to(L, dtype=torch.bool), InvalidArgumentError, "dtype"),
        _c("to-dtype-int64", lambda: f.to(L, dtype=torch.int64), InvalidArgumentError, "dtype"),
        _c("to-dtype-complex", lambda: f.to(L, dtype=torch.complex64), InvalidArgumentError, "dtype"),
        _c("to-dtype-str-int8", lambda: f.to(L, dtype="int8"), InvalidArgumentError, "dtype"),
        _c("to-dtype-banana", lambda: f.to(L, dtype="banana"), InvalidArgumentError, "dtype"),
        _c("to-dtype-int", lambda: f.to(L, dtype=3), ArgumentTypeError, "dtype"),
        _c("to-dtype-list", lambda: f.to(L, dtype=[torch.float16]), ArgumentTypeError, "dtype"),
        _c("to-device-nodevice", lambda: f.to(L, device="nodevice"), InvalidArgumentError, "device"),
        _c("to-device-cuda99", lambda: f.to(L, device="cuda:99"), InvalidArgumentError, "device"),
        _c("to-device-negative", lambda: f.to(L, device=-1), InvalidArgumentError, "device"),
        _c("to-device-float", lambda: f.to(L, device=3.5), ArgumentTypeError, "device"),
        _c("to-device-list", lambda: f.to(L, device=[]), ArgumentTypeError, "device"),
        _c("to-device-object", lambda: f.to(L, device=object()), ArgumentTypeError, "device"),
        _c("to-int8-state-dtype", lambda: f.to(Q, dtype=torch.float16), QuantizationError, "dequantize"),
        # dequantize / quantize
        _c("dequantize-dtype-int8", lambda: f.dequantize(Q, dtype=torch.int8), InvalidArgumentError, "dtype"),
        _c("dequantize-dtype-bool", lambda: f.dequantize(Q, dtype=torch.bool), InvalidArgumentError, "dtype"),
        _c("dequantize-dtype-str", lambda: f.dequantize(Q, dtype="nope"), InvalidArgumentError, "dtype"),
        _c("dequantize-dtype-int", lambda: f.dequantize(Q, dtype=8), ArgumentTypeError, "dtype"),
        _c("dequantize-float-state", lambda: f.dequantize(L), QuantizationError, "not quantized"),
        _c("quantize-scheme-None", lambda: f.quantize(L, None), ArgumentTypeError, "scheme"),
        _c("quantize-scheme-int", lambda: f.quantize(L, 8), ArgumentTypeError, "scheme"),
        _c("quantize-scheme-int3", lambda: f.quantize(L, "int3"), QuantizationError, "scheme"),
        _c(
            "quantize-group-48", lambda: f.quantize(L, "int4", group_size=48), QuantizationError, "group_size"
        ),
        _c(
            "quantize-group-str",
            lambda: f.quantize(L, "int4", group_size="64"),
            QuantizationError,
            "group_size",
        ),
        _c(
            "quantize-group-bool",
            lambda: f.quantize(L, "int4", group_size=True),
            QuantizationError,
            "group_size",
        ),
        _c("quantize-skip-str", lambda: f.quantize(L, "int8", skip="mlp"), ArgumentTypeError, "skip"),
        _c("quantize-skip-ints", lambda: f.quantize(L, "int8", skip=[1]), ArgumentTypeError, "skip"),
        _c("quantize-skip-bad-regex", lambda: f.quantize(L, "int8", skip=["("]), QuantizationError, "skip"),
        _c("quantize-skip-everything", lambda: f.quantize(L, "int8", skip=["."]), QuantizationError, "skip"),
        _c("quantize-gpt2-conv1d", lambda: f.quantize(GPT2, "int8"), QuantizationError, "no linear layer"),
        _c("quantize-twice", lambda: f.quantize(Q, "int8"), QuantizationError, "already quantized"),
        # init
        _c("init-config-None", lambda: f.init(None), ArgumentTypeError, "config"),
        _c("init-config-str", lambda: f.init("llama"), ArgumentTypeError, "config"),
        _c("init-config-dict", lambda: f.init({"model_type": "llama"}), ArgumentTypeError, "config"),
        _c("init-dtype-int8", lambda: f.init(LLAMA_CONFIG, dtype=torch.int8), InvalidArgumentError, "dtype"),
        _c("init-dtype-bool", lambda: f.init(LLAMA_CONFIG, dtype=torch.bool), InvalidArgumentError, "dtype"),
        _c("init-dtype-banana", lambda: f.init(LLAMA_CONFIG, dtype="banana"), InvalidArgumentError, "dtype"),
        _c("init-dtype-list", lambda: f.init(LLAMA_CONFIG, dtype=[]), ArgumentTypeError, "dtype"),
        _c("init-seed-negative", lambda: f.init(LLAMA_CONFIG, seed=-1), InvalidArgumentError, "seed"),
        _c("init-seed-str", lambda: f.init(LLAMA_CONFIG, seed="0"), ArgumentTypeError, "seed"),
        _c("init-seed-float", lambda: f.init(LLAMA_CONFIG, seed=1.5), ArgumentTypeError, "seed"),
        _c(
            "init-architecture-int",
            lambda: f.init(LLAMA_CONFIG, architecture=5),
            ArgumentTypeError,
            "architecture",
        ),
        _c(
            "init-architecture-unknown",
            lambda: f.init(LLAMA_CONFIG, architecture="NopeForX"),
            UnknownArchitectureError,
            "NopeForX",
        ),
        _c(
            "init-attn-int",
            lambda: f.init(LLAMA_CONFIG, attn_implementation=5),
            ArgumentTypeError,
            "attn_implementation",
        ),
        _c(
            "init-draw-order",
            lambda: f.init(LLAMA_CONFIG, draw_order="random"),
            InvalidArgumentError,
            "draw_order",
        ),
        _c(
            "init-draw-order-int", lambda: f.init(LLAMA_CONFIG, draw_order=1), ArgumentTypeError, "draw_order"
        ),
        _c(
            "init-generator-str",
            lambda: f.init(LLAMA_CONFIG, draw_order="transformers", generator="g"),
            ArgumentTypeError,
            "generator",
        ),
        _c("init-huge-config", lambda: f.init(HUGE), SizeLimitError, "init"),
        # init_weights
        _c("init_weights-seed-negative", lambda: f.init_weights(L, seed=-1), InvalidArgumentError, "seed"),
        _c(
            "init_weights-names-str",
            lambda: f.init_weights(L, names="model.norm.weight"),
            ArgumentTypeError,
            "names",
        ),
        _c("init_weights-names-ints", lambda: f.init_weights(L, names=[1]), ArgumentTypeError, "names"),
        _c(
            "init_weights-names-unknown",
            lambda: f.init_weights(L, names=["nope"]),
            InvalidArgumentError,
            "nope",
        ),
        _c(
            "init_weights-names-alias",
            lambda: f.init_weights(L, names=["lm_head.weight"]),
            InvalidArgumentError,
            "lm_head.weight",
        ),
        _c("init_weights-int8-state", lambda: f.init_weights(Q), QuantizationError, "init_weights"),
        # init_cache / reorder_cache
        _c("init_cache-batch-0", lambda: f.init_cache(L, 0, 8), FModelError, "batch_size"),
        _c("init_cache-batch-negative", lambda: f.init_cache(L, -1, 8), FModelError, "batch_size"),
        _c("init_cache-batch-str", lambda: f.init_cache(L, "1", 8), ArgumentTypeError, "batch_size"),
        _c("init_cache-batch-float", lambda: f.init_cache(L, 1.5, 8), ArgumentTypeError, "batch_size"),
        _c("init_cache-length-0", lambda: f.init_cache(L, 1, 0), FModelError, "max_length"),
        _c("init_cache-length-huge", lambda: f.init_cache(L, 1, 10**12), SizeLimitError, "max_length"),
        _c("init_cache-batch-huge", lambda: f.init_cache(L, 10**12, 8), SizeLimitError, "batch_size"),
        _c(
            "init_cache-dtype-int8",
            lambda: f.init_cache(L, 1, 8, dtype=torch.int8),
            InvalidArgumentError,
            "dtype",
        ),
        _c(
            "init_cache-device-bad",
            lambda: f.init_cache(L, 1, 8, device="nodevice"),
            InvalidArgumentError,
            "device",
        ),
        _c("init_cache-bert", lambda: f.init_cache(B, 1, 8), fmodel.CacheError, "not a generative"),
        _c(
            "reorder_cache-None", lambda: f.reorder_cache(None, torch.tensor([0])), ArgumentTypeError, "cache"
        ),
        _c(
            "reorder_cache-str",
            lambda: f.reorder_cache("cache", torch.tensor([0])),
            ArgumentTypeError,
            "cache",
        ),
        _c("reorder_cache-rows-list", lambda: f.reorder_cache(LLAMA_CACHE, [0]), ArgumentTypeError, "rows"),
        _c(
            "reorder_cache-rows-float",
            lambda: f.reorder_cache(LLAMA_CACHE, torch.tensor([0.0])),
            fmodel.CacheError,
            "rows",
        ),
        _c(
            "reorder_cache-rows-2d",
            lambda: f.reorder_cache(LLAMA_CACHE, torch.tensor([[0]])),
            fmodel.CacheError,
            "rows",
        ),
        _c(
            "reorder_cache-rows-range",
            lambda: f.reorder_cache(LLAMA_CACHE, torch.tensor([5])),
            fmodel.CacheError,
            "row indices",
        ),
        _c(
            "reorder_cache-rows-negative",
            lambda: f.reorder_cache(LLAMA_CACHE, torch.tensor([-1])),
            fmodel.CacheError,
            "row indices",
        ),
    ]
    return cases


def _forward_cases() -> list[Case]:
    L, G, B, f = LLAMA, GPT2, BERT, fmodel
    big = torch.tensor([[1, 2, 96]])
    neg = torch.tensor([[1, -1, 3]])
    return [
        _c("forward-ids-list", lambda: f.forward(L, [[1, 2]]), ArgumentTypeError, "input_ids"),
        _c("forward-ids-str", lambda: f.forward(L, "hello"), ArgumentTypeError, "input_ids"),
        _c("forward-ids-float", lambda: f.forward(L, torch.tensor([[1.0, 2.0]])), ValueError, "input_ids"),
        _c("forward-ids-1d", lambda: f.forward(L, torch.tensor([1, 2])), ValueError, "input_ids"),
        _c("forward-ids-too-big", lambda: f.forward(L, big), TokenIdError, "96"),
        _c("forward-ids-negative", lambda: f.forward(L, neg), TokenIdError, "-1"),
        _c("forward-ids-huge", lambda: f.forward(L, torch.tensor([[2**62]])), TokenIdError, "vocab_size=96"),
        _c(
            "forward-gpt2-ids-too-big",
            lambda: f.forward(G, torch.tensor([[80]])),
            TokenIdError,
            "vocab_size=80",
        ),
        _c(
            "forward-bert-ids-too-big",
            lambda: f.forward(B, torch.tensor([[70]])),
            TokenIdError,
            "vocab_size=70",
        ),
        _c(
            "forward-bert-token-types",
            lambda: f.forward(B, IDS, token_type_ids=torch.tensor([[0, 1, 2, 0]])),
            TokenIdError,
            "token_type_ids",
        ),
        _c(
            "forward-gpt2-position-ids",
            lambda: f.forward(G, IDS, position_ids=torch.tensor([[0, 1, 2, 16]])),
            TokenIdError,
            "position_ids",
        ),
        _c(
            "forward-gpt2-too-long",
            lambda: f.forward(G, torch.ones(1, 17, dtype=torch.long)),
            InvalidArgumentError,
            "positions",
        ),
        _c(
            "forward-bert-too-long",
            lambda: f.forward(B, torch.ones(1, 17, dtype=torch.long)),
            InvalidArgumentError,
            "positions",
        ),
        _c(
            "forward-both-inputs",
            lambda: f.forward(L, IDS, inputs_embeds=torch.zeros(1, 4, 32)),
            ValueError,
            "input_ids",
        ),
        _c("forward-no-inputs", lambda: f.forward(L), ValueError, "input_ids"),
        _c(
            "forward-embeds-hidden",
            lambda: f.forward(L, inputs_embeds=torch.zeros(1, 4, 31)),
            ValueError,
            "inputs_embeds",
        ),
        _c(
            "forward-embeds-list",
            lambda: f.forward(L, inputs_embeds=[[0.0]]),
            ArgumentTypeError,
            "inputs_embeds",
        ),
        _c(
            "forward-mask-list",
            lambda: f.forward(L, IDS, attention_mask=[[1, 1, 1, 1]]),
            ArgumentTypeError,
            "attention_mask",
        ),
        _c(
            "forward-mask-shape",
            lambda: f.forward(L, IDS, attention_mask=torch.ones(1, 3)),
            ValueError,
            "attention_mask",
        ),
        _c(
            "forward-cache-str",
            lambda: f.forward(L, IDS, past_key_values="cache"),
            fmodel.CacheError,
            "past_key_values",
        ),
        _c(
            "forward-cache-tuple",
            lambda: f.forward(L, IDS, past_key_values=((None, None),)),
            fmodel.CacheError,
            "past_key_values",
        ),
        _c(
            "forward-cache-gpt2-on-llama",
            lambda: f.forward(L, IDS, past_key_values=GPT2_CACHE),
            fmodel.CacheError,
            "KV cache",
        ),
        _c(
            "forward-cache-llama-on-gpt2",
            lambda: f.forward(G, IDS, past_key_values=LLAMA_CACHE),
            fmodel.CacheError,
            "KV cache",
        ),
        _c(
            "forward-cache-full",
            lambda: f.forward(L, IDS, past_key_values=FULL_CACHE),
            fmodel.CacheError,
            "full",
        ),
        _c(
            "forward-cache-batch",
            lambda: f.forward(L, IDS.repeat(2, 1), past_key_values=LLAMA_CACHE),
            fmodel.CacheError,
            "batch size",
        ),
        _c(
            "forward-cache-bert",
            lambda: f.forward(B, IDS, past_key_values=LLAMA_CACHE),
            fmodel.CacheError,
            "generative",
        ),
        _c(
            "forward-attn-unknown",
            lambda: f.forward(L, IDS, attn_implementation="nope"),
            AttentionUnavailableError,
            "nope",
        ),
        _c(
            "forward-attn-int",
            lambda: f.forward(L, IDS, attn_implementation=5),
            ArgumentTypeError,
            "attn_implementation",
        ),
        _c(
            "forward-head-mask-llama",
            lambda: f.forward(L, IDS, head_mask=torch.ones(4)),
            ValueError,
            "head_mask",
        ),
        _c("forward-stacked-state", lambda: f.forward(STACKED, IDS), InvalidArgumentError, "vmap_forward"),
        _c(
            "bind_forward-stacked-state",
            lambda: f.bind_forward(STACKED, lambda fw: fw(IDS)),
            InvalidArgumentError,
            "stacked",
        ),
        _c(
            "forward-logits-to-keep-negative",
            lambda: f.forward(L, IDS, logits_to_keep=-1),
            InvalidArgumentError,
            "logits_to_keep",
        ),
        _c(
            "forward-logits-to-keep-str",
            lambda: f.forward(L, IDS, logits_to_keep="x"),
            ArgumentTypeError,
            "logits_to_keep",
        ),
        _c("forward-training-str", lambda: f.forward(L, IDS, training="yes"), ArgumentTypeError, "training"),
        _c(
            "forward-position-ids-list",
            lambda: f.forward(L, IDS, position_ids=[[0, 1, 2, 3]]),
            ArgumentTypeError,
            "position_ids",
        ),
        _c(
            "forward-position-ids-shape",
            lambda: f.forward(L, IDS, position_ids=torch.tensor([[0, 1]])),
            InvalidArgumentError,
            "position_ids",
        ),
        _c(
            "forward-llama-token-types",
            lambda: f.forward(L, IDS, token_type_ids=torch.zeros(1, 4, dtype=torch.long)),
            ArgumentTypeError,
            "token_type_ids",
        ),
        _c(
            "forward-unknown-input",
            lambda: f.forward(L, IDS, banana=torch.ones(1)),
            ArgumentTypeError,
            "banana",
        ),
        _c(
            "forward-embeds-int",
            lambda: f.forward(L, inputs_embeds=torch.zeros(1, 4, 32, dtype=torch.long)),
            ArgumentTypeError,
            "inputs_embeds",
        ),
        _c(
            "forward-head-mask-list",
            lambda: f.forward(G, IDS, head_mask=[1, 1]),
            ArgumentTypeError,
            "head_mask",
        ),
        _c(
            "forward-head-mask-shape",
            lambda: f.forward(G, IDS, head_mask=torch.ones(7)),
            InvalidArgumentError,
            "head_mask",
        ),
        _c(
            "forward-cache-dtype",
            lambda: f.forward(L, IDS, past_key_values=f.init_cache(L, 1, 8, dtype=torch.float16)),
            fmodel.CacheError,
            "float16",
        ),
        _c(
            "bind_forward-training-str",
            lambda: f.bind_forward(L, lambda fw: fw(IDS), training="x"),
            ArgumentTypeError,
            "training",
        ),
        _c("vmap_forward-plain-state", lambda: f.vmap_forward(L, IDS), fmodel.StackError, "stack"),
        _c(
            "vmap_forward-ids-too-big",
            lambda: f.vmap_forward(STACKED, big),
            TokenIdError,
            "vmap_forward(input_ids)",
        ),
        _c("vmap_forward-ids-negative", lambda: f.vmap_forward(STACKED, neg), TokenIdError, "-1"),
        _c("vmap_forward-ids-list", lambda: f.vmap_forward(STACKED, [[1]]), ArgumentTypeError, "input_ids"),
        _c("bind_forward-fn-None", lambda: f.bind_forward(L, None), ArgumentTypeError, "fn"),
        _c("bind_forward-fn-str", lambda: f.bind_forward(L, "forward"), ArgumentTypeError, "fn"),
        _c("bind_forward-ids-too-big", lambda: f.bind_forward(L, lambda fw: fw(big)), TokenIdError, "96"),
        _c("bind_forward-ids-negative", lambda: f.bind_forward(L, lambda fw: fw(neg)), TokenIdError, "-1"),
        _c(
            "bind_forward-cache-gpt2",
            lambda: f.bind_forward(L, lambda fw: fw(IDS, past_key_values=GPT2_CACHE)),
            fmodel.CacheError,
            "KV cache",
        ),
    ]


def _generate_cases() -> list[Case]:
    L, G, B, f = LLAMA, GPT2, BERT, fmodel

    def gen(state=L, ids=IDS, **kwargs):
        return lambda: f.generate(state, ids, **{"max_new_tokens": 2, **kwargs})

    return [
        _c("generate-ids-list", gen(ids=[[1, 2]]), ArgumentTypeError, "input_ids"),
        _c("generate-ids-None", gen(ids=None), ArgumentTypeError, "input_ids"),
        _c("generate-ids-float", gen(ids=torch.tensor([[1.0]])), ArgumentTypeError, "input_ids"),
        _c("generate-ids-1d", gen(ids=torch.tensor([1, 2])), ValueError, "input_ids"),
        _c("generate-ids-empty", gen(ids=torch.zeros(1, 0, dtype=torch.long)), ValueError, "prompt"),
        _c("generate-ids-too-big", gen(ids=torch.tensor([[5, 96]])), TokenIdError, "96"),
        _c("generate-ids-negative", gen(ids=torch.tensor([[-3, 5]])), TokenIdError, "-3"),
        _c(
            "generate-gpt2-ids-too-big", gen(state=G, ids=torch.tensor([[80]])), TokenIdError, "vocab_size=80"
        ),
        _c("generate-max-new-negative", gen(max_new_tokens=-1), ConfigError, "max_new_tokens"),
        _c("generate-max-new-str", gen(max_new_tokens="5"), ConfigError, "max_new_tokens"),
        _c("generate-max-new-float", gen(max_new_tokens=1.5), ConfigError, "max_new_tokens"),
        _c("generate-max-new-zero", gen(max_new_tokens=0), FModelError, "max_new_tokens"),
        _c(
            "generate-max-new-huge-beams",
            gen(max_new_tokens=10**9, num_beams=2),
            SizeLimitError,
            "max_new_tokens",
        ),
        _c(
            "generate-max-new-huge-gpt2",
            gen(state=G, max_new_tokens=10**9),
            InvalidArgumentError,
            "max_new_tokens",
        ),
        _c("generate-max-length-str", gen(max_new_tokens=None, max_length="9"), ConfigError, "max_length"),
        _c("generate-num-beams-0", gen(num_beams=0), ConfigError, "num_beams"),
        _c("generate-num-beams-str", gen(num_beams="2"), ConfigError, "num_beams"),
        _c("generate-num-beams-huge", gen(num_beams=10**9), SizeLimitError, "num_beams"),
        _c("generate-return-seqs", gen(num_return_sequences=3), ConfigError, "num_return_sequences"),
        _c("generate-temperature-str", gen(do_sample=True, temperature="hot"), ConfigError, "temperature"),
        _c("generate-temperature-0", gen(do_sample=True, temperature=0.0), ConfigError, "temperature"),
        _c(
            "generate-temperature-negative", gen(do_sample=True, temperature=-1.0), ConfigError, "temperature"
        ),
        _c("generate-top-p-2", gen(do_sample=True, top_p=2.0), ConfigError, "top_p"),
        _c("generate-top-p-str", gen(do_sample=True, top_p="x"), ConfigError, "top_p"),
        _c("generate-top-k-negative", gen(do_sample=True, top_k=-1), ConfigError, "top_k"),
        _c("generate-repetition-str", gen(repetition_penalty="x"), ConfigError, "repetition_penalty"),
        _c("generate-do-sample-str", gen(do_sample="yes"), ConfigError, "do_sample"),
        _c(
            "generate-early-stopping", gen(num_beams=2, early_stopping="maybe"), ConfigError, "early_stopping"
        ),
        _c("generate-eos-str", gen(eos_token_id="x"), ConfigError, "eos_token_id"),
        _c("generate-pad-float", gen(pad_token_id=1.5), ConfigError, "pad_token_id"),
        _c("generate-generator-str", gen(do_sample=True, generator="g"), ArgumentTypeError, "generator"),
        _c("generate-streamer-str", gen(streamer="s"), ArgumentTypeError, "streamer"),
        _c("generate-processor-str", gen(logits_processor="x"), ArgumentTypeError, "logits_processor"),
        _c("generate-processor-ints", gen(logits_processor=[1]), ArgumentTypeError, "logits_processor"),
        _c(
            "generate-processor-bare",
            gen(logits_processor=lambda t, s: s),
            ArgumentTypeError,
            "logits_processor",
        ),
        _c("generate-criteria-int", gen(stopping_criteria=5), ArgumentTypeError, "stopping_criteria"),
        _c("generate-config-str", gen(generation_config="x"), ArgumentTypeError, "generation_config"),
        _c("generate-config-int", gen(generation_config=5), ArgumentTypeError, "generation_config"),
        _c("generate-config-bad-dict", gen(generation_config={"num_beams": -1}), ConfigError, "num_beams"),
        _c("generate-mask-list", gen(attention_mask=[[1, 1, 1, 1]]), ArgumentTypeError, "attention_mask"),
        _c("generate-mask-shape", gen(attention_mask=torch.ones(1, 3)), ValueError, "attention_mask"),
        _c("generate-module-str", gen(module="x"), ArgumentTypeError, "module"),
        _c("generate-ids-on-meta", gen(ids=IDS.to("meta")), InvalidArgumentError, "meta"),
        _c("generate-bert", gen(state=B), FModelError, "language-model head"),
        _c("generate-streamer-beams", gen(num_beams=2, streamer=_Streamer()), ConfigError, "streamer"),
    ]


class _Streamer:
    def put(self, value):
        pass

    def end(self):
        pass


def _transform_cases() -> list[Case]:
    L, G, B, f = LLAMA, GPT2, BERT, fmodel
    return [
        # prune_heads
        _c("prune_heads-int8", lambda: f.prune_heads(INT8, {0: [1]}), QuantizationError, "quantized"),
        _c("prune_heads-None", lambda: f.prune_heads(G, None), ArgumentTypeError, "heads_to_prune"),
        _c("prune_heads-str", lambda: f.prune_heads(G, "0:1"), ArgumentTypeError, "heads_to_prune"),
        _c("prune_heads-list", lambda: f.prune_heads(G, [0, 1]), ArgumentTypeError, "heads_to_prune"),
        _c("prune_heads-heads-int", lambda: f.prune_heads(G, {0: 1}), ArgumentTypeError, "heads_to_prune"),
        _c(
            "prune_heads-layer-str", lambda: f.prune_heads(G, {"0": [1]}), ArgumentTypeError, "heads_to_prune"
        ),
        _c("prune_heads-head-str", lambda: f.prune_heads(G, {0: ["1"]}), ArgumentTypeError, "heads_to_prune"),
        _c("prune_heads-layer-range", lambda: f.prune_heads(G, {99: [0]}), InvalidArgumentError, "layer 99"),
        _c(
            "prune_heads-head-range",
            lambda: f.prune_heads(G, {0: [99]}),
            InvalidArgumentError,
            "head ids [99]",
        ),
        _c(
            "prune_heads-head-negative",
            lambda: f.prune_heads(G, {0: [-1]}),
            InvalidArgumentError,
            "head ids [-1]",
        ),
        _c("prune_heads-gqa-group", lambda: f.prune_heads(L, {0: [0]}), ConfigError, "group"),
        # resize_token_embeddings
        _c(
            "resize_tokens-huge",
            lambda: f.resize_token_embeddings(L, 10**12),
            SizeLimitError,
            "new_num_tokens",
        ),
        _c(
            "resize_tokens-astronomic",
            lambda: f.resize_token_embeddings(L, 10**30),
            SizeLimitError,
            "new_num_tokens",
        ),
        _c(
            "resize_tokens-negative",
            lambda: f.resize_token_embeddings(L, -1),
            InvalidArgumentError,
            "new_num_tokens",
        ),
        _c(
            "resize_tokens-zero",
            lambda: f.resize_token_embeddings(L, 0),
            InvalidArgumentError,
            "new_num_tokens",
        ),
        _c(
            "resize_tokens-str",
            lambda: f.resize_token_embeddings(L, "100"),
            ArgumentTypeError,
            "new_num_tokens",
        ),
        _c(
            "resize_tokens-float",
            lambda: f.resize_token_embeddings(L, 100.0),
            ArgumentTypeError,
            "new_num_tokens",
        ),
        _c(
            "resize_tokens-bool",
            lambda: f.resize_token_embeddings(L, True),
            ArgumentTypeError,
            "new_num_tokens",
        ),
        _c(
            "resize_tokens-pad-0",
            lambda: f.resize_token_embeddings(L, 100, pad_to_multiple_of=0),
            InvalidArgumentError,
            "pad_to_multiple_of",
        ),
        _c(
            "resize_tokens-pad-negative",
            lambda: f.resize_token_embeddings(L, 100, pad_to_multiple_of=-8),
            InvalidArgumentError,
            "pad_to_multiple_of",
        ),
        _c(
            "resize_tokens-pad-str",
            lambda: f.resize_token_embeddings(L, 100, pad_to_multiple_of="8"),
            ArgumentTypeError,
            "pad_to_multiple_of",
        ),
        _c(
            "resize_tokens-pad-huge",
            lambda: f.resize_token_embeddings(L, 100, pad_to_multiple_of=10**13),
            SizeLimitError,
            "new_num_tokens",
        ),
        _c(
            "resize_tokens-generator",
            lambda: f.resize_token_embeddings(L, 100, generator=1),
            ArgumentTypeError,
            "generator",
        ),
        _c(
            "resize_tokens-gpt2-huge",
            lambda: f.resize_token_embeddings(G, 10**12),
            SizeLimitError,
            "new_num_tokens",
        ),
        # resize_position_embeddings
        _c(
            "resize_positions-gpt2-huge",
            lambda: f.resize_position_embeddings(G, 10**12),
            SizeLimitError,
            "new_num_position_embeddings",
        ),
        _c(
            "resize_positions-bert-huge",
            lambda: f.resize_position_embeddings(B, 10**12),
            SizeLimitError,
            "new_num_position_embeddings",
        ),
        _c(
            "resize_positions-zero",
            lambda: f.resize_position_embeddings(G, 0),
            InvalidArgumentError,
            "new_num_position_embeddings",
        ),
        _c(
            "resize_positions-negative",
            lambda: f.resize_position_embeddings(L, -5),
            InvalidArgumentError,
            "new_num_position_embeddings",
        ),
        _c(
            "resize_positions-str",
            lambda: f.resize_position_embeddings(G, "32"),
            ArgumentTypeError,
            "new_num_position_embeddings",
        ),
        _c(
            "resize_positions-None",
            lambda: f.resize_position_embeddings(G, None),
            ArgumentTypeError,
            "new_num_position_embeddings",
        ),
        _c(
            "resize_positions-generator",
            lambda: f.resize_position_embeddings(G, 32, generator="g"),
            ArgumentTypeError,
            "generator",
        ),
        # set / get embeddings
        _c("set_input-None", lambda: f.set_input_embeddings(L, None), ArgumentTypeError, "embeddings"),
        _c(
            "set_input-list", lambda: f.set_input_embeddings(L, [[0.0] * 32]), ArgumentTypeError, "embeddings"
        ),
        _c(
            "set_input-int-tensor",
            lambda: f.set_input_embeddings(L, torch.zeros(96, 32, dtype=torch.long)),
            ArgumentTypeError,
            "embeddings",
        ),
        _c(
            "set_input-hidden",
            lambda: f.set_input_embeddings(L, torch.zeros(96, 31)),
            ShapeMismatchError,
            "32",
        ),
        _c("set_input-1d", lambda: f.set_input_embeddings(L, torch.zeros(96)), ShapeMismatchError, "rows"),
        _c("set_output-None", lambda: f.set_output_embeddings(L, None), ArgumentTypeError, "embeddings"),
        _c(
            "set_output-shape",
            lambda: f.set_output_embeddings(L, torch.zeros(90, 32), tie=False),
            ShapeMismatchError,
            "shape",
        ),
        _c(
            "set_output-tie-str",
            lambda: f.set_output_embeddings(L, torch.zeros(96, 32), tie="no"),
            ArgumentTypeError,
            "tie",
        ),
        _c(
            "set_output-tied",
            lambda: f.set_output_embeddings(L, torch.zeros(96, 32)),
            fmodel.TieError,
            "tie=False",
        ),
        _c(
            "set_output-bert-base",
            lambda: f.set_output_embeddings(B, torch.zeros(70, 32)),
            FModelError,
            "output embeddings",
        ),
        # replace_params
        _c("replace_params-None", lambda: f.replace_params(L, None), ArgumentTypeError, "params"),
        _c("replace_params-list", lambda: f.replace_params(L, [torch.zeros(1)]), ArgumentTypeError, "params"),
        _c(
            "replace_params-str-value",
            lambda: f.replace_params(L, {"model.norm.weight": "x"}),
            ArgumentTypeError,
            "model.norm.weight",
        ),
        _c(
            "replace_params-int-key",
            lambda: f.replace_params(L, {1: torch.zeros(32)}),
            ArgumentTypeError,
            "params",
        ),
        _c(
            "replace_params-unknown",
            lambda: f.replace_params(L, {"nope": torch.zeros(1)}),
            fmodel.CheckpointError,
            "nope",
        ),
        _c(
            "replace_params-shape",
            lambda: f.replace_params(L, {"model.norm.weight": torch.zeros(31)}),
            ShapeMismatchError,
            "model.norm.weight",
        ),
        _c(
            "replace_params-dtype",
            lambda: f.replace_params(L, {"model.norm.weight": torch.zeros(32, dtype=torch.int8)}),
            ShapeMismatchError,
            "model.norm.weight",
        ),
        _c(
            "replace_params-alias",
            lambda: f.replace_params(L, {"lm_head.weight": torch.zeros(96, 32)}),
            fmodel.TieError,
            "lm_head.weight",
        ),
        _c(
            "replace_params-buffer",
            lambda: f.replace_params(L, {"model.rotary_emb.inv_freq": torch.zeros(4)}),
            fmodel.CheckpointError,
            "buffers",
        ),
        # attention choice
        _c(
            "set_attn-unknown",
            lambda: f.set_attn_implementation(L, "nope"),
            AttentionUnavailableError,
            "nope",
        ),
        _c("set_attn-None", lambda: f.set_attn_implementation(L, None), ArgumentTypeError, "name"),
        _c("set_attn-int", lambda: f.set_attn_implementation(L, 5), ArgumentTypeError, "name"),
        _c("set_attn-list", lambda: f.set_attn_implementation(L, ["eager"]), ArgumentTypeError, "name"),
        # stacks
        _c("stack_states-empty", lambda: f.stack_states([]), fmodel.StackError, "no states"),
        _c("stack_states-None", lambda: f.stack_states(None), ArgumentTypeError, "states"),
        _c("stack_states-str", lambda: f.stack_states("ab"), ArgumentTypeError, "states"),
        _c("stack_states-one-state", lambda: f.stack_states(L), ArgumentTypeError, "states"),
        _c("stack_states-families", lambda: f.stack_states([L, G]), fmodel.StackError, "state 1"),
        _c(
            "stack_states-configs",
            lambda: f.stack_states([L, fmodel.untie_weights(L)]),
            fmodel.StackError,
            "state 1",
        ),
        _c("unstack_state-plain", lambda: f.unstack_state(L), fmodel.StackError, "not a stacked state"),
    ]


def _registry_cases() -> list[Case]:
    gc = fmodel.GenerationConfig
    return [
        _c("GenerationConfig-max-length-negative", lambda: gc(max_length=-1), ConfigError, "max_length"),
        _c("GenerationConfig-max-length-str", lambda: gc(max_length="20"), ConfigError, "max_length"),
        _c("GenerationConfig-num-beams-float", lambda: gc(num_beams=1.5), ConfigError, "num_beams"),
        _c("GenerationConfig-temperature-str", lambda: gc(temperature="x"), ConfigError, "temperature"),
        _c("GenerationConfig-top-p-list", lambda: gc(top_p=[1]), ConfigError, "top_p"),
        _c("GenerationConfig-output-logits", lambda: gc(output_logits="yes"), ConfigError, "output_logits"),
        _c(
            "GenerationConfig-early-stopping",
            lambda: gc(early_stopping="maybe"),
            ConfigError,
            "early_stopping",
        ),
        _c("GenerationConfig-eos-str", lambda: gc(eos_token_id="x"), ConfigError, "eos_token_id"),
        _c("GenerationConfig-from-dict-str", lambda: gc.from_dict("x"), ArgumentTypeError, "data"),
        _c("GenerationConfig-from-dict-None", lambda: gc.from_dict(None), ArgumentTypeError, "data"),
        _c(
            "GenerationConfig-replace-typo",
            lambda: gc().replace(max_lenght=5),
            ArgumentTypeError,
            "max_lenght",
        ),
        _c(
            "load_generation_config-None",
            lambda: fmodel.load_generation_config(None),
            ArgumentTypeError,
            "path_or_repo_id",
        ),
        _c(
            "load_generation_config-int",
            lambda: fmodel.load_generation_config(5),
            ArgumentTypeError,
            "path_or_repo_id",
        ),
        _c("attention-register-name-int", lambda: attention.register(5, _attn), ArgumentTypeError, "name"),
        _c(
            "attention-register-name-empty",
            lambda: attention.register("", _attn),
            InvalidArgumentError,
            "name",
        ),
        _c("attention-register-fn", lambda: attention.register("bad-fn", 5), ArgumentTypeError, "fn"),
        _c(
            "attention-register-mask-kind",
            lambda: attention.register("bad-kind", _attn, mask_kind="x"),
            InvalidArgumentError,
            "mask_kind",
        ),
        _c(
            "attention-register-check",
            lambda: attention.register("bad-check", _attn, check="x"),
            ArgumentTypeError,
            "check",
        ),
        _c("attention-get-None", lambda: attention.get(None), ArgumentTypeError, "attn_implementation"),
        _c("attention-get-list", lambda: attention.get([]), ArgumentTypeError, "attn_implementation"),
        _c("attention-get-unknown", lambda: attention.get("nope"), AttentionUnavailableError, "nope"),
        _c("attention-unregister-list", lambda: attention.unregister([]), ArgumentTypeError, "name"),
    ]


def _cuda_cases() -> list[Case]:
    if HAS_CUDA:  # these devices exist on a GPU machine: not bad calls there
        return []
    return [
        _c("to-device-cuda", lambda: fmodel.to(LLAMA, device="cuda"), InvalidArgumentError, "device"),
        _c("to-device-int", lambda: fmodel.to(LLAMA, device=0), InvalidArgumentError, "device"),
        _c(
            "init_cache-device-cuda",
            lambda: fmodel.init_cache(LLAMA, 1, 8, device="cuda"),
            InvalidArgumentError,
            "device",
        ),
    ]


CASES: list[Case] = (
    _state_cases()
    + _argument_cases()
    + _forward_cases()
    + _generate_cases()
    + _transform_cases()
    + _registry_cases()
    + _cuda_cases()
)
