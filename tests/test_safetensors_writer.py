import json
import os
import struct
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from qmoefmt.io.checkpoint import dtype_of, numpy_dtype, open_checkpoint
from qmoefmt.io.safetensors_writer import SafetensorsWriter

DTYPES = (
    "bool int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16 bfloat16 float32 float64"
).split()


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    # Byte views work for every dtype, bf16 included, and for 0-d tensors once flattened.
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def write_all(path, arrays: dict[str, np.ndarray], metadata=None) -> None:
    entries = [(name, dtype_of(a), a.shape) for name, a in arrays.items()]
    with SafetensorsWriter(path, entries, metadata) as writer:
        for name, array in arrays.items():
            writer.write(name, array)


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    dt = numpy_dtype(dtype)
    size = int(np.prod(shape)) * dt.itemsize
    raw = np.frombuffer(draw(st.binary(min_size=size, max_size=size)), np.uint8).copy()
    if dtype == "bool":
        raw %= 2
    return raw.view(dt).reshape(shape)


@settings(max_examples=60, deadline=None)
@given(
    arrays=st.lists(tensors(), max_size=6),
    metadata=st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
)
def test_round_trip_through_reference_loaders(arrays, metadata):
    named = {f"tensor.{i}": a for i, a in enumerate(arrays)}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.safetensors")
        write_all(path, named, metadata)
        assert os.listdir(tmp) == ["out.safetensors"]

        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
        assert header_len % 8 == 0

        loaded = load_file(path)
        assert set(loaded) == set(named)
        with safe_open(path, framework="pt") as f:
            assert f.metadata() == metadata
            for name, array in named.items():
                tensor = f.get_tensor(name)
                assert tuple(tensor.shape) == array.shape
                assert str(tensor.dtype) == f"torch.{dtype_of(array)}"
                assert tensor_bytes(tensor) == array.tobytes()
                assert tensor_bytes(loaded[name]) == array.tobytes()

        with open_checkpoint(path) as ckpt:
            for source in ckpt.tensors():
                assert source.read().tobytes() == named[source.name].tobytes()


def test_declaration_order_is_kept_and_non_contiguous_input(tmp_path):
    path = tmp_path / "m.safetensors"
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    arrays = {"z": base.T, "a": np.arange(5, dtype=">i4"), "m": np.float64(2.5)}
    write_all(path, {k: np.asarray(v) for k, v in arrays.items()})
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    assert [header[k]["data_offsets"][0] for k in ("z", "a", "m")] == [0, 48, 68]
    loaded = load_file(str(path))
    np.testing.assert_array_equal(loaded["z"].numpy(), base.T)
    np.testing.assert_array_equal(loaded["a"].numpy(), np.arange(5))  # stored little-endian
    assert loaded["m"].shape == () and loaded["m"].item() == 2.5


def partial_files(directory) -> list[str]:
    return [p for p in os.listdir(directory) if p.endswith(".partial")]


@pytest.fixture
def writer(tmp_path):
    entries = [("a", "float32", (2, 3)), ("b", "bfloat16", (4,))]
    w = SafetensorsWriter(tmp_path / "m.safetensors", entries)
    yield w
    w.abort()


@pytest.mark.parametrize(
    "name, array, message",
    [
        ("b", np.zeros(4, numpy_dtype("bfloat16")), "expected tensor 'a' next"),
        ("a", np.zeros((2, 3), np.float64), "declared float32, got float64"),
        ("a", np.zeros((3, 2), np.float32), r"declared shape \(2, 3\)"),
        ("a", np.zeros((2, 3), np.complex64), "unsupported dtype"),
    ],
)
def test_write_misuse(writer, name, array, message):
    with pytest.raises(ValueError, match=message):
        writer.write(name, array)
    # A refused write leaves the writer usable.
    writer.write("a", np.zeros((2, 3), np.float32))


def test_extra_write_and_write_after_close(writer):
    writer.write("a", np.zeros((2, 3), np.float32))
    writer.write("b", np.zeros(4, numpy_dtype("bfloat16")))
    with pytest.raises(ValueError, match="already written"):
        writer.write("c", np.zeros(1, np.float32))
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.write("a", np.zeros((2, 3), np.float32))


def test_close_before_all_written_leaves_nothing(tmp_path, writer):
    writer.write("a", np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"\['b'\]"):
        writer.close()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "entries, metadata, message",
    [
        ([("a", "float32", (1,)), ("a", "float32", (1,))], None, "duplicate"),
        ([("a", "complex64", (1,))], None, "unsupported dtype"),
        ([("a", "float32", (-1,))], None, "invalid shape"),
        ([("a", "float32", (1.5,))], None, "invalid shape"),
        ([("__metadata__", "float32", (1,))], None, "invalid tensor name"),
        ([("a", "float32", (1,))], {"k": 1}, "metadata"),
    ],
)
def test_bad_declarations(tmp_path, entries, metadata, message):
    with pytest.raises(ValueError, match=message):
        SafetensorsWriter(tmp_path / "m.safetensors", entries, metadata)
    assert os.listdir(tmp_path) == []


def test_exception_mid_write_leaves_no_file(tmp_path):
    path = tmp_path / "m.safetensors"
    entries = [("a", "float32", (2,)), ("b", "float32", (2,))]
    with pytest.raises(RuntimeError, match="boom"):
        with SafetensorsWriter(path, entries) as writer:
            writer.write("a", np.ones(2, np.float32))
            assert partial_files(tmp_path) == ["m.safetensors.partial"]
            assert not path.exists()
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_failed_rewrite_keeps_previous_file(tmp_path):
    path = tmp_path / "m.safetensors"
    write_all(path, {"a": np.ones(2, np.float32)})
    before = path.read_bytes()
    with pytest.raises(ValueError):
        with SafetensorsWriter(path, [("a", "float32", (2,))]) as writer:
            writer.write("a", np.ones(3, np.float32))
    assert path.read_bytes() == before
    assert partial_files(tmp_path) == []
