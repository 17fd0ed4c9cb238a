"""GGUF block formats on the CPU (backend/quant.py, through backend/cpu.py's API) against gguf-py:
dequantization bit for bit equal to gguf.quants.dequantize; the fused kernels equal to NumPy float64
products of gguf's dequantized weights within the rounding error of f32 sums.

The tolerance of an f32 dot product of n terms (products rounded or fused, summed in any order):
gamma(n) * sum |w x|, gamma(n) = exp(lam sqrt(n) u + n u^2 / (1 - u)) - 1 ~ lam sqrt(n) u, with
u = 2^-24 and lam = 8: Higham and Mary's probabilistic bound ("A new approach to probabilistic
rounding error analysis", SIAM J. Sci. Comput. 41(5), 2019), which fails with a probability of at
most 2 n exp(-lam^2 / 2) < 1e-10 per dot product when rounding errors are independent and of mean
zero (the seeds are fixed: no test is flaky). The worst-case bound n u is sqrt(n) / lam = 5.7x
looser at n = 2048; this one catches a single weight off by half its value in 70-90% of rows.
"""

import os
import sys

import numpy as np
import pytest

from lowmoe.backend import cpu, quant

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
from kernel_inputs import random_blocks  # noqa: E402  (tools/: gpu_check makes the same blocks on a GPU)

gq = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType  # noqa: E402

FORMATS = list(quant.FORMATS)
SMALL = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]  # 32-element blocks; gguf can quantize these
U = 2.0**-24
LAM = 8.0
def gguf_f32(raw, fmt):
    return gq.dequantize(raw, GGMLQuantizationType[fmt.upper()])


def gamma(n):
    return np.expm1(LAM * np.sqrt(n) * U + n * U**2 / (1 - U))


def dot_bound(x, w):
    """x [T, n], w [R, n] float64 -> the bound of |f32 x @ w.T - x @ w.T| [T, R]."""
    return gamma(x.shape[1]) * (np.abs(x) @ np.abs(w).T)


def same_bits(a, b):
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


# (a) dequantization


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_random_blocks_is_ggufs_bit_for_bit(fmt):
    raw = random_blocks(fmt, 9, 512, np.random.default_rng(0))
    assert same_bits(quant.dequantize(raw, fmt, (9, 512)), gguf_f32(raw, fmt))
    assert same_bits(cpu.to_f32(raw, fmt), gguf_f32(raw, fmt))


@pytest.mark.parametrize("fmt", SMALL)
def test_dequantize_ggufs_quantized_data_is_ggufs_bit_for_bit(fmt):
    g = np.random.default_rng(1)
    data = g.standard_normal((12, 352)).astype(np.float32) * np.logspace(-6, 3, 12, dtype=np.float32)[:, None]
    data[3] = 0.0  # a zero scale
    data[5, ::7] = 0.0
    raw = gq.quantize(data, GGMLQuantizationType[fmt.upper()])
    got = quant.dequantize(raw, fmt, data.shape)
    assert same_bits(got, gguf_f32(raw, fmt))
    assert np.abs(got - data).max() < 0.2 * np.abs(data).max()  # and it is the data, roughly


@pytest.mark.parametrize("fmt", FORMATS)
def test_kernels_decode_as_gguf_bit_for_bit(fmt):
    # x = the identity: every product is w * 1 and the rest of each sum zeros, so the GEMM
    # (T = C) returns the kernels' own dequantized weights, which must be gguf's exactly.
    C = 512
    raw = random_blocks(fmt, 7, C, np.random.default_rng(2))
    out = np.full((C, 7), np.nan, np.float32)
    cpu.linear(np.eye(C, dtype=np.float32), raw, fmt, out)
    assert np.array_equal(out.T, gguf_f32(raw, fmt))  # == (-0.0 == 0.0: a zero sum is +0)


def test_embed_dequantizes_the_rows_of_a_quantized_table():
    table = random_blocks("q6_k", 50, 512, np.random.default_rng(3), scale=1e-3)
    tokens = np.array([7, 0, 49, 7])
    out = np.empty((4, 512), np.float32)
    cpu.embed(tokens, table, "q6_k", out)
    assert same_bits(out, gguf_f32(table, "q6_k")[tokens])


# (b) the kernels


def check_linear(fmt, R, C, seed):
    g = np.random.default_rng(seed)
    raw = random_blocks(fmt, R, C, g, scale=1e-3)
    w = gguf_f32(raw, fmt).astype(np.float64)
    for T in (1, 5):
        x = g.standard_normal((T, C), dtype=np.float32)
        out = np.full((T, R), np.nan, np.float32)
        cpu.linear(x, raw, fmt, out)
        ref = x.astype(np.float64) @ w.T
        assert np.all(np.abs(out - ref) <= dot_bound(x.astype(np.float64), w)), (fmt, R, C, T)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("R, C", [(768, 2048), (2048, 512), (37, 768)])
def test_linear_against_float64(fmt, R, C):
    check_linear(fmt, R, C, seed=R + C)


@pytest.mark.parametrize("fmt", SMALL)
def test_linear_rows_of_32_element_multiples(fmt):
    check_linear(fmt, 29, 352, seed=4)
    check_linear(fmt, 2048, 96, seed=5)


