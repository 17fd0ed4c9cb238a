// Decode (batch 1) SwiGLU experts, dispatched on the device: the chosen expert ids are read from
// device memory (router_topk_f32's output), so no host round trip sits between the router and the
// experts. y[j] = down_e @ (silu(gate_e @ x) * (up_e @ x)), e = idx[j]; an entry idx[j] < 0 is
// skipped (its row is left as it is: the GPU expert cache fills it from the CPU). The weighted sum
// of the rows is expert_gemm.cu's moe_combine_f32, shared with prefill. The arithmetic is
// common.cuh's fixed order (row_dot, silu), which lowmoe/backend/exact.py reproduces on the CPU
// bit for bit. Also the dense MLP and the shared expert (E = 1, idx = [0], w = [1]).
//
// Layout: a layer's experts stacked as stored (f32, or f16/bf16 bits): gate, up [E, I, D],
// down [E, D, I] (cpu.expert_ffn's layout per expert); x f32[D]; idx int32[k]; h f32[k, I] scratch;
// y f32[k, D].
// Launch: 256 threads = 8 warps, one warp per weight row, grid (ceil(rows / 8), k): moe_gate_up
// reads one gate row and one up row of expert idx[blockIdx.y], moe_down one down row.
// Napkin math, a Qwen3-30B-A3B layer (D 2048, I 768, k 8, bf16): 8 experts * 3 * 768 * 2048 * 2 B
// = 75 MB per token and 2 flops per weight (0.5 flop/byte): bandwidth bound, 16 us at 4.8 TB/s.
// 96 * 8 + 256 * 8 blocks of 16-byte loads keep every SM streaming.
#include "common.cuh"

template <typename W>
__device__ void moe_gate_up(const float* x, const int* idx, const W* gate, const W* up, float* h, int D, int I) {
    const int i = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int j = blockIdx.y;
    const long long e = idx[j];
    if (i >= I || e < 0) return;  // whole warp
    const float* xs[1] = {x};
    float g[1], u[1];
    row_dot<W, 1>(gate + (e * I + i) * D, D, xs, 1, g);
    row_dot<W, 1>(up + (e * I + i) * D, D, xs, 1, u);
    const float gs = warp_sum(g[0]), us = warp_sum(u[0]);
    if ((threadIdx.x & 31) == 0) h[(long long)j * I + i] = __fmul_rn(silu(gs), us);
}

template <typename W>
__device__ void moe_down(const float* h, const int* idx, const W* down, float* y, int D, int I) {
    const int d = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int j = blockIdx.y;
    const long long e = idx[j];
    if (d >= D || e < 0) return;
    const float* xs[1] = {h + (long long)j * I};
    float a[1];
    row_dot<W, 1>(down + (e * D + d) * I, I, xs, 1, a);
    const float s = warp_sum(a[0]);
    if ((threadIdx.x & 31) == 0) y[(long long)j * D + d] = s;
}

extern "C" __global__ void moe_gate_up_f32(const float* x, const int* idx, const float* gate, const float* up, float* h, int D, int I) {
    moe_gate_up(x, idx, gate, up, h, D, I);
}
extern "C" __global__ void moe_gate_up_f16(const float* x, const int* idx, const Half* gate, const Half* up, float* h, int D, int I) {
    moe_gate_up(x, idx, gate, up, h, D, I);
}
extern "C" __global__ void moe_gate_up_bf16(const float* x, const int* idx, const BFloat* gate, const BFloat* up, float* h, int D, int I) {
    moe_gate_up(x, idx, gate, up, h, D, I);
}
extern "C" __global__ void moe_down_f32(const float* h, const int* idx, const float* down, float* y, int D, int I) {
    moe_down(h, idx, down, y, D, I);
}
extern "C" __global__ void moe_down_f16(const float* h, const int* idx, const Half* down, float* y, int D, int I) {
    moe_down(h, idx, down, y, D, I);
}
extern "C" __global__ void moe_down_bf16(const float* h, const int* idx, const BFloat* down, float* y, int D, int I) {
    moe_down(h, idx, down, y, D, I);
}
