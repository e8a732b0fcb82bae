"""Bad calls of the transforms that build or convert states (to, quantize, init, caches) and of
the registry and GenerationConfig; see bad_argument_fixtures.py."""

from __future__ import annotations

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
    SizeLimitError,
    UnknownArchitectureError,
)

from .bad_argument_fixtures import (
    BERT,
    GPT2,
    HAS_CUDA,
    HUGE,
    INT8,
    LLAMA,
    LLAMA_CACHE,
    LLAMA_CONFIG,
    Case,
    attn_fn,
)
from .bad_argument_fixtures import case as _c


def argument_cases() -> list[Case]:
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


def registry_cases() -> list[Case]:
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
        _c("attention-register-name-int", lambda: attention.register(5, attn_fn), ArgumentTypeError, "name"),
        _c(
            "attention-register-name-empty",
            lambda: attention.register("", attn_fn),
            InvalidArgumentError,
            "name",
        ),
        _c("attention-register-fn", lambda: attention.register("bad-fn", 5), ArgumentTypeError, "fn"),
        _c(
            "attention-register-mask-kind",
            lambda: attention.register("bad-kind", attn_fn, mask_kind="x"),
            InvalidArgumentError,
            "mask_kind",
        ),
        _c(
            "attention-register-check",
            lambda: attention.register("bad-check", attn_fn, check="x"),
            ArgumentTypeError,
            "check",
        ),
        _c("attention-get-None", lambda: attention.get(None), ArgumentTypeError, "attn_implementation"),
        _c("attention-get-list", lambda: attention.get([]), ArgumentTypeError, "attn_implementation"),
        _c("attention-get-unknown", lambda: attention.get("nope"), AttentionUnavailableError, "nope"),
        _c("attention-unregister-list", lambda: attention.unregister([]), ArgumentTypeError, "name"),
    ]


def cuda_cases() -> list[Case]:
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
