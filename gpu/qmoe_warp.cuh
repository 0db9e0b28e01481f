// The warp as the kernels see it: 32 lanes, values held per lane (`lanes<T>`), and the
// few collectives the decoders need (shift up, broadcast, ballot, butterfly sum). Two
// implementations of one interface, so that the drivers in qmoe_lane.cuh are written once:
//
//   DeviceWarp  (nvcc/NVRTC device pass): a lane is the calling thread, lanes<T> one
//               register, the collectives __shfl_*_sync / __ballot_sync.
//   HostWarp    (g++ or the host pass): lanes<T> is 32 values, `each` runs a step for lane
//               0, 1, ..., 31 in turn, the collectives move values between the 32 slots
//               exactly as the shuffles do (lanes below d keep their own value on a shift).
//
// A driver only lets lanes exchange values through these collectives, and writes that
// another lane's later step depends on are ordered by `sync` (__syncwarp), so running the
// steps lane by lane computes what the warp computes.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define QM_HD __host__ __device__ __forceinline__
#define QM_UNROLL _Pragma("unroll")
#else
#define QM_HD inline
#define QM_UNROLL
#endif

// NVRTC has no standard headers: the integer types are spelled here.
typedef unsigned char qm_u8;
typedef unsigned short qm_u16;
typedef unsigned int qm_u32;
typedef unsigned long long qm_u64;
typedef long long qm_i64;

#define QM_WARP 32
#define QM_FULL 0xffffffffu

// Declared in nvcc's host pass too: it parses the kernels' bodies (and instantiates their
// templates) there, so every kernel file names DeviceWarp in both passes.
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
struct DeviceWarp {
    template <class T> struct lanes {
        T v;
        __device__ __forceinline__ T& operator[](int) { return v; }
        __device__ __forceinline__ const T& operator[](int) const { return v; }
    };
    __device__ __forceinline__ int lane() const { return threadIdx.x & (QM_WARP - 1); }
    template <class F> __device__ __forceinline__ void each(F f) { f(lane()); }
    // out[l] = x[l - d] for l >= d, x[l] below
    template <class T> __device__ __forceinline__ lanes<T> shift_up(const lanes<T>& x, int d) {
        return lanes<T>{__shfl_up_sync(QM_FULL, x.v, d)};
    }
    template <class T> __device__ __forceinline__ T broadcast(const lanes<T>& x, int src) {
        return __shfl_sync(QM_FULL, x.v, src);
    }
    __device__ __forceinline__ qm_u32 ballot(const lanes<bool>& p) {
        return __ballot_sync(QM_FULL, p.v);
    }
    // the sum over the 32 lanes, by butterfly (every lane gets it)
    __device__ __forceinline__ float sum(const lanes<float>& x) {
        float s = x.v;
        for (int d = QM_WARP / 2; d > 0; d >>= 1) s += __shfl_xor_sync(QM_FULL, s, d);
        return s;
    }
    __device__ __forceinline__ void sync() { __syncwarp(); }
};
#endif

#if !defined(__CUDACC_RTC__)
struct HostWarp {
    template <class T> struct lanes {
        T v[QM_WARP];
        T& operator[](int l) { return v[l]; }
        const T& operator[](int l) const { return v[l]; }
    };
    template <class F> void each(F f) {
        for (int l = 0; l < QM_WARP; ++l) f(l);
    }
    template <class T> lanes<T> shift_up(const lanes<T>& x, int d) {
        lanes<T> out;
        for (int l = 0; l < QM_WARP; ++l) out[l] = l >= d ? x[l - d] : x[l];
        return out;
    }
    template <class T> T broadcast(const lanes<T>& x, int src) { return x[src]; }
    qm_u32 ballot(const lanes<bool>& p) {
        qm_u32 m = 0;
        for (int l = 0; l < QM_WARP; ++l) m |= qm_u32(p[l]) << l;
        return m;
    }
    float sum(const lanes<float>& x) {
        lanes<float> s = x;
        for (int d = QM_WARP / 2; d > 0; d >>= 1) {
            lanes<float> t = s;
            for (int l = 0; l < QM_WARP; ++l) s[l] = t[l] + t[l ^ d];
        }
        return s[0];
    }
    void sync() {}
};
#endif
