"""Greedy decode speed: `fmodel.generate` versus Transformers' `generate` on one checkpoint.

Usage:
    python benchmarks/decode.py [--checkpoint PATH] [--new-tokens N] [--prompt-tokens N]
                                [--repeats N] [--dtypes float32,bfloat16] [--threads N]
                                [--profile] [--json OUT]

Without --checkpoint, a random-weight Llama shaped like SmolLM2-135M (30 layers, hidden 576,
9 heads, 3 key/value heads, intermediate 1536, vocab 49152, tied embeddings) is written once
by Transformers' `save_pretrained` (float32) under `benchmarks/.cache/` (gitignored).

What is measured: batch 1, a random prompt of `--prompt-tokens` (16), `--new-tokens` (128)
greedy new tokens, "sdpa" attention in both, no EOS (both run the full length), under
`torch.inference_mode`. tokens/s = new tokens / wall time of the whole call (prefill
included). Both models are loaded in `dtype` in this process; their outputs are compared
token for token first (float32 must agree; bfloat16 may drift, the count is shown). Then
`--repeats` rounds, each running both libraries back to back, the order flipping every round;
the table shows medians and the median over rounds of the per-round ratio (steadier than a
ratio of medians when others' work comes and goes).

For context it also times the "GEMV floor": one matrix-vector product with every 2-D weight
of the model (a decode step's unavoidable weight reads) — on a CPU, memory bandwidth bounds
decode speed by it. `--profile` prints torch.profiler's top operators of fmodel's decode loop.

Target (issue 6): fmodel >= 2.5x Transformers' tokens/s in float32.

Threads: both libraries run with the same `torch.set_num_threads`. On a small machine shared
with other work, `--threads 1` gives steadier numbers: with every core busy, each parallel
region of a decode step (GEMVs, the sdpa kernel) can wait a scheduler slice for its helper
thread, and both libraries then slow down several-fold, erratically.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE_DIR = HERE / ".cache"
DEFAULT_CHECKPOINT = CACHE_DIR / "smollm2-135m-random-f32"

MODEL_CONFIG: dict[str, Any] = {
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
TARGET = 2.5  # fmodel tokens/s >= 2.5 x Transformers', float32
ATTN = "sdpa"
NOISY_SPREAD = 1.5


def build_random_checkpoint(path: Path, seed: int = 0) -> None:
    """A random float32 SmolLM2-135M-shaped Llama, written by Transformers (compare.py's builder)."""
    from compare import build_random_checkpoint as build

    build(path, seed, MODEL_CONFIG)


def ensure_checkpoint(path: Path | None) -> Path:
    if path is not None:
        if not (path / "config.json").is_file():
            raise SystemExit(f"{path}: no config.json there")
        return path
    if not (DEFAULT_CHECKPOINT / "config.json").is_file():
        print(f"building the random benchmark checkpoint at {DEFAULT_CHECKPOINT} ...", flush=True)
        build_random_checkpoint(DEFAULT_CHECKPOINT)
    return DEFAULT_CHECKPOINT


# --------------------------------------------------------------------------- the two calls


def make_calls(
    path: Path, dtype_name: str, prompt: int, new: int
) -> tuple[dict[str, Callable[[], Any]], Any]:
    """{"fmodel": call, "transformers": call} generating `new` greedy tokens, and the state."""
    import torch
    from transformers import AutoModelForCausalLM

    import fmodel

    dtype = getattr(torch, dtype_name)
    state = fmodel.load(path, dtype=dtype, attn_implementation=ATTN)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=ATTN).eval()
    ids = torch.randint(0, state.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    no_eos = fmodel.GenerationConfig()  # no token ids: no EOS, both run the full length

    def ours() -> Any:
        return fmodel.generate(state, ids, attention_mask=mask, max_new_tokens=new, generation_config=no_eos)

    def theirs() -> Any:
        return hf.generate(
            ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0
        )

    return {"fmodel": ours, "transformers": theirs}, state


def gemv_floor(state: Any) -> Callable[[], Any]:
    """One vector-matrix product per 2-D weight of the state (each distinct tensor once)."""
    import torch

    weights = {id(t): t for t in state.params.values() if t.dim() == 2}.values()
    vectors = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights}

    def run() -> None:
        for w in weights:
            torch.nn.functional.linear(vectors[w.shape[1]], w)

    return run


def read_bandwidth_gb_s(megabytes: int = 512, repeats: int = 5) -> float:
    """This machine's memory read bandwidth: best of `repeats` sums over a buffer far larger
    than the caches (GB/s)."""
    import torch

    buffer = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best / 1e9


def weight_bytes(state: Any) -> int:
    """Bytes a decode step must read: every distinct parameter once."""
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in state.params.values()}.values())


