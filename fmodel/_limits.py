"""Refuse allocations a device cannot hold before trying them.

torch's allocator answers an impossible request (`torch.empty(10**12)`) with a RuntimeError
from deep inside a transform, or worse, starts paging. Callers that turn user input into a
size (a config field, a resize, `max_new_tokens`, a file's declared shape) check it here first
and raise a `SizeLimitError` that names the argument.
"""

from __future__ import annotations

import os

import torch

from .errors import SizeLimitError

__all__ = ["check_allocation", "device_memory_bytes", "format_bytes"]


def device_memory_bytes(device: torch.device | str | None = None) -> int | None:
    """The total memory of `device` in bytes: physical RAM for CPU (None device), the GPU's
    total for CUDA; None where there is no meaningful limit (meta) or it cannot be read."""
    device = torch.device("cpu" if device is None else device)
    if device.type == "meta":
        return None
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[1])
        except (RuntimeError, AssertionError):
            return None
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(n: int) -> str:
    """A size for messages: 4.0 TB, 512.0 MB, 96 B."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def check_allocation(nbytes: int, *, what: str, device: torch.device | str | None = None) -> None:
    """Raise `SizeLimitError` when `nbytes` exceeds the total memory of `device`.

    Arguments:
        nbytes: the size about to be allocated (may be astronomically large: plain int).
        what: names the argument or field responsible, e.g. "resize_token_embeddings(new_num_tokens=10**12)".
        device: where it would be allocated (None: CPU).

    Raises:
        SizeLimitError: `nbytes` > the device's total memory; the message says how much was
            asked, how much the device has, and `what`.
    """
    limit = device_memory_bytes(device)
    if limit is not None and nbytes > limit:
        where = "CPU RAM" if device is None or torch.device(device).type == "cpu" else str(device)
        raise SizeLimitError(
            f"{what} needs {format_bytes(nbytes)}, more than the {format_bytes(limit)} of {where}; "
            f"refused before allocating"
        )
