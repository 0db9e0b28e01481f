"""Codec qmoe.uint-packed: bit packing round trips, strict padding, stores of 2/3/4 bits."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

import qmoefmt
from qmoefmt.codecs import uint_packed as uintpack
from qmoefmt.errors import FormatError
from qmoefmt.format.constants import KBIT_BITS
from qmoefmt.pack import PackOptions, pack
from qmoefmt.quantize.grids import kbit_dequant, kbit_rtn
from qmoefmt.store.verify import verify


def reference_pack(q: np.ndarray, bits: int) -> np.ndarray:
    """The spec's bit string, built bit by bit."""
    rows, cols = q.shape
    out = np.zeros((rows, uintpack.row_bytes(cols, bits)), np.uint8)
    for r in range(rows):
        for i in range(cols):
            for b in range(bits):
                j = i * bits + b
                out[r, j // 8] |= ((int(q[r, i]) >> b) & 1) << (j % 8)
    return out


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(KBIT_BITS), rows=st.integers(0, 6), cols=st.integers(0, 70),
       seed=st.integers(0, 2**31 - 1))
def test_pack_round_trip_matches_spec(bits, rows, cols, seed):
    q = np.random.default_rng(seed).integers(0, 1 << bits, (rows, cols), dtype=np.uint8)
    packed = uintpack.pack_levels(q, bits)
    assert np.array_equal(packed, reference_pack(q, bits))
    assert np.array_equal(uintpack.unpack_levels(packed, bits, cols), q)


def test_nonzero_padding_rejected():
    q = np.ones((2, 5), np.uint8)            # 5 x 3 bits = 15 bits: one padding bit
    packed = uintpack.pack_levels(q, 3)
    packed[1, -1] |= 0x80
    with pytest.raises(FormatError, match="row 1: nonzero padding"):
        uintpack.unpack_levels(packed, 3, 5)


def test_wrong_shape_rejected():
    with pytest.raises(FormatError, match="expected"):
        uintpack.unpack_levels(np.zeros((2, 3), np.uint8), 4, 7)


def test_levels_out_of_range_refused():
    with pytest.raises(ValueError):
        uintpack.pack_levels(np.full((1, 4), 4, np.uint8), 2)


@pytest.mark.parametrize("bits,group", [(2, None), (3, 16), (4, 7)])
def test_store_round_trip(tmp_path, bits, group):
    rng = np.random.default_rng(bits)
    w = {"blocks.0.mlp.experts.expert_0.wi.weight": rng.standard_normal((24, 50)).astype(np.float32),
         "blocks.0.mlp.experts.expert_1.wi.weight":
             (rng.standard_normal((9, 33)) * 0.02).astype(ml_dtypes.bfloat16),
         "blocks.0.norm.weight": np.ones(50, np.float32)}
    save_file(w, str(tmp_path / "m.safetensors"))
    pack(tmp_path / "m.safetensors", tmp_path / "s", PackOptions(
        experts=("*experts*",), bits=str(bits), group_size=group))
    assert verify(tmp_path / "s", deep=True) == []
    store = qmoefmt.open(tmp_path / "s")
    assert store.format_version == "1.5"      # its scales' logical dtypes (uint-packed: 1.1)
    for name, a in w.items():
        t = store[name]
        if "experts" not in name:
            assert t.codec == "qmoe.dense"
            continue
        assert t.codec == "qmoe.uint-packed"
        x = torch.from_numpy(a.astype(np.float32))
        q, scales, zeros = kbit_rtn(x, bits, group)
        assert np.array_equal(t.symbols(), q.numpy())
        expect = kbit_dequant(q, scales, zeros, group).numpy()
        assert np.array_equal(t.decode(), expect)
