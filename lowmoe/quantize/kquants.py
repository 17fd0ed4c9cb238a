"""Quantize float32 matrices to GGUF block formats, optionally guided by an importance matrix.

quantize(x, fmt, weights) turns x f32[R, C] into uint8[R, C / 256 * B], each row a run of blocks
laid out as ggml-common.h's block_q4_K / block_q5_K / block_q6_K (256 elements in B = 144 / 176 /
210 bytes), which gguf.quants.dequantize and lowmoe.backend.quant decode. q8_0, q4_0, q4_1, q5_0,
q5_1, bf16 and f16 are left to gguf.quants.quantize (llama.cpp's reference quantizers, which take no
importance weights) and returned as their bytes.

The K formats minimise a weighted squared error sum w_i (x_i - y_i)^2 per 256-element super-block:
- Weights. q4_k / q5_k: w_i = sqrt(s2) + |x_i|, s2 = 2 mean(x^2) over the super-block; with an
  importance vector q (the mean squared activation of each input column) w_i = q_i sqrt(s2 + x_i^2).
  q6_k: w_i = x_i^2, or q_i.
- Sub-block fit. q4_k / q5_k, 8 sub-blocks of 32, y = s l - m with levels l = 0..nmax (15 / 31) and
  s, m >= 0: 37 candidate grids (nmax - 0.9 ... nmax + 0.9 in steps of 0.05) / (max - min(x, 0))
  round x to levels, and for each the (s, m) of least error for those levels is solved in closed
  form (2 x 2 weighted least squares); the best, or the plain min / max grid if better, is then
  improved by re-rounding x to its levels and refitting (twice). q6_k, 16 sub-blocks of 16, y = s l
  with l = -32..31: 19 candidates map the element of largest |x| to level -32 +- 0.9, each with a
  least-squares s, then the same re-rounding.
- Scale codes. The 8 scales and 8 mins become 6-bit codes times an f16 d (dmin), the 16 q6_k scales
  int8 codes times an f16 d. d is searched (17 candidates around max / 63, or max / -128, each with
  a least-squares d, then alternating nearest codes and least-squares d while that helps), each code
  weighted by the error it causes per unit of change (sum w l^2 for a scale, sum w for a min). Each
  sub-block then takes its value / d rounded down or up (q4_k / q5_k: for the scale and the min,
  4 pairs), whichever gives the least error once its levels are rounded again against the coded
  values, which are the final levels.

Compared with llama.cpp (ggml-quants.c): the objective and candidate grids are those of its
importance-matrix path (quantize_row_q4_K_impl / q5_K / q6_K with make_qkx3_quants, make_qx_quants,
make_qp_quants), here also used without an importance vector, where llama.cpp's reference path
searches fewer grids (make_qkx2_quants) with per sub-block weights and codes d = max / 63. The
re-rounding rounds, the scale-code weights and the choice of each code by its true error are
additions: on Gaussian test matrices (with or without outliers, with or without importance) the
weighted error comes out 1-15% below that of ggml-quants.c's quantize_q4_K / q5_K / q6_K.
"""

import gguf
import numba
import numpy as np
from gguf import GGMLQuantizationType as _T
from numba import prange

from ..backend.cpu import _from_f32, _to_f32

# K formats: name -> bytes per 256-element block; q4_k / q5_k levels run 0..nmax
_K = {"q4_k": 144, "q5_k": 176, "q6_k": 210}
_NMAX = {"q4_k": 15, "q5_k": 31}
# formats left to gguf-py's reference quantizers
_GGUF = {"q8_0": _T.Q8_0, "q4_0": _T.Q4_0, "q4_1": _T.Q4_1, "q5_0": _T.Q5_0, "q5_1": _T.Q5_1,
         "bf16": _T.BF16, "f16": _T.F16}
FORMATS = tuple(_K) + tuple(_GGUF)

_F = np.float32
_QK = 256
# reassoc lets LLVM vectorize the float sums over a sub-block (8 lanes of f32); nothing here relies on
# their order.
_JIT = dict(cache=True, nogil=True, fastmath={"reassoc", "contract"})
_H0 = np.uint16(0)  # type witness for _from_f32: round to f16 bits


