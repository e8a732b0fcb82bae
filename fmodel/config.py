"""Frozen, hashable model configs that read and write Hugging Face `config.json` losslessly.

A config class lists the fields fmodel models, with Transformers' names and defaults.
Every other key of the source `config.json` is kept verbatim in `extra`, and the keys the
source spelled out are remembered in `given`, so `Config.from_dict(d).to_dict() == d`.

Both rope spellings load: Transformers 4 (`rope_theta` + `rope_scaling`) and
Transformers 5 (`rope_parameters`, which carries `rope_theta` inside); a config is
written back in the spelling it was read in.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import attrs

from ._frozen import FrozenDict, freeze, thaw
from .errors import ConfigError, UnknownArchitectureError

__all__ = [
    "CONFIG_CLASSES",
    "DecoderConfig",
    "LlamaConfig",
    "MistralConfig",
    "Qwen2Config",
    "config_from_dict",
    "load_config",
    "register_config",
]

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
_ROPE_REQUIRED = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
# Keys fmodel computes or tracks itself and never treats as modelled fields.
_BOOKKEEPING = ("extra", "given", "rope_spelling")


# --------------------------------------------------------------------------- field kinds


def _checker(kind: str, accept: Callable[[Any], bool], nullable: bool) -> Callable:
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is None and nullable:
            return
        if not accept(value):
            raise ConfigError(
                f"{type(instance).__name__}: field {attribute.name!r} expected {kind}"
                f"{' or null' if nullable else ''}, got {value!r} ({type(value).__name__})"
            )

    return check


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_float(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _to_float(v: Any) -> Any:
    return float(v) if _is_float(v) else v


def int_field(default: Any, *, nullable: bool = False, positive: bool = True) -> Any:
    accept = (lambda v: _is_int(v) and v > 0) if positive else _is_int
    kind = "a positive integer" if positive else "an integer"
    return attrs.field(default=default, validator=_checker(kind, accept, nullable))


def float_field(default: Any, *, nullable: bool = False) -> Any:
    return attrs.field(
        default=default,
        converter=_to_float,
        validator=_checker("a finite number", lambda v: isinstance(v, float), nullable),
    )


def bool_field(default: bool) -> Any:
    return attrs.field(
        default=default, validator=_checker("true or false", lambda v: isinstance(v, bool), False)
    )


def str_field(default: Any, *, nullable: bool = False) -> Any:
    return attrs.field(
        default=default, validator=_checker("a string", lambda v: isinstance(v, str), nullable)
    )


def token_id_field(default: Any) -> Any:
    """A token id, a list of token ids, or null."""

    def accept(v: Any) -> bool:
        return _is_int(v) or (isinstance(v, tuple) and all(_is_int(x) for x in v))

    return attrs.field(
        default=default, converter=freeze, validator=_checker("a token id or list of ids", accept, True)
    )


def frozen_field(
    default: Any = None, *, kind: str = "a mapping", accept: Callable[[Any], bool] | None = None
) -> Any:
    accept = accept or (lambda v: isinstance(v, FrozenDict))
    return attrs.field(default=default, converter=freeze, validator=_checker(kind, accept, True))


# --------------------------------------------------------------------------- base


C = TypeVar("C", bound="DecoderConfig")


@attrs.frozen(kw_only=True)
class DecoderConfig:
    """Fields shared by the rotary decoder families (Llama, Qwen2, Mistral).

    Configs are frozen and hashable: they key the cache of skeleton modules.
    Build one with `SomeConfig(...)`, from a dict with `config_from_dict`, or from a
    folder with `load_config`; derive a changed one with `config.replace(field=value)`.
    """

    model_type: ClassVar[str] = ""

    vocab_size: int = int_field(32000)
    hidden_size: int = int_field(4096)
    intermediate_size: int = int_field(11008)
    num_hidden_layers: int = int_field(32)
    num_attention_heads: int = int_field(32)
    num_key_value_heads: int | None = int_field(None, nullable=True)
    head_dim: int | None = int_field(None, nullable=True)
    hidden_act: str = str_field("silu")
    max_position_embeddings: int = int_field(2048)
    initializer_range: float = float_field(0.02)
    rms_norm_eps: float = float_field(1e-6)
    tie_word_embeddings: bool = bool_field(False)
    rope_theta: float = float_field(10000.0)
    rope_scaling: FrozenDict | None = frozen_field(None)
    attention_dropout: float = float_field(0.0)
    pad_token_id: Any = token_id_field(None)
    bos_token_id: Any = token_id_field(1)
    eos_token_id: Any = token_id_field(2)
    architectures: tuple[str, ...] | None = frozen_field(
        None,
        kind="a list of class names",
        accept=lambda v: isinstance(v, tuple) and all(isinstance(x, str) for x in v),
    )

    # Bookkeeping for a lossless round trip (not Transformers fields).
    extra: FrozenDict = attrs.field(factory=FrozenDict, converter=freeze, repr=False)
    given: frozenset = attrs.field(factory=frozenset, converter=frozenset, repr=False)
    rope_spelling: str = attrs.field(default="rope_scaling", repr=False)

    def __attrs_post_init__(self) -> None:
        self._validate()

    # -- derived values -------------------------------------------------------------

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (`num_key_value_heads`, defaulting to the query heads)."""
        return self.num_key_value_heads if self.num_key_value_heads is not None else self.num_attention_heads

    @property
    def head_size(self) -> int:
        """Per-head width: `head_dim` when set, else `hidden_size // num_attention_heads`."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def qkv_bias(self) -> bool:
        return False

    @property
    def o_bias(self) -> bool:
        return False

    @property
    def mlp_has_bias(self) -> bool:
        return False

    def layer_sliding_window(self, layer_idx: int) -> int | None:
        """The sliding-window width of layer `layer_idx`, or None for full causal attention."""
        return None

    # -- validation -------------------------------------------------------------------

    def _validate(self) -> None:
        name = type(self).__name__
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"{name}: field 'hidden_size' ({self.hidden_size}) must be divisible by "
                f"'num_attention_heads' ({self.num_attention_heads}) when 'head_dim' is not set"
            )
        if self.num_attention_heads % self.kv_heads:
            raise ConfigError(
                f"{name}: field 'num_key_value_heads' ({self.kv_heads}) must divide "
                f"'num_attention_heads' ({self.num_attention_heads})"
            )
        if self.head_size % 2:
            raise ConfigError(
                f"{name}: rotary embeddings need an even head size, got head size {self.head_size}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ConfigError(
                f"{name}: field 'hidden_act' is {self.hidden_act!r}; fmodel implements {sorted(_ACTIVATIONS)}"
            )
        self._validate_rope()

    def _validate_rope(self) -> None:
        where = "rope_parameters" if self.rope_spelling == "rope_parameters" else "rope_scaling"
        rope_type = self.rope_type
        if rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"{type(self).__name__}: field '{where}.rope_type' is {rope_type!r}; expected one of {ROPE_TYPES}"
            )
        for key in _ROPE_REQUIRED.get(rope_type, ()):
            value = self.rope_scaling.get(key)
            if not _is_float(value) or value <= 0:
                raise ConfigError(
                    f"{type(self).__name__}: rope type {rope_type!r} needs a positive number in field "
                    f"'{where}.{key}', got {value!r}"
                )

    # -- (de)serialisation -------------------------------------------------------------

    @classmethod
    def modelled_keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in attrs.fields(cls) if f.name not in _BOOKKEEPING)

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """Build a config from a `config.json` dict. Unknown keys go to `extra` unchanged.

        Raises:
            ConfigError: a modelled field has the wrong type or an inconsistent value.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        spelling = "rope_scaling"
        if "rope_parameters" in data:
            params = data.pop("rope_parameters")
            if not isinstance(params, Mapping):
                raise ConfigError(
                    f"{cls.__name__}: field 'rope_parameters' expected a mapping, got {params!r}"
                )
            params = dict(params)
            spelling = "rope_parameters"
            if "rope_theta" in params:
                data["rope_theta"] = params.pop("rope_theta")
            data["rope_scaling"] = params
        modelled = set(cls.modelled_keys())
        known = {k: v for k, v in data.items() if k in modelled}
        extra = {k: v for k, v in data.items() if k not in modelled and k != "model_type"}
        try:
            return cls(**known, extra=extra, given=frozenset(known), rope_spelling=spelling)
        except TypeError as exc:  # a converter choked on a value
            raise ConfigError(f"{cls.__name__}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """The `config.json` dict: the source's keys (modelled ones with current values), plus
        every modelled field that differs from its default. JSON-ready (lists, dicts)."""
        out: dict[str, Any] = thaw(self.extra)
        defaults = {f.name: f.default for f in attrs.fields(type(self))}
        for key in self.modelled_keys():
            value = getattr(self, key)
            if key in self.given or freeze(value) != freeze(defaults[key]):
                out[key] = thaw(value)
        out["model_type"] = self.model_type
        if self.rope_spelling == "rope_parameters":
            params = thaw(self.rope_scaling) if self.rope_scaling else {"rope_type": "default"}
            params["rope_theta"] = out.pop("rope_theta", self.rope_theta)
            out.pop("rope_scaling", None)
            out["rope_parameters"] = params
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def replace(self: C, **changes: Any) -> C:
        """A copy with `changes` applied; changed fields are written by `to_dict`."""
        given = self.given | {k for k in changes if k in self.modelled_keys()}
        return attrs.evolve(self, given=given, **changes)


_ACTIVATIONS = {"silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "tanh"}


@attrs.frozen(kw_only=True)
class LlamaConfig(DecoderConfig):
    """Llama (`model_type: llama`), defaults as Transformers' `LlamaConfig`."""

    model_type: ClassVar[str] = "llama"

    attention_bias: bool = bool_field(False)
    mlp_bias: bool = bool_field(False)

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias

    @property
    def mlp_has_bias(self) -> bool:
        return self.mlp_bias


@attrs.frozen(kw_only=True)
class MistralConfig(DecoderConfig):
    """Mistral (`model_type: mistral`): sliding-window attention on every layer."""

    model_type: ClassVar[str] = "mistral"

    intermediate_size: int = int_field(14336)
    num_key_value_heads: int | None = int_field(8, nullable=True)
    max_position_embeddings: int = int_field(4096 * 32)
    sliding_window: int | None = int_field(4096, nullable=True)

    def layer_sliding_window(self, layer_idx: int) -> int | None:
        return self.sliding_window


@attrs.frozen(kw_only=True)
class Qwen2Config(DecoderConfig):
    """Qwen2 (`model_type: qwen2`): bias on q/k/v, optional sliding window per `layer_types`."""

    model_type: ClassVar[str] = "qwen2"

    vocab_size: int = int_field(151936)
    intermediate_size: int = int_field(22016)
    num_key_value_heads: int | None = int_field(32, nullable=True)
    max_position_embeddings: int = int_field(32768)
    bos_token_id: Any = token_id_field(None)
    eos_token_id: Any = token_id_field(None)
    use_sliding_window: bool = bool_field(False)
    sliding_window: int | None = int_field(4096, nullable=True)
    max_window_layers: int = int_field(28, positive=False)
    layer_types: tuple[str, ...] | None = frozen_field(
        None,
        kind="a list of 'full_attention' / 'sliding_attention'",
        accept=lambda v: (
            isinstance(v, tuple) and all(x in ("full_attention", "sliding_attention") for x in v)
        ),
    )

    def _validate(self) -> None:
        super()._validate()
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"Qwen2Config: field 'layer_types' has {len(self.layer_types)} entries, "
                f"expected num_hidden_layers={self.num_hidden_layers}"
            )

    @property
    def qkv_bias(self) -> bool:
        return True

    def layer_sliding_window(self, layer_idx: int) -> int | None:
        # As Transformers: the window applies only when use_sliding_window is on, and then to the
        # layers `layer_types` marks as sliding (by default those at index >= max_window_layers).
        if not self.use_sliding_window or self.sliding_window is None:
            return None
        if self.layer_types is not None:
            sliding = self.layer_types[layer_idx] == "sliding_attention"
        else:
            sliding = layer_idx >= self.max_window_layers
        return self.sliding_window if sliding else None


