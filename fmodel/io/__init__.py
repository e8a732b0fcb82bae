"""Pure checkpoint I/O: Hugging Face folders and hub ids in, folders out."""

from .load import LoadReport, load, load_with_report, resolve_dtype, state_from_tensors
from .resolve import CheckpointFiles, resolve_checkpoint
from .save import checkpoint_tensors, save

__all__ = [
    "CheckpointFiles",
    "LoadReport",
    "checkpoint_tensors",
    "load",
    "load_with_report",
    "resolve_checkpoint",
    "resolve_dtype",
    "save",
    "state_from_tensors",
]
