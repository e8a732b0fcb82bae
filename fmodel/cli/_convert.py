"""`fmodel convert`: a GGUF file or a checkpoint (folder or hub id) -> a Transformers-format folder.

The output is what `save_pretrained` writes (config.json, safetensors shards with an index,
generation_config.json) plus the tokenizer: a folder's tokenizer files are copied; a GGUF
file's tokenizer is written as tokenizer.json + tokenizer_config.json (chat template, special
tokens), which Transformers' `AutoTokenizer` and `fmodel.Tokenizer.from_folder` both load and
which encode exactly as `fmodel.Tokenizer.from_gguf` does. `--quantize int8|int4` applies
`fmodel.quantize` (weight-only, decoder-layer projections) after the optional dtype cast; such
a folder loads in fmodel (its config.json carries the `quantization_config`). The whole folder
is assembled beside DST and swapped into place crash-safe (as `fmodel.save`), so neither a
failure nor a kill leaves anything half-written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
from typing import Any, TextIO

from ..io.atomic import atomic_folder
from ..io.generation_config import generation_config_from_model_config
from ..io.save import save
from ..state import ModelState
from ..tokenizer import Tokenizer
from ..transforms import quantize
from ._inspect import human_bytes
from ._load import (
    GENERATION_CONFIG,
    TOKENIZER_FILES,
    CLIError,
    LoadedModel,
    describe_dtype,
    fetch_extra_files,
    load_model,
)

__all__ = ["add_parser", "run", "tokenizer_files"]

logger = logging.getLogger("fmodel")


def add_parser(commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register `convert` and its options."""
    p = commands.add_parser(
        "convert",
        parents=parents,
        help="convert a GGUF file or checkpoint to a Transformers-format safetensors folder",
        description=(
            "Convert SRC (a GGUF file, a checkpoint folder or a hub repo id) to a Transformers-format "
            "folder DST: config.json, safetensors weights, generation_config.json and the tokenizer."
        ),
    )
    p.add_argument("src", metavar="SRC", help="a GGUF file, a checkpoint folder or a hub repo id")
    p.add_argument(
        "dst", metavar="DST", help="the output folder (must not exist or be empty, unless --force)"
    )
    p.add_argument(
        "--dtype", metavar="D", help="cast the weights: float32, bfloat16, float16 (default: as stored)"
    )
    p.add_argument(
        "--quantize",
        choices=("int8", "int4"),
        help="weight-only quantization of the decoder layers' linear projections (fmodel.quantize); "
        "the output loads in fmodel, not in Transformers",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=128,
        metavar="G",
        help="int4 group width: 32, 64 or 128 (default 128)",
    )
    p.add_argument(
        "--quantize-lm-head",
        action="store_true",
        help="quantize the output projection too (unties it from the embeddings)",
    )
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        metavar="S",
        help='largest shard, bytes or a size like "500MB" (decimal units; default 5GB)',
    )
    p.add_argument("--gguf-file", metavar="NAME", help="the GGUF file inside a folder or hub repo SRC")
    p.add_argument("--force", action="store_true", help="replace DST when it exists and is not empty")
    p.set_defaults(run=run)


# What each family's Transformers tokenizer class returns (its `model_input_names`); a
# `PreTrainedTokenizerFast` without the key would add `token_type_ids`, which a decoder's
# forward (`model(**tokenizer(text))`) does not take.
MODEL_INPUT_NAMES: dict[str, list[str]] = {
    "bert": ["input_ids", "token_type_ids", "attention_mask"],
}
DEFAULT_MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]  # Llama, Qwen2, GPT-2, ... tokenizers


