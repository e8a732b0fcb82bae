"""A compiled one-token decode step: the model's forward for one new token over a KV cache,
exported once per model shape and compiled ahead of time to C++ (AOTInductor), cached on disk.

Why AOTInductor (`torch.export` + `torch._inductor.aoti_compile_and_package`), measured on this
project's 2-core AVX-512 machine at 1 thread, a 30-layer hidden-64 Llama (the per-op overhead
of SmolLM2-135M's 30 layers without its GEMV time): eager 6.4 ms/token; `torch.compile`
(inductor) 2.5 ms, 1.9 ms with `cpp_wrapper`, and 8-14 s in every new process before the first
step (dynamo traces again; only inductor's code is cached on disk); AOTInductor 0.16 ms and a
warm load of ~20 ms, because its wrapper is C++: no Python per kernel and no guards. The cost is
the first compile (tens of seconds for a 30-layer model), paid once per model shape and kept.

What is compiled, and what stays an input (so the step is still a pure function of its inputs):

- The state's tensors are inputs of every call (a list in a fixed name order), not constants
  baked into the package: the artefact holds code only (a few MB), one artefact serves every
  state of the same shapes and dtypes (fine-tuned weights, another checkpoint of the family),
  and the state stays the one source of truth.
- The KV cache buffers are inputs too, of any capacity (a dynamic dimension: one artefact for
  every prompt and generation length). The step writes the new token's keys and values at slot
  `cache.length` of those buffers, in place, as every forward over a `KVCache` does
  (`fmodel.generation.cache`: only above `length`), and attends over the whole buffer with a
  mask hiding the slots not written yet and the padding.
- Inputs [B, 1] token ids, [B, 1] position ids, the slot, and the [B, capacity] padding mask.

The traced forward is the model's own (`functional_call` over the skeleton), so results equal
the eager step up to float rounding (inductor fuses element-wise ops and reductions; greedy
tokens are identical in the tests). Prefill stays eager (one forward of large matrix products,
where per-op overhead is small).

The on-disk cache: `$FMODEL_CACHE/compiled_step/`, else `$XDG_CACHE_HOME/fmodel/compiled_step/`,
else `~/.cache/fmodel/compiled_step/`. An entry is `<key>.pt2` and `<key>.json`; the key hashes
everything the generated code depends on: fmodel's source files, torch's version, the CPU's
vector ISA, the architecture and config, every tensor's name, shape and dtype, the attention
function (its source for one of your own), the batch size and the cache dtype. Writes go to a
temporary file renamed into place (a crash leaves no half-written entry); the `.json` records
the package's SHA-256, checked before loading, so a corrupt or truncated entry is rebuilt with a
warning, never loaded. The package is a shared library fmodel built from its own code; nothing
from a checkpoint is executed. (Loading runs that library: the cache folder must be yours.)

What runs compiled (`unsupported_reason` says why anything else does not): causal decoders with
a KV cache (the Llama family, Qwen, Mistral without a sliding window, OLMo, Phi-3 without
longrope scaling, GPT-2) on CPU, with an attention function taking an additive or boolean mask
("eager", "sdpa", or one of your own), float or quantized (int8 / int4, GGUF kept quantized):
under export the quantized layers trace the `fmodel.kernels` custom ops (their fake
implementations give the shapes) and AOTInductor's C++ wrapper calls them through the
dispatcher, so the compiled step runs the same kernels as the eager one (float32 / bfloat16
projections likewise trace `fmodel.kernels.dense_linear`: `fmodel.models.linear`). Without the
kernel extension a quantized state runs eagerly (the traced reference would dequantize every
weight per token). The extension is loaded before any package is (packages call its ops by
name), and whether it was is part of the key.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .. import attention
from ..errors import ArgumentTypeError, UnsupportedOptionError
from ..models import get_spec, quant_linear
from ..models.moe import SparseMoeBlock
from ..models.quant_linear import quantization_config
from ..models.skeleton import skeleton
from ..state import ModelState
from .cache import KVCache

__all__ = [
    "CompiledStep",
    "cache_dir",
    "compiled_step",
    "export_step",
    "load_step",
    "step_key",
    "unsupported_reason",
]

logger = logging.getLogger("fmodel")

FORMAT = 1
"""Bumped when what an artefact takes or returns changes (part of every key)."""

_MASK_KINDS = frozenset({"additive", "bool"})
_MIN_CAPACITY = 2  # the exported capacity dimension's lower bound (1 would be specialised)
_MAX_CAPACITY = 1 << 24


def cache_dir() -> Path:
    """Where compiled steps are kept: `$FMODEL_CACHE/compiled_step`, else
    `$XDG_CACHE_HOME/fmodel/compiled_step`, else `~/.cache/fmodel/compiled_step`."""
    root = os.environ.get("FMODEL_CACHE")
    if root:
        return Path(root) / "compiled_step"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "fmodel" / "compiled_step"


def unsupported_reason(state: ModelState, attn_implementation: str | None = None) -> str | None:
    """None when `state`'s decode step can run compiled, else a sentence saying why not.

    Arguments:
        state: the model.
        attn_implementation: the attention function the step would use (default the state's).
    """
    if not isinstance(state, ModelState):
        return f"state must be an fmodel.ModelState, got {type(state).__name__}"
    spec = get_spec(state.architecture)
    if spec.output != "causal_lm" or getattr(spec.build, "is_encoder_decoder", False):
        return f"{state.architecture} is not a causal language model with a KV cache"
    module = skeleton(state.config, state.architecture)
    if not getattr(module, "supports_cache", False):
        return f"{state.architecture} runs without a KV cache"
    if state.device.type != "cpu":
        return f"the state is on {state.device}; the compiled step is built and tested for CPU"
    if getattr(state, "mesh", None) is not None or _is_distributed(state):
        return "a distributed (tensor-parallel) state runs collectives the export does not trace"
    if quantization_config(state.config) is not None and not quant_linear.traces_kernel_op():
        return (
            "quantized layers run compiled through fmodel.kernels, which is not available here "
            "(FMODEL_KERNELS=0 or it could not be built); the traced reference would dequantize "
            "every weight per token"
        )
    config = state.config
    if any(isinstance(m, SparseMoeBlock) for m in module.modules()):
        return "a mixture of experts dispatches tokens by value (shapes depend on the routing)"
    if getattr(config, "rope_type", None) in ("dynamic", "longrope"):
        return f"rope_type {config.rope_type!r} picks its frequencies from the length at run time"
    if getattr(module, "recompute_cache_at", None) is not None:
        return "the model drops and recomputes its cache at a length (Phi-3 longrope)"
    name = attn_implementation or state.attn_implementation
    try:
        attn = attention.get(name)
    except Exception as exc:  # an unknown or unavailable function: the eager path raises it
        return f"attention {name!r}: {exc}"
    if attn.mask_kind not in _MASK_KINDS:
        return f"attention {name!r} takes a {attn.mask_kind!r} mask; the compiled step builds additive or bool masks"
    return None


def max_capacity(state: ModelState) -> int:
    """The largest cache the compiled step takes: the smallest sliding window (a window never
    cuts in below it, so the static cache's whole-buffer mask stays exact), else 2**24."""
    module = skeleton(state.config, state.architecture)
    model = getattr(module, "model", module)
    attentions = (getattr(layer, "self_attn", None) for layer in getattr(model, "layers", ()))
    windows = [getattr(a, "sliding_window", None) for a in attentions]
    return min([w for w in windows if w] or [_MAX_CAPACITY])


def _is_distributed(state: ModelState) -> bool:
    from ..distributed.distribute import mesh_of

    return mesh_of(state) is not None


# --------------------------------------------------------------------------- the traced step


class _StepCache:
    """The cache as the traced model sees it: the whole buffer is the key sequence (so `length`
    is capacity - 1 and the one query sits at the last slot for the causal rule), the padding
    mask hides the slots above `slot`, and `write` puts the token's keys/values at `slot`."""

    def __init__(self, keys, values, slot: torch.Tensor) -> None:
        self.keys, self.values, self.slot = keys, values, slot

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] - 1

    def write(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor):
        k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]
        k_buf.index_copy_(2, self.slot, key)
        v_buf.index_copy_(2, self.slot, value)
        return k_buf, v_buf  # [B, H_kv, capacity, D]

    def advance(self, n: int) -> _StepCache:
        return self


