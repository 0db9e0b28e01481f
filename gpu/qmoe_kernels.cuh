// What the kernels of every .cu share: rows spread over the grid's warps, and the input
// activations staged in shared memory when they fit.
#pragma once

#include "qmoe_lane.cuh"

// Each warp takes rows warp, warp + warps, ...: any grid covers any number of rows.
#define QM_FOR_ROWS(r, rows)                                                           \
    for (qm_i64 r = (qm_i64(blockIdx.x) * blockDim.x + threadIdx.x) / QM_WARP; r < (rows); \
         r += qm_i64(gridDim.x) * blockDim.x / QM_WARP)

// X transposed ([cols, B] floats) read from shared memory when the launch gave the block
// room for it (dynamic shared memory of `n` floats, `staged` nonzero), else from global
// memory: every row of the block reads the same inputs, at scattered columns.
__device__ __forceinline__ const float* qm_stage_inputs(const float* x, qm_i64 n, int staged) {
    extern __shared__ float qm_shared_x[];
    if (!staged) return x;
    for (qm_i64 i = threadIdx.x; i < n; i += blockDim.x) qm_shared_x[i] = x[i];
    __syncthreads();
    return qm_shared_x;
}
