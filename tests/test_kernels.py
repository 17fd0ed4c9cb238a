"""CPU kernels against plain float64 NumPy references."""

import os
import sys

import numpy as np
import pytest

from lowmoe.backend import cpu

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
from kernel_inputs import delta_rule_ref, rounded  # noqa: E402  (tools/: gpu_check's float64 references)

RNG_SEED = 1234


def rng(*key):
    # A fixed, per-case seed so each parametrised case sees different data.
    return np.random.default_rng([RNG_SEED, *key])


def randn(g, *shape, scale=1.0):
    return (g.standard_normal(shape) * scale).astype(np.float32)


def nans(*shape):
    # Outputs start as NaN so an element the kernel forgets to write fails.
    return np.full(shape, np.nan, np.float32)


def assert_close(got, ref, tol=1e-5):
    """Max abs error relative to the largest reference magnitude."""
    got = np.asarray(got, np.float64)
    assert got.shape == ref.shape
    assert np.isfinite(got).all()
    err = np.abs(got - ref).max()
    assert err <= tol * np.abs(ref).max(), f"max err {err:.3g}, max |ref| {np.abs(ref).max():.3g}"


def to_bf16_bits(f):
    """float32 -> bfloat16 bits (uint16), round to nearest even."""
    u = f.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_bits_to_f32(u):
    return (u.astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------- conversion


def assert_same_floats(got, ref):
    # Bit-exact outside NaN; NaN exactly where the reference has NaN.
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), ref[~nan].view(np.uint32))


def test_f16_conversion_all_bit_patterns():
    u = np.arange(65536, dtype=np.uint16)
    ref = u.view(np.float16).astype(np.float32)
    got = cpu.to_f32(u, "f16")
    assert got.dtype == np.float32
    assert_same_floats(got, ref)
    # the interesting classes really are in there
    assert got[0x0001] == 2.0**-24 and got[0x8001] == -(2.0**-24)  # subnormals
    assert got[0x7C00] == np.inf and got[0xFC00] == -np.inf
    assert np.isnan(got[0x7E00])


def test_bf16_conversion_all_bit_patterns():
    u = np.arange(65536, dtype=np.uint16)
    ref = (u.astype(np.uint32) << 16).view(np.float32)
    assert_same_floats(cpu.to_f32(u, "bf16"), ref)


def test_bf16_rounding_helper():
    # The test's own rounding: ties to even, and the value is the nearest.
    f = np.array([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-9], np.float32)
    assert bf16_bits_to_f32(to_bf16_bits(f)).tolist() == [1.0, 1.0 + 2.0**-6, 1.0]


# ------------------------------------------------------------------ rms_norm


@pytest.mark.parametrize("T,N", [(1, 37), (3, 64), (17, 2048)])
def test_rms_norm(T, N):
    g = rng(1, T, N)
    x = randn(g, T, N, scale=3.0)
    w = randn(g, N)
    eps = 1e-6
    x64 = x.astype(np.float64)
    ref = w * (x64 / np.sqrt((x64**2).mean(axis=1, keepdims=True) + eps))
    y = cpu.rms_norm(x, w, eps)
    assert y.dtype == np.float32
    assert_close(y, ref)
    # eps matters for tiny rows
    tiny = np.full((1, N), 1e-4, np.float32)
    ref = w * (1e-4 / np.sqrt(1e-8 + 1e-2))
    assert_close(cpu.rms_norm(tiny, w, 1e-2), ref[None])


# ---------------------------------------------------------------------- rope