class _Step(nn.Module):
    """`forward(params, keys, values, token [B, 1], position [B, 1], slot [1], padding [B, C])
    -> float32 logits [B, V]`: the skeleton's forward for one token, the state's tensors bound
    by `functional_call` from `params` (in `names` order)."""

    def __init__(self, state: ModelState, names: tuple[str, ...], attn_name: str) -> None:
        super().__init__()
        self.config, self.architecture, self.names = state.config, state.architecture, names
        self.attn_name = attn_name

    def forward(self, params, keys, values, token, position, slot, padding):
        model = skeleton(self.config, self.architecture)
        capacity = keys[0].shape[2]
        written = torch.arange(capacity, device=token.device) <= slot  # [C]
        mask = written[None] & padding.bool()  # [B, C]
        out = functional_call(
            model,
            dict(zip(self.names, params, strict=True)),
            (token,),
            dict(
                attention_mask=mask,
                position_ids=position,
                attn=attention.get(self.attn_name),
                past_key_values=_StepCache(keys, values, slot),
                logits_to_keep=1,
            ),
            tie_weights=False,
            strict=False,
        )
        return out["logits"][:, -1].float()


# --------------------------------------------------------------------------- keys and disk


@functools.cache
def _source_hash() -> str:
    """SHA-256 over fmodel's Python sources (paths and bytes): any code change invalidates."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@functools.cache
def _isa() -> str:
    """The machine's vector ISA as the key sees it: ATen's CPU capability and, on Linux, a hash of
    the CPU's feature flags. (Inductor's own `pick_vec_isa` compiles and runs test programs:
    ~2 s per process, paid before every warm load; this reads what it would find.)"""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    digest = hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:16]
    return f"{platform.machine()}:{torch.backends.cpu.get_cpu_capability()}:{digest}"


def _attention_identity(name: str) -> str:
    fn = attention.get(name).fn
    module = getattr(fn, "__module__", "") or ""
    if module.startswith("fmodel."):
        return name  # fmodel's own: covered by the source hash
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        source = repr(fn)
    return f"{name}:{module}.{getattr(fn, '__qualname__', '')}:{hashlib.sha256(source.encode()).hexdigest()}"


def key_fields(state: ModelState, batch_size: int, dtype: torch.dtype, attn_name: str) -> dict[str, Any]:
    """What a compiled step depends on (hashed by `step_key`), as JSON-ready values."""
    return {
        "format": FORMAT,
        "fmodel_source": _source_hash(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "isa": _isa(),
        "architecture": state.architecture,
        "config": json.dumps(state.config.to_dict(), sort_keys=True, default=str),
        "tensors": [[n, list(t.shape), str(t.dtype)] for n, t in sorted(state.tensors.items())],
        "attention": _attention_identity(attn_name),
        "batch_size": batch_size,
        "cache_dtype": str(dtype),
        # the traced graph calls fmodel.kernels' ops where they are loaded, F.linear otherwise
        "kernels": quant_linear.traces_kernel_op(),
    }


def step_key(state: ModelState, batch_size: int, dtype: torch.dtype, attn_name: str) -> str:
    """The cache key (hex SHA-256) of a compiled step; see `key_fields`."""
    fields = key_fields(state, batch_size, dtype, attn_name)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def _file_hash(path: Path) -> str:
    # file_digest reads into one reused buffer: a loop of f.read(1 MiB) left ~3 MiB of the C
    # heap resident after hashing the ~10 MB package (glibc serves those blocks from its heap)
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _atomic_write(path: Path, write) -> None:
    """`write(tmp_path)` then rename over `path`: readers see the old entry or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------- loading and running


