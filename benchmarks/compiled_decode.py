"""Compiled decode step (`fmodel.generate(..., compile=True)`) against the eager step.

Usage:
    python benchmarks/compiled_decode.py [--checkpoint PATH] [--dtypes float32,bfloat16]
        [--threads 1,2] [--new-tokens N] [--rounds N] [--profile] [--quantized] [--json OUT]

Default checkpoint: SmolLM2-135M-Instruct in float32 (`benchmarks/.cache/smollm2-135m-instruct-f32`,
written by compare.py / decode.py), else the random 30-layer model of its shape beside it.

What is measured, per dtype:
- compile: seconds to export and compile the step (the disk cache is a fresh temporary folder
  unless `FMODEL_CACHE` is set), then the warm load of the same entry in a new process (import
  excluded: the `load_step` call alone) and that process's whole run to a first compiled step;
- decode: ms per new token, eager vs compiled, batch 1, a 16-token prompt, no EOS: the time of
  `generate(max_new_tokens=N + 1)` minus that of `generate(max_new_tokens=1)` (so prefill and
  call setup cancel), divided by N; both variants run back to back each round, the order
  flipping every round, and the ratio is the median over rounds of the per-round ratios
  (steadier than a ratio of medians on a shared machine); the spread (max / min of the
  per-round ratios) is printed beside it;
- agreement: the greedy tokens of both (must be identical) and the largest logit difference.

`--profile` prints torch.profiler's table of one eager decode step: how much is the linear
layers' matrix products and how much is everything else (per-op dispatch and the small ops).
`--quantized` also exports and compiles an int4 (group 32) state bypassing the support check,
to show what a quantized state does under compile today (its layers trace the reference
dequantize + matmul).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import fmodel  # noqa: E402
from fmodel.generation import compiled_step as cs  # noqa: E402

DEFAULT = HERE / ".cache" / "smollm2-135m-instruct-f32"
FALLBACK = HERE / ".cache" / "llama-576h-30l-8heads-4kv-random-f32"


def per_token_ms(state, ids, new: int, compile: bool) -> tuple[float, torch.Tensor]:
    def run(n):
        start = time.perf_counter()
        out = fmodel.generate(
            state, ids, max_new_tokens=n, eos_token_id=None, do_sample=False, compile=compile
        )
        return time.perf_counter() - start, out

    long, out = run(new + 1)
    short, _ = run(1)
    return (long - short) / new * 1000, out


def decode_rounds(state, threads: int, new: int, rounds: int) -> dict:
    torch.set_num_threads(threads)
    ids = torch.randint(0, state.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    per_token_ms(state, ids, 4, True)  # warm both paths
    per_token_ms(state, ids, 4, False)
    eager, compiled, ratios = [], [], []
    same = True
    for r in range(rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        got = {}
        for flag in order:
            got[flag] = per_token_ms(state, ids, new, flag)
        eager.append(got[False][0])
        compiled.append(got[True][0])
        ratios.append(got[False][0] / got[True][0])
        same = same and torch.equal(got[False][1], got[True][1])
    return {
        "threads": threads,
        "eager_ms": statistics.median(eager),
        "compiled_ms": statistics.median(compiled),
        "eager_min_ms": min(eager),
        "compiled_min_ms": min(compiled),
        "speedup": statistics.median(ratios),
        "spread": max(ratios) / min(ratios),
        "tokens_identical": same,
    }


def logit_diff(state, new: int = 16) -> float:
    ids = torch.randint(0, state.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    kw = dict(
        max_new_tokens=new,
        eos_token_id=None,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    eager = fmodel.generate(state, ids, **kw)
    compiled = fmodel.generate(state, ids, compile=True, **kw)
    return max(float((a - b).abs().max()) for a, b in zip(eager.logits, compiled.logits, strict=True))


def warm_process(checkpoint: Path, dtype: str) -> dict:
    """A new process: import, load the state, load the cached step, run one compiled generate."""
    code = (
        "import time,sys,torch; t0=time.perf_counter(); import fmodel; "
        "from fmodel.generation import compiled_step as cs; "
        # keyed on this process's source hash: fmodel's files may be edited in between
        f"cs._source_hash = lambda: {cs._source_hash()!r}; "
        f"s=fmodel.load({str(checkpoint)!r}); s=fmodel.to(s, dtype=torch.{dtype}); t1=time.perf_counter(); "
        "step=cs.load_step(s,1); t2=time.perf_counter(); "
        "fmodel.generate(s, torch.tensor([[1,2,3]]), max_new_tokens=2, compile=True); t3=time.perf_counter(); "
        "print(step.compile_s, step.load_s, t2-t1, t3-t0)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, check=True
    )
    compile_s, load_s, call_s, total_s = map(float, out.stdout.split()[-4:])
    return {
        "warm_compile_s": compile_s,
        "warm_load_s": load_s,
        "warm_load_step_call_s": call_s,
        "warm_total_s": total_s,
    }


def profile_step(state) -> None:
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(1)
    ids = torch.randint(0, state.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    fmodel.generate(state, ids, max_new_tokens=4, eos_token_id=None)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fmodel.generate(state, ids, max_new_tokens=17, eos_token_id=None)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    products = ("aten::mm", "aten::addmm", "aten::bmm", "mkldnn::_linear_pointwise")
    gemm = sum(e.self_cpu_time_total for e in events if e.key in products or e.key.startswith("fmodel::"))
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    print(f"matrix products: {gemm / total:.0%} of self CPU time; everything else {1 - gemm / total:.0%}")


def quantized_under_compile(state, threads: int) -> dict:
    """An int4 state's step exported and compiled as it is today (bypassing the support check)."""
    q = fmodel.quantize(state, "int4", group_size=32)
    names = tuple(sorted(q.tensors))
    folder = cs.cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    package = folder / "quantized-probe.pt2"
    start = time.perf_counter()
    cs._build(q, names, 1, q.dtype, q.attn_implementation, package)
    compile_s = time.perf_counter() - start
    runner = torch._inductor.aoti_load_package(str(package))
    step = cs.CompiledStep(runner, "probe", names, cs.max_capacity(q), compile_s, 0.0)
    torch.set_num_threads(threads)
    cache = fmodel.init_cache(q, 1, 64)
    flat = [
        *step.inputs(q, cache),
        torch.zeros(1, 1, dtype=torch.long),
        torch.zeros(1, 1, dtype=torch.long),
        torch.zeros(1, dtype=torch.long),
        torch.ones(1, 64, dtype=torch.long),
    ]
    with torch.inference_mode():
        step.run(flat)
        times = []
        for _ in range(10):
            start = time.perf_counter()
            step.run(flat)
            times.append(time.perf_counter() - start)
    ids = torch.randint(0, q.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    eager_ms, _ = per_token_ms(q, ids, 16, False)
    return {
        "int4_compile_s": compile_s,
        "int4_compiled_ms": statistics.median(times) * 1000,
        "int4_eager_ms": eager_ms,
    }


def overhead_model():
    """SmolLM2-135M's layer count with hidden 64 and a 256-token vocabulary: its step is almost
    all per-op cost (dispatch, Python, small kernels), what compiling removes."""
    config = fmodel.config_from_dict(
        dict(
            model_type="llama",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=30,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
            tie_word_embeddings=True,
        )
    )
    return fmodel.init(config, seed=0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT if DEFAULT.exists() else FALLBACK)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--quantized", action="store_true")
    parser.add_argument(
        "--overhead", action="store_true", help="only the 30-layer hidden-64 model (per-op overhead)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if "FMODEL_CACHE" not in os.environ:
        os.environ["FMODEL_CACHE"] = tempfile.mkdtemp(prefix="fmodel-compiled-bench-")
    print(f"checkpoint {args.checkpoint}; compiled steps kept in {cs.cache_dir()}")
    base = overhead_model() if args.overhead else fmodel.load(args.checkpoint)
    results = []
    for dtype in args.dtypes.split(","):
        state = fmodel.to(base, dtype=getattr(torch, dtype))
        if args.profile:
            profile_step(state)
        start = time.perf_counter()
        step = cs.load_step(state, 1)
        row = {"dtype": dtype, "compile_s": step.compile_s, "first_load_s": time.perf_counter() - start}
        if not args.overhead:
            row.update(warm_process(args.checkpoint, dtype))
        row["max_logit_diff"] = logit_diff(state)
        for threads in map(int, args.threads.split(",")):
            row[f"threads_{threads}"] = decode_rounds(state, threads, args.new_tokens, args.rounds)
        if args.quantized and dtype == "float32":
            row.update(quantized_under_compile(state, 1))
        results.append(row)
        print(json.dumps(row, indent=1))
    print()
    print(
        "| dtype | compile s | warm load s | threads | eager ms/token | compiled ms/token | speedup (spread) |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in results:
        for threads in map(int, args.threads.split(",")):
            d = row[f"threads_{threads}"]
            print(
                f"| {row['dtype']} | {row['compile_s']:.1f} | {row.get('warm_load_s', float('nan')):.3f} | "
                f"{threads} | "
                f"{d['eager_ms']:.2f} ({d['eager_min_ms']:.2f}) | {d['compiled_ms']:.2f} "
                f"({d['compiled_min_ms']:.2f}) | {d['speedup']:.2f}x ({d['spread']:.2f}) |"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
