// Decode (batch 1) SwiGLU experts, dispatched on the device: the chosen expert ids are read from
// device memory (router_topk_f32's output), so no host round trip sits between the router and the
// experts. y[j] = down_e @ (silu(gate_e @ x) * (up_e @ x)), e = idx[j]; an entry idx[j] < 0 is
// skipped (its row is left as it is: the GPU expert cache fills it from the CPU). The weighted sum
// of the rows is expert_gemm.cu's moe_combine_f32, shared with prefill. The arithmetic is
// common.cuh's fixed order (row_dot, silu), which lowmoe/backend/exact.py reproduces on the CPU
// bit for bit. Also the dense MLP and the shared expert (E = 1, idx = [0], w = [1]).
//
// Layout: a layer's experts stacked as stored (f32, f16/bf16 bits, or a GGUF block format's bytes,
// blocks.cuh): gate, up [E, I, D], down [E, D, I] (cpu.expert_ffn's layout per expert), expert e's
// rows packed from element e * gs (gate, up) and e * ds (down) of the arrays: a GPU expert cache's
// slots are sized for the largest layer's format (llama.cpp's Q4_K_M mixes q4_k and q6_k down
// projections), so a smaller layer's expert leaves the end of its slot unused. x f32[D];
// idx int32[k]; h f32[k, I] scratch; y f32[k, D].
// Launch: 256 threads = 8 warps, one warp per weight row, grid (ceil(rows / 8), k): moe_gate_up
// reads one gate row and one up row of expert idx[blockIdx.y], moe_down one down row.
// Napkin math, a Qwen3-30B-A3B layer (D 2048, I 768, k 8, bf16): 8 experts * 3 * 768 * 2048 * 2 B
// = 75 MB per token and 2 flops per weight (0.5 flop/byte): bandwidth bound, 16 us at 4.8 TB/s.
// 96 * 8 + 256 * 8 blocks of 16-byte loads keep every SM streaming.
#include "blocks.cuh"

template <typename W>
__device__ void moe_gate_up(const float* x, const int* idx, const W* gate, const W* up, float* h, int D, int I,
                            long long gs) {
    const int i = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int j = blockIdx.y;
    const long long e = idx[j];
    if (i >= I || e < 0) return;  // whole warp
    const float* xs[1] = {x};
    float g[1], u[1];
    const long long row = e * gs + i * Weights<W>::units(D);
    row_dot<W, 1>(gate + row, D, xs, 1, g);
    row_dot<W, 1>(up + row, D, xs, 1, u);
    const float gsum = warp_sum(g[0]), usum = warp_sum(u[0]);
    if ((threadIdx.x & 31) == 0) h[(long long)j * I + i] = __fmul_rn(silu(gsum), usum);
}

template <typename W>
__device__ void moe_down(const float* h, const int* idx, const W* down, float* y, int D, int I, long long ds) {
    const int d = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int j = blockIdx.y;
    const long long e = idx[j];
    if (d >= D || e < 0) return;
    const float* xs[1] = {h + (long long)j * I};
    float a[1];
    row_dot<W, 1>(down + e * ds + d * Weights<W>::units(I), I, xs, 1, a);
    const float s = warp_sum(a[0]);
    if ((threadIdx.x & 31) == 0) y[(long long)j * D + d] = s;
}

