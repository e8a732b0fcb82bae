"""Architecture families. Importing this package registers every built-in ArchSpec."""

# Each family module registers its ArchSpecs on import (one line per family).
from . import (
    bert,  # noqa: F401
    gemma,  # noqa: F401
    gpt2,  # noqa: F401
    llama,  # noqa: F401
    mixtral,  # noqa: F401
    olmo,  # noqa: F401
    phi3,  # noqa: F401
    qwen3,  # noqa: F401
    qwen3_moe,  # noqa: F401
    t5,  # noqa: F401
)
from .spec import ARCHITECTURES, ArchSpec, HeadLayout, get_spec, register_architecture, specs_for_model_type

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "HeadLayout",
    "get_spec",
    "register_architecture",
    "specs_for_model_type",
]
