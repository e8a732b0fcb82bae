"""Architecture families. Importing this package registers every built-in ArchSpec."""

from . import bert, gpt2, llama  # noqa: F401  (register the built-in specs)
from .spec import ARCHITECTURES, ArchSpec, HeadLayout, get_spec, register_architecture, specs_for_model_type

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "HeadLayout",
    "get_spec",
    "register_architecture",
    "specs_for_model_type",
]
