"""The exceptions fmodel raises. Every message names the file, field or tensor involved,
what was found and what was expected."""

from __future__ import annotations

__all__ = [
    "ArgumentTypeError",
    "AttentionUnavailableError",
    "CheckpointDtypeError",
    "CheckpointError",
    "ConfigError",
    "CorruptFileError",
    "DistributedError",
    "FModelError",
    "HubUnavailableError",
    "InvalidArgumentError",
    "KernelBuildError",
    "MeshSizeError",
    "MissingDependencyError",
    "PlanDivisibilityError",
    "PlanError",
    "QuantizationError",
    "QuantizedDtypeError",
    "ShapeMismatchError",
    "SizeLimitError",
    "StateDistributedError",
    "TokenIdError",
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


class KernelBuildError(FModelError, RuntimeError):
    """fmodel's CPU kernel extension (`fmodel.kernels`) cannot be built or loaded on this machine
    (no C++ compiler, a failed compile, `FMODEL_KERNELS=0`); the message carries the reason.
    `fmodel.kernels.available()` says so without raising."""


class QuantizationError(FModelError, ValueError):
    """A quantization request fmodel cannot honour: an unknown scheme, a bad group size, a
    layer that cannot be quantized, or a state that is (or is not) quantized when it must not be."""


class QuantizedDtypeError(QuantizationError, TypeError):
    """A dtype cast of a quantized model (`fmodel.to(state, dtype=...)`, `model.half()`, ...):
    its integer weights and scales have no meaning in another dtype. Dequantize first."""


class UnsupportedOptionError(FModelError, ValueError):
    """An option fmodel deliberately does not offer (e.g. assisted decoding); the message names it and
    the supported value."""


class InvalidArgumentError(FModelError, ValueError):
    """An argument of a public function has a value it cannot take (a negative size, a dtype
    a model cannot be cast to, a device that does not exist); the message names the argument,
    what was given and what is accepted."""


class ArgumentTypeError(FModelError, TypeError):
    """An argument of a public function has the wrong type (a None, str or list where a
    `ModelState`, a mapping or a tensor belongs); the message names the argument and the type
    expected."""


class TokenIdError(InvalidArgumentError, IndexError):
    """A token id outside [0, vocab_size): the message says which id, where, and the size."""


class SizeLimitError(InvalidArgumentError):
    """A requested size (a config field, a resize, `max_new_tokens`, a file's declared shape)
    would need more memory than the device has; refused before anything is allocated."""


class CheckpointDtypeError(CheckpointError, TypeError):
    """A stored tensor has a dtype its parameter cannot have (an integer tensor where a float
    weight belongs, a float where a quantized weight's int8 belongs)."""


class CorruptFileError(CheckpointError, ValueError):
    """A weight file contradicts itself: a header that is not what the format says, tensor
    offsets or sizes outside the file or overlapping, an unknown tensor type id."""


class MissingDependencyError(FModelError, ImportError):
    """An optional package a feature needs is not installed (h5py for TensorFlow checkpoints,
    msgpack for Flax ones); the message names the extra to install (`pip install fmodel[legacy]`)."""


class HubUnavailableError(CheckpointError, ConnectionError):
    """A hub repo id could not be resolved: the hub is unreachable or offline mode is on and
    the files are not in the local cache. The message says which and how to use a local copy."""


class DistributedError(FModelError, ValueError):
    """A request to distribute a state over a device mesh that cannot be honoured."""


class PlanError(DistributedError):
    """A tensor-parallel plan that is malformed: an unknown style, or a key that matches no module."""


class PlanDivisibilityError(DistributedError):
    """A plan shards a size (attention heads, key/value heads, experts, the FFN width) that the
    mesh size does not divide; the message names it and the mesh sizes that would work."""


class MeshSizeError(DistributedError):
    """A device mesh of the wrong shape for the call: not 1-D, or its size is not the world size."""


class StateDistributedError(DistributedError):
    """A state that is already distributed where an undistributed one is needed (or the reverse)."""
