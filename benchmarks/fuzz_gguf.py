"""Fuzz GGUF loading: mutate tiny GGUF files and count how each mutant is received.

Every mutant (header fields, metadata values and types, tensor-table offsets / type ids / dims /
names, truncation, byte flips; the mutators live in tests/gguf_mutants.py, shared with
tests/test_fuzz_gguf.py) is handed to `fmodel.load`, `fmodel.load_gguf` and the loader of
`fmodel inspect`; each call must return or raise a named `FModelError` within 1 s.

    python benchmarks/fuzz_gguf.py --mutants 600 --seed 0

Prints, per call and per region: named errors, unchanged loads (the mutation changed nothing a
reader uses), silent loads (another state than the original), foreign exceptions and hangs;
silent loads in the regions no reader can check (tensor data bytes, metadata values swapped for
other valid values, type ids swapped for one of the same block size) are listed apart.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fmodel
from fmodel.cli._inspect import describe
from fmodel.cli._load import load_model
from tests import gguf_mutants as gm


def _inspect(path: str):
    loaded = load_model(path)
    describe(loaded)
    return loaded.state


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


CALLS = {"load": fmodel.load, "load_gguf": fmodel.load_gguf, "inspect": _inspect}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutants", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=5, help="examples to print per bad kind")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    folder = tempfile.mkdtemp(prefix="fuzz-gguf-")
    subjects = gm.write_subjects(folder)
    originals = {n: fmodel.load_gguf(p) for n, p in subjects.items()}
    layouts = {n: gm.layout(p) for n, p in subjects.items()}
    blobs = {n: _read(p) for n, p in subjects.items()}
    counts: dict[str, collections.Counter] = {c: collections.Counter() for c in CALLS}
    by_region: dict[tuple[str, str], int] = collections.Counter()
    examples: dict[str, list[str]] = collections.defaultdict(list)
    slowest = longest = (0.0, "")
    mutant = os.path.join(folder, "mutant.gguf")
    for i in range(args.mutants):
        name = rng.choice(sorted(subjects))
        kind = rng.choice([*gm.BYTE_MUTATORS, "metadata", "metadata"])
        if kind == "metadata":
            region, what = gm.metadata_value(subjects[name], mutant, rng)
        else:
            data, region = gm.BYTE_MUTATORS[kind](blobs[name], layouts[name], rng)
            what = gm.where(data, blobs[name], layouts[name])
            with open(mutant, "wb") as f:
                f.write(data)
        for call_name, call in CALLS.items():
            result, seconds, detail = gm.outcome(mutant, originals[name], call)
            if result == "silent" and region in gm.UNDETECTABLE:
                result = f"silent-{region}"
            counts[call_name][result] += 1
            by_region[(region, result)] += 1
            longest = max(longest, (seconds, f"#{i} {call_name} {name} {kind}/{region}: {result}"))
            if result == "named" and seconds > slowest[0]:
                slowest = (seconds, f"#{i} {name} {kind}/{region}: {detail[:160]}")
            if result in ("silent", "foreign", "hang") and len(examples[result]) < args.show:
                examples[result].append(f"#{i} {call_name} {name} {kind}/{region} {what}: {detail[:300]}")
    total = sum(counts["load"].values())
    print(f"{total} mutants x {len(CALLS)} calls (seed {args.seed})")
    for call_name, c in counts.items():
        print(f"  {call_name:10s} " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    print("by region (all calls):")
    for (region, result), n in sorted(by_region.items()):
        print(f"  {region:15s} {result:22s} {n}")
    print(f"slowest named error: {slowest[0] * 1000:.1f} ms ({slowest[1]})")
    print(f"slowest call of all: {longest[0] * 1000:.1f} ms ({longest[1]})")
    for kind, lines in examples.items():
        print(f"{kind}:")
        for line in lines:
            print("  " + line)
    bad = sum(c[k] for c in counts.values() for k in ("silent", "foreign", "hang"))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
