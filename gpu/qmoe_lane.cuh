// The decoders' per-lane steps and the warp drivers built from them, for every codec the
// GPU runtime runs (spec §5.2 ternary rows, §12 packed levels, §13 escapes). Everything
// here is a template over the warp (qmoe_warp.cuh), so that the kernels (*.cu, DeviceWarp)
// and the host harness (host_harness.cpp, HostWarp) run the same code.
//
// One warp decodes one row. A ternary row is read 32 codewords at a time, one a lane:
//   1. each lane loads its codeword and, for S > 1, the map start state -> next_state of
//      its entry in every state (S independent byte loads, no chain), a chunk ahead;
//   2. a warp scan composes those maps, so lane l learns the state its codeword is read
//      in from the state the chunk started in (S <= 16: a map is one uint64, composed by
//      byte permutes for S <= 8; larger S walks the chunk's chain serially instead);
//   3. each lane loads its entry's record (Dictionary.runtime_records) and a warp scan
//      of the lengths gives its offset in the row;
//   4. each lane visits its entry's nonzeros (a decode writes them, a product adds up
//      the inputs under them).
// Inputs were validated by the caller (offsets against the codes array, tables against
// §5.6); what only decoding shows comes back as a ROW_* status, and no write lands
// outside the row.
#pragma once

#include "qmoe_warp.cuh"

#define QM_ROW_OK 0
#define QM_ROW_EXTRA_CODES 1
#define QM_ROW_SHORT 2
#define QM_ROW_NONZERO_PAD 3

// states a scan map holds (4 bits each in a uint64)
#define QM_SCAN_STATES 16

template <class W, class T> using Lanes = typename W::template lanes<T>;

// ------------------------------------------------------------------ dictionaries

// Dictionary.runtime_records(): per (state << 16 | codeword) `nw` uint64 words, word 0 =
// length (lb bits) | nnz << lb (kb bits) | s0 slots; later words sp slots; a slot is
// offset (lb bits) | hi << lb. `nxt` is Dictionary.runtime_next(), S states.
struct Dict {
    const qm_u64* rec;
    const qm_u8* nxt;
    int nw, lb, kb, s0, sp, S;
};

QM_HD qm_u64 qm_mask(int bits) { return (qm_u64(1) << bits) - 1; }

QM_HD qm_u32 qm_entry(qm_u32 state, qm_u32 code) { return (state << 16) | code; }

// A scan map (start state -> state after a run of codewords) lives in a uint64 in one of
// two packings: for S <= 8, a byte a state, so that composing two maps is two byte
// permutes (PRMT: each of 4 result bytes picked from 8 by a selector nibble); for
// S <= 16, a nibble a state, composed state by state. Slots past S hold states < 8 resp.
// 16 too, so every slot can be composed without a bound; only the first S mean anything.
QM_HD bool qm_byte_maps(int S) { return S <= 8; }

// __byte_perm(x, y, s): result byte n = byte (s >> 4n) & 7 of the 8 bytes of {y, x}
QM_HD qm_u32 qm_byte_perm(qm_u32 x, qm_u32 y, qm_u32 s) {
#if defined(__CUDA_ARCH__)
    return __byte_perm(x, y, s);
#else
    qm_u64 v = qm_u64(y) << 32 | x;
    qm_u32 r = 0;
    for (int n = 0; n < 4; ++n) r |= qm_u32((v >> (8 * ((s >> (4 * n)) & 7))) & 0xff) << (8 * n);
    return r;
#endif
}

QM_HD int qm_slot_bits(int S) { return qm_byte_maps(S) ? 8 : 4; }

QM_HD qm_u32 qm_apply(qm_u64 map, qm_u32 s, int S) {
    int b = qm_slot_bits(S);
    return qm_u32(map >> (b * s)) & qm_u32((1u << b) - 1);
}

// the scan map of a lane with no codeword: every state to itself
QM_HD qm_u64 qm_identity_map(int S) {
    return qm_byte_maps(S) ? 0x0706050403020100ull : 0xfedcba9876543210ull;
}

