"""Where the facade uses Transformers, when it is installed, and why.

Some client code can only be satisfied by a real Transformers object, whatever the facade
implements: `Trainer._save` and PEFT's `target_modules="all-linear"` test
`isinstance(model, transformers.PreTrainedModel)` (else Trainer writes a bare state dict and
PEFT targets the LM head); pipelines test `isinstance(output, transformers.ModelOutput)` to move
outputs between devices. So, when `transformers` can be imported:

- a facade model is an instance of a subclass of its fmodel class and of
  `transformers.PreTrainedModel` (fmodel's methods come first in the MRO; Transformers' class
  only adds the base-class attributes clients read and methods fmodel does not define), made
  once per class at the first instantiation (`interop_class`), so `import fmodel` does not
  import Transformers;
- forward returns Transformers' output classes (`outputs.output_class`).

Nothing else depends on it: without Transformers (or with `FMODEL_NO_TRANSFORMERS=1`) the
facade is a plain `nn.Module` with fmodel's own output classes, and the functional core never
imports Transformers either way.
"""

from __future__ import annotations

import os
from types import ModuleType

__all__ = ["interop_class", "transformers_or_none"]


_FOUND: list[ModuleType | None] = []  # decided once per process (not a functools cache: dynamo warns)


def transformers_or_none() -> ModuleType | None:
    """`transformers` when it is importable and not disabled by `FMODEL_NO_TRANSFORMERS=1`."""
    if not _FOUND:
        found = None
        if os.environ.get("FMODEL_NO_TRANSFORMERS", "") in ("", "0"):
            try:
                import transformers
                import transformers.modeling_utils

                found = transformers
            except ImportError:
                pass
        _FOUND.append(found)
    return _FOUND[0]


_INTEROP: dict[type, type] = {}


def interop_class(cls: type) -> type:
    """`cls`, or (Transformers installed) a subclass of `cls` and `transformers.PreTrainedModel`
    with the same name; cached per class (a runtime cache: the same class every time)."""
    hf = transformers_or_none()
    if hf is None or issubclass(cls, hf.PreTrainedModel):
        return cls
    made = _INTEROP.get(cls)
    if made is None:
        made = type(
            cls.__name__,
            (cls, hf.PreTrainedModel),
            {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "_fmodel_class": cls},
        )
        _INTEROP[cls] = made
    return made
