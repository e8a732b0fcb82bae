"""Pure checkpoint I/O: Hugging Face folders and hub ids in, folders out."""

from .generation_config import generation_config_from_model_config
from .gguf import load_gguf, read_gguf
from .load import LoadReport, load, load_with_report, resolve_dtype, state_from_tensors
from .push import push_to_hub
from .resolve import CheckpointFiles, resolve_checkpoint
from .save import checkpoint_tensors, save, tensors_to_save

__all__ = [
    "CheckpointFiles",
    "LoadReport",
    "checkpoint_tensors",
    "generation_config_from_model_config",
    "load",
    "load_gguf",
    "load_with_report",
    "push_to_hub",
    "read_gguf",
    "resolve_checkpoint",
    "resolve_dtype",
    "save",
    "state_from_tensors",
    "tensors_to_save",
]
