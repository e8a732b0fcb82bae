"""The config machinery: typed field helpers, `BaseConfig` (lossless config.json round trip),
and the `model_type` registry."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import attrs

from .._frozen import FrozenDict, freeze, thaw
from ..errors import ArgumentTypeError, ConfigError, UnknownArchitectureError
from .json_file import read_json_object

__all__ = ["CONFIG_CLASSES", "BaseConfig", "config_from_dict", "load_config", "register_config"]

# Activation names (Transformers' ACT2FN keys) that fmodel's families implement.
ACTIVATIONS = frozenset({"silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "tanh"})
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
                f"{' or null' if nullable else ''}, got {_short(value)} ({type(value).__name__})"
            )

    return check


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_float(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _to_float(v: Any) -> Any:
    return float(v) if _is_float(v) else v


# Upper bounds of the size fields, generous for real models (the largest public ones, 2025:
# vocabularies ~262k, hidden 16-26k, FFN ~53k, 126 layers, 128 heads, head_dim 256, 10M
# positions) and small enough that a mistyped or hostile config.json (vocab_size=2**64+1)
# is refused at once instead of reaching an allocator. Every other integer field is bounded
# by INT_MAX (what a 32-bit token id or window can hold).
VOCAB_MAX = 2**24
WIDTH_MAX = 2**20  # hidden_size / n_embd
FFN_MAX = 2**20  # intermediate_size / n_inner
LAYERS_MAX = 2**10  # num_hidden_layers / n_layer (also bounds the skeleton's build time: ~1 s)
HEADS_MAX = 2**12  # attention / key-value heads
HEAD_DIM_MAX = 2**14
POSITIONS_MAX = 2**24  # max_position_embeddings / n_positions
INT_MAX = 2**31 - 1


def _bound_name(n: int) -> str:
    exp = n.bit_length() - 1
    return f"2**{exp}" if n == 2**exp else (f"2**{exp + 1} - 1" if n == 2 ** (exp + 1) - 1 else str(n))


def _bounded_checker(kind: str, positive: bool, nullable: bool, maximum: int) -> Callable:
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is None and nullable:
            return
        if not _is_int(value) or (positive and value <= 0):
            raise ConfigError(
                f"{type(instance).__name__}: field {attribute.name!r} expected {kind}"
                f"{' or null' if nullable else ''}, got {_short(value)} ({type(value).__name__})"
            )
        if abs(value) > maximum:
            raise ConfigError(
                f"{type(instance).__name__}: field {attribute.name!r} is {_short(value)}, beyond the bound "
                f"{'' if positive else '+-'}{maximum} ({_bound_name(maximum)}) fmodel accepts for it"
            )

    return check


def _short(value: Any) -> str:
    """repr of a value for a message, cut short (a million-digit int must not be printed)."""
    if _is_int(value) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits (about 10**{int(value.bit_length() * 0.30103)})"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def int_field(default: Any, *, nullable: bool = False, positive: bool = True, maximum: int = INT_MAX) -> Any:
    """An integer field: positive unless `positive=False`, at most `maximum` in absolute value."""
    kind = "a positive integer" if positive else "an integer"
    return attrs.field(default=default, validator=_bounded_checker(kind, positive, nullable, maximum))


def float_field(default: Any, *, nullable: bool = False) -> Any:
    return attrs.field(
        default=default,
        converter=_to_float,
        validator=_checker("a finite number", lambda v: isinstance(v, float) and math.isfinite(v), nullable),
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


C = TypeVar("C", bound="BaseConfig")


def _pruned_heads(value: Any) -> FrozenDict:
    """JSON {"0": [1, 2]} -> FrozenDict {0: (1, 2)} (sorted, deduplicated)."""
    if value is None:
        return FrozenDict()
    if not isinstance(value, Mapping):
        return value  # the validator reports it
    try:
        return FrozenDict({int(k): tuple(sorted({int(h) for h in v})) for k, v in value.items()})
    except (TypeError, ValueError):
        return value


def _id2label(value: Any) -> Any:
    if isinstance(value, Mapping):
        try:
            return FrozenDict({int(k): v for k, v in value.items()})
        except (TypeError, ValueError):
            return value
    return value


@attrs.frozen(kw_only=True)
class BaseConfig:
    """Fields every model config has (Transformers' `PretrainedConfig` ones fmodel uses).

    Configs are frozen and hashable: they key the cache of skeleton modules.
    Build one with `SomeConfig(...)`, from a dict with `config_from_dict`, or from a
    folder with `load_config`; derive a changed one with `config.replace(field=value)`.
    `field_aliases` maps Transformers' generic names (`hidden_size`) to a family's own
    (`n_embd` for GPT-2); both read and `replace` accept either.
    """

    model_type: ClassVar[str] = ""
    field_aliases: ClassVar[Mapping[str, str]] = {}

    initializer_range: float = float_field(0.02)
    tie_word_embeddings: bool = bool_field(True)
    pad_token_id: Any = token_id_field(None)
    bos_token_id: Any = token_id_field(None)
    eos_token_id: Any = token_id_field(None)
    pruned_heads: FrozenDict = attrs.field(
        factory=FrozenDict,
        converter=_pruned_heads,
        validator=_checker("a mapping {layer: [heads]}", lambda v: isinstance(v, FrozenDict), False),
    )
    id2label: FrozenDict | None = attrs.field(
        default=None,
        converter=_id2label,
        validator=_checker("a mapping {index: label}", lambda v: isinstance(v, FrozenDict), True),
    )
    architectures: tuple[str, ...] | None = frozen_field(
        None,
        kind="a list of class names",
        accept=lambda v: isinstance(v, tuple) and all(isinstance(x, str) for x in v),
    )

    # Bookkeeping for a lossless round trip (not Transformers fields).
    extra: FrozenDict = attrs.field(factory=FrozenDict, converter=freeze, repr=False)
    given: frozenset = attrs.field(factory=frozenset, converter=frozenset, repr=False)

    def __attrs_post_init__(self) -> None:
        self._validate()

    def __getattr__(self, name: str) -> Any:
        alias = type(self).field_aliases.get(name)
        if alias is None:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}")
        return getattr(self, alias)

    def _validate(self) -> None:
        pass

    @property
    def num_labels(self) -> int:
        """Number of classifier labels: len(id2label), 2 when unset (as Transformers)."""
        return len(self.id2label) if self.id2label else 2

    # -- (de)serialisation -------------------------------------------------------------

    @classmethod
    def modelled_keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in attrs.fields(cls) if f.name not in _BOOKKEEPING)

    @classmethod
    def _read_json(cls, data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Family hook: rewrite a config.json dict into (field values, bookkeeping values)."""
        return data, {}

    def _write_json(self, out: dict[str, Any]) -> dict[str, Any]:
        """Family hook: the inverse of `_read_json`."""
        return out

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """Build a config from a `config.json` dict. Unknown keys go to `extra` unchanged.

        Raises:
            ConfigError: a modelled field has the wrong type or an inconsistent value.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
        data, bookkeeping = cls._read_json(dict(data))
        for alias, field in cls.field_aliases.items():
            # Transformers sets a generic name (`num_attention_heads`) after the family's own
            # (`n_head`) through its attribute_map, so the generic one wins, and the family's
            # name is what it writes back.
            if alias in data:
                data[field] = data.pop(alias)
        modelled = set(cls.modelled_keys())
        known = {k: v for k, v in data.items() if k in modelled}
        extra = {k: v for k, v in data.items() if k not in modelled and k != "model_type"}
        try:
            return cls(**known, extra=extra, given=frozenset(known), **bookkeeping)
        except TypeError as exc:  # a converter choked on a value
            raise ConfigError(f"{cls.__name__}: {exc}") from exc
        except RecursionError:  # freezing a value nested thousands deep
            raise ConfigError(f"{cls.__name__}: a value is nested too deeply for a config") from None

    def to_diff_dict(self) -> dict[str, Any]:
        """The `config.json` dict: the source's keys (modelled ones with current values), plus
        every modelled field that differs from its default. JSON-ready (lists, dicts).
        Lossless: `config_from_dict(d).to_diff_dict() == d`, except that a generic alias key
        (`field_aliases`) comes back under the family's own name, as Transformers writes it."""
        return self._json_dict(full=False)

    def to_dict(self) -> dict[str, Any]:
        """Every field, defaults included, plus the source's unknown keys (as Transformers'
        `PretrainedConfig.to_dict`); JSON-ready. `to_diff_dict` is what config.json holds."""
        return self._json_dict(full=True)

    def _json_dict(self, *, full: bool) -> dict[str, Any]:
        out: dict[str, Any] = thaw(self.extra)
        for field in attrs.fields(type(self)):
            key = field.name
            if key in _BOOKKEEPING:
                continue
            value = getattr(self, key)
            default = field.default.factory() if isinstance(field.default, attrs.Factory) else field.default
            if full or key in self.given or freeze(value) != freeze(default):
                out[key] = _json_value(value)
        out["model_type"] = self.model_type
        return self._write_json(out)

    def to_json_string(self, use_diff: bool = True) -> str:
        data = self.to_diff_dict() if use_diff else self.to_dict()
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def replace(self: C, **changes: Any) -> C:
        """A copy with `changes` applied (generic names like `hidden_size` accepted); changed
        fields are written by `to_dict`."""
        changes = {type(self).field_aliases.get(k, k): v for k, v in changes.items()}
        given = self.given | {k for k in changes if k in self.modelled_keys()}
        return attrs.evolve(self, given=given, **changes)


def _json_value(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k) if isinstance(k, int) else k: _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


# --------------------------------------------------------------------------- registry

CONFIG_CLASSES: dict[str, type] = {}


def register_config(cls: type) -> type:
    """Register a config class under its `model_type` (usable as a decorator)."""
    CONFIG_CLASSES[cls.model_type] = cls
    return cls


def config_from_dict(data: Mapping[str, Any], *, source: str = "config") -> Any:
    """Pick the config class by `model_type` and build it.

    Raises:
        ConfigError: `model_type` is missing, or a field is bad (the message names `source`).
        UnknownArchitectureError: `model_type` is not one fmodel implements.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: missing field 'model_type': a config must be a mapping (a JSON object) "
            f"with a 'model_type', got {type(data).__name__}"
        )
    if "model_type" not in data:
        raise ConfigError(f"{source}: missing field 'model_type' (one of {sorted(CONFIG_CLASSES)})")
    model_type = data["model_type"]
    if not isinstance(model_type, str):
        raise ConfigError(
            f"{source}: field 'model_type' expected a string (one of {sorted(CONFIG_CLASSES)}), "
            f"got {_short(model_type)} ({type(model_type).__name__})"
        )
    cls = CONFIG_CLASSES.get(model_type)
    if cls is None:
        raise UnknownArchitectureError(
            f"{source}: model_type {_short(model_type)} is not implemented; fmodel knows {sorted(CONFIG_CLASSES)}"
        )
    try:
        return cls.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(path: str | os.PathLike) -> Any:
    """Read a `config.json` file (or the one inside a folder).

    The file is read by the rules of `fmodel.config.json_file` (UTF-8, strict JSON, at most
    64 MiB, an object at the top level), and every field is typed and bounded.

    Raises:
        ArgumentTypeError: `path` is not a str or os.PathLike.
        ConfigError: the file is missing, is not strict JSON, or holds a bad field; the
            message names the file and the field.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentTypeError(f"load_config: path expected a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    data = read_json_object(path, what="config file")
    return config_from_dict(data, source=path)