# --------------------------------------------------------------------------- registry

CONFIG_CLASSES: dict[str, type] = {}


def register_config(cls: type) -> type:
    """Register a config class under its `model_type` (usable as a decorator)."""
    CONFIG_CLASSES[cls.model_type] = cls
    return cls


for _cls in (LlamaConfig, MistralConfig, Qwen2Config):
    register_config(_cls)


def config_from_dict(data: Mapping[str, Any], *, source: str = "config") -> Any:
    """Pick the config class by `model_type` and build it.

    Raises:
        ConfigError: `model_type` is missing, or a field is bad (the message names `source`).
        UnknownArchitectureError: `model_type` is not one fmodel implements.
    """
    if not isinstance(data, Mapping) or "model_type" not in data:
        raise ConfigError(f"{source}: missing field 'model_type' (one of {sorted(CONFIG_CLASSES)})")
    model_type = data["model_type"]
    cls = CONFIG_CLASSES.get(model_type)
    if cls is None:
        raise UnknownArchitectureError(
            f"{source}: model_type {model_type!r} is not implemented; fmodel knows {sorted(CONFIG_CLASSES)}"
        )
    try:
        return cls.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(path: str | os.PathLike) -> Any:
    """Read a `config.json` file (or the one inside a folder).

    Raises:
        ConfigError: the file is missing, is not JSON, or holds a bad field.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    return config_from_dict(data, source=path)
