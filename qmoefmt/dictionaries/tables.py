"""Dictionaries of the dictionary-coded codecs (`qmoe.ternary-dict16`, `qmoe.uint-dict16`)
as readers decode with them: the five expansion tables of spec §5.6.

A dictionary maps a 16-bit codeword, read in a decoder *state*, to a run of ternary
symbols. Readers only ever need the expansion tables below, stored as such (before 1.4)
or derived from a compact form (`compact`, §5.7); how a dictionary was built (QMoE's 2023
construction, or our Golomb-binarised parse trees) matters to encoders only.

Each entry is stored as its length and the list of its nonzero symbols, not as a symbol
string: entries are long (up to hundreds of zeros) but carry at most a handful of
nonzeros, which is also the form a decode-matmul kernel wants.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numba as nb
import numpy as np

from ..errors import FormatError
from ..format.constants import CODEWORDS, MAX_NNZ, MAX_STATES

# (array name, dtype, shape rule) in the order the content id hashes them.
TABLES = (
    ("length", np.dtype("<u2")),
    ("next_state", np.dtype("u1")),
    ("nnz", np.dtype("u1")),
    ("nz_pos", np.dtype("<u2")),
    ("nz_sym", np.dtype("u1")),
)


@dataclass
class Dictionary:
    kind: str                      # "qmoe-2023" | "golomb-v2f"
    params: dict                   # construction parameters, informative
    length: np.ndarray             # uint16 [S, 65536], symbols an entry expands to (>= 1)
    next_state: np.ndarray         # uint8  [S, 65536], state the next codeword is read in
    nnz: np.ndarray                # uint8  [S, 65536], nonzero symbols in the entry
    nz_pos: np.ndarray             # uint16 [S, 65536, K], their offsets in the entry
    nz_sym: np.ndarray             # uint8  [S, 65536, K], their symbols (1 = lo, 2 = hi)
    form: str = "tables"           # how a store holds it: "tables" (§5.6), "tree" or "trie" (§5.7)
    stored: dict | None = field(default=None, repr=False, compare=False)  # a compact form's arrays
    encoder: object = field(default=None, repr=False, compare=False)
    _runtime: object = field(default=None, repr=False, compare=False)
    _content_id: str | None = field(default=None, repr=False, compare=False)
    _chain: object = field(default=None, repr=False, compare=False)
    _slots: object = field(default=None, repr=False, compare=False)
    _max_length: int | None = field(default=None, repr=False, compare=False)

    @property
    def n_states(self) -> int:
        return int(self.length.shape[0])

    @property
    def max_nnz(self) -> int:
        return int(self.nz_pos.shape[2])

    @property
    def max_length(self) -> int:
        """The longest entry: a row of k codewords reaches at most k times this."""
        if self._max_length is None:
            self._max_length = int(self.length.max())
        return self._max_length

    def runtime_records(self) -> tuple[np.ndarray, int, int, int, int]:
        """Bit-packed copies of the entries for the decoders, never stored: each entry is
        uint64 words [length | nnz << LB | slot 0 | slot 1 ...], a slot being offset |
        hi-bit << LB (LB bits for offsets, so LB + 1 a slot), slots never straddling a
        word. Every ladder dictionary fits one word a codeword: golomb-v2f codewords are
        used near-uniformly, so the whole table is hot, and at 8 bytes an entry it stays
        in L2 where 16-byte records did not (2-3x faster decoding).
        -> (words [S * 65536, nw], LB, KB, slots in word 0, slots in each later word)."""
        if self._runtime is None:
            s, c, k = self.nz_pos.shape
            lb = max(1, int(self.length.max()).bit_length())
            kb = max(1, int(k).bit_length())
            w = lb + 1
            s0, sp = (64 - lb - kb) // w, 64 // w
            nw = 1 + -(-max(0, k - s0) // sp)
            rec = np.zeros((s * c, nw), np.uint64)
            u = np.uint64
            rec[:, 0] = self.length.astype(u).reshape(-1) | (self.nnz.astype(u).reshape(-1) << u(lb))
            for i in range(k):
                slot = (self.nz_pos[:, :, i].astype(u)
                        | ((self.nz_sym[:, :, i] == 2).astype(u) << u(lb))).reshape(-1)
                word, at = (0, lb + kb + i * w) if i < s0 else (1 + (i - s0) // sp, ((i - s0) % sp) * w)
                rec[:, word] |= slot << u(at)
            self._runtime = (rec, lb, kb, s0, sp)
        return self._runtime

    def runtime_slots(self) -> tuple[np.ndarray, int, int] | None:
        """The matmul kernels' entries, one uint64 word each, never stored: [length |
        slot 0 | slot 1 ...], LB bits for the length and LB + 2 a slot, slot i being
        3 * offset + class (class 0 for a slot past the entry's nonzeros, 1 lo, 2 hi),
        so that a kernel reads (offset, class) as one index into a [position, class]
        table. -> (words [S * 65536], LB, K slots), or None when K slots do not fit a
        word (no ladder dictionary, nor QMoE's)."""
        if self._slots is None:
            s, c, k = self.nz_pos.shape
            lb = max(1, int(self.length.max()).bit_length())
            if lb + k * (lb + 2) > 64:
                self._slots = False
            else:
                u = np.uint64
                words = self.length.astype(u).reshape(-1).copy()
                for i in range(k):
                    cls = np.where(i < self.nnz, self.nz_sym[:, :, i], 0).astype(u)
                    slot = self.nz_pos[:, :, i].astype(u) * u(3) + cls
                    words |= slot.reshape(-1) << u(lb + i * (lb + 2))
                self._slots = (words, lb, k)
        return self._slots or None

    def runtime_next(self) -> np.ndarray:
        """next_state flattened to [S * 65536], the (state << 16 | codeword) index the
        kernels use: the matmul kernels' state chain, a byte an entry so it stays in L2."""
        return self.next_state.reshape(-1)

    def runtime_chain(self) -> np.ndarray:
        """uint32 next_state | length << 8 per (state, codeword): what the decoder needs to
        find the next codeword's state and position, in a table a quarter of the records'
        size."""
        if self._chain is None:
            self._chain = (self.next_state.astype(np.uint32)
                           | self.length.astype(np.uint32) << 8).reshape(-1)
        return self._chain

    def tables(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name, _ in TABLES}

    def stored_arrays(self) -> dict[str, np.ndarray]:
        """What a store holds of it, in the order the content id hashes them: the five
        tables, or a compact form's arrays (§5.7) from which readers derive them."""
        if self.form == "tables":
            return {name: np.ascontiguousarray(getattr(self, name), dtype=dt)
                    for name, dt in TABLES}
        return self.stored

    @property
    def stored_nbytes(self) -> int:
        """Bytes of its stored arrays: what holding it costs a store."""
        return sum(a.nbytes for a in self.stored_arrays().values())

    @property
    def content_id(self) -> str:
        """sha256 over the stored arrays' little-endian bytes, in spec order (computed
        once: a dictionary is not modified after construction)."""
        if self._content_id is None:
            self._content_id = stored_content_id(self.stored_arrays())
        return self._content_id

    def validate(self, where: str = "dictionary") -> None:
        validate_tables(self.tables(), where)


def stored_content_id(stored: dict[str, np.ndarray]) -> str:
    """`sha256:` and the hex SHA-256 of a dictionary's stored arrays, in spec order (§5.6)."""
    h = hashlib.sha256()
    for a in stored.values():
        h.update(np.ascontiguousarray(a).tobytes())
    return "sha256:" + h.hexdigest()


def validate_tables(t: dict[str, np.ndarray], where: str) -> None:
    """Everything a decoder indexes with must be in range before it runs (Numba does not
    bounds-check). Raises FormatError naming the table and the first bad entry."""
    for name, dt in TABLES:
        a = t.get(name)
        if a is None:
            raise FormatError(where, f"missing table {name!r}")
        if a.dtype != dt.newbyteorder("=") and a.dtype != dt:
            raise FormatError(where, f"table {name!r} has dtype {a.dtype}, expected {dt}")
    length, nxt, nnz, pos, sym = (t[n] for n, _ in TABLES)
    if length.ndim != 2 or length.shape[1] != CODEWORDS:
        raise FormatError(where, f"table 'length' has shape {length.shape}, expected [S, {CODEWORDS}]")
    s = length.shape[0]
    if not 1 <= s <= MAX_STATES:
        raise FormatError(where, f"{s} states, limit is 1..{MAX_STATES}")
    for name, a in (("next_state", nxt), ("nnz", nnz)):
        if a.shape != length.shape:
            raise FormatError(where, f"table {name!r} has shape {a.shape}, expected {length.shape}")
    if pos.ndim != 3 or pos.shape[:2] != length.shape or sym.shape != pos.shape:
        raise FormatError(where, f"tables 'nz_pos'/'nz_sym' have shapes {pos.shape}/{sym.shape}, "
                                 f"expected [{s}, {CODEWORDS}, K]")
    k = pos.shape[2]
    if not 1 <= k <= MAX_NNZ:
        raise FormatError(where, f"K = {k} nonzeros per entry, limit is 1..{MAX_NNZ}")

    first = _first_bad(np.ascontiguousarray(length), np.ascontiguousarray(nxt),
                       np.ascontiguousarray(nnz), np.ascontiguousarray(pos),
                       np.ascontiguousarray(sym), s)
    for i, what in enumerate(("length is 0", f"next_state >= {s} states", f"nnz > K = {k}",
                              "nonzero offset >= length", "nonzero symbol not 1 or 2",
                              "padding slot not zero", "nonzero offsets not strictly increasing")):
        if first[i] >= 0:
            raise FormatError(where, f"state {first[i] // CODEWORDS} codeword "
                                     f"{first[i] % CODEWORDS}: {what}")


@nb.njit(cache=True)
def _first_bad(length, nxt, nnz, pos, sym, s):
    """One pass over the entries: for each of validate_tables' checks, in its order, the
    first entry (state * 65536 + codeword) failing it, or -1. One pass, not one numpy
    pass a check: loading a dictionary stays a few milliseconds (spec §5.7)."""
    first = np.full(7, -1, np.int64)
    k = pos.shape[2]
    for st in range(length.shape[0]):
        for c in range(length.shape[1]):
            e = st * length.shape[1] + c
            ln = length[st, c]
            n = np.int64(nnz[st, c])
            bad = (ln == 0, nxt[st, c] >= s, n > k)
            for i in range(3):
                if bad[i] and first[i] < 0:
                    first[i] = e
            for j in range(k):
                p = pos[st, c, j]
                y = sym[st, c, j]
                if j < n:
                    if p >= ln and first[3] < 0:
                        first[3] = e
                    if (y < 1 or y > 2) and first[4] < 0:
                        first[4] = e
                    if j > 0 and p <= pos[st, c, j - 1] and first[6] < 0:
                        first[6] = e
                elif (p != 0 or y != 0) and first[5] < 0:
                    first[5] = e
    return first
