"""The index checks' fast paths (spec §4.3-§4.5, §9) accept exactly what the rules do, and
parsing leaves the garbage collector as it found it."""
from __future__ import annotations

import gc
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmoefmt.errors import FormatError, LimitError
from qmoefmt.format import metadata as M
from qmoefmt.format import records as R
from qmoefmt.format.constants import MAX_ELEMENTS, MAX_NAME_BYTES, MAX_RANK

# values a JSON shape member can hold, weighted to the edges of every rule
dims = st.one_of(st.integers(-3, 9), st.sampled_from([MAX_ELEMENTS, MAX_ELEMENTS + 1, 2**20,
                                                      2**21, 2**64]),
                 st.booleans(), st.floats(allow_nan=False, max_value=1e3, min_value=-1e3),
                 st.none(), st.text(max_size=2))
shapes = st.one_of(st.lists(dims, max_size=MAX_RANK + 2), dims, st.dictionaries(st.text(max_size=1), dims))


def rule(value):
    """§4.5/§9 as the spec words it: 'tuple' or the error class."""
    if not isinstance(value, list) or not all(type(n) is int for n in value):
        return FormatError
    if len(value) > MAX_RANK:
        return LimitError
    if any(n < 0 for n in value):
        return FormatError
    if math.prod(value) > MAX_ELEMENTS or any(n > MAX_ELEMENTS for n in value):
        return LimitError
    return tuple


@settings(max_examples=3000, deadline=None)
@given(shapes)
def test_check_shape_accepts_exactly_the_rule(value):
    want = rule(value)
    if want is tuple:
        assert R.check_shape(value, "w", "shape") == tuple(value)
    else:
        with pytest.raises(FormatError) as e:
            R.check_shape(value, "w", "shape")
        assert type(e.value) is want


def record(**over):
    r = {"name": "a", "path": "tensors/a", "shape": [2, 3], "dtype": "float32",
         "codec": "dense", "source_sha256": "0" * 64,
         "arrays": {"data": {"data_type": "float32", "shape": [6], "crc32c": 0}}}
    r.update(over)
    return r


@settings(max_examples=2000, deadline=None)
@given(shapes)
def test_a_descriptor_shape_is_checked_as_any_shape(value):
    """One-dimensional descriptor shapes take a shortcut past check_shape; it must refuse
    what check_shape refuses, the element limit included."""
    r = record(arrays={"data": {"data_type": "float32", "shape": value, "crc32c": 0}})
    if rule(value) is tuple:
        assert R.tensor_record(r, 0, "root") == "a"
    else:
        with pytest.raises(FormatError) as e:
            R.tensor_record(r, 0, "root")
        assert type(e.value) is rule(value)


@pytest.mark.parametrize("name, ok", [
    ("a" * MAX_NAME_BYTES, True), ("a" * (MAX_NAME_BYTES + 1), False),
    ("é" * (MAX_NAME_BYTES // 2), True), ("é" * (MAX_NAME_BYTES // 2) + "a", False),
    # a JSON escape can spell a lone surrogate: counted as the writer counts it (3 bytes)
    ("\ud800" * (MAX_NAME_BYTES // 3), True), ("\ud800" * (MAX_NAME_BYTES // 3 + 1), False),
])
def test_name_bytes_are_counted_in_utf8(name, ok):
    r = record(name=name)
    if ok:
        assert R.tensor_record(r, 0, "root") == name
    else:
        with pytest.raises(LimitError, match="name longer than"):
            R.tensor_record(r, 0, "root")


@pytest.mark.parametrize("member, value, match", [
    ("crc32c", True, "malformed descriptor"), ("crc32c", 1.0, "malformed descriptor"),
    ("data_type", None, "malformed descriptor"),
])
def test_descriptor_types_stay_strict(member, value, match):
    desc = {"data_type": "float32", "shape": [6], "crc32c": 0, member: value}
    with pytest.raises(FormatError, match=match):
        R.tensor_record(record(arrays={"data": desc}), 0, "root")


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("doc", [b'{"a":[1,2,{"b":null}]}\n', b'{"a":1,"a":2}', b"[NaN]",
                                 b"[" * 100_000])
def test_parsing_leaves_the_collector_as_it_was(enabled, doc):
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        try:
            M.loads(doc)
        except ValueError:
            pass
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()
