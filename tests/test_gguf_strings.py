"""GGUF string arrays (`StringArray`): bounded and checked at parse, decoded on first use, and
equal to the list of str that was written."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fmodel.errors import CorruptFileError
from fmodel.io.gguf_file import read_gguf
from fmodel.io.gguf_parse import StringArray, parse_header

from .test_gguf import requires_gguf

KEY = "tokenizer.ggml.tokens"


def _write_strings(path, strings: list[str]) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_array(KEY, strings)
    w.add_string("after", "still read")  # the cursor lands after the array
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@requires_gguf
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(strings=st.lists(st.text(max_size=12), min_size=1, max_size=60), index=st.integers())
def test_a_string_array_reads_back_as_the_list_written(tmp_path, strings, index):
    path = tmp_path / "s.gguf"
    _write_strings(path, strings)
    value = parse_header(path).metadata[KEY]
    assert isinstance(value, StringArray)
    assert len(value) == len(strings)
    assert value == strings and strings == value and value == tuple(strings)
    assert list(value) == strings
    i = index % len(strings) - (len(strings) if index < 0 else 0)  # negative indexes too
    assert value[i] == strings[i]
    assert value[1:-1] == strings[1:-1]
    assert value.raw(0) == strings[0].encode()
    assert value != [*strings, "x"]
    assert parse_header(path).metadata["after"] == "still read"
    assert str(len(strings)) in repr(value)


@requires_gguf
def test_get_reads_a_string_array_as_a_list(tmp_path):
    path = tmp_path / "s.gguf"
    _write_strings(path, ["a", "b c"])
    file = read_gguf(path)
    assert file.get(KEY, list) == ["a", "b c"]
    with pytest.raises(Exception, match=r"expected str"):
        file.get(KEY, str)


@requires_gguf
def test_invalid_utf8_is_refused_at_parse_naming_the_item(tmp_path):
    """The check runs when the header is parsed, not when a string is first read."""
    path = tmp_path / "s.gguf"
    _write_strings(path, ["fine", "\x01broken", "fine too"])
    data = bytearray(path.read_bytes())
    data[data.index(b"\x01broken")] = 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(
        CorruptFileError, match=r"metadata array 'tokenizer.ggml.tokens'\[1\] is not valid UTF-8"
    ):
        parse_header(path)


def test_string_array_is_read_only_and_unhashable():
    import array

    value = StringArray(b"\x01\x00\x00\x00\x00\x00\x00\x00a", array.array("Q", [8, 17]))
    assert value == ["a"]
    with pytest.raises(TypeError):
        hash(value)
    with pytest.raises(TypeError):
        value[0] = "b"  # type: ignore[index]
