// Router: softmax over the E expert logits of each token, then the k most probable experts in
// descending order (ties: the lower expert id first), weights optionally renormalised to sum to 1.
// Same semantics as cpu.router_topk; the ids are int32 here because the expert kernels read them.
//
// Layout: logits f32[T, E]; idx int32[T, k]; w f32[T, k].
// Launch: one warp per token (grid T, 32 threads), E floats of dynamic shared memory: softmax with
// warp reductions, then k rounds of a warp argmax that marks the winner taken (-1: below any p).
// Napkin math: E * 4 bytes per token; k * E / 32 compares per lane: a few microseconds at most.
#include "common.cuh"

extern "C" __global__ void router_topk_f32(const float* logits, int E, int k, int renorm, int* idx, float* w) {
    DYNAMIC_SHARED(float, p);  // [E]
    const int t = blockIdx.x, lane = threadIdx.x;
    const float* z = logits + (long long)t * E;
    float m = -__int_as_float(0x7f800000);
    for (int e = lane; e < E; e += 32) m = fmaxf(m, z[e]);
    m = warp_max(m);
    float tot = 0.0f;
    for (int e = lane; e < E; e += 32) {
        p[e] = expf(z[e] - m);
        tot += p[e];
    }
    const float inv = 1.0f / warp_sum(tot);
    for (int e = lane; e < E; e += 32) p[e] *= inv;
    __syncwarp();
    float ksum = 0.0f;
    for (int j = 0; j < k; j++) {
        float bv = -2.0f;
        int bi = E;
        for (int e = lane; e < E; e += 32)
            if (p[e] > bv) { bv = p[e]; bi = e; }  // ascending e per lane: strict > keeps the lower id
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
        }
        ksum += bv;
        if (lane == 0) {
            idx[t * k + j] = bi;
            w[t * k + j] = bv;
            p[bi] = -1.0f;
        }
        __syncwarp();
    }
    if (renorm)
        for (int j = lane; j < k; j += 32) w[t * k + j] /= ksum;
}
