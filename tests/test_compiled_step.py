"""The compiled decode step (`fmodel.generation.compiled_step`, `generate(compile=True)`).

Cost: two AOTInductor compiles of a 2-layer hidden-32 Llama (batch 2: the padded batch, the
sampled batch, the beam search over 2 beams and the low-level step share it; and one with an
attention function calling a custom op), one fresh process loading the cached step, and
`torch.export` traces (no compile) of other families. The disk cache is a temporary folder.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import attrs
import pytest
import torch

import fmodel
from fmodel import attention
from fmodel.generation import compiled_step as cs

from .families import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[5, 17, 3, 40, 22, 9], [7, 7, 12, 60, 31, 2]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])  # row 1 left-padded


@pytest.fixture(scope="module", autouse=True)
def cache_root(tmp_path_factory):
    """Every compiled step of this module goes to a temporary FMODEL_CACHE."""
    root = tmp_path_factory.mktemp("fmodel-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FMODEL_CACHE", str(root))
        cs._LOADED.clear()
        yield root
        cs._LOADED.clear()


@pytest.fixture(scope="module")
def state():
    return fmodel.init(tiny_config("llama"), seed=0)


@pytest.fixture
def counted(monkeypatch):
    """How many one-token steps ran compiled (CompiledStep.run calls)."""
    calls = []
    run = cs.CompiledStep.run

    def counting(self, flat):
        calls.append(self.key)
        return run(self, flat)

    monkeypatch.setattr(cs.CompiledStep, "run", counting)
    return calls


def both(state, ids, **kwargs):
    kwargs = dict(return_dict_in_generate=True, output_logits=True, **kwargs)
    return fmodel.generate(state, ids, **kwargs), fmodel.generate(state, ids, compile=True, **kwargs)


def max_logit_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a.logits, b.logits, strict=True))


def test_greedy_padded_batch_equals_eager(state, counted):
    versions = {n: t._version for n, t in state.tensors.items()}
    eager, compiled = both(
        state, IDS, attention_mask=MASK, max_new_tokens=10, do_sample=False, eos_token_id=None
    )
    assert torch.equal(compiled.sequences, eager.sequences)
    assert max_logit_diff(eager, compiled) < 1e-5
    assert len(counted) == 9  # every step after the prefill
    assert {n: t._version for n, t in state.tensors.items()} == versions  # the state is not written


def test_sampling_with_processors_runs_compiled(state, counted):
    """Processors (a Python one too), warpers and sampling run on the compiled step's logits."""

    def ban_token_3(tokens, scores):
        return scores.index_fill(1, torch.tensor([3]), float("-inf"))

    kwargs = dict(
        attention_mask=MASK,
        max_new_tokens=8,
        do_sample=True,
        top_k=20,
        repetition_penalty=1.3,
        logits_processor=[ban_token_3],
        eos_token_id=None,
    )
    eager = fmodel.generate(state, IDS, generator=torch.Generator().manual_seed(3), **kwargs)
    compiled = fmodel.generate(state, IDS, generator=torch.Generator().manual_seed(3), compile=True, **kwargs)
    assert torch.equal(compiled, eager)
    assert len(counted) == 7
    assert not bool((compiled[:, IDS.shape[1] :] == 3).any())


def test_beam_search_runs_compiled(state, counted):
    """Beam search reorders the cache every step (new buffers): the compiled step follows."""
    eager, compiled = both(state, IDS[:1], max_new_tokens=6, num_beams=2, eos_token_id=None)
    assert torch.equal(compiled.sequences, eager.sequences)
    assert len(counted) == 5


def test_long_generation_grows_the_cache_under_the_compiled_step(state, counted):
    """The compiled path starts with room for COMPILED_STEP_SLOTS new tokens and grows the cache
    as the generation gets there (one artefact serves every capacity): same tokens as eager."""
    from fmodel.generation import decode_loop

    new = 2 * decode_loop.COMPILED_STEP_SLOTS + 20
    eager, compiled = both(state, IDS, attention_mask=MASK, max_new_tokens=new, eos_token_id=None)
    assert torch.equal(compiled.sequences, eager.sequences)
    assert max_logit_diff(eager, compiled) < 1e-4
    assert len(counted) == new - 1
    assert compiled.past_key_values.max_length == IDS.shape[1] + new


