// qmoe.ternary-dict16 (spec §5.2) rows: symbols, dense values (fp32, fp16, bf16) and the
// fused product Y = X W^T, one warp a row (qmoe_lane.cuh says how a row is read).
#include "qmoe_kernels.cuh"

#define QM_DICT_PARAMS                                                                  \
    const qm_u64 *rec, const qm_u8 *nxt, int nw, int lb, int kb, int s0, int sp, int S
#define QM_DICT Dict{rec, nxt, nw, lb, kb, s0, sp, S}

extern "C" __global__ void qm_ternary_symbols(const qm_u16* codes, const qm_i64* offsets,
                                              qm_i64 rows, qm_i64 cols, QM_DICT_PARAMS,
                                              signed char* out, qm_u8* status) {
    DeviceWarp w;
    const Dict d = QM_DICT;
    QM_FOR_ROWS(r, rows) {
        WriteRow<signed char> v{out + r * cols, 0, 1, 2};
        int s = qm_ternary_row(w, d, codes, offsets[r], offsets[r + 1] - offsets[r], cols, v);
        if (w.lane() == 0) status[r] = qm_u8(s);
    }
}

template <class O>
__device__ void qm_ternary_values(const qm_u16* codes, const qm_i64* offsets, qm_i64 rows,
                                  qm_i64 cols, const Dict& d, const float* lo, const float* hi,
                                  typename O::T* out, qm_u8* status) {
    DeviceWarp w;
    QM_FOR_ROWS(r, rows) {
        WriteRow<typename O::T> v{out + r * cols, O::from(0.0f), O::from(lo[r]), O::from(hi[r])};
        int s = qm_ternary_row(w, d, codes, offsets[r], offsets[r + 1] - offsets[r], cols, v);
        if (w.lane() == 0) status[r] = qm_u8(s);
    }
}

#define QM_VALUES(name, O)                                                              \
    extern "C" __global__ void name(const qm_u16* codes, const qm_i64* offsets, qm_i64 rows, \
                                    qm_i64 cols, QM_DICT_PARAMS, const float* lo,            \
                                    const float* hi, O::T* out, qm_u8* status) {             \
        qm_ternary_values<O>(codes, offsets, rows, cols, QM_DICT, lo, hi, out, status);      \
    }
QM_VALUES(qm_ternary_values_f32, OutF32)
QM_VALUES(qm_ternary_values_f16, OutF16)
QM_VALUES(qm_ternary_values_bf16, OutBF16)

// xt: X transposed, [cols, B] (B the kernel's width, `batch` <= B of its columns real)
#define QM_MATMUL(B)                                                                    \
    extern "C" __global__ void qm_ternary_matmul_b##B(                                  \
        const qm_u16* codes, const qm_i64* offsets, qm_i64 rows, qm_i64 cols,           \
        QM_DICT_PARAMS, const float* lo, const float* hi, const float* xt, int batch,   \
        int staged, float* y, qm_u8* status) {                                          \
        DeviceWarp w;                                                                   \
        const Dict d = QM_DICT;                                                         \
        const float* x = qm_stage_inputs(xt, cols * B, staged);                         \
        QM_FOR_ROWS(r, rows) {                                                          \
            int s = qm_ternary_matmul_row<DeviceWarp, B>(                               \
                w, d, codes, offsets[r], offsets[r + 1] - offsets[r], cols, lo[r], hi[r], \
                x, y, rows, r, batch);                                                  \
            if (w.lane() == 0) status[r] = qm_u8(s);                                    \
        }                                                                               \
    }
QM_MATMUL(1)
QM_MATMUL(2)
QM_MATMUL(4)
QM_MATMUL(8)
QM_MATMUL(16)
