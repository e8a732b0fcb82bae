"""llama.cpp as a peer engine for the benchmarks, through llama-cpp-python's low-level binding.

llama-cpp-python is optional (compare.py runs without it and says so). It builds llama.cpp from
the sdist's vendored sources; the one command (a native build for this CPU without AMX, the
multimodal library left out; ~6 min on 2 idle cores, 12 min on busy ones):

    CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" CXXFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" \
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" \
    pip install --no-cache-dir --no-binary llama-cpp-python llama-cpp-python==0.3.36

Why no AMX: on the Xeon this was measured on (AVX-512 + AMX, a Firecracker VM), a native build
enables ggml's AMX matrix products, and `llama_decode` of a batch of Q8_0 or Q4_1 weights dies
in `ggml_backend_amx_mul_mat` (SIGSEGV; llama.cpp's own llama-bench built the same way dies of
SIGILL on prompt processing), while AMX itself works there (a tile dot product after
`arch_prctl(ARCH_REQ_XCOMP_PERM)` gives the right sum). Without it llama.cpp uses its AVX-512
VNNI kernels, the ones the issue's AMD EPYC (no AMX) ran. `--no-cache-dir` keeps pip from
reusing a wheel built before with other flags. `batch_check(path)` finds such a crashing build
before a benchmark runs into it.

What this module gives the benchmarks:
- `missing_reason()`: None when `llama_cpp` imports, else why not and the command above.
- `convert(source, kind, cache_dir)`: the GGUF file re-written as F32, F16, BF16, Q8_0, Q4_0 or Q4_1 by
  `llama_model_quantize` (quantized tensors are dequantized first: `allow_requantize`), cached.
- `LlamaCppModel`: one model + one context (llama.cpp's defaults: memory-mapped weights, its CPU
  repacking, f16 KV cache, flash attention as it decides), driven by `llama_decode` on a batch:
  `greedy(prompt, n)` (argmax of the last logits, no sampler, no EOS unless asked: the full
  length), `prefill(ids)` (an empty cache, logits of the last position only),
  `forced(prompt, continuation)` (teacher-forced decode, the argmax at every step), `set_threads(n)`.
- `step_bytes(path)`: the weight bytes one decode step reads (every tensor but an untied input
  embedding table, of which a step reads one row).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

VERSION = "0.3.36"
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
INSTALL_COMMAND = (
    f'CFLAGS="{NO_AMX}" CXXFLAGS="{NO_AMX}" CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" '
    f"pip install --no-cache-dir --no-binary llama-cpp-python llama-cpp-python=={VERSION}"
)
# llama_ftype values (llama.h) of the conversions `convert` writes.
FTYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "BF16": 32}

_lib: Any = None


def missing_reason() -> str | None:
    """None when llama-cpp-python can be used here; else a line saying why and how to install it."""
    if importlib.util.find_spec("llama_cpp") is None:
        return f"llama-cpp-python is not installed; to build it from source: {INSTALL_COMMAND}"
    try:
        _binding()
    except (ImportError, OSError, AttributeError) as error:  # a broken build: the shared library
        return f"llama_cpp does not load ({type(error).__name__}: {error}); rebuild it: {INSTALL_COMMAND}"
    return None


def _binding() -> Any:
    """The `llama_cpp.llama_cpp` ctypes module, its backend initialised and its logging quiet."""
    global _lib
    if _lib is None:
        import llama_cpp
        import llama_cpp._logger

        llama_cpp._logger.set_verbose(False)  # errors only on stderr (its default prints every load line)
        lib = llama_cpp.llama_cpp
        lib.llama_backend_init()
        _lib = lib
    return _lib


def version() -> str:
    import llama_cpp

    return str(llama_cpp.__version__)


def system_info() -> str:
    """llama.cpp's own line of the CPU features it was built for and uses (AVX512, AMX, ...)."""
    info = _binding().llama_print_system_info()
    return info.decode("utf-8", "replace").strip() if info else ""


