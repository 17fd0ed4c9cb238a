// GGUF block formats as weight element types: a row of n weights is n / E blocks of B bytes, laid
// out as llama.cpp's block_q8_0 ... block_q6_K (ggml-common.h), so a GGUF tensor's rows are used as
// they are in the file. Each format is a one-byte type, so that pointers to its rows step in bytes.
// Weights<F>::load decodes 4 consecutive weights e0..e0+3 (e0 a multiple of 4: they share one
// scale, the formats' scales cover 16 or 32 elements) to exactly the f32 values of
// gguf.quants.dequantize, as lowmoe/backend/quant.py's decoders do on the CPU: f16 scales widened,
// each product and sum rounded on its own (no FMA: __fmul_rn, __fadd_rn, __fsub_rn).
// VN is 4, as for f32 weights, so row_dot sums a quantized row in the order it sums the f32 row of
// its dequantized weights: lowmoe/backend/exact.py computes the GPU's bits from those.
// Napkin math: 4.5 bits per weight for q4_k (2.65 MB per Qwen3-30B-A3B expert, 0.55 us at 4.8 TB/s);
// each lane reads 2-4 bytes per 4 weights, the 8 lanes of a 32-element block one 16-byte line
// between them, plus the block's scale bytes (L1 hits after the first lane).
#include "common.cuh"

__device__ __forceinline__ float f16_at(const unsigned char* p) {
    Half h;
    h.bits = (unsigned short)(p[0] | (p[1] << 8));
    return to_f32(h);
}

// d sc_s and dmin m_s of sub-block s < 8 of the Q4_K / Q5_K block at b: the 6-bit scale and min
// from its 12 scale bytes p = b + 4 (gguf's Q4_K.get_scale_min): s < 4 in the low 6 bits of bytes s
// and 4 + s; s >= 4 in the nibbles of byte 4 + s, their top 2 bits in the top bits of bytes s - 4
// and s.
__device__ __forceinline__ void scale_min(const unsigned char* b, int s, float& ds, float& dm) {
    const unsigned char* p = b + 4;
    int sc, m;
    if (s < 4) {
        sc = p[s] & 63;
        m = p[4 + s] & 63;
    } else {
        sc = (p[4 + s] & 15) | ((p[s - 4] >> 2) & 48);
        m = (p[4 + s] >> 4) | ((p[s] >> 2) & 48);
    }
    ds = __fmul_rn(f16_at(b), (float)sc);
    dm = __fmul_rn(f16_at(b + 2), (float)m);
}

// decode4(b, j, w): the block at b, its elements j..j+3 -> w.
struct Q8_0 {  // f16 d, int8 q[32]; w = q d
    unsigned char byte;
    static const int E = 32, B = 34;
    __device__ static __forceinline__ void decode4(const unsigned char* b, int j, float w[4]) {
        const float d = f16_at(b);
#pragma unroll
        for (int i = 0; i < 4; i++) w[i] = __fmul_rn((float)(signed char)b[2 + j + i], d);
    }
};

// Nibble of element j < 32 from q[16]: elements 0-15 the low nibbles, 16-31 the high.
__device__ __forceinline__ int nibble(const unsigned char* q, int j) { return j < 16 ? q[j] & 15 : q[j - 16] >> 4; }
__device__ __forceinline__ unsigned u32_at(const unsigned char* p) {
    return p[0] | ((unsigned)p[1] << 8) | ((unsigned)p[2] << 16) | ((unsigned)p[3] << 24);
}

struct Q4_0 {  // f16 d, q[16] nibbles; w = d (q - 8)
    unsigned char byte;
    static const int E = 32, B = 18;
    __device__ static __forceinline__ void decode4(const unsigned char* b, int j, float w[4]) {
        const float d = f16_at(b);
#pragma unroll
        for (int i = 0; i < 4; i++) w[i] = __fmul_rn(d, (float)(nibble(b + 2, j + i) - 8));
    }
};

struct Q4_1 {  // f16 d, f16 m, q[16] nibbles; w = d q + m
    unsigned char byte;
    static const int E = 32, B = 20;
    __device__ static __forceinline__ void decode4(const unsigned char* b, int j, float w[4]) {
        const float d = f16_at(b), m = f16_at(b + 2);
#pragma unroll
        for (int i = 0; i < 4; i++) w[i] = __fadd_rn(__fmul_rn(d, (float)nibble(b + 4, j + i)), m);
    }
};

struct Q5_0 {  // f16 d, uint32 h (bit j: bit 4 of element j), q[16] nibbles; w = d (q - 16)
    unsigned char byte;
    static const int E = 32, B = 22;
    __device__ static __forceinline__ void decode4(const unsigned char* b, int j, float w[4]) {
        const float d = f16_at(b);
        const unsigned h = u32_at(b + 2);
#pragma unroll
        for (int i = 0; i < 4; i++)
            w[i] = __fmul_rn(d, (float)((nibble(b + 6, j + i) | (int)((h >> (j + i)) & 1) << 4) - 16));
    }
};