def test_linear_vocab_sized_q6_k_head_with_bias():
    # llama.cpp's Q4_K_M keeps output.weight in q6_k. The reference is float64 on 4096 of the
    # 151936 rows (the first and last among them); a row the kernel skipped would stay NaN.
    V, D = 151936, 2048
    g = np.random.default_rng(6)
    raw = random_blocks("q6_k", V, D, g, scale=1e-3)
    rows = np.unique(np.concatenate([[0, 1, V - 1], g.choice(V, 4093, replace=False)]))
    w = gguf_f32(raw[rows], "q6_k").astype(np.float64)
    bias = g.standard_normal(V, dtype=np.float32)
    for T in (1, 3):
        x = g.standard_normal((T, D), dtype=np.float32)
        out = np.full((T, V), np.nan, np.float32)
        cpu.linear(x, raw, "q6_k", out, bias=bias)
        assert np.isfinite(out).all()
        prod = x.astype(np.float64) @ w.T
        # out = f32(f32 product + bias): the bias adds one rounding, <= u |product + bias|
        err = np.abs(out[:, rows] - (prod + bias[rows]))
        assert np.all(err <= dot_bound(x.astype(np.float64), w) * (1 + U) + U * np.abs(prod + bias[rows]) * 1.01)


def ffn_reference(x, gate, up, down):
    """float64 SwiGLU expert and the tolerance of its f32 evaluation: each dot product's bound
    (dot_bound) carried through silu (|silu'| <= 1.1) and the product with up, plus 10 u for
    rounding silu (exp, add, divide) and that product; those errors dh of h pass through the down
    projection as independent errors do, lam sqrt(sum (down dh)^2), next to its own rounding."""
    x = x.astype(np.float64)
    g, u = x @ gate.T, x @ up.T
    eg, eu = dot_bound(x, gate), dot_bound(x, up)
    s = g / (1 + np.exp(-g))
    h = s * u
    dh = 1.1 * eg * (np.abs(u) + eu) + np.abs(s) * eu + 10 * U * (np.abs(s) + 1.1 * eg) * (np.abs(u) + eu)
    return h @ down.T, dot_bound(np.abs(h) + dh, down) + LAM * np.sqrt(dh**2 @ (down**2).T)


@pytest.mark.parametrize(
    "fmts, D, I",
    [((f,) * 3, 2048, 768) for f in FORMATS]
    + [
        (("q4_k", "q4_k", "q6_k"), 2048, 768),  # llama.cpp's Q4_K_M
        (("q4_k", "q4_k", "q6_k"), 2048, 512),
        (("q4_k", "q4_k", "q8_0"), 2048, 352),  # I not a multiple of 256: down in a 32-element type
        (("q5_0", "q4_1", "q8_0"), 2048, 96),
        (("q8_0", "q5_1", "q4_0"), 256, 96),
    ],
)
def test_expert_ffn_against_float64(fmts, D, I):
    g = np.random.default_rng(D + I)
    raws = [random_blocks(f, r, c, g, scale=1e-3) for f, (r, c) in zip(fmts, [(I, D), (I, D), (D, I)])]
    ws = [gguf_f32(r, f).astype(np.float64) for r, f in zip(raws, fmts)]
    dtype = fmts[0] if len(set(fmts)) == 1 else fmts  # one name, or a tuple
    for T in (1, 5):
        x = g.standard_normal((T, D), dtype=np.float32)
        out = np.full((T, D), np.nan, np.float32)
        cpu.expert_ffn(x, *raws, dtype, out)
        ref, tol = ffn_reference(x, *ws)
        assert np.all(np.abs(out - ref) <= tol), (fmts, T)


# (c) errors


def test_unknown_format_wrong_bytes_and_shapes_are_one_line_errors():
    g = np.random.default_rng(7)
    raw = random_blocks("q4_k", 4, 512, g)
    x = np.ones((1, 512), np.float32)
    out = np.empty((1, 4), np.float32)
    with pytest.raises(ValueError, match="unknown weight format 'q3_x'"):
        cpu.linear(x, raw, "q3_x", out)
    with pytest.raises(ValueError, match=r"q4_k weights \[4, 512\] must be uint8 \[4, 288\] bytes, got uint8 \[4, 287\]"):
        cpu.linear(x, raw[:, :-1], "q4_k", out)
    with pytest.raises(ValueError, match="must be uint8"):
        cpu.linear(x, raw.view(np.int8), "q4_k", out)
    with pytest.raises(ValueError, match=r"must be uint8 \[5, 288\]"):
        cpu.linear(x, raw, "q4_k", np.empty((1, 5), np.float32))
    with pytest.raises(ValueError, match="multiple of 256 elements"):
        cpu.linear(np.ones((1, 544), np.float32), raw, "q4_k", out)
    with pytest.raises(ValueError, match="q4_k rows hold a multiple of 256 elements, at most 32768: not 4"):
        cpu.expert_ffn(x, raw, raw, np.zeros((512, 144), np.uint8), "q4_k", np.empty((1, 512), np.float32))
    with pytest.raises(ValueError, match="unknown weight format 'q9_k'"):
        cpu.expert_ffn(x, raw, raw, raw, ("q4_k", "q4_k", "q9_k"), np.empty((1, 512), np.float32))
    with pytest.raises(ValueError, match="must be uint8"):
        cpu.to_f32(raw[:, :-1], "q4_k")
    with pytest.raises(ValueError, match="must be uint8"):
        quant.dequantize(raw, "q4_k", (4, 256))
