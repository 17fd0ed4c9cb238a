// Token embedding lookup: out[t] = float32(table[tokens[t]]).
//
// Layout: tokens int64[T] (device); table [V, D] as stored (f32, or f16/bf16 bits); out f32[T, D].
// Launch: 256 threads per block, grid (ceil(D / 256), T): one thread per output element.
// Napkin math: T * D * (sizeof(w) + 4) bytes, a few KB per decode token: launch-latency bound.
#include "common.cuh"

template <typename W>
__device__ void embed(const long long* tokens, const W* table, float* out, int D) {
    const int d = blockIdx.x * blockDim.x + threadIdx.x;
    const int t = blockIdx.y;
    if (d < D) out[(long long)t * D + d] = to_f32(table[tokens[t] * D + d]);
}

extern "C" __global__ void embed_f32(const long long* tokens, const float* table, float* out, int D) {
    embed(tokens, table, out, D);
}
extern "C" __global__ void embed_f16(const long long* tokens, const Half* table, float* out, int D) {
    embed(tokens, table, out, D);
}
extern "C" __global__ void embed_bf16(const long long* tokens, const BFloat* table, float* out, int D) {
    embed(tokens, table, out, D);
}
