"""GGUF block formats on the CPU: weights kept as the bytes of a GGUF file and dequantized inside
the kernels, row by row.

A matrix [R, C] in format F is uint8 [R, C / E * B] (FORMATS: E elements in a block of B bytes),
each row a run of blocks laid out as llama.cpp's block_q8_0 ... block_q6_K (ggml-common.h). The
decoders give exactly the values of gguf-py's gguf.quants.dequantize, bit for bit: f16 scales
widened to f32, then the products and sums in gguf's order, in f32.

The kernels decode one weight row at a time into an f32 row on the thread's stack (8 KiB for
C = 2048, in L1) and dot it with every token's activations, as cpu._linear does with f16 / bf16
rows: the matrix is never converted as a whole, and activations stay f32 (llama.cpp quantizes them
to int8), so a result is the f32 sum of (gguf's dequantized weight) * x, in some order.

Napkin math (T = 1): bits per weight are q8_0 8.5, q4_0 4.5, q4_1 5, q5_0 5.5, q5_1 6, q4_k 4.5,
q5_k 5.5, q6_k 6.56. A D 2048 x I 768 expert is 4.7 M weights, 2.65 MB in q4_k: 0.13 ms at the
20 GB/s two cores read here, if decoding kept up at 36 G weights/s. It does not: a decoder spends
some 5-8 vector instructions on 8 weights (256-bit vectors, LLVM's width for this CPU family),
then the dot 2 more, so the kernels run at 3-4 G weights/s a core (q5_0 / q5_1 / q5_k: 2.3, their
high bits are shifted in 64-bit lanes), about as many weights a second as the f16 path: decode is
bound by this arithmetic, at 30% of read bandwidth for q8_0 and 15-25% for the others
(tools/bench_kernels.py). T > 1 pays the decode once per row for all T tokens.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .cpu import _FAST, _JIT, _to_f32

# name -> (elements per block, bytes per block), as gguf.constants.GGML_QUANT_SIZES.
FORMATS = {
    "q8_0": (32, 34),
    "q4_0": (32, 18),
    "q4_1": (32, 20),
    "q5_0": (32, 22),
    "q5_1": (32, 24),
    "q4_k": (256, 144),
    "q5_k": (256, 176),
    "q6_k": (256, 210),
}
_CODE = {name: i for i, name in enumerate(FORMATS)}  # the kernels' format argument
_F = np.float32
_CMAX = 32768  # longest row the kernels take: its f32 copy, 128 KiB, lives on the stack
# The decoders are inlined by LLVM into the kernels (where they vectorize) and keep their own flags:
# no fastmath, set explicitly, since Numba would otherwise give them the flags of whichever kernel
# compiles them first. (Their products are exact anyway: an f16 scale, 11 bits, times integers of
# at most 13 bits fits f32's 24; the one rounding is the final + m or - dmin m, as in gguf.)
_EXACT = dict(fastmath=False, forceinline=True, **_JIT)
# Their inner loops run over n = _N = 32 elements, n given at run time: LLVM unrolls a loop with a
# constant trip count of 32 completely, and Numba turns LLVM's SLP vectorizer off, so the unrolled
# code stays scalar (about 3x slower); kept a loop it is vectorized, 8 floats a step.
_N = 32


@intrinsic
def _stack_f32(typingctx, n):
    # -> pointer to n (a literal) float32 on the calling function's stack: a scratch row that costs
    # no allocation per weight row and that LLVM knows to alias no weight byte.
    if isinstance(n, types.IntegerLiteral):

        def codegen(context, builder, signature, args):
            return cgutils.alloca_once(builder, ir.FloatType(), size=ir.Constant(ir.IntType(64), n.literal_value))

        return types.CPointer(types.float32)(n), codegen


@numba.njit(**_EXACT)
def _f16(b, o):
    # the little-endian f16 at byte o of b -> f32 (exact)
    return _to_f32(np.uint16(b[o] | (np.uint16(b[o + 1]) << 8)))


@numba.njit(**_EXACT)
def _u32(b, o):
    # the little-endian uint32 at byte o of b (the high bits of Q5_0 / Q5_1), as int64
    return np.int64(b[o]) | (np.int64(b[o + 1]) << 8) | (np.int64(b[o + 2]) << 16) | (np.int64(b[o + 3]) << 24)


# Row decoders: b uint8[C / E * B], n = _N -> y f32[C]. One per format, each block as ggml-common.h
# lays it out and gguf.quants dequantizes it. The integer parts are cast to 8 bits before the float
# conversion, so that LLVM vectorizes them in 8-bit lanes, not Numba's int64 (the high-bit shifts of
# Q5_0 / Q5_1 / Q5_K still run in 64-bit lanes, hence their lower speed).


@numba.njit(**_EXACT)
def _q8_0(b, y, n):
    # block: f16 d, int8 q[32]; w = q * d
    for k in range(y.size // 32):
        o = 34 * k
        d = _f16(b, o)
        for l in range(n):
            y[32 * k + l] = _F(np.int8(b[o + 2 + l])) * d


@numba.njit(**_EXACT)
def _q4_0(b, y, n):
    # block: f16 d, q[16] two nibbles (low: elements 0-15, high: 16-31); w = d * (q - 8)
    for k in range(y.size // 32):
        o = 18 * k
        d = _f16(b, o)
        for l in range(n // 2):
            q = b[o + 2 + l]
            y[32 * k + l] = d * _F(np.int8((q & 15) - 8))
            y[32 * k + 16 + l] = d * _F(np.int8((q >> 4) - 8))


@numba.njit(**_EXACT)
def _q4_1(b, y, n):
    # block: f16 d, f16 m, q[16] nibbles as Q4_0; w = d * q + m
    for k in range(y.size // 32):
        o = 20 * k
        d = _f16(b, o)
        m = _f16(b, o + 2)
        for l in range(n // 2):
            q = b[o + 4 + l]
            y[32 * k + l] = d * _F(np.uint8(q & 15)) + m
            y[32 * k + 16 + l] = d * _F(np.uint8(q >> 4)) + m


@numba.njit(**_EXACT)
def _q5_0(b, y, n):
    # block: f16 d, uint32 h (bit e: bit 4 of element e), q[16] low nibbles as Q4_0; w = d * (q - 16)
    for k in range(y.size // 32):
        o = 22 * k
        d = _f16(b, o)
        h = _u32(b, o + 2)
        for l in range(n // 2):
            q = b[o + 6 + l]
            y[32 * k + l] = d * _F(np.int8(((q & 15) | (((h >> l) & 1) << 4)) - 16))
            y[32 * k + 16 + l] = d * _F(np.int8(((q >> 4) | (((h >> (l + 16)) & 1) << 4)) - 16))


@numba.njit(**_EXACT)
def _q5_1(b, y, n):
    # block: f16 d, f16 m, uint32 h, q[16] as Q5_0; w = d * q + m
    for k in range(y.size // 32):
        o = 24 * k
        d = _f16(b, o)
        m = _f16(b, o + 2)
        h = _u32(b, o + 4)
        for l in range(n // 2):
            q = b[o + 8 + l]
            y[32 * k + l] = d * _F(np.uint8((q & 15) | (((h >> l) & 1) << 4))) + m
            y[32 * k + 16 + l] = d * _F(np.uint8((q >> 4) | (((h >> (l + 16)) & 1) << 4))) + m


@numba.njit(**_EXACT)
def _scale_min(b, o, j):
    # (d sc_j, dmin m_j) of sub-block j < 8 of the Q4_K / Q5_K super-block at b[o:]: the 6-bit scale
    # and min from its 12 scale bytes at o + 4 (gguf's Q4_K.get_scale_min): j < 4 in the low 6 bits
    # of bytes j and 4 + j; j >= 4 in the nibbles of byte 4 + j, with their top 2 bits in the top
    # bits of bytes j - 4 and j.
    p = o + 4
    if j < 4:
        sc, m = b[p + j] & 63, b[p + 4 + j] & 63
    else:
        sc, m = (b[p + 4 + j] & 15) | ((b[p + j - 4] >> 2) & 48), (b[p + 4 + j] >> 4) | ((b[p + j] >> 2) & 48)
    return _f16(b, o) * _F(sc), _f16(b, o + 2) * _F(m)


@numba.njit(**_EXACT)
def _q4_k(b, y, n):
    # super-block: f16 d, f16 dmin, 12 bytes of 8 scales / mins, q[128]: byte 32 i + l holds element
    # 64 i + l (low nibble) and 64 i + 32 + l (high); sub-block s = e // 32: w = (d sc_s) q - dmin m_s
    for k in range(y.size // 256):
        o = 144 * k
        for i in range(4):
            d0, dm0 = _scale_min(b, o, 2 * i)
            d1, dm1 = _scale_min(b, o, 2 * i + 1)
            e = 256 * k + 64 * i
            for l in range(n):
                q = b[o + 16 + 32 * i + l]
                y[e + l] = d0 * _F(np.uint8(q & 15)) - dm0
                y[e + 32 + l] = d1 * _F(np.uint8(q >> 4)) - dm1


@numba.njit(**_EXACT)
def _q5_k(b, y, n):
    # super-block: f16 d, f16 dmin, 12 scale bytes as Q4_K, qh[32] (bit s of byte l: bit 4 of element
    # 32 s + l), q[128] low nibbles as Q4_K; w = (d sc_s) q - dmin m_s
    for k in range(y.size // 256):
        o = 176 * k
        for i in range(4):
            d0, dm0 = _scale_min(b, o, 2 * i)
            d1, dm1 = _scale_min(b, o, 2 * i + 1)
            e = 256 * k + 64 * i
            for l in range(n):
                q = b[o + 48 + 32 * i + l]
                h = b[o + 16 + l] >> (2 * i)
                y[e + l] = d0 * _F(np.uint8((q & 15) | ((h & 1) << 4))) - dm0
                y[e + 32 + l] = d1 * _F(np.uint8((q >> 4) | ((h & 2) << 3))) - dm1


@numba.njit(**_EXACT)
def _q6_k(b, y, n):
    # super-block: ql[128], qh[64], int8 sc[16], f16 d. Element 128 i + 32 s + l (s < 4, l < 32): low
    # 4 bits from ql[64 i + 32 (s % 2) + l] (nibble s // 2), high 2 bits from qh[32 i + l] (bits 2s);
    # w = (d sc[e // 16]) (q - 32)
    for k in range(y.size // 256):
        o = 210 * k
        d = _f16(b, o + 208)
        for i in range(2):
            for half in range(2):  # l // 16 picks the scale
                j = o + 192 + 8 * i + half
                d0 = d * _F(np.int8(b[j]))
                d1 = d * _F(np.int8(b[j + 2]))
                d2 = d * _F(np.int8(b[j + 4]))
                d3 = d * _F(np.int8(b[j + 6]))
                e = 256 * k + 128 * i + n // 2 * half
                a = o + 64 * i + n // 2 * half
                c = o + 128 + 32 * i + n // 2 * half
                for l in range(n // 2):
                    lo = b[a + l]
                    hi = b[a + 32 + l]
                    h = b[c + l]
                    y[e + l] = d0 * _F(np.int8(((lo & 15) | ((h & 3) << 4)) - 32))
                    y[e + 32 + l] = d1 * _F(np.int8(((hi & 15) | ((h & 12) << 2)) - 32))
                    y[e + 64 + l] = d2 * _F(np.int8(((lo >> 4) | (h & 48)) - 32))
                    y[e + 96 + l] = d3 * _F(np.int8(((hi >> 4) | ((h & 192) >> 2)) - 32))


@numba.njit(**_EXACT)
def _decode(b, code, n, y):
    # one row b uint8[row bytes] of format `code` (_CODE) -> y f32[C]; n = _N
    if code == 0:
        _q8_0(b, y, n)
    elif code == 1:
        _q4_0(b, y, n)
    elif code == 2:
        _q4_1(b, y, n)
    elif code == 3:
        _q5_0(b, y, n)
    elif code == 4:
        _q5_1(b, y, n)
    elif code == 5:
        _q4_k(b, y, n)
    elif code == 6:
        _q5_k(b, y, n)
    else:
        _q6_k(b, y, n)


@numba.njit(parallel=True, **_JIT)
def _dequantize(raw, code, n, out):
    # raw uint8[R, row bytes] -> out f32[R, C]
    for r in prange(raw.shape[0]):
        _decode(raw[r], code, n, out[r])


@numba.njit(parallel=True, fastmath=_FAST, **_JIT)
def _linear(x, w, code, n, out):
    # x f32[T, C]; w uint8[R, row bytes]; out f32[T, R]. Each row is decoded once, into L1, and used
    # for all T tokens (T = 1: the decode GEMV).
    T, C = x.shape
    for r in prange(w.shape[0]):
        y = numba.carray(_stack_f32(_CMAX), C)
        _decode(w[r], code, n, y)
        for t in range(T):
            acc = _F(0.0)
            for c in range(C):
                acc += y[c] * x[t, c]
            out[t, r] = acc


@numba.njit(parallel=True, fastmath=_FAST, **_JIT)
def _gate_up(x, gate, up, gcode, ucode, n, h):
    # x f32[T, D]; gate, up uint8[I, row bytes]; h f32[T, I] = silu(gate @ x) * (up @ x), with
    # cpu._gate_up's silu.
    T, D = x.shape
    for i in prange(gate.shape[0]):
        yg = numba.carray(_stack_f32(_CMAX), D)
        yu = numba.carray(_stack_f32(_CMAX), D)
        _decode(gate[i], gcode, n, yg)
        _decode(up[i], ucode, n, yu)
        for t in range(T):
            g = _F(0.0)
            u = _F(0.0)
            for d in range(D):
                g += yg[d] * x[t, d]
                u += yu[d] * x[t, d]
            h[t, i] = g / (_F(1.0) + np.exp(-g)) * u


def _code(w, fmt, rows, C):
    # -> the kernels' code of format `fmt`, after checking that w is uint8 [rows, the bytes of C
    # elements]; a one-line error otherwise.
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}: not one of f32, f16, bf16, {', '.join(FORMATS)}")
    E, B = FORMATS[fmt]
    if C % E or C > _CMAX:
        raise ValueError(f"{fmt} rows hold a multiple of {E} elements, at most {_CMAX}: not {C}")
    if w.dtype != np.uint8 or w.shape != (rows, C // E * B):
        raise ValueError(f"{fmt} weights [{rows}, {C}] must be uint8 [{rows}, {C // E * B}] bytes, "
                         f"got {w.dtype} {list(w.shape)}")
    return _CODE[fmt]


def dequantize(raw, fmt, shape):
    """raw: the bytes of an [R, C] matrix in format `fmt`, uint8 [R, C / E * B] -> new f32[R, C] with
    gguf.quants.dequantize's values."""
    R, C = shape
    code = _code(raw, fmt, R, C)
    out = np.empty((R, C), np.float32)
    _dequantize(np.ascontiguousarray(raw), code, _N, out)
    return out


def linear(x, w, fmt, out):
    """out f32[T, R] = x f32[T, C] @ W.T, W [R, C] given as its `fmt` bytes uint8 [R, C / E * B]."""
    _linear(x, w, _code(w, fmt, out.shape[1], x.shape[1]), _N, out)


def gate_up(x, gate, up, fmts, h):
    """h f32[T, I] = silu(gate @ x[t]) * (up @ x[t]) (the SwiGLU expert's first half; cpu.expert_ffn
    does the down projection): x f32[T, D]; gate, up [I, D] as the bytes of their formats
    fmts = (gate's, up's)."""
    T, D = x.shape
    I = gate.shape[0]
    _gate_up(x, gate, up, _code(gate, fmts[0], I, D), _code(up, fmts[1], I, D), _N, h)
