"""fmodel.kernels against torch's CPU kernels on SmolLM2-135M's matrix shapes (decode: x of 1 row).

Usage:
    python benchmarks/kernels.py [--threads 1,2] [--repeats 15] [--rows 1] [--shapes q,kv,up,down,head]
                                 [--step] [--portable]

Per shape and thread count, us per call (median over `--repeats` interleaved rounds) and GB/s of
the weight bytes each variant reads, beside:
  - torch F.linear float32 and bfloat16 (x in bfloat16 for the latter: torch's own choice),
  - torch._weight_int4pack_mm_for_cpu (tinygemm, group 32) and torch._weight_int8pack_mm,
  - a bandwidth probe: torch.sum over a float32 buffer of the same number of bytes (what reading
    that working set costs with a vectorised reduction), and the ratio of each variant to it.
Each layer shape is timed over 30 distinct weight copies in turn (SmolLM2 has 30 layers), so a
call finds its weight where a decode step does (L3 / memory, not L1); the LM head is one copy.
`--step` also times one whole decode step's GEMVs: the 210 projections of 30 layers + the
49152x576 LM head, as llama.cpp's file holds them (Q4_1 g32 projections, Q8_0 head), with
act_int8 and weight-only, and float32 / bfloat16 dense.
The machine is shared: variants are interleaved round by round and medians reported; the spread
(interquartile range / median) of each row is printed so noise is visible. At 1 thread the CPU
time of the calling thread is printed too ("cpu us"): it leaves out the time other processes
held the core, so it is the steadier figure on a busy machine (it still includes their cache
and memory-bandwidth pressure).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import fmodel.kernels as fk

SHAPES = {"q": (576, 576), "kv": (192, 576), "up": (1536, 576), "down": (576, 1536), "head": (49152, 576)}
LAYERS = 30


def pack(q: torch.Tensor) -> torch.Tensor:
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def make_weights(n: int, k: int, seed: int) -> dict[str, tuple]:
    """One weight of shape [n, k] in every variant's own storage."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    groups = k // 32
    q4 = torch.randint(0, 16, (n, k), generator=g)
    s4 = torch.rand(n, groups, generator=g) * 0.01
    z4 = -torch.rand(n, groups, generator=g) * 0.08
    q8 = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s8 = torch.rand(n, groups, generator=g) * 0.001
    sc = torch.rand(n, 1, generator=g) * 0.001
    tiny_w = torch._convert_weight_to_int4pack_for_cpu(q4.to(torch.int32).contiguous(), 1)
    tiny_sz = torch.stack((s4, z4 + 8 * s4), -1).transpose(0, 1).contiguous().bfloat16()
    return {
        "f32": (w,),
        "bf16": (w.bfloat16(),),
        "int4": (pack(q4), s4, z4),
        "int4h": (pack(q4), s4.half(), z4.half()),  # GGUF Q4_1's own bytes: float16 d and m
        "int8g32h": (q8, s8.half()),  # GGUF Q8_0's
        "int8g32": (q8, s8),
        "int8ch": (q8, sc),
        "tinygemm": (tiny_w, tiny_sz),
        "int8pack": (q8, sc.view(-1).bfloat16()),
    }


# variant -> (storage key, bytes-per-weight function, call)
def variants(k: int) -> dict[str, tuple[str, Callable]]:
    return {
        "torch f32 F.linear": ("f32", lambda x, xb, w: F.linear(x, w[0])),
        "fmodel dense f32": ("f32", lambda x, xb, w: fk.dense_linear(x, w[0])),
        "torch bf16 F.linear": ("bf16", lambda x, xb, w: F.linear(xb, w[0])),
        "fmodel dense bf16": ("bf16", lambda x, xb, w: fk.dense_linear(x, w[0])),
        "torch int4 tinygemm g32": (
            "tinygemm",
            lambda x, xb, w: torch._weight_int4pack_mm_for_cpu(xb, w[0], 32, w[1]),
        ),
        "fmodel int4 g32 w-only": ("int4", lambda x, xb, w: fk.int4_linear(x, w[0], w[1], w[2], 32, False)),
        "fmodel int4 g32 act8": ("int4", lambda x, xb, w: fk.int4_linear(x, w[0], w[1], w[2], 32, True)),
        "fmodel int4 g32 act8 f16s": (
            "int4h",
            lambda x, xb, w: fk.int4_linear(x, w[0], w[1], w[2], 32, True),
        ),
        "torch int8pack ch": ("int8pack", lambda x, xb, w: torch._weight_int8pack_mm(xb, w[0], w[1])),
        "fmodel int8 ch w-only": ("int8ch", lambda x, xb, w: fk.int8_linear(x, w[0], w[1], None, k, False)),
        "fmodel int8 ch act8": ("int8ch", lambda x, xb, w: fk.int8_linear(x, w[0], w[1], None, k, True)),
        "fmodel int8 g32 w-only": (
            "int8g32",
            lambda x, xb, w: fk.int8_linear(x, w[0], w[1], None, 32, False),
        ),
        "fmodel int8 g32 act8": ("int8g32", lambda x, xb, w: fk.int8_linear(x, w[0], w[1], None, 32, True)),
        "fmodel int8 g32 act8 f16s": (
            "int8g32h",
            lambda x, xb, w: fk.int8_linear(x, w[0], w[1], None, 32, True),
        ),
    }


