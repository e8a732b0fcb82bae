"""Bad calls of forward, vmap_forward, bind_forward and generate; see bad_argument_fixtures.py."""

from __future__ import annotations

import torch

import fmodel
from fmodel.errors import (
    ArgumentTypeError,
    AttentionUnavailableError,
    ConfigError,
    FModelError,
    InvalidArgumentError,
    SizeLimitError,
    TokenIdError,
)

from .bad_argument_fixtures import (
    BERT,
    FULL_CACHE,
    GPT2,
    GPT2_CACHE,
    IDS,
    LLAMA,
    LLAMA_CACHE,
    STACKED,
    Case,
)
from .bad_argument_fixtures import case as _c


def forward_cases() -> list[Case]:
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


def generate_cases() -> list[Case]:
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
