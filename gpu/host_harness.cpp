// The kernels' decode logic on the host: every function below runs, row by row, the same
// warp driver (qmoe_lane.cuh) as the kernel of the same name in ternary.cu, kbit.cu and
// dict_levels.cu, with HostWarp simulating the 32 lanes. Built with g++ (or nvcc) as a
// shared library; qmoefmt/backends/cuda_host.py loads it, and the tests compare what it
// gives with the Python decoders and the conformance vectors.
#include "qmoe_lane.cuh"

#define QM_DICT_PARAMS                                                                  \
    const qm_u64 *rec, const qm_u8 *nxt, int nw, int lb, int kb, int s0, int sp, int S
#define QM_DICT Dict{rec, nxt, nw, lb, kb, s0, sp, S}

template <class O>
static void ternary_values(const qm_u16* codes, const qm_i64* offsets, qm_i64 rows,
                           qm_i64 cols, const Dict& d, const float* lo, const float* hi,
                           typename O::T* out, qm_u8* status) {
    HostWarp w;
    for (qm_i64 r = 0; r < rows; ++r) {
        WriteRow<typename O::T> v{out + r * cols, O::from(0.0f), O::from(lo[r]), O::from(hi[r])};
        status[r] = qm_u8(qm_ternary_row(w, d, codes, offsets[r], offsets[r + 1] - offsets[r],
                                         cols, v));
    }
}

template <int B>
static void ternary_matmul(const qm_u16* codes, const qm_i64* offsets, qm_i64 rows,
                           qm_i64 cols, const Dict& d, const float* lo, const float* hi,
                           const float* xt, int batch, float* y, qm_u8* status) {
    HostWarp w;
    for (qm_i64 r = 0; r < rows; ++r)
        status[r] = qm_u8(qm_ternary_matmul_row<HostWarp, B>(
            w, d, codes, offsets[r], offsets[r + 1] - offsets[r], cols, lo[r], hi[r], xt, y,
            rows, r, batch));
}

template <class O>
static void kbit_values(const qm_u8* q, qm_i64 rows, qm_i64 nbytes, qm_i64 cols, int bits,
                        qm_i64 group_size, const float* scales, const qm_u8* zeros,
                        qm_i64 groups, qm_u8* levels, typename O::T* out, qm_u8* bad) {
    HostWarp w;
    for (qm_i64 r = 0; r < rows; ++r)
        bad[r] = qm_kbit_decode_row<HostWarp, O>(
            w, q + r * nbytes, nbytes, cols, bits, group_size, scales ? scales + r * groups : 0,
            zeros ? zeros + r * groups : 0, levels ? levels + r * cols : 0,
            out ? out + r * cols : 0);
}

template <int B>
static void kbit_matmul(const qm_u8* q, qm_i64 rows, qm_i64 nbytes, qm_i64 cols, int bits,
                        qm_i64 group_size, const float* scales, const qm_u8* zeros,
                        qm_i64 groups, const float* xt, int batch, float* y, qm_u8* bad) {
    HostWarp w;
    for (qm_i64 r = 0; r < rows; ++r)
        bad[r] = qm_kbit_matmul_row<HostWarp, B>(w, q + r * nbytes, nbytes, cols, bits,
                                                 group_size, scales + r * groups,
                                                 zeros + r * groups, xt, y, rows, r, batch);
}

template <class O, class Idx>
static void dict_values(const signed char* sym, qm_i64 rows, qm_i64 cols, int bits,
                        qm_i64 group_size, const float* scales, const qm_u8* zeros,
                        qm_i64 groups, const qm_i64* ends, const Idx* ecols,
                        const qm_u8* elevels, typename O::T* out, qm_u8* bad) {
    HostWarp w;
    for (qm_i64 r = 0; r < rows; ++r)
        bad[r] = qm_dict_values_row<HostWarp, O, Idx>(
            w, sym + r * cols, cols, bits, group_size, scales + r * groups, zeros + r * groups,
            ecols + ends[r], elevels + ends[r], ends[r + 1] - ends[r], out + r * cols);
}

template <int B, class Idx>
static void escape_corrections(qm_i64 rows, const float* scales, const qm_u8* zeros,
                               qm_i64 groups, const qm_i64* ends, const Idx* ecols,
                               const qm_u8* elevels, const float* xt, int batch, float* y) {
    HostWarp w;
    for (qm_i64 r = 0; r < rows; ++r)
        qm_escape_corrections_row<HostWarp, B, Idx>(w, scales[r * groups], zeros[r * groups],
                                                    ecols + ends[r], elevels + ends[r],
                                                    ends[r + 1] - ends[r], xt, y, rows, r,
                                                    batch);
}

// Each function takes the parameters of its kernel, in order, after the selectors that
// the kernel's name suffix stands for: `kind` the output type (0 float32 "_f32", 1 float16
// bits "_f16", 2 bfloat16 bits "_bf16"), `width` the kernel's B ("_b1" .. "_b16"), `idx`
// the bytes of an escape column ("_u16", "_u32"). `staged` is ignored: the host has one
// memory.
#define QM_KBIT_PARAMS                                                                  \
    const qm_u8 *q, qm_i64 rows, qm_i64 nbytes, qm_i64 cols, int bits, qm_i64 group_size, \
        const float *scales, const qm_u8 *zeros, qm_i64 groups