def quantize(x, fmt, weights=None):
    """x f32[R, C] -> uint8[R, C / E * B] in GGUF format fmt (FORMATS). weights: None or f32[C], the
    importance of each input column (llama.cpp's imatrix: mean squared activation); used by the K
    formats, ignored by the others. K formats need C a multiple of 256."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"quantize takes a 2-D matrix, got shape {x.shape}")
    rows, cols = x.shape
    if fmt in _GGUF:
        q = gguf.quants.quantize(x, _GGUF[fmt])
        return np.ascontiguousarray(q).view(np.uint8).reshape(rows, -1)
    if fmt not in _K:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if cols % _QK:
        raise ValueError(f"{fmt} needs cols a multiple of {_QK}, got cols = {cols}")
    if weights is None:
        qw = np.zeros(0, np.float32)  # size 0: no importance vector
    else:
        qw = np.ascontiguousarray(weights, dtype=np.float32)
        if qw.shape != (cols,):
            raise ValueError(f"weights must have shape ({cols},), got {qw.shape}")
    out = np.empty((rows, cols // _QK * _K[fmt]), np.uint8)
    if fmt == "q6_k":
        _rows_q6_k(x, qw, out)
    else:
        _rows_q45_k(x, qw, _F(_NMAX[fmt]), _K[fmt], out)
    return out


@numba.njit(**_JIT)
def _moments(x, w):
    # sub-block x, w f32[n] -> (sum w, sum w x, sum w x^2)
    sw = _F(0)
    sx = _F(0)
    sxx = _F(0)
    for i in range(x.size):
        sw += w[i]
        sx += w[i] * x[i]
        sxx += w[i] * x[i] * x[i]
    return sw, sx, sxx


@numba.njit(**_JIT)
def _level_sums(x, w, iscale, lo, nmax):
    # levels l_i = clamp(rint(iscale (x_i - lo)), 0, nmax) of sub-block x, w f32[n] ->
    # (sum w l, sum w l^2, sum w x l). The hot loop (some 40 calls per sub-block): LLVM vectorizes it.
    sl = _F(0)
    sl2 = _F(0)
    sxl = _F(0)
    for i in range(x.size):
        l = min(max(np.rint(iscale * (x[i] - lo)), _F(0)), nmax)
        sl += w[i] * l
        sl2 += w[i] * l * l
        sxl += w[i] * x[i] * l
    return sl, sl2, sxl


@numba.njit(**_JIT)
def _err(sw, sx, sxx, sl, sl2, sxl, a, b):
    # sum w (a l + b - x)^2 from the sums
    return sxx - _F(2) * (a * sxl + b * sx - a * b * sl) + a * a * sl2 + b * b * sw


@numba.njit(**_JIT)
def _refit(sw, sx, sxx, sl, sl2, sxl):
    # weighted least squares x ~ a l + b over fixed levels, with b <= 0 -> (error, a, b); error inf
    # when all the weight sits on one level (no unique fit)
    det = sw * sl2 - sl * sl
    if not det > 0:
        return _F(np.inf), _F(0), _F(0)
    a = (sw * sxl - sx * sl) / det
    b = (sl2 * sx - sl * sxl) / det
    if b > 0:  # the min would be negative: the best fit with b = 0
        a, b = sxl / sl2, _F(0)
    return _err(sw, sx, sxx, sl, sl2, sxl, a, b), a, b


@numba.njit(**_JIT)
def _fit_scale_min(x, w, sw, sx, sxx, nmax):
    # One q4_k / q5_k sub-block x f32[n], error weights w f32[n] and their _moments -> (s, m, sum w l^2)
    # for y = s l - m, l = 0..nmax, s, m >= 0, of least weighted squared error: the plain grid, 37
    # candidate grids refit by least squares, then 2 rounds of re-rounding x to the best fit's
    # levels and refitting.
    lo = min(x.min(), _F(0))  # m >= 0: the grid starts at min(x, 0)
    hi = x.max()
    if hi <= lo:  # constant sub-block <= 0: y = -m exactly
        return _F(0), -lo, _F(0)
    iscale = nmax / (hi - lo)
    sl, sl2, sxl = _level_sums(x, w, iscale, lo, nmax)
    s, b = _F(1) / iscale, lo
    err = _err(sw, sx, sxx, sl, sl2, sxl, s, b)
    sll = sl2
    for k in range(37):
        iscale = (nmax + _F(-0.9) + _F(0.05) * _F(k)) / (hi - lo)
        sl, sl2, sxl = _level_sums(x, w, iscale, lo, nmax)
        e, a, c = _refit(sw, sx, sxx, sl, sl2, sxl)
        if e < err:
            err, s, b, sll = e, a, c, sl2
    for _ in range(2):
        if not s > 0:
            break
        sl, sl2, sxl = _level_sums(x, w, _F(1) / s, b, nmax)
        e, a, c = _refit(sw, sx, sxx, sl, sl2, sxl)
        if not e < err:
            break
        err, s, b, sll = e, a, c, sl2
    return s, -b, sll


@numba.njit(**_JIT)
def _int_sums(v, c, iscale, lo, hi):
    # integers L_j = clamp(rint(iscale v_j), lo, hi) for v, weights c f32[n] -> (sum c v L, sum c L^2)
    svl = _F(0)
    sll = _F(0)
    for j in range(v.size):
        L = min(max(np.rint(iscale * v[j]), lo), hi)
        svl += c[j] * v[j] * L
        sll += c[j] * L * L
    return svl, sll


@numba.njit(**_JIT)
def _fit_scale(x, w):
    # One q6_k sub-block x f32[n], weights w f32[n] -> (s, sum w l^2) for y = s l, l = -32..31: the
    # element of largest |x| mapped near level -32 (19 candidates), each with a least-squares s, then
    # 2 rounds of re-rounding and refitting. The error is sum w x^2 - sum(w x l)^2 / sum(w l^2).
    big = _F(0)
    for i in range(x.size):
        if abs(x[i]) > abs(big):
            big = x[i]
    if abs(big) < _F(1e-15):
        return _F(0), _F(0)
    best = _F(0)  # best sum(w x l)^2 / sum(w l^2)
    s = -big / _F(32)  # the plain grid, kept if no candidate has a positive score (zero weights)
    sll = _F(0)
    for k in range(-9, 10):
        sxl, sl2 = _int_sums(x, w, -(_F(32) + _F(0.1) * _F(k)) / big, _F(-32), _F(31))
        if sl2 > 0 and sxl * sxl > best * sl2:
            best, s, sll = sxl * sxl / sl2, sxl / sl2, sl2
    for _ in range(2):
        sxl, sl2 = _int_sums(x, w, _F(1) / s, _F(-32), _F(31))
        if not (sl2 > 0 and sxl * sxl > best * sl2):
            break
        best, s, sll = sxl * sxl / sl2, sxl / sl2, sl2
    return s, sll


@numba.njit(**_JIT)
def _fit_grid(v, c, ref, lo, hi):
    # Sub-block scales (or mins) v f32[n] -> d, the super-block scale: v_j ~ d L_j with integers
    # L_j in lo..hi, least error sum c_j (v_j - d L_j)^2. Candidates map v's element of largest |v|,
    # vmax, to ref +- 0.8 (ref = 63 for 6-bit scales, -128 for q6_k's int8), each with its
    # least-squares d; then nearest L for d and least-squares d for L alternate while that helps.
    vmax = _F(0)
    for j in range(v.size):
        if abs(v[j]) > abs(vmax):
            vmax = v[j]
    if abs(vmax) < _F(1e-15):
        return _F(0)
    d = vmax / ref  # the plain grid, kept if every weight is zero
    best = _F(0)  # best sum(c v L)^2 / sum(c L^2): the error is sum c v^2 minus it
    for k in range(-8, 9):
        svl, sll = _int_sums(v, c, (ref + _F(0.1) * _F(k)) / vmax, lo, hi)
        if sll > 0 and svl * svl > best * sll:
            best, d = svl * svl / sll, svl / sll
    for _ in range(4):
        svl, sll = _int_sums(v, c, _F(1) / d, lo, hi)
        if not (sll > 0 and svl * svl > best * sll):
            break
        best, d = svl * svl / sll, svl / sll
    return d


@numba.njit(**_JIT)
def _f16(d, out, o):
    # d -> its nearest f16 (ties to even), written as 2 little-endian bytes at out[o]; returns that
    # f16 as f32, the value a decoder will use.
    h = _from_f32(d, _H0)
    out[o] = np.uint8(h & 255)
    out[o + 1] = np.uint8(h >> 8)
    return _to_f32(h)


@numba.njit(**_JIT)
def _codes_q45(x, w, sw, sx, sxx, s, m, d, dmin, nmax):
    # A sub-block's 6-bit scale and min codes for its fit (s, m) against the super-block's d, dmin:
    # of s / d and m / dmin each rounded down or up, the pair whose levels, rounded again against
    # it, give the least error -> (code s, code m, 1 / (d code s), dmin code m); 1 / 0 -> 0
    fs = min(np.floor(s / d), _F(62)) if d > 0 else _F(0)
    fm = min(np.floor(m / dmin), _F(62)) if dmin > 0 else _F(0)
    best, bs, bm, bia, bb = _F(np.inf), fs, fm, _F(0), _F(0)
    for cs in (fs, fs + _F(1)):
        for cm in (fm, fm + _F(1)):
            a = d * cs
            b = dmin * cm
            ia = _F(1) / a if a > 0 else _F(0)
            sl, sl2, sxl = _level_sums(x, w, ia, -b, nmax)
            e = _err(sw, sx, sxx, sl, sl2, sxl, a, -b)
            if e < best:
                best, bs, bm, bia, bb = e, cs, cm, ia, b
    return np.uint8(bs), np.uint8(bm), bia, bb


@numba.njit(**_JIT)
def _block_q45_k(x, qw, nmax, w, y, L, sub):
    # One super-block x f32[256] -> y uint8[144] (q4_k, nmax 15) or [176] (q5_k, nmax 31).
    # qw: f32[256] importance or size 0; scratch: w, L f32[256], sub f32[6, 8] (per sub-block values).
    s2 = _F(0)
    for i in range(_QK):
        s2 += x[i] * x[i]
    s2 = _F(2) * s2 / _F(_QK)
    for i in range(_QK):
        w[i] = qw[i] * np.sqrt(s2 + x[i] * x[i]) if qw.size else np.sqrt(s2) + abs(x[i])
    sw, sx, sxx, sc, mn, csc = sub[0], sub[1], sub[2], sub[3], sub[4], sub[5]
    for j in range(8):
        xj, wj = x[32 * j:32 * j + 32], w[32 * j:32 * j + 32]
        sw[j], sx[j], sxx[j] = _moments(xj, wj)
        sc[j], mn[j], csc[j] = _fit_scale_min(xj, wj, sw[j], sx[j], sxx[j], nmax)
    # a scale's code is weighted by the error per unit change of it, sum w l^2; a min's by sum w
    d = _f16(_fit_grid(sc, csc, _F(63), _F(0), _F(63)), y, 0)
    dmin = _f16(_fit_grid(mn, sw, _F(63), _F(0), _F(63)), y, 2)
    # 6-bit codes at y[4:16]: j < 4 in the low 6 bits of bytes 4 + j (scale) and 8 + j (min);
    # j >= 4 in the nibbles of byte 8 + j, their top 2 bits in the top bits of bytes j and 4 + j
    for j in range(12):
        y[4 + j] = 0
    for j in range(8):
        xj, wj = x[32 * j:32 * j + 32], w[32 * j:32 * j + 32]
        cs, cm, ia, b = _codes_q45(xj, wj, sw[j], sx[j], sxx[j], sc[j], mn[j], d, dmin, nmax)
        if j < 4:
            y[4 + j] |= cs
            y[8 + j] |= cm
        else:
            y[8 + j] = (cs & 15) | ((cm & 15) << 4)
            y[j] |= (cs >> 4) << 6
            y[4 + j] |= (cm >> 4) << 6
        # the final levels, against (d cs, dmin cm) as the decoder forms them
        for i in range(32 * j, 32 * j + 32):
            L[i] = min(max(np.rint(ia * (x[i] + b)), _F(0)), nmax)
    if nmax == 15:
        # qs at y[16:144]: byte 32 i + l holds element 64 i + l (low nibble) and 64 i + 32 + l
        for i in range(4):
            for l in range(32):
                y[16 + 32 * i + l] = np.uint8(L[64 * i + l]) | (np.uint8(L[64 * i + 32 + l]) << 4)
    else:
        # qh at y[16:48]: bit s of byte l is bit 4 of element 32 s + l; low nibbles at y[48:176] as q4_k
        for l in range(32):
            h = np.uint8(0)
            for s in range(8):
                h |= (np.uint8(L[32 * s + l]) >> 4) << s
            y[16 + l] = h
        for i in range(4):
            for l in range(32):
                y[48 + 32 * i + l] = (np.uint8(L[64 * i + l]) & 15) | ((np.uint8(L[64 * i + 32 + l]) & 15) << 4)


@numba.njit(**_JIT)
def _code_q6(x, w, s, d):
    # A q6_k sub-block's int8 scale code for its fit s against d: s / d rounded down or up, whichever
    # gives the least error with the levels rounded again -> (code, 1 / (d code)); 1 / 0 -> 0
    f = min(max(np.floor(s / d), _F(-128)), _F(126))
    best, bc, bia = _F(np.inf), f, _F(0)
    for c in (f, f + _F(1)):
        a = d * c
        ia = _F(1) / a if a != 0 else _F(0)
        sxl, sl2 = _int_sums(x, w, ia, _F(-32), _F(31))
        e = a * a * sl2 - _F(2) * a * sxl  # the error less sum w x^2, the same for both
        if e < best:
            best, bc, bia = e, c, ia
    return bc, bia


@numba.njit(**_JIT)
def _block_q6_k(x, qw, w, y, L, sub):
    # One super-block x f32[256] -> y uint8[210]; qw f32[256] importance or size 0; scratch: w, L
    # f32[256], sub f32[2, 16].
    for i in range(_QK):
        w[i] = qw[i] if qw.size else x[i] * x[i]
    sc, csc = sub[0], sub[1]
    for j in range(16):
        sc[j], csc[j] = _fit_scale(x[16 * j:16 * j + 16], w[16 * j:16 * j + 16])
    d = _f16(_fit_grid(sc, csc, _F(-128), _F(-128), _F(127)), y, 208)
    for j in range(16):
        xj, wj = x[16 * j:16 * j + 16], w[16 * j:16 * j + 16]
        c, ia = _code_q6(xj, wj, sc[j], d) if d != 0 else (_F(0), _F(0))
        y[192 + j] = np.uint8(np.int8(c) & 255)  # int8 codes at y[192:208]
        for i in range(16 * j, 16 * j + 16):
            L[i] = min(max(np.rint(ia * x[i]), _F(-32)), _F(31)) + _F(32)
    # element 128 i + 32 s + l (s < 4): low 4 bits in ql = y[64 i + 32 (s % 2) + l] (nibble s // 2),
    # high 2 bits in qh = y[128 + 32 i + l] (bits 2 s, 2 s + 1)
    for i in range(2):
        for l in range(32):
            q0 = np.uint8(L[128 * i + l])
            q1 = np.uint8(L[128 * i + 32 + l])
            q2 = np.uint8(L[128 * i + 64 + l])
            q3 = np.uint8(L[128 * i + 96 + l])
            y[64 * i + l] = (q0 & 15) | ((q2 & 15) << 4)
            y[64 * i + 32 + l] = (q1 & 15) | ((q3 & 15) << 4)
            y[128 + 32 * i + l] = (q0 >> 4) | ((q1 >> 4) << 2) | ((q2 >> 4) << 4) | ((q3 >> 4) << 6)


@numba.njit(parallel=True, **_JIT)
def _rows_q45_k(x, qw, nmax, B, out):
    # x f32[R, C], qw f32[C] or size 0 -> out uint8[R, C / 256 * B]
    nb = x.shape[1] // _QK
    for r in prange(x.shape[0]):
        w = np.empty(_QK, np.float32)
        L = np.empty(_QK, np.float32)
        sub = np.empty((6, 8), np.float32)
        for b in range(nb):
            q = qw[_QK * b:_QK * b + _QK] if qw.size else qw
            _block_q45_k(x[r, _QK * b:_QK * b + _QK], q, nmax, w, out[r, B * b:B * b + B], L, sub)


@numba.njit(parallel=True, **_JIT)
def _rows_q6_k(x, qw, out):
    # x f32[R, C], qw f32[C] or size 0 -> out uint8[R, C / 256 * 210]
    nb = x.shape[1] // _QK
    for r in prange(x.shape[0]):
        w = np.empty(_QK, np.float32)
        L = np.empty(_QK, np.float32)
        sub = np.empty((2, 16), np.float32)
        for b in range(nb):
            q = qw[_QK * b:_QK * b + _QK] if qw.size else qw
            _block_q6_k(x[r, _QK * b:_QK * b + _QK], q, w, out[r, 210 * b:210 * b + 210], L, sub)
