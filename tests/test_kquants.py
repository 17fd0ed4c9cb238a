"""lowmoe.quantize.kquants against independent references: its bytes are decoded with gguf-py's
gguf.quants.dequantize (the reference decoder of the GGUF block layouts), and its error is compared
with a naive min / max quantizer written here in float64 NumPy."""

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from lowmoe.quantize.kquants import quantize

K = {"q4_k": (T.Q4_K, 144, 15), "q5_k": (T.Q5_K, 176, 31), "q6_k": (T.Q6_K, 210, 32)}
# Relative RMSE ||x - x^|| / ||x|| bounds: (Gaussian rows, rows with outliers). Measured on seeds 0-2
# (no weights / with weights): q4_k 0.0705-0.0712 / 0.0735-0.0744 and 0.101-0.109 / 0.104-0.113;
# q5_k 0.0349-0.0352 / 0.0364-0.0365 and 0.050-0.052 / 0.051-0.056; q6_k 0.0175-0.0177 /
# 0.0183-0.0184 and 0.031-0.034 / 0.032-0.042.
BOUNDS = {"q4_k": (0.078, 0.125), "q5_k": (0.039, 0.062), "q6_k": (0.020, 0.048)}


def _data(seed=0, cols=512):
    # rows: 64 Gaussian, 4 with 2% outliers (x 20), one all zero, one constant
    rng = np.random.default_rng(seed)
    gauss = rng.standard_normal((64, cols)).astype(np.float32)
    outl = rng.standard_normal((4, cols)).astype(np.float32)
    outl[rng.random(outl.shape) < 0.02] *= 20
    return np.concatenate([gauss, outl, np.zeros((1, cols), np.float32), np.full((1, cols), 0.37, np.float32)])


def _importance(cols=512, seed=1):
    # an imatrix-like vector: mean squared activations, spread over two orders of magnitude
    return (np.random.default_rng(seed).random(cols) * 2).astype(np.float32) ** 2 + np.float32(0.01)


def _rel(x, y):
    return np.linalg.norm(x - y) / np.linalg.norm(x)


def _error_weights(x, fmt, imp):
    # the per-element weights of the quantizer's objective (see the kquants docstring), float64
    xs = x.astype(np.float64).reshape(x.shape[0], -1, 256)
    q = None if imp is None else imp.astype(np.float64).reshape(1, -1, 256)
    if fmt == "q6_k":
        w = xs * xs if q is None else np.broadcast_to(q, xs.shape)
    else:
        s2 = 2 * np.mean(xs * xs, axis=-1, keepdims=True)
        w = np.sqrt(s2) + np.abs(xs) if q is None else q * np.sqrt(s2 + xs * xs)
    return w.reshape(x.shape)


def _f16(v):
    return np.asarray(v).astype(np.float16).astype(np.float64)


def _div0(a, b):
    # a / b, 0 where b is 0
    b = np.broadcast_to(b, a.shape)
    return np.divide(a, b, out=np.zeros_like(a), where=b > 0)


def _naive(x, fmt):
    # Plain min / max quantization in float64 -> the decoded f64[R, C]. q4_k / q5_k: per 32 elements
    # s = (max - min) / nmax from min = min(x, 0); the 8 scales and mins as 6-bit codes of
    # d = max(s) / 63, dmin = max(m) / 63 (f16); levels rounded against the coded values.
    # q6_k: per 16 elements s = max|x| / 31, signed levels -32..31, int8 codes of d = max|s| / 127.
    _, _, nmax = K[fmt]
    n = 16 if fmt == "q6_k" else 32
    xs = x.astype(np.float64).reshape(x.shape[0], -1, 256 // n, n)
    if fmt == "q6_k":
        s = np.abs(xs).max(-1) / 31
        d = _f16(s.max(-1, keepdims=True) / 127)
        ds = d * np.round(_div0(s, d))
        q = np.clip(np.round(_div0(xs, ds[..., None])), -32, 31)
        return (ds[..., None] * q).reshape(x.shape)
    lo = np.minimum(xs.min(-1), 0)
    s, m = (xs.max(-1) - lo) / nmax, -lo
    d = _f16(s.max(-1, keepdims=True) / 63)
    dm = _f16(m.max(-1, keepdims=True) / 63)
    ds = d * np.round(_div0(s, d))
    ms = dm * np.round(_div0(m, dm))
    q = np.clip(np.round(_div0(xs + ms[..., None], ds[..., None])), 0, nmax)
    return (ds[..., None] * q - ms[..., None]).reshape(x.shape)


@pytest.mark.parametrize("with_imp", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("fmt", list(K))
def test_k_format_decodes_and_is_accurate(fmt, with_imp):
    x = _data()
    imp = _importance() if with_imp else None
    q = quantize(x, fmt, imp)
    qtype, nbytes, _ = K[fmt]
    assert q.dtype == np.uint8 and q.shape == (x.shape[0], x.shape[1] // 256 * nbytes)
    y = gguf.quants.dequantize(q, qtype)
    assert y.shape == x.shape and np.isfinite(y).all()
    gauss_bound, outl_bound = BOUNDS[fmt]
    assert _rel(x[:64], y[:64]) < gauss_bound
    assert _rel(x[64:68], y[64:68]) < outl_bound
    assert np.array_equal(y[68], np.zeros(x.shape[1]))  # the zero row, exactly
    assert _rel(x[69], y[69]) < 2e-3  # the constant row: only the f16 rounding of d remains
    # no worse than the naive quantizer, in the quantizer's own weighted error
    w = _error_weights(x, fmt, imp)
    ours = np.sum(w * (x - y) ** 2)
    naive = np.sum(w * (x - _naive(x, fmt)) ** 2)
    assert ours <= naive, (ours, naive)


@pytest.mark.parametrize("fmt", list(K))
def test_importance_lowers_the_error_where_it_is_large(fmt):
    x = _data(seed=3)[:68]
    rng = np.random.default_rng(4)
    heavy = rng.random(x.shape[1]) < 0.5
    imp = np.where(heavy, 100.0, 0.01).astype(np.float32)
    qtype = K[fmt][0]
    err = {}
    for name, weights in (("plain", None), ("imatrix", imp)):
        y = gguf.quants.dequantize(quantize(x, fmt, weights), qtype)
        err[name] = np.sum((x - y)[:, heavy] ** 2)
    assert err["imatrix"] < 0.9 * err["plain"], err


@pytest.mark.parametrize("fmt", list(K))
def test_zero_importance_stays_finite(fmt):
    # a whole super-block with importance 0 has no preferred fit; it must still quantize sanely
    x = _data(seed=5)[:68]
    imp = _importance()
    imp[:256] = 0
    y = gguf.quants.dequantize(quantize(x, fmt, imp), K[fmt][0])
    assert np.isfinite(y).all()
    assert _rel(x[:64, :256], y[:64, :256]) < 2 * BOUNDS[fmt][0]


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "bf16", "f16"])
def test_other_formats_are_gguf_reference_bytes(fmt):
    x = _data()[:, :256]
    q = quantize(x, fmt, _importance(256))  # weights are ignored for these
    ref = np.ascontiguousarray(gguf.quants.quantize(x, T[fmt.upper()])).view(np.uint8).reshape(x.shape[0], -1)
    assert q.dtype == np.uint8 and q.shape == ref.shape
    assert np.array_equal(q, ref)


@pytest.mark.parametrize("fmt", list(K))
def test_cols_not_a_multiple_of_256_is_refused(fmt):
    with pytest.raises(ValueError, match=f"{fmt}.*384"):
        quantize(np.ones((2, 384), np.float32), fmt)
