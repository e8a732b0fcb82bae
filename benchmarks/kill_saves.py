"""Kill `fmodel.save` at many points and report what the target folder held after each kill.

Usage:
    python benchmarks/kill_saves.py [--delays N] [--every K] [--fallback] [--layers L]
                                    [--max-shard-size S] [--seed S] [--workdir DIR]

A target folder holds a complete "old" checkpoint; a subprocess saves a different "new" state
over it and is SIGKILLed:

- at instrumented points: just before and just after every call the save makes that touches
  the disk (each safetensors shard write, each fsync, mkdir, link, rename, the atomic
  exchange, every unlink/rmdir of the cleanup); `--every K` takes every K-th point (1: all);
- after random delays spread over a normal save's duration (`--delays N`).

After each kill the target is classified by its files' bytes against reference saves of the
two states (complete old / complete new / missing / partial), loaded with `fmodel.load` and
compared tensor by tensor with both states, and the hidden folders beside it are counted;
then a normal save runs (it must remove them all) and they are counted again. `--fallback`
disables the atomic exchange (as on an OS or filesystem without one) to exercise the
two-rename fallback and its recovery.

The machinery (`KillHarness`) is shared with tests/test_save_crash.py. To keep a kill cheap, one
"zygote" subprocess imports torch and fmodel once and forks a fresh saving child per kill.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CONFIG = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=112,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
TARGET = "ckpt"
# The calls a save makes that touch the disk, by module: each is a kill point before and after.
HOOKED_OS = ("fsync", "mkdir", "link", "rename", "unlink", "rmdir")


def make_states(layers: int, seeds: tuple[int, int] = (1, 2)) -> tuple[Any, Any]:
    """The "old" and "new" tiny Llama states (seeded random weights, no Transformers)."""
    import fmodel

    config = fmodel.LlamaConfig(**CONFIG, num_hidden_layers=layers)
    return tuple(
        fmodel.io.state_from_tensors(config, {}, allow_missing=True, seed=s, warn_missing=False)[0]
        for s in seeds
    )


def snapshot(folder: Path) -> dict[str, str] | None:
    """{relative path: sha256} of every file under `folder`; None when it does not exist."""
    if not folder.is_dir():
        return None
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------- the zygote


def _install_hooks(kill_at: int, events: list[str], fallback: bool) -> None:
    """In a saving child: count every disk-touching call before and after it; SIGKILL this
    process at the `kill_at`-th point (0: never, only record)."""
    import safetensors.torch

    from fmodel.io import atomic

    def tick(label: str) -> None:
        events.append(label)
        if len(events) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(owner: Any, name: str, label: str) -> None:
        real = getattr(owner, name)

        def hooked(*args: Any, **kwargs: Any) -> Any:
            tick(f"before {label}")
            out = real(*args, **kwargs)
            tick(f"after {label}")
            return out

        setattr(owner, name, hooked)

    if fallback:
        atomic.exchange = lambda a, b: False  # as where the OS has no atomic exchange
    for name in HOOKED_OS:
        wrap(os, name, name)
    wrap(atomic, "exchange", "exchange" if not fallback else "exchange (unavailable)")
    wrap(safetensors.torch, "save_file", "shard write")


def _child(command: dict, states: tuple[Any, Any]) -> int:
    import fmodel

    events: list[str] = []
    if command["op"] != "delay" or command.get("fallback"):
        _install_hooks(command.get("n", 0), events, bool(command.get("fallback")))
    start = time.perf_counter()
    fmodel.save(states[1], command["target"], max_shard_size=command["max_shard_size"])
    if command.get("events_file"):
        Path(command["events_file"]).write_text(
            json.dumps({"events": events, "seconds": time.perf_counter() - start})
        )
    return 0


def _zygote() -> None:
    import torch

    torch.set_num_threads(1)
    spec = json.loads(sys.stdin.readline())
    states = make_states(spec["layers"])
    import fmodel

    with tempfile.TemporaryDirectory() as scratch:  # warm up: lazy imports, skeleton caches
        fmodel.save(states[1], os.path.join(scratch, TARGET), max_shard_size=spec["max_shard_size"])
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(command, states)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        if command["op"] == "delay":
            time.sleep(command["delay"])
            os.kill(pid, signal.SIGKILL)  # a child that already exited is a zombie: no effect
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            outcome = "killed" if os.WTERMSIG(status) == signal.SIGKILL else f"signal {os.WTERMSIG(status)}"
        else:
            outcome = "completed" if os.WEXITSTATUS(status) == 0 else f"exit {os.WEXITSTATUS(status)}"
        print(json.dumps({"outcome": outcome}), flush=True)


# --------------------------------------------------------------------------- the harness


@dataclass
class KillResult:
    """What one kill left. `target`: old / new / missing / partial (by file bytes); `loads`:
    what `fmodel.load(target)` gave (old / new / other / an error name); `leftovers_before`:
    entries beside the target after the kill (their bytes in `leftover_bytes`);
    `leftovers_after`: after the next normal save (must be 0)."""

    point: str
    outcome: str
    target: str
    loads: str
    leftovers_before: int
    leftover_bytes: int
    leftovers_after: int


class KillHarness:
    """An old checkpoint at `workdir/area/ckpt`, a zygote that saves a new state over it, and
    the checks after each kill. Use as a context manager."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        layers: int = 2,
        max_shard_size: str = "60KB",
        fallback: bool = False,
    ):
        self.workdir = Path(workdir)
        self.area = self.workdir / "area"
        self.target = self.area / TARGET
        self.layers = layers
        self.max_shard_size = max_shard_size
        self.fallback = fallback
        self._zygote: subprocess.Popen | None = None

    def __enter__(self) -> KillHarness:
        import fmodel

        self.old, self.new = make_states(self.layers)
        refs = self.workdir / "refs"
        fmodel.save(self.old, refs / "old", max_shard_size=self.max_shard_size)
        fmodel.save(self.new, refs / "new", max_shard_size=self.max_shard_size)
        self.references = {"old": snapshot(refs / "old"), "new": snapshot(refs / "new")}
        assert self.references["old"] != self.references["new"]
        self.area.mkdir(parents=True, exist_ok=True)
        fmodel.save(self.old, self.target, max_shard_size=self.max_shard_size)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self._zygote = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--zygote"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._send({"layers": self.layers, "max_shard_size": self.max_shard_size})
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._zygote is not None:
            self._zygote.stdin.close()
            self._zygote.wait(timeout=30)

    def _send(self, message: dict) -> dict:
        assert self._zygote is not None
        self._zygote.stdin.write(json.dumps(message) + "\n")
        self._zygote.stdin.flush()
        line = self._zygote.stdout.readline()
        if not line:
            raise RuntimeError("the zygote process died; see its stderr")
        return json.loads(line)

    def _command(self, op: str, **extra: Any) -> dict:
        return {
            "op": op,
            "target": str(self.target),
            "max_shard_size": self.max_shard_size,
            "fallback": self.fallback,
            **extra,
        }

    def points(self) -> tuple[list[str], float]:
        """The kill points of one save (labels, in order) and its duration in seconds."""
        events_file = self.workdir / "events.json"
        reply = self._send(self._command("record", events_file=str(events_file)))
        assert reply["outcome"] == "completed", reply
        data = json.loads(events_file.read_text())
        self._reset()
        return data["events"], data["seconds"]

    def kill_at(self, n: int, label: str = "") -> KillResult:
        """Kill the save at its `n`-th point (1-based, as `points()` lists them)."""
        reply = self._send(self._command("point", n=n))
        return self._inspect(label or f"point {n}", reply["outcome"])

    def kill_after(self, delay: float) -> KillResult:
        """Kill the save `delay` seconds after it is forked."""
        reply = self._send(self._command("delay", delay=delay))
        return self._inspect(f"after {delay * 1000:.1f} ms", reply["outcome"])

    def _beside(self) -> list[Path]:
        return [p for p in self.area.iterdir() if p.name != TARGET]

    def _classify(self) -> str:
        got = snapshot(self.target)
        if got is None:
            return "missing"
        for name, reference in self.references.items():
            if got == reference:
                return name
        return "partial"

    def _loads(self) -> str:
        import torch

        import fmodel

        try:
            state = fmodel.load(self.target)
        except Exception as exc:  # reported, and a test fails on it
            return f"error: {type(exc).__name__}: {exc}"
        for name, reference in (("old", self.old), ("new", self.new)):
            if sorted(state.params) == sorted(reference.params) and all(
                state.params[k].dtype == reference.params[k].dtype
                and torch.equal(state.params[k], reference.params[k])
                for k in reference.params
            ):
                return name
        return "other"

    def _reset(self) -> int:
        """The next normal save (of the old state): returns the entries left beside the target."""
        import fmodel

        fmodel.save(self.old, self.target, max_shard_size=self.max_shard_size)
        assert self._classify() == "old"
        return len(self._beside())

    def _inspect(self, point: str, outcome: str) -> KillResult:
        target = self._classify()
        beside = self._beside()
        size = sum(
            f.stat().st_size for p in beside for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()
        )
        loads = self._loads()  # in the fallback a missing target is recovered here
        return KillResult(point, outcome, target, loads, len(beside), size, self._reset())


