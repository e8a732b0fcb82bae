"""Checkpoint names -> state names (legacy renames and Transformers' base-prefix rule), and
the architecture a config loads as by default."""

from __future__ import annotations

from ..models import specs_for_model_type

__all__ = ["default_architecture", "map_keys"]


def map_keys(spec, names, expected) -> tuple[dict[str, str], list[tuple[str, str]], list[str]]:
    """{checkpoint name: state name} after legacy renames and the base-prefix rule of Transformers:
    a head checkpoint loaded as the base model loses the prefix (its head tensors are unused);
    a base checkpoint loaded into a head class gains it."""
    prefix = spec.prefix + "."
    renamed: list[tuple[str, str]] = []
    unused: list[str] = []
    mapping: dict[str, str] = {}
    for name in names:
        new = spec.rename_key(name)
        if new != name:
            renamed.append((name, new))
        mapping[name] = new
    has_prefix = any(n.startswith(prefix) for n in mapping.values())
    wants_prefix = any(n.startswith(prefix) for n in expected)
    if has_prefix and not wants_prefix:
        for name, new in list(mapping.items()):
            if new.startswith(prefix):
                mapping[name] = new[len(prefix) :]
                renamed.append((name, mapping[name]))
            else:
                del mapping[name]
                unused.append(name)
    elif wants_prefix and not has_prefix:
        for name, new in mapping.items():
            mapping[name] = prefix + new
            renamed.append((name, mapping[name]))
    return mapping, renamed, unused


def default_architecture(config) -> str:
    """`architectures[0]` of the config, else the family's causal-LM class, else its base."""
    if config.architectures:
        return config.architectures[0]
    specs = specs_for_model_type(config.model_type)
    heads = [s for s in specs if s.output == "causal_lm"]
    return (heads or specs)[0].name
