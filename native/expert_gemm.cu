// Prefill SwiGLU experts: tokens grouped by expert, then one grouped GEMM per projection, so each
// expert's weights are read once per 8 of its tokens instead of once per token.
//   moe_sort_i32:       idx int32[n = T * k] -> offsets int32[E + 1] (group e is entries
//                       offsets[e]..offsets[e+1]-1), order int32[n] (entry t * k + j of each group
//                       slot). Entries idx < 0 are skipped. Single block; the order inside a group
//                       comes from atomics and varies, but each slot is computed on its own, so
//                       results do not depend on it.
//   moe_group_gate_up:  h f32[n, I], h[p] = silu(gate_e @ x[t]) * (up_e @ x[t]), t = order[p] / k.
//   moe_group_down:     y f32[n, D], y[order[p]] = down_e @ h[p]: row t * k + j is token t's j-th
//                       expert, as expert_gemv.cu's moe_down writes it (rows of skipped entries
//                       are left as they are).
//   moe_combine_f32:    out f32[T, D], out[t] = ((0 + w[t, 0] y[t k]) + w[t, 1] y[t k + 1]) + ...,
//                       every product and sum rounded on its own (exact.combine on the CPU).
// Per token, every result is bit for bit what decode (expert_gemv.cu) and lowmoe/backend/exact.py
// compute: common.cuh's row_dot order does not depend on how many tokens share a weight load.
// Layout: x f32[T, D]; stacked experts gate, up [E, I, D], down [E, D, I] as stored, expert e from
// element e * gs (gate, up) and e * ds (down), as in expert_gemv.cu; w f32[T, k].
// E is a layer's experts, or the GPU expert cache's slots (thousands: Qwen3-30B-A3B has 6144
// experts in all), so nothing here is sized by E but global memory.
// Launch: group kernels: 256 threads = 8 warps, one warp per weight row, grid (ceil(rows / 8),
// min(E, 65535)) (grid.y is at most 65535: block y does groups y, y + gridDim.y, ...); each warp
// walks its expert's group 8 tokens at a time (empty groups exit at once). sort: 1024 threads,
// 4 KB of static shared memory. combine: 256 threads, grid (ceil(D / 256), T).
// Napkin math, a 512-token prompt on Qwen3-30B-A3B (E 128, k 8, D 2048, I 768, bf16): 4096 slots,
// 32 per expert on average. The layer's experts are 128 * 9.4 MB = 1.2 GB, read from HBM once
// (the 4 passes of 8 tokens over a 4 KB row hit L1/L2): 0.25 ms at 4.8 TB/s. 2 * 4096 * 3 * 768 *
// 2048 = 39 GFLOP on CUDA-core FMAs (~60 TFLOP/s f32) is ~0.65 ms: compute bound; a tensor-core
// tiled GEMM would be the next step for long prompts.
#include "blocks.cuh"

// A counting sort in global memory, in offsets itself: offsets[e + 1] counts group e's entries,
// the scan turns it into where group e starts, and as group e's cursor in the scatter it ends
// where group e ends, which is what offsets[e + 1] must hold (offsets[0] stays 0). Nothing in
// shared memory is sized by E: 2 E ints of counts and cursors there (this kernel's first form)
// fail to launch past 6144 experts without an opt-in above 48 KiB, and past 20864 with one (163
// KiB on sm_80). One block, so __syncthreads orders each phase's global atomics, loads and stores
// before the next phase. The scan: thread t sums its chunk of c = ceil(E / b) counts (b =
// blockDim.x <= 1024), a Hillis-Steele scan of the b chunk sums in shared memory gives each
// chunk's start, and each thread rewrites its chunk as running starts.
// Napkin math, 6144 slots and a 512-token prompt (n 4096): 6 counts per thread, 4 entries per
// thread counted and scattered by L2 atomics, 10 scan steps: microseconds, once a layer.
extern "C" __global__ void moe_sort_i32(const int* idx, int n, int E, int* offsets, int* order) {
    __shared__ int part[1024];  // [b] chunk sums, then their inclusive prefix sums
    int* group = offsets + 1;  // group[e]: e's count, then its start, then its end
    const int t = threadIdx.x, b = blockDim.x, c = (E + b - 1) / b;
    for (int e = t; e <= E; e += b) offsets[e] = 0;
    __syncthreads();
    for (int p = t; p < n; p += b)
        if (idx[p] >= 0) atomicAdd(&group[idx[p]], 1);
    __syncthreads();
    const int lo = min(t * c, E), hi = min(lo + c, E);
    int sum = 0;
    for (int e = lo; e < hi; e++) sum += group[e];
    part[t] = sum;
    for (int o = 1; o < b; o <<= 1) {
        __syncthreads();
        const int v = t >= o ? part[t - o] : 0;
        __syncthreads();
        part[t] += v;
    }
    int start = part[t] - sum;  // the entries of chunks before t's
    for (int e = lo; e < hi; e++) {
        const int count = group[e];
        group[e] = start;
        start += count;
    }
    __syncthreads();
    for (int p = t; p < n; p += b)
        if (idx[p] >= 0) order[atomicAdd(&group[idx[p]], 1)] = p;
}

