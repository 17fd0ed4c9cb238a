// Causal GQA attention over the KV cache, split along the sequence (flash-decoding): each block
// handles one chunk of one query row's keys with an online softmax and writes an unnormalised
// partial result; attn_combine_f32 merges the chunks. One kernel pair serves decode (T = 1, many
// chunks so that a long context fills the GPU) and prefill (T > 1, causal: query t sees positions
// 0..start+t; usually one chunk, as T * H blocks already fill it). Same math as cpu.attention.
//
// Layout: q f32[T, H, hd]; k, v caches [KV, cap, hd] of f32, f16 or bf16 (model.KVCache's, one
// layer; the half types as their bits), filled up to start + T - 1 by kv_store_<dtype>; query head h reads kv head h / (H / KV). Partials: o f32[T, H, S, hd] =
// sum_j exp(s_j - m) v_j and ml f32[T, H, S, 2] = (m = max_j s_j, l = sum_j exp(s_j - m)) over the
// chunk; an empty chunk (past the causal end) writes m = -inf, l = 0, o = 0. out f32[T, H, hd].
// Launch: split: 128 threads (4 warps), grid (S, H, T), hd <= 256. Keys of a chunk go in
// sub-chunks of 128: a warp per key computes its score (lanes over hd), then thread d accumulates
// output dims d and d + 128 over the sub-chunk's values (coalesced rows). combine: grid T * H,
// 128 threads.
// Napkin math, decode at 8K context, KV = 8, hd = 128: K and V are 2 * 8 * 8192 * 128 * 2 B = 32 MB
// per layer in f16 (64 MB in f32) -> ~7 us at 4.8 TB/s if all SMs stream; S = 32 chunks of 256 keys x 32 heads gives
// 1024 blocks (the G query heads of a kv head re-read its rows from L2, not HBM).
#include "common.cuh"

#define SUB 128

// The shared arrays, qs[256], sc[SUB] and scratch[32], are declared in each entry point (where the
// CPU stand-in counts them).
template <typename K>
__device__ void attn_split(const float* q, const K* kc, const K* vc, float* part_o, float* part_ml, int start, int H,
                           int KV, int cap, int hd, int chunk, float scale, float* qs, float* sc, float* scratch) {
    const int s = blockIdx.x, h = blockIdx.y, t = blockIdx.z, S = gridDim.x;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
    const int g = h / (H / KV);
    const int L = start + t + 1;
    const int lo = s * chunk, hi = min(lo + chunk, L);
    const long long row = ((long long)t * H + h) * S + s;
    const K* kg = kc + (long long)g * cap * hd;
    const K* vg = vc + (long long)g * cap * hd;
    for (int d = tid; d < hd; d += blockDim.x) qs[d] = q[((long long)t * H + h) * hd + d];
    float m = -__int_as_float(0x7f800000), l = 0.0f;
    float o0 = 0.0f, o1 = 0.0f;  // output dims tid and tid + 128
    for (int j0 = lo; j0 < hi; j0 += SUB) {
        const int n = min(SUB, hi - j0);
        __syncthreads();  // qs written; sc free from the previous sub-chunk
        for (int j = warp; j < n; j += nw) {
            const K* kr = kg + (long long)(j0 + j) * hd;
            float acc = 0.0f;
            for (int d = lane; d < hd; d += 32) acc = fmaf(qs[d], to_f32(kr[d]), acc);
            acc = warp_sum(acc);
            if (lane == 0) sc[j] = acc * scale;
        }
        __syncthreads();
        const float mnew = fmaxf(m, block_max(tid < n ? sc[tid] : -__int_as_float(0x7f800000), scratch));
        const float alpha = expf(m - mnew);  // 0 on the first sub-chunk (m = -inf)
        const float p = tid < n ? expf(sc[tid] - mnew) : 0.0f;
        const float psum = block_sum(p, scratch);  // its syncs also order the sc reads before this write
        if (tid < n) sc[tid] = p;
        __syncthreads();
        l = l * alpha + psum;
        o0 *= alpha;
        o1 *= alpha;
        for (int j = 0; j < n; j++) {
            const K* vr = vg + (long long)(j0 + j) * hd;
            if (tid < hd) o0 = fmaf(sc[j], to_f32(vr[tid]), o0);
            if (tid + 128 < hd) o1 = fmaf(sc[j], to_f32(vr[tid + 128]), o1);
        }
        m = mnew;
    }
    if (tid < hd) part_o[row * hd + tid] = o0;
    if (tid + 128 < hd) part_o[row * hd + tid + 128] = o1;
    if (tid == 0) {
        part_ml[row * 2] = m;
        part_ml[row * 2 + 1] = l;
    }
}