class CompiledStep:
    """A loaded compiled decode step for one model shape, batch size and cache dtype.

    Attributes:
        key: the cache key.
        names: the state's tensor names, in the order `run` takes them.
        max_capacity: the largest cache it takes (`max_capacity(state)`).
        compile_s: seconds spent exporting and compiling it in this process (0.0 when loaded).
        load_s: seconds spent loading the package.
    """

    def __init__(
        self, loader, key: str, names: tuple[str, ...], max_capacity: int, compile_s: float, load_s: float
    ) -> None:
        self._loader = loader
        self.key, self.names, self.max_capacity = key, names, max_capacity
        self.compile_s, self.load_s = compile_s, load_s

    def inputs(self, state: ModelState, cache: KVCache) -> list[torch.Tensor]:
        """The fixed part of `run`'s inputs for `state` over `cache`'s buffers (build it once per
        cache, then `run(fixed + [token, position, slot, padding])`)."""
        tensors = state.tensors
        return [tensors[n] for n in self.names] + list(cache.keys) + list(cache.values)

    def run(self, flat: list[torch.Tensor]) -> torch.Tensor:
        """One step over flat inputs (`inputs(...)` + [token, position, slot, padding]); returns
        float32 logits [B, V] and writes the token's keys/values at `slot` of the cache buffers."""
        return self._loader.boxed_run(list(flat))[0]  # boxed_run consumes its list


_LOADED: dict[str, CompiledStep] = {}
_LOCK = threading.Lock()


