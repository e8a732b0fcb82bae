"""TensorFlow (`tf_model.h5`) and Flax (`flax_model.msgpack`) checkpoints -> PyTorch-named
tensors, without TensorFlow, Keras, JAX or Flax.

`fmodel.io.resolve` finds these files after safetensors and pickle (safetensors stays
preferred when a folder holds several formats) and gives them the formats "tf" and "flax"; a
safetensors file that TF / Flax `save_pretrained(safe_serialization=True)` wrote (metadata
`format: tf / flax`, TF / Flax names) is "tf-safetensors" / "flax-safetensors".
`fmodel.io.read.read_tensors` hands such a checkpoint to `read_legacy_tensors`, which reads
each file (`legacy_tf.read_tf_h5`, `legacy_flax.read_flax_msgpack`, the safetensors reader),
converts names and layouts as Transformers 4.57's converters do (`legacy_names`) and returns
what `state_from_tensors` takes: the architecture check, ties (tied heads absent from the file),
the base-prefix rule and the dtype checks are then those of every other checkpoint.

h5 files are read first in a child process (`legacy_tf.probe_h5_files`): the HDF5 C library can
crash the interpreter on a damaged file. No such crash was found in msgpack's decoder (fuzzed
with truncations and byte flips), which reads in this process.

The readers need the optional packages h5py and msgpack (`pip install fmodel[legacy]`); without
them a `MissingDependencyError` says which to install.
"""

from __future__ import annotations

import importlib
import logging
import os

import torch

from ..errors import CheckpointError, CorruptFileError, MissingDependencyError
from .legacy_names import (
    fit_flax_tensor,
    fit_tf_tensor,
    flax_to_pt_name,
    tf_full_name,
    tf_shard_dataset_name,
    tf_to_pt_name,
)
from .shard_index import read_weight_map

__all__ = [
    "FLAX_INDEX",
    "FLAX_SINGLE",
    "LEGACY_FORMATS",
    "TF_INDEX",
    "TF_SINGLE",
    "check_requested_format",
    "read_legacy_files",
    "read_legacy_tensors",
    "require",
    "safetensors_format",
]

TF_SINGLE = "tf_model.h5"
TF_INDEX = "tf_model.h5.index.json"
FLAX_SINGLE = "flax_model.msgpack"
FLAX_INDEX = "flax_model.msgpack.index.json"
LEGACY_FORMATS = ("tf", "flax", "tf-safetensors", "flax-safetensors")
logger = logging.getLogger("fmodel")
_PACKAGES = {
    "h5py": "TensorFlow checkpoints (tf_model.h5)",
    "msgpack": "Flax checkpoints (flax_model.msgpack)",
}


