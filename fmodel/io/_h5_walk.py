"""The h5py reading of `legacy_tf`, free of torch and of fmodel so that it also runs as a script
in a child process (`python _h5_walk.py LIMIT FILE...`, exit status 0 when every file reads).

Why a child: the HDF5 C library does not survive every damaged file. A flipped byte in a
variable-length string attribute (Keras' `layer_names`) can make it dereference a bad heap
address and kill the interpreter with SIGSEGV (seen with h5py 3.16 / HDF5 1.14 on a fuzzed
tf_model.h5), which no Python `except` catches. `legacy_tf` therefore runs this same code first in
a child; when the child dies of a signal or hangs, the file is refused with a named error and the
parent never touches it. When the child succeeds, the parent repeats the very same calls on the
same bytes, which the library then handles as it did in the child.
"""

from __future__ import annotations

import math
import sys

import numpy as np

MAX_NDIM = 8
_NAME_ATTRS_MAX = 1_000_000  # names in one attribute list: far above any real model


class H5Refused(ValueError):
    """The file is not what Transformers' TF `save_pretrained` writes; the message says why."""


def _names(path: str, node, attr: str) -> list[str]:
    """Keras' `load_attributes_from_hdf5_group`: the attribute `attr`, or its chunks
    `attr0`, `attr1`, ...; each a 1-D array of (UTF-8) strings (an empty array: no names)."""
    attrs = node.attrs
    keys = [attr] if attr in attrs else []
    if not keys:
        index = 0
        while f"{attr}{index}" in attrs and index < _NAME_ATTRS_MAX:
            keys.append(f"{attr}{index}")
            index += 1
    if not keys:
        raise H5Refused(
            f"{node.name!r} has no {attr!r} attribute; not a Keras / Transformers TF weights file"
        )
    names: list[str] = []
    for key in keys:
        value = attrs[key]
        if isinstance(value, np.ndarray) and value.shape == (0,):
            continue  # a layer without weights: Keras writes an empty (float) array
        if not isinstance(value, np.ndarray) or value.ndim != 1 or value.dtype.kind not in "OSU":
            kind = type(value).__name__ + (
                f" of dtype {value.dtype}" if isinstance(value, np.ndarray) else ""
            )
            raise H5Refused(f"attribute {attr!r} of {node.name!r} is {kind}; expected a list of names")
        for item in value.tolist():
            if isinstance(item, bytes):
                try:
                    item = item.decode("utf-8")
                except UnicodeDecodeError:
                    raise H5Refused(f"a name in {attr!r} of {node.name!r} is not UTF-8") from None
            if not isinstance(item, str) or not item or "\x00" in item:
                raise H5Refused(
                    f"attribute {attr!r} of {node.name!r} holds {item!r}; expected non-empty names"
                )
            names.append(item)
    return names


def _walk(h5py, root, name: str):
    """The object at `name` under `root`, each component checked to be a hard link (never
    following a soft or external link)."""
    node = root
    for part in name.split("/"):
        if not part or part in (".", ".."):
            raise H5Refused(f"bad object path {name!r}")
        if not isinstance(node, h5py.Group):
            raise H5Refused(f"{node.name!r} is not a group, but {name!r} goes through it")
        link = node.get(part, default=None, getlink=True)
        if link is None:
            raise H5Refused(f"{name!r} is listed but the file has no {part!r} in {node.name!r}")
        if not isinstance(link, h5py.HardLink):
            raise H5Refused(
                f"{node.name}/{part} is a {type(link).__name__}; fmodel reads only objects stored in the "
                f"file itself (no soft or external links)"
            )
        node = node[part]
    return node


def _array(h5py, path: str, dataset, name: str, size: int, check_size) -> np.ndarray:
    if not isinstance(dataset, h5py.Dataset):
        raise H5Refused(f"{name!r} is a {type(dataset).__name__}, expected a dataset")
    dtype = dataset.dtype
    if dtype.fields is not None or dtype.kind not in "fiub" or dtype.subdtype is not None:
        raise H5Refused(f"dataset {name!r} has dtype {dtype}; expected a plain numeric array")
    if dataset.external:
        raise H5Refused(f"dataset {name!r} keeps its data in other files {dataset.external!r}; refused")
    if dataset.is_virtual:
        raise H5Refused(f"dataset {name!r} is a virtual dataset (data from other files); refused")
    shape = tuple(int(d) for d in dataset.shape) if dataset.shape is not None else None
    if shape is None or len(shape) > MAX_NDIM:
        raise H5Refused(f"dataset {name!r} has shape {dataset.shape}; expected an array")
    nbytes = math.prod(shape) * dtype.itemsize
    check_size(nbytes, f"{path}: dataset {name!r} of shape {list(shape)}")
    native = dtype.newbyteorder("=")
    offset = dataset.id.get_offset() if dataset.chunks is None else None
    if (
        offset is not None
        and nbytes > 0
        and dataset.compression is None
        and dtype.byteorder in ("=", "|", "<" if sys.byteorder == "little" else ">")
    ):
        if offset + nbytes > size:
            raise H5Refused(
                f"dataset {name!r} ({nbytes} bytes at offset {offset}) runs past the end of the file "
                f"({size} bytes): truncated?"
            )
        return np.memmap(path, dtype=native, mode="c", offset=offset, shape=shape)  # copy-on-write
    array = np.empty(shape, dtype=native)
    if nbytes > 0:
        dataset.read_direct(array)
    return array


def walk(path: str, size: int, check_size) -> list[tuple[str, str, np.ndarray]]:
    """`(full TF name, dataset path, array)` of every weight of one TF weights file, in file
    order: a whole file's weights under their full names (`tf_bert_model/bert/...:0`, the dataset
    at `<layer>/<name>`), a shard's under their dataset paths. `check_size(nbytes, what)` is
    called before any dataset is read. Raises H5Refused, or what h5py raises."""
    import h5py

    with h5py.File(path, "r") as f:
        out = []
        for layer in _names(path, f, "layer_names"):
            node = _walk(h5py, f, layer)
            if isinstance(node, h5py.Dataset):  # a shard: the layer name is the dataset path
                out.append((layer, layer, _array(h5py, path, node, layer, size, check_size)))
                continue
            for weight in _names(path, node, "weight_names"):
                dataset = _walk(h5py, node, weight)
                out.append(
                    (weight, f"{layer}/{weight}", _array(h5py, path, dataset, weight, size, check_size))
                )
        return out


def _main(argv: list[str]) -> int:
    import os

    limit = int(argv[0])

    def check_size(nbytes: int, what: str) -> None:
        if limit and nbytes > limit:
            raise H5Refused(what)

    for path in argv[1:]:
        walk(path, os.path.getsize(path), check_size)
    return 0


if __name__ == "__main__":
    try:
        status = _main(sys.argv[1:])
    except Exception:  # a Python-level refusal: the parent reads the file and names the error
        status = 1
    sys.exit(status)
