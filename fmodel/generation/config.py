"""`GenerationConfig`: decoding defaults as a frozen value, read from `generation_config.json`.

It lives beside the `ModelState`, not in it, as in Transformers (a checkpoint's
`generation_config.json` is a separate file with a separate class): load it with
`load_generation_config(path)` and pass it to `fmodel.generate(..., generation_config=...)`;
without one, `generate` derives it from the model config's token ids
(`GenerationConfig.from_model_config`). The facade keeps the one its checkpoint came with.

Only the fields fmodel's `generate` implements are modelled (greedy, multinomial sampling,
beam search and beam sampling, the output flags); every other key of the file is kept in
`extra` (so the value writes back unchanged) and ignored, with a warning from `generate` when
it is set to a non-neutral value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import attrs

from .._checks import describe
from .._frozen import FrozenDict, freeze, thaw
from ..errors import ArgumentTypeError, ConfigError

__all__ = ["GENERATION_CONFIG_NAME", "GenerationConfig", "load_generation_config"]

GENERATION_CONFIG_NAME = "generation_config.json"

# Keys of generation_config.json that change nothing about which tokens come out.
_INERT = frozenset(
    {
        "transformers_version",
        "_from_model_config",
        "cache_implementation",
        "cache_config",
        "output_attentions",
        "output_hidden_states",
        "return_legacy_cache",
        "disable_compile",
        "compile_config",
        "decoder_start_token_id",
    }
)


def _token_ids(value: Any) -> int | tuple[int, ...] | None:
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return value


def _check_early_stopping(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value not in (True, False, "never") or (value != "never" and not isinstance(value, bool)):
        raise ConfigError(
            f"GenerationConfig: 'early_stopping' must be true, false or \"never\", got {value!r}"
        )


def _check_token_ids(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    ids = value if isinstance(value, tuple) else (value,)
    if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ConfigError(
            f"GenerationConfig: field {attribute.name!r} must be an int, a list of ints or null, got {value!r}"
        )


@attrs.frozen(kw_only=True)
class GenerationConfig:
    """Decoding defaults, with Transformers' field names and defaults (`GenerationConfig()` of 4.57).

    Attributes:
        max_length: prompt + new tokens, used when `max_new_tokens` is None (default 20).
        max_new_tokens: new tokens to generate at most (wins over `max_length`).
        min_length / min_new_tokens: EOS is forbidden until the sequence / the new part is that long.
        do_sample: multinomial sampling instead of greedy argmax.
        temperature, top_k, top_p: sampling warpers (only used when `do_sample`); top_k 0 or
            None and top_p 1.0 turn theirs off. Note top_k defaults to 50, as in Transformers.
        repetition_penalty: > 1 discourages tokens already present (1.0 = off).
        num_beams: beams for beam search (1 = greedy / sampling); with `do_sample`, beam sampling.
        num_return_sequences: rows returned per prompt (the best beams; or independent samples).
        length_penalty: beam scores are divided by (new length) ** length_penalty.
        early_stopping: beam search stops a prompt once `num_beams` hypotheses are finished
            (True), when no better one seems possible (False, a heuristic), or only when no
            better one is possible at all ("never"), as Transformers.
        use_cache: decode with the KV cache (False recomputes the whole sequence each step).
        return_dict_in_generate, output_scores, output_logits: what `generate` returns.
        bos_token_id, eos_token_id (an int or a tuple of ints), pad_token_id: special tokens.
        extra: every other key of generation_config.json, kept and ignored.
    """

    max_length: int = 20
    max_new_tokens: int | None = None
    min_length: int = 0
    min_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float | None = 1.0
    top_k: int | None = 50
    top_p: float | None = 1.0
    repetition_penalty: float | None = 1.0
    num_beams: int = 1
    num_return_sequences: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = attrs.field(default=False, validator=_check_early_stopping)
    use_cache: bool = True
    return_dict_in_generate: bool = False
    output_scores: bool = False
    output_logits: bool | None = None
    bos_token_id: int | None = attrs.field(default=None, converter=_token_ids, validator=_check_token_ids)
    eos_token_id: int | tuple[int, ...] | None = attrs.field(
        default=None, converter=_token_ids, validator=_check_token_ids
    )
    pad_token_id: int | None = attrs.field(default=None, converter=_token_ids, validator=_check_token_ids)
    extra: FrozenDict = attrs.field(factory=FrozenDict, converter=freeze, repr=False)

    def __attrs_post_init__(self) -> None:
        for name in ("max_length", "min_length", "num_beams", "num_return_sequences"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"GenerationConfig: field {name!r} must be an integer >= 0, got {value!r}")
        if not isinstance(self.length_penalty, (int, float)) or isinstance(self.length_penalty, bool):
            raise ConfigError(
                f"GenerationConfig: 'length_penalty' must be a number, got {self.length_penalty!r}"
            )
        for name in ("max_new_tokens", "min_new_tokens", "top_k"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ConfigError(
                    f"GenerationConfig: field {name!r} must be an integer >= 0 or null, got {value!r}"
                )
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise ConfigError(f"GenerationConfig: {name!r} must be a number or null, got {value!r:.80}")
        if self.output_logits is not None and not isinstance(self.output_logits, bool):
            raise ConfigError(
                f"GenerationConfig: 'output_logits' must be true, false or null, got {self.output_logits!r:.80}"
            )
        if self.temperature is not None and not self.temperature > 0:
            raise ConfigError(f"GenerationConfig: 'temperature' must be > 0, got {self.temperature!r}")
        if self.top_p is not None and not 0 <= self.top_p <= 1:
            raise ConfigError(f"GenerationConfig: 'top_p' must be in [0, 1], got {self.top_p!r}")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise ConfigError(
                f"GenerationConfig: 'repetition_penalty' must be > 0, got {self.repetition_penalty!r}"
            )
        for name in ("do_sample", "use_cache", "return_dict_in_generate", "output_scores"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"GenerationConfig: {name!r} must be true or false, got {getattr(self, name)!r}"
                )

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The EOS ids as a tuple (empty when there is none)."""
        eos = self.eos_token_id
        return () if eos is None else eos if isinstance(eos, tuple) else (eos,)

    def ignored_fields(self) -> dict[str, Any]:
        """The `extra` keys set to a value that would change Transformers' output (not None,
        False, 0 or 1): what fmodel's `generate` does not implement and ignores."""
        return {
            k: v
            for k, v in self.extra.items()
            if k not in _INERT and v not in (None, False, 0, 1)  # 0.0 == 0, 1.0 == 1
        }

    # -- building ---------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "generation config") -> GenerationConfig:
        """From a generation_config.json dict; unknown keys go to `extra`.

        Raises:
            ArgumentTypeError: `data` is not a mapping.
            ConfigError: a modelled field has a bad value (names `source` and the field).
        """
        if not isinstance(data, Mapping):
            raise ArgumentTypeError(
                f"GenerationConfig.from_dict(data) must be a mapping, got {describe(data)}"
            )
        fields = {f.name for f in attrs.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in fields}
        for key in (
            "max_length",
            "min_length",
            "num_beams",
            "num_return_sequences",
            "length_penalty",
            "use_cache",
            "return_dict_in_generate",
            "output_scores",
        ):
            if known.get(key, 0) is None:
                known.pop(key)  # null means "the default" for these
        extra = {k: v for k, v in data.items() if k not in fields}
        try:
            return cls(**known, extra=extra)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_model_config(cls, config) -> GenerationConfig:
        """What Transformers' `GenerationConfig.from_model_config` gives: the model config's
        bos/eos/pad ids, plus generation keys a legacy config.json carries (`max_length`, ...)."""
        fields = {f.name for f in attrs.fields(cls)} - {"extra"}
        data: dict[str, Any] = {k: v for k, v in thaw(getattr(config, "extra", {})).items() if k in fields}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(config, key, None)
            if value is not None:
                data[key] = value
        data = {k: v for k, v in data.items() if v is not None}
        return cls.from_dict(data, source=f"{type(config).__name__}")

    def replace(self, **changes: Any) -> GenerationConfig:
        """A new config with `changes` (field names); this one is unchanged.

        Raises:
            ArgumentTypeError: (a TypeError) a name that is not a field.
            ConfigError: a bad value (names the field).
        """
        unknown = set(changes) - {f.name for f in attrs.fields(type(self))}
        if unknown:
            raise ArgumentTypeError(f"GenerationConfig has no field(s) {sorted(unknown)}")
        return attrs.evolve(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The generation_config.json dict: fields that differ from the defaults, plus `extra`."""
        out = thaw(self.extra)
        default = GenerationConfig()
        for f in attrs.fields(type(self)):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value != getattr(default, f.name):
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def load_generation_config(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> GenerationConfig:
    """The checkpoint's `generation_config.json`, or, when it has none, the defaults derived
    from its config.json (`GenerationConfig.from_model_config`), as Transformers does.

    Arguments:
        path_or_repo_id: a checkpoint folder or a hub repo id (read through huggingface_hub's
            cache; `revision`, `cache_dir`, `local_files_only` as in `fmodel.load`).

    Returns:
        A `GenerationConfig`; nothing is written.

    Raises:
        ArgumentTypeError: `path_or_repo_id` is not a str or path.
        ConfigError: a file is not valid JSON or has a bad value (the message names it).
        CheckpointError: neither file can be found.

    Example:
        >>> gen = fmodel.load_generation_config("path/to/checkpoint")
        >>> fmodel.generate(state, ids, generation_config=gen, max_new_tokens=20)
    """
    if not isinstance(path_or_repo_id, (str, os.PathLike)):
        raise ArgumentTypeError(
            f"load_generation_config(path_or_repo_id) must be a folder or a hub repo id (str), "
            f"got {describe(path_or_repo_id)}"
        )
    path = os.fspath(path_or_repo_id)
    if not isinstance(path, str):
        raise ArgumentTypeError(
            f"load_generation_config(path_or_repo_id) must be a str path, got {describe(path)}"
        )
    gen_file = _find(path, GENERATION_CONFIG_NAME, revision, cache_dir, local_files_only)
    if gen_file is not None:
        return GenerationConfig.from_dict(_read_json(gen_file), source=gen_file)
    from ..config import load_config
    from ..io.resolve import resolve_checkpoint

    if os.path.isdir(path):
        return GenerationConfig.from_model_config(load_config(path))
    files = resolve_checkpoint(
        path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
    )
    return GenerationConfig.from_model_config(load_config(files.config))


def _find(path: str, name: str, revision, cache_dir, local_files_only) -> str | None:
    if os.path.isdir(path):
        candidate = os.path.join(path, name)
        return candidate if os.path.isfile(candidate) else None
    from ..errors import CheckpointError
    from ..io.hub_fetch import HubFetcher  # one probe, no hidden retries on a dead network

    try:
        hub = HubFetcher(path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
        return hub.fetch(name)
    except CheckpointError:  # not a repo, no network: let the config.json lookup say what is wrong
        return None


def _read_json(path: str) -> dict[str, Any]:
    # strict JSON, UTF-8, bounded size and depth, an object at the top (fmodel.config.json_file)
    from ..config.json_file import read_json_object

    return read_json_object(path, what="generation config")