def test_compiled_step_equals_forward(state):
    """The low-level step: the forward's last logits, the cache written at position L only."""
    with torch.inference_mode():
        full = fmodel.forward(state, IDS, attention_mask=MASK).logits
        positions = (MASK.cumsum(-1) - 1).masked_fill(MASK == 0, 1)
        cache = fmodel.forward(
            state,
            IDS[:, :4],
            attention_mask=MASK[:, :4],
            position_ids=positions[:, :4],
            past_key_values=fmodel.init_cache(state, 2, 8),
        ).past_key_values
        before = [k[:, :, :4].clone() for k in cache.keys]
        logits, longer = cs.compiled_step(
            state, IDS[:, 4:5], cache, attention_mask=MASK[:, :5], position_ids=positions[:, 4:5]
        )
    assert longer.length == 5 and cache.length == 4
    assert float((logits - full[:, 4]).abs().max()) < 1e-5
    assert all(torch.equal(k[:, :, :4], b) for k, b in zip(cache.keys, before, strict=True))


def test_second_process_loads_the_cached_step(state, cache_root):
    cs.load_step(state, 2)  # built (or loaded) here
    # The child keys on this process's source hash: fmodel's files may change between the two
    # (an editor, a checkout); how a source change invalidates is test_key_changes_invalidate's.
    code = (
        "import fmodel; from fmodel.generation import compiled_step as cs; "
        "from tests.families import tiny_config; "
        f"cs._source_hash = lambda: {cs._source_hash()!r}; "
        "s = fmodel.init(tiny_config('llama'), seed=0); step = cs.load_step(s, 2); "
        "import sys; print('torch._inductor' in sys.modules, step.compile_s, step.load_s)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=str(_repo())
    )
    inductor, compile_s, load_s = out.stdout.split()[-3:]
    assert float(compile_s) == 0.0  # found on disk, not compiled again
    assert float(load_s) < 5
    assert inductor == "False"  # the C++ loader alone: no torch._inductor import (~1 s, ~74 MiB)


