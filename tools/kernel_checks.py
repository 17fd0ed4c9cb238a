"""The kernel cases of tools/gpu_check.py (run by tests/test_host_gpu.py on the CPU stand-in too):
each check_* launches one kernel through lowmoe/backend/cuda.py on fresh random inputs and returns
its error against NumPy float64; KERNEL_CASES lists the shapes each is checked at, including odd
ones. Outputs start as NaN, so every element must be written."""

import types

import numpy as np

from kernel_inputs import conv_ref, delta_inputs, delta_rule_ref, err, randn, rounded, silu, weights

TOL = 1e-4  # max abs error / max |reference|: weights are exact in both, so only f32 sums differ


def check_linear(cuda, cp, g, dtype, T, D, R):
    x = randn(g, T, D)
    w, w64 = weights(g, (R, D), dtype, 1 / np.sqrt(D))
    b = randn(g, R)
    out = cp.full((T, R), np.nan, np.float32)
    cuda.linear(cp.asarray(x), cp.asarray(w), dtype, out, cp.asarray(b))
    return err(cp.asnumpy(out), x.astype(np.float64) @ w64.T + b)


def check_embed(cuda, cp, g, dtype, V, D, T):
    table, t64 = weights(g, (V, D), dtype, 1.0)
    tokens = g.integers(0, V, T)
    tokens[-1] = V - 1
    out = cp.full((T, D), np.nan, np.float32)
    cuda.embed(cp.asarray(tokens, dtype=np.int64), cp.asarray(table), dtype, out)
    return err(cp.asnumpy(out), t64[tokens])


def check_rms_norm(cuda, cp, g, rows, N, eps):
    x, w = randn(g, rows, N, scale=3.0), randn(g, N)
    out = cp.full((rows, N), np.nan, np.float32)
    cuda.rms_norm(cp.asarray(x), cp.asarray(w), eps, out)
    x64 = x.astype(np.float64)
    return err(cp.asnumpy(out), w * (x64 / np.sqrt((x64**2).mean(1, keepdims=True) + eps)))


def check_gated_rms_norm(cuda, cp, g, rows, N, eps):
    x, z, w = randn(g, rows, N, scale=3.0), randn(g, rows, N, scale=2.0), randn(g, N)
    out = cuda.gated_rms_norm(cp.asarray(x), cp.asarray(z), cp.asarray(w), eps)
    x64 = x.astype(np.float64)
    return err(cp.asnumpy(out), w * (x64 / np.sqrt((x64**2).mean(1, keepdims=True) + eps)) * silu(z.astype(np.float64)))


def check_l2_norm(cuda, cp, g, rows, N):
    x = randn(g, rows, N, scale=3.0)
    x64 = x.astype(np.float64)
    return err(cp.asnumpy(cuda.l2_norm(cp.asarray(x))), x64 / np.sqrt((x64**2).sum(1, keepdims=True) + 1e-6))


def check_causal_conv(cuda, cp, g, T, C, K):
    """The conv from a non-zero window: its output and the window it leaves (one error over both)."""
    x, w, state = randn(g, T, C), randn(g, C, K, scale=0.5), randn(g, K - 1, C)
    ref, ref_state = conv_ref(x, w, state)
    d_state, out = cp.asarray(state), cp.full((T, C), np.nan, np.float32)
    cuda.causal_conv(cp.asarray(x), cp.asarray(w), d_state, out)
    return max(err(cp.asnumpy(out), ref), err(cp.asnumpy(d_state), ref_state))


def check_delta_gates(cuda, cp, g, T, Hv):
    b, a = randn(g, T, Hv, scale=4.0), randn(g, T, Hv, scale=8.0)  # a + dt_bias past softplus's threshold 20 too
    A, dt_bias = -np.abs(randn(g, Hv)), randn(g, Hv, scale=8.0)
    beta, gate = cuda.delta_gates(*(cp.asarray(v) for v in (b, a, A, dt_bias)))
    z = a.astype(np.float64) + dt_bias
    ref_g = A * np.where(z > 20, z, np.log1p(np.exp(np.minimum(z, 20))))
    return max(err(cp.asnumpy(beta), 1 / (1 + np.exp(-b.astype(np.float64)))), err(cp.asnumpy(gate), ref_g))


def check_delta_rule(cuda, cp, g, T, Hk, Hv, dk, dv, tiled):
    """From a non-zero state: the output and the state it leaves."""
    q, k, v, gate, beta, S = delta_inputs(g, T, Hk, Hv, dk, dv)
    ref, ref_S = delta_rule_ref(q, k, v, gate, beta, S, tiled)
    d_S, out = cp.asarray(S), cp.full((T, Hv, dv), np.nan, np.float32)
    cuda.gated_delta_rule(*(cp.asarray(a) for a in (q, k, v, gate, beta)), d_S, out, tiled)
    return max(err(cp.asnumpy(out), ref), err(cp.asnumpy(d_S), ref_S))


