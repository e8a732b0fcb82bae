"""Architecture families. Importing this package registers every built-in ArchSpec."""

# Each family module registers its ArchSpecs on import (one line per family).
from . import bert  # noqa: F401
from . import gpt2  # noqa: F401
from . import llama  # noqa: F401
from .spec import ARCHITECTURES, ArchSpec, HeadLayout, get_spec, register_architecture, specs_for_model_type

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "HeadLayout",
    "get_spec",
    "register_architecture",
    "specs_for_model_type",
]