// codeword `code`'s entry in every state, as a map start state -> next_state
QM_HD qm_u64 qm_entry_map(const Dict& d, qm_u32 code) {
    int b = qm_slot_bits(d.S);
    qm_u64 m = 0;
    for (int s = 0; s < d.S; ++s) m |= qm_u64(d.nxt[qm_entry(s, code)]) << (b * s);
    return m;
}

// 4 byte-packed states (each < 8) -> the 4 nibbles of a PRMT selector
QM_HD qm_u32 qm_selector(qm_u32 bytes) {
    qm_u32 x = (bytes | bytes >> 4) & 0x00ff00ffu;
    return (x | x >> 8) & 0xffffu;
}

// `later` after `earlier`: s -> later(earlier(s))
QM_HD qm_u64 qm_compose(qm_u64 later, qm_u64 earlier, int S) {
    if (qm_byte_maps(S)) {
        qm_u32 lo = qm_u32(later), hi = qm_u32(later >> 32);
        return qm_u64(qm_byte_perm(lo, hi, qm_selector(qm_u32(earlier)))) |
               qm_u64(qm_byte_perm(lo, hi, qm_selector(qm_u32(earlier >> 32)))) << 32;
    }
    qm_u64 m = 0;
    QM_UNROLL
    for (int s = 0; s < QM_SCAN_STATES; ++s)
        m |= ((later >> (4 * ((earlier >> (4 * s)) & 15))) & 15) << (4 * s);
    return m;
}

// Walks an entry's nonzero slots: visit(offset in the entry, is_hi) for each, stopping
// early when visit returns false. Returns false if stopped.
template <class V>
QM_HD bool qm_each_nonzero(const Dict& d, qm_u32 e, qm_u64 word0, V visit) {
    const int lb = d.lb;
    const qm_u64 lmask = qm_mask(lb);
    int nnz = int((word0 >> lb) & qm_mask(d.kb));
    qm_u64 x = word0 >> (lb + d.kb);
    int left = d.s0, word = 0;
    for (int i = 0; i < nnz; ++i) {
        if (left == 0) {            // slots never straddle a word
            x = d.rec[qm_u64(e) * d.nw + (++word)];
            left = d.sp;
        }
        if (!visit(qm_u32(x & lmask), bool((x >> lb) & 1))) return false;
        x >>= lb + 1;
        --left;
    }
    return true;
}

// ------------------------------------------------------------------ warp scans

// exclusive prefix sum over the lanes; returns the total (every lane)
template <class W>
QM_HD qm_u32 qm_scan_add(W& w, const Lanes<W, qm_u32>& x, Lanes<W, qm_u32>& excl) {
    Lanes<W, qm_u32> inc = x;
    for (int d = 1; d < QM_WARP; d <<= 1) {
        Lanes<W, qm_u32> up = w.shift_up(inc, d);
        w.each([&](int l) { if (l >= d) inc[l] += up[l]; });
    }
    w.each([&](int l) { excl[l] = inc[l] - x[l]; });
    return w.broadcast(inc, QM_WARP - 1);
}

// A chunk of a row: up to 32 codewords, one a lane (active lanes are a prefix of the
// warp), and for the scan each one's entry map. Loaded a chunk ahead, so that its loads
// overlap the work on the chunk before.
template <class W> struct Chunk {
    Lanes<W, qm_u32> code;
    Lanes<W, bool> act;
    Lanes<W, qm_u64> map;
};

QM_HD bool qm_scans(const Dict& d) { return d.S > 1 && d.S <= QM_SCAN_STATES; }

template <class W>
QM_HD void qm_load_codes(W& w, const qm_u16* codes, qm_i64 start, qm_i64 n, qm_i64 j0,
                         Chunk<W>& c) {
    w.each([&](int l) {
        c.act[l] = j0 + l < n;
        c.code[l] = c.act[l] ? codes[start + j0 + l] : 0u;
    });
}

