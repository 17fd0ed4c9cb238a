// RMSNorm, HF order: y = w * (x / sqrt(mean(x^2) + eps)) (normalise first, then scale), as
// lowmoe/backend/cpu.py's rms_norm. Also the per-head q/k norm (rows of head_dim), Gated DeltaNet's
// output norm gated by silu(z), and its L2 norm of q and k, as cpu.py's gated_rms_norm and l2_norm.
//
// Layout: x f32[rows, N]; w f32[N]; z f32[rows, N]; y f32[rows, N] (may alias x).
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

// y = (w * (x / sqrt(mean(x^2) + eps))) * silu(z): Gated DeltaNet's norm of each value head's output.
extern "C" __global__ void gated_rms_norm_f32(const float* x, const float* z, const float* w, float* y, int N,
                                              float eps) {
    __shared__ float scratch[32];
    const long long row = (long long)blockIdx.x * N;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < N; i += blockDim.x) ss = fmaf(x[row + i], x[row + i], ss);
    ss = block_sum(ss, scratch);
    const float r = 1.0f / sqrtf(ss / (float)N + eps);
    for (int i = threadIdx.x; i < N; i += blockDim.x) {
        const float zi = z[row + i];
        y[row + i] = (w[i] * (x[row + i] * r)) * (zi / (1.0f + expf(-zi)));
    }
}

// y = x / sqrt(sum(x^2) + eps) (transformers' l2norm of Gated DeltaNet's q and k heads).
extern "C" __global__ void l2_norm_f32(const float* x, float* y, int N, float eps) {
    __shared__ float scratch[32];
    const long long row = (long long)blockIdx.x * N;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < N; i += blockDim.x) ss = fmaf(x[row + i], x[row + i], ss);
    ss = block_sum(ss, scratch);
    const float r = sqrtf(ss + eps);
    for (int i = threadIdx.x; i < N; i += blockDim.x) y[row + i] = x[row + i] / r;
}