@pytest.mark.parametrize("T,H,hd,rot", [(1, 4, 6, 6), (3, 2, 10, 10), (17, 3, 128, 128), (3, 2, 32, 8), (2, 4, 256, 64)])
def test_rope(T, H, hd, rot):
    """HF's rotate_half RoPE on the first `rot` dims of each head (the tables' width); the rest untouched."""
    g = rng(2, T, H, hd, rot)
    x = randn(g, T, H, hd)
    pos = 5 + np.arange(T)[:, None]
    ang = pos * (10000.0 ** (-np.arange(0, rot, 2) / rot))[None]
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    # HF: x * cos + rotate_half(x) * sin, with cos/sin repeated over both halves
    x64 = x.astype(np.float64)[..., :rot]
    c = np.concatenate([cos, cos], axis=1)[:, None, :]
    s = np.concatenate([sin, sin], axis=1)[:, None, :]
    turned = np.concatenate([-x64[..., rot // 2 :], x64[..., : rot // 2]], axis=-1)
    ref = np.concatenate([x64 * c + turned * s, x[..., rot:].astype(np.float64)], axis=-1)
    cpu.rope(x, cos, sin)
    assert_close(x, ref)


# ----------------------------------------------------------------- attention


def attention_ref(q, k, v, start):
    T, H, hd = q.shape
    G = H // k.shape[0]
    out = np.zeros((T, H, hd))
    for t in range(T):
        L = start + t + 1
        for h in range(H):
            kk = k[h // G, :L].astype(np.float64)
            vv = v[h // G, :L].astype(np.float64)
            s = kk @ q[t, h].astype(np.float64) / np.sqrt(hd)
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ vv
    return out


@pytest.mark.parametrize(
    "T,start,H,KV,hd,S,qscale",
    [
        (1, 100, 8, 2, 16, 128, 1.0),  # decode, GQA 4:1
        (1, 0, 4, 4, 6, 8, 1.0),  # first token: attends to itself only
        (17, 0, 4, 1, 10, 32, 1.0),  # prefill from empty cache, KV=1
        (3, 20, 4, 4, 6, 30, 1.0),  # prefill after a prefix, MHA
        (5, 7, 8, 2, 128, 16, 1.0),  # GQA, hd=128
        (4, 9, 6, 3, 16, 13, 30.0),  # huge logits: needs the max shift
    ],
)
def test_attention(T, start, H, KV, hd, S, qscale):
    g = rng(3, T, start, H, KV, hd)
    q = randn(g, T, H, hd, scale=qscale)
    k = randn(g, KV, S, hd)
    v = randn(g, KV, S, hd)
    # Positions past the last query must never be read.
    k[:, start + T :] = np.nan
    v[:, start + T :] = np.nan
    out = nans(T, H, hd)
    cpu.attention(q, k, v, start, out, "f32")
    assert_close(out, attention_ref(q, k, v, start))


def test_attention_is_causal_and_gqa_grouped():
    # Changing the last position changes only the last query; changing kv
    # head 1 changes only query heads 2 and 3 (H=4, KV=2).
    g = rng(4)
    q, k, v = randn(g, 3, 4, 8), randn(g, 2, 5, 8), randn(g, 2, 5, 8)
    base, out = nans(3, 4, 8), nans(3, 4, 8)
    cpu.attention(q, k, v, 2, base, "f32")
    v2 = v.copy()
    v2[:, 4] += 1.0
    cpu.attention(q, k, v2, 2, out, "f32")
    assert np.array_equal(out[:2], base[:2]) and not np.allclose(out[2], base[2])
    v3 = v.copy()
    v3[1] += 1.0
    cpu.attention(q, k, v3, 2, out, "f32")
    assert np.array_equal(out[:, :2], base[:, :2]) and not np.allclose(out[:, 2:], base[:, 2:])


def half_values(bits, dtype):
    return bits.view(np.float16).astype(np.float32) if dtype == "f16" else bf16_bits_to_f32(bits)


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("T,start,H,KV,hd", [(1, 300, 8, 2, 64), (6, 10, 4, 4, 16), (3, 0, 6, 3, 128)])
def test_attention_reads_half_caches(dtype, T, start, H, KV, hd):
    # The same result as attention in float64 over the values the half cache holds.
    g = rng(5, T, start, H, KV, hd, dtype == "f16")
    L = start + T
    q = randn(g, T, H, hd)
    k = np.full((KV, L + 7, hd), 0x7E00 if dtype == "f16" else 0x7FC0, np.uint16)  # NaN past the end
    v = k.copy()
    k[:, :L] = rounded(randn(g, KV, L, hd), dtype)[0]
    v[:, :L] = rounded(randn(g, KV, L, hd), dtype)[0]
    out = nans(T, H, hd)
    cpu.attention(q, k, v, start, out, dtype)
    assert_close(out, attention_ref(q, half_values(k, dtype), half_values(v, dtype), start))


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_kv_store_rounds_as_torch(dtype):
    # Positions start..start+T-1 get the step's keys and values, rounded to nearest even as torch's
    # .to(float16 / bfloat16) rounds (ties, subnormals, overflow, inf, NaN); nothing else changes.
    torch = pytest.importorskip("torch")
    g = rng(6)
    T, KV, hd, cap, start = 5, 3, 16, 12, 4
    k, v = randn(g, T, KV, hd, scale=3.0), randn(g, T, KV, hd)
    k.reshape(-1)[:8] = [np.nan, np.inf, -np.inf, 1e-6, -3e-8, 65520.0, 1 + 2.0**-11, 1 + 3 * 2.0**-8]
    v.reshape(-1)[:3] = [3.4e38, -0.0, 1 + 2.0**-8]  # f32 max rounds to inf in bf16
    torch_dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    store = np.float32 if dtype == "f32" else np.uint16
    kc, vc = np.full((KV, cap, hd), 7, store), np.full((KV, cap, hd), 9, store)
    cpu.kv_store(k, v, kc, vc, start, dtype)
    for cache, x, fill in ((kc, k, 7), (vc, v, 9)):
        ref = torch.from_numpy(np.ascontiguousarray(x.transpose(1, 0, 2))).to(torch_dtype)
        ref = ref.numpy() if dtype == "f32" else ref.view(torch.int16).numpy().view(np.uint16)
        got = cache[:, start : start + T]
        as_f32 = got if dtype == "f32" else half_values(got, dtype)
        nan = np.isnan(as_f32)
        assert np.array_equal(nan, np.isnan(x.transpose(1, 0, 2)))
        assert np.array_equal(got[~nan].view(store), ref[~nan].view(store))
        assert (cache[:, :start] == fill).all() and (cache[:, start + T :] == fill).all()


# -------------------------------------------------------------- router_topk


def router_ref(logits, k, renorm):
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    idx = np.argsort(-p, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(p, idx, axis=1)
    if renorm:
        w /= w.sum(axis=1, keepdims=True)
    return idx, w


@pytest.mark.parametrize("T,E,k", [(1, 7, 2), (3, 64, 8), (17, 7, 1), (5, 60, 4), (2, 5, 5)])
@pytest.mark.parametrize("renorm", [False, True])
def test_router_topk(T, E, k, renorm):
    logits = randn(rng(5, T, E, k), T, E, scale=2.0)
    idx, w = cpu.router_topk(logits, k, renorm)
    ref_idx, ref_w = router_ref(logits, k, renorm)
    assert idx.dtype == np.int64 and w.dtype == np.float32
    assert np.array_equal(idx, ref_idx)
    np.testing.assert_allclose(w, ref_w, rtol=1e-5)


def test_router_topk_ties_prefer_lower_index():
    logits = np.array([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0], [0.5] * 6], np.float32)
    idx, w = cpu.router_topk(logits, 4, True)
    assert idx.tolist() == [[1, 2, 4, 5], [0, 1, 2, 3]]
    assert np.array_equal(idx, router_ref(logits, 4, True)[0])
    np.testing.assert_allclose(w[1], [0.25] * 4, rtol=1e-6)
    assert w[0, 0] == w[0, 1] == w[0, 2] > w[0, 3]


# ---------------------------------------------------------------- expert_ffn


def make_weights(g, shape, dtype, scale):
    """Random weights as the kernel gets them, plus their exact values (f64)."""
    f = randn(g, *shape, scale=scale)
    if dtype == "f32":
        return f, f.astype(np.float64)
    if dtype == "f16":
        h = f.astype(np.float16)
        return h.view(np.uint16), h.astype(np.float64)
    bits = to_bf16_bits(f)
    return bits, bf16_bits_to_f32(bits).astype(np.float64)


def ffn_ref(x, gate, up, down):
    x = x.astype(np.float64)
    g, u = x @ gate.T, x @ up.T
    return (g / (1.0 + np.exp(-g)) * u) @ down.T


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("T,D,I", [(1, 37, 53), (3, 37, 53), (17, 64, 40), (1, 256, 192), (5, 256, 192)])
def test_expert_ffn(dtype, T, D, I):
    g = rng(6, T, D, I, len(dtype))
    x = randn(g, T, D)
    gate, gate64 = make_weights(g, (I, D), dtype, 1.0 / np.sqrt(D))
    up, up64 = make_weights(g, (I, D), dtype, 1.0 / np.sqrt(D))
    down, down64 = make_weights(g, (D, I), dtype, 1.0 / np.sqrt(I))
    out = nans(T, D)
    cpu.expert_ffn(x, gate, up, down, dtype, out)
    assert_close(out, ffn_ref(x, gate64, up64, down64))


def test_expert_ffn_f16_subnormal_weights_and_readonly():
    # Every weight is an f16 subnormal (|w| < 2**-14): flushing them to zero
    # or misreading them would change the output completely. Read-only
    # weights (as from a memory map) take the same path.
    g = rng(7)
    T, D, I = 2, 40, 24
    x = randn(g, T, D)
    ws = [make_weights(g, s, "f16", 2.0**-17) for s in [(I, D), (I, D), (D, I)]]
    for w, w64 in ws:
        assert (np.abs(w64) < 2.0**-14).all() and (w64 != 0).mean() > 0.9
        w.setflags(write=False)
    out = nans(T, D)
    cpu.expert_ffn(x, *(w for w, _ in ws), "f16", out)
    assert_close(out, ffn_ref(x, *(w64 for _, w64 in ws)))


def test_expert_ffn_rejects_mismatched_weight_dtype():
    x = np.ones((1, 4), np.float32)
    w = np.ones((3, 4), np.float32)
    with pytest.raises(TypeError):
        cpu.expert_ffn(x, w, w, np.ones((4, 3), np.float32), "bf16", nans(1, 4))


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("T,D,R", [(1, 37, 53), (4, 64, 7), (17, 256, 300), (1, 1, 1)])
def test_linear(dtype, T, D, R):
    g = rng(7, T, D, R, len(dtype))
    x = randn(g, T, D)
    w, w64 = make_weights(g, (R, D), dtype, 1.0 / np.sqrt(D))
    out = nans(T, R)
    cpu.linear(x, w, dtype, out)
    assert_close(out, x.astype(np.float64) @ w64.T)


# ------------------------------------------- Gated DeltaNet (Qwen3.5 / 3.6 linear attention)


@pytest.mark.parametrize("T,C,K", [(1, 8, 4), (7, 33, 4), (5, 16, 3), (2, 5, 2)])
def test_causal_conv_carries_its_window(T, C, K):
    """out[t, c] = silu(sum_j w[c, j] window[t + j, c]) over window = [the K - 1 previous inputs; x];
    one call over 2T inputs equals two calls over T each (the window carried between them)."""
    g = rng(T, C, K)
    x, w = randn(g, 2 * T, C), randn(g, C, K, scale=0.5)
    window = np.concatenate([np.zeros((K - 1, C)), x.astype(np.float64)])
    pre = np.stack([(w.astype(np.float64) * window[t : t + K].T).sum(1) for t in range(2 * T)])
    ref = pre / (1 + np.exp(-pre))
    state, out = np.zeros((K - 1, C), np.float32), nans(2 * T, C)
    cpu.causal_conv(x, w, state, out)
    assert_close(out, ref)
    assert np.array_equal(state, window[-(K - 1) :].astype(np.float32))  # the last K - 1 of [zeros; x]
    state, halves = np.zeros((K - 1, C), np.float32), [nans(T, C), nans(T, C)]
    for part, o in zip((x[:T], x[T:]), halves):
        cpu.causal_conv(np.ascontiguousarray(part), w, state, o)
    assert np.array_equal(np.concatenate(halves), out)


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("T,Hk,Hv,dk,dv", [(1, 2, 4, 16, 8), (6, 2, 2, 16, 16), (9, 1, 3, 8, 12), (33, 4, 8, 32, 32)])
def test_gated_delta_rule(T, Hk, Hv, dk, dv, tiled):
    """Against float64 from a non-zero state, value heads sharing key heads (grouped as transformers
    orders them, or tiled as a GGUF does); the state carries over between calls exactly as within one."""
    g0 = rng(T, Hk, Hv, dk, dv)
    q = cpu.l2_norm(randn(g0, T * Hk, dk)).reshape(T, Hk, dk) * np.float32(dk**-0.5)
    k = cpu.l2_norm(randn(g0, T * Hk, dk)).reshape(T, Hk, dk)
    v = randn(g0, T, Hv, dv)
    g = -np.abs(randn(g0, T, Hv))
    beta = g0.uniform(0.1, 0.9, (T, Hv)).astype(np.float32)
    S0 = randn(g0, Hv, dk, dv, scale=0.3)
    ref, ref_S = delta_rule_ref(q, k, v, g, beta, S0, tiled)
    S, out = S0.copy(), nans(T, Hv, dv)
    cpu.gated_delta_rule(q, k, v, g, beta, S, out, tiled)
    assert_close(out, ref, 1e-5)
    assert_close(S, ref_S, 1e-5)
    if T > 1:
        S2, parts = S0.copy(), []
        for sl in (slice(0, T // 2), slice(T // 2, T)):
            o = nans(sl.stop - sl.start, Hv, dv)
            cpu.gated_delta_rule(*(np.ascontiguousarray(a[sl]) for a in (q, k, v, g, beta)), S2, o, tiled)
            parts.append(o)
        assert np.array_equal(np.concatenate(parts), out) and np.array_equal(S2, S)


def test_l2_norm_gates_and_gated_norm():
    g = rng(0)
    x = randn(g, 5, 16, scale=3.0)
    x64 = x.astype(np.float64)
    assert_close(cpu.l2_norm(x), x64 / np.sqrt((x64 * x64).sum(1, keepdims=True) + 1e-6))
    a = np.array([[-30, -2, 0, 3], [19.5, 20, 25, 80]], np.float32)
    dt_bias, A = np.array([0, 0.5, -0.25, 1], np.float32), -np.abs(randn(g, 4))
    b = randn(g, 2, 4, scale=3.0)
    beta, gate = cpu.delta_gates(b, a, A, dt_bias)
    assert beta.dtype == gate.dtype == np.float32 and np.isfinite(gate).all()
    z = a.astype(np.float64) + dt_bias
    assert_close(gate, A * np.where(z > 20, z, np.log1p(np.exp(np.minimum(z, 20)))))
    assert_close(beta, 1 / (1 + np.exp(-b.astype(np.float64))))
    z, w = randn(g, 5, 16, scale=2.0), randn(g, 16)
    ref = w * (x64 / np.sqrt((x64 * x64).mean(1, keepdims=True) + 1e-5)) * (z / (1 + np.exp(-z.astype(np.float64))))
    assert_close(cpu.gated_rms_norm(x, z, w, 1e-5), ref)