#define QM_KBIT_ARGS q, rows, nbytes, cols, bits, group_size, scales, zeros, groups
#define QM_GRID_PARAMS                                                                  \
    qm_i64 rows, qm_i64 cols, int bits, qm_i64 group_size, const float *scales,         \
        const qm_u8 *zeros, qm_i64 groups, const qm_i64 *ends

extern "C" {

void qm_host_ternary_symbols(const qm_u16* codes, const qm_i64* offsets, qm_i64 rows,
                             qm_i64 cols, QM_DICT_PARAMS, signed char* out, qm_u8* status) {
    HostWarp w;
    const Dict d = QM_DICT;
    for (qm_i64 r = 0; r < rows; ++r) {
        WriteRow<signed char> v{out + r * cols, 0, 1, 2};
        status[r] = qm_u8(qm_ternary_row(w, d, codes, offsets[r], offsets[r + 1] - offsets[r],
                                         cols, v));
    }
}

void qm_host_ternary_values(int kind, const qm_u16* codes, const qm_i64* offsets, qm_i64 rows,
                            qm_i64 cols, QM_DICT_PARAMS, const float* lo, const float* hi,
                            void* out, qm_u8* status) {
    const Dict d = QM_DICT;
    if (kind == 0) ternary_values<OutF32>(codes, offsets, rows, cols, d, lo, hi, (float*)out, status);
    if (kind == 1) ternary_values<OutF16>(codes, offsets, rows, cols, d, lo, hi, (qm_u16*)out, status);
    if (kind == 2) ternary_values<OutBF16>(codes, offsets, rows, cols, d, lo, hi, (qm_u16*)out, status);
}

void qm_host_ternary_matmul(int width, const qm_u16* codes, const qm_i64* offsets, qm_i64 rows,
                            qm_i64 cols, QM_DICT_PARAMS, const float* lo, const float* hi,
                            const float* xt, int batch, int /*staged*/, float* y,
                            qm_u8* status) {
    const Dict d = QM_DICT;
#define QM_CASE(B) if (width == B) ternary_matmul<B>(codes, offsets, rows, cols, d, lo, hi, xt, batch, y, status);
    QM_CASE(1) QM_CASE(2) QM_CASE(4) QM_CASE(8) QM_CASE(16)
#undef QM_CASE
}

void qm_host_unpack_levels(const qm_u8* q, qm_i64 rows, qm_i64 nbytes, qm_i64 cols, int bits,
                           qm_u8* out, qm_u8* bad) {
    kbit_values<OutF32>(q, rows, nbytes, cols, bits, 1, 0, 0, 0, out, 0, bad);
}

void qm_host_kbit_values(int kind, QM_KBIT_PARAMS, void* out, qm_u8* bad) {
    if (kind == 0) kbit_values<OutF32>(QM_KBIT_ARGS, 0, (float*)out, bad);
    if (kind == 1) kbit_values<OutF16>(QM_KBIT_ARGS, 0, (qm_u16*)out, bad);
    if (kind == 2) kbit_values<OutBF16>(QM_KBIT_ARGS, 0, (qm_u16*)out, bad);
}

void qm_host_kbit_matmul(int width, QM_KBIT_PARAMS, const float* xt, int batch,
                         int /*staged*/, float* y, qm_u8* bad) {
#define QM_CASE(B) if (width == B) kbit_matmul<B>(QM_KBIT_ARGS, xt, batch, y, bad);
    QM_CASE(1) QM_CASE(2) QM_CASE(4) QM_CASE(8) QM_CASE(16)
#undef QM_CASE
}

void qm_host_dict_values(int kind, int idx, const signed char* sym, QM_GRID_PARAMS,
                         const void* ecols, const qm_u8* elevels, void* out, qm_u8* bad) {
#define QM_CASE(K, O, Idx) if (kind == K && idx == sizeof(Idx)) dict_values<O, Idx>(sym, rows, cols, bits, group_size, scales, zeros, groups, ends, (const Idx*)ecols, elevels, (O::T*)out, bad);
    QM_CASE(0, OutF32, qm_u16) QM_CASE(1, OutF16, qm_u16) QM_CASE(2, OutBF16, qm_u16)
    QM_CASE(0, OutF32, qm_u32) QM_CASE(1, OutF16, qm_u32) QM_CASE(2, OutBF16, qm_u32)
#undef QM_CASE
}

void qm_host_escape_corrections(int width, int idx, QM_GRID_PARAMS, const void* ecols,
                                const qm_u8* elevels, const float* xt, int batch, float* y) {
    (void)cols; (void)bits; (void)group_size;
#define QM_CASE(B, Idx) if (width == B && idx == sizeof(Idx)) escape_corrections<B, Idx>(rows, scales, zeros, groups, ends, (const Idx*)ecols, elevels, xt, batch, y);
    QM_CASE(1, qm_u16) QM_CASE(2, qm_u16) QM_CASE(4, qm_u16) QM_CASE(8, qm_u16) QM_CASE(16, qm_u16)
    QM_CASE(1, qm_u32) QM_CASE(2, qm_u32) QM_CASE(4, qm_u32) QM_CASE(8, qm_u32) QM_CASE(16, qm_u32)
#undef QM_CASE
}

}  // extern "C"
