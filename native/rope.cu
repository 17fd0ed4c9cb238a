// Rotary position embedding in place, NeoX / HF rotate_half convention as cpu.rope, on the first
// rot = 2 half dims of each head (all of them, or a part: Qwen3.5's heads of 256 rotate 64): angle
// i pairs x[i] with x[i + half].
//
// Layout: x f32[T, H, hd]; cos, sin f32[P, half], tables of positions 0..P-1 (model.rope_tables,
// uploaded once per KV cache); token t sits at position start + t.
// Launch: 64 threads per block, one block per (t, h) = grid T * H; threads loop over the half pairs.
// Napkin math: 16 bytes per pair read+written plus the table row; a few KB per token: latency bound.
#include "common.cuh"

extern "C" __global__ void rope_f32(float* x, const float* cos, const float* sin, int start, int H, int hd,
                                    int half) {
    const int t = blockIdx.x / H;
    float* xr = x + (long long)blockIdx.x * hd;
    const float* c = cos + (long long)(start + t) * half;
    const float* s = sin + (long long)(start + t) * half;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const float x1 = xr[i], x2 = xr[i + half];
        xr[i] = x1 * c[i] - x2 * s[i];
        xr[i + half] = x2 * c[i] + x1 * s[i];
    }
}
