"""The examples run as the README says (tiny models, bounded time)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_tensor_parallel_example_under_torchrun():
    """`torchrun --nproc_per_node 2 examples/tensor_parallel.py`: tensor-parallel greedy decode,
    FSDP2 steps and one saved checkpoint, with the tokens a single process generates."""
    import torch

    import fmodel

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            str(ROOT / "examples" / "tensor_parallel.py"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    tp_line = next(line for line in lines if "tensor parallel greedy tokens" in line)
    config = fmodel.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    single = fmodel.generate(fmodel.init(config, seed=0), torch.tensor([[1, 5, 9, 2, 7]]), max_new_tokens=8)
    assert tp_line.endswith(str(single[0].tolist()))
    assert sum("FSDP2 step" in line for line in lines) == 2
    assert "model.safetensors" in lines[-1]
