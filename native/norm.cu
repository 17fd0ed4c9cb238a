// RMSNorm, HF order: y = w * (x / sqrt(mean(x^2) + eps)) (normalise first, then scale), as
// lowmoe/backend/cpu.py's rms_norm. Also the per-head q/k norm (rows of head_dim).
//
// Layout: x f32[rows, N]; w f32[N]; y f32[rows, N] (may alias x).
// Launch: 256 threads per block, one block per row: a block-wide sum of squares, then the scale.
// Napkin math: 12 bytes per element (x read twice from L1, y written); a decode row of 4096 floats
// is 48 KB: latency bound, one launch per norm.
#include "common.cuh"

extern "C" __global__ void rms_norm_f32(const float* x, const float* w, float* y, int N, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (long long)blockIdx.x * N;
    float* yr = y + (long long)blockIdx.x * N;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < N; i += blockDim.x) ss = fmaf(xr[i], xr[i], ss);
    ss = block_sum(ss, scratch);
    const float r = 1.0f / sqrtf(ss / (float)N + eps);
    for (int i = threadIdx.x; i < N; i += blockDim.x) yr[i] = w[i] * (xr[i] * r);
}
