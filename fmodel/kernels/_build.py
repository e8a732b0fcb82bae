"""Building and loading fmodel's kernel extension (the sources in `csrc/`).

The extension is compiled on first use, on the machine that runs it, by
`torch.utils.cpp_extension.load` (ninja, `-O3 -march=native -fopenmp`): `-march=native` lets the
compiler use every instruction this CPU has (AVX-512 VNNI, BF16), which a wheel built elsewhere
could not assume. The build lands in torch's extension cache (`$TORCH_EXTENSIONS_DIR`, by default
`~/.cache/torch_extensions/py<ver>_<cpu|cuXY>/`) under a name that hashes the sources, the flags,
torch's version and this CPU's feature flags, so a changed source or another CPU builds anew and a
second process only loads the finished library (milliseconds, without importing
`torch.utils.cpp_extension` or running ninja). `python -m fmodel.kernels build` prebuilds it (at
install, in CI). `FMODEL_KERNELS=0` disables the extension; `FMODEL_KERNELS_PORTABLE=1` builds
it without the AVX-512 code (the portable loops only, as on a CPU without AVX-512).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from ..errors import KernelBuildError

logger = logging.getLogger("fmodel")

__all__ = ["build_directory", "ensure_loaded", "extension_name", "load_error"]

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("ops.cpp", "kernels.cpp", "attention.cpp")
HEADERS = ("kernels.h",)
# -fopenmp: at::parallel_for is an OpenMP loop compiled into this library (torch's CPU wheel
# uses OpenMP); without it every op would run on one thread. The OpenMP runtime at run time is
# the one torch already loaded (same soname).
CFLAGS = ("-O3", "-march=native", "-fopenmp")
LDFLAGS = ("-fopenmp",)

_lock = threading.Lock()
_state: dict[str, object] = {}  # "loaded": bool, "error": str, "seconds": float, "path": str


def _portable_only() -> bool:
    return os.environ.get("FMODEL_KERNELS_PORTABLE", "0") not in ("", "0")


def _cflags() -> list[str]:
    return [*CFLAGS, *(["-DFMK_PORTABLE_ONLY"] if _portable_only() else [])]


def _cpu_flags() -> str:
    """This CPU's feature flags (Linux: /proc/cpuinfo), part of the cache key: `-march=native`
    code must not be loaded on a CPU with fewer instructions (a shared home directory)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[-1].strip()
    except OSError:  # not Linux: the processor string stands in for the flags
        return platform.processor()
    return platform.processor()


def extension_name() -> str:
    """The extension's name: `fmodel_kernels_` + a hash of its sources, flags, torch's version and
    the CPU's features."""
    h = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    h.update(repr((_cflags(), LDFLAGS, torch.__version__, sys.version_info[:2], platform.machine())).encode())
    h.update(_cpu_flags().encode())
    return f"fmodel_kernels_{h.hexdigest()[:16]}"


def build_directory(name: str) -> Path:
    """Where torch's extension cache keeps `name` (what `torch.utils.cpp_extension` would choose,
    computed without importing it)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        accel = "cpu" if torch.version.cuda is None else f"cu{torch.version.cuda.replace('.', '')}"
        if torch.version.hip is not None:
            accel = f"rocm{torch.version.hip.replace('.', '')}"
        from torch import _appdirs  # small; what cpp_extension.get_default_build_root uses

        base = os.path.realpath(_appdirs.user_cache_dir(appname="torch_extensions"))
        root = os.path.join(base, f"py{sys.version_info.major}{sys.version_info.minor}_{accel}")
    return Path(root) / name


def _build_and_load() -> str:
    if os.environ.get("FMODEL_KERNELS", "1") == "0":
        raise KernelBuildError("fmodel.kernels: disabled by FMODEL_KERNELS=0")
    try:
        name = extension_name()
    except OSError as exc:  # an install without the C++ sources (package data)
        raise KernelBuildError(f"fmodel.kernels: the extension's sources are missing ({exc})") from exc
    directory = build_directory(name)
    library = directory / f"{name}.so"
    ready = directory / "fmodel-ready"  # written after a complete build: the .so is whole
    if ready.exists() and library.exists():
        try:
            torch.ops.load_library(str(library))
        except (OSError, RuntimeError) as exc:  # a damaged file: say so (delete the directory to rebuild)
            raise KernelBuildError(f"fmodel.kernels: loading {library} failed: {exc}") from exc
        return str(library)
    from torch.utils import cpp_extension  # 0.3 s to import: only when building

    logger.info("fmodel.kernels: compiling the CPU kernels into %s (once per machine)", directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            name=name,
            sources=[str(CSRC / s) for s in SOURCES],
            extra_cflags=_cflags(),
            extra_ldflags=list(LDFLAGS),
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
    # a missing or failing compiler / ninja: cpp_extension raises any of these
    except (RuntimeError, OSError, ImportError, ValueError, subprocess.SubprocessError) as exc:
        raise KernelBuildError(
            f"fmodel.kernels: building the extension in {directory} failed: {exc}"
        ) from exc
    try:
        ready.write_text(name + "\n", encoding="utf-8")
    except OSError as exc:  # loaded; only the next process's quick path is lost
        logger.warning(
            "fmodel.kernels: could not mark %s as built (%s): each process will run ninja", directory, exc
        )
    return str(library)


def ensure_loaded() -> None:
    """Build (if needed) and load the extension once per process; raise KernelBuildError with the
    reason when that is impossible (the first failure is also logged once as a warning, and
    remembered: later calls raise at once)."""
    if _state.get("loaded"):
        return
    with _lock:
        if _state.get("loaded"):
            return
        if "error" in _state:
            raise KernelBuildError(str(_state["error"]))
        start = time.perf_counter()
        try:
            path = _build_and_load()
        except KernelBuildError as exc:
            _state["error"] = str(exc)
            logger.warning("%s; the fmodel.kernels ops are unavailable", exc)
            raise
        from . import _fake  # the ops exist now: give them their shape functions

        _fake.register()
        _state.update(loaded=True, seconds=time.perf_counter() - start, path=path)


def load_error() -> str | None:
    """Why the extension is unavailable (None if it loaded or was not tried yet)."""
    error = _state.get("error")
    return None if error is None else str(error)


def load_info() -> dict[str, object]:
    """The loaded library's path and the seconds its build or load took (empty before)."""
    return {k: v for k, v in _state.items() if k in ("path", "seconds")}
