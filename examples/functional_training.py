"""Functional training with fmodel: a model is data, so a research loop is a few lines of
`torch.func`.

Runs in seconds on a CPU:  python examples/functional_training.py
Shows:
1. SGD with `torch.func.grad` + `fmodel.replace_params` (the loss goes down);
2. a MAML-style step: adapt on a support batch, differentiate the query loss through the
   adaptation, update the initial weights;
3. per-example gradients with `vmap(grad(...))`, padded examples included;
4. an ensemble of several models run in one vectorised forward (`stack_states` + vmap).

The pattern: `loss(params)` rebuilds the state with `replace_params(state, params)` and runs
`fmodel.forward`; differentiate it with respect to `state.unique_params()` (tied aliases left
out: the tie's source carries the summed gradient). The state is never written into.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import grad, grad_and_value, vmap

import fmodel

CONFIG = fmodel.LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)


def next_token_loss(
    state: fmodel.ModelState, params: dict, ids: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of predicting ids[:, 1:] from ids[:, :-1], as a function of `params`
    (padding positions, mask 0, are left out of the loss)."""
    logits = fmodel.forward(fmodel.replace_params(state, params), ids, attention_mask=mask).logits
    targets = ids[:, 1:] if mask is None else ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)


def sgd(params: dict, grads: dict, lr: float) -> dict:
    return {name: p - lr * grads[name] for name, p in params.items()}


def main() -> list[float]:
    generator = torch.Generator().manual_seed(0)
    state = fmodel.init(CONFIG, seed=0, attn_implementation="eager")
    data = torch.randint(0, CONFIG.vocab_size, (8, 12), generator=generator)

    # 1. SGD. The gradients are keyed like state.params, without the tied alias lm_head.weight.
    losses = []
    for _ in range(15):
        params = state.unique_params()
        grads, loss = grad_and_value(next_token_loss, argnums=1)(state, params, data)
        state = fmodel.replace_params(state, sgd(params, grads, lr=0.5))
        losses.append(loss.item())
    print(f"1. SGD: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps")

    # 2. MAML: the inner step is part of the function we differentiate (second-order).
    support, query = data[:4], data[4:]

    def meta_loss(p):
        adapted = sgd(p, grad(next_token_loss, argnums=1)(state, p, support), lr=0.5)
        return next_token_loss(state, adapted, query)

    params = state.unique_params()
    meta_grads, before = grad_and_value(meta_loss)(params)
    after = meta_loss(sgd(params, meta_grads, lr=0.05))
    print(f"2. MAML: query loss after adaptation {before.item():.3f} -> {after.item():.3f} after a meta step")

    # 3. Per-example gradients: vmap a one-example gradient over the batch (and its padding).
    mask = torch.ones_like(data)
    mask[1, :5] = 0  # a left-padded example

    def example_grad(ids, m):
        return grad(next_token_loss, argnums=1)(state, params, ids[None], m[None])

    per_example = vmap(example_grad)(data, mask)
    alone = example_grad(data[1], mask[1])
    diff = (per_example["model.norm.weight"][1] - alone["model.norm.weight"]).abs().max().item()
    print(
        f"3. per-example gradients: {tuple(per_example['model.norm.weight'].shape)} for "
        f"model.norm.weight; example 1 equals its own gradient (max diff {diff:.1e})"
    )

    # 4. Ensemble: the trained model and three fresh seeds, one vectorised forward.
    members = [state] + [fmodel.init(CONFIG, seed=s, attn_implementation="eager") for s in (1, 2, 3)]
    ensemble = fmodel.stack_states(members)
    logits = fmodel.vmap_forward(ensemble, data[:2]).logits  # [members, batch, tokens, vocab]
    diff = max(
        (logits[i] - fmodel.forward(m, data[:2]).logits).abs().max().item() for i, m in enumerate(members)
    )
    print(f"4. ensemble logits {tuple(logits.shape)}; equal to the per-model forwards (max diff {diff:.1e})")
    return losses


if __name__ == "__main__":
    main()
