"""The exceptions fmodel raises. Every message names the file, field or tensor involved,
what was found and what was expected."""

from __future__ import annotations

__all__ = [
    "AttentionUnavailableError",
    "CheckpointError",
    "ConfigError",
    "FModelError",
    "QuantizationError",
    "QuantizedDtypeError",
    "ShapeMismatchError",
    "UnknownArchitectureError",
    "UnsupportedOptionError",
]


class FModelError(Exception):
    """Base class of every error fmodel raises on bad input."""


class ConfigError(FModelError, ValueError):
    """A config (config.json or a config object) has a missing, ill-typed or inconsistent field."""


class CheckpointError(FModelError, OSError):
    """A checkpoint cannot be read or does not match the architecture: missing files,
    missing or unexpected tensors, unreadable index."""


class ShapeMismatchError(CheckpointError, ValueError):
    """A tensor has a different shape from the one the architecture expects."""


class UnknownArchitectureError(FModelError, KeyError):
    """A `model_type` or architecture class name fmodel does not implement."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class AttentionUnavailableError(FModelError, RuntimeError):
    """An attention implementation is unknown, or its package / hardware is missing."""


class QuantizationError(FModelError, ValueError):
    """A quantization request fmodel cannot honour: an unknown scheme, a bad group size, a
    layer that cannot be quantized, or a state that is (or is not) quantized when it must not be."""


class QuantizedDtypeError(QuantizationError, TypeError):
    """A dtype cast of a quantized model (`fmodel.to(state, dtype=...)`, `model.half()`, ...):
    its integer weights and scales have no meaning in another dtype. Dequantize first."""


class UnsupportedOptionError(FModelError, ValueError):
    """An option fmodel deliberately does not offer (e.g. assisted decoding); the message names it and
    the supported value."""
