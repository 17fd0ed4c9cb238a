"""Routed experts with one fixed arithmetic, bit for bit the same as the GPU's expert kernels
(native/common.cuh row_dot, exact_exp, silu; native/expert_gemm.cu moe_combine_f32).

Why: on the GPU a missed expert may be computed here, on the CPU, from host memory while its copy
is in flight (--miss-policy), and CPU-MoE may stand in for the GPU cache by a timing-based
decision. Output must not depend on either (invariant 1), so both devices compute an expert the
same way: every product and sum rounded to f32 on its own (no FMA, no reassociation), in one
order, and an exp made of such operations only (libm's expf and CUDA's expf differ in the last bit).

The order of a dot product of a weight row w[n] with x f32[n], VN = 16 bytes / weight size (4 for
f32, 8 for f16 / bf16), C = 32 * VN:
- partials a[c] = sum over e = c, c + C, c + 2C, ... < n of w[e] * x[e], in increasing e, from +0
  (on the GPU: lane c // VN of a warp, its accumulator c % VN, one 16-byte load per step);
- each lane's VN partials halved: a[i] += a[i + h] for h = VN/2, ..., 1 (i < h);
- the 32 lane sums halved: s[l] += s[l + h] for h = 16, ..., 1 (the warp's xor shuffle, lane 0).
silu(g) = g / (1 + exact_exp(-g)); an expert's row y = down @ (silu(gate @ x) * (up @ x)); the
weighted sum out = ((0 + w0 * y0) + w1 * y1) + ... in rank order (the router's order).

A GGUF block format's row is summed as the f32 row of its dequantized weights (quant._decode, bit
for bit gguf's values), with VN = 4, as native/blocks.cuh does.

The kernels are plain loops (no fastmath): LLVM may vectorise across the C independent partials,
which keeps each one's order.
"""

import math

import numba
import numpy as np
from numba import prange

from . import quant
from .cpu import _kernel_view, _to_f32

_JIT = dict(nogil=True, cache=True)
_F = np.float32
_X = float.fromhex  # the constants are written as native/common.cuh writes them, bit for bit
_LOG2E = _F(_X("0x1.715476p+0"))
_LN2_HI = _F(_X("0x1.62e4p-1"))  # ln 2 = _LN2_HI + _LN2_LO; n * _LN2_HI is exact for |n| < 2^9
_LN2_LO = _F(_X("0x1.7f7d1cp-20"))
# 1 / i!: exp(r) on |r| <= ln(2) / 2 by Taylor terms up to r^7 (truncation < 2e-9 relative).
_C = tuple(_F(_X(h)) for h in ("0x1p+0", "0x1p+0", "0x1p-1", "0x1.555556p-3", "0x1.555556p-5", "0x1.111112p-7",
                                "0x1.6c16c2p-10", "0x1.a01a02p-13"))
_HI = _F(_X("0x1.62e43p+6"))  # above: exp overflows f32
_LO = _F(_X("-0x1.9fe36ap+6"))  # below: exp underflows to 0
_HALF, _ONE, _ZERO = _F(0.5), _F(1.0), _F(0.0)
_TWO64, _TWOM64 = _F(2.0**64), _F(2.0**-64)
_ROWS = 16  # weight rows per parallel task (one scratch array each)


@numba.njit(**_JIT)
def _pow2(n):
    # 2^n as f32 for -126 <= n <= 127 (exact)
    return _F(math.ldexp(1.0, n))


@numba.njit(**_JIT)
def exact_exp(t):
    """exp(t) for f32 t, from IEEE f32 products and sums only (see the module docstring)."""
    if t != t:
        return t
    if t > _HI:
        return _F(np.inf)
    if t < _LO:
        return _ZERO
    n = math.floor(t * _LOG2E + _HALF)
    fn = _F(n)
    r = (t - fn * _LN2_HI) - fn * _LN2_LO
    p = _C[7]
    p = p * r + _C[6]
    p = p * r + _C[5]
    p = p * r + _C[4]
    p = p * r + _C[3]
    p = p * r + _C[2]
    p = p * r + _C[1]
    p = p * r + _C[0]
    if n < -126:  # a subnormal result: scale in two steps, the second rounds once
        return (p * _pow2(n + 64)) * _TWOM64
    if n > 127:
        return (p * _pow2(n - 64)) * _TWO64
    return p * _pow2(n)


@numba.njit(**_JIT)
def _accumulate(w, x, a):
    # a f32[C] += the products of w [n] and x f32[n], chunk by chunk (the partials of _dot).
    C = a.shape[0]
    n = w.shape[0]
    for b in range(0, n, C):
        wb = w[b : b + C]
        xb = x[b : b + C]
        for c in range(wb.shape[0]):  # vectorised: the C partials are independent
            a[c] = a[c] + _to_f32(wb[c]) * xb[c]


@numba.njit(**_JIT)
def _reduce(a, VN):
    # a f32[32 * VN] partials -> the dot product: each lane's VN halved (spelled out: a loop over
    # the halvings costs as much as the products), the lane sums written to a[lane] (lane l reads
    # a[l VN:], which no earlier lane has overwritten), then the 32 lane sums halved.
    if VN == 8:
        for lane in range(32):
            b = 8 * lane
            a[lane] = ((a[b] + a[b + 4]) + (a[b + 2] + a[b + 6])) + ((a[b + 1] + a[b + 5]) + (a[b + 3] + a[b + 7]))
    else:
        for lane in range(32):
            b = 4 * lane
            a[lane] = (a[b] + a[b + 2]) + (a[b + 1] + a[b + 3])
    h = 16
    while h >= 1:
        for lane in range(h):
            a[lane] = a[lane] + a[lane + h]
        h //= 2
    return a[0]


