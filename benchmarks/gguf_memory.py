"""Resident memory of a GGUF-loaded model, each variant in a fresh process (issue 15, item 1).

Usage:
    python benchmarks/gguf_memory.py [GGUF] [--variants quantized,float32] [--generate]

For each variant a fresh interpreter imports torch and fmodel (the baseline), loads the file
(`fmodel.load(path, quantized=True)`, or the float32 default), drops everything but the state
(the parsed header and its memory map included) and reports, from /proc/self/status:

    baseline    VmRSS after `import torch, fmodel`;
    steady      VmRSS after the load, minus the baseline;
    peak        VmHWM (the process's high-water mark) minus the baseline;
    tensors     the bytes of the state's distinct tensors;

beside the file's size and the issue's target: steady <= file size + 10 %. With `--generate`
the process then runs 8 greedy tokens of the chat demo and reports steady / peak again (the
KV cache, the kernels' runtime packs and the reference path's temporaries count there).
Default GGUF: the packaged SmolLM2-135M-Instruct Q4_1. Benchmark only: nothing asserts these.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_CHILD = r"""
import gc, json, os, sys
def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out
import torch, fmodel
torch.set_num_threads(1)
base = status()
path, variant, generate = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
state = fmodel.load(path, quantized=(variant == "quantized"))
gc.collect()
after = status()
seen, tensors = set(), 0
for t in list(state.params.values()) + list(state.buffers.values()):
    if id(t) not in seen:
        seen.add(id(t))
        tensors += t.numel() * t.element_size()
result = {"baseline": base["VmRSS"], "steady": after["VmRSS"] - base["VmRSS"],
          "peak": after["VmHWM"] - base["VmRSS"], "tensors": tensors}
if generate:
    from fmodel.io.gguf import read_gguf
    from fmodel.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(read_gguf(path))
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = torch.tensor([tok.encode(tok.apply_chat_template(chat, add_generation_prompt=True), add_special_tokens=False)])
    with torch.inference_mode():
        fmodel.generate(state, ids, max_new_tokens=8, do_sample=False)
    gc.collect()
    done = status()
    result["steady_generate"] = done["VmRSS"] - base["VmRSS"]
    result["peak_generate"] = done["VmHWM"] - base["VmRSS"]
print(json.dumps(result))
"""


def _mb(n: float) -> str:
    return f"{n / 1e6:8.1f} MB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("gguf", nargs="?", help="a GGUF file (default: the packaged SmolLM2 Q4_1)")
    parser.add_argument("--variants", default="quantized,float32")
    parser.add_argument("--generate", action="store_true", help="also run 8 greedy tokens")
    args = parser.parse_args(argv)
    path = args.gguf
    if path is None:
        from fmodel.io.gguf import packaged_smollm2_path

        path = packaged_smollm2_path()
    size = os.path.getsize(path)
    print(f"{path}: {_mb(size)} ({size} bytes); target: steady <= {_mb(1.1 * size)} above the baseline")
    for variant in args.variants.split(","):
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, path, variant, "1" if args.generate else "0"],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        line = (
            f"{variant:>10}: baseline {_mb(r['baseline'])} | steady {_mb(r['steady'])} "
            f"({r['steady'] / size:.2f} x file) | peak {_mb(r['peak'])} | tensors {_mb(r['tensors'])}"
        )
        if args.generate:
            line += f" | after generate: steady {_mb(r['steady_generate'])}, peak {_mb(r['peak_generate'])}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
