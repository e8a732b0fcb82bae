"""Checkpoint names -> state names: legacy renames and Transformers' base-prefix rule."""

from __future__ import annotations

__all__ = ["map_keys"]


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