# --------------------------------------------------------------------------- the report


def _table(results: list[KillResult]) -> str:
    groups: dict[tuple[str, ...], list[KillResult]] = collections.defaultdict(list)
    for r in results:
        groups[(r.point.split(" #")[0], r.outcome, r.target, r.loads[:40])].append(r)
    lines = [
        f"{'kill point':<30} {'outcome':<10} {'target held':<12} {'load gave':<10} {'kills':>5} "
        f"{'left beside (max)':>17} {'after next save':>15}"
    ]
    for (point, outcome, target, loads), rs in sorted(groups.items()):
        before = max(r.leftovers_before for r in rs)
        after = sum(r.leftovers_after for r in rs)
        lines.append(
            f"{point:<30} {outcome:<10} {target:<12} {loads:<10} {len(rs):>5} {before:>17} {after:>15}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--delays", type=int, default=100, help="random-delay kills (default 100)")
    parser.add_argument("--every", type=int, default=1, help="kill at every K-th instrumented point")
    parser.add_argument("--fallback", action="store_true", help="disable the atomic exchange")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-shard-size", default="60KB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="where to work (default: a new temporary folder)")
    args = parser.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="kill-saves-")
    rng = random.Random(args.seed)
    results: list[KillResult] = []
    try:
        with KillHarness(
            workdir, layers=args.layers, max_shard_size=args.max_shard_size, fallback=args.fallback
        ) as harness:
            points, seconds = harness.points()
            for n in range(1, len(points) + 1, args.every):
                results.append(harness.kill_at(n, f"{points[n - 1]} #{n}"))
            for _ in range(args.delays):
                result = harness.kill_after(rng.uniform(0.0, 1.5 * seconds))
                result.point = "random delay"
                results.append(result)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    mode = "two-rename fallback" if args.fallback else "atomic exchange"
    print(f"{len(results)} kills ({mode}); one save: {len(points)} points, {seconds * 1000:.1f} ms")
    print(_table(results))
    held = collections.Counter(r.target for r in results)
    loaded = collections.Counter(r.loads for r in results)
    print(f"target held: {dict(held)}; load gave: {dict(loaded)}")
    most = max((r.leftovers_before for r in results), default=0)
    print(
        f"leftovers beside the target after a kill: {sum(r.leftovers_before > 0 for r in results)} kills left "
        f"some (at most {most} entries, {max((r.leftover_bytes for r in results), default=0)} bytes); "
        f"after the next save: {sum(r.leftovers_after for r in results)} entries in total"
    )
    bad = [r for r in results if r.target == "partial" or r.loads not in ("old", "new") or r.leftovers_after]
    bad += [r for r in results if r.target == "missing" and not args.fallback]
    for r in bad:
        print("BAD:", r)
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--zygote"]:
        _zygote()
    else:
        sys.exit(main())
