// Token embedding lookup: out[t] = float32(table[tokens[t]]).
//
// Layout: tokens int64[T] (device); table [V, D] as stored (f32, f16/bf16 bits, or the rows' bytes in
// a GGUF block format, blocks.cuh); out f32[T, D].
// Launch: 256 threads per block, grid (ceil(D / (256 VN)), T): one thread per VN output elements
// (Weights<W>::VN: 8 for f16 / bf16, 4 otherwise).
// Napkin math: T * D * (sizeof(w) + 4) bytes, a few KB per decode token: launch-latency bound.
#include "blocks.cuh"

template <typename W>
__device__ void embed(const long long* tokens, const W* table, float* out, int D) {
    const int VN = Weights<W>::VN;
    const int e0 = (blockIdx.x * blockDim.x + threadIdx.x) * VN;
    const long long t = blockIdx.y;
    if (e0 >= D) return;
    const W* row = table + tokens[t] * Weights<W>::units(D);
    float w[VN];
    Weights<W>::load(row, e0, D, Weights<W>::vec(row, D), w);
#pragma unroll
    for (int i = 0; i < VN; i++)
        if (e0 + i < D) out[t * D + e0 + i] = w[i];
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
extern "C" __global__ void embed_q8_0(const long long* tokens, const Q8_0* table, float* out, int D) {
    embed(tokens, table, out, D);
}
extern "C" __global__ void embed_q4_0(const long long* tokens, const Q4_0* table, float* out, int D) {
    embed(tokens, table, out, D);
}
extern "C" __global__ void embed_q4_1(const long long* tokens, const Q4_1* table, float* out, int D) {
    embed(tokens, table, out, D);
}
extern "C" __global__ void embed_q5_0(const long long* tokens, const Q5_0* table, float* out, int D) {
    embed(tokens, table, out, D);
}
extern "C" __global__ void embed_q5_1(const long long* tokens, const Q5_1* table, float* out, int D) {
    embed(tokens, table, out, D);
}
extern "C" __global__ void embed_q4_k(const long long* tokens, const Q4_K* table, float* out, int D) {
    embed(tokens, table, out, D);
}
extern "C" __global__ void embed_q5_k(const long long* tokens, const Q5_K* table, float* out, int D) {
    embed(tokens, table, out, D);
}
extern "C" __global__ void embed_q6_k(const long long* tokens, const Q6_K* table, float* out, int D) {
    embed(tokens, table, out, D);
}
