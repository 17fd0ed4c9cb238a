// Shared device helpers: weight element types, 16-byte vector loads, warp and block reductions.
// Included by the kernel files; no entry points here. Plain C++ with no CUDA headers, so the same
// source compiles with nvcc (tests) and NVRTC (cupy.RawModule at run time), and with g++ on top of
// tests/cuda_host.hpp, which runs the kernels on the CPU for the tests.
// (Each kernel file includes it once; cuda.source inlines it, so no include guard is needed.)

// Weight element types. Half-precision weights arrive as their uint16 bits (as lowmoe stores
// them in host memory), so the element type alone selects the conversion.
struct Half { unsigned short bits; };
struct BFloat { unsigned short bits; };

// The launch's dynamic shared memory as T name[]. LOWMOE_CUDA_HOST: built as host C++ on
// tests/cuda_host.hpp, which runs the kernels without a GPU for the tests.
#ifndef LOWMOE_CUDA_HOST
#define DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#else
#define DYNAMIC_SHARED(T, name) T* name = (T*)dynamic_shared
#endif

__device__ __forceinline__ float to_f32(float w) { return w; }
__device__ __forceinline__ float to_f32(Half w) {
    // cvt is exact for subnormals, inf and nan, like the CPU's LLVM fpext.
#ifndef LOWMOE_CUDA_HOST
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(w.bits));
    return f;
#else
    return host_half_to_f32(w.bits);
#endif
}
__device__ __forceinline__ float to_f32(BFloat w) { return __uint_as_float((unsigned)w.bits << 16); }

// f32 -> an element type, rounded to nearest even (as torch's .to(); bf16 NaN -> 0x7fc0, torch's).
// The second argument only picks the type.
__device__ __forceinline__ float from_f32(float x, float) { return x; }
__device__ __forceinline__ Half from_f32(float x, Half) {
    Half h;
#ifndef LOWMOE_CUDA_HOST
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(x));
#else
    h.bits = host_f32_to_half(x);
#endif
    return h;
}
__device__ __forceinline__ BFloat from_f32(float x, BFloat) {
    const unsigned u = __float_as_uint(x);
    BFloat b;
    b.bits = x != x ? 0x7fc0 : (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return b;
}

// How a row of weights of element type W is read: Weights<W>::units(n) array elements hold a row of
// n weights; load(row, e0, n, vec, w) gives the VN weights e0, e0 + 1, ... as f32, by one 16-byte load
// when vec(row, n) (4 f32 or 8 f16/bf16), element by element otherwise (odd shapes: past n, 0).
// blocks.cuh specialises it for the GGUF block formats.
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

template <typename W>
struct Weights {
    static const int VN = 16 / sizeof(W);
    __device__ static __forceinline__ long long units(int n) { return n; }
    __device__ static __forceinline__ bool vec(const W* row, int n) {
        return n % VN == 0 && ((unsigned long long)row & 15) == 0;
    }
    __device__ static __forceinline__ void load(const W* row, int e0, int n, bool vec, float w[VN]) {
        if (vec) {
            unpack(((const uint4*)row)[e0 / VN], w, W());
            return;
        }
#pragma unroll
        for (int i = 0; i < VN; i++) w[i] = e0 + i < n ? to_f32(row[e0 + i]) : 0.0f;
    }
};

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
// (t < nt; the rest are left 0), in the fixed order that lowmoe/backend/exact.py computes on the CPU
// bit for bit: lane l keeps VN = Weights<W>::VN partials (4 for f32 and the block formats, 8 for
// f16 / bf16), partial i summing w[e] * x[e] for e = (32 v + l) VN + i,
// v = 0, 1, ... in turn, each product and sum rounded on its own (__fmul_rn / __fadd_rn: no FMA);
// then its VN partials are halved (a[i] += a[i + h], h = VN/2 .. 1). The caller reduces the lanes
// with warp_sum (lane 0's xor butterfly is the CPU's halving of 32 lane sums). Each weight is
// loaded once for all NT rows (Weights<W>::load: 16 bytes per lane per step when the row is 16-byte
// aligned and n a multiple of VN, the bandwidth path; element by element otherwise, same order).
template <typename W, int NT>
__device__ __forceinline__ void row_dot(const W* row, int n, const float* const xs[NT], int nt, float acc[NT]) {
    const int lane = threadIdx.x & 31;
    const int VN = Weights<W>::VN;
    float a[NT][VN];
#pragma unroll
    for (int t = 0; t < NT; t++)
#pragma unroll
        for (int i = 0; i < VN; i++) a[t][i] = 0.0f;
    const bool vec = Weights<W>::vec(row, n);
    for (int v = lane; v * VN < n; v += 32) {
        const int e0 = v * VN;
        float w[VN];
        Weights<W>::load(row, e0, n, vec, w);
#pragma unroll
        for (int t = 0; t < NT; t++) {
            if (t < nt) {
#pragma unroll
                for (int i = 0; i < VN; i++)
                    if (vec || e0 + i < n) a[t][i] = __fadd_rn(a[t][i], __fmul_rn(w[i], xs[t][e0 + i]));
            }
        }
    }
#pragma unroll
    for (int t = 0; t < NT; t++) {
#pragma unroll
        for (int h = VN / 2; h >= 1; h >>= 1)
#pragma unroll
            for (int i = 0; i < h; i++) a[t][i] = __fadd_rn(a[t][i], a[t][i + h]);
        acc[t] = a[t][0];
    }
}

// exp(t) from IEEE f32 products and sums only, as lowmoe/backend/exact.py's exact_exp computes it
// (CUDA's expf and the CPU's libm differ in the last bit): t = n ln2 + r, |r| <= ln2 / 2, Taylor
// terms up to r^7, times 2^n (two steps when the result is subnormal or n = 128).
__device__ __forceinline__ float exact_exp(float t) {
    if (t != t) return t;
    if (t > 0x1.62e43p+6f) return __int_as_float(0x7f800000);  // exp overflows f32
    if (t < -0x1.9fe36ap+6f) return 0.0f;  // exp underflows to 0
    const int n = (int)floorf(__fadd_rn(__fmul_rn(t, 0x1.715476p+0f), 0.5f));  // log2(e)
    const float fn = (float)n;  // ln 2 = 0x1.62e4p-1 + 0x1.7f7d1cp-20; fn * the first is exact
    const float r = __fsub_rn(__fsub_rn(t, __fmul_rn(fn, 0x1.62e4p-1f)), __fmul_rn(fn, 0x1.7f7d1cp-20f));
    const float c[8] = {0x1p+0f, 0x1p+0f, 0x1p-1f, 0x1.555556p-3f, 0x1.555556p-5f, 0x1.111112p-7f, 0x1.6c16c2p-10f,
                        0x1.a01a02p-13f};  // 1 / i!
    float p = c[7];
#pragma unroll
    for (int i = 6; i >= 0; i--) p = __fadd_rn(__fmul_rn(p, r), c[i]);
    if (n < -126) return __fmul_rn(__fmul_rn(p, __int_as_float((n + 64 + 127) << 23)), 0x1p-64f);
    if (n > 127) return __fmul_rn(__fmul_rn(p, __int_as_float((n - 64 + 127) << 23)), 0x1p+64f);
    return __fmul_rn(p, __int_as_float((n + 127) << 23));
}

__device__ __forceinline__ float silu(float g) { return __fdiv_rn(g, __fadd_rn(1.0f, exact_exp(-g))); }