extern "C" __global__ void attn_split_f32(const float* q, const float* kc, const float* vc, float* part_o,
                                          float* part_ml, int start, int H, int KV, int cap, int hd, int chunk,
                                          float scale) {
    __shared__ float qs[256], sc[SUB], scratch[32];
    attn_split(q, kc, vc, part_o, part_ml, start, H, KV, cap, hd, chunk, scale, qs, sc, scratch);
}
extern "C" __global__ void attn_split_f16(const float* q, const Half* kc, const Half* vc, float* part_o,
                                          float* part_ml, int start, int H, int KV, int cap, int hd, int chunk,
                                          float scale) {
    __shared__ float qs[256], sc[SUB], scratch[32];
    attn_split(q, kc, vc, part_o, part_ml, start, H, KV, cap, hd, chunk, scale, qs, sc, scratch);
}
extern "C" __global__ void attn_split_bf16(const float* q, const BFloat* kc, const BFloat* vc, float* part_o,
                                           float* part_ml, int start, int H, int KV, int cap, int hd, int chunk,
                                           float scale) {
    __shared__ float qs[256], sc[SUB], scratch[32];
    attn_split(q, kc, vc, part_o, part_ml, start, H, KV, cap, hd, chunk, scale, qs, sc, scratch);
}

// kv_store: this step's keys and values k, v f32[T, KV, hd] (RoPE applied) -> the caches [KV, cap, hd]
// at positions start..start+T-1, rounded to the cache's type (to nearest even, as torch's .to()).
// Launch: grid T * KV, 128 threads over hd.
template <typename K>
__device__ void kv_store(const float* k, const float* v, K* kc, K* vc, int start, int KV, int cap, int hd) {
    const int t = blockIdx.x / KV, g = blockIdx.x % KV;
    const long long src = ((long long)t * KV + g) * hd, dst = ((long long)g * cap + start + t) * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        kc[dst + d] = from_f32(k[src + d], K());
        vc[dst + d] = from_f32(v[src + d], K());
    }
}

extern "C" __global__ void kv_store_f32(const float* k, const float* v, float* kc, float* vc, int start, int KV,
                                        int cap, int hd) {
    kv_store(k, v, kc, vc, start, KV, cap, hd);
}
extern "C" __global__ void kv_store_f16(const float* k, const float* v, Half* kc, Half* vc, int start, int KV,
                                        int cap, int hd) {
    kv_store(k, v, kc, vc, start, KV, cap, hd);
}
extern "C" __global__ void kv_store_bf16(const float* k, const float* v, BFloat* kc, BFloat* vc, int start, int KV,
                                         int cap, int hd) {
    kv_store(k, v, kc, vc, start, KV, cap, hd);
}

// out = sum_s exp(m_s - M) o_s / sum_s exp(m_s - M) l_s with M = max_s m_s. Chunk 0 is never empty
// (L >= 1), so M is finite and empty chunks weigh exp(-inf) = 0.
extern "C" __global__ void attn_combine_f32(const float* part_o, const float* part_ml, float* out, int S, int hd) {
    const long long th = blockIdx.x;  // t * H + h
    const float* ml = part_ml + th * S * 2;
    float M = -__int_as_float(0x7f800000);
    for (int s = 0; s < S; s++) M = fmaxf(M, ml[2 * s]);
    float den = 0.0f;
    for (int s = 0; s < S; s++) den += expf(ml[2 * s] - M) * ml[2 * s + 1];
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float num = 0.0f;
        for (int s = 0; s < S; s++) num += expf(ml[2 * s] - M) * part_o[(th * S + s) * hd + d];
        out[th * hd + d] = num / den;
    }
}
