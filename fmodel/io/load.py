"""`fmodel.load`: a Hugging Face checkpoint (folder or hub id) -> `ModelState`.

No random initialisation happens unless asked for (`allow_missing=True`): the skeleton is
built on the meta device and only its names and shapes are read. Tensors stay memory-mapped
when no dtype or device change is asked.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

import torch

from ..config import load_config
from ..errors import (
    CheckpointError,
    ConfigError,
    InvalidArgumentError,
    QuantizedDtypeError,
    ShapeMismatchError,
)
from ..models import get_spec
from ..models.init import draw_missing_as_transformers, init_tensor
from ..models.quant_linear import quantization_config
from ..models.skeleton import skeleton
from ..state import ModelState, quantization_entries
from .expected import (
    check_against_config,
    check_dtypes,
    check_load_arguments,
    check_missing_allocation,
    resolve_dtype,
)
from .key_map import default_architecture, map_keys
from .read import read_tensors
from .report import LoadReport
from .resolve import resolve_checkpoint

__all__ = ["LoadReport", "load", "load_with_report", "resolve_dtype", "state_from_tensors"]

logger = logging.getLogger("fmodel")


def state_from_tensors(
    config,
    tensors: Mapping[str, torch.Tensor],
    *,
    architecture: str | None = None,
    origin: Mapping[str, str] | None = None,
    source: str = "tensors",
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    attn_implementation: str = "sdpa",
    allow_missing: bool = False,
    strict: bool = True,
    ignore_mismatched_sizes: bool = False,
    seed: int = 0,
    warn_missing: bool = True,
    init_missing: str = "fmodel",
) -> tuple[ModelState, LoadReport]:
    """Check `tensors` (checkpoint names) against `architecture` and build a state.

    Arguments:
        config: the model config.
        tensors: {checkpoint name: tensor}; never modified, and shared into the state as is
            when no dtype/device change is asked.
        architecture: class name; default `architectures[0]` of the config.
        origin: {name: file} for error messages.
        dtype / device: cast floating tensors / move everything (None keeps what is stored).
        allow_missing: initialise absent tensors with the architecture's init rules (seeded by
            `seed`) instead of raising.
        strict: raise on unexpected tensors (else report them).
        ignore_mismatched_sizes: re-initialise wrong-shape tensors instead of raising.
        seed: seed of the tensors drawn for missing keys.
        warn_missing: log a warning naming the tensors initialised.
        init_missing: "fmodel" (the architecture's rules, a private generator seeded by `seed`)
            or "transformers": the missing and re-initialised tensors drawn as Transformers
            4.57's `from_pretrained` draws them (family `_init_weights`, module post-order)
            from torch's global CPU generator, so the same `torch.manual_seed` gives the same
            new classifier and leaves the generator where Transformers does.

    Returns:
        (state, report).

    Raises (checks in `fmodel.io.expected`, in this order, before the skeleton is built):
        ArgumentTypeError / InvalidArgumentError: a bad argument (DtypeArgumentError for dtype).
        CheckpointError: the config declares layers the tensors lack; missing or unexpected
            tensors, each listed by name.
        ShapeMismatchError: wrong-shape tensors, each with found and expected shapes.
        SizeLimitError: the tensors to draw (allow_missing) would not fit the device.
        CheckpointDtypeError: a stored dtype its parameter cannot have (an int norm weight).
        ConfigError: the architecture does not belong to the config's model_type.
    """
    check_load_arguments(
        "state_from_tensors",
        config=config,
        tensors=tensors,
        architecture=architecture,
        dtype=dtype,
        device=device,
        attn_implementation=attn_implementation,
        allow_missing=allow_missing,
        strict=strict,
        ignore_mismatched_sizes=ignore_mismatched_sizes,
        warn_missing=warn_missing,
        init_missing=init_missing,
    )
    architecture = architecture or default_architecture(config)
    spec = get_spec(architecture)
    if spec.model_type != config.model_type:
        raise ConfigError(
            f"{source}: architecture {architecture!r} is for model_type {spec.model_type!r}, "
            f"but the config has model_type {config.model_type!r}"
        )
    target_dtype = resolve_dtype(dtype)
    if target_dtype is not None and quantization_config(config) is not None:
        raise QuantizedDtypeError(
            f"{source}: the checkpoint is quantized ({quantization_config(config)['scheme']}); load it "
            f"without dtype= (its scales keep their stored dtype), or dequantize after loading"
        )
    origin = origin or {}
    # Before the skeleton (whose build time grows with the declared layers): the tensors
    # against what the config declares, and what drawing the absent ones would allocate.
    check_against_config(
        config,
        spec,
        tensors,
        source=source,
        origin=origin,
        allow_missing=allow_missing,
        ignore_mismatched_sizes=ignore_mismatched_sizes,
    )
    if allow_missing or ignore_mismatched_sizes:
        check_missing_allocation(
            config, tensors, dtype=target_dtype, device=device, what=f"{source}: {architecture}"
        )
    module = skeleton(config, architecture)
    param_names = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    meta = module.state_dict(keep_vars=True)
    expected = {name: tuple(t.shape) for name, t in meta.items()}
    ties = dict(spec.ties(config))

    mapping, renamed, unused = map_keys(spec, tensors, expected)
    # A checkpoint that stores a tied tensor only under its alias name (some exporters do)
    # still provides the source: read it from there, and say so.
    stored = set(mapping.values())
    for alias, src in ties.items():
        if src not in stored and alias in stored:
            ckpt_alias = next(k for k, v in mapping.items() if v == alias)
            mapping[ckpt_alias] = src
            renamed.append((ckpt_alias, src))
    found: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    for ckpt_name, name in mapping.items():
        tensor = tensors[ckpt_name]
        if name in ties or (name not in expected and spec.is_ignorable(name)):
            unused.append(ckpt_name)  # tied alias stored redundantly, or a known-harmless extra
        elif name not in expected:
            unexpected.append(ckpt_name)
        elif tuple(tensor.shape) != expected[name]:
            mismatched.append((name, tuple(tensor.shape), expected[name]))
        else:
            found[name] = tensor
    for old_name, new_name in renamed:
        logger.info("%s: tensor %r loaded as %r", source, old_name, new_name)
    if mismatched and not ignore_mismatched_sizes:
        lines = [
            f"  {name}: found {list(got)} in {origin.get(name, source)}, expected {list(want)}"
            for name, got, want in mismatched
        ]
        raise ShapeMismatchError(
            f"{source}: {len(mismatched)} tensor(s) do not match {architecture} with this config:\n"
            + "\n".join(lines)
        )
    if unexpected and strict:
        raise CheckpointError(
            f"{source}: {len(unexpected)} tensor(s) that {architecture} has no place for: {sorted(unexpected)[:20]}"
            " (pass strict=False to ignore them, or architecture= to pick the right class)"
        )
    check_dtypes(
        found,
        {name: meta[name].dtype for name in found},
        names={name: ckpt for ckpt, name in mapping.items()},
        origin=origin,
        source=source,
    )
    missing = sorted(n for n in expected if n not in found and n not in ties)
    really_missing = [n for n in missing if n not in {m[0] for m in mismatched}]
    if really_missing and not allow_missing:
        raise CheckpointError(
            f"{source}: {len(really_missing)} tensor(s) that {architecture} needs are missing: "
            f"{really_missing[:20]} (pass allow_missing=True to initialise them)"
        )

    init_dtype = target_dtype or _stored_float_dtype(found, quantization_entries(config))
    if init_missing == "transformers":
        shapes = {name: expected[name] for name in missing}
        found.update(draw_missing_as_transformers(module, config, spec.model_type, shapes, ties, init_dtype))
    generator = torch.Generator().manual_seed(seed)
    for name in (n for n in missing if n not in found):
        rule = spec.init_rule(name, config)
        found[name] = init_tensor(
            rule, expected[name], dtype=init_dtype, std=config.initializer_range, generator=generator
        )
    if missing and warn_missing:
        logger.warning("%s: initialised %d missing tensor(s): %s", source, len(missing), missing[:20])

    keep = _keep_in_fp32(spec, target_dtype)
    found = {
        name: _convert(t, torch.float32 if keep and keep.search(name) else target_dtype, device)
        for name, t in found.items()
    }
    params = {name: found[name] for name in expected if name in param_names and name not in ties}
    for alias, src in ties.items():
        params[alias] = params[src]
    buffers = {name: found[name] for name in expected if name not in param_names}
    buffers.update(
        {name: _convert(t, None, device) for name, t in spec.computed_buffers(config, None).items()}
    )
    state = ModelState(config, architecture, params, buffers, ties, attn_implementation)
    report = LoadReport(
        source,
        architecture,
        tuple(really_missing),
        tuple(sorted(unexpected)),
        tuple(mismatched),
        tuple(renamed),
        tuple(sorted(unused)),
    )
    return state, report


def _stored_float_dtype(
    tensors: Mapping[str, torch.Tensor], storage: frozenset[str] = frozenset()
) -> torch.dtype:
    """The dtype of the first stored floating tensor that is not a quantization scale or zero
    (`storage`: GGUF's float16 block scales are not the model's dtype); float32 if none."""
    for name, t in tensors.items():
        if t.is_floating_point() and name not in storage:
            return t.dtype
    return torch.float32


def _keep_in_fp32(spec, dtype: torch.dtype | None) -> re.Pattern | None:
    """Transformers' `_keep_in_fp32_modules` (a skeleton class attribute, T5's `wo`): loaded as
    float16, those modules' tensors stay float32, matched by whole name components as there."""
    modules = getattr(spec.build, "_keep_in_fp32_modules", ())
    if dtype != torch.float16 or not modules:
        return None
    return re.compile("|".join(rf"((^|\.){m}($|\.))" for m in modules))


