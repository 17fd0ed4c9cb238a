"""backend/exact.py: the GPU expert kernels' arithmetic on the CPU. Checked bit for bit against a
second implementation of its definition in NumPy float32 (NumPy rounds every operation to f32 and
never fuses, so it pins the order, the absence of FMA and the exp), and against float64 within f32
tolerance (so the definition itself computes the right thing)."""

import math

import numpy as np
import pytest

from lowmoe.backend import cpu, exact

F = np.float32
X = float.fromhex


def np_exp(t):
    """exact_exp of the f32 array t, operation by operation in NumPy float32."""
    t = t.astype(F)
    with np.errstate(over="ignore", invalid="ignore"):
        n = np.floor(t * F(X("0x1.715476p+0")) + F(0.5))
        r = (t - n * F(X("0x1.62e4p-1"))) - n * F(X("0x1.7f7d1cp-20"))
        p = np.full_like(t, 1 / F(5040))
        for c in (720, 120, 24, 6, 2, 1, 1):
            p = p * r + F(1) / F(c)
        n = np.nan_to_num(n).astype(np.int64)
        scaled = np.where(n < -126, (p * np.ldexp(F(1), np.clip(n + 64, -126, 127)).astype(F)) * F(2.0**-64),
                          np.where(n > 127, (p * np.ldexp(F(1), np.clip(n - 64, -126, 127)).astype(F)) * F(2.0**64),
                                   p * np.ldexp(F(1), np.clip(n, -126, 127)).astype(F)))
    out = np.where(t > F(X("0x1.62e43p+6")), F(np.inf), np.where(t < F(X("-0x1.9fe36ap+6")), F(0), scaled))
    return np.where(np.isnan(t), t, out).astype(F)


def np_dot(w, x, VN):
    """w, x f32[n] -> the dot product in the order of exact's docstring."""
    C = 32 * VN
    a = np.zeros(C, F)
    for b in range(0, len(w), C):
        m = min(C, len(w) - b)
        a[:m] = a[:m] + w[b : b + m] * x[b : b + m]
    a = a.reshape(32, VN)
    h = VN // 2
    while h:
        a[:, :h] = a[:, :h] + a[:, h : 2 * h]
        h //= 2
    s = a[:, 0].copy()
    h = 16
    while h:
        s[:h] = s[:h] + s[h : 2 * h]
        h //= 2
    return s[0]


def np_expert(x, gate, up, down, VN):
    g = np.array([np_dot(r, x, VN) for r in gate], F)
    u = np.array([np_dot(r, x, VN) for r in up], F)
    h = (g / (F(1) + np_exp(-g))) * u
    return np.array([np_dot(r, h, VN) for r in down], F)


def _weights(rng, shape, dtype):
    w = (rng.standard_normal(shape) * 0.2).astype(F)
    if dtype == "f32":
        return w, w
    bits = w.astype(np.float16).view(np.uint16) if dtype == "f16" else (w.view(np.uint32) >> 16).astype(np.uint16)
    return bits, cpu.to_f32(bits, dtype)


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("D,I,T", [(64, 48, 1), (512, 300, 2), (100, 37, 3), (1027, 513, 1)])
def test_expert_rows_are_the_definition_bit_for_bit(dtype, D, I, T):
    # Shapes below one chunk, several chunks, not a multiple of the vector width (the GPU's element
    # path) and a partial last chunk; activations scaled so that silu sees large |g| too.
    rng = np.random.default_rng(D + I + T)
    (gate, g32), (up, u32), (down, d32) = (_weights(rng, s, dtype) for s in ((I, D), (I, D), (D, I)))
    x = (rng.standard_normal((T, D)) * 3).astype(F)
    out = np.full((T, D), np.nan, F)
    exact.expert_rows(x, gate, up, down, dtype, out)
    VN = 4 if dtype == "f32" else 8
    for t in range(T):
        want = np_expert(x[t], g32, u32, d32, VN)
        assert np.array_equal(out[t].view(np.uint32), want.view(np.uint32)), f"token {t}"
        # and it is the expert: float64 within f32 rounding of sums of D and I terms
        g, u = g32.astype(float) @ x[t], u32.astype(float) @ x[t]
        ref = d32.astype(float) @ (g / (1 + np.exp(-g)) * u)
        scale = np.abs(d32).astype(float) @ np.abs(g / (1 + np.exp(-g)) * u) + 1e-30
        assert np.all(np.abs(out[t] - ref) <= 1e-5 * scale + 1e-6)


def test_exact_exp_is_the_definition_and_accurate():
    rng = np.random.default_rng(0)
    t = np.concatenate([rng.uniform(-110, 90, 20000), rng.uniform(-1, 1, 5000), rng.uniform(-104.5, -86, 5000),
                        [0.0, -0.0, 1e-30, -1e-30, 88.7, 88.73, 89, -103.9, -104, -150, 1e30, -1e30, np.inf, -np.inf,
                         np.nan]]).astype(F)
    got = np.array([exact.exact_exp(v) for v in t], F)
    assert np.array_equal(got.view(np.uint32), np_exp(t).view(np.uint32))
    with np.errstate(over="ignore"):
        ref = np.exp(t.astype(np.float64))
    normal = (ref > np.finfo(F).tiny) & (ref < np.finfo(F).max)
    assert np.all(np.abs(got[normal] - ref[normal]) <= 4 * np.spacing(ref[normal].astype(F)))
    sub = (ref > 0) & (ref <= np.finfo(F).tiny)
    assert np.all(np.abs(got[sub] - ref[sub]) <= 2 * np.spacing(F(0)))
    assert got[t == np.inf][0] == np.inf and got[t == -np.inf][0] == 0 and np.isnan(got[-1])
    assert all(math.isinf(exact.exact_exp(F(v))) for v in (89, 1e30))


def test_combine_sums_in_rank_order():
    rng = np.random.default_rng(1)
    y = (rng.standard_normal((3, 4, 16)) * 10.0 ** rng.integers(-3, 4, (3, 4, 1))).astype(F)
    w = rng.random((3, 4)).astype(F)
    want = np.zeros((3, 16), F)
    for j in range(4):
        want = (want + (w[:, j, None] * y[:, j]).astype(F)).astype(F)
    assert np.array_equal(exact.combine(y, w), want)
    assert not np.array_equal(exact.combine(y[:, ::-1], w[:, ::-1]), want)  # the order matters at these scales