def check_rope(cuda, cp, g, T, H, hd, start, rot=None):
    """RoPE of each head's first `rot` dims (all of them when None; Qwen3.5's partial RoPE), in place:
    the rest of each head must stay as it was."""
    from lowmoe.model import rope_tables

    rot = rot or hd
    cos, sin = rope_tables(types.SimpleNamespace(head_dim=rot, rope_theta=1e4), np.arange(start + T + 3))
    x = randn(g, T, H, hd)
    d = cp.asarray(x)
    cuda.rope(d, cp.asarray(cos), cp.asarray(sin), start)
    c, s = cos[start : start + T, None].astype(np.float64), sin[start : start + T, None].astype(np.float64)
    x64, half = x.astype(np.float64), rot // 2
    ref = np.concatenate([x64[..., :half] * c - x64[..., half:rot] * s, x64[..., half:rot] * c + x64[..., :half] * s,
                          x64[..., rot:]], -1)
    return err(cp.asnumpy(d), ref)


def check_attention(cuda, cp, g, dtype, T, H, KV, hd, start):
    # A KV cache of `dtype` (f32 or f16 / bf16 bits) against float64 over the values it holds.
    cap = start + T + 5
    q = randn(g, T, H, hd)
    k, k64 = rounded(g.standard_normal((KV, cap, hd)), dtype)
    v, v64 = rounded(g.standard_normal((KV, cap, hd)), dtype)
    nan = {"f32": np.nan, "f16": 0x7E00, "bf16": 0x7FC0}[dtype]  # rows past the context must never be read
    k[:, start + T :], v[:, start + T :] = nan, nan
    out = cp.full((T, H, hd), np.nan, np.float32)
    cuda.attention(cp.asarray(q), cp.asarray(k), cp.asarray(v), start, out, dtype)
    ref = np.empty((T, H, hd))
    for t in range(T):
        L = start + t + 1
        for h in range(H):
            kv = h // (H // KV)
            s = k64[kv, :L] @ q[t, h] / np.sqrt(hd)
            p = np.exp(s - s.max())
            ref[t, h] = (p / p.sum()) @ v64[kv, :L]
    return err(cp.asnumpy(out), ref)


def check_kv_store(cuda, cp, g, dtype, T, KV, hd, start):
    # Exact: the stored elements are the step's keys and values rounded to nearest even, and the
    # positions around them keep their fill.
    cap = start + T + 3
    k, v = randn(g, T, KV, hd, scale=3.0), randn(g, T, KV, hd)
    fill = np.float32(7) if dtype == "f32" else np.uint16(7)
    kc, vc = cp.full((KV, cap, hd), fill), cp.full((KV, cap, hd), fill)
    cuda.kv_store(cp.asarray(k), cp.asarray(v), kc, vc, start, dtype)
    worst = 0.0
    for cache, x in ((cp.asnumpy(kc), k), (cp.asnumpy(vc), v)):
        bits, _ = rounded(x.transpose(1, 0, 2), dtype)
        around = np.delete(cache, np.s_[start : start + T], axis=1)
        if not (np.array_equal(cache[:, start : start + T], bits) and (around == fill).all()):
            worst = float("inf")
    return worst


def check_router(cuda, cp, g, T, E, k, renorm, ties):
    from lowmoe.backend import cpu

    logits = randn(g, T, E, scale=2.0)
    if ties:  # equal logits: the lower expert id must come first, as on the CPU
        logits[:, 1::2] = logits[:, 0::2][:, : logits[:, 1::2].shape[1]]
    idx, w = cuda.router_topk(cp.asarray(logits), k, renorm)  # in buffers filled with -1 / NaN (POISON)
    cidx, _ = cpu.router_topk(logits, k, renorm)
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ref = np.take_along_axis(p, cidx, 1)
    if renorm:
        ref /= ref.sum(1, keepdims=True)
    same = np.array_equal(cp.asnumpy(idx), cidx)
    return err(cp.asnumpy(w), ref) if same else float("inf")


def expert_sum(cuda, x, gate, up, down, dtype, idx, w, out):
    """out f32[T, D] = sum_j w[t, j] * expert idx[t, j](x[t]) over a layer's stacked experts, as the
    resident GPU experts compute it (tier/placement.DeviceExperts)."""
    y = cuda.buffer((idx.size, x.shape[1]))
    cuda.expert_rows(x, gate, up, down, dtype, idx, y)
    cuda.expert_combine(y, w, out)


