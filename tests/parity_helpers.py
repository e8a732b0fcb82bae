"""What the parity tests (tests/test_parity_*.py) share: building, running and comparing
Transformers' tiny reference models against fmodel's.

Each family's file keeps what is its own (its configs, how it perturbs a random model, its
batches where they differ); the pieces here are those that compare the same way for every
family. Transformers is the oracle: each helper says what it compares and why. Transformers
itself is imported by the callers (through `tests.conftest`, which skips without it) and, where
needed here, inside the helper, so that importing this module never needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

import fmodel

from .conftest import padded_batch

NEW = 8  # new tokens in the generation comparisons


def save_variants(tmp_path_factory, variants: Iterable[str], build: Callable) -> dict:
    """{variant: (folder, Transformers model)}: `build(variant, seed)` makes each model (the
    i-th variant with seed i, so variants differ in their weights too), and Transformers'
    `save_pretrained` writes it into a temporary folder named after it: fmodel loads what
    Transformers wrote, as a user's checkpoint."""
    out = {}
    for i, variant in enumerate(variants):
        model = build(variant, i)
        folder = tmp_path_factory.mktemp(variant)
        model.save_pretrained(folder)
        out[variant] = (folder, model)
    return out


def hf_forward(model, ids, mask, attn: str = "eager", **kwargs):
    """Transformers' forward (no grad) under attention implementation `attn`, the one fmodel
    runs. For fmodel's "flex_attention" it is Transformers' eager: its flex compiles on CPU
    (minutes), and eager computes the same attention."""
    model.config._attn_implementation = "eager" if attn == "flex_attention" else attn
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs)


def hf_logits(model, ids, mask, attn: str = "eager", **kwargs) -> torch.Tensor:
    """The logits of `hf_forward`."""
    return hf_forward(model, ids, mask, attn, **kwargs).logits


def hf_generate(model, ids, mask, attn: str = "sdpa", **kwargs):
    """Transformers' `generate` (no grad, pad id 0) under attention implementation `attn`."""
    model.config._attn_implementation = attn
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, pad_token_id=0, **kwargs)


def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Max |a - b| of two [B, T, ...] tensors over the real positions, where `mask` [B, T] is 1
    (every position without a mask). Padding positions are left out: what a kernel writes
    for a fully masked query row differs between kernels, and no caller reads it."""
    if mask is not None:
        keep = mask.bool()
        a, b = a[keep], b[keep]
    return (a - b).abs().max().item()


def prompts(seed: int = 0, length: int = 7, padded: bool = True, vocab: int = 96):
    """Generation prompts: input_ids [2, length] with ids from 3 up (never pad 0, BOS 1 or
    EOS 2, so no row stops early by chance), row 0 left-padded by 2 (pad id 0) when `padded`;
    and their attention mask."""
    ids = torch.randint(3, vocab, (2, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, length, dtype=torch.long)
    if padded:
        mask[0, :2] = 0
        ids[0, :2] = 0
    return ids, mask


def real_labels(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Causal-LM labels for `ids` with -100 wherever a loss term would read a padding
    position's logits (label t is scored by the logits at t - 1), so both losses compare only
    numbers the parity covers."""
    before = torch.cat([mask[:, :1], mask[:, :-1]], 1)
    return ids.masked_fill((mask == 0) | (before == 0), -100)