def require(package: str):
    """Import `package` (h5py or msgpack), or raise `MissingDependencyError` saying how to get it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise MissingDependencyError(
            f"reading {_PACKAGES[package]} needs the {package} package: pip install 'fmodel[legacy]' "
            f"(or pip install {package}); TensorFlow, Keras, JAX and Flax are not needed"
        ) from None


def _convert_tf(path: str, items) -> dict[str, tuple[torch.Tensor, str]]:
    """{pytorch name: (tensor, stored name)} of `(full TF name, stored name, tensor)` items."""
    out: dict[str, tuple[torch.Tensor, str]] = {}
    for full, dataset, tensor in items:
        # a whole h5 file lists full names (`<layer>/<full name>` is the dataset); a shard (and a
        # TF safetensors file) stores each weight at its name without the first level, which
        # the converter expects
        source = full if dataset != full else tf_full_name(full)
        try:
            pt_name, transpose = tf_to_pt_name(source, tensor.ndim)
        except ValueError as exc:
            raise CorruptFileError(f"{path}: {exc}") from None
        tensor = fit_tf_tensor(tensor, transpose, pt_name)
        if pt_name in out:
            # TF BERT-MLM lists the word embeddings under both `bert` and `mlm___cls` (one
            # variable, stored twice): the same values, kept once. Different values would make
            # the result depend on the order Keras loads layers in: refused.
            if not torch.equal(out[pt_name][0], tensor):
                raise CorruptFileError(
                    f"{path}: {dataset!r} and {out[pt_name][1]!r} are both {pt_name!r} but hold different values"
                )
            continue
        out[pt_name] = (tensor, dataset)
    return out


def _tf_file(path: str) -> dict[str, tuple[torch.Tensor, str]]:
    """{pytorch name: (tensor, dataset path)} of one TF h5 file (whole or shard)."""
    from .legacy_tf import read_tf_h5

    return _convert_tf(path, read_tf_h5(path))


def _tf_safetensors(path: str) -> dict[str, tuple[torch.Tensor, str]]:
    """A safetensors file written by TF `save_pretrained(safe_serialization=True)`: the names
    of a TF shard (`bert/embeddings/word_embeddings/weight:0`)."""
    from .read import read_weight_file

    return _convert_tf(path, [(name, name, t) for name, t in read_weight_file(path).items()])


def _probe(paths, fmt: str) -> None:
    """TF h5 files are first read in a child process (`legacy_tf.probe_h5_files`): the HDF5
    library can crash on a damaged file."""
    if fmt == "tf":
        require("h5py")
        from .legacy_tf import probe_h5_files

        probe_h5_files(list(paths))


def _convert_flax(path: str, flat: dict[tuple[str, ...], torch.Tensor], sep: str):
    # Transformers drops the collection level only when the state has batch statistics.
    collections = {key[0] for key in flat} & {"batch_stats"}
    out: dict[str, tuple[torch.Tensor, str]] = {}
    for key, tensor in flat.items():
        pt_name, transpose = flax_to_pt_name(key[1:] if collections else key, tensor.ndim)
        if pt_name in out:
            raise CorruptFileError(f"{path}: {sep.join(key)!r} and {out[pt_name][1]!r} are both {pt_name!r}")
        out[pt_name] = (fit_flax_tensor(tensor, transpose), sep.join(key))
    return out


def _flax_file(path: str) -> dict[str, tuple[torch.Tensor, str]]:
    """{pytorch name: (tensor, flax key "a/b/c")} of one Flax msgpack file (whole or shard)."""
    from .legacy_flax import read_flax_msgpack

    return _convert_flax(path, read_flax_msgpack(path), "/")


def _flax_safetensors(path: str) -> dict[str, tuple[torch.Tensor, str]]:
    """A safetensors file written by Flax `save_pretrained(safe_serialization=True)`: the
    flattened Flax keys joined by "." (`bert.embeddings.LayerNorm.scale`)."""
    from .read import read_weight_file

    flat = {tuple(name.split(".")): t for name, t in read_weight_file(path).items()}
    return _convert_flax(path, flat, ".")


_READERS = {
    "tf": _tf_file,
    "flax": _flax_file,
    "tf-safetensors": _tf_safetensors,
    "flax-safetensors": _flax_safetensors,
}


def safetensors_format(path: str) -> str:
    """ "tf-safetensors" / "flax-safetensors" for a safetensors file that TF / Flax
    `save_pretrained(safe_serialization=True)` wrote (its metadata says `format: tf / flax`; the
    names are then TF's or Flax's), else "safetensors"."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # the safetensors reader names the problem when it reads the file
        logger.debug("%s: header not read for its format (%s: %s)", path, type(exc).__name__, exc)
        return "safetensors"
    kind = metadata.get("format")
    return f"{kind}-safetensors" if kind in ("tf", "flax") else "safetensors"


def read_legacy_files(paths, fmt: str) -> dict[str, torch.Tensor]:
    """The PyTorch-named tensors of TF (`fmt="tf"`) or Flax (`"flax"`) files: one whole file,
    or shards given one by one (no index: what Transformers' `_load_from_tf` /
    `_load_from_flax` take).

    Raises:
        CheckpointError: a `.index` file (a TensorFlow 1 checkpoint), a tensor in two files.
        CorruptFileError, SizeLimitError, MissingDependencyError: see `read_legacy_tensors`.
    """
    paths = [os.fspath(p) for p in paths]
    for path in paths:
        if path.endswith(".index"):
            raise CheckpointError(
                f"{path}: a TensorFlow 1 checkpoint (model.ckpt.index), which only TensorFlow reads; "
                "fmodel reads TF 2 files written by Transformers (tf_model.h5)"
            )
    _probe(paths, fmt)
    reader = _READERS[fmt]
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for path in paths:
        for name, (tensor, _) in reader(path).items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} appears in two files: {origin[name]} and {path}")
            tensors[name] = tensor
            origin[name] = path
    return tensors