def load_step(
    state: ModelState,
    batch_size: int,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> CompiledStep:
    """The compiled step for `state` (its shapes and dtypes), `batch_size` rows and a cache of
    `dtype` (default the state's): from this process's memory, else from the disk cache, else
    exported and compiled now (then written to the disk cache).

    Raises:
        UnsupportedOptionError: `unsupported_reason(state)` is not None.
    """
    attn_name = attn_implementation or state.attn_implementation
    reason = unsupported_reason(state, attn_name)
    if reason is not None:
        raise UnsupportedOptionError(f"the compiled decode step cannot run this model: {reason}")
    dtype = dtype or state.dtype
    key = step_key(state, batch_size, dtype, attn_name)
    with _LOCK:
        step = _LOADED.get(key)
        if step is None:
            step = _LOADED[key] = _load_or_build(state, key, batch_size, dtype, attn_name)
    return step


def _load_or_build(state: ModelState, key: str, batch_size: int, dtype, attn_name: str) -> CompiledStep:
    # A package calls fmodel.kernels' ops by name: they must be registered before it loads.
    quant_linear.traces_kernel_op()
    names, limit = tuple(sorted(state.tensors)), max_capacity(state)
    folder = cache_dir()
    package, meta = folder / f"{key}.pt2", folder / f"{key}.json"
    if package.exists() or meta.exists():
        start = time.perf_counter()
        problem = _entry_problem(package, meta, key)
        if problem is None:
            try:
                runner = _load_package(package)
            except Exception as exc:  # a package torch cannot load is rebuilt, never used
                problem = f"torch could not load it ({type(exc).__name__}: {exc})"
            else:
                return CompiledStep(runner, key, names, limit, 0.0, time.perf_counter() - start)
        logger.warning("compiled decode step %s in %s is unusable (%s); rebuilding it", key, folder, problem)
    start = time.perf_counter()
    logger.info(
        "compiling the decode step of %s (%s, batch %d; once per model shape, kept in %s)",
        state.architecture,
        dtype,
        batch_size,
        folder,
    )
    folder.mkdir(parents=True, exist_ok=True)
    _build(state, names, batch_size, dtype, attn_name, package)
    record = {
        "key": key,
        "sha256": _file_hash(package),
        "fields": key_fields(state, batch_size, dtype, attn_name),
    }
    _atomic_write(meta, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
    compile_s = time.perf_counter() - start
    logger.info("compiled the decode step in %.1f s", compile_s)
    start = time.perf_counter()
    runner = _load_package(package)
    return CompiledStep(runner, key, names, limit, compile_s, time.perf_counter() - start)


def _load_package(package: Path):
    """The package's C++ runner (`torch._C._aoti.AOTIModelPackageLoader`, what
    `torch._inductor.aoti_load_package` wraps): loaded without importing torch._inductor's
    Python side, which costs ~1 s and ~74 MiB resident in a process that only runs the step."""
    loader_class = getattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader", None)
    if loader_class is not None:
        return loader_class(str(package), "model", False, 1, -1)
    return torch._inductor.aoti_load_package(str(package)).loader


def _entry_problem(package: Path, meta: Path, key: str) -> str | None:
    """None when the entry's record names this key and the package's SHA-256, else what is wrong."""
    if not package.exists():
        return "its package is missing"
    try:
        record = json.loads(meta.read_text())
    except (OSError, ValueError) as exc:
        return f"its record cannot be read ({type(exc).__name__})"
    if not isinstance(record, dict) or record.get("key") != key:
        return "its record is for another key"
    if record.get("sha256") != _file_hash(package):
        return "its package does not match the recorded SHA-256 (corrupt or truncated)"
    return None


def _example_inputs(state: ModelState, names, batch_size: int, dtype, capacity: int):
    device = state.device
    shapes = _layer_shapes(state)
    keys = [torch.zeros(batch_size, h, capacity, d, dtype=dtype, device=device) for h, d in shapes]
    values = [torch.zeros_like(k) for k in keys]
    token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
    position = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
    slot = torch.zeros(1, dtype=torch.long, device=device)
    padding = torch.ones(batch_size, capacity, dtype=torch.long, device=device)
    return [state.tensors[n] for n in names], keys, values, token, position, slot, padding


def _layer_shapes(state: ModelState):
    from .cache import _cache_shapes

    return _cache_shapes(state)


def export_step(
    state: ModelState,
    batch_size: int,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> torch.export.ExportedProgram:
    """The step as a `torch.export` program (what `load_step` compiles): inputs `(params in
    sorted name order, keys, values, token [B, 1], position [B, 1], slot [1], padding [B, C])`
    with the capacity C dynamic; returns float32 logits [B, V] and writes the cache buffers at
    `slot`. `program.module()` runs it without compiling (tests use that to check a family's
    trace quickly)."""
    attn_name = attn_implementation or state.attn_implementation
    names = tuple(sorted(state.tensors))
    args = _example_inputs(state, names, batch_size, dtype or state.dtype, capacity=16)
    dim = torch.export.Dim("capacity", min=_MIN_CAPACITY, max=max_capacity(state))
    layers = len(args[1])
    dynamic = ([None] * len(names), [{2: dim}] * layers, [{2: dim}] * layers, None, None, None, {1: dim})
    with torch.no_grad():
        return torch.export.export(
            _Step(state, names, attn_name), tuple(args), dynamic_shapes=dynamic, strict=False
        )


def _build(state: ModelState, names, batch_size: int, dtype, attn_name: str, package: Path) -> None:
    program = export_step(state, batch_size, dtype, attn_name)
    options = {
        # the generated kernels ask torch.get_num_threads() at run time instead of fixing the
        # count of the compiling process
        "cpp.dynamic_threads": True,
    }
    fd, tmp = tempfile.mkstemp(dir=package.parent, prefix=f".{package.stem}.", suffix=".pt2")
    os.close(fd)
    try:  # compiled next to the entry, then renamed into place (crash-safe)
        torch._inductor.aoti_compile_and_package(program, package_path=tmp, inductor_configs=options)
        os.replace(tmp, package)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --------------------------------------------------------------------------- the public step


def compiled_step(
    state: ModelState,
    input_ids: torch.Tensor,
    past_key_values: KVCache,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, KVCache]:
    """One decode step, compiled: `fmodel.forward(state, input_ids, past_key_values=cache,
    attention_mask=..., position_ids=..., logits_to_keep=1)`'s last logits, in float32.

    Arguments:
        state: a model `unsupported_reason` accepts.
        input_ids: [B, 1] the next token of each row.
        past_key_values: a `KVCache` (`fmodel.init_cache`) of length L < max_length.
        attention_mask: [B, L + 1] or [B, max_length] padding mask (1 = real token); default all real.
        position_ids: [B, 1]; default L for every row.

    Returns:
        (logits [B, V] float32, the cache of length L + 1 over the same buffers). As every
        forward over a cache, the token's keys/values are written at position L of the buffers,
        nothing below (the given cache value stays valid).

    Raises:
        ArgumentTypeError: a cache that is not a `KVCache`, ids that are not a [B, 1] tensor.
        UnsupportedOptionError: the model cannot run compiled (`unsupported_reason` says why).
        CacheError: the cache is full or does not fit the model.

    Example:
        >>> cache = fmodel.init_cache(state, 1, 64)
        >>> out = fmodel.forward(state, prompt, past_key_values=cache, logits_to_keep=1)
        >>> logits, cache = compiled_step(state, next_ids, out.past_key_values)
    """
    from .cache import check_cache

    if not isinstance(past_key_values, KVCache):
        raise ArgumentTypeError(
            f"compiled_step(past_key_values) must be an fmodel.KVCache, got {type(past_key_values).__name__}"
        )
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] != 1:
        raise ArgumentTypeError("compiled_step(input_ids) must be a [batch, 1] integer tensor")
    rows, length, capacity = input_ids.shape[0], past_key_values.length, past_key_values.max_length
    check_cache(state, past_key_values, rows, 1, past_key_values.dtype)
    step = load_step(state, rows, past_key_values.dtype)
    if not _MIN_CAPACITY <= capacity <= step.max_capacity:
        raise UnsupportedOptionError(
            f"compiled_step: the cache has room for {capacity} positions; the compiled step takes "
            f"{_MIN_CAPACITY} to {step.max_capacity} (the model's smallest sliding window)"
        )
    padding = torch.ones(rows, capacity, dtype=torch.long, device=input_ids.device)
    if attention_mask is not None:
        padding[:, : attention_mask.shape[1]] = attention_mask
    if position_ids is None:
        position_ids = torch.full((rows, 1), length, dtype=torch.long, device=input_ids.device)
    slot = torch.tensor([length], device=input_ids.device)
    with torch.inference_mode():
        logits = step.run(
            [
                *step.inputs(state, past_key_values),
                input_ids.long().contiguous(),
                position_ids.long().contiguous(),
                slot,
                padding,
            ]
        )
    return logits, past_key_values.advance(1)
