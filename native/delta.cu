// Gated DeltaNet (the linear-attention layers of Qwen3.5 / 3.6-MoE), as lowmoe/backend/cpu.py's
// causal_conv, delta_gates and gated_delta_rule: the causal conv over q | k | v with its window,
// the per-head gates, and the delta rule on the recurrent state, one token after another (decode
// is T = 1; a prefill runs the same loop over its T tokens inside one launch).
//
// Napkin math (Qwen3.6-35B-A3B: Hv 32 value heads, dk = dv = 128, C = 8192 conv channels, K = 4):
// a decode step reads and writes the f32 state [32, 128, 128] twice, 8 MB per layer, and the conv
// reads 4 x 8192 weights: both bound by memory, a few microseconds per layer at H200 bandwidth.
#include "common.cuh"

// Causal depthwise conv of K taps, then SiLU. x f32[T, C] the new inputs; w f32[C, K]; state
// f32[K - 1, C] the K - 1 inputs before x, left as the last K - 1 of [state; x];
// out f32[T, C][t, c] = silu(sum_j w[c, j] window[t + j, c]), window = [state; x].
// Launch: one thread per channel, blocks of 256 over C.
extern "C" __global__ void causal_conv_f32(const float* x, const float* w, float* state, float* out, int T, int C,
                                           int K) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    for (int t = 0; t < T; t++) {
        float acc = 0.0f;
        for (int j = 0; j < K; j++) {
            const int at = t + j;  // in the window [state; x]
            const float in = at < K - 1 ? state[(long long)at * C + c] : x[(long long)(at - (K - 1)) * C + c];
            acc = __fadd_rn(acc, __fmul_rn(w[(long long)c * K + j], in));
        }
        out[(long long)t * C + c] = acc / (1.0f + expf(-acc));
    }
    // The new window: the last K - 1 of [state; x]. Ascending i reads only rows not yet written.
    for (int i = 0; i < K - 1; i++) {
        const int at = T + i;
        state[(long long)i * C + c] = at < K - 1 ? state[(long long)at * C + c] : x[(long long)(at - (K - 1)) * C + c];
    }
}

// The gates of n = T * Hv heads: beta = sigmoid(b), g = A[h] * softplus(a + dt_bias[h]), softplus
// exactly its input past 20 (torch's threshold). b, a, beta, g f32[T, Hv]; A, dt_bias f32[Hv].
// Launch: one thread per element, blocks of 256.
extern "C" __global__ void delta_gates_f32(const float* b, const float* a, const float* A, const float* dt_bias,
                                           float* beta, float* g, int n, int Hv) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int h = i % Hv;
    beta[i] = 1.0f / (1.0f + expf(-b[i]));
    const float z = a[i] + dt_bias[h];
    g[i] = A[h] * (z > 20.0f ? z : log1pf(expf(z)));
}

// The gated delta rule over T tokens: q, k f32[T, Hk, dk]; v f32[T, Hv, dv]; g, beta f32[T, Hv];
// S f32[Hv, dk, dv] the recurrent state, updated; out f32[T, Hv, dv]. Value head h reads key head
// h / (Hv / Hk), or h % Hk when `tiled` (a GGUF's order). Per token: S *= exp(g); delta = beta (v -
// S^T k); S += k delta^T; out = S^T q.
// Launch: grid (Hv, ceil(dv / 32)), 32 threads: each thread owns one column j of its head's state
// (S[h, :, j], dk floats) and needs no other thread's, so there is no synchronisation; a warp's
// accesses to S[h, i, j..j+31] are one coalesced line.
extern "C" __global__ void gated_delta_rule_f32(const float* q, const float* k, const float* v, const float* g,
                                                const float* beta, float* S, float* out, int T, int Hk, int Hv,
                                                int dk, int dv, int tiled) {
    const int h = blockIdx.x;
    const int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= dv) return;
    const int hk = tiled ? h % Hk : h / (Hv / Hk);
    float* col = S + (long long)h * dk * dv + j;  // col[i * dv] = S[h, i, j]
    for (int t = 0; t < T; t++) {
        const float* kt = k + ((long long)t * Hk + hk) * dk;
        const float* qt = q + ((long long)t * Hk + hk) * dk;
        const float decay = expf(g[(long long)t * Hv + h]);
        float mem = 0.0f;
        for (int i = 0; i < dk; i++) {
            const float s = col[(long long)i * dv] * decay;
            col[(long long)i * dv] = s;
            mem = fmaf(s, kt[i], mem);
        }
        const float delta = (v[((long long)t * Hv + h) * dv + j] - mem) * beta[(long long)t * Hv + h];
        float o = 0.0f;
        for (int i = 0; i < dk; i++) {
            const float s = fmaf(kt[i], delta, col[(long long)i * dv]);
            col[(long long)i * dv] = s;
            o = fmaf(s, qt[i], o);
        }
        out[((long long)t * Hv + h) * dv + j] = o;
    }
}