def batch_check(path: Path, timeout_s: float = 120.0) -> str | None:
    """None when this build decodes a batch of `path`'s weights; else why not (with the command
    to rebuild). Only a build using AMX is checked (in a subprocess: the failure is a crash)."""
    import subprocess
    import sys

    if "AMX_INT8 = 1" not in system_info():
        return None
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import llama_cpp_peer as p; "
        "p.LlamaCppModel(sys.argv[2], n_ctx=64, threads=1).prefill(list(range(100, 116)))"
    )
    cmd = [sys.executable, "-c", code, str(Path(__file__).resolve().parent), str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode == 0:
        return None
    how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
    return (
        f"this llama-cpp-python build uses AMX and dies decoding a batch of {path.name} ({how}); "
        f"rebuild it without AMX: {INSTALL_COMMAND}"
    )


# --------------------------------------------------------------------------- files


def converted_path(source: Path, kind: str, cache_dir: Path) -> Path:
    """Where `convert` caches `source` written as `kind`: `<stem>.to-<kind>.gguf` in cache_dir."""
    return cache_dir / f"{source.stem}.to-{kind}.gguf"


def convert(source: Path, kind: str, cache_dir: Path, threads: int | None = None) -> Path:
    """`source` (a GGUF file) re-written with llama.cpp's `llama_model_quantize` as `kind`
    (a name of FTYPES; quantized tensors are dequantized first), cached in `cache_dir`
    and reused while newer than `source`. Written to a temporary name and renamed."""
    if kind not in FTYPES:
        raise ValueError(f"convert: kind {kind!r} is none of {sorted(FTYPES)}")
    out = converted_path(source, kind, cache_dir)
    if out.is_file() and out.stat().st_mtime >= source.stat().st_mtime:
        return out
    lib = _binding()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    params = lib.llama_model_quantize_default_params()
    params.ftype = FTYPES[kind]
    params.allow_requantize = True  # the shipped file's Q4_1/Q8_0 tensors are dequantized, then written
    params.nthread = threads or os.cpu_count() or 1
    try:
        status = lib.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if status != 0:
            raise RuntimeError(f"llama_model_quantize({source} -> {kind}) returned {status}")
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def tensor_types(path: Path) -> dict[str, int]:
    """{GGML type name: tensor count} of a GGUF file (read with the `gguf` package)."""
    from collections import Counter

    from gguf import GGUFReader

    return dict(Counter(t.tensor_type.name for t in GGUFReader(path).tensors))


def step_bytes(path: Path) -> int:
    """Bytes of weights one decode step reads: every tensor of the file, less the input embedding
    table when the file has a separate output matrix (a step reads one embedding row)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight", None)
    return sum(tensors.values())


# --------------------------------------------------------------------------- the engine


class LlamaCppModel:
    """A llama.cpp model and context on the CPU, with a reusable batch of `n_batch` tokens.

    Arguments:
        path: a GGUF file.
        n_ctx: context size (prompt + new tokens must fit).
        threads: llama.cpp's threads for single tokens and batches (`set_threads` changes them).
        n_batch: the most tokens one `llama_decode` takes (and the micro-batch size).
    """

    def __init__(self, path: Path, *, n_ctx: int = 512, threads: int = 1, n_batch: int = 512) -> None:
        import numpy as np

        self._np = np
        lib = self._lib = _binding()
        self.path = Path(path)
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self._model = self._ctx = self._batch = None
        model = lib.llama_model_load_from_file(str(self.path).encode(), lib.llama_model_default_params())
        if not model:
            raise RuntimeError(f"llama.cpp could not load {self.path}")
        self._model = model
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = n_batch
        params.n_threads = params.n_threads_batch = threads
        ctx = lib.llama_init_from_model(model, params)
        if not ctx:
            self.close()
            raise RuntimeError(f"llama.cpp could not create a context for {self.path}")
        self._ctx = ctx
        self._memory = lib.llama_get_memory(ctx)
        self.n_vocab = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model)))
        self._batch = lib.llama_batch_init(n_batch, 0, 1)
        self.threads = threads

    def close(self) -> None:
        lib = self._lib
        if self._batch is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            lib.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            lib.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_threads(self, threads: int) -> None:
        self._lib.llama_set_n_threads(self._ctx, threads, threads)
        self.threads = threads

    def reset(self) -> None:
        """Forget every cached position (the next decode starts at position 0)."""
        self._lib.llama_memory_clear(self._memory, False)

    def _decode(self, tokens: Sequence[int], start: int, all_logits: bool) -> None:
        """One `llama_decode` of `tokens` at positions start.. (at most n_batch of them)."""
        n = len(tokens)
        if not 0 < n <= self.n_batch:
            raise ValueError(f"a batch holds 1..{self.n_batch} tokens, got {n}")
        if start + n > self.n_ctx:
            raise ValueError(f"positions up to {start + n} do not fit the context of {self.n_ctx}")
        batch = self._batch
        batch.n_tokens = n
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = all_logits
        batch.logits[n - 1] = True
        status = self._lib.llama_decode(self._ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status} ({n} tokens at position {start})")

    def _feed(self, ids: Sequence[int], all_logits: bool = False) -> None:
        """An empty cache, then `ids` in batches of n_batch."""
        self.reset()
        for start in range(0, len(ids), self.n_batch):
            self._decode(ids[start : start + self.n_batch], start, all_logits)

    def _logits_row(self, i: int) -> Any:
        pointer = self._lib.llama_get_logits_ith(self._ctx, i)
        if not pointer:
            raise RuntimeError(f"llama.cpp has no logits for output {i}")
        return self._np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    def greedy(self, prompt: Sequence[int], new_tokens: int, stop_ids: Iterable[int] = ()) -> list[int]:
        """`new_tokens` greedy tokens after `prompt` (fewer only when one of `stop_ids` comes):
        the prompt in one batch, then one `llama_decode` per token; argmax of the logits."""
        stop = frozenset(stop_ids)
        self._feed(list(prompt))
        position = len(prompt)
        out: list[int] = []
        while True:
            token = int(self._logits_row(-1).argmax())
            out.append(token)
            if len(out) >= new_tokens or token in stop:
                return out
            self._decode((token,), position, False)
            position += 1

    def prefill(self, ids: Sequence[int]) -> None:
        """`ids` into an empty cache, the logits of the last position only (prompt processing)."""
        self._feed(list(ids))
        self._logits_row(-1)

    def forced(self, prompt: Sequence[int], continuation: Sequence[int]) -> list[int]:
        """Teacher-forced decode: the argmax after `prompt` and after each continuation token
        but the last, fed one `llama_decode` per token as `greedy` does ([len(continuation)])."""
        self._feed(list(prompt))
        position = len(prompt)
        out = [int(self._logits_row(-1).argmax())]
        for token in continuation[:-1]:
            self._decode((token,), position, False)
            position += 1
            out.append(int(self._logits_row(-1).argmax()))
        return out