def decode_in_pieces(state, ids, mask, spans, **kwargs):
    """fmodel's full forward over `ids` [B, T] (positions counted over the real tokens), and the
    same tokens decoded through a KV cache piece by piece, `spans` being (start, end) pairs
    that cover 0..T in order (prefill, single steps, several tokens at once). Returns the full
    logits and the pieces' outputs: a cache that keeps what the full forward sees gives its
    logits again."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    full = fmodel.forward(state, ids, attention_mask=mask, position_ids=positions).logits
    cache, outs = fmodel.init_cache(state, ids.shape[0], ids.shape[1] + 1), []
    with torch.no_grad():
        for start, end in spans:
            out = fmodel.forward(
                state,
                ids[:, start:end],
                attention_mask=mask[:, :end],
                position_ids=positions[:, start:end],
                past_key_values=cache,
                **kwargs,
            )
            cache = out.past_key_values
            outs.append(out)
    return full, outs


def assert_logits_match(state, hf_model, tol: float, seq: int = 11, hf_attn: str | None = None):
    """fmodel's logits (under the state's attention implementation) against Transformers' (under
    `hf_attn`, by default the state's own, see `hf_forward`) on `padded_batch(seq=seq)`, a batch
    padded on the left (row 0) and the right (row 1): the same shape, and within `tol` on every
    real position."""
    ids, mask = padded_batch(seq=seq)
    ours = fmodel.forward(state, ids, attention_mask=mask).logits
    theirs = hf_logits(hf_model, ids, mask, hf_attn or state.attn_implementation)
    assert ours.shape == theirs.shape
    assert max_diff(ours, theirs, mask) <= tol


def assert_bfloat16_matches(folder, tol: float, attn: str | None = None):
    """fmodel and Transformers both loading the checkpoint in bfloat16 give logits within `tol`
    on the real positions of `padded_batch(seq=11)`: both round at the same steps. `attn`, if
    given, is the attention implementation of both; else fmodel's default against Transformers'
    sdpa."""
    import transformers

    chosen = {} if attn is None else {"attn_implementation": attn}
    state = fmodel.load(folder, dtype=torch.bfloat16, **chosen)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, **chosen).eval()
    ids, mask = padded_batch(seq=11)
    ours = fmodel.forward(state, ids, attention_mask=mask).logits
    assert ours.dtype == torch.bfloat16
    assert max_diff(ours.float(), hf_logits(hf, ids, mask, attn or "sdpa").float(), mask) <= tol


def assert_greedy_generation_matches(folder, hf_model, attn: str, ids, mask, new: int = NEW):
    """fmodel's greedy `generate` (KV cache, attention `attn`) gives Transformers' tokens."""
    state = fmodel.load(folder, attn_implementation=attn)
    ours = fmodel.generate(state, ids, attention_mask=mask, max_new_tokens=new, pad_token_id=0)
    theirs = hf_generate(hf_model, ids, mask, attn, max_new_tokens=new, do_sample=False)
    assert ours.shape == (2, ids.shape[1] + new)
    assert torch.equal(ours, theirs)


def assert_facade_generation_matches(model, hf_model, ids, mask, new: int = NEW):
    """The facade's greedy `generate` and fmodel's seeded sampling (top-k, temperature) give
    Transformers' tokens: sampling draws from the global generator in Transformers' order."""
    greedy = dict(max_new_tokens=new, do_sample=False)
    expected = hf_generate(hf_model, ids, mask, **greedy)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, pad_token_id=0, **greedy), expected)
    sampled = dict(do_sample=True, temperature=0.8, top_k=20, max_new_tokens=new)
    torch.manual_seed(5)
    ours = fmodel.generate(model.state, ids, attention_mask=mask, pad_token_id=0, **sampled)
    torch.manual_seed(5)
    assert torch.equal(ours, hf_generate(hf_model, ids, mask, **sampled))


def reload_in_transformers(state, folder, **kwargs):
    """fmodel's save of `state` in `folder`, read back by Transformers' AutoModelForCausalLM
    (`kwargs` to its from_pretrained; eval mode): the class it picks must be the state's."""
    import transformers

    fmodel.save(state, folder)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    assert type(reloaded).__name__ == state.architecture
    return reloaded


def assert_fmodel_save_loads_in_transformers(folder, hf_model, out):
    """fmodel's save (in `out`) of the checkpoint Transformers wrote in `folder` loads back in
    Transformers with its original model's logits bit for bit (the same weights under the same
    names), and back in fmodel with the same config. Returns (fmodel's state, the reloaded
    Transformers model) for the family's own checks."""
    state = fmodel.load(folder)
    reloaded = reload_in_transformers(state, out)
    ids, mask = padded_batch(seq=11)
    assert torch.equal(hf_logits(hf_model, ids, mask), hf_logits(reloaded, ids, mask))
    assert fmodel.load(out).config.to_diff_dict() == state.config.to_diff_dict()
    return state, reloaded


def assert_facade_forward_and_save_match(folder, hf_model, out, tol: float = 1e-5):
    """The facade (sdpa) gives Transformers' logits and loss on a padded batch (labels over the
    real positions only, `real_labels`), and its `save_pretrained` (in `out`) loads in
    Transformers with the original model's logits bit for bit."""
    import transformers

    from fmodel import facade

    model = facade.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
    ids, mask = padded_batch(seq=11)
    labels = real_labels(ids, mask)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, labels=labels)
        theirs = hf_model(input_ids=ids, attention_mask=mask, labels=labels)
    assert max_diff(ours.logits, theirs.logits, mask) <= tol
    assert abs(ours.loss.item() - theirs.loss.item()) <= tol
    model.save_pretrained(out)
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(hf_logits(again, ids, mask), hf_logits(hf_model, ids, mask))


def training_grads(model, checkpointing: bool, seed: int | None = None, **inputs) -> dict:
    """{name: grad} of `model`'s loss on `inputs` in training mode, with gradient checkpointing
    on or off; `seed` seeds the global generator first (the same dropout masks in both runs)."""
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    if seed is not None:
        torch.manual_seed(seed)
    model(**inputs).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_same_grads(plain: dict, checkpointed: dict, atol: float = 1e-6) -> None:
    """Checkpointing recomputes the forward in the backward pass: every parameter gets a
    gradient, the same as without it."""
    assert set(plain) == set(checkpointed) and all(g is not None for g in checkpointed.values())
    for name, grad in plain.items():
        assert torch.allclose(grad, checkpointed[name], atol=atol), name
