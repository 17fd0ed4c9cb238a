// Shared device helpers: weight element types, 16-byte vector loads, warp and block reductions.
// Included by the kernel files; no entry points here. Plain C++ with no CUDA headers, so the same
// source compiles with nvcc (tests) and NVRTC (cupy.RawModule at run time).
// (Each kernel file includes it once; cuda.source inlines it, so no include guard is needed.)

// Weight element types. Half-precision weights arrive as their uint16 bits (as lowmoe stores
// them in host memory), so the element type alone selects the conversion.
struct Half { unsigned short bits; };
struct BFloat { unsigned short bits; };

__device__ __forceinline__ float to_f32(float w) { return w; }
__device__ __forceinline__ float to_f32(Half w) {
    // cvt is exact for subnormals, inf and nan, like the CPU's LLVM fpext.
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(w.bits));
    return f;
}
__device__ __forceinline__ float to_f32(BFloat w) { return __uint_as_float((unsigned)w.bits << 16); }

// A 16-byte load holds 4 f32 or 8 f16/bf16 weights.
template <typename W> struct Vec { static const int N = 16 / sizeof(W); };

__device__ __forceinline__ void unpack(uint4 v, float f[4], float) {
    f[0] = __uint_as_float(v.x); f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z); f[3] = __uint_as_float(v.w);
}
template <typename H>
__device__ __forceinline__ void unpack(uint4 v, float f[8], H) {
    unsigned u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        H lo, hi;
        lo.bits = (unsigned short)(u[i] & 0xFFFFu);
        hi.bits = (unsigned short)(u[i] >> 16);
        f[2 * i] = to_f32(lo);
        f[2 * i + 1] = to_f32(hi);
    }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum / max for blockDim.x a multiple of 32 (<= 1024); scratch: 32 floats of shared
// memory. Every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous reduction
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : -__int_as_float(0x7f800000);
    return warp_max(v);
}

// One warp: lane-partial dot products of one weight row W[n] with NT activation rows xs[t] f32[n]
// (t < nt; the rest are left 0). Each weight is loaded once for all NT rows, 16 bytes per lane per
// step when the row is 16-byte aligned and n a multiple of the vector width (the bandwidth path),
// element by element otherwise (odd shapes). The caller reduces acc with warp_sum.
template <typename W, int NT>
__device__ __forceinline__ void row_dot(const W* row, int n, const float* const xs[NT], int nt, float acc[NT]) {
    const int lane = threadIdx.x & 31;
    const int VN = Vec<W>::N;
#pragma unroll
    for (int t = 0; t < NT; t++) acc[t] = 0.0f;
    if (n % VN == 0 && ((unsigned long long)row & 15) == 0) {
        const uint4* r4 = (const uint4*)row;
        for (int v = lane; v < n / VN; v += 32) {
            float w[VN];
            unpack(r4[v], w, W());
#pragma unroll
            for (int t = 0; t < NT; t++) {
                if (t < nt) {
                    const float* x = xs[t] + v * VN;
#pragma unroll
                    for (int i = 0; i < VN; i++) acc[t] = fmaf(w[i], x[i], acc[t]);
                }
            }
        }
    } else {
        for (int i = lane; i < n; i += 32) {
            float w = to_f32(row[i]);
#pragma unroll
            for (int t = 0; t < NT; t++)
                if (t < nt) acc[t] = fmaf(w, xs[t][i], acc[t]);
        }
    }
}

__device__ __forceinline__ float silu(float g) { return g / (1.0f + expf(-g)); }
