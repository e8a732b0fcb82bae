"""Read a small JSON file of a checkpoint (config.json, generation_config.json, a shard index)
strictly, cheaply and with one named error for every way it can be bad.

The rules, the same for every such file:

- at most `MAX_JSON_BYTES` (64 MiB; a real config is a few kB, the index of a 400B model
  a few hundred kB): a bigger file is refused before it is read;
- UTF-8 only, as Transformers reads them (`open(..., encoding="utf-8")`); a UTF-16/32 file
  (with or without byte-order mark) and a UTF-8 byte-order mark are refused with a message
  that says so (Transformers fails on them too);
- strict JSON: no `NaN` / `Infinity` literals (Python's json accepts them, JSON does not),
  no key twice in one object (parsers disagree on which one wins), integers of at most
  4300 digits (Python's int-from-str limit), nesting as deep as the parser's recursion
  allows (a 100,000-deep file is refused, not a RecursionError);
- the top level is an object.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..errors import ConfigError

__all__ = ["MAX_JSON_BYTES", "read_json_object"]

MAX_JSON_BYTES = 64 * 2**20

_BOMS = (
    (b"\xef\xbb\xbf", "a UTF-8 byte-order mark"),
    (b"\xff\xfe\x00\x00", "a UTF-32 byte-order mark"),
    (b"\x00\x00\xfe\xff", "a UTF-32 byte-order mark"),
    (b"\xff\xfe", "a UTF-16 byte-order mark"),
    (b"\xfe\xff", "a UTF-16 byte-order mark"),
)


class _JSONRefusal(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _JSONRefusal(f"{name} is not JSON (write a number or null)")


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _JSONRefusal(f"key {dup!r} appears twice in one object")
    return out


def _encoding_problem(raw: bytes) -> str | None:
    for bom, what in _BOMS:
        if raw.startswith(bom):
            return f"it starts with {what}"
    if len(raw) >= 2 and (raw[0] == 0 or raw[1] == 0):
        return "it looks like UTF-16 or UTF-32 (NUL bytes among the first characters)"
    return None


def read_json_object(path: str | os.PathLike, *, what: str = "JSON file", error: type = ConfigError) -> dict:
    """The object a small JSON file holds, read by the rules of this module.

    Arguments:
        path: the file.
        what: what the file is, for messages ("config file", "shard index").
        error: the exception class raised (a `FModelError` subclass taking one message).

    Returns:
        A new dict (the file's top-level object).

    Raises:
        `error`: the file is missing, too big, not UTF-8, not strict JSON, or not an object;
            the message starts with the path and says what was found and what was expected.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        if size > MAX_JSON_BYTES:
            raise error(f"{path}: {what} of {size} bytes, more than the {MAX_JSON_BYTES} a {what} may have")
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise error(f"{path}: expected a {what}, got a folder") from None
    except OSError as exc:
        raise error(f"{path}: {what} cannot be read ({exc})") from None
    problem = _encoding_problem(raw)
    if problem is not None:
        raise error(
            f"{path}: not valid JSON: {what}s are read as UTF-8 (as Transformers reads them); {problem}"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not valid JSON: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    try:
        data = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_pairs)
    except RecursionError:
        raise error(f"{path}: not valid JSON: nested too deeply for a {what}") from None
    except ValueError as exc:  # JSONDecodeError, the int digit limit, our refusals
        raise error(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object at the top level of a {what}, got {type(data).__name__}")
    return data