template <class W>
QM_HD void qm_load_maps(W& w, const Dict& d, Chunk<W>& c) {
    if (!qm_scans(d)) return;
    w.each([&](int l) {
        c.map[l] = c.act[l] ? qm_entry_map(d, c.code[l]) : qm_identity_map(d.S);
    });
}

// Sets st[l], the state lane l's codeword is read in, for a chunk entered in `state`,
// and returns the state the chunk leaves.
template <class W>
QM_HD qm_u32 qm_chunk_states(W& w, const Dict& d, const Chunk<W>& c, qm_u32 state,
                             Lanes<W, qm_u32>& st) {
    if (d.S == 1) {
        w.each([&](int l) { st[l] = 0; });
        return 0;
    }
    if (qm_scans(d)) {
        Lanes<W, qm_u64> f = c.map;
        for (int k = 1; k < QM_WARP; k <<= 1) {   // f[l] becomes lanes 0..l's maps composed
            Lanes<W, qm_u64> g = w.shift_up(f, k);
            w.each([&](int l) { if (l >= k) f[l] = qm_compose(f[l], g[l], d.S); });
        }
        Lanes<W, qm_u64> before = w.shift_up(f, 1);
        w.each([&](int l) { st[l] = l == 0 ? state : qm_apply(before[l], state, d.S); });
        return qm_apply(w.broadcast(f, QM_WARP - 1), state, d.S);
    }
    // more states than a map holds: every lane walks the chunk's chain (same addresses,
    // one load a codeword) and keeps its own step
    for (int i = 0; i < QM_WARP; ++i) {
        qm_u32 code = w.broadcast(c.code, i);
        bool on = w.broadcast(c.act, i);
        if (!on) break;
        w.each([&](int l) { if (l == i) st[l] = state; });
        state = d.nxt[qm_entry(state, code)];
    }
    return state;
}

// ------------------------------------------------------------------ ternary rows (§5.2)

// Decodes one row's codewords codes[start .. start + n) of a `cols`-wide row; `visit`
// gets span(w, p0, p1) for every chunk's run of the row (before its nonzeros, ordered by
// w.sync()) and nonzero(lane, column, is_hi) for each nonzero inside the row. Returns the
// row's ROW_* status; a failed row's visits stop at the chunk that shows the failure.
template <class W, class V>
QM_HD int qm_ternary_row(W& w, const Dict& d, const qm_u16* codes, qm_i64 start, qm_i64 n,
                         qm_i64 cols, V& visit) {
    const qm_u64 lmask = qm_mask(d.lb);
    qm_u32 state = 0;
    qm_i64 pos = 0;
    Chunk<W> cur, next;
    qm_load_codes(w, codes, start, n, 0, cur);
    qm_load_maps(w, d, cur);
    for (qm_i64 j0 = 0; j0 < n; j0 += QM_WARP) {
        Lanes<W, qm_u32> st, len, off;
        Lanes<W, qm_u64> word0;
        Lanes<W, bool> past, pad;
        qm_load_codes(w, codes, start, n, j0 + QM_WARP, next);
        state = qm_chunk_states(w, d, cur, state, st);
        w.each([&](int l) {
            word0[l] = cur.act[l] ? d.rec[qm_u64(qm_entry(st[l], cur.code[l])) * d.nw] : 0;
            len[l] = qm_u32(word0[l] & lmask);
        });
        qm_u32 total = qm_scan_add(w, len, off);
        qm_i64 end = pos + total < cols ? pos + total : cols;
        if (pos < end) visit.span(w, pos, end);
        w.sync();
        w.each([&](int l) {
            qm_i64 p0 = pos + off[l];
            past[l] = cur.act[l] && p0 >= cols;      // a codeword starting past the row
            pad[l] = false;
            if (cur.act[l] && !past[l]) {
                pad[l] = !qm_each_nonzero(d, qm_entry(st[l], cur.code[l]), word0[l],
                                          [&](qm_u32 o, bool hi) {
                    if (p0 + o >= cols) return false;
                    visit.nonzero(l, p0 + o, hi);
                    return true;
                });
            }
        });
        // only the codeword that straddles the row's end can put a nonzero past it, and it
        // comes before any that starts past the end
        if (w.ballot(pad)) return QM_ROW_NONZERO_PAD;
        if (w.ballot(past)) return QM_ROW_EXTRA_CODES;
        pos += total;
        if (j0 + QM_WARP < n) qm_load_maps(w, d, next);
        cur = next;
    }
    return pos < cols ? QM_ROW_SHORT : QM_ROW_OK;
}

