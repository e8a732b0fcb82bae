"""Weight-only quantization: decode speed and accuracy of int8 / int4 against float32.

Usage:
    python benchmarks/quantize.py [--checkpoint PATH] [--new-tokens N] [--prompt-tokens N]
                                  [--repeats N] [--threads N] [--group-size G] [--kernels]

Without --checkpoint, a random SmolLM2-135M-shaped Llama (30 layers, hidden 576, 9 heads,
3 key/value heads, intermediate 1536, vocab 49152, tied embeddings) is drawn by `fmodel.init`
(seed 0). Variants: float32; int8 and int4 of the decoder layers; the same with the LM head
quantized too (`include_lm_head=True`, the largest matrix of this model).

Measured, batch 1: `fmodel.generate` greedy tokens/s (prompt `--prompt-tokens`, `--new-tokens`
new tokens, no EOS, wall time of the whole call, median of `--repeats`), the max abs logit
error against float32 over a forward of a random prompt of 64 tokens (and the float logits'
max, for scale), the top-1 agreement of those 64 positions, and the greedy agreement: the
fraction of generated tokens equal to float32's, and how many agree before the first
difference. On random weights the logits are close to flat, so greedy agreement is a harsh
measure there; a trained checkpoint (`--checkpoint`) is the realistic one.

`--kernels` also times one linear layer per candidate kernel (ms per call, best of repeats,
one thread) on the model's shapes, at 1 and 128 tokens: float32 and bfloat16 matmuls, fmodel's
int8/int4 layers, `_weight_int8pack_mm` with float32 activations, dequantize + matmul (eager,
and compiled by inductor, which compiles once per shape: it takes a minute or two). torchao
0.18's CPU paths were tried too and left out: its int8 weight-only linear ran 3x slower than
float32 (178 vs 59 us, 1536x576, 1 row) and its int4 weight-only config needs the `mslk`
package, which has no CPU build here.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import fmodel

SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
)


def best_ms(fn: Callable[[], Any], repeats: int = 15) -> float:
    for _ in range(2):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def kernel_table(group: int) -> None:
    """ms per call of each candidate on SmolLM2's linear shapes (one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    shapes = {"q/o 576x576": (576, 576), "k/v 192x576": (192, 576), "gate/up 1536x576": (1536, 576),
              "down 576x1536": (576, 1536), "lm_head 49152x576": (49152, 576)}
    gen = torch.Generator().manual_seed(0)
    print(f"\nkernels: ms per call, best of repeats, 1 thread (int4 group {group})")
    header = ["fp32", "bf16", "i8 fmodel", "i8pack f32x", "i8 deq+mm", "i8 compiled", "i4 fmodel", "i4 deq+mm", "i4 deq bf16"]
    for rows in (1, 128):
        print(f"\n{rows} token(s):\n{'shape':<20}" + "".join(f"{h:>13}" for h in header))
        for label, (out, inp) in shapes.items():
            w = torch.randn(out, inp, generator=gen) * 0.02
            x = torch.randn(rows, inp, generator=gen)
            ms = _candidates(w, x, group)
            print(f"{label:<20}" + "".join(f"{ms[h]:>13.3f}" for h in header), flush=True)
    torch.set_num_threads(threads)


def _dequant_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return F.linear(x, q.to(x.dtype) * scale[:, None])


# torch.compile of dequantize + matmul: inductor may fuse the dequantization into its own GEMM.
_COMPILED_DEQUANT_MM = torch.compile(_dequant_mm, dynamic=False)