template <typename W>
__device__ void moe_group_gate_up(const float* x, const int* order, const int* offsets, const W* gate, const W* up,
                                  float* h, int k, int D, int I, int E, long long gs) {
    const int i = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (i >= I) return;
    const int NT = 8;
    for (long long e = blockIdx.y; e < E; e += gridDim.y) {
        const long long row = e * gs + i * Weights<W>::units(D);
        const W* grow = gate + row;
        const W* urow = up + row;
        for (int p0 = offsets[e]; p0 < offsets[e + 1]; p0 += NT) {
            const int nt = min(NT, offsets[e + 1] - p0);
            const float* xs[NT];
#pragma unroll
            for (int t = 0; t < NT; t++) xs[t] = x + (long long)(order[p0 + min(t, nt - 1)] / k) * D;
            float g[NT], u[NT];
            row_dot<W, NT>(grow, D, xs, nt, g);
            row_dot<W, NT>(urow, D, xs, nt, u);
#pragma unroll
            for (int t = 0; t < NT; t++) {
                const float gs = warp_sum(g[t]), us = warp_sum(u[t]);
                if ((threadIdx.x & 31) == 0 && t < nt) h[(long long)(p0 + t) * I + i] = __fmul_rn(silu(gs), us);
            }
        }
    }
}

template <typename W>
__device__ void moe_group_down(const float* h, const int* order, const int* offsets, const W* down, float* y, int D, int I,
                               int E, long long ds) {
    const int d = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (d >= D) return;
    const int NT = 8;
    for (long long e = blockIdx.y; e < E; e += gridDim.y) {
        const W* row = down + e * ds + d * Weights<W>::units(I);
        for (int p0 = offsets[e]; p0 < offsets[e + 1]; p0 += NT) {
            const int nt = min(NT, offsets[e + 1] - p0);
            const float* xs[NT];
#pragma unroll
            for (int t = 0; t < NT; t++) xs[t] = h + (long long)(p0 + min(t, nt - 1)) * I;
            float a[NT];
            row_dot<W, NT>(row, I, xs, nt, a);
#pragma unroll
            for (int t = 0; t < NT; t++) {
                const float s = warp_sum(a[t]);
                if ((threadIdx.x & 31) == 0 && t < nt) y[(long long)order[p0 + t] * D + d] = s;
            }
        }
    }
}

extern "C" __global__ void moe_combine_f32(const float* y, const float* w, float* out, int k, int D) {
    const int d = blockIdx.x * blockDim.x + threadIdx.x;
    const long long t = blockIdx.y;
    if (d >= D) return;
    float acc = 0.0f;
    for (int j = 0; j < k; j++) acc = __fadd_rn(acc, __fmul_rn(w[t * k + j], y[(t * k + j) * D + d]));
    out[t * D + d] = acc;
}