def time_rounds(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """`repeats` rounds; each calls every function once, the order flipping every round."""
    import torch

    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for i in range(repeats):
            for name in names if i % 2 == 0 else names[::-1]:
                start = time.perf_counter()
                calls[name]()
                samples[name].append(time.perf_counter() - start)
    return samples


def measure(path: Path, dtype_name: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    calls, state = make_calls(path, dtype_name, args.prompt_tokens, args.new_tokens)
    with torch.inference_mode():
        outs = {name: call() for name, call in calls.items()}  # also the warm-up
    p = args.prompt_tokens
    same = int((outs["fmodel"][0, p:] == outs["transformers"][0, p:]).cumprod(0).sum())
    samples = time_rounds(calls, args.repeats)
    floor = time_rounds({"floor": gemv_floor(state)}, max(5, args.repeats))["floor"]
    ratio = statistics.median(
        b / a for a, b in zip(samples["fmodel"], samples["transformers"], strict=True)
    )  # = fmodel tokens/s over Transformers'
    result = {
        "dtype": dtype_name,
        "new_tokens": args.new_tokens,
        "same_leading_tokens": same,
        "samples_s": samples,
        "tokens_per_s": {name: args.new_tokens / statistics.median(xs) for name, xs in samples.items()},
        "speedup": ratio,
        "gemv_floor_ms": 1e3 * statistics.median(floor),
        "weight_bytes": weight_bytes(state),
        "read_bandwidth_gb_s": read_bandwidth_gb_s(),
    }
    if args.profile:
        result["profile"] = profile(calls["fmodel"])
    return result


def profile(call: Callable[[], Any]) -> str:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


# --------------------------------------------------------------------------- report


def report(info: dict[str, Any], results: Sequence[dict[str, Any]]) -> None:
    header = ("dtype", "fmodel tok/s", "transformers tok/s", "speedup", "target", "result", "same tokens")
    rows = [header]
    for r in results:
        target = f">= {TARGET:.1f}x" if r["dtype"] == "float32" else ""
        passed = "" if not target else ("PASS" if r["speedup"] >= TARGET else "MISS")
        rows.append(
            (
                r["dtype"],
                f"{r['tokens_per_s']['fmodel']:.1f}",
                f"{r['tokens_per_s']['transformers']:.1f}",
                f"{r['speedup']:.2f}x",
                target,
                passed,
                f"{r['same_leading_tokens']}/{r['new_tokens']}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print()
    print(f"greedy decode, batch 1, {results[0]['new_tokens']} new tokens (speedup = fmodel / transformers)")
    for i, row in enumerate(rows):
        print(
            "  ".join(
                c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print()
    for r in results:
        per_token = {name: 1e3 / tps for name, tps in r["tokens_per_s"].items()}
        print(
            f"{r['dtype']}: ms/token fmodel {per_token['fmodel']:.1f}, transformers "
            f"{per_token['transformers']:.1f}; GEMV floor (every weight read once) {r['gemv_floor_ms']:.1f}"
        )
        achieved = {n: r["weight_bytes"] * tps / 1e9 for n, tps in r["tokens_per_s"].items()}
        print(
            f"  weight reads: fmodel {achieved['fmodel']:.1f} GB/s, transformers {achieved['transformers']:.1f} GB/s "
            f"({r['weight_bytes'] / 1e6:.0f} MB per token) vs this machine's read bandwidth "
            f"{r['read_bandwidth_gb_s']:.1f} GB/s"
        )
        spreads = ", ".join(f"{n} {min(x):.2f}-{max(x):.2f} s" for n, x in r["samples_s"].items())
        print(f"  samples (min-max): {spreads}")
        if "profile" in r:
            print(r["profile"])
    load_now = os.getloadavg()[0]
    print(f"load average (1 min): {info['load_average_1m']:.2f} at the start, {load_now:.2f} now")
    spread = max(max(x) / min(x) for r in results for x in r["samples_s"].values())
    if spread > NOISY_SPREAD or info["load_average_1m"] > max(1, (info["cpus"] or 1) - info["threads"]) + 0.5:
        print(f"warning: other work was running (samples vary up to {spread:.1f}x); ratios are less reliable")


def machine_info(threads: int, path: Path) -> dict[str, Any]:
    import platform

    import torch
    import transformers

    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "threads": threads,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "checkpoint": str(path),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", type=Path, help="HF checkpoint folder (default: random SmolLM2-135M shape)"
    )
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per dtype")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    parser.add_argument("--profile", action="store_true", help="print fmodel's top operators")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the numbers to OUT")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if importlib.util.find_spec("fmodel") is None:
        sys.path.append(str(REPO))
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    path = ensure_checkpoint(args.checkpoint)
    info = machine_info(threads, path)
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    results = []
    for dtype_name in args.dtypes.split(","):
        print(
            f"{dtype_name}: {args.repeats} rounds of {args.new_tokens} new tokens per library ...", flush=True
        )
        results.append(measure(path, dtype_name, args))
    report(info, results)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
