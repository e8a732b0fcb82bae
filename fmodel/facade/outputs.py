"""Transformers-shaped outputs: attribute, key and tuple access."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


class ModelOutput(OrderedDict):
    """An ordered mapping of the outputs that are not None, readable as attributes
    (`out.logits`), keys (`out["logits"]`) and positions (`out[0]`, `loss, logits = out[:2]`),
    like Transformers' `ModelOutput`. Missing fields read as None."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self.get(name)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self.values())
