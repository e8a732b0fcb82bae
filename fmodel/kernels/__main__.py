"""`python -m fmodel.kernels build`: compile (or load the cached) kernel extension now and print
where it is, how long it took and which code it runs; exit status 1 with the reason if it cannot
be built. `python -m fmodel.kernels info` prints the same without building."""

from __future__ import annotations

import sys

from ..errors import KernelBuildError
from . import _build, build


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "build"
    if command == "info":
        name = _build.extension_name()
        library = _build.build_directory(name) / f"{name}.so"
        print(f"{name}: {library} ({'built' if library.exists() else 'not built'})")
        return 0
    if command != "build":
        print(f"usage: python -m fmodel.kernels [build | info]; got {command!r}", file=sys.stderr)
        return 2
    try:
        info = build()
    except KernelBuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"fmodel.kernels: {info['path']} ({info['simd']}, {info['seconds']:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
