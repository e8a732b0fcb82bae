"""`Tokenizer`: text <-> token ids, chat templates and streaming decode.

A thin, immutable wrapper around a `tokenizers.Tokenizer` (the Rust tokenizer Transformers'
fast tokenizers use; an optional dependency, `pip install 'fmodel[gguf]'`). It is built from a
Hugging Face folder (tokenizer.json + tokenizer_config.json) or from the tokenizer a GGUF file
carries in its metadata (byte-level BPE, `tokenizer.ggml.model == "gpt2"`). Chat templates are
rendered with jinja2 in a sandbox, with the same globals Transformers gives them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import attrs

from .errors import ArgumentTypeError, CheckpointError, FModelError

__all__ = ["StreamDecoder", "Tokenizer"]

INSTALL_HINT = "pip install 'fmodel[gguf]'"

# llama.cpp's token types (tokenizer.ggml.token_type)
_CONTROL = 3
_USER_DEFINED = 4

# tokenizer.ggml.pre -> the pre-tokenizer the model was trained with (llama.cpp's names).
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell", "exaone", "minerva-7b", "command-r")
_LLAMA3 = ("llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral")
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = ("qwen2", "deepseek-r1-qwen")
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2 = ("gpt2", "default", "gpt-2", "olmo", "smaug-bpe", "jais")


class TokenizerError(FModelError, ValueError):
    """A tokenizer cannot be built or used as asked (no chat template, bad message list, ...)."""


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise ImportError(f"fmodel.Tokenizer needs the `tokenizers` package: {INSTALL_HINT}") from None
    return tokenizers


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or a serialized AddedToken."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


@attrs.frozen(eq=False, repr=False)
class Tokenizer:
    """Text <-> ids for one model. Immutable; build it with `from_folder` or `from_gguf`.

    Attributes:
        backend: the `tokenizers.Tokenizer` doing the work (not to be modified).
        bos_token / eos_token / pad_token / unk_token: special token strings (None when absent).
        chat_template: the Jinja chat template, or None.
        extra_eos_token_ids: further ids that end a generation (e.g. `<|eot_id|>`).
        source: where it was read from, for messages.
    """

    backend: Any
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    chat_template: str | None = None
    extra_eos_token_ids: tuple[int, ...] = attrs.field(default=(), converter=tuple)
    source: str = ""

    # -- building ---------------------------------------------------------------------

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> Tokenizer:
        """Read a Hugging Face tokenizer folder.

        Arguments:
            path: a folder with tokenizer.json; tokenizer_config.json (special tokens, chat
                template), special_tokens_map.json, chat_template.jinja and generation_config.json
                (extra end-of-generation ids) are read when present.

        Raises:
            CheckpointError: no tokenizer.json, or a file that cannot be parsed.
            ImportError: `tokenizers` is not installed.
        """
        folder = os.fspath(path)
        tokenizers = _tokenizers()
        tok_file = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise CheckpointError(f"{folder}: no tokenizer.json in this folder")
        try:
            backend = tokenizers.Tokenizer.from_file(tok_file)
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise CheckpointError(f"{tok_file}: not a readable tokenizer.json ({exc})") from None
        config = _read_json(os.path.join(folder, "special_tokens_map.json"))
        config.update(_read_json(os.path.join(folder, "tokenizer_config.json")))
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default")
        jinja_file = os.path.join(folder, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        eos = _token_text(config.get("eos_token"))
        gen_eos = _read_json(os.path.join(folder, "generation_config.json")).get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or ())
        return cls(
            backend,
            bos_token=_token_text(config.get("bos_token")),
            eos_token=eos,
            pad_token=_token_text(config.get("pad_token")),
            unk_token=_token_text(config.get("unk_token")),
            chat_template=template if isinstance(template, str) else None,
            extra_eos_token_ids=tuple(i for i in gen_eos if isinstance(i, int)),
            source=folder,
        )

    @classmethod
    def from_gguf(cls, path: Any) -> Tokenizer:
        """Build the byte-level BPE tokenizer a GGUF file describes (`tokenizer.ggml.model == "gpt2"`).

        Read from the metadata: `tokens`, `merges`, `token_type` (control tokens become special
        tokens, user-defined ones added tokens), the bos/eos/pad/unk ids, `add_bos_token` /
        `add_eos_token`, `tokenizer.ggml.pre` (the pre-tokenizer the model was trained with:
        gpt2, smollm/starcoder digits, llama-bpe, qwen2; others fall back to GPT-2's with a
        warning), end-of-turn ids and `tokenizer.chat_template`.

        Arguments:
            path: a .gguf file, or a `fmodel.io.gguf.GGUFFile` already read (shares the parse
                with `load_gguf`).

        Raises:
            CheckpointError: not a GGUF file, no tokenizer in it, or not a byte-level BPE one.
            ImportError: `gguf` or `tokenizers` is not installed.
        """
        from .io.gguf import GGUFFile, read_gguf

        file = path if isinstance(path, GGUFFile) else read_gguf(path)
        tokenizers = _tokenizers()
        from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors

        model = file.get("tokenizer.ggml.model", str, default=None)
        if model is None:
            raise CheckpointError(
                f"{file.path}: no tokenizer in this GGUF file (tokenizer.ggml.model is missing)"
            )
        if model != "gpt2":
            raise CheckpointError(
                f"{file.path}: tokenizer.ggml.model is {model!r}; fmodel builds byte-level BPE tokenizers "
                "('gpt2') from GGUF files"
            )
        tokens = file.get("tokenizer.ggml.tokens", list, required=True)
        merges = file.get("tokenizer.ggml.merges", list, required=True)
        types = file.get("tokenizer.ggml.token_type", list, default=None) or [1] * len(tokens)
        if len(types) != len(tokens):
            raise CheckpointError(
                f"{file.path}: tokenizer.ggml.token_type has {len(types)} entries, expected one per token ({len(tokens)})"
            )
        pre = file.get("tokenizer.ggml.pre", str, default="default")

        def token(key: str) -> str | None:
            i = file.get(key, int, default=None)
            if i is None:
                return None
            if not 0 <= i < len(tokens):
                raise CheckpointError(f"{file.path}: {key} is {i}, outside the {len(tokens)} tokens")
            return tokens[i]

        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        bad = next((m for m, p in zip(merges, pairs, strict=True) if len(p) != 2), None)
        if bad is not None:
            raise CheckpointError(f"{file.path}: tokenizer.ggml.merges entry {bad!r} is not 'left right'")
        backend = tokenizers.Tokenizer(
            models.BPE(
                vocab,
                pairs,
                dropout=None,
                continuing_subword_prefix="",
                end_of_word_suffix="",
                fuse_unk=False,
                byte_fallback=False,
                ignore_merges=pre in _LLAMA3,
            )
        )
        backend.pre_tokenizer, normalizer = _pre_tokenizer(pre, file.path, pre_tokenizers, normalizers)
        if normalizer is not None:
            backend.normalizer = normalizer
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(
            [
                AddedToken(t, normalized=False, special=True)
                for t, k in zip(tokens, types, strict=True)
                if k == _CONTROL
            ]
        )
        user = [
            AddedToken(t, normalized=False, special=False)
            for t, k in zip(tokens, types, strict=True)
            if k == _USER_DEFINED
        ]
        if user:
            backend.add_tokens(user)

        bos, eos = token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")
        # llama.cpp's defaults: Llama 3's tokenizer adds BOS, other byte-level BPE ones do not.
        add_bos = file.get("tokenizer.ggml.add_bos_token", bool, default=pre in _LLAMA3)
        add_eos = file.get("tokenizer.ggml.add_eos_token", bool, default=False)
        single, pair, special = "$A:0", "$A:0 $B:1", []
        if add_bos and bos is not None:
            single, pair = f"{bos}:0 {single}", f"{bos}:0 $A:0 {bos}:1 $B:1"
            special.append((bos, vocab[bos]))
        if add_eos and eos is not None:
            single, pair = f"{single} {eos}:0", f"{pair} {eos}:1"
            if eos != bos:
                special.append((eos, vocab[eos]))
        if special:
            backend.post_processor = processors.TemplateProcessing(
                single=single, pair=pair, special_tokens=special
            )
        else:
            backend.post_processor = processors.ByteLevel(trim_offsets=False)

        extra = []
        for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            i = file.get(key, int, default=None)
            if i is not None:
                extra.append(i)
        return cls(
            backend,
            bos_token=bos,
            eos_token=eos,
            pad_token=token("tokenizer.ggml.padding_token_id"),
            unk_token=token("tokenizer.ggml.unknown_token_id"),
            chat_template=file.get("tokenizer.chat_template", str, default=None),
            extra_eos_token_ids=tuple(extra),
            source=file.path,
        )

    # -- ids ------------------------------------------------------------------------------

    def token_to_id(self, token: str | None) -> int | None:
        """The id of `token` (None for None or an unknown token)."""
        return None if token is None else self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The token string of `token_id` (None when out of range)."""
        return self.backend.id_to_token(token_id)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return self.token_to_id(self.unk_token)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends a generation: the eos token, then the extra end-of-turn ids."""
        ids = [self.eos_token_id, *self.extra_eos_token_ids]
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    # -- encode / decode ----------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (`<|im_start|>`) are matched.

        Arguments:
            text: the string.
            add_special_tokens: add what the tokenizer adds around a sequence (e.g. BOS);
                a chat-template string should be encoded with False (the template has them).
        """
        if not isinstance(text, str):
            raise ArgumentTypeError(f"Tokenizer.encode: expected a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` of each text (run in parallel by the backend)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """The text of `ids` (a list, tuple, or 1-D tensor of ints)."""
        return self.backend.decode(_as_ids(ids), skip_special_tokens=skip_special_tokens)

    def decode_stream(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> Iterator[str]:
        """Yield text pieces as ids arrive; joined, they equal `decode(all ids)`.

        A character split over several tokens (multi-byte UTF-8 in byte-level BPE) is held back
        until it is complete, so no piece ends in a broken character.

        Example:
            >>> for piece in tok.decode_stream(generated_ids):
            ...     print(piece, end="", flush=True)
        """
        stream = self.stream_decoder(skip_special_tokens=skip_special_tokens)
        for i in ids:
            piece = stream.step(int(i))
            if piece:
                yield piece
        rest = stream.flush()
        if rest:
            yield rest

    def stream_decoder(self, *, skip_special_tokens: bool = False) -> StreamDecoder:
        """A fresh incremental decoder (`step(id) -> new text`), for decoding inside a loop."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # -- chat ----------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render a conversation with the chat template (as Transformers' `apply_chat_template(tokenize=False)`).

        Arguments:
            messages: [{"role": "system" | "user" | "assistant", "content": str}, ...].
            add_generation_prompt: end with the header of an assistant turn, ready to generate.
            chat_template: use this template instead of the tokenizer's.
            tools, documents, **kwargs: passed to the template, like the special tokens
                (`bos_token`, `eos_token`, ...).

        Returns:
            The prompt string; encode it with `add_special_tokens=False`.

        Raises:
            TokenizerError: no chat template, messages that are not role/content mappings, or an
                error the template raises (`raise_exception`).
            ImportError: jinja2 is not installed.
        """
        template = chat_template or self.chat_template
        if template is None:
            raise TokenizerError(
                f"{self.source or 'tokenizer'}: has no chat template; pass chat_template= to apply_chat_template"
            )
        if isinstance(messages, Mapping) or not all(isinstance(m, Mapping) and "role" in m for m in messages):
            raise TokenizerError(
                "apply_chat_template: messages must be a list of {'role': ..., 'content': ...} mappings"
            )
        jinja2 = _jinja2()
        specials = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
        }
        try:
            return _compile(template, jinja2).render(
                messages=[dict(m) for m in messages],
                tools=None if tools is None else [dict(t) for t in tools],
                documents=None if documents is None else [dict(d) for d in documents],
                add_generation_prompt=add_generation_prompt,
                **{**{k: v for k, v in specials.items() if v is not None}, **kwargs},
            )
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"{self.source or 'tokenizer'}: chat template error: {exc}") from None

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.source!r}, vocab={self.vocab_size}, bos={self.bos_token!r}, "
            f"eos={self.eos_token!r}, chat_template={'yes' if self.chat_template else 'no'})"
        )


class StreamDecoder:
    """Incremental decoding: feed ids one at a time, get back the text they complete.

    Keeps a short window of ids: it decodes the window with and without the newest ids and
    emits the difference once it no longer ends in U+FFFD (a character still missing bytes).
    The window then moves on, so each step costs O(window), not O(text).
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # ids before this are already emitted

    def step(self, token_id: int) -> str:
        """Add one id; return the newly completed text ("" when it completes none yet)."""
        self._ids.append(int(token_id))
        decode = self._tokenizer.decode
        before = decode(self._ids[self._prefix : self._read], skip_special_tokens=self._skip)
        after = decode(self._ids[self._prefix :], skip_special_tokens=self._skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever text is still held back (an incomplete character decodes as U+FFFD)."""
        decode = self._tokenizer.decode
        before = decode(self._ids[self._prefix : self._read], skip_special_tokens=self._skip)
        after = decode(self._ids[self._prefix :], skip_special_tokens=self._skip)
        self._prefix = self._read = len(self._ids)
        return after[len(before) :]


# --------------------------------------------------------------------------- helpers


def _as_ids(ids: Iterable[int]) -> list[int]:
    if hasattr(ids, "tolist"):  # a tensor or an array
        ids = ids.tolist()
    out = list(ids)
    if out and isinstance(out[0], list):
        raise ArgumentTypeError(
            "Tokenizer.decode: expected one sequence of ids, got a batch; decode each row"
        )
    return [int(i) for i in out]


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def _pre_tokenizer(pre: str, path: str, pre_tokenizers: Any, normalizers: Any) -> tuple[Any, Any]:
    """(pre-tokenizer, normalizer or None) for llama.cpp's `tokenizer.ggml.pre` name."""
    from tokenizers import Regex

    if pre in _DIGITS_THEN_GPT2:
        return (
            pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
                ]
            ),
            None,
        )
    if pre in _LLAMA3 or pre in _QWEN2:
        regex = _LLAMA3_REGEX if pre in _LLAMA3 else _QWEN2_REGEX
        split = pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        return pre_tokenizers.Sequence([split, byte_level]), normalizers.NFC() if pre in _QWEN2 else None
    if pre not in _GPT2:
        import logging

        logging.getLogger("fmodel").warning(
            "%s: tokenizer.ggml.pre is %r, which fmodel does not know; using GPT-2's pre-tokenizer "
            "(as Transformers does), which may split some text differently from llama.cpp",
            path,
            pre,
        )
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), None


def _jinja2() -> Any:
    try:
        import jinja2
        import jinja2.sandbox
    except ImportError:
        raise ImportError(
            f"chat templates are rendered with jinja2: {INSTALL_HINT} (or pip install jinja2)"
        ) from None
    return jinja2


def _generation_extension(jinja2: Any) -> type:
    """`{% generation %}...{% endgeneration %}` (Transformers marks assistant text with it): renders the body."""
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}  # noqa: RUF012 (jinja's API)

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    return Generation


def _compile(template: str, jinja2: Any) -> Any:
    """The template compiled in a sandbox with Transformers' filters and globals."""

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: Any = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_generation_extension(jinja2), "jinja2.ext.loopcontrols"],
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)