// ------------------------------------------------------------------ output types

// Dense outputs are float32, or the bits of float16 / bfloat16 rounded to nearest even
// (what numpy's and torch's casts give); written here so host and device agree exactly.
QM_HD qm_u32 qm_f32_bits(float f) {
    union { float f; qm_u32 u; } v;
    v.f = f;
    return v.u;
}

QM_HD qm_u16 qm_to_bf16(float f) {
    qm_u32 u = qm_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return qm_u16((u >> 16) | 0x40);   // NaN stays NaN
    return qm_u16((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

QM_HD qm_u16 qm_to_f16(float f) {
    qm_u32 u = qm_f32_bits(f);
    qm_u32 sign = (u >> 16) & 0x8000u;
    qm_u32 a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return qm_u16(sign | 0x7e00u);                     // NaN
    if (a >= 0x477ff000u) return qm_u16(sign | 0x7c00u);                    // rounds to inf
    if (a < 0x38800000u) {                                                  // subnormal / 0
        if (a < 0x33000000u) return qm_u16(sign);                           // below half ulp
        qm_u32 e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;
        int shift = int(126 - e);           // m * 2^(e - 150) in units of 2^-24: m >> shift
        qm_u32 q = m >> shift, rem = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
        if (rem > halfway || (rem == halfway && (q & 1))) ++q;
        return qm_u16(sign | q);
    }
    qm_u32 r = a + 0xfffu + ((a >> 13) & 1);                               // nearest even
    return qm_u16(sign | ((r - 0x38000000u) >> 13));
}

struct OutF32 {
    typedef float T;
    static QM_HD T from(float f) { return f; }
};
struct OutF16 {
    typedef qm_u16 T;
    static QM_HD T from(float f) { return qm_to_f16(f); }
};
struct OutBF16 {
    typedef qm_u16 T;
    static QM_HD T from(float f) { return qm_to_bf16(f); }
};

// ------------------------------------------------------------------ ternary visits

// a row of symbols (int8 0/1/2) or of values (0, lo, hi converted once a row)
template <class T>
struct WriteRow {
    T* out;
    T zero, lo, hi;
    template <class W> QM_HD void span(W& w, qm_i64 p0, qm_i64 p1) {
        w.each([&](int l) { for (qm_i64 p = p0 + l; p < p1; p += QM_WARP) out[p] = zero; });
    }
    QM_HD void nonzero(int, qm_i64 p, bool is_hi) { out[p] = is_hi ? hi : lo; }
};

// Y[b, row] partial sums: acc[lane][b] += value * x[column * B + b], x transposed
// [cols, B] (row-major, B inputs a column, contiguous)
template <class W, int B>
struct AccumulateRow {
    struct Acc { float v[B]; };
    const float* x;
    float lo, hi;
    Lanes<W, Acc> acc;
    template <class WW> QM_HD void span(WW&, qm_i64, qm_i64) {}
    QM_HD void nonzero(int l, qm_i64 p, bool is_hi) {
        float v = is_hi ? hi : lo;
        const float* xp = x + p * B;
QM_UNROLL
        for (int b = 0; b < B; ++b) acc[l].v[b] += v * xp[b];
    }
};

// y[b * rows + r] for b < batch from the lanes' partial sums; lane b writes input b's
template <class W, int B>
QM_HD void qm_write_sums(W& w, const Lanes<W, typename AccumulateRow<W, B>::Acc>& acc,
                         float* y, qm_i64 rows, qm_i64 r, int batch) {
QM_UNROLL
    for (int b = 0; b < B; ++b) {
        Lanes<W, float> part;
        w.each([&](int l) { part[l] = acc[l].v[b]; });
        float s = w.sum(part);
        w.each([&](int l) { if (l == b && b < batch) y[b * rows + r] = s; });
    }
}

template <class W, int B>
QM_HD int qm_ternary_matmul_row(W& w, const Dict& d, const qm_u16* codes, qm_i64 start,
                                qm_i64 n, qm_i64 cols, float lo, float hi, const float* x,
                                float* y, qm_i64 rows, qm_i64 r, int batch) {
    AccumulateRow<W, B> v;
    v.x = x;
    v.lo = lo;
    v.hi = hi;
    w.each([&](int l) {
        for (int b = 0; b < B; ++b) v.acc[l].v[b] = 0.0f;
    });
    int status = qm_ternary_row(w, d, codes, start, n, cols, v);
    qm_write_sums<W, B>(w, v.acc, y, rows, r, batch);
    return status;
}

// ------------------------------------------------------------------ packed levels (§12)

// Level `i` of a packed row of `nbytes` bytes: bits i*b .. i*b+b-1, least significant
// first; a level never spans more than two bytes (b <= 4).
QM_HD qm_u32 qm_level(const qm_u8* q, qm_i64 nbytes, qm_i64 i, int bits) {
    qm_i64 bit = i * bits;
    qm_i64 byte = bit >> 3;
    qm_u32 v = q[byte];
    if (byte + 1 < nbytes) v |= qm_u32(q[byte + 1]) << 8;
    return (v >> (bit & 7)) & qm_u32(qm_mask(bits));
}

// whether a packed row's bits after its last level are not all zero
QM_HD bool qm_padding_set(const qm_u8* q, qm_i64 nbytes, qm_i64 cols, int bits) {
    int used = int((cols * bits) & 7);
    return used && (q[nbytes - 1] >> used);
}

// §12 value: float32(scale) * (float32(level) - float32(zero)), binary32
QM_HD float qm_kbit_value(float scale, qm_u32 level, qm_u32 zero) {
    return scale * (float(level) - float(zero));
}

// one §12 row: levels into `levels` (uint8) or values into `values` (either may be null);
// returns whether its padding bits are set
template <class W, class O>
QM_HD bool qm_kbit_decode_row(W& w, const qm_u8* q, qm_i64 nbytes, qm_i64 cols, int bits,
                              qm_i64 group_size, const float* scales, const qm_u8* zeros,
                              qm_u8* levels, typename O::T* values) {
    w.each([&](int l) {
        for (qm_i64 i = l; i < cols; i += QM_WARP) {
            qm_u32 v = qm_level(q, nbytes, i, bits);
            if (levels) levels[i] = qm_u8(v);
            if (values) {
                qm_i64 g = i / group_size;
                values[i] = O::from(qm_kbit_value(scales[g], v, zeros[g]));
            }
        }
    });
    return qm_padding_set(q, nbytes, cols, bits);
}

template <class W, int B>
QM_HD bool qm_kbit_matmul_row(W& w, const qm_u8* q, qm_i64 nbytes, qm_i64 cols, int bits,
                              qm_i64 group_size, const float* scales, const qm_u8* zeros,
                              const float* x, float* y, qm_i64 rows, qm_i64 r, int batch) {
    Lanes<W, typename AccumulateRow<W, B>::Acc> acc;
    w.each([&](int l) {
        for (int b = 0; b < B; ++b) acc[l].v[b] = 0.0f;
        for (qm_i64 i = l; i < cols; i += QM_WARP) {
            qm_i64 g = i / group_size;
            float v = qm_kbit_value(scales[g], qm_level(q, nbytes, i, bits), zeros[g]);
            const float* xp = x + i * B;
QM_UNROLL
            for (int b = 0; b < B; ++b) acc[l].v[b] += v * xp[b];
        }
    });
    qm_write_sums<W, B>(w, acc, y, rows, r, batch);
    return qm_padding_set(q, nbytes, cols, bits);
}

// ------------------------------------------------------------------ escapes (§13)

// One uint-dict16 row from its decoded ternary symbols `sym`: the levels (the zero point,
// one step below it for symbol 1, above for 2), the row's n escapes (`ecols`, `elevels`)
// replacing theirs, written as values. Returns whether a §13 rule fails: an escape column
// outside the row or not increasing, an escape level >= 2^bits, less than two steps from
// its zero point or on the other side of its symbol, or a plain level outside
// 0 .. 2^bits - 1. Idx is the index type of `ecols` (uint16 or uint32).
template <class W, class O, class Idx>
QM_HD bool qm_dict_values_row(W& w, const signed char* sym, qm_i64 cols, int bits,
                              qm_i64 group_size, const float* scales, const qm_u8* zeros,
                              const Idx* ecols, const qm_u8* elevels, qm_i64 n,
                              typename O::T* values) {
    const int maxq = (1 << bits) - 1;
    Lanes<W, bool> bad;
    w.each([&](int l) {
        bad[l] = false;
        for (qm_i64 k = l; k < n; k += QM_WARP) {
            qm_i64 c = ecols[k];
            if (c >= cols || (k > 0 && qm_i64(ecols[k - 1]) >= c) || elevels[k] > maxq) {
                bad[l] = true;
                continue;
            }
            int step = int(elevels[k]) - int(zeros[c / group_size]);
            int s = sym[c];
            if (step < 2 && step > -2) bad[l] = true;
            if (s == 0 || (step > 0) != (s == 2)) bad[l] = true;
        }
    });
    if (w.ballot(bad)) return true;
    w.each([&](int l) {
        for (qm_i64 i = l; i < cols; i += QM_WARP) {
            qm_i64 g = i / group_size;
            int s = sym[i];
            int level = int(zeros[g]) + (s == 2) - (s == 1);
            if (level < 0 || level > maxq) {
                // fine only where an escape replaces it (escape columns are sorted)
                qm_i64 a = 0, b = n;
                while (a < b) {
                    qm_i64 m = (a + b) / 2;
                    if (qm_i64(ecols[m]) < i) a = m + 1; else b = m;
                }
                if (a == n || qm_i64(ecols[a]) != i) bad[l] = true;
                level = 0;
            }
            values[i] = O::from(qm_kbit_value(scales[g], qm_u32(level), zeros[g]));
        }
    });
    if (w.ballot(bad)) return true;
    w.sync();
    w.each([&](int l) {
        for (qm_i64 k = l; k < n; k += QM_WARP) {
            qm_i64 c = ecols[k], g = c / group_size;
            values[c] = O::from(qm_kbit_value(scales[g], elevels[k], zeros[g]));
        }
    });
    return false;
}

// Y[b, row] += the escapes' share of a fused uint-dict16 product (one group a row): the
// stream put s * sign(step) at an escape's column, its weight is s * step.
template <class W, int B, class Idx>
QM_HD void qm_escape_corrections_row(W& w, float scale, qm_u8 zero, const Idx* ecols,
                                     const qm_u8* elevels, qm_i64 n, const float* x, float* y,
                                     qm_i64 rows, qm_i64 r, int batch) {
    Lanes<W, typename AccumulateRow<W, B>::Acc> acc;
    w.each([&](int l) {
        for (int b = 0; b < B; ++b) acc[l].v[b] = 0.0f;
        for (qm_i64 k = l; k < n; k += QM_WARP) {
            int step = int(elevels[k]) - int(zero);
            float v = scale * float(step - (step > 0 ? 1 : -1));
            const float* xp = x + qm_i64(ecols[k]) * B;
QM_UNROLL
            for (int b = 0; b < B; ++b) acc[l].v[b] += v * xp[b];
        }
    });
QM_UNROLL
    for (int b = 0; b < B; ++b) {
        Lanes<W, float> part;
        w.each([&](int l) { part[l] = acc[l].v[b]; });
        float s = w.sum(part);
        w.each([&](int l) { if (l == b && b < batch) y[b * rows + r] += s; });
    }
}
