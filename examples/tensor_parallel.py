"""Tensor-parallel inference and FSDP2 training with fmodel, one process per rank.

    torchrun --nproc_per_node 3 examples/tensor_parallel.py [CHECKPOINT]

CHECKPOINT is a safetensors folder or hub id (SmolLM2-135M: 9 heads / 3 key/value heads, so 1
or 3 ranks); without one, a tiny random Llama with 4 heads / 2 kv heads is made (1 or 2 ranks).
Each rank reads only its slices of the sharded tensors, decodes greedily through the
tensor-parallel state (the tokens equal one process's), then trains the facade model for two
AdamW steps under FSDP2 and saves one ordinary checkpoint from every rank together. Runs on CPU
(gloo) and on GPUs (nccl) unchanged.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import fmodel
from fmodel.facade import AutoModelForCausalLM


def tiny_checkpoint(folder: str) -> str:
    """A tiny random Llama, written by rank 0 (every rank reads it back)."""
    if dist.get_rank() == 0:
        config = fmodel.LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        fmodel.save(fmodel.init(config, seed=0), folder)
    dist.barrier()
    return folder


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(device, (world,))
    with tempfile.TemporaryDirectory() as scratch:
        folder = [scratch]  # rank 0's folder for every rank (one machine; on several, a shared disk)
        dist.broadcast_object_list(folder, src=0)
        shared = folder[0]
        path = sys.argv[1] if len(sys.argv) > 1 else tiny_checkpoint(os.path.join(shared, "tiny"))

        # tensor parallel: each rank loads its slices, and forward / generate run over the mesh
        state = fmodel.load(path, mesh=mesh)
        prompt = torch.tensor([[1, 5, 9, 2, 7]])
        tokens = fmodel.generate(state, prompt, max_new_tokens=8)
        if rank == 0:
            print(f"{world} rank(s), tensor parallel greedy tokens: {tokens[0].tolist()}")

        # FSDP2 training of the facade model: each layer sharded, then the root
        model = AutoModelForCausalLM.from_pretrained(path)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.train()
        batch = torch.randint(
            0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(rank)
        )
        for step in range(2):
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if rank == 0:
                print(f"FSDP2 step {step}: loss {loss.item():.4f} (rank 0's batch)")
        model.save_pretrained(os.path.join(shared, "trained"))  # every rank calls it; one checkpoint
        if rank == 0:
            print("saved", sorted(os.listdir(os.path.join(shared, "trained"))))
        dist.barrier()  # rank 0 removes its folder only after every rank is done with it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
