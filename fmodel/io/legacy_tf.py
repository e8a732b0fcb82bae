"""Read the weights of a TensorFlow 2 checkpoint written by Transformers (`tf_model.h5`, or the
shards of `tf_model.h5.index.json`) with h5py alone: no TensorFlow, no Keras.

Two layouts, both Keras' legacy HDF5 weights format:

- a whole file (`save_weights`): the root attribute `layer_names` lists the top-level layers;
  each layer's group has a `weight_names` attribute (full TF names such as
  `tf_bert_model/bert/embeddings/word_embeddings/weight:0`), and the dataset of a weight is at
  `<layer>/<weight name>`. Keras splits a long attribute into `name0`, `name1`, ...
- a shard: the root `layer_names` lists dataset paths, each the weight's name without its first
  level (`modeling_tf_utils.tf_shard_checkpoint` + `save_pretrained`).

Only data is read: the two name attributes (which must be lists of strings) and numeric
datasets. Every other attribute (Keras' `model_config`, `training_config`, anything pickled) is
never looked at, nothing is unpickled or evaluated, and h5py is never asked to follow a link:
each path component must be a hard link inside the file (external links, soft links, external
raw-data files and virtual datasets are refused, so a file cannot make fmodel read another
file). A contiguous uncompressed dataset is memory-mapped copy-on-write (no RAM until
touched); a chunked or compressed one is read, after its declared size has been checked
against the machine's memory.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from .._limits import check_allocation
from ..errors import CorruptFileError, FModelError

__all__ = ["read_tf_h5"]

_MAX_NDIM = 8
_NAME_ATTRS_MAX = 1_000_000  # names in one attribute list: far above any real model


def _h5py():
    from .legacy import require

    return require("h5py")


def _names(path: str, node, attr: str) -> list[str]:
    """Keras' `load_attributes_from_hdf5_group`: the attribute `attr`, or its chunks
    `attr0`, `attr1`, ...; each must be a 1-D array of (UTF-8) strings."""
    attrs = node.attrs
    keys = [attr] if attr in attrs else []
    if not keys:
        index = 0
        while f"{attr}{index}" in attrs and index < _NAME_ATTRS_MAX:
            keys.append(f"{attr}{index}")
            index += 1
    if not keys:
        raise CorruptFileError(
            f"{path}: {node.name!r} has no {attr!r} attribute; not a Keras / Transformers TF weights file"
        )
    names: list[str] = []
    for key in keys:
        value = attrs[key]
        if isinstance(value, np.ndarray) and value.shape == (0,):
            continue  # a layer without weights: Keras writes an empty (float) array
        if not isinstance(value, np.ndarray) or value.ndim != 1 or value.dtype.kind not in "OSU":
            raise CorruptFileError(
                f"{path}: attribute {attr!r} of {node.name!r} is {type(value).__name__}"
                f"{'' if not isinstance(value, np.ndarray) else f' of dtype {value.dtype}'}; expected a list of names"
            )
        for item in value.tolist():
            if isinstance(item, bytes):
                try:
                    item = item.decode("utf-8")
                except UnicodeDecodeError:
                    raise CorruptFileError(
                        f"{path}: a name in {attr!r} of {node.name!r} is not UTF-8"
                    ) from None
            if not isinstance(item, str) or not item or "\x00" in item:
                raise CorruptFileError(
                    f"{path}: attribute {attr!r} of {node.name!r} holds {item!r}; expected non-empty names"
                )
            names.append(item)
    return names


def _walk(h5py, path: str, root, name: str):
    """The object at `name` under `root`, each component checked to be a hard link (never
    following a soft or external link)."""
    node = root
    for part in name.split("/"):
        if not part or part in (".", ".."):
            raise CorruptFileError(f"{path}: bad object path {name!r}")
        if not isinstance(node, h5py.Group):
            raise CorruptFileError(f"{path}: {node.name!r} is not a group, but {name!r} goes through it")
        link = node.get(part, default=None, getlink=True)
        if link is None:
            raise CorruptFileError(
                f"{path}: {name!r} is listed but the file has no {part!r} in {node.name!r}"
            )
        if not isinstance(link, h5py.HardLink):
            raise CorruptFileError(
                f"{path}: {node.name}/{part} is a {type(link).__name__}; fmodel reads only objects stored in the "
                f"file itself (no soft or external links)"
            )
        node = node[part]
    return node


def _tensor(h5py, path: str, dataset, name: str, size: int) -> torch.Tensor:
    if not isinstance(dataset, h5py.Dataset):
        raise CorruptFileError(f"{path}: {name!r} is a {type(dataset).__name__}, expected a dataset")
    dtype = dataset.dtype
    if dtype.fields is not None or dtype.kind not in "fiub" or dtype.subdtype is not None:
        raise CorruptFileError(f"{path}: dataset {name!r} has dtype {dtype}; expected a plain numeric array")
    if dataset.external:
        raise CorruptFileError(
            f"{path}: dataset {name!r} keeps its data in other files {dataset.external!r}; refused"
        )
    if dataset.is_virtual:
        raise CorruptFileError(
            f"{path}: dataset {name!r} is a virtual dataset (data from other files); refused"
        )
    shape = tuple(int(d) for d in dataset.shape) if dataset.shape is not None else None
    if shape is None or len(shape) > _MAX_NDIM:
        raise CorruptFileError(f"{path}: dataset {name!r} has shape {dataset.shape}; expected an array")
    nbytes = math.prod(shape) * dtype.itemsize
    check_allocation(nbytes, what=f"{path}: dataset {name!r} of shape {list(shape)}")
    native = dtype.newbyteorder("=")
    offset = dataset.id.get_offset() if dataset.chunks is None else None
    if (
        offset is not None
        and nbytes > 0
        and dataset.compression is None
        and dtype.byteorder in ("=", "|", "<" if np.little_endian else ">")
    ):
        if offset + nbytes > size:
            raise CorruptFileError(
                f"{path}: dataset {name!r} ({nbytes} bytes at offset {offset}) runs past the end of the file "
                f"({size} bytes): truncated?"
            )
        array = np.memmap(path, dtype=native, mode="c", offset=offset, shape=shape)  # copy-on-write
    else:
        array = np.empty(shape, dtype=native)
        if nbytes > 0:
            dataset.read_direct(array)
    return torch.from_numpy(array)


def read_tf_h5(path: str) -> list[tuple[str, str, torch.Tensor]]:
    """The weights of one TF weights file: `(full TF name, dataset path, tensor)` in file order.

    A whole file gives each weight under its full name (`tf_bert_model/bert/...:0`); a shard
    gives its dataset paths as stored (the name without its first level: `legacy_names.
    tf_full_name` puts one back for the converter).

    Raises:
        CorruptFileError: not an HDF5 file, truncated, no `layer_names`,
            listed objects missing or not numeric datasets, links out of the file.
        SizeLimitError: a dataset declares more bytes than the machine has.
        MissingDependencyError: h5py is not installed.
    """
    h5py = _h5py()
    size = os.path.getsize(path)
    try:
        with h5py.File(path, "r") as f:
            out = []
            layers = _names(path, f, "layer_names")
            for layer in layers:
                node = _walk(h5py, path, f, layer)
                if isinstance(node, h5py.Dataset):  # a shard: the layer name is the dataset path
                    out.append((layer, layer, _tensor(h5py, path, node, layer, size)))
                    continue
                for weight in _names(path, node, "weight_names"):
                    dataset = _walk(h5py, path, node, weight)
                    out.append((weight, f"{layer}/{weight}", _tensor(h5py, path, dataset, weight, size)))
            return out
    except FModelError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, AttributeError, IndexError) as exc:
        raise CorruptFileError(
            f"{path}: not a readable TF weights (HDF5) file ({type(exc).__name__}: {exc})"
        ) from None
    except Exception as exc:  # h5py raises its own classes from deep inside the HDF5 library
        if exc.__class__.__module__.split(".")[0] not in ("h5py", "numpy"):
            raise
        raise CorruptFileError(
            f"{path}: not a readable TF weights (HDF5) file ({type(exc).__name__}: {exc})"
        ) from None
