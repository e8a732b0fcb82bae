"""What a load checks, and when: arguments first, then the file's tensors against the config
(before any skeleton is built), then every tensor's dtype against its parameter.

The order matters for speed and memory. A config can lie (`num_hidden_layers=10**9` beside a
2-layer file); building its skeleton would take minutes, so `check_against_config` compares
what the config declares with what the tensors' names and the embedding's shape say, which
costs one pass over the names. Where the load will draw tensors (`allow_missing`, `init`), an
arithmetic parameter count is checked against the device's memory (`fmodel._limits`) before
the skeleton exists. The config fields themselves are bounded by `fmodel.config.base`.

The dtype rule (`check_dtypes`): a parameter or buffer that is floating in the architecture
(every weight, bias, norm and quantization scale) must be stored in a floating dtype fmodel
computes in: float16, bfloat16, float32 or float64 (any of them; a load without dtype= keeps
the stored one). A tensor the architecture holds as an integer (a quantized layer's int8 /
packed uint8 weight, an index buffer) must be stored in exactly that dtype.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch

from .._checks import FLOAT_DTYPES, check_config, check_device, check_mapping_of_tensors, check_str
from .._limits import check_allocation
from ..errors import (
    ArgumentTypeError,
    CheckpointDtypeError,
    CheckpointError,
    ConfigError,
    InvalidArgumentError,
    ShapeMismatchError,
)

__all__ = [
    "FLOAT_STORAGE",
    "DtypeArgumentError",
    "check_against_config",
    "check_dtypes",
    "check_load_arguments",
    "check_missing_allocation",
    "estimate_parameter_count",
    "resolve_dtype",
]

FLOAT_STORAGE = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
# "model.layers.3.", "transformer.h.3.", "bert.encoder.layer.3." (and without the base prefix)
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|layer|block)\.(\d+)\.")  # block: T5


class DtypeArgumentError(ConfigError, InvalidArgumentError):
    """A `dtype=` argument fmodel cannot load into: an unknown name, or a dtype that is not
    floating (int8, bool). Both a `ConfigError` (as before) and an `InvalidArgumentError`."""


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """None or "auto" -> None (keep the stored dtype); a float name or torch.dtype -> torch.dtype.

    Raises:
        DtypeArgumentError: an unknown name, or a dtype that is not floating (weights cannot be
            cast to int8 or bool); the message lists what is accepted.
    """
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        return None
    if isinstance(dtype, torch.dtype):
        if dtype in FLOAT_STORAGE:
            return dtype
        raise DtypeArgumentError(
            f"dtype={dtype} is not a floating dtype a model can be loaded in; use one of "
            f"{sorted(FLOAT_DTYPES)} (or the torch.dtype), or None/'auto' to keep the stored dtype"
        )
    if isinstance(dtype, str):
        key = dtype.removeprefix("torch.")
        if key in FLOAT_DTYPES:
            return FLOAT_DTYPES[key]
    raise DtypeArgumentError(
        f"dtype {dtype!r} is not understood; use a torch.dtype, 'auto', or one of {sorted(FLOAT_DTYPES)}"
    )


def _check_bool(value: object, argument: str) -> None:
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{argument} must be True or False, got {type(value).__name__} {value!r}")


def check_load_arguments(where: str, *, config=None, tensors=None, **options) -> None:
    """Check the arguments of `load` / `load_with_report` / `state_from_tensors` before any
    file is read. `options` are the keyword arguments by name (only those given are checked).

    Raises:
        ArgumentTypeError: a path that is not a str / os.PathLike, a config that is not an
            fmodel config, tensors that are not a {str: tensor} mapping, a flag that is not a
            bool, a name that is not a str.
        InvalidArgumentError: a device torch does not know or that is not here; a dtype that
            is not floating (`DtypeArgumentError`); an unknown init_missing.
    """
    path = options.get("path")
    if "path" in options and not isinstance(path, (str, os.PathLike)):
        raise ArgumentTypeError(
            f"{where}: path_or_repo_id must be a folder path (str or os.PathLike) or a hub repo id, "
            f"got {type(path).__name__} {path!r}"[:300]
        )
    if config is not None:
        check_config(config, f"{where}(config)")
    if tensors is not None:
        check_mapping_of_tensors(tensors, f"{where}(tensors)")
    for name in ("allow_missing", "strict", "ignore_mismatched_sizes", "warn_missing", "mmap"):
        if name in options:
            _check_bool(options[name], f"{where}({name})")
    for name in ("architecture", "revision", "gguf_file", "variant"):
        if name in options:
            check_str(options[name], f"{where}({name})", allow_none=True)
    if "attn_implementation" in options:
        check_str(options["attn_implementation"], f"{where}(attn_implementation)")
    if "init_missing" in options and options["init_missing"] not in ("fmodel", "transformers"):
        raise InvalidArgumentError(
            f"init_missing must be 'fmodel' or 'transformers', got {options['init_missing']!r}"
        )
    if "dtype" in options:
        resolve_dtype(options["dtype"])
    if options.get("device") is not None:
        check_device(options["device"], f"{where}(device)")


def _base_name(name: str, prefix: str) -> str:
    return name[len(prefix) + 1 :] if name.startswith(prefix + ".") else name


def check_against_config(
    config,
    spec,
    tensors: Mapping[str, torch.Tensor],
    *,
    source: str,
    origin: Mapping[str, str],
    allow_missing: bool,
    ignore_mismatched_sizes: bool,
) -> None:
    """What the tensors' names and the embedding's shape say against what the config declares,
    in one pass over the names, before a skeleton is built.

    Raises:
        CheckpointError: the config declares more layers than the tensors hold (unless
            `allow_missing`), naming both counts.
        ShapeMismatchError: the input embedding is not [vocab_size, hidden_size] (unless
            `ignore_mismatched_sizes`).
    """
    layers = int(config.num_hidden_layers)
    if not allow_missing:
        present = {int(m.group(1)) for m in map(_LAYER_INDEX.search, tensors) if m is not None}
        # layers > len(present) first: a config of 10**9 layers costs nothing to refuse
        if layers > len(present) or any(i not in present for i in range(layers)):
            held = f"layers {sorted(present)[:10]}" if present else "no layer tensors"
            raise CheckpointError(
                f"{source}: the config declares num_hidden_layers={layers}, but the checkpoint holds "
                f"{held} ({len(present)} layer(s)); the config does not describe these weights "
                f"(pass allow_missing=True to initialise the absent layers)"
            )
    if ignore_mismatched_sizes:
        return
    embed = _base_name(spec.input_embeddings, spec.prefix)
    for name, tensor in tensors.items():
        if _base_name(spec.rename_key(name), spec.prefix) == embed:
            want = (int(config.vocab_size), int(config.hidden_size))
            if tuple(tensor.shape) != want:
                raise ShapeMismatchError(
                    f"{source}: {name}: found {list(tensor.shape)} in {origin.get(name, source)}, expected "
                    f"{list(want)} ([vocab_size, hidden_size] of the config)"
                )
            return


def estimate_parameter_count(config) -> int:
    """An upper estimate of the parameters a config declares, by arithmetic on its sizes
    (embeddings, attention, a gated MLP or a mixture of experts per layer, learned positions);
    no module is built.
    A config with a `parameter_estimate()` method (an encoder-decoder) gives its own."""
    own = getattr(type(config), "parameter_estimate", None)
    if own is not None:
        return int(own(config))
    hidden, vocab, layers = int(config.hidden_size), int(config.vocab_size), int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "kv_heads", heads))
    head = int(getattr(config, "head_size", hidden // heads))
    ffn = int(config.intermediate_size)
    positions = 0 if hasattr(config, "rope_type") else int(config.max_position_embeddings)
    attention = 2 * hidden * heads * head + 2 * hidden * kv * head + 8 * hidden
    dense_mlp = 3 * hidden * ffn + ffn
    mlps = layers * dense_mlp
    if hasattr(config, "layer_is_sparse"):  # a mixture of experts: experts + router per sparse layer
        experts = int(config.moe_experts) * (3 * hidden * int(config.moe_intermediate)) + hidden * int(
            config.moe_experts
        )
        sparse = sum(1 for i in range(layers) if config.layer_is_sparse(i))
        mlps = (layers - sparse) * dense_mlp + sparse * experts
    embeddings = vocab * hidden * (1 if config.tie_word_embeddings else 2) + positions * hidden
    return embeddings + layers * attention + mlps


def check_missing_allocation(
    config, tensors: Mapping[str, torch.Tensor], *, dtype: torch.dtype | None, device, what: str
) -> None:
    """Before a skeleton is built for a load that draws tensors: refuse when the parameters
    the config declares beyond those given would not fit the device (`check_allocation`).

    Raises:
        SizeLimitError: names `what`, the estimate and the device's memory.
    """
    given = sum(t.numel() for t in tensors.values())
    need = max(0, estimate_parameter_count(config) - given)
    itemsize = (dtype or torch.float32).itemsize
    check_allocation(
        need * itemsize,
        what=(
            f"{what} (about {need:.3g} parameters to draw: vocab_size={config.vocab_size}, "
            f"hidden_size={config.hidden_size}, num_hidden_layers={config.num_hidden_layers}, "
            f"intermediate_size={config.intermediate_size})"
        ),
        device=device,
    )


def check_dtypes(
    found: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.dtype],
    *,
    names: Mapping[str, str],
    origin: Mapping[str, str],
    source: str,
) -> None:
    """Each stored tensor's dtype against its parameter's (the rule in the module docstring).

    Arguments:
        found: {state name: stored tensor}.
        expected: {state name: the skeleton's dtype}.
        names: {state name: checkpoint name}, origin: {checkpoint name: file}, for messages.

    Raises:
        CheckpointDtypeError: every offending tensor (up to 20) with its file, found and
            expected dtype.
    """
    bad = []
    for name, tensor in found.items():
        want = expected[name]
        if want.is_floating_point:
            if tensor.dtype not in FLOAT_STORAGE:
                bad.append((name, tensor.dtype, "a floating dtype (float16, bfloat16, float32 or float64)"))
        elif tensor.dtype != want:
            bad.append((name, tensor.dtype, str(want)))
    if bad:
        lines = [
            f"  {names.get(n, n)} in {origin.get(names.get(n, n), source)}: stored as {got}, expected {want}"
            for n, got, want in bad[:20]
        ]
        raise CheckpointDtypeError(
            f"{source}: {len(bad)} tensor(s) stored in a dtype their parameter cannot have:\n"
            + "\n".join(lines)
        )