extern "C" __global__ void moe_gate_up_f32(const float* x, const int* idx, const float* gate, const float* up, float* h, int D,
                                        int I, long long gs) {
    moe_gate_up(x, idx, gate, up, h, D, I, gs);
}
extern "C" __global__ void moe_gate_up_f16(const float* x, const int* idx, const Half* gate, const Half* up, float* h, int D,
                                        int I, long long gs) {
    moe_gate_up(x, idx, gate, up, h, D, I, gs);
}
extern "C" __global__ void moe_gate_up_bf16(const float* x, const int* idx, const BFloat* gate, const BFloat* up, float* h, int D,
                                        int I, long long gs) {
    moe_gate_up(x, idx, gate, up, h, D, I, gs);
}
extern "C" __global__ void moe_gate_up_q8_0(const float* x, const int* idx, const Q8_0* gate, const Q8_0* up, float* h, int D,
                                        int I, long long gs) {
    moe_gate_up(x, idx, gate, up, h, D, I, gs);
}
extern "C" __global__ void moe_gate_up_q4_0(const float* x, const int* idx, const Q4_0* gate, const Q4_0* up, float* h, int D,
                                        int I, long long gs) {
    moe_gate_up(x, idx, gate, up, h, D, I, gs);
}
extern "C" __global__ void moe_gate_up_q4_1(const float* x, const int* idx, const Q4_1* gate, const Q4_1* up, float* h, int D,
                                        int I, long long gs) {
    moe_gate_up(x, idx, gate, up, h, D, I, gs);
}
extern "C" __global__ void moe_gate_up_q5_0(const float* x, const int* idx, const Q5_0* gate, const Q5_0* up, float* h, int D,
                                        int I, long long gs) {
    moe_gate_up(x, idx, gate, up, h, D, I, gs);
}
extern "C" __global__ void moe_gate_up_q5_1(const float* x, const int* idx, const Q5_1* gate, const Q5_1* up, float* h, int D,
                                        int I, long long gs) {
    moe_gate_up(x, idx, gate, up, h, D, I, gs);
}
extern "C" __global__ void moe_gate_up_q4_k(const float* x, const int* idx, const Q4_K* gate, const Q4_K* up, float* h, int D,
                                        int I, long long gs) {
    moe_gate_up(x, idx, gate, up, h, D, I, gs);
}
extern "C" __global__ void moe_gate_up_q5_k(const float* x, const int* idx, const Q5_K* gate, const Q5_K* up, float* h, int D,
                                        int I, long long gs) {
    moe_gate_up(x, idx, gate, up, h, D, I, gs);
}
extern "C" __global__ void moe_gate_up_q6_k(const float* x, const int* idx, const Q6_K* gate, const Q6_K* up, float* h, int D,
                                        int I, long long gs) {
    moe_gate_up(x, idx, gate, up, h, D, I, gs);
}
extern "C" __global__ void moe_down_f32(const float* h, const int* idx, const float* down, float* y, int D, int I,
                                     long long ds) {
    moe_down(h, idx, down, y, D, I, ds);
}
extern "C" __global__ void moe_down_f16(const float* h, const int* idx, const Half* down, float* y, int D, int I,
                                     long long ds) {
    moe_down(h, idx, down, y, D, I, ds);
}
extern "C" __global__ void moe_down_bf16(const float* h, const int* idx, const BFloat* down, float* y, int D, int I,
                                     long long ds) {
    moe_down(h, idx, down, y, D, I, ds);
}
extern "C" __global__ void moe_down_q8_0(const float* h, const int* idx, const Q8_0* down, float* y, int D, int I,
                                     long long ds) {
    moe_down(h, idx, down, y, D, I, ds);
}
extern "C" __global__ void moe_down_q4_0(const float* h, const int* idx, const Q4_0* down, float* y, int D, int I,
                                     long long ds) {
    moe_down(h, idx, down, y, D, I, ds);
}
extern "C" __global__ void moe_down_q4_1(const float* h, const int* idx, const Q4_1* down, float* y, int D, int I,
                                     long long ds) {
    moe_down(h, idx, down, y, D, I, ds);
}
extern "C" __global__ void moe_down_q5_0(const float* h, const int* idx, const Q5_0* down, float* y, int D, int I,
                                     long long ds) {
    moe_down(h, idx, down, y, D, I, ds);
}
extern "C" __global__ void moe_down_q5_1(const float* h, const int* idx, const Q5_1* down, float* y, int D, int I,
                                     long long ds) {
    moe_down(h, idx, down, y, D, I, ds);
}
extern "C" __global__ void moe_down_q4_k(const float* h, const int* idx, const Q4_K* down, float* y, int D, int I,
                                     long long ds) {
    moe_down(h, idx, down, y, D, I, ds);
}
extern "C" __global__ void moe_down_q5_k(const float* h, const int* idx, const Q5_K* down, float* y, int D, int I,
                                     long long ds) {
    moe_down(h, idx, down, y, D, I, ds);
}
extern "C" __global__ void moe_down_q6_k(const float* h, const int* idx, const Q6_K* down, float* y, int D, int I,
                                     long long ds) {
    moe_down(h, idx, down, y, D, I, ds);
}
