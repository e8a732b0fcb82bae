"""`fmodel inspect`: what a checkpoint holds, as readable text or JSON (`--json`).

Architecture, parameter counts (total, trainable, non-embedding: `fmodel.stats`), dtype,
memory footprint of the loaded model, ties, the files (shards and sizes; for GGUF the file and
its tensor types) and the config's highlights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, TextIO

from .. import stats
from ..models.quant_linear import quantization_config
from ._load import LoadedModel, describe_dtype, load_model

__all__ = ["add_parser", "describe", "human_bytes", "render", "run"]

# (label, config attribute) in display order; absent attributes are left out.
_CONFIG_FIELDS = (
    ("layers", "num_hidden_layers"),
    ("hidden", "hidden_size"),
    ("heads", "num_attention_heads"),
    ("kv_heads", "kv_heads"),
    ("head_dim", "head_size"),
    ("intermediate", "intermediate_size"),
    ("vocab", "vocab_size"),
    ("context", "max_position_embeddings"),
    ("rope_theta", "rope_theta"),
    ("sliding_window", "sliding_window"),
    ("tie_word_embeddings", "tie_word_embeddings"),
)


def add_parser(commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register `inspect` and its options."""
    p = commands.add_parser(
        "inspect",
        parents=parents,
        help="describe a checkpoint: architecture, parameters, dtype, memory, ties, files, config",
        description="Describe a checkpoint folder, GGUF file or hub repo id.",
    )
    p.add_argument("model", metavar="MODEL", help="a checkpoint folder, a GGUF file or a hub repo id")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--gguf-file", metavar="NAME", help="the GGUF file inside a folder or hub repo MODEL")
    p.set_defaults(run=run)


def _config_highlights(config: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"model_type": config.model_type}
    for label, attribute in _CONFIG_FIELDS:
        try:
            value = getattr(config, attribute)
        except AttributeError:
            continue
        if value is not None:
            out[label] = value
    return out


def describe(loaded: LoadedModel) -> dict[str, Any]:
    """A JSON-ready description of a loaded model (the `--json` output).

    Keys: source, format, architecture, model_type, dtype, attn_implementation,
    parameters {total, trainable, non_embedding}, memory_footprint_bytes, ties {alias: source},
    files [{name, path, bytes}], total_file_bytes, tensor_types {type: count}, quantization
    ({scheme, group_size, modules, skipped_modules} or null), config {...}.
    "total" and "non_embedding" are `fmodel.stats.num_parameters` (a quantized weight counts as
    the weight it stands for); "trainable" is what the facade model of the state reports with
    `num_parameters(only_trainable=True)`: its floating-point parameters, as Transformers counts.
    """
    state = loaded.state
    return {
        "source": loaded.source,
        "format": loaded.format,
        "architecture": state.architecture,
        "model_type": state.config.model_type,
        "dtype": describe_dtype(state),
        "attn_implementation": state.attn_implementation,
        "parameters": {
            "total": stats.num_parameters(state),
            "trainable": _trainable(state),
            "non_embedding": stats.num_parameters(state, exclude_embeddings=True),
        },
        "memory_footprint_bytes": stats.get_memory_footprint(state),
        "ties": dict(state.ties),
        "files": [{"name": os.path.basename(p), "path": p, "bytes": n} for p, n in loaded.files],
        "total_file_bytes": sum(n for _, n in loaded.files),
        "tensor_types": dict(loaded.tensor_types),
        "quantization": _quantization(state),
        "config": _config_highlights(state.config),
    }


def _trainable(state: Any) -> int:
    """What a facade model over `state` reports as trainable: its floating-point parameters
    (the facade makes exactly those require grad), quantized weights counted as Transformers
    counts them. Computed on the state, without building a facade model (which would import
    Transformers, when installed, for its interop)."""
    marked: dict[int, Any] = {}
    params = {}
    for name, tensor in state.params.items():
        if id(tensor) not in marked:  # one marked tensor per tied group keeps the ties
            marked[id(tensor)] = tensor.detach().requires_grad_(tensor.is_floating_point())
        params[name] = marked[id(tensor)]
    return stats.num_parameters(state.replace(params=params), only_trainable=True)