def tokenizer_files(
    tokenizer: Tokenizer, *, model_max_length: int | None = None, model_type: str | None = None
) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json texts for `tokenizer` (e.g. one built from GGUF).

    tokenizer.json is the backend as is (its post-processor adds BOS/EOS exactly as
    `tokenizer.encode` does); tokenizer_config.json names `PreTrainedTokenizerFast`, which takes
    that behaviour unchanged, the special tokens, the chat template and `model_input_names` as
    Transformers' tokenizer class for `model_type` has them (`input_ids`, `attention_mask`; BERT
    adds `token_type_ids`). Decoding keeps spaces as they are (`clean_up_tokenization_spaces`
    false), like `Tokenizer.decode`.
    """
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_input_names": MODEL_INPUT_NAMES.get(model_type or "", DEFAULT_MODEL_INPUT_NAMES),
    }
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(tokenizer, key)
        if value is not None:
            config[key] = value
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    return {
        "tokenizer.json": tokenizer.backend.to_str(pretty=True) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
    }


def _gguf_generation_config(state: ModelState, tokenizer: Tokenizer) -> dict[str, Any]:
    """Transformers' generation config for the model, with the tokenizer's end-of-turn ids added."""
    out = generation_config_from_model_config(state.config)
    eos = out.get("eos_token_id")
    ids = [eos] if isinstance(eos, int) else list(eos or ())
    more = [i for i in tokenizer.eos_token_ids if i not in ids]
    if more:
        out["eos_token_id"] = ids + more
        out.pop("_from_model_config", None)  # no longer what the model config alone implies
    return out


def _stage_tokenizer(loaded: LoadedModel, staging: str) -> tuple[list[str], dict[str, Any] | None]:
    """Write or copy the tokenizer files into `staging`; return their names and the generation
    config to write (None: let `fmodel.save` derive it)."""
    if loaded.gguf is not None:
        tokenizer = Tokenizer.from_gguf(loaded.gguf)
        context = getattr(loaded.state.config, "max_position_embeddings", None)
        files = tokenizer_files(
            tokenizer, model_max_length=context, model_type=loaded.state.config.model_type
        )
        for name, text in files.items():
            with open(os.path.join(staging, name), "w", encoding="utf-8") as f:
                f.write(text)
        return sorted(files), _gguf_generation_config(loaded.state, tokenizer)
    fetch_extra_files(loaded, (*TOKENIZER_FILES, GENERATION_CONFIG))
    copied = []
    for name in TOKENIZER_FILES:
        path = os.path.join(loaded.folder, name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(staging, name))
            copied.append(name)
    if not copied:
        logger.warning("%s: no tokenizer files found; the output has none", loaded.source)
    gen_path = os.path.join(loaded.folder, GENERATION_CONFIG)
    generation = None
    if os.path.isfile(gen_path):
        with open(gen_path, encoding="utf-8") as f:
            generation = json.load(f)
    return copied, generation


def _check_destination(dst: str, force: bool) -> None:
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise CLIError(f"{dst}: exists and is not a folder")
    if os.path.isdir(dst) and os.listdir(dst) and not force:
        raise CLIError(f"{dst}: exists and is not empty; choose a new folder or pass --force to replace it")


def _shard_size(text: str) -> int | str:
    """`--max-shard-size` as `fmodel.save` takes it: bytes, or a number with a decimal unit."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]b)?\s*", text, flags=re.I)
    if match is None:
        raise CLIError(
            f"--max-shard-size {text!r} is not a size; give bytes or a whole number with KB, MB, GB or TB "
            "(e.g. 500MB)"
        )
    number, unit = match.groups()
    return int(number) if unit is None else f"{number}{unit.upper()}"


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run `fmodel convert`; returns the exit status."""
    out = out or sys.stdout
    if args.quantize is None and (args.quantize_lm_head or args.group_size != 128):
        raise CLIError("--group-size and --quantize-lm-head need --quantize")
    shard_size = _shard_size(args.max_shard_size)
    dst = os.path.abspath(args.dst)
    _check_destination(dst, args.force)
    loaded = load_model(args.src, gguf_file=args.gguf_file, dtype=args.dtype)
    state = loaded.state
    if args.quantize is not None:
        state = quantize(
            state, args.quantize, group_size=args.group_size, include_lm_head=args.quantize_lm_head
        )

    # The folder is staged beside DST and swapped in crash-safe (fmodel.io.atomic), as fmodel.save.
    with atomic_folder(dst) as staging:
        tokenizer_names, generation = _stage_tokenizer(loaded, staging)
        # fmodel.save keeps the files already in `staging` and swaps its own output in atomically.
        save(state, staging, max_shard_size=shard_size, generation_config=generation)
        names = sorted(os.listdir(staging))
        total = sum(os.path.getsize(os.path.join(staging, n)) for n in names)
    shards = [n for n in names if n.endswith(".safetensors")]
    quantized = "" if args.quantize is None else f" ({args.quantize} weights)"
    out.write(
        f"{args.dst}: {state.architecture}, {describe_dtype(state)}{quantized}, {len(shards)} safetensors file(s), "
        f"{human_bytes(total)}; tokenizer: {', '.join(tokenizer_names) or 'none'}\n"
    )
    return 0