def _convert(t: torch.Tensor, dtype: torch.dtype | None, device) -> torch.Tensor:
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)
    if device is not None:
        t = t.to(device)
    return t


def _is_gguf(path: str | os.PathLike) -> bool:
    """A path named *.gguf (existing or not: the GGUF loader says what is missing), or a file
    starting with the GGUF magic bytes."""
    path = os.fspath(path)
    if path.endswith(".gguf"):
        return True
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def load_with_report(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    gguf_file: str | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    architecture: str | None = None,
    attn_implementation: str = "sdpa",
    allow_missing: bool = False,
    strict: bool = True,
    ignore_mismatched_sizes: bool = False,
    config=None,
    variant: str | None = None,
    init_missing: str = "fmodel",
    mesh=None,
    plan: Mapping[str, str] | None = None,
    quantized: bool = False,
    activations: str = "float",
    mmap: bool = True,
) -> tuple[ModelState, LoadReport]:
    """`load`, also returning the `LoadReport` (missing / unexpected / renamed tensors)."""
    check_load_arguments(
        "load",
        path=path_or_repo_id,
        config=config,
        revision=revision,
        gguf_file=gguf_file,
        dtype=dtype,
        device=device,
        architecture=architecture,
        attn_implementation=attn_implementation,
        allow_missing=allow_missing,
        strict=strict,
        ignore_mismatched_sizes=ignore_mismatched_sizes,
        variant=variant,
        init_missing=init_missing,
        mmap=mmap,
    )
    if quantized is not False and not (gguf_file is not None or _is_gguf(path_or_repo_id)):
        raise InvalidArgumentError("load: quantized=True applies to GGUF files (block-quantized weights)")
    if activations != "float" and not (gguf_file is not None or _is_gguf(path_or_repo_id)):
        raise InvalidArgumentError(
            "load: activations= applies to GGUF files loaded with quantized=True (a quantized "
            "checkpoint records its activations; fmodel.quantize(..., activations=) sets them)"
        )
    if quantized is not False and mesh is not None:
        raise InvalidArgumentError("load: quantized=True does not combine with mesh= yet")
    if mesh is not None:  # each rank reads its slices (fmodel.distributed.load_sharded)
        from ..distributed.load_sharded import load_distributed

        return load_distributed(
            path_or_repo_id, mesh=mesh, plan=plan, revision=revision, cache_dir=cache_dir,
            local_files_only=local_files_only, gguf_file=gguf_file, dtype=dtype, device=device,
            config=config, variant=variant, architecture=architecture,
            attn_implementation=attn_implementation, allow_missing=allow_missing, strict=strict,
            ignore_mismatched_sizes=ignore_mismatched_sizes, init_missing=init_missing,
        )  # fmt: skip
    if plan is not None:
        raise InvalidArgumentError("load: plan= applies to a distributed load; pass mesh= as well")
    if gguf_file is not None or _is_gguf(path_or_repo_id):
        if init_missing != "fmodel":
            raise InvalidArgumentError(
                "init_missing='transformers' applies to safetensors/pickle files, not GGUF"
            )
        from .gguf import load_gguf_with_report

        return load_gguf_with_report(
            path_or_repo_id,
            gguf_file,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            dtype=dtype,
            device=device,
            architecture=architecture,
            attn_implementation=attn_implementation,
            allow_missing=allow_missing,
            strict=strict,
            config=config,
            quantized=quantized,
            activations=activations,
        )
    files = resolve_checkpoint(
        path_or_repo_id,
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        variant=variant,
        require_config=config is None,
    )
    config = config if config is not None else load_config(files.config)
    tensors, origin = read_tensors(files, mmap=mmap)
    return state_from_tensors(
        config,
        tensors,
        architecture=architecture,
        origin=origin,
        source=files.source,
        dtype=dtype,
        device=device,
        attn_implementation=attn_implementation,
        allow_missing=allow_missing,
        strict=strict,
        ignore_mismatched_sizes=ignore_mismatched_sizes,
        init_missing=init_missing,
    )


