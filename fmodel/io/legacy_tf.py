"""Read the weights of a TensorFlow 2 checkpoint written by Transformers (`tf_model.h5`, or the
shards of `tf_model.h5.index.json`) with h5py alone: no TensorFlow, no Keras.

Two layouts, both Keras' legacy HDF5 weights format:

- a whole file (`save_weights`): the root attribute `layer_names` lists the top-level layers;
  each layer's group has a `weight_names` attribute (full TF names such as
  `tf_bert_model/bert/embeddings/word_embeddings/weight:0`), and the dataset of a weight is at
  `<layer>/<weight name>`. Keras splits a long attribute into `name0`, `name1`, ...
- a shard: the root `layer_names` lists dataset paths, each the weight's name without its first
  level (`modeling_tf_utils.tf_shard_checkpoint` + `save_pretrained`).

Only data is read (`_h5_walk`): the two name attributes (which must be lists of strings) and
numeric datasets. Every other attribute (Keras' `model_config`, `training_config`, anything
pickled) is never looked at, nothing is unpickled or evaluated, and h5py is never asked to
follow a link: each path component must be a hard link inside the file (external links, soft
links, external raw-data files and virtual datasets are refused, so a file cannot make fmodel
read another file). A contiguous uncompressed dataset is memory-mapped copy-on-write (no RAM
until touched); a chunked or compressed one is read, after its declared size has been checked
against the machine's memory.

The HDF5 C library can crash the interpreter on a damaged file (a segmentation fault, which no
`except` catches), so `probe_h5_files` first runs the same reading in a child process, once per
checkpoint; a child killed by a signal or still running after `PROBE_TIMEOUT_S` makes the file
a `CorruptFileError`, and this process never opens it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence

import torch

from .._limits import check_allocation, device_memory_bytes
from ..errors import CorruptFileError, FModelError

__all__ = ["PROBE_TIMEOUT_S", "probe_h5_files", "read_tf_h5"]

logger = logging.getLogger("fmodel")

PROBE_TIMEOUT_S = 300
_WALK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_h5_walk.py")
# argv: [script, limit, files...]; the current directory is dropped from sys.path first
_PROBE = "import runpy, sys; sys.path.pop(0); sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


def _h5py():
    from .legacy import require

    return require("h5py")


def _run_probe(paths: Sequence[str]) -> int | None:
    """The child's exit status (negative: killed by that signal); None when no child could be
    started (logged)."""
    limit = device_memory_bytes() or 0
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, _WALK, str(limit), *paths],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise CorruptFileError(
            f"{', '.join(paths)}: the HDF5 library was still reading the file's structure after "
            f"{PROBE_TIMEOUT_S} s (a damaged file can make it loop); refused"
        ) from None
    except OSError as exc:
        logger.warning(
            "could not start a child process to check %s before reading it (%s); reading it here",
            ", ".join(paths),
            exc,
        )
        return None
    return done.returncode


# Files whose probe passed, by identity: the same inode, size, mtime and ctime (a rewrite changes
# ctime, which no user can set back) are the same bytes, read again without a child.
_PROBED: set[tuple] = set()
_PROBED_MAX = 4096


def _identity(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def probe_h5_files(paths: Sequence[str]) -> None:
    """Read `paths` as `read_tf_h5` does, in a child process, so that a file which crashes the
    HDF5 library is refused instead of killing this process. A child that fails with a Python
    error is fine: reading here then raises that error with its message. A file that passed
    and is unchanged since (same inode, size, mtime and ctime) is not probed again.

    Raises:
        CorruptFileError: the child died of a signal (the file is named: with several files,
            each is probed alone to find it) or ran past `PROBE_TIMEOUT_S`.
    """
    paths = [os.fspath(p) for p in paths]
    keys = {p: _identity(p) for p in paths}
    todo = [p for p in paths if keys[p] is None or keys[p] not in _PROBED]
    if not todo:
        return
    status = _run_probe(todo)
    if status is None:
        return
    if status >= 0:
        _PROBED.update(k for p in todo if (k := keys[p]) is not None)
        while len(_PROBED) > _PROBED_MAX:
            _PROBED.pop()
        return
    paths = todo
    bad = [p for p in paths if (_run_probe([p]) or 0) < 0] if len(paths) > 1 else paths
    try:
        name = signal.Signals(-status).name
    except ValueError:
        name = f"signal {-status}"
    raise CorruptFileError(
        f"{', '.join(bad or paths)}: the HDF5 library crashed reading this file ({name} in a child process); "
        f"it is damaged or not an HDF5 file written by Keras / Transformers"
    )


def read_tf_h5(path: str) -> list[tuple[str, str, torch.Tensor]]:
    """The weights of one TF weights file: `(full TF name, dataset path, tensor)` in file order.

    A whole file gives each weight under its full name (`tf_bert_model/bert/...:0`); a shard
    gives its dataset paths as stored (the name without its first level: `legacy_names.
    tf_full_name` puts one back for the converter). Call `probe_h5_files` first on files that
    may be damaged (`fmodel.io.legacy` does).

    Raises:
        CorruptFileError: not an HDF5 file, truncated, no `layer_names`, listed objects missing
            or not numeric datasets, links out of the file.
        SizeLimitError: a dataset declares more bytes than the machine has.
        MissingDependencyError: h5py is not installed.
    """
    _h5py()
    from ._h5_walk import H5Refused, walk

    try:
        found = walk(path, os.path.getsize(path), lambda nbytes, what: check_allocation(nbytes, what=what))
    except FModelError:
        raise
    except H5Refused as exc:
        raise CorruptFileError(f"{path}: {exc}") from None
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
    return [(full, dataset, torch.from_numpy(array)) for full, dataset, array in found]
