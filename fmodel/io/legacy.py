"""TensorFlow (`tf_model.h5`) and Flax (`flax_model.msgpack`) checkpoints -> PyTorch-named
tensors, without TensorFlow, Keras, JAX or Flax.

`fmodel.io.resolve` finds these files after safetensors and pickle (safetensors stays
preferred when a folder holds several formats) and gives them the formats "tf" and "flax";
`fmodel.io.read.read_tensors` hands such a checkpoint to `read_legacy_tensors`, which reads
each file (`legacy_tf.read_tf_h5`, `legacy_flax.read_flax_msgpack`), converts names and layouts
as Transformers 4.57's converters do (`legacy_names`) and returns what `state_from_tensors`
takes: the architecture check, ties (tied heads absent from the file), the base-prefix rule and
the dtype checks are then those of every other checkpoint.

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
]

TF_SINGLE = "tf_model.h5"
TF_INDEX = "tf_model.h5.index.json"
FLAX_SINGLE = "flax_model.msgpack"
FLAX_INDEX = "flax_model.msgpack.index.json"
LEGACY_FORMATS = ("tf", "flax")
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


def _tf_file(path: str) -> dict[str, tuple[torch.Tensor, str]]:
    """{pytorch name: (tensor, dataset path)} of one TF file (whole or shard)."""
    from .legacy_tf import read_tf_h5

    out: dict[str, tuple[torch.Tensor, str]] = {}
    for full, dataset, tensor in read_tf_h5(path):
        # a whole file lists full names (`<layer>/<full name>` is the dataset); a shard stores
        # each weight at its name without the first level, which the converter expects
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


def _probe(paths, fmt: str) -> None:
    """TF files are first read in a child process (`legacy_tf.probe_h5_files`): the HDF5 library
    can crash on a damaged file. msgpack's decoder has no such failure mode (checked by fuzzing)."""
    if fmt == "tf":
        require("h5py")
        from .legacy_tf import probe_h5_files

        probe_h5_files(list(paths))


def _flax_file(path: str) -> dict[str, tuple[torch.Tensor, str]]:
    """{pytorch name: (tensor, flax key "a/b/c")} of one Flax file (whole or shard)."""
    from .legacy_flax import read_flax_msgpack

    flat = read_flax_msgpack(path)
    # Transformers drops the collection level only when the state has batch statistics.
    collections = {key[0] for key in flat} & {"batch_stats"}
    out: dict[str, tuple[torch.Tensor, str]] = {}
    for key, tensor in flat.items():
        pt_name, transpose = flax_to_pt_name(key[1:] if collections else key, tensor.ndim)
        if pt_name in out:
            raise CorruptFileError(f"{path}: {'/'.join(key)!r} and {out[pt_name][1]!r} are both {pt_name!r}")
        out[pt_name] = (fit_flax_tensor(tensor, transpose), "/".join(key))
    return out


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
    reader = _tf_file if fmt == "tf" else _flax_file
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
    hold such weights, as Transformers requires (a hub id is resolved as usual). When it also
    holds safetensors or pickle weights, those are read (safetensors stays preferred) and this
    is logged.

    Raises:
        CheckpointError: the folder holds no file of that format (a TensorFlow 1 `model.ckpt.index`
            is named as such: only TensorFlow reads it).
    """
    if not os.path.isdir(source):
        return
    single, index = (TF_SINGLE, TF_INDEX) if fmt == "tf" else (FLAX_SINGLE, FLAX_INDEX)
    flag = "from_tf" if fmt == "tf" else "from_flax"
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
    others = [n for n in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                          "pytorch_model.bin.index.json") if os.path.isfile(os.path.join(source, n))]  # fmt: skip
    if others:
        logger.info(
            "%s: %s=True, and the folder also holds %s, which is read instead", source, flag, others[0]
        )


def read_legacy_tensors(files) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a TF or Flax checkpoint (`CheckpointFiles` of format "tf" / "flax") under
    their PyTorch names, and for each the file it came from.

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
    reader = _tf_file if files.format == "tf" else _flax_file
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
        (tf_shard_dataset_name(name) if files.format == "tf" else name): shard
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