def load(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    gguf_file: str | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    architecture: str | None = None,
    attn_implementation: str = "sdpa",
    allow_missing: bool = False,
    strict: bool = True,
    variant: str | None = None,
    init_missing: str = "fmodel",
    mesh=None,
    plan: Mapping[str, str] | None = None,
    quantized: bool = False,
    activations: str = "float",
    mmap: bool = True,
) -> ModelState:
    """Load a Hugging Face checkpoint as a `ModelState`.

    Arguments:
        path_or_repo_id: a folder with config.json and weights (model.safetensors, a sharded
            model.safetensors.index.json, or pickle .bin read with weights_only=True), or a hub
            repo id resolved through huggingface_hub's cache.
        revision, cache_dir, local_files_only: hub options (offline: local_files_only=True or
            HF_HUB_OFFLINE=1).
        gguf_file: load this GGUF file (llama.cpp's format) of the folder or hub repo; a path to a
            .gguf file needs no gguf_file. The weights are dequantized (see `fmodel.io.gguf.load_gguf`).
        dtype: cast floating tensors (torch.dtype or "bfloat16", ...); None/"auto" keeps the
            stored dtype and the tensors stay memory-mapped.
        device: move tensors there (None: CPU, memory-mapped).
        architecture: class to load as (default `architectures[0]` of config.json); a head
            checkpoint loads as its base model by dropping the base prefix, as in Transformers.
        attn_implementation: the registered attention function the state's forward uses.
        allow_missing: initialise missing tensors by the architecture's init rules.
        init_missing: how (`state_from_tensors`): "fmodel" (seeded, pure) or "transformers"
            (Transformers' `from_pretrained` draws, from torch's global generator).
        strict: raise on tensors the architecture has no place for.
        variant: read Transformers' variant files (`model.fp16.safetensors`, ...) instead.
        mesh: a 1-D torch `DeviceMesh` over every rank: load a distributed state (DTensors
            split by `plan`, equal to `fmodel.distribute(fmodel.load(path), mesh, plan)`), each
            rank reading from safetensors files only its slices of the sharded tensors
            (`fmodel.distributed.load_sharded`); GGUF and pickle files load whole, then split.
        plan: the tensor-parallel plan ({module pattern: style}); None: the architecture's own.
        quantized: GGUF only: keep the file's block-quantized weights (Q4_0/1, Q5_0/1, Q8_0,
            Q4_K, Q5_K, Q6_K) of the linear projections and the token embedding as fmodel's
            int4 / int8 layouts, losslessly, instead of dequantizing them to float32 (see
            `fmodel.io.gguf.load_gguf`); the state is then an ordinary quantized one, about
            the file's size.
        activations: GGUF with `quantized=True` only: "float" (default) or "int8" (activations
            rounded per block of 32, as llama.cpp's integer dot products).
        mmap: True (default): tensors loaded in their stored dtype stay views of the mapped
            safetensors / pickle file (no copy, the OS pages them in and out). False: copy them
            into the process's own memory while loading (peak: the model plus one tensor), as
            llama.cpp's `--no-mmap`. Slower to load, and the memory cannot be reclaimed by the OS,
            but CPU decode reads anonymous memory faster: SmolLM2-135M float32's compiled step
            14.9 ms against 16.2 ms mapped (one thread, this project's AMD EPYC VM). GGUF files
            and loads that cast (`dtype=`) or move (`device=`) copy either way.

    Returns:
        A new `ModelState`; the checkpoint files are never written.

    Raises:
        CheckpointError (ShapeMismatchError, CheckpointDtypeError), ConfigError, SizeLimitError,
            ArgumentTypeError, InvalidArgumentError: each names the file and tensor, field or
            argument (see `state_from_tensors`); all before a large allocation.
        MeshSizeError, PlanError, PlanDivisibilityError: with `mesh`, a mesh that is not 1-D or
            not the world size, a plan that does not fit the config (`fmodel.distribute`'s checks).

    Example:
        >>> state = fmodel.load("path/to/checkpoint", dtype="bfloat16")
    """
    state, _ = load_with_report(
        path_or_repo_id,
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        gguf_file=gguf_file,
        dtype=dtype,
        device=device,
        architecture=architecture,
        attn_implementation=attn_implementation,
        allow_missing=allow_missing,
        strict=strict,
        variant=variant,
        init_missing=init_missing,
        mesh=mesh,
        plan=plan,
        quantized=quantized,
        activations=activations,
        mmap=mmap,
    )
    return state
