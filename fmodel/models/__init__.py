"""Architecture families. Importing this package registers every built-in ArchSpec."""

from . import llama  # noqa: F401  (registers the Llama-family specs)
from .spec import ARCHITECTURES, ArchSpec, HeadLayout, get_spec, register_architecture, specs_for_model_type

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "HeadLayout",
    "get_spec",
    "register_architecture",
    "specs_for_model_type",
]