def _quantization(state: Any) -> dict[str, Any] | None:
    """{scheme, group_size, quantized modules, skipped modules} of a quantized state, else None."""
    qc = quantization_config(state.config)
    if qc is None:
        return None
    qc = dict(qc)
    return {
        "scheme": qc.get("scheme"),
        "group_size": qc.get("group_size"),
        "modules": len(qc.get("modules") or ()),
        "skipped_modules": list(qc.get("skipped_modules") or ()),
    }


def human_bytes(n: int) -> str:
    """Decimal units, as the hub shows sizes: 538.1 MB."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # unreachable


def _quantization_text(q: dict[str, Any] | None) -> str:
    if q is None:
        return "none"
    group = f", groups of {q['group_size']}" if q["group_size"] else ""
    skipped = f"; floating: {', '.join(q['skipped_modules'])}" if q["skipped_modules"] else ""
    return f"{q['scheme']}{group}, {q['modules']} linear modules{skipped}"


def _config_text(config: dict[str, Any]) -> str:
    """ "30 layers, hidden 576, 9 heads, 3 kv heads, head dim 64, ..." from the highlights."""
    parts = []
    for key, value in config.items():
        if key in ("layers", "heads", "kv_heads"):
            parts.append(f"{value} {key.replace('_', ' ')}")
        elif key == "tie_word_embeddings":
            parts.append("tied embeddings" if value else "untied embeddings")
        else:
            parts.append(
                f"{key.replace('_', ' ')} {value:g}"
                if isinstance(value, float)
                else f"{key.replace('_', ' ')} {value}"
            )
    return ", ".join(parts)


def render(info: dict[str, Any]) -> str:
    """The readable text of `describe`'s dict."""
    p = info["parameters"]
    c = dict(info["config"])
    lines = [
        ("architecture", f"{info['architecture']} ({c.pop('model_type')})"),
        (
            "parameters",
            f"{p['total']:,} total, {p['trainable']:,} trainable, {p['non_embedding']:,} non-embedding",
        ),
        ("dtype", info["dtype"] + (" (dequantized from GGUF)" if info["format"] == "gguf" else "")),
        (
            "memory",
            f"{human_bytes(info['memory_footprint_bytes'])} ({info['memory_footprint_bytes']:,} bytes)",
        ),
        ("ties", ", ".join(f"{a} -> {s}" for a, s in info["ties"].items()) or "none"),
        ("quantization", _quantization_text(info["quantization"])),
        ("config", _config_text(c)),
    ]
    files = info["files"]
    if info["format"] == "gguf":
        lines.append(("file", f"{files[0]['path']} ({human_bytes(files[0]['bytes'])})"))
        lines.append(("tensor types", ", ".join(f"{k} x{n}" for k, n in info["tensor_types"].items())))
    else:
        shards = sum(not f["name"].endswith(".json") for f in files)
        index = " + index" if shards < len(files) else ""
        total = human_bytes(info["total_file_bytes"])
        lines.append(("files", f"{shards} {info['format']} file(s){index}, {total}"))
        name_width = max(len(f["name"]) for f in files)
        lines.extend(("", f"{f['name'].ljust(name_width)}  {human_bytes(f['bytes']):>9}") for f in files)
        lines.append(("stored dtypes", ", ".join(f"{k} x{n}" for k, n in info["tensor_types"].items())))
    width = max(len(label) for label, _ in lines)
    return "\n".join([info["source"], *(f"  {label.ljust(width)}  {text}" for label, text in lines)]) + "\n"


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run `fmodel inspect`; returns the exit status."""
    out = out or sys.stdout
    info = describe(load_model(args.model, gguf_file=args.gguf_file))
    out.write(json.dumps(info, indent=2) + "\n" if args.json else render(info))
    return 0
