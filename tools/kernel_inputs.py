"""Kernel inputs and float64 references for tools/gpu_check.py and the tests: random activations,
weights in every dtype lowmoe computes (f32, f16 / bf16 bits, GGUF block bytes) with the exact
float64 value of each weight, and the relative error a check reports."""

import numpy as np


def randn(g, *shape, scale=1.0):
    return (g.standard_normal(shape) * scale).astype(np.float32)


# Byte offsets of the f16 fields of a GGUF block (ggml-common.h): d, and m / dmin where there is one.
F16_AT = {"q8_0": [0], "q4_0": [0], "q4_1": [0, 2], "q5_0": [0], "q5_1": [0, 2], "q4_k": [0, 2], "q5_k": [0, 2],
          "q6_k": [208]}
# About the mean |weight| / |d| of random blocks (the quants times the sub-block scales).
_BLOCK_GAIN = {"q8_0": 64, "q4_0": 4, "q4_1": 8, "q5_0": 8, "q5_1": 16, "q4_k": 240, "q5_k": 480, "q6_k": 1200}


def random_blocks(fmt, R, C, rng, scale=None):
    """uint8 [R, C / E * B]: rows of C weights in the GGUF block format `fmt`, random bytes whose f16
    fields are finite: any finite bit pattern (subnormals and -0 included) when scale is None, else
    f16 of N(0, scale)."""
    from lowmoe.backend import quant

    E, B = quant.FORMATS[fmt]
    raw = rng.integers(0, 256, (R, C // E, B), dtype=np.uint8)
    for o in F16_AT[fmt]:
        if scale is None:
            bits = rng.integers(0, 0x7C00, raw.shape[:2], dtype=np.uint16) | (rng.integers(0, 2, raw.shape[:2], dtype=np.uint16) << 15)
        else:
            bits = (rng.standard_normal(raw.shape[:2]) * scale).astype(np.float16).view(np.uint16)
        raw[:, :, o : o + 2] = bits[..., None].view(np.uint8)
    return raw.reshape(R, -1)


def weights(g, shape, dtype, scale):
    """(array as the kernels take it, exact float64 value of each element); never zero for the float
    dtypes. A GGUF block format: its bytes uint8 [..., rows, row bytes] (random blocks whose weights
    are about `scale`), valued by quant.dequantize (bit for bit gguf's, tests/test_quant.py)."""
    from lowmoe.backend import quant

    if dtype in quant.FORMATS:
        *lead, C = shape
        R = int(np.prod(lead))
        raw = random_blocks(dtype, R, C, g, scale / _BLOCK_GAIN[dtype])
        return raw.reshape(*lead, -1), quant.dequantize(raw, dtype, (R, C)).astype(np.float64).reshape(shape)
    w = g.standard_normal(shape) * scale
    w[w == 0] = scale
    return rounded(w, dtype)


def rounded(x, dtype):
    """Values x -> (x in `dtype` as the kernels take it: f32, or f16 / bf16 bits as uint16, rounded to
    nearest even; the exact float64 value of each element)."""
    if dtype == "f32":
        x = x.astype(np.float32)
        return x, x.astype(np.float64)
    if dtype == "f16":
        bits = x.astype(np.float16).view(np.uint16)
        return bits, bits.view(np.float16).astype(np.float64)
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return bits, (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def err(got, ref):
    got = np.asarray(got, np.float64)
    if got.shape != ref.shape or not np.isfinite(got).all():
        return float("inf")
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def silu(g):
    return g / (1.0 + np.exp(-g))


def conv_ref(x, w, state):
    """float64 causal depthwise conv and SiLU over [state; x] -> (out [T, C], the new state: the last
    K - 1 rows of [state; x])."""
    K = w.shape[1]
    window = np.concatenate([state, x]).astype(np.float64)
    pre = np.stack([(w.astype(np.float64) * window[t : t + K].T).sum(1) for t in range(len(x))])
    return silu(pre), window[len(window) - (K - 1) :]


def delta_rule_ref(q, k, v, g, beta, S, tiled):
    """float64 loop over tokens and value heads: S <- exp(g) S; S += k (beta (v - S^T k))^T; out = S^T q.
    -> (out [T, Hv, dv], the new state)."""
    T, Hk, _ = q.shape
    Hv = v.shape[1]
    S, out = S.astype(np.float64), np.empty(v.shape)
    for t in range(T):
        for h in range(Hv):
            hk = h % Hk if tiled else h // (Hv // Hk)
            kk, qq = k[t, hk].astype(np.float64), q[t, hk].astype(np.float64)
            S[h] *= np.exp(g[t, h])
            delta = beta[t, h] * (v[t, h] - S[h].T @ kk)
            S[h] += np.outer(kk, delta)
            out[t, h] = S[h].T @ qq
    return out, S


def delta_inputs(g, T, Hk, Hv, dk, dv):
    """Random inputs of the delta rule as a layer makes them: q, k L2-normalised (q also by dk^-0.5),
    g < 0, beta in (0.1, 0.9), a non-zero state. -> (q, k, v, g, beta, S) f32."""
    def unit(*shape):
        x = g.standard_normal(shape)
        return (x / np.sqrt((x * x).sum(-1, keepdims=True))).astype(np.float32)

    q = (unit(T, Hk, dk) * np.float32(dk**-0.5)).astype(np.float32)
    return (q, unit(T, Hk, dk), randn(g, T, Hv, dv), -np.abs(randn(g, T, Hv)),
            g.uniform(0.1, 0.9, (T, Hv)).astype(np.float32), randn(g, Hv, dk, dv, scale=0.3))