@numba.njit(**_JIT)
def _dot(w, x, VN, a):
    # w [n], x f32[n], a f32[32 * VN] scratch -> w . x in the order of the module docstring.
    a[:] = _ZERO
    _accumulate(w, x, a)
    return _reduce(a, VN)


@numba.njit(parallel=True, **_JIT)
def _gate_up(x, gate, up, VN, h):
    # x f32[T, D]; gate, up [I, D]; h f32[T, I] = silu(gate @ x) * (up @ x).
    T = x.shape[0]
    I = gate.shape[0]
    for task in prange((I + _ROWS - 1) // _ROWS):
        a = np.empty(32 * VN, np.float32)
        for i in range(task * _ROWS, min(I, (task + 1) * _ROWS)):
            for t in range(T):
                g = _dot(gate[i], x[t], VN, a)
                u = _dot(up[i], x[t], VN, a)
                h[t, i] = (g / (_ONE + exact_exp(-g))) * u


@numba.njit(parallel=True, **_JIT)
def _down(h, down, VN, y):
    # h f32[T, I]; down [D, I]; y f32[T, D] = h @ down.T.
    T = h.shape[0]
    D = down.shape[0]
    for task in prange((D + _ROWS - 1) // _ROWS):
        a = np.empty(32 * VN, np.float32)
        for d in range(task * _ROWS, min(D, (task + 1) * _ROWS)):
            for t in range(T):
                y[t, d] = _dot(down[d], h[t], VN, a)


@numba.njit(parallel=True, **_JIT)
def _gate_up_q(x, gate, up, gcode, ucode, n, h):
    # _gate_up for block formats: gate, up uint8[I, row bytes] of the formats quant._CODE gcode, ucode;
    # each row decoded once into f32 (exact), then dotted with every token.
    T, D = x.shape
    I = gate.shape[0]
    for task in prange((I + _ROWS - 1) // _ROWS):
        a = np.empty(128, np.float32)
        yg = np.empty(D, np.float32)
        yu = np.empty(D, np.float32)
        for i in range(task * _ROWS, min(I, (task + 1) * _ROWS)):
            quant._decode(gate[i], gcode, n, yg)
            quant._decode(up[i], ucode, n, yu)
            for t in range(T):
                g = _dot(yg, x[t], 4, a)
                u = _dot(yu, x[t], 4, a)
                h[t, i] = (g / (_ONE + exact_exp(-g))) * u


@numba.njit(parallel=True, **_JIT)
def _down_q(h, down, code, n, y):
    # _down for a block format: down uint8[D, row bytes].
    T, I = h.shape
    D = down.shape[0]
    for task in prange((D + _ROWS - 1) // _ROWS):
        a = np.empty(128, np.float32)
        yd = np.empty(I, np.float32)
        for d in range(task * _ROWS, min(D, (task + 1) * _ROWS)):
            quant._decode(down[d], code, n, yd)
            for t in range(T):
                y[t, d] = _dot(yd, h[t], 4, a)


def expert_rows(x, gate, up, down, dtype, out):
    """out[t] = down @ (silu(gate @ x[t]) * (up @ x[t])) in the GPU kernels' arithmetic.
    x f32[T, D]; gate, up [I, D]; down [D, I], float32 ("f32") or uint16 views of f16 / bf16 data,
    or the bytes of GGUF block formats (quant.FORMATS); dtype one format, or (gate's, up's, down's)
    with gate's and up's both block formats or the same float one (as the GPU's kernels take them);
    out f32[T, D] is overwritten."""
    g, u, d = dtype if isinstance(dtype, tuple) else (dtype,) * 3
    D, I = x.shape[1], gate.shape[0]
    h = np.empty((x.shape[0], I), np.float32)
    if g in quant.FORMATS and u in quant.FORMATS:
        _gate_up_q(x, gate, up, quant._code(gate, g, I, D), quant._code(up, u, I, D), quant._N, h)
    elif g == u:
        _gate_up(x, _kernel_view(gate, g), _kernel_view(up, u), 4 if g == "f32" else 8, h)
    else:
        raise ValueError(f"expert gate and up in {g} and {u}: the GPU's kernels take two block formats or one float one")
    if d in quant.FORMATS:
        _down_q(h, down, quant._code(down, d, D, I), quant._N, out)
    else:
        _down(h, _kernel_view(down, d), 4 if d == "f32" else 8, out)


def combine(y, w):
    """y f32[T, k, D] (y[t, j]: the output of token t's j-th chosen expert), w f32[T, k] ->
    out f32[T, D] = ((0 + w[t, 0] y[t, 0]) + w[t, 1] y[t, 1]) + ... (NumPy rounds each step to f32)."""
    out = np.zeros((y.shape[0], y.shape[2]), np.float32)
    for j in range(y.shape[1]):
        out = out + w[:, j, None] * y[:, j]
    return out