def _candidates(w: torch.Tensor, x: torch.Tensor, group: int) -> dict[str, float]:
    from fmodel.models.quant_linear import Int4Linear, Int8Linear

    amax = w.abs().amax(1)
    scale = amax / 127
    q8 = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    state8 = {"weight_int8": q8, "weight_scale": scale}
    out, inp = w.shape
    with torch.device("meta"):
        l8, l4 = Int8Linear(inp, out, False, torch.float32), Int4Linear(inp, out, False, torch.float32, group)
    from fmodel.transforms.quantize import _quantize_int4

    packed, s4, z4 = _quantize_int4(w, group)
    state4 = {"weight_int4": packed, "weight_scale": s4, "weight_zero": z4}
    call = torch.func.functional_call
    xb, wb = x.bfloat16(), w.bfloat16()
    x4 = x[:16] if x.shape[0] > 16 else x  # tinygemm path: at most 16 rows, scaled up below
    reps = max(1, x.shape[0] // x4.shape[0])

    def deq4(dtype):
        return l4_ref(dtype)

    def l4_ref(dtype):
        with torch.nn.utils.stateless._reparametrize_module(l4, state4):
            return l4.reference_weight().to(dtype)

    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "fp32": best_ms(lambda: F.linear(x, w)),
            "bf16": best_ms(lambda: F.linear(xb, wb)),
            "i8 fmodel": best_ms(lambda: call(l8, state8, (x,))),  # int8pack_mm, bf16 x (<= 16 rows)
            "i8pack f32x": best_ms(lambda: torch._weight_int8pack_mm(x, q8, scale)),
            "i8 deq+mm": best_ms(lambda: F.linear(x, q8.float() * scale[:, None])),
            "i8 compiled": best_ms(lambda: _COMPILED_DEQUANT_MM(x, q8, scale)),  # inductor, per shape
            "i4 fmodel": best_ms(lambda: [call(l4, state4, (x4,)) for _ in range(reps)]),
            "i4 deq+mm": best_ms(lambda: F.linear(x, deq4(torch.float32))),
            "i4 deq bf16": best_ms(lambda: F.linear(xb, deq4(torch.bfloat16))),
        }


def decode_speed(state: fmodel.ModelState, prompt: torch.Tensor, new: int, repeats: int) -> tuple[float, torch.Tensor]:
    config = fmodel.GenerationConfig()  # no EOS: every run makes `new` tokens
    times, out = [], None
    with torch.inference_mode():
        fmodel.generate(state, prompt, max_new_tokens=4, generation_config=config)  # warm up, pack weights
        for _ in range(repeats):
            start = time.perf_counter()
            out = fmodel.generate(state, prompt, max_new_tokens=new, generation_config=config)
            times.append(time.perf_counter() - start)
    return new / statistics.median(times), out[:, prompt.shape[1]:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a checkpoint folder (default: random SmolLM2-shaped)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--kernels", action="store_true", help="also time the candidate kernels")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.checkpoint:
        base = fmodel.load(args.checkpoint, dtype="float32")
    else:
        base = fmodel.init(fmodel.LlamaConfig(**SMOLLM2), architecture="LlamaForCausalLM", seed=0)
    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, args.prompt_tokens), generator=gen)
    probe = torch.randint(0, vocab, (1, 64), generator=gen)
    g = args.group_size
    variants = {
        "float32": base,
        "int8": fmodel.quantize(base, "int8"),
        f"int4 g{g}": fmodel.quantize(base, "int4", group_size=g),
        "int8 +lm_head": fmodel.quantize(base, "int8", include_lm_head=True),
        f"int4 g{g} +lm_head": fmodel.quantize(base, "int4", group_size=g, include_lm_head=True),
    }
    print(f"{base!r}\nthreads {args.threads}, prompt {args.prompt_tokens}, new {args.new_tokens}, "
          f"repeats {args.repeats}\n")
    print(f"{'variant':<20}{'tok/s':>8}{'x fp32':>8}{'MB':>8}{'max|dlogit|':>13}{'top1 agree':>12}"
          f"{'greedy agree':>14}{'prefix':>8}")
    with torch.inference_mode():
        ref_logits = fmodel.forward(base, input_ids=probe).logits
    ref_tokens, ref_speed = None, None
    for name, state in variants.items():
        speed, tokens = decode_speed(state, prompt, args.new_tokens, args.repeats)
        with torch.inference_mode():
            logits = fmodel.forward(state, input_ids=probe).logits
        if ref_tokens is None:
            ref_tokens, ref_speed = tokens, speed
        err = (logits - ref_logits).abs().max().item()
        top1 = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
        same = tokens == ref_tokens
        prefix = int(same.int().cumprod(-1).sum())
        mb = fmodel.stats.get_memory_footprint(state) / 2**20
        print(f"{name:<20}{speed:>8.1f}{speed / ref_speed:>8.2f}{mb:>8.0f}{err:>13.4f}{top1:>12.3f}"
              f"{same.float().mean().item():>14.3f}{prefix:>8}", flush=True)
    print(f"\nfloat32 logits: max |logit| {ref_logits.abs().max().item():.3f}, "
          f"std {ref_logits.std().item():.3f} (errors above are absolute)")
    if args.kernels:
        kernel_table(g)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
