"""The config of a GGUF file, from its metadata: llama.cpp's keys -> Transformers' config fields.

`llama.embedding_length` -> hidden_size, `llama.block_count` -> num_hidden_layers, rope scaling,
token ids, ... Every value is read typed and bounded (`fmodel.io.gguf_meta`) and checked against
the tensor table before the dict is returned, so no config is ever built from a count of zero or
a billion layers the file does not hold.
"""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointError, ConfigError
from .gguf_file import GGUFFile
from .gguf_meta import check_against_tensors
from .gguf_meta import count as _count
from .gguf_meta import positive as _positive

__all__ = ["config_dict"]


def config_dict(file: GGUFFile, arch: Any, has_output: bool) -> dict[str, Any]:
    """A config.json-like dict for the file (Transformers' field names).

    Arguments:
        file: the parsed file.
        arch: its entry of `fmodel.io.gguf.GGUF_ARCHITECTURES` (model type, class name).
        has_output: whether the file has an `output.weight` (else the embeddings are tied).

    Raises:
        CheckpointError: a required key is missing or of the wrong type, or the metadata
            contradicts the tensor table (`gguf_meta.check_against_tensors`).
        ShapeMismatchError: the query/key rows differ from heads x head size.
        ConfigError: a count < 1, a non-positive or non-finite epsilon/base/factor, a token id
            outside the vocabulary.
    """
    a = file.architecture
    n_heads = _count(file, f"{a}.attention.head_count")
    hidden = _count(file, f"{a}.embedding_length")
    n_kv = _count(file, f"{a}.attention.head_count_kv", default=n_heads)
    d: dict[str, Any] = {
        "model_type": arch.model_type,
        "architectures": [arch.architecture],
        "hidden_size": hidden,
        "intermediate_size": _count(file, f"{a}.feed_forward_length"),
        "num_hidden_layers": _count(file, f"{a}.block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "max_position_embeddings": _count(file, f"{a}.context_length"),
        "rms_norm_eps": _positive(file, f"{a}.attention.layer_norm_rms_epsilon"),
        "rope_theta": _positive(file, f"{a}.rope.freq_base", default=10000.0),
        "tie_word_embeddings": not has_output,
        "vocab_size": _vocab_size(file),
    }
    head_dim = _count(file, f"{a}.attention.key_length", default=None)
    value_dim = _count(file, f"{a}.attention.value_length", default=head_dim)
    if head_dim != value_dim:
        raise CheckpointError(
            f"{file.path}: key head size {head_dim} ({a}.attention.key_length) differs from value head size "
            f"{value_dim} ({a}.attention.value_length); fmodel's {arch.architecture} needs them equal"
        )
    rope_dims = _count(file, f"{a}.rope.dimension_count", default=None)
    head_dim = head_dim or rope_dims or hidden // n_heads
    if rope_dims is not None and rope_dims != head_dim:
        raise CheckpointError(
            f"{file.path}: {a}.rope.dimension_count is {rope_dims} but the head size is {head_dim}; "
            f"partial rotary embeddings are not supported for {arch.architecture}"
        )
    if head_dim != hidden // n_heads:
        d["head_dim"] = head_dim
    check_against_tensors(file, arch, d, head_dim)
    rope_scaling = _rope_scaling(file)
    if rope_scaling is not None:
        d["rope_scaling"] = rope_scaling
    for key, field in (
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ("tokenizer.ggml.padding_token_id", "pad_token_id"),
    ):
        d[field] = file.get(key, int, default=None)  # an absent id is null, not the class default
        if d[field] is not None and not 0 <= d[field] < d["vocab_size"]:
            raise ConfigError(
                f"{file.path}: GGUF metadata key {key!r} is {d[field]}, outside the vocabulary of "
                f"{d['vocab_size']} tokens"
            )
    return d


def _vocab_size(file: GGUFFile) -> int:
    size = _count(file, f"{file.architecture}.vocab_size", default=None)
    if size is not None:
        return size
    tokens = file.get("tokenizer.ggml.tokens", list, default=None)
    if tokens:
        return len(tokens)
    embd = next((t for t in file.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise CheckpointError(
            f"{file.path}: no vocab size: no {file.architecture}.vocab_size, tokens or token_embd"
        )
    return int(embd.shape[-1])  # ggml order: [hidden, vocab]


def _rope_scaling(file: GGUFFile) -> dict[str, Any] | None:
    a = file.architecture
    kind = file.get(f"{a}.rope.scaling.type", str, default=None)
    factor = _positive(file, f"{a}.rope.scaling.factor", default=None)
    if kind is None and file.get(f"{a}.rope.scale_linear", float, default=None) is not None:
        kind, factor = "linear", _positive(file, f"{a}.rope.scale_linear")  # older files
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        out: dict[str, Any] = {"rope_type": "yarn", "factor": factor}
        orig = _count(file, f"{a}.rope.scaling.original_context_length", default=None)
        if orig is not None:
            out["original_max_position_embeddings"] = orig
        for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            value = file.get(f"{a}.rope.scaling.{key}", float, default=None)
            if value is not None:
                out[name] = value
        return out
    raise CheckpointError(
        f"{file.path}: {a}.rope.scaling.type is {kind!r}; fmodel reads 'none', 'linear' and 'yarn' from GGUF"
    )
