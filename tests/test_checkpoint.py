import json
import struct

import h5py
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qmoefmt.io.checkpoint import CheckpointError, dtype_of, numpy_dtype, open_checkpoint

DTYPES = (
    "bool int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16 bfloat16 float32 float64"
).split()
SHAPES = [(3, 5), (), (0, 4), (2, 3, 4)]


def sample(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random bit patterns (NaNs and extremes included), valid booleans."""
    rng = np.random.default_rng(seed)
    dt = numpy_dtype(dtype)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * dt.itemsize, dtype=np.uint8)
    if dtype == "bool":
        raw %= 2
    return raw.view(dt).reshape(shape)


def all_dtype_arrays() -> dict[str, np.ndarray]:
    return {
        f"t.{dtype}.{i}": sample(dtype, shape, seed=i)
        for dtype in DTYPES
        for i, shape in enumerate(SHAPES)
    }


def to_torch(array: np.ndarray) -> torch.Tensor:
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


def assert_read_matches(ckpt, expected: dict[str, np.ndarray]) -> None:
    seen = []
    for source in ckpt.tensors():
        want = expected[source.name]
        assert source.dtype == dtype_of(want)
        assert source.shape == want.shape
        assert source.nbytes == want.nbytes
        got = source.read()
        assert got.dtype == numpy_dtype(source.dtype)
        assert got.shape == want.shape
        assert got.flags.c_contiguous and got.flags.owndata and got.flags.writeable
        assert got.tobytes() == want.tobytes(), source.name
        seen.append(source.name)
    assert sorted(seen) == sorted(expected)


# --- dtype helpers ------------------------------------------------------------------


@pytest.mark.parametrize("name", DTYPES)
def test_dtype_helpers_round_trip(name):
    assert dtype_of(numpy_dtype(name)) == name
    assert dtype_of(np.zeros(2, numpy_dtype(name))) == name


def test_dtype_of_ignores_byte_order_and_rejects_others():
    assert dtype_of(np.zeros(2, ">f4")) == "float32"
    assert dtype_of(np.zeros(2, ">i8")) == "int64"
    assert numpy_dtype("bfloat16") == np.dtype(ml_dtypes.bfloat16)
    for bad in (np.complex64, ml_dtypes.float8_e4m3fn, "V2", "U3"):
        with pytest.raises(ValueError):
            dtype_of(np.dtype(bad))
    with pytest.raises(ValueError, match="float8"):
        numpy_dtype("float8")


# --- safetensors --------------------------------------------------------------------


def test_safetensors_all_dtypes_round_trip(tmp_path):
    arrays = all_dtype_arrays()
    path = tmp_path / "m.safetensors"
    save_file({k: to_torch(v) for k, v in arrays.items()}, str(path))
    with open_checkpoint(path) as ckpt:
        assert ckpt.format == "safetensors"
        assert len(ckpt) == len(arrays)
        assert ckpt.names() == sorted(arrays)
        assert_read_matches(ckpt, arrays)


def save_shards(directory, arrays: dict[str, np.ndarray], n_shards: int) -> dict[str, str]:
    weight_map = {}
    names = list(arrays)
    for i in range(n_shards):
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: to_torch(arrays[n]) for n in names[i::n_shards]}
        save_file(part, str(directory / shard))
        weight_map.update(dict.fromkeys(part, shard))
    return weight_map


def test_sharded_directory_without_index(tmp_path):
    arrays = {f"layer.{i}.w": sample("bfloat16", (4, 3), seed=i) for i in range(7)}
    save_shards(tmp_path, arrays, n_shards=3)
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.format == "safetensors"
        assert ckpt.names() == sorted(arrays)  # sorted across shards, not shard by shard
        assert_read_matches(ckpt, arrays)


def test_sharded_directory_with_index(tmp_path):
    arrays = {f"layer.{i}.w": sample("float32", (2, i), seed=i) for i in range(6)}
    weight_map = save_shards(tmp_path, arrays, n_shards=2)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    # A stray file the index does not name must not be read.
    save_file({"stray": torch.zeros(1)}, str(tmp_path / "consolidated.safetensors"))
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.names() == sorted(arrays)
        assert_read_matches(ckpt, arrays)


def test_index_disagreeing_with_shard_is_an_error(tmp_path):
    arrays = {"a": sample("float32", (2,)), "b": sample("float32", (2,))}
    weight_map = save_shards(tmp_path, arrays, n_shards=1)
    weight_map["c"] = weight_map["a"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"model-00001-of-00001\.safetensors.*'c'"):
        open_checkpoint(tmp_path)


def test_index_shard_outside_directory_is_refused(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../elsewhere.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="plain file name"):
        open_checkpoint(tmp_path)


def test_duplicate_tensor_across_shards(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "one.safetensors"))
    save_file({"a": torch.ones(2)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(CheckpointError, match=r"two\.safetensors.*'a'.*one\.safetensors"):
        open_checkpoint(tmp_path)


def test_directory_without_safetensors(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        open_checkpoint(tmp_path)


def test_unsupported_safetensors_dtype_names_file_and_tensor(tmp_path):
    path = tmp_path / "fp8.safetensors"
    save_file(
        {"ok": torch.zeros(2), "scales": torch.zeros(2, dtype=torch.float8_e4m3fn)}, str(path)
    )
    with open_checkpoint(path) as ckpt:
        assert ckpt.names() == ["ok", "scales"]  # listing works without reading
        tensors = ckpt.tensors()
        assert next(tensors).name == "ok"
        with pytest.raises(CheckpointError, match=rf"{path}.*'scales'.*F8_E4M3"):
            next(tensors)


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"a": torch.zeros(100), "b": torch.ones(100)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 50])
    with pytest.raises(CheckpointError, match=rf"{path}.*truncated"):
        open_checkpoint(path)
    path.write_bytes(data[:20])  # cut inside the header
    with pytest.raises(CheckpointError, match=str(path)):
        open_checkpoint(path)
    path.write_bytes(data[:3])
    with pytest.raises(CheckpointError, match=str(path)):
        open_checkpoint(path)


def test_truncated_after_open_fails_on_read(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(100)}, str(path))
    data = path.read_bytes()
    with open_checkpoint(path) as ckpt:
        (source,) = ckpt.tensors()
        path.write_bytes(data[:-8])
        with pytest.raises(CheckpointError, match=rf"{path}.*'a'.*truncated"):
            source.read()


def write_raw_safetensors(path, header: object, data: bytes = b"") -> None:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    "header, data",
    [
        (b"\xff\xfe not json", b""),
        (b"[1, 2]", b""),
        ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
        ),
    ],
)
def test_corrupt_safetensors_header(tmp_path, header, data):
    path = tmp_path / "bad.safetensors"
    write_raw_safetensors(path, header, data)
    with pytest.raises(CheckpointError, match=str(path)):
        open_checkpoint(path)


def test_absurd_header_length(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(CheckpointError, match=rf"{path}.*header length"):
        open_checkpoint(path)


# --- PyTorch ------------------------------------------------------------------------


def test_torch_all_dtypes_round_trip_in_dict_order(tmp_path):
    arrays = dict(reversed(all_dtype_arrays().items()))  # not sorted: dict order must be kept
    path = tmp_path / "model.pt"
    torch.save({k: to_torch(v) for k, v in arrays.items()}, path)
    with open_checkpoint(path) as ckpt:
        assert ckpt.format == "torch"
        assert ckpt.names() == list(arrays)
        assert_read_matches(ckpt, arrays)


def test_torch_legacy_format(tmp_path):
    arrays = {"w": sample("bfloat16", (3, 4)), "b": sample("int64", (3,))}
    path = tmp_path / "pytorch_model.bin"
    state = {k: to_torch(v) for k, v in arrays.items()}
    torch.save(state, path, _use_new_zipfile_serialization=False)
    with open_checkpoint(path) as ckpt:
        assert_read_matches(ckpt, arrays)


def test_torch_views_parameters_and_shared_storage(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {
        "transposed": base.t(),
        "param": torch.nn.Parameter(base.clone()),
        "tied": base,
        "slice": base[1:, ::2],
    }
    path = tmp_path / "m.pth"
    torch.save(state, path)
    with open_checkpoint(path) as ckpt:
        got = {s.name: s.read() for s in ckpt.tensors()}
    for name, tensor in state.items():
        assert got[name].flags.c_contiguous
        np.testing.assert_array_equal(got[name], tensor.detach().numpy())


@pytest.mark.parametrize("key", ["state_dict", "model"])
def test_torch_wrapped_state_dict(tmp_path, key):
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, key: {"w": torch.ones(2, 2)}, "lr": 0.1}, path)
    with open_checkpoint(path) as ckpt:
        assert ckpt.names() == ["w"]


def test_torch_non_tensor_value_is_refused(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2), "step": 7}, path)
    with pytest.raises(CheckpointError, match=rf"{path}.*'step'.*int"):
        open_checkpoint(path)
    torch.save([torch.ones(2)], path)
    with pytest.raises(CheckpointError, match=rf"{path}.*list"):
        open_checkpoint(path)


EXECUTED = []


def _record(token):
    EXECUTED.append(token)
    return token


class Payload:
    """Unpickling this runs _record: a stand-in for arbitrary code in a pickle."""

    def __reduce__(self):
        return (_record, ("payload ran",))


def test_torch_custom_object_refused_without_running_it(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match=rf"{path}.*weights_only.*_record"):
        open_checkpoint(path)
    assert EXECUTED == []


def test_torch_unsupported_dtype(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2), "c": torch.zeros(2, dtype=torch.complex64)}, path)
    with open_checkpoint(path) as ckpt:
        assert len(ckpt) == 2
        with pytest.raises(CheckpointError, match=rf"{path}.*'c'.*complex64"):
            list(ckpt.tensors())


def test_torch_garbage_file(tmp_path):
    path = tmp_path / "junk.bin"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match=str(path)):
        open_checkpoint(path)


# --- HDF5 ---------------------------------------------------------------------------


def test_hdf5_nested_groups_all_dtypes(tmp_path):
    arrays = all_dtype_arrays()
    path = tmp_path / "m.h5"
    with h5py.File(path, "w") as f:
        for name, array in arrays.items():
            f[name.replace(".", "/")] = array
        f["top"] = sample("float32", (2, 2))
    arrays["top"] = sample("float32", (2, 2))
    with open_checkpoint(path) as ckpt:
        assert ckpt.format == "hdf5"
        assert ckpt.names() == sorted(arrays)  # h5py visits in name order
        assert_read_matches(ckpt, arrays)


def test_hdf5_big_endian_is_read_little_endian(tmp_path):
    path = tmp_path / "m.hdf5"
    want = np.arange(6, dtype=">f4").reshape(2, 3)
    with h5py.File(path, "w") as f:
        f["g/w"] = want
    with open_checkpoint(path) as ckpt:
        (source,) = ckpt.tensors()
        got = source.read()
    assert source.name == "g.w"
    assert got.dtype.str == "<f4"
    np.testing.assert_array_equal(got, want)


def test_hdf5_name_collision(tmp_path):
    path = tmp_path / "m.h5"
    with h5py.File(path, "w") as f:
        f["a.b"] = np.zeros(2)
        f["a/b"] = np.zeros(2)
    with pytest.raises(CheckpointError, match=rf"{path}.*'a\.b'") as info:
        open_checkpoint(path)
    assert "/a/b" in str(info.value) and "/a.b" in str(info.value)


def test_hdf5_unsupported_datasets(tmp_path):
    path = tmp_path / "m.h5"
    with h5py.File(path, "w") as f:
        f["a_text"] = np.array([b"abc"])
        f["b_empty"] = h5py.Empty("f4")
    with open_checkpoint(path) as ckpt:
        assert ckpt.names() == ["a_text", "b_empty"]
        with pytest.raises(CheckpointError, match=rf"{path}.*'a_text'.*unsupported dtype"):
            list(ckpt.tensors())


def test_hdf5_garbage_file(tmp_path):
    path = tmp_path / "junk.h5"
    path.write_bytes(b"not hdf5 at all")
    with pytest.raises(CheckpointError, match=str(path)):
        open_checkpoint(path)


# --- common -------------------------------------------------------------------------


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(CheckpointError, match="missing.safetensors"):
        open_checkpoint(tmp_path / "missing.safetensors")
    other = tmp_path / "weights.npz"
    other.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"weights\.npz.*\.npz"):
        open_checkpoint(other)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".h5"])
def test_read_after_close(tmp_path, suffix):
    path = tmp_path / f"m{suffix}"
    if suffix == ".safetensors":
        save_file({"w": torch.ones(2)}, str(path))
    elif suffix == ".pt":
        torch.save({"w": torch.ones(2)}, path)
    else:
        with h5py.File(path, "w") as f:
            f["w"] = np.ones(2, np.float32)
    ckpt = open_checkpoint(path)
    (source,) = ckpt.tensors()
    ckpt.close()
    ckpt.close()  # idempotent
    with pytest.raises(CheckpointError, match=rf"{path}.*'w'.*closed"):
        source.read()
