// qmoe.uint-packed (spec §12) rows: levels, dense values (fp32, fp16, bf16) and the fused
// product Y = X W^T, one warp a row, lanes over its columns. bad[r] = 1 where row r's
// padding bits are set.
#include "qmoe_kernels.cuh"

#define QM_KBIT_PARAMS                                                                  \
    const qm_u8 *q, qm_i64 rows, qm_i64 nbytes, qm_i64 cols, int bits, qm_i64 group_size, \
        const float *scales, const qm_u8 *zeros, qm_i64 groups

extern "C" __global__ void qm_unpack_levels(const qm_u8* q, qm_i64 rows, qm_i64 nbytes,
                                            qm_i64 cols, int bits, qm_u8* out, qm_u8* bad) {
    DeviceWarp w;
    QM_FOR_ROWS(r, rows) {
        bool b = qm_kbit_decode_row<DeviceWarp, OutF32>(w, q + r * nbytes, nbytes, cols, bits,
                                                        1, nullptr, nullptr, out + r * cols,
                                                        nullptr);
        if (w.lane() == 0) bad[r] = b;
    }
}

#define QM_KBIT_VALUES(name, O)                                                         \
    extern "C" __global__ void name(QM_KBIT_PARAMS, O::T* out, qm_u8* bad) {            \
        DeviceWarp w;                                                                   \
        QM_FOR_ROWS(r, rows) {                                                          \
            bool b = qm_kbit_decode_row<DeviceWarp, O>(                                 \
                w, q + r * nbytes, nbytes, cols, bits, group_size, scales + r * groups, \
                zeros + r * groups, nullptr, out + r * cols);                           \
            if (w.lane() == 0) bad[r] = b;                                              \
        }                                                                               \
    }
QM_KBIT_VALUES(qm_kbit_values_f32, OutF32)
QM_KBIT_VALUES(qm_kbit_values_f16, OutF16)
QM_KBIT_VALUES(qm_kbit_values_bf16, OutBF16)

#define QM_KBIT_MATMUL(B)                                                               \
    extern "C" __global__ void qm_kbit_matmul_b##B(QM_KBIT_PARAMS, const float* xt,     \
                                                   int batch, int staged, float* y,     \
                                                   qm_u8* bad) {                        \
        DeviceWarp w;                                                                   \
        const float* x = qm_stage_inputs(xt, cols * B, staged);                         \
        QM_FOR_ROWS(r, rows) {                                                          \
            bool b = qm_kbit_matmul_row<DeviceWarp, B>(                                 \
                w, q + r * nbytes, nbytes, cols, bits, group_size, scales + r * groups, \
                zeros + r * groups, x, y, rows, r, batch);                              \
            if (w.lane() == 0) bad[r] = b;                                              \
        }                                                                               \
    }
QM_KBIT_MATMUL(1)
QM_KBIT_MATMUL(2)
QM_KBIT_MATMUL(4)
QM_KBIT_MATMUL(8)
QM_KBIT_MATMUL(16)
