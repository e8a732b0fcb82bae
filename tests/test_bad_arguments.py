"""Bad arguments to every public function of the functional API get a named error.

For each call of the table (`bad_argument_fixtures.py` and the four `bad_argument_*.py` beside it) (None / str / list where a state, a
mapping or a tensor belongs, non-float dtypes, unknown devices, negative / zero / huge sizes,
quantized states where float ones are needed, out-of-range token ids, wrong caches):

(a) the exception is the case's `FModelError` subclass (so also a TypeError / ValueError /
    IndexError where its class is one);
(b) its message names the argument;
(c) every input state is bit-for-bit unchanged: each tensor the same object with the same
    `_version`, `data_ptr()` and values, and the same config;
(d) it is raised fast (< 1 s) without a large allocation (resident memory grows < 256 MB).

`test_summary` runs the whole table once more and prints the counts for the issue's closing
note (run with `-s` to see them).
"""

from __future__ import annotations

import time

import pytest
import torch

import fmodel
from fmodel.stats import current_rss

from .bad_argument_calls import forward_cases, generate_cases
from .bad_argument_cases import argument_cases, cuda_cases, registry_cases
from .bad_argument_edits import transform_cases
from .bad_argument_families import family_cases
from .bad_argument_fixtures import STATES, Case, state_cases

CASES: list[Case] = (
    state_cases()
    + argument_cases()
    + forward_cases()
    + generate_cases()
    + transform_cases()
    + registry_cases()
    + family_cases()
    + cuda_cases()
)

SLOW_S = 1.0
MEMORY_BYTES = 256 * 2**20


class Snapshot:
    """Every tensor of the tiny states (object, version, pointer, a copy of the values), their
    configs and other fields, to compare after a call."""

    def __init__(self) -> None:
        self.records = {}
        for label, state in STATES.items():
            tensors = {
                f"{kind}:{name}": (t, t._version, t.data_ptr(), t.detach().clone())
                for kind in ("params", "buffers")
                for name, t in getattr(state, kind).items()
            }
            fields = (state.config, state.architecture, dict(state.ties), state.attn_implementation)
            self.records[label] = (state, tensors, fields, set(state.params), set(state.buffers))

    def changes(self) -> list[str]:
        found = []
        for label, (state, tensors, fields, params, buffers) in self.records.items():
            now = (state.config, state.architecture, dict(state.ties), state.attn_implementation)
            if now != fields:
                found.append(f"{label}: fields changed")
            if set(state.params) != params or set(state.buffers) != buffers:
                found.append(f"{label}: tensor names changed")
            for key, (t, version, ptr, copy) in tensors.items():
                kind, name = key.split(":", 1)
                current = getattr(state, kind).get(name)
                if current is not t:
                    found.append(f"{label}: {key} is another object")
                elif t._version != version or t.data_ptr() != ptr:
                    found.append(f"{label}: {key} was written")
                elif not torch.equal(t, copy):
                    found.append(f"{label}: {key} values changed")
        return found


SNAPSHOT = Snapshot()


def run_case(case: Case) -> tuple[str, BaseException | None, float, int]:
    """Run one bad call: ("named" | "wrong-class" | "foreign" | "accepted", exception,
    seconds, resident-memory growth in bytes)."""
    rss = current_rss()
    start = time.perf_counter()
    try:
        case.call()
    except fmodel.FModelError as err:
        outcome = "named" if isinstance(err, case.error) else "wrong-class"
        exc: BaseException | None = err
    except Exception as err:  # counting foreign exceptions is the point
        outcome, exc = "foreign", err
    else:
        outcome, exc = "accepted", None
    return outcome, exc, time.perf_counter() - start, current_rss() - rss


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_call_gets_a_named_error(case: Case) -> None:
    outcome, exc, seconds, grown = run_case(case)
    assert outcome != "accepted", f"{case.id}: accepted; expected {case.error.__name__}"
    assert outcome != "foreign", f"{case.id}: foreign {type(exc).__name__}: {exc}"
    assert isinstance(exc, case.error), (
        f"{case.id}: {type(exc).__name__} ({exc}), expected {case.error.__name__}"
    )
    assert case.names in str(exc), f"{case.id}: the message does not name {case.names!r}: {exc}"
    assert seconds < SLOW_S, f"{case.id}: took {seconds:.2f} s"
    assert grown < MEMORY_BYTES, f"{case.id}: resident memory grew by {grown / 2**20:.0f} MB"
    assert SNAPSHOT.changes() == [], f"{case.id} changed its input"