def nbytes(ts: tuple) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def summarize(samples: list[float]) -> tuple[float, float]:
    med = statistics.median(samples)
    q = statistics.quantiles(samples, n=4) if len(samples) >= 4 else [med, med, med]
    return med, (q[2] - q[0]) / med if med else 0.0


def bench_shape(name: str, n: int, k: int, rows: int, threads: list[int], repeats: int) -> None:
    copies = 1 if name == "head" else LAYERS
    weights = [make_weights(n, k, seed) for seed in range(copies)]
    x = torch.randn(rows, k)
    xb = x.bfloat16()
    vs = variants(k)
    probe_bytes = nbytes(weights[0]["f32"])
    probes = [torch.empty(probe_bytes // 4) for _ in range(copies)]
    for p in probes:
        p.uniform_()
    print(f"\n== {name} [{n} x {k}], x [{rows}, {k}], {copies} weight copies")
    for t in threads:
        torch.set_num_threads(t)
        times: dict[str, list[float]] = {v: [] for v in [*vs, "probe f32 sum"]}
        cpu: dict[str, list[float]] = {v: [] for v in times}
        for _ in range(repeats + 2):
            for v, (key, call) in vs.items():
                start, start_cpu = time.perf_counter(), time.thread_time()
                for w in weights:
                    call(x, xb, w[key])
                times[v].append((time.perf_counter() - start) / copies * 1e6)
                cpu[v].append((time.thread_time() - start_cpu) / copies * 1e6)
            start, start_cpu = time.perf_counter(), time.thread_time()
            for p in probes:
                p.sum()
            times["probe f32 sum"].append((time.perf_counter() - start) / copies * 1e6)
            cpu["probe f32 sum"].append((time.thread_time() - start_cpu) / copies * 1e6)
        probe_us, _ = summarize(times["probe f32 sum"][2:])
        print(f"-- {t} thread(s); probe: torch.sum over the f32 weight's {probe_bytes / 1e6:.2f} MB")
        print(
            f"   {'variant':26s} {'us/call':>9s} {'spread':>7s} {'cpu us':>8s} {'MB':>7s} {'GB/s':>7s} {'vs probe':>9s}"
        )
        base = None
        for v, samples in times.items():
            us, spread = summarize(samples[2:])
            cpu_us = f"{summarize(cpu[v][2:])[0]:8.1f}" if t == 1 else f"{'':8s}"
            b = probe_bytes if v.startswith("probe") else nbytes(weights[0][vs[v][0]])
            base = us if v == "torch f32 F.linear" else base
            print(
                f"   {v:26s} {us:9.1f} {spread:6.0%} {cpu_us} {b / 1e6:7.2f} {b / us / 1e3:7.1f}"
                f" {probe_us / us * (b / probe_bytes):9.2f}   x{base / us:.2f} vs torch f32"
            )


def bench_step(threads: list[int], repeats: int) -> None:
    """The GEMVs of one SmolLM2-135M decode step: 30 x (q, k, v, o, gate, up, down) + LM head."""
    layer = [SHAPES["q"], SHAPES["kv"], SHAPES["kv"], SHAPES["q"], SHAPES["up"], SHAPES["up"], SHAPES["down"]]
    mats = [make_weights(n, k, i * 7 + j) for i in range(LAYERS) for j, (n, k) in enumerate(layer)]
    head = make_weights(*SHAPES["head"], 999)
    xs = {576: torch.randn(1, 576), 1536: torch.randn(1, 1536)}

    def step(kind: str) -> Callable[[], None]:
        def run():
            for w in mats:
                k = w["f32"][0].shape[1]
                x = xs[k]
                if kind == "q4_act8":
                    fk.int4_linear(x, *w["int4"], 32, True)
                elif kind == "q4h_act8":
                    fk.int4_linear(x, *w["int4h"], 32, True)
                elif kind == "q4_w":
                    fk.int4_linear(x, *w["int4"], 32, False)
                elif kind == "f32":
                    fk.dense_linear(x, w["f32"][0])
                elif kind == "bf16":
                    fk.dense_linear(x, w["bf16"][0])
                elif kind == "torch_f32":
                    F.linear(x, w["f32"][0])
            x = xs[576]
            if kind == "q4_act8":
                fk.int8_linear(x, *head["int8g32"], None, 32, True)
            elif kind == "q4h_act8":
                fk.int8_linear(x, *head["int8g32h"], None, 32, True)
            elif kind == "q4_w":
                fk.int8_linear(x, *head["int8g32"], None, 32, False)
            elif kind in ("f32", "torch_f32"):
                (fk.dense_linear if kind == "f32" else lambda a, b: F.linear(a, b))(x, head["f32"][0])
            else:
                fk.dense_linear(x, head["bf16"][0])

        return run

    kinds = {
        "Q4_1 proj + Q8_0 head, act_int8": ("q4_act8", ("int4",), ("int8g32",)),
        "the same, float16 scales (GGUF's bytes)": ("q4h_act8", ("int4h",), ("int8g32h",)),
        "Q4_1 proj + Q8_0 head, weight-only": ("q4_w", ("int4",), ("int8g32",)),
        "float32 (fmodel dense)": ("f32", ("f32",), ("f32",)),
        "bfloat16 (fmodel dense)": ("bf16", ("bf16",), ("bf16",)),
        "float32 (torch F.linear)": ("torch_f32", ("f32",), ("f32",)),
    }
    # bandwidth probes: torch.sum over 211 buffers of the float32 and the Q4_1 step's sizes
    probe_f32 = [torch.ones(w["f32"][0].numel()) for w in mats] + [torch.ones(head["f32"][0].numel())]
    probe_q4 = [torch.ones(nbytes(w["int4"]) // 4) for w in mats] + [torch.ones(nbytes(head["int8g32"]) // 4)]
    for probe_label, bufs in (
        ("probe: torch.sum, float32's bytes", probe_f32),
        ("probe: torch.sum, Q4_1's bytes", probe_q4),
    ):
        kinds[probe_label] = (bufs, None, None)

    def probe(bufs):
        def run():
            for b in bufs:
                b.sum()

        return run

    for t in threads:
        torch.set_num_threads(t)
        times: dict[str, list[float]] = {k: [] for k in kinds}
        cpu: dict[str, list[float]] = {k: [] for k in kinds}
        for _ in range(repeats + 2):
            for label, (kind, _, _) in kinds.items():
                fn = step(kind) if isinstance(kind, str) else probe(kind)
                start, start_cpu = time.perf_counter(), time.thread_time()
                fn()
                times[label].append((time.perf_counter() - start) * 1e3)
                cpu[label].append((time.thread_time() - start_cpu) * 1e3)
        print(f"\n== one decode step's GEMVs (211 matrices), {t} thread(s)")
        for label, (_, pk, hk) in kinds.items():
            ms, spread = summarize(times[label][2:])
            cpu_ms = f"cpu {summarize(cpu[label][2:])[0]:6.2f} ms" if t == 1 else ""
            if pk is None:
                mb = sum(b.numel() * 4 for b in kinds[label][0]) / 1e6
            else:
                mb = (sum(nbytes(w[pk[0]]) for w in mats) + nbytes(head[hk[0]])) / 1e6
            print(f"   {label:38s} {ms:7.2f} ms {spread:5.0%} {cpu_ms}  {mb:7.1f} MB  {mb / ms:6.1f} GB/s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--step", action="store_true")
    parser.add_argument("--portable", action="store_true", help="time the portable loops instead of AVX-512")
    args = parser.parse_args()
    info = fk.build()
    threads = [int(t) for t in args.threads.split(",")]
    print(
        f"fmodel.kernels: {info['simd']}; torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}"
    )
    ctx = fk._portable() if args.portable else None
    if ctx:
        ctx.__enter__()
    with torch.inference_mode():
        for name in args.shapes.split(","):
            if name:
                bench_shape(name, *SHAPES[name], args.rows, threads, args.repeats)
        if args.step:
            bench_step(threads, args.repeats)
    if ctx:
        ctx.__exit__(None, None, None)


if __name__ == "__main__":
    main()