struct Q5_1 {  // f16 d, f16 m, uint32 h, q[16] as Q5_0; w = d q + m
    unsigned char byte;
    static const int E = 32, B = 24;
    __device__ static __forceinline__ void decode4(const unsigned char* b, int j, float w[4]) {
        const float d = f16_at(b), m = f16_at(b + 2);
        const unsigned h = u32_at(b + 4);
#pragma unroll
        for (int i = 0; i < 4; i++)
            w[i] = __fadd_rn(__fmul_rn(d, (float)(nibble(b + 8, j + i) | (int)((h >> (j + i)) & 1) << 4)), m);
    }
};

// Q4_K, Q5_K: f16 d, f16 dmin, 12 scale bytes, [Q5_K: qh[32]], q[128]: byte 32 i + l holds element
// 64 i + l (low nibble) and 64 i + 32 + l (high); sub-block s = j / 32: w = (d sc_s) q - dmin m_s.
struct Q4_K {
    unsigned char byte;
    static const int E = 256, B = 144;
    __device__ static __forceinline__ void decode4(const unsigned char* b, int j, float w[4]) {
        const int s = j / 32, l = j % 32;
        float ds, dm;
        scale_min(b, s, ds, dm);
        const unsigned char* q = b + 16 + 32 * (s / 2) + l;
#pragma unroll
        for (int i = 0; i < 4; i++) w[i] = __fsub_rn(__fmul_rn(ds, (float)(s & 1 ? q[i] >> 4 : q[i] & 15)), dm);
    }
};

struct Q5_K {  // bit s of qh[l]: bit 4 of element 32 s + l
    unsigned char byte;
    static const int E = 256, B = 176;
    __device__ static __forceinline__ void decode4(const unsigned char* b, int j, float w[4]) {
        const int s = j / 32, l = j % 32;
        float ds, dm;
        scale_min(b, s, ds, dm);
        const unsigned char* q = b + 48 + 32 * (s / 2) + l;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int v = (s & 1 ? q[i] >> 4 : q[i] & 15) | (((b[16 + l + i] >> s) & 1) << 4);
            w[i] = __fsub_rn(__fmul_rn(ds, (float)v), dm);
        }
    }
};

// Q6_K: ql[128], qh[64], int8 sc[16], f16 d. Element 128 i + 32 s + l (s < 4, l < 32): low 4 bits
// from ql[64 i + 32 (s % 2) + l] (nibble s / 2), high 2 from qh[32 i + l] (bits 2 s);
// w = (d sc[8 i + 2 s + l / 16]) (q - 32).
struct Q6_K {
    unsigned char byte;
    static const int E = 256, B = 210;
    __device__ static __forceinline__ void decode4(const unsigned char* b, int j, float w[4]) {
        const int i = j / 128, s = j % 128 / 32, l = j % 32;
        const float ds = __fmul_rn(f16_at(b + 208), (float)(signed char)b[192 + 8 * i + 2 * s + l / 16]);
        const unsigned char* ql = b + 64 * i + 32 * (s & 1) + l;
        const unsigned char* qh = b + 128 + 32 * i + l;
#pragma unroll
        for (int t = 0; t < 4; t++) {
            const int v = (s < 2 ? ql[t] & 15 : ql[t] >> 4) | (((qh[t] >> (2 * s)) & 3) << 4);
            w[t] = __fmul_rn(ds, (float)(v - 32));
        }
    }
};

template <typename F>
struct BlockWeights {
    static const int VN = 4;
    __device__ static __forceinline__ long long units(int n) { return (long long)(n / F::E) * F::B; }
    __device__ static __forceinline__ bool vec(const F*, int) { return true; }  // n is a multiple of E
    __device__ static __forceinline__ void load(const F* row, int e0, int, bool, float w[4]) {
        F::decode4((const unsigned char*)row + (long long)(e0 / F::E) * F::B, e0 % F::E, w);
    }
};
template <> struct Weights<Q8_0> : BlockWeights<Q8_0> {};
template <> struct Weights<Q4_0> : BlockWeights<Q4_0> {};
template <> struct Weights<Q4_1> : BlockWeights<Q4_1> {};
template <> struct Weights<Q5_0> : BlockWeights<Q5_0> {};
template <> struct Weights<Q5_1> : BlockWeights<Q5_1> {};
template <> struct Weights<Q4_K> : BlockWeights<Q4_K> {};
template <> struct Weights<Q5_K> : BlockWeights<Q5_K> {};
template <> struct Weights<Q6_K> : BlockWeights<Q6_K> {};