extern "C" __global__ void moe_group_gate_up_f32(const float* x, const int* order, const int* offsets, const float* gate,
                                              const float* up, float* h, int k, int D, int I, int E, long long gs) {
    moe_group_gate_up(x, order, offsets, gate, up, h, k, D, I, E, gs);
}
extern "C" __global__ void moe_group_gate_up_f16(const float* x, const int* order, const int* offsets, const Half* gate,
                                              const Half* up, float* h, int k, int D, int I, int E, long long gs) {
    moe_group_gate_up(x, order, offsets, gate, up, h, k, D, I, E, gs);
}
extern "C" __global__ void moe_group_gate_up_bf16(const float* x, const int* order, const int* offsets, const BFloat* gate,
                                              const BFloat* up, float* h, int k, int D, int I, int E, long long gs) {
    moe_group_gate_up(x, order, offsets, gate, up, h, k, D, I, E, gs);
}
extern "C" __global__ void moe_group_gate_up_q8_0(const float* x, const int* order, const int* offsets, const Q8_0* gate,
                                              const Q8_0* up, float* h, int k, int D, int I, int E, long long gs) {
    moe_group_gate_up(x, order, offsets, gate, up, h, k, D, I, E, gs);
}
extern "C" __global__ void moe_group_gate_up_q4_0(const float* x, const int* order, const int* offsets, const Q4_0* gate,
                                              const Q4_0* up, float* h, int k, int D, int I, int E, long long gs) {
    moe_group_gate_up(x, order, offsets, gate, up, h, k, D, I, E, gs);
}
extern "C" __global__ void moe_group_gate_up_q4_1(const float* x, const int* order, const int* offsets, const Q4_1* gate,
                                              const Q4_1* up, float* h, int k, int D, int I, int E, long long gs) {
    moe_group_gate_up(x, order, offsets, gate, up, h, k, D, I, E, gs);
}
extern "C" __global__ void moe_group_gate_up_q5_0(const float* x, const int* order, const int* offsets, const Q5_0* gate,
                                              const Q5_0* up, float* h, int k, int D, int I, int E, long long gs) {
    moe_group_gate_up(x, order, offsets, gate, up, h, k, D, I, E, gs);
}
extern "C" __global__ void moe_group_gate_up_q5_1(const float* x, const int* order, const int* offsets, const Q5_1* gate,
                                              const Q5_1* up, float* h, int k, int D, int I, int E, long long gs) {
    moe_group_gate_up(x, order, offsets, gate, up, h, k, D, I, E, gs);
}
extern "C" __global__ void moe_group_gate_up_q4_k(const float* x, const int* order, const int* offsets, const Q4_K* gate,
                                              const Q4_K* up, float* h, int k, int D, int I, int E, long long gs) {
    moe_group_gate_up(x, order, offsets, gate, up, h, k, D, I, E, gs);
}
extern "C" __global__ void moe_group_gate_up_q5_k(const float* x, const int* order, const int* offsets, const Q5_K* gate,
                                              const Q5_K* up, float* h, int k, int D, int I, int E, long long gs) {
    moe_group_gate_up(x, order, offsets, gate, up, h, k, D, I, E, gs);
}
extern "C" __global__ void moe_group_gate_up_q6_k(const float* x, const int* order, const int* offsets, const Q6_K* gate,
                                              const Q6_K* up, float* h, int k, int D, int I, int E, long long gs) {
    moe_group_gate_up(x, order, offsets, gate, up, h, k, D, I, E, gs);
}
extern "C" __global__ void moe_group_down_f32(const float* h, const int* order, const int* offsets, const float* down,
                                           float* y, int D, int I, int E, long long ds) {
    moe_group_down(h, order, offsets, down, y, D, I, E, ds);
}
extern "C" __global__ void moe_group_down_f16(const float* h, const int* order, const int* offsets, const Half* down,
                                           float* y, int D, int I, int E, long long ds) {
    moe_group_down(h, order, offsets, down, y, D, I, E, ds);
}
extern "C" __global__ void moe_group_down_bf16(const float* h, const int* order, const int* offsets, const BFloat* down,
                                           float* y, int D, int I, int E, long long ds) {
    moe_group_down(h, order, offsets, down, y, D, I, E, ds);
}
extern "C" __global__ void moe_group_down_q8_0(const float* h, const int* order, const int* offsets, const Q8_0* down,
                                           float* y, int D, int I, int E, long long ds) {
    moe_group_down(h, order, offsets, down, y, D, I, E, ds);
}
extern "C" __global__ void moe_group_down_q4_0(const float* h, const int* order, const int* offsets, const Q4_0* down,
                                           float* y, int D, int I, int E, long long ds) {
    moe_group_down(h, order, offsets, down, y, D, I, E, ds);
}
extern "C" __global__ void moe_group_down_q4_1(const float* h, const int* order, const int* offsets, const Q4_1* down,
                                           float* y, int D, int I, int E, long long ds) {
    moe_group_down(h, order, offsets, down, y, D, I, E, ds);
}
extern "C" __global__ void moe_group_down_q5_0(const float* h, const int* order, const int* offsets, const Q5_0* down,
                                           float* y, int D, int I, int E, long long ds) {
    moe_group_down(h, order, offsets, down, y, D, I, E, ds);
}
extern "C" __global__ void moe_group_down_q5_1(const float* h, const int* order, const int* offsets, const Q5_1* down,
                                           float* y, int D, int I, int E, long long ds) {
    moe_group_down(h, order, offsets, down, y, D, I, E, ds);
}
extern "C" __global__ void moe_group_down_q4_k(const float* h, const int* order, const int* offsets, const Q4_K* down,
                                           float* y, int D, int I, int E, long long ds) {
    moe_group_down(h, order, offsets, down, y, D, I, E, ds);
}
extern "C" __global__ void moe_group_down_q5_k(const float* h, const int* order, const int* offsets, const Q5_K* down,
                                           float* y, int D, int I, int E, long long ds) {
    moe_group_down(h, order, offsets, down, y, D, I, E, ds);
}
extern "C" __global__ void moe_group_down_q6_k(const float* h, const int* order, const int* offsets, const Q6_K* down,
                                           float* y, int D, int I, int E, long long ds) {
    moe_group_down(h, order, offsets, down, y, D, I, E, ds);
}