def test_error_families() -> None:
    """Where the natural family is TypeError / ValueError / IndexError the named errors are
    that too, so `except TypeError` code written for torch's errors keeps working."""
    state = STATES["llama"]
    with pytest.raises(TypeError):
        fmodel.forward(None, torch.tensor([[1]]))
    with pytest.raises(ValueError):
        fmodel.to(state, dtype=torch.int8)
    with pytest.raises(IndexError):
        fmodel.forward(state, torch.tensor([[1000]]))
    with pytest.raises(TypeError):
        fmodel.resize_token_embeddings(state, "5")


def test_token_id_message_says_which_where_and_the_size() -> None:
    ids = torch.tensor([[1, 2, 3], [4, 96, 5]])
    with pytest.raises(fmodel.TokenIdError, match=r"token id 96 at position \(1, 1\).*vocab_size=96"):
        fmodel.forward(STATES["llama"], ids)


def test_huge_max_new_tokens_runs_until_eos() -> None:
    """As Transformers (whose cache grows), a huge `max_new_tokens` is not refused: the cache
    is allocated for a bounded number of positions and grows; the call stops at EOS."""
    state = STATES["llama"]
    ids = torch.tensor([[1, 2, 3]])
    first = int(fmodel.generate(state, ids, max_new_tokens=1)[0, -1])
    start = time.perf_counter()
    out = fmodel.generate(state, ids, max_new_tokens=10**9, eos_token_id=first)
    assert out.tolist() == [[1, 2, 3, first]]
    assert time.perf_counter() - start < SLOW_S


def test_long_generation_grows_its_buffers_exactly(monkeypatch) -> None:
    """Growing the cache / mask / token buffers mid-generation gives the tokens a whole
    allocation gives (left-padded batch, greedy and seeded sampling)."""
    from fmodel.generation import decode_loop

    state = STATES["llama"]
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])

    def both():
        greedy = fmodel.generate(state, ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0)
        sampled = fmodel.generate(
            state,
            ids,
            attention_mask=mask,
            max_new_tokens=12,
            do_sample=True,
            pad_token_id=0,
            generator=torch.Generator().manual_seed(0),
        )
        return greedy, sampled

    whole = both()
    monkeypatch.setattr(decode_loop, "PREALLOCATED_NEW_TOKENS", 3)
    grown = both()
    assert all(torch.equal(a, b) for a, b in zip(whole, grown, strict=True))


def test_summary(capsys) -> None:
    """The counts for the closing note: calls tried, named errors, wrong classes, foreign
    exceptions, accepted bad calls, input changes, slowest rejection."""
    counts = {"named": 0, "wrong-class": 0, "foreign": 0, "accepted": 0}
    unnamed, changed, slowest = [], [], (0.0, "")
    for case in CASES:
        outcome, exc, seconds, _ = run_case(case)
        counts[outcome] += 1
        if exc is not None and case.names not in str(exc):
            unnamed.append(case.id)
        if SNAPSHOT.changes():
            changed.append(case.id)
        slowest = max(slowest, (seconds, case.id))
    functions = len({c.id.split("-")[0] for c in CASES})
    with capsys.disabled():
        print(
            f"\nbad-argument calls tried: {len(CASES)} over {functions} functions; named errors: "
            f"{counts['named']}; other FModelError class: {counts['wrong-class']}; foreign exceptions: "
            f"{counts['foreign']}; accepted: {counts['accepted']}; message without the argument: "
            f"{len(unnamed)}; input changed: {len(changed)}; slowest rejection: {slowest[0] * 1000:.1f} ms "
            f"({slowest[1]})"
        )
    assert counts["named"] == len(CASES) and not unnamed and not changed