def check_experts(cuda, cp, g, dtype, E, I, D, k, T):
    x = randn(g, T, D)
    gate, g64 = weights(g, (E, I, D), dtype, 1 / np.sqrt(D))
    up, u64 = weights(g, (E, I, D), dtype, 1 / np.sqrt(D))
    down, d64 = weights(g, (E, D, I), dtype, 1 / np.sqrt(I))
    idx = np.stack([g.choice(E, k, replace=False) for _ in range(T)]).astype(np.int32)
    w = g.uniform(0.1, 1.0, (T, k)).astype(np.float32)
    out = cp.full((T, D), np.nan, np.float32)
    expert_sum(cuda, cp.asarray(x), cp.asarray(gate), cp.asarray(up), cp.asarray(down), dtype, cp.asarray(idx),
               cp.asarray(w), out)
    x64, ref = x.astype(np.float64), np.zeros((T, D))
    for t in range(T):
        for j, e in enumerate(idx[t]):
            ref[t] += w[t, j] * (d64[e] @ (silu(g64[e] @ x64[t]) * (u64[e] @ x64[t])))
    return err(cp.asnumpy(out), ref)


DT = ("f32", "f16", "bf16")
BLOCKS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")
K_QUANTS = ("q4_k", "q5_k", "q6_k")  # 256-element blocks: rows a multiple of 256
# Shapes for the block formats, (E, I, D, k, T) of the experts: rows a multiple of the block, one lane's
# 4 weights in each sub-block, more than one pass of the warp (D 512), a Qwen3-30B-A3B layer.
BLOCK_EXPERTS = [(8, 256, 512, 2, 1), (16, 768, 2048, 8, 1), (4, 256, 256, 2, 5), (16, 768, 2048, 8, 40)]
KERNEL_CASES = {
    "linear": (check_linear, [(d, *s) for d in DT for s in [(1, 37, 53), (1, 2048, 4096), (5, 64, 7), (17, 256, 300),
                                                             (1, 1, 1), (9, 1000, 333), (2, 4104, 129)]]),
    "embed": (check_embed, [(d, *s) for d in DT for s in [(100, 37, 3), (1000, 256, 1), (50, 2048, 17)]]),
    "rms_norm": (check_rms_norm, [(1, 37, 1e-6), (3, 64, 1e-5), (17, 2048, 1e-6), (40, 24, 1e-2)]),
    "gated_rms_norm": (check_gated_rms_norm, [(1, 37, 1e-6), (64, 128, 1e-6), (40, 24, 1e-2)]),
    "l2_norm": (check_l2_norm, [(1, 16), (32, 128), (7, 300)]),
    "causal_conv": (check_causal_conv, [(1, 8192, 4), (7, 33, 4), (5, 16, 3), (2, 5, 2), (64, 300, 4)]),
    "delta_gates": (check_delta_gates, [(1, 32), (7, 5), (300, 4)]),
    "delta_rule": (check_delta_rule, [(1, 16, 32, 128, 128, False), (1, 2, 4, 16, 8, True), (6, 2, 2, 16, 16, False),
                                      (9, 1, 3, 8, 40, True), (33, 4, 8, 32, 32, False)]),
    "rope": (check_rope, [(1, 4, 6, 0), (3, 2, 10, 5), (17, 3, 128, 100), (1, 32, 128, 8191), (1, 16, 256, 8191, 64),
                          (5, 3, 32, 7, 8)]),
    "attention": (check_attention, [(d, *s) for d in DT for s in [
        (1, 4, 2, 64, 0), (1, 32, 8, 128, 8191), (1, 6, 3, 24, 1000), (7, 4, 2, 32, 0), (33, 4, 4, 16, 50),
        (5, 2, 1, 256, 3), (1, 4, 1, 6, 300), (64, 8, 2, 128, 0)]]),
    "kv_store": (check_kv_store, [(d, *s) for d in DT for s in [(1, 8, 128, 8191), (7, 3, 24, 5), (64, 2, 256, 0)]]),
    "router_topk": (check_router, [(1, 16, 4, True, False), (5, 8, 2, False, False), (3, 128, 8, True, False),
                                   (2, 60, 6, False, False), (4, 16, 4, True, True), (1, 33, 33, True, False)]),
    "expert_ffn decode": (check_experts, [(d, *s) for d in DT for s in [(16, 96, 256, 4, 1), (8, 48, 64, 2, 1),
                                                                        (4, 37, 53, 2, 1), (16, 768, 2048, 8, 1),
                                                                        (1, 80, 64, 1, 1)]]),
    "expert_ffn prefill": (check_experts, [(d, *s) for d in DT for s in [(8, 48, 64, 2, 9), (16, 96, 256, 4, 33),
                                                                         (4, 37, 53, 3, 5), (1, 80, 64, 1, 7),
                                                                         (16, 768, 2048, 8, 40)]]),
    "linear blocks": (check_linear, [(d, *s) for d in BLOCKS for s in [(1, 256, 53), (1, 2048, 4096), (9, 512, 333)]]
                      + [(d, 1, 64, 7) for d in BLOCKS if d not in K_QUANTS]),
    "embed blocks": (check_embed, [(d, *s) for d in BLOCKS for s in [(100, 256, 3), (50, 2048, 17)]]),
    "expert_ffn blocks": (check_experts, [(d, *s) for d in BLOCKS for s in BLOCK_EXPERTS]),
}
