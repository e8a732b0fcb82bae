"""Startup: the README demo from command start to first token and to exit (issue 15, item 4).

Usage:
    python benchmarks/startup.py [--runs N] [--warmup N] [--prompt TEXT] [--] [EXTRA CLI ARGS...]

Runs `fmodel generate --chat --prompt "What is the capital of France?"` (the README demo, the
packaged SmolLM2-135M-Instruct GGUF) `--runs` times (5), each in a fresh process, after
`--warmup` unmeasured runs (1: warm file cache, compiled bytecode). For every run it records

    first token   command start -> the first byte of generated text on stdout (the CLI flushes
                  each piece as it is decoded, so this is when a user sees the answer begin);
    total         command start -> process exit.

and prints their medians (and min/max), the answer text (it must stay "The capital of France
is Paris."), then `import fmodel`: the median over the runs of the in-process import time
(torch included, printed apart) and of a fresh `python -c "import fmodel"` from start to exit.

The command is `python -m fmodel` with this interpreter (the same code as the `fmodel` console
script, without depending on PATH). With PYTHONDONTWRITEBYTECODE set (as in some sandboxes),
an editable install's modules are compiled in every process; the script says so. Target (issue 15): first token < 2 s warm on this machine.
Benchmark only: no timed unit test ever asserts these numbers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

DEMO_PROMPT = "What is the capital of France?"
EXPECTED = "The capital of France is Paris."

_IMPORT_PROBE = (
    "import time; t0 = time.perf_counter(); import torch; t1 = time.perf_counter(); "
    "import fmodel; t2 = time.perf_counter(); print(t1 - t0, t2 - t1)"
)


def run_demo(argv: list[str]) -> tuple[float, float, str, int]:
    """One fresh process: (seconds to the first stdout byte, seconds to exit, stdout, status)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    first_s = time.perf_counter() - start
    rest = proc.stdout.read()
    status = proc.wait()
    total_s = time.perf_counter() - start
    if not first:
        first_s = float("nan")
    return first_s, total_s, (first + rest).decode("utf-8", "replace"), status


def import_times() -> tuple[float, float, float]:
    """(torch import s, fmodel import s after torch, fresh `python -c 'import fmodel'` s)."""
    out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, check=True)
    torch_s, fmodel_s = (float(x) for x in out.stdout.split())
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import fmodel"], check=True)
    return torch_s, fmodel_s, time.perf_counter() - start


def _summary(name: str, values: list[float]) -> str:
    return (
        f"{name:<12} median {statistics.median(values):6.2f} s   "
        f"min {min(values):6.2f} s   max {max(values):6.2f} s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="measured runs (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured runs first (default 1)")
    parser.add_argument("--prompt", default=DEMO_PROMPT, help="the chat prompt")
    parser.add_argument("extra", nargs="*", help="more `fmodel generate` arguments (after --)")
    args = parser.parse_args(argv)

    cmd = [sys.executable, "-m", "fmodel", "generate", "--chat", "--prompt", args.prompt, *args.extra]
    env_note = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    print(f"command: {env_note}{' '.join(cmd[1:])}  ({os.cpu_count()} cores)", flush=True)
    if os.environ.get("PYTHONDONTWRITEBYTECODE") and not os.environ.get("PYTHONPYCACHEPREFIX"):
        # fmodel's own modules (an editable install) are then compiled in every process: ~0.1 s
        print(
            "note: PYTHONDONTWRITEBYTECODE is set: every run compiles fmodel's sources (set "
            "PYTHONPYCACHEPREFIX=/some/dir and unset it to measure with cached bytecode)",
            flush=True,
        )
    for _ in range(args.warmup):
        run_demo(cmd)
    firsts, totals, answers = [], [], set()
    for i in range(args.runs):
        first_s, total_s, text, status = run_demo(cmd)
        if status != 0:
            print(f"run {i + 1}: exit status {status}", file=sys.stderr)
            return 1
        firsts.append(first_s)
        totals.append(total_s)
        answers.add(text.strip())
        print(f"  run {i + 1}: first token {first_s:.2f} s, total {total_s:.2f} s", flush=True)
    print(_summary("first token", firsts))
    print(_summary("total", totals))
    for answer in sorted(answers):
        mark = "ok" if args.prompt != DEMO_PROMPT or answer == EXPECTED else f"EXPECTED {EXPECTED!r}"
        print(f"answer: {answer!r} ({mark})")

    probes = [import_times() for _ in range(args.runs)]
    torch_s = statistics.median(p[0] for p in probes)
    fmodel_s = statistics.median(p[1] for p in probes)
    fresh_s = statistics.median(p[2] for p in probes)
    print(
        f"import fmodel: {torch_s + fmodel_s:.2f} s in process (torch {torch_s:.2f} s + fmodel "
        f"{fmodel_s:.2f} s); fresh `python -c 'import fmodel'` {fresh_s:.2f} s to exit"
    )
    print("target (issue 15): first token < 2 s warm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
