"""Mutant campaign over safetensors / sharded / pickle .bin checkpoints and their JSON files.

Usage:
    python benchmarks/fuzz_checkpoints.py [--per-family N] [--seed S]

Subjects: tiny Transformers-written checkpoints (one per registered family as
model.safetensors: Llama, GPT-2, BERT and every family registered since, built from the
registries by `tests/families.py`; a Llama sharded with an index, a Llama as
pytorch_model.bin). Each mutation family takes a `random.Random` and a copy of a subject's
folder and damages one thing in place (a header dtype, shape or offset, header bytes, the
header length, data bytes, a truncation, a config.json field or its bytes, an index entry or
its bytes, the zip / pickle of a .bin),
returning the region it touched. `outcome` then loads the mutant with `fmodel.load` and
sorts the result:

- named: a `FModelError` subclass was raised;
- identical: it loaded and every tensor equals the pristine subject's (the mutation was
  harmless: a byte of whitespace, metadata, a valid config change that no file can refute);
- data-only: it loaded with different tensor values and only data bytes were touched, which
  no reader can detect without checksums (undetectable by design);
- silent: it loaded with different tensors after a header / structure change (must be 0);
- foreign: any other exception;
- hang: the load took more than `HANG_S` (1 s).

The test (`tests/test_fuzz_checkpoints.py`) drives the same mutators with Hypothesis; this
script runs a larger seeded campaign and prints a table per family: tried, each outcome,
the slowest rejection in ms and the growth of the process's peak RSS during the family.
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fmodel
from benchmarks.bin_mutants import BIN_PAYLOADS, MARKER, m_bin_bytes, m_bin_legacy, m_bin_payload
from benchmarks.checkpoint_mutants import (
    JSON_MUTATIONS,
    json_bytes_mutation,
    m_config_bytes,
    m_config_field,
    m_config_lie,
    m_data_bytes,
    m_dtype_restored,
    m_header_bytes,
    m_header_dtype,
    m_header_keys,
    m_header_length,
    m_header_offsets,
    m_header_shape,
    m_index_bytes,
    m_index_entry,
    m_truncate,
    read_safetensors,
    write_safetensors,
)
from fmodel.config import CONFIG_CLASSES
from fmodel.errors import FModelError

__all__ = [
    "BIN_PAYLOADS",
    "FAMILIES",
    "JSON_MUTATIONS",
    "MARKER",
    "build_subjects",
    "campaign",
    "json_bytes_mutation",
    "m_bin_payload",
    "mutant",
    "outcome",
    "read_safetensors",
    "write_safetensors",
]

HANG_S = 1.0
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4)
# one subject per registered family (named by its model_type), so a new family is fuzzed too
SAFE_SUBJECTS = ("llama", "gpt2", "bert", *sorted(set(CONFIG_CLASSES) - {"llama", "gpt2", "bert"}))
ALL_SUBJECTS = (*SAFE_SUBJECTS, "llama-sharded", "llama-bin")


# --------------------------------------------------------------------------- subjects


def build_subject(name: str, folder: str) -> str:
    """Write subject `name` (a tiny random Transformers model) into `folder`; returns it."""
    import transformers

    torch.manual_seed(0)
    if name.startswith("llama"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, num_key_value_heads=2))
    elif name == "gpt2":
        config = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64)
        model = transformers.GPT2LMHeadModel(config)
    elif name == "bert":
        model = transformers.BertForMaskedLM(transformers.BertConfig(**TINY, max_position_embeddings=64))
    elif name in CONFIG_CLASSES:  # any other registered family: its tiny head class
        from tests.families import tiny_hf_model

        model = tiny_hf_model(name)
    else:
        raise ValueError(name)
    kwargs = {"max_shard_size": "40KB"} if name == "llama-sharded" else {}
    if name == "llama-bin":
        kwargs["safe_serialization"] = False
    model.eval().save_pretrained(folder, **kwargs)
    return folder


def build_subjects(root: str, names=ALL_SUBJECTS) -> dict[str, str]:
    return {name: build_subject(name, os.path.join(root, name)) for name in names}


# --------------------------------------------------------------------------- families

Mutator = Callable[[random.Random, str], str]
FAMILIES: dict[str, tuple[Mutator, tuple[str, ...]]] = {
    "header dtype": (m_header_dtype, SAFE_SUBJECTS),
    "dtype re-stored": (m_dtype_restored, SAFE_SUBJECTS),
    "header shape": (m_header_shape, SAFE_SUBJECTS),
    "header offsets": (m_header_offsets, SAFE_SUBJECTS),
    "header bytes": (m_header_bytes, SAFE_SUBJECTS),
    "header length": (m_header_length, SAFE_SUBJECTS),
    "header keys": (m_header_keys, SAFE_SUBJECTS),
    "truncated": (m_truncate, (*SAFE_SUBJECTS, "llama-bin")),
    "data bytes": (m_data_bytes, SAFE_SUBJECTS),
    "config field": (m_config_field, SAFE_SUBJECTS),
    "config lie": (m_config_lie, SAFE_SUBJECTS),
    "config bytes": (m_config_bytes, SAFE_SUBJECTS),
    "index entry": (m_index_entry, ("llama-sharded",)),
    "index bytes": (m_index_bytes, ("llama-sharded",)),
    "bin bytes": (m_bin_bytes, ("llama-bin",)),
    "bin payload": (m_bin_payload, ("llama-bin",)),
    "bin legacy": (m_bin_legacy, ("llama-bin",)),
}
OUTCOMES = ("named", "identical", "data-only", "silent", "foreign", "hang")


class _Timeout(BaseException):
    pass


def _alarm(signum, frame):
    raise _Timeout


def load_reference(folder: str) -> fmodel.ModelState:
    return fmodel.load(folder)


def _same_tensors(a: fmodel.ModelState, b: fmodel.ModelState) -> bool:
    ta, tb = {**a.params, **a.buffers}, {**b.params, **b.buffers}
    if sorted(ta) != sorted(tb):
        return False
    for name, x in ta.items():
        y = tb[name]
        if x.shape != y.shape or x.dtype.is_floating_point != y.dtype.is_floating_point:
            return False
        # a float tensor re-stored in another float dtype loads as that dtype (allowed):
        # compare against the reference rounded the same way
        if not torch.equal(x.to(y.dtype), y):
            return False
    return True


def outcome(folder: str, reference: fmodel.ModelState, region: str, *, hard_limit_s: int = 20):
    """Load the mutant at `folder`: (outcome, seconds, exception or None). See the module doc."""
    old = signal.signal(signal.SIGALRM, _alarm) if hasattr(signal, "SIGALRM") else None
    if old is not None:
        signal.alarm(hard_limit_s)
    start = time.perf_counter()
    try:
        state = fmodel.load(folder)
    except _Timeout:
        return "hang", time.perf_counter() - start, None
    except FModelError as exc:
        took = time.perf_counter() - start
        return ("hang" if took > HANG_S else "named"), took, exc
    except Exception as exc:
        return "foreign", time.perf_counter() - start, exc
    finally:
        if old is not None:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
    took = time.perf_counter() - start
    if took > HANG_S:
        return "hang", took, None
    if _same_tensors(reference, state):
        return "identical", took, None
    return ("data-only" if region == "data" else "silent"), took, None


def mutant(subject_folder: str, work: str, family: str, rng: random.Random) -> tuple[str, str]:
    """Copy the subject to a fresh folder under `work`, apply `family`; (folder, region)."""
    folder = tempfile.mkdtemp(dir=work)
    target = os.path.join(folder, "ckpt")
    shutil.copytree(subject_folder, target)
    region = FAMILIES[family][0](rng, target)
    return target, region


def _peak_rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def campaign(per_family: int, seed: int, root: str, families=None) -> dict[str, dict]:
    families = families or list(FAMILIES)
    needed = sorted({name for family in families for name in FAMILIES[family][1]})
    subjects = build_subjects(os.path.join(root, "subjects"), needed)
    references = {name: load_reference(path) for name, path in subjects.items()}
    work = os.path.join(root, "mutants")
    os.makedirs(work)
    rows = {}
    for family in families:
        names = FAMILIES[family][1]
        row = dict.fromkeys(OUTCOMES, 0) | {"tried": 0, "slowest_ms": 0.0, "rss_kb": 0, "examples": []}
        before = _peak_rss_kb()
        for i in range(per_family):
            rng = random.Random(f"{seed}-{family}-{i}")
            subject = names[i % len(names)]
            folder, region = mutant(subjects[subject], work, family, rng)
            result, took, exc = outcome(folder, references[subject], region)
            row["tried"] += 1
            row[result] += 1
            if result == "named":
                row["slowest_ms"] = max(row["slowest_ms"], took * 1000)
            if result in ("silent", "foreign", "hang") and len(row["examples"]) < 3:
                row["examples"].append(f"{subject}#{i}: {type(exc).__name__ if exc else result}: {exc}"[:300])
            if os.path.exists(os.path.join(folder, MARKER)):
                raise SystemExit(f"code from a checkpoint ran: {family} #{i}")
            shutil.rmtree(os.path.dirname(folder), ignore_errors=True)
        row["rss_kb"] = _peak_rss_kb() - before
        rows[family] = row
    return rows


def print_table(rows: dict[str, dict]) -> None:
    cols = ("tried", *OUTCOMES)
    print(f"{'family':<16}" + "".join(f"{c:>10}" for c in cols) + f"{'slowest ms':>12}{'RSS +MB':>9}")
    total = dict.fromkeys(cols, 0)
    slowest = 0.0
    for family, row in rows.items():
        print(
            f"{family:<16}"
            + "".join(f"{row[c]:>10}" for c in cols)
            + f"{row['slowest_ms']:>12.1f}{row['rss_kb'] / 1024:>9.1f}"
        )
        for c in cols:
            total[c] += row[c]
        slowest = max(slowest, row["slowest_ms"])
    print(f"{'total':<16}" + "".join(f"{total[c]:>10}" for c in cols) + f"{slowest:>12.1f}")
    print("(data-only: tensor data bytes changed, undetectable by design without checksums)")
    for family, row in rows.items():
        for line in row["examples"]:
            print(f"  {family}: {line}")


def main(argv=None) -> int:
    import argparse
    import logging

    logging.getLogger("fmodel").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-family", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--families", default="", help="comma-separated subset (default: all)")
    args = parser.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()] or None
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        rows = campaign(args.per_family, args.seed, root, families)
    print_table(rows)
    bad = sum(row["silent"] + row["foreign"] + row["hang"] for row in rows.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