def _repo():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("damage", ["truncated", "record", "checksum-matches-garbage"])
def test_corrupt_entry_is_rebuilt(state, cache_root, monkeypatch, caplog, damage):
    """A damaged entry is never loaded: a warning, then the build runs again (here `_build` is
    replaced by a copy of the good package, so the test compiles nothing more)."""
    good = cs.load_step(state, 2)
    folder = cs.cache_dir()
    package, meta = folder / f"{good.key}.pt2", folder / f"{good.key}.json"
    pristine = package.read_bytes()
    if damage == "truncated":
        package.write_bytes(pristine[: len(pristine) // 2])
    elif damage == "record":
        meta.write_text("{not json")
    else:  # a record that matches garbage: the checksum passes, torch refuses it
        package.write_bytes(b"garbage" * 100)
        record = json.loads(meta.read_text())
        meta.write_text(json.dumps({**record, "sha256": cs._file_hash(package)}))
    builds = []

    def rebuild(state_, names, batch_size, dtype, attn_name, path):
        builds.append(path)
        path.write_bytes(pristine)

    monkeypatch.setattr(cs, "_build", rebuild)
    monkeypatch.setattr(cs, "_LOADED", {})
    with caplog.at_level(logging.WARNING, logger="fmodel"):
        step = cs.load_step(state, 2)
    assert builds == [package]
    assert "unusable" in caplog.text and "rebuilding" in caplog.text
    assert step.compile_s > 0.0  # built, not loaded
    assert json.loads(meta.read_text())["sha256"] == cs._file_hash(package)
    with torch.inference_mode():
        cache = fmodel.init_cache(state, 2, 4)
        logits, _ = cs.compiled_step(state, IDS[:, :1], cache)
        ref = fmodel.forward(state, IDS[:, :1], past_key_values=fmodel.init_cache(state, 2, 4)).logits[:, -1]
    assert float((logits - ref).abs().max()) < 1e-5


def test_key_changes_invalidate(state, monkeypatch):
    key = cs.step_key(state, 2, torch.float32, "sdpa")
    assert (
        cs.step_key(fmodel.init(tiny_config("llama"), seed=1), 2, torch.float32, "sdpa") == key
    )  # weights are inputs
    others = {
        "batch": cs.step_key(state, 1, torch.float32, "sdpa"),
        "cache dtype": cs.step_key(state, 2, torch.bfloat16, "sdpa"),
        "attention": cs.step_key(state, 2, torch.float32, "eager"),
        "shape": cs.step_key(
            fmodel.init(tiny_config("llama", hidden_size=64), seed=0), 2, torch.float32, "sdpa"
        ),
        "dtype": cs.step_key(fmodel.to(state, dtype=torch.bfloat16), 2, torch.float32, "sdpa"),
        "config": cs.step_key(
            fmodel.init(tiny_config("llama", rope_theta=500.0), seed=0), 2, torch.float32, "sdpa"
        ),
    }
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    others["torch"] = cs.step_key(state, 2, torch.float32, "sdpa")
    monkeypatch.undo()
    monkeypatch.setattr(cs, "_source_hash", lambda: "another fmodel")
    others["source"] = cs.step_key(state, 2, torch.float32, "sdpa")
    assert all(k != key for k in others.values()), others
    assert len(set(others.values())) == len(others)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FMODEL_CACHE", str(tmp_path / "a"))
    assert cs.cache_dir() == tmp_path / "a" / "compiled_step"
    monkeypatch.delenv("FMODEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cs.cache_dir() == tmp_path / "x" / "fmodel" / "compiled_step"


@pytest.mark.parametrize(
    ("make", "kwargs", "reason"),
    [
        (lambda: fmodel.init(tiny_config("mixtral"), seed=0), {}, "mixture of experts"),
        (lambda: fmodel.init(tiny_config("llama"), seed=0), {"use_cache": False}, "use_cache=False"),
        (
            lambda: fmodel.init(tiny_config("llama"), seed=0, attn_implementation="flex_attention"),
            {},
            "'block' mask",
        ),
    ],
    ids=["moe", "no-cache", "flex"],
)
def test_unsupported_runs_eagerly_with_a_reason(make, kwargs, reason, caplog, counted):
    s = make()
    with caplog.at_level(logging.WARNING, logger="fmodel"):
        out = fmodel.generate(s, IDS[:1], max_new_tokens=3, eos_token_id=None, compile=True, **kwargs)
    assert reason in caplog.text and "decoding eagerly" in caplog.text
    assert torch.equal(out, fmodel.generate(s, IDS[:1], max_new_tokens=3, eos_token_id=None, **kwargs))
    assert counted == []


def test_unsupported_low_level_call_raises(state):
    t5 = fmodel.init(tiny_config("t5"), seed=0)
    assert "not a causal language model" in cs.unsupported_reason(t5)
    with pytest.raises(fmodel.errors.UnsupportedOptionError, match="not a causal language model"):
        cs.load_step(t5, 1)
    with pytest.raises(fmodel.errors.ArgumentTypeError):
        fmodel.generate(state, IDS, compile="yes")


def _trace_matches_eager(s, tol: float = 1e-5) -> torch.export.ExportedProgram:
    """Export `s`'s step and run the program uncompiled over three decode positions of the
    padded batch: each step's logits equal the eager forward's. Returns the program."""
    exported = cs.export_step(s, 2)
    program = exported.module()
    names = sorted(s.tensors)
    positions = (MASK.cumsum(-1) - 1).masked_fill(MASK == 0, 1)
    with torch.inference_mode():
        full = fmodel.forward(s, IDS, attention_mask=MASK, position_ids=positions).logits
        cache = fmodel.init_cache(s, 2, 9)
        cache = fmodel.forward(
            s, IDS[:, :3], attention_mask=MASK[:, :3], position_ids=positions[:, :3], past_key_values=cache
        ).past_key_values
        padding = torch.ones(2, 9, dtype=torch.long)
        padding[:, :6] = MASK
        for i in range(3, 6):
            logits = program(
                [s.tensors[n] for n in names],
                list(cache.keys),
                list(cache.values),
                IDS[:, i : i + 1].contiguous(),
                positions[:, i : i + 1].contiguous(),
                torch.tensor([i]),
                padding,
            )
            cache = cache.advance(1)
            assert float((logits - full[:, i]).abs().max()) < tol, i
    return exported


def _kernel_ops(program: torch.export.ExportedProgram) -> list[str]:
    return sorted(
        str(n.target) for n in program.graph.nodes if n.op == "call_function" and "fmodel." in str(n.target)
    )


@pytest.mark.parametrize("model_type", ["gpt2", "qwen3", "olmo2", "phi3", "gemma2", "mistral"])
def test_family_trace_equals_eager(model_type):
    """The exported step of other families (run uncompiled: the trace is what differs between
    families; the compiled code is tested on Llama above) gives the eager logits."""
    s = fmodel.init(tiny_config(model_type), seed=0)
    assert cs.unsupported_reason(s) is None
    _trace_matches_eager(s)


def _kernels_built() -> bool:
    from fmodel.models import quant_linear

    return quant_linear.traces_kernel_op()


requires_kernels = pytest.mark.skipif(not _kernels_built(), reason="fmodel.kernels could not be built here")


@requires_kernels
@pytest.mark.parametrize(
    ("scheme", "kwargs", "ops"),
    [
        ("int8", {}, {"fmodel.int8_linear.default"}),
        ("int4", {"group_size": 32}, {"fmodel.int4_linear.default"}),
        ("int4", {"group_size": 32, "activations": "int8"}, {"fmodel.int4_linear.default"}),
    ],
    ids=["int8", "int4", "int4-act8"],
)
def test_quantized_trace_calls_the_kernels(scheme, kwargs, ops):
    """A quantized state's step traces one `fmodel.kernels` op per quantized projection (7 per
    layer), not a dequantization, and still gives the eager logits."""
    s = fmodel.quantize(fmodel.init(tiny_config("llama"), seed=0), scheme, **kwargs)
    assert cs.unsupported_reason(s) is None
    program = _trace_matches_eager(s)
    traced = _kernel_ops(program)
    # the float head aside, and the attention kernel (one call per layer)
    calls = [
        op for op in traced if op not in ("fmodel.dense_linear.default", "fmodel.decode_attention.default")
    ]
    quantized = s.config.extra["quantization_config"]["modules"]
    assert set(calls) == ops and len(calls) == len(quantized) == 7 * s.config.num_hidden_layers
    assert traced.count("fmodel.decode_attention.default") == s.config.num_hidden_layers


@requires_kernels
def test_quantized_gguf_state_runs_compiled(tmp_path, counted):
    """A GGUF file kept quantized (Q4_1 projections, a Q8_0 embedding tied to the head: a
    QuantEmbedding and a TiedQuantLinear) decodes compiled as it does eagerly."""
    from . import test_gguf as gguf_tests

    if gguf_tests.transformers is None or not gguf_tests.HAS_GGUF:
        pytest.skip("Transformers and gguf (writing the synthetic file) are not installed")
    model = gguf_tests._tiny("llama", seed=3, tie_word_embeddings=True)
    path = gguf_tests._write(tmp_path / "q.gguf", model, "Q4_1", seed=3)
    s = fmodel.load(path, quantized=True)
    assert "tied_modules" in s.config.extra["quantization_config"]
    assert cs.unsupported_reason(s) is None
    eager, compiled = both(s, IDS, attention_mask=MASK, max_new_tokens=5, eos_token_id=None)
    assert torch.equal(compiled.sequences, eager.sequences)
    assert max_logit_diff(eager, compiled) < 1e-4
    assert len(counted) == 4


def test_quantized_without_kernels_runs_eagerly(monkeypatch, caplog, counted):
    from fmodel.models import quant_linear

    monkeypatch.setattr(quant_linear, "_kernels", lambda: None)
    s = fmodel.quantize(fmodel.init(tiny_config("llama"), seed=0), "int8")
    with caplog.at_level(logging.WARNING, logger="fmodel"):
        out = fmodel.generate(s, IDS[:1], max_new_tokens=3, eos_token_id=None, compile=True)
    assert "fmodel.kernels, which is not available" in caplog.text and counted == []
    assert torch.equal(out, fmodel.generate(s, IDS[:1], max_new_tokens=3, eos_token_id=None))


@torch.library.custom_op("fmodel_test::scaled_sdpa", mutates_args=())
def _scaled_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    _OP_CALLS.append(q.shape[2])
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@_scaled_sdpa.register_fake
def _(q, k, v, mask, scale):
    return torch.empty_like(q)


_OP_CALLS: list[int] = []


def _custom_op_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    groups = module.num_key_value_groups
    key, value = (x.repeat_interleave(groups, dim=1) for x in (key, value))
    t, s = query.shape[2], key.shape[2]
    if attention_mask is None:  # the eager prefill without padding: plain causal
        mask = torch.ones(t, s, dtype=torch.bool).tril(s - t)[None, None]
    else:
        mask = attention_mask[:, :, :, :s]
    return torch.ops.fmodel_test.scaled_sdpa(query, key, value, mask, scaling).transpose(
        1, 2
    ).contiguous(), None


def test_custom_op_runs_inside_the_compiled_step(counted):
    """A torch custom op (fake impl registered) in the model's forward stays one op in the
    exported graph and the compiled step calls it (as `fmodel.kernels`' ops would be)."""
    attention.register("custom_op_test", _custom_op_attention, mask_kind="bool")
    try:
        s = attrs.evolve(fmodel.init(tiny_config("llama"), seed=0), attn_implementation="custom_op_test")
        eager = fmodel.generate(
            s, IDS[:1], max_new_tokens=4, eos_token_id=None, return_dict_in_generate=True, output_logits=True
        )
        _OP_CALLS.clear()
        compiled = fmodel.generate(
            s,
            IDS[:1],
            max_new_tokens=4,
            eos_token_id=None,
            compile=True,
            return_dict_in_generate=True,
            output_logits=True,
        )
    finally:
        attention.unregister("custom_op_test")
    assert len(counted) == 3
    assert _OP_CALLS.count(1) == 3 * 2  # each compiled step called the op in both layers
    assert torch.equal(compiled.sequences, eager.sequences)
    assert max_logit_diff(eager, compiled) < 1e-5
