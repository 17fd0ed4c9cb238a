// Dense projections: out = x @ w.T + bias (nn.Linear layout), the q/k/v/o, router, shared-expert
// gate and lm_head matrices, f32 accumulation.
//
// Layout: x f32[T, D] row-major; w [R, D] as stored (f32, f16/bf16 bits, or the rows' bytes in a
// GGUF block format, blocks.cuh); bias f32[R] (zeros when the checkpoint has none: x + 0 is exact);
// out f32[T, R].
// Launch: 256 threads = 8 warps per block, one warp per output row r, grid ceil(R / 8). T = 1
// (decode) is a GEMV; for T > 1 each weight row is read once per 8 tokens (the later passes hit L1/L2).
// Napkin math, decode: bytes = R * D * sizeof(w) + small; flops = 2 R D, so ~1 flop per byte for
// bf16 (~3.6 for q4_k): memory bound. lm_head of a 150K x 2048 bf16 vocabulary = 630 MB -> ~0.13 ms
// at 4.8 TB/s (H200 HBM3e), 260 MB in q6_k. 8 warps per block and thousands of blocks keep enough 16-byte loads in flight.
#include "blocks.cuh"

template <typename W>
__device__ void linear(const float* x, const W* w, const float* bias, float* out, int T, int D, int R) {
    const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= R) return;  // whole warp
    const W* row = w + r * Weights<W>::units(D);
    if (T == 1) {
        const float* xs[1] = {x};
        float acc[1];
        row_dot<W, 1>(row, D, xs, 1, acc);
        float s = warp_sum(acc[0]);
        if ((threadIdx.x & 31) == 0) out[r] = s + bias[r];
        return;
    }
    const int NT = 8;
    for (int t0 = 0; t0 < T; t0 += NT) {
        const int nt = min(NT, T - t0);
        const float* xs[NT];
#pragma unroll
        for (int t = 0; t < NT; t++) xs[t] = x + (long long)(t0 + min(t, nt - 1)) * D;
        float acc[NT];
        row_dot<W, NT>(row, D, xs, nt, acc);
#pragma unroll
        for (int t = 0; t < NT; t++) {
            float s = warp_sum(acc[t]);
            if ((threadIdx.x & 31) == 0 && t < nt) out[(long long)(t0 + t) * R + r] = s + bias[r];
        }
    }
}

extern "C" __global__ void linear_f32(const float* x, const float* w, const float* bias, float* out, int T, int D, int R) {
    linear(x, w, bias, out, T, D, R);
}
extern "C" __global__ void linear_f16(const float* x, const Half* w, const float* bias, float* out, int T, int D, int R) {
    linear(x, w, bias, out, T, D, R);
}
extern "C" __global__ void linear_bf16(const float* x, const BFloat* w, const float* bias, float* out, int T, int D, int R) {
    linear(x, w, bias, out, T, D, R);
}
extern "C" __global__ void linear_q8_0(const float* x, const Q8_0* w, const float* bias, float* out, int T, int D, int R) {
    linear(x, w, bias, out, T, D, R);
}
extern "C" __global__ void linear_q4_0(const float* x, const Q4_0* w, const float* bias, float* out, int T, int D, int R) {
    linear(x, w, bias, out, T, D, R);
}
extern "C" __global__ void linear_q4_1(const float* x, const Q4_1* w, const float* bias, float* out, int T, int D, int R) {
    linear(x, w, bias, out, T, D, R);
}
extern "C" __global__ void linear_q5_0(const float* x, const Q5_0* w, const float* bias, float* out, int T, int D, int R) {
    linear(x, w, bias, out, T, D, R);
}
extern "C" __global__ void linear_q5_1(const float* x, const Q5_1* w, const float* bias, float* out, int T, int D, int R) {
    linear(x, w, bias, out, T, D, R);
}
extern "C" __global__ void linear_q4_k(const float* x, const Q4_K* w, const float* bias, float* out, int T, int D, int R) {
    linear(x, w, bias, out, T, D, R);
}
extern "C" __global__ void linear_q5_k(const float* x, const Q5_K* w, const float* bias, float* out, int T, int D, int R) {
    linear(x, w, bias, out, T, D, R);
}
extern "C" __global__ void linear_q6_k(const float* x, const Q6_K* w, const float* bias, float* out, int T, int D, int R) {
    linear(x, w, bias, out, T, D, R);
}
