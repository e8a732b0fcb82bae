"""Fixtures for the client tests: tiny random checkpoints written by Transformers, each with a
small word-level tokenizer saved beside it, so a client can be pointed at a folder or given
(model, tokenizer) objects exactly as real user code does."""

from __future__ import annotations

import pytest
import torch

from ..conftest import TINY as BASE_TINY

transformers = pytest.importorskip("transformers")

import fmodel  # noqa: E402  (after the skip: the facade interop imports Transformers)

LIBS = {"transformers": transformers, "fmodel": fmodel}

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["paris", "france", "capital", "city", "the", "a", "of", "to", "and", "in", "is", "it", "that", "was", "he", "for", "on", "are", "as", "with", "his", "they", "at", "be", "this", "from", "have", "or", "by", "one", "had", "not", "but", "what", "all", "were", "when", "we", "there", "can", "an", "your", "which", "their", "said", "if", "do", "will", "each", "about", "how", "up", "out", "them", "then", "she", "many", "some", "so", "these", "would", "other", "into", "has", "more", "her", "two", "like", "him", "see", "time", "could", "no", "make", "than", "first", "been", "its", "who", "now", "people", "my", "made", "over", "did", "down", "only", "way", "find", "use", "may", "water", "long", "little", "very", "after", "words", "called", "just", "where", "most", "know"]
VOCAB = SPECIALS + WORDS[: 96 - len(SPECIALS)]
assert len(VOCAB) == 96
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)
TINY = {**BASE_TINY, "max_position_embeddings": 128}
# Sentences for the training clients (Trainer, TRL, accelerate): every word is in VOCAB.
TRAIN_TEXTS = [
    "the capital of france is paris",
    "paris is a city",
    "the city of paris is in france and it is the capital",
    "he was in the city",
    "she said that it was time to go",
    "they are at the water",
    "what is the first city",
    "we can find the way",
]


def make_tokenizer():
    """A word-level `PreTrainedTokenizerFast` over `VOCAB` (96 ids) with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = _fast(backend, ["input_ids", "attention_mask"], bos_token="<s>", eos_token="</s>")
    tok.chat_template = CHAT_TEMPLATE
    return tok, backend, processors


def _fast(backend, input_names: list[str], **tokens: str):
    """`backend` as a Transformers fast tokenizer with the shared special tokens."""
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=input_names,
        **tokens,
    )


def bert_tokenizer():
    """The word-level tokenizer with BERT's `[CLS] ... [SEP]` post-processing and token types."""
    _, backend, processors = make_tokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 4), ("[SEP]", 5)]
    )
    return _fast(backend, ["input_ids", "token_type_ids", "attention_mask"])


def hf_model(kind: str, seed: int = 0, **overrides):
    """A tiny random Transformers model of `kind` in eval mode (float32), with norms and biases
    perturbed so that parity tests see them."""
    torch.manual_seed(seed)
    if kind in ("llama", "llama-untied"):
        config = transformers.LlamaConfig(
            **{**TINY, "tie_word_embeddings": kind == "llama", "pad_token_id": 0, "bos_token_id": 1,
               "eos_token_id": 2, **overrides}
        )
        model = transformers.LlamaForCausalLM(config)
    elif kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2,
            pad_token_id=0, **overrides
        )
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.BertConfig(
            vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=112,
            max_position_embeddings=128, pad_token_id=0, **overrides
        )
        cls = {
            "bert": transformers.BertModel,
            "bert-mlm": transformers.BertForMaskedLM,
            "bert-cls": transformers.BertForSequenceClassification,
        }[kind]
        model = cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()[0]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """`checkpoint(kind, **config_overrides) -> folder`: a saved tiny Transformers checkpoint
    with its tokenizer (kinds: llama (tied), llama-untied, gpt2, bert, bert-mlm, bert-cls)."""
    made: dict = {}

    def make(kind: str, **overrides) -> str:
        key = (kind, tuple(sorted(overrides.items())))
        if key not in made:
            folder = tmp_path_factory.mktemp(kind)
            hf_model(kind, **overrides).save_pretrained(folder)
            (bert_tokenizer() if kind.startswith("bert") else make_tokenizer()[0]).save_pretrained(folder)
            made[key] = str(folder)
        return made[key]

    return make


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    a tiny model's matmuls gain nothing from threads, and on a shared machine the threads wait
    on each other (measured: a 64-wide linear 10x slower with 2 threads under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
