"""torch.compile and torch.func on the facade, as a user writes them: `torch.compile(model)`
(backends "eager" / "aot_eager", to stay fast on CPU), a forward traced with no graph break
(`torch._dynamo.explain`, `fullgraph=True`), `torch.compile` of a user function calling the
functional `fmodel.forward(state, ids)`, and `torch.func.functional_call` on a tied model with
`tie_weights=False` / `True`. Each result is compared with eager and with the same call on
Transformers' model from the same folder (logits and losses within 1e-4)."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

transformers = pytest.importorskip("transformers")

import fmodel  # noqa: E402

from .conftest import max_diff  # noqa: E402

IDS = torch.tensor([[1, 5, 9, 12, 40, 3, 17, 8], [1, 22, 8, 8, 61, 2, 30, 4]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]])  # left padding in row 1


@pytest.fixture(scope="module")
def models(checkpoint):
    """(Transformers' tied Llama, fmodel's from the same folder), eval mode; one layer, so that
    each trace stays short (dynamo inlines every layer)."""
    folder = checkpoint("llama", num_hidden_layers=1)
    return (
        transformers.AutoModelForCausalLM.from_pretrained(folder).eval(),
        fmodel.AutoModelForCausalLM.from_pretrained(folder),
    )


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def graph_breaks(fn, *args, **kwargs) -> list[str]:
    """Why dynamo broke the graph of `fn(*args, **kwargs)` (empty: one graph)."""
    explained = torch._dynamo.explain(fn)(*args, **kwargs)
    return [str(b.reason) for b in explained.break_reasons]


def test_compiled_model_equals_eager_and_transformers(models):
    """`fullgraph=True`: a graph break anywhere in the forward (fmodel's config view, output
    classes, ModelOutput, call info, masks) would raise."""
    hf, fm = models
    compiled = torch.compile(fm, backend="eager", fullgraph=True)
    with torch.no_grad():
        eager = fm(IDS, labels=IDS)
        out = compiled(IDS, labels=IDS)
        ref = hf(IDS, labels=IDS)
    assert type(out) is type(ref)
    assert max_diff(out.logits, eager.logits) < 1e-5
    assert max_diff(out.logits, ref.logits) < 1e-4
    assert abs(out.loss.item() - ref.loss.item()) < 1e-4


def test_forward_with_padding_traces_as_one_graph(models):
    """With a padding mask (fmodel skips building a mask when every token is real: a branch on
    values, which must step aside while tracing), labels and hidden states: one graph."""
    _, fm = models
    assert graph_breaks(fm, IDS, attention_mask=MASK, labels=IDS, output_hidden_states=True) == []


def test_compiled_training_step_gradients_equal_eager(models):
    """aot_eager traces the backward too: loss and every gradient as the eager step's."""
    _, fm = models
    fm.train()
    try:
        grads = []
        for step in (fm, torch.compile(fm, backend="aot_eager")):
            fm.zero_grad()
            loss = step(IDS, attention_mask=MASK, labels=IDS).loss
            loss.backward()
            grads.append((loss.detach(), {n: p.grad.clone() for n, p in fm.named_parameters()}))
    finally:
        fm.eval()
        fm.zero_grad()
    (eager_loss, eager_grads), (loss, compiled_grads) = grads
    assert abs(loss.item() - eager_loss.item()) < 1e-5
    assert eager_grads.keys() == compiled_grads.keys()
    for name, grad in compiled_grads.items():
        assert max_diff(grad, eager_grads[name]) < 1e-5, name


def test_compiled_functional_forward(models):
    """A user function over the functional API compiles as one graph (`fullgraph=True`: a break
    in fmodel.forward's ModelState-dependent call, ModelOutput or masks raises), equals the
    eager call and Transformers, and leaves the state's tensors untouched (fmodel.forward's
    purity contract)."""
    hf, fm = models
    state = fm.state

    def logits(state, ids, mask):
        return fmodel.forward(state, ids, attention_mask=mask).logits

    versions = {name: t._version for name, t in state.tensors.items()}
    compiled = torch.compile(logits, backend="eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(state, IDS, MASK)
        assert max_diff(out, logits(state, IDS, MASK)) < 1e-5
        assert max_diff(out, hf(IDS, attention_mask=MASK).logits) < 1e-4
    assert {name: t._version for name, t in state.tensors.items()} == versions
    assert all(state.params[n] is p for n, p in fm.state.params.items())


def test_compiled_functional_call_over_the_facade(models):
    """torch.func's pattern: compile a function that runs the module with other parameters."""
    hf, fm = models
    params = {n: p.detach() * 1.5 for n, p in fm.named_parameters()}

    def run(params, ids):
        return functional_call(fm, params, (ids,)).logits

    compiled = torch.compile(run, backend="eager", fullgraph=True)
    hf_params = {n: p.detach() * 1.5 for n, p in hf.named_parameters()}
    with torch.no_grad():
        ref = functional_call(hf, hf_params, (IDS,)).logits
        assert max_diff(compiled(params, IDS), ref) < 1e-4
        assert max_diff(compiled(params, IDS), fm(IDS).logits) > 1e-2  # the other parameters were used


@pytest.mark.parametrize(
    ("name", "tie_weights"),
    [("lm_head.weight", False), ("lm_head.weight", True), ("model.embed_tokens.weight", True),
     ("model.embed_tokens.weight", False)],
)  # fmt: skip
def test_functional_call_on_a_tied_model(models, name, tie_weights):
    """Replacing one side of the tie: with tie_weights=False only that side changes (lm_head uses
    `other`, the embeddings keep theirs, or the reverse); with True both follow. As on
    Transformers' model, and the facade is unchanged afterwards (same parameters, still tied)."""
    hf, fm = models
    other = torch.randn(96, 64, generator=torch.Generator().manual_seed(1)) * 0.1
    before = dict(fm.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        out = functional_call(fm, {name: other}, (IDS,), tie_weights=tie_weights).logits
        ref = functional_call(hf, {name: other}, (IDS,), tie_weights=tie_weights).logits
        plain = fm(IDS).logits
    assert max_diff(out, ref) < 1e-4
    assert max_diff(out, plain) > 1e-2
    # the expected meaning, written out: logits = final hidden states @ head^T
    embed = other if (name == "model.embed_tokens.weight" or tie_weights) else fm.model.embed_tokens.weight
    head = other if (name == "lm_head.weight" or tie_weights) else fm.lm_head.weight
    with torch.no_grad():
        hidden = functional_call(fm.model, {"embed_tokens.weight": embed}, (IDS,)).last_hidden_state
    assert max_diff(out, hidden @ head.T) < 1e-4
    after = dict(fm.named_parameters(remove_duplicate=False))
    assert after.keys() == before.keys() and all(after[n] is p for n, p in before.items())
    assert fm.lm_head.weight is fm.model.embed_tokens.weight
    assert fm.state.ties == {"lm_head.weight": "model.embed_tokens.weight"}
