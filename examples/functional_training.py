"""Functional training with fmodel: a model is data, so a research loop is a few lines of
`torch.func`.

Runs in seconds on a CPU:  python examples/functional_training.py
Shows: SGD with torch.func.grad + fmodel.replace_params, a MAML-style inner step (gradients
through an update), per-example gradients with vmap(grad), and an ensemble forward of several
seeds in one vectorised call (stack_states + vmap_forward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

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


def next_token_loss(state: fmodel.ModelState, params: dict, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting ids[:, 1:] from ids[:, :-1], as a function of `params`."""
    logits = fmodel.forward(fmodel.replace_params(state, params), ids, attn_implementation="eager").logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def sgd(params: dict, grads: dict, lr: float) -> dict:
    return {name: p - lr * grads[name] for name, p in params.items()}


def main() -> list[float]:
    torch.manual_seed(0)
    state = fmodel.init(CONFIG, seed=0, attn_implementation="eager")
    data = torch.randint(0, CONFIG.vocab_size, (8, 12))

    # 1. SGD: the gradient is keyed like state.params (tied aliases appear once, under the source).
    losses = []
    for _ in range(20):
        params = state.unique_params()
        grads, loss = torch.func.grad_and_value(next_token_loss, argnums=1)(state, params, data)
        state = fmodel.replace_params(state, sgd(params, grads, lr=1.0))
        losses.append(loss.item())
    print(f"SGD: loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    # 2. MAML-style: adapt on a support batch, score on a query batch, differentiate through both.
    support, query = data[:4], data[4:]

    def meta_loss(p):
        adapted = sgd(p, grad(lambda q: next_token_loss(state, q, support))(p), lr=0.5)
        return next_token_loss(state, adapted, query)

    meta_grads = grad(meta_loss)(state.unique_params())
    print(f"MAML: meta-gradient norm {torch.sqrt(sum((g**2).sum() for g in meta_grads.values())):.3f}")

    # 3. Per-example gradients: vmap over the batch of a single-example gradient.
    def example_grad(p, ids):
        return grad(lambda q: next_token_loss(state, q, ids[None]))(p)

    per_example = vmap(example_grad, in_dims=(None, 0))(state.unique_params(), data)
    print(f"per-example gradients: {tuple(per_example['model.norm.weight'].shape)} for model.norm.weight")

    # 4. Ensemble: four seeds, one vectorised forward.
    ensemble = fmodel.stack_states(
        [fmodel.init(CONFIG, seed=s, attn_implementation="eager") for s in range(4)]
    )
    logits = fmodel.vmap_forward(ensemble, data[:2]).logits
    print(f"ensemble logits: {tuple(logits.shape)}  (members, batch, tokens, vocab)")
    return losses


if __name__ == "__main__":
    main()