def check_requested_format(source: str, fmt: str) -> None:
    """`from_pretrained(..., from_tf=True)` / `from_flax=True` on a local folder: the folder must
    hold such weights (tf_model.h5 / flax_model.msgpack, their shards, or a safetensors file that
    TF / Flax wrote), as Transformers requires; a hub id is resolved as usual. When the folder also
    holds PyTorch safetensors or pickle weights, those are read (safetensors stays preferred) and
    this is logged.

    Raises:
        CheckpointError: the folder holds no weights of that format (a TensorFlow 1
            `model.ckpt.index` is named as such: only TensorFlow reads it).
    """
    if not os.path.isdir(source):
        return
    from .resolve import resolve_checkpoint

    single, index = (TF_SINGLE, TF_INDEX) if fmt == "tf" else (FLAX_SINGLE, FLAX_INDEX)
    flag = "from_tf" if fmt == "tf" else "from_flax"
    try:
        found = resolve_checkpoint(source, require_config=False).format
    except CheckpointError:
        found = None  # no weights at all: said below, or by the load itself
    if found in (fmt, f"{fmt}-safetensors"):
        return
    if not any(os.path.isfile(os.path.join(source, name)) for name in (single, index)):
        tf1 = fmt == "tf" and os.path.isfile(os.path.join(source, "model.ckpt.index"))
        raise CheckpointError(
            f"{source}: {flag}=True but the folder has no {single} or {index}"
            + (
                " (its model.ckpt.index is a TensorFlow 1 checkpoint, which only TensorFlow reads)"
                if tf1
                else ""
            )
        )
    logger.info(
        "%s: %s=True, and the folder also holds %s weights, which are read instead", source, flag, found
    )


def read_legacy_tensors(files) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a TF or Flax checkpoint (`CheckpointFiles` of format "tf" / "flax", or
    "tf-safetensors" / "flax-safetensors": safetensors files that TF / Flax `save_pretrained`
    wrote with their own names) under their PyTorch names, and for each the file it came from.

    A sharded checkpoint's index must agree with its shards exactly, as for safetensors: every
    weight it lists is in the shard it names, every stored weight is listed, no weight is in two
    shards.

    Raises:
        CorruptFileError: an unreadable or malformed file (not HDF5 / msgpack, truncated, a
            non-numeric dataset, links out of the file, a leaf that is not an array, ...).
        CheckpointError: an index that disagrees with its shards, a tensor in two shards.
        SizeLimitError: declared sizes beyond the machine's memory.
        MissingDependencyError: h5py / msgpack is not installed (`pip install fmodel[legacy]`).
    """
    _probe(files.weights, files.format)
    reader = _READERS[files.format]
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    stored: dict[str, str] = {}  # stored name (shard dataset path / flax key) -> shard path
    for path in files.weights:
        for name, (tensor, key) in reader(path).items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} appears in two shards: {origin[name]} and {path}")
            tensors[name] = tensor
            origin[name] = path
            stored[key] = path
    if files.index is not None:
        _check_index(files, read_weight_map(files.index), stored)
    return tensors, origin


def _check_index(files, weight_map: dict[str, str], stored: dict[str, str]) -> None:
    """The index's names (full TF names / Flax keys "a/b/c") against what the shards hold."""
    listed = {
        (tf_shard_dataset_name(name) if files.format.startswith("tf") else name): shard
        for name, shard in weight_map.items()
    }
    absent = sorted(set(listed) - set(stored))
    if absent:
        raise CheckpointError(f"{files.index}: lists weights that no shard holds: {absent[:10]}")
    unlisted = sorted(set(stored) - set(listed))
    if unlisted:
        raise CheckpointError(
            f"{files.index}: shards hold weights the index does not list: "
            + ", ".join(f"{n!r} (in {stored[n]})" for n in unlisted[:10])
        )
    elsewhere = sorted(
        n for n, shard in listed.items() if os.path.basename(stored[n]) != os.path.basename(shard)
    )
    if elsewhere:
        raise CheckpointError(
            f"{files.index}: weights are not in the shard the index names: "
            + ", ".join(f"{n!r} listed in {listed[n]}, found in {stored[n]}" for n in elsewhere[:10])
        )
