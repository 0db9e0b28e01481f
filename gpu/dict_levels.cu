// qmoe.uint-dict16 (spec §13) on top of ternary.cu's symbols: dense values with every
// escape checked (bad[r] = 1 where row r breaks a §13 rule), and the escapes' share of
// a fused product. `ends` is the exclusive prefix sum of row_escapes ([rows + 1]); the
// escape columns' index type is the suffix (u16, u32).
#include "qmoe_kernels.cuh"

#define QM_GRID_PARAMS                                                                  \
    qm_i64 rows, qm_i64 cols, int bits, qm_i64 group_size, const float *scales,         \
        const qm_u8 *zeros, qm_i64 groups, const qm_i64 *ends

#define QM_DICT_VALUES(name, O, Idx)                                                    \
    extern "C" __global__ void name(const signed char* sym, QM_GRID_PARAMS,             \
                                    const Idx* ecols, const qm_u8* elevels, O::T* out,  \
                                    qm_u8* bad) {                                       \
        DeviceWarp w;                                                                   \
        QM_FOR_ROWS(r, rows) {                                                          \
            bool b = qm_dict_values_row<DeviceWarp, O, Idx>(                            \
                w, sym + r * cols, cols, bits, group_size, scales + r * groups,         \
                zeros + r * groups, ecols + ends[r], elevels + ends[r],                 \
                ends[r + 1] - ends[r], out + r * cols);                                 \
            if (w.lane() == 0) bad[r] = b;                                              \
        }                                                                               \
    }
QM_DICT_VALUES(qm_dict_values_f32_u16, OutF32, qm_u16)
QM_DICT_VALUES(qm_dict_values_f16_u16, OutF16, qm_u16)
QM_DICT_VALUES(qm_dict_values_bf16_u16, OutBF16, qm_u16)
QM_DICT_VALUES(qm_dict_values_f32_u32, OutF32, qm_u32)
QM_DICT_VALUES(qm_dict_values_f16_u32, OutF16, qm_u32)
QM_DICT_VALUES(qm_dict_values_bf16_u32, OutBF16, qm_u32)

// y [batch, rows] += escapes' corrections; a group a row, so scales/zeros [rows, groups]
// are read at column 0
#define QM_CORRECTIONS(B, Idx, sfx)                                                     \
    extern "C" __global__ void qm_escape_corrections_b##B##_##sfx(                      \
        QM_GRID_PARAMS, const Idx* ecols, const qm_u8* elevels, const float* xt, int batch, \
        float* y) {                                                                     \
        DeviceWarp w;                                                                   \
        QM_FOR_ROWS(r, rows) {                                                          \
            qm_escape_corrections_row<DeviceWarp, B, Idx>(                              \
                w, scales[r * groups], zeros[r * groups], ecols + ends[r],              \
                elevels + ends[r], ends[r + 1] - ends[r], xt, y, rows, r, batch);       \
        }                                                                               \
    }
#define QM_CORRECTIONS_ALL(B) QM_CORRECTIONS(B, qm_u16, u16) QM_CORRECTIONS(B, qm_u32, u32)
QM_CORRECTIONS_ALL(1)
QM_CORRECTIONS_ALL(2)
QM_CORRECTIONS_ALL(4)
QM_CORRECTIONS_ALL(8)
QM_CORRECTIONS_ALL(16)
