"""The CPU backend: NumPy arrays and Numba kernels for decode and prefill.

The operations the decoder loop (model.py) calls, with the same signatures as backend/cuda.py:
buffer, to_device, to_host, embed, linear, rms_norm, rope, kv_store, attention, router_topk, expert_ffn,
the Gated DeltaNet ops, and `xp`, the array module holding the arrays. All activations are float32
C-contiguous arrays; every kernel accumulates in float32. Weights, and the KV cache, may be float32,
or float16 / bfloat16 data viewed as uint16 (Numba's CPU target has no half type) and are converted
element by element in the inner loops, so no f32 copy of a weight matrix is ever made; or the block
bytes of a GGUF format ("q8_0" ... "q6_k"), which backend/quant.py decodes row by row.

Kernels are nogil (I/O threads can run while one thread computes) and cached on
disk (a new process does not recompile). Parallel kernels use Numba's threading
layer with its current thread count (numba.set_num_threads / NUMBA_NUM_THREADS).
"""

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

# reassoc lets LLVM vectorise f32 reductions, contract allows FMA. No nnan/ninf:
# inf and nan in weights or activations must propagate as in PyTorch.
_FAST = {"reassoc", "contract"}
_JIT = dict(nogil=True, cache=True)

xp = np


def buffer(shape, dtype=np.float32):
    """Scratch space for a result."""
    return np.empty(shape, dtype)


def to_device(a):
    """Host arrays are this backend's own: no copy."""
    return a


def to_host(a):
    return a


@intrinsic
def _from_f32(typingctx, x, like):
    # float32 -> one element of `like`'s type (only its type is used), rounded to nearest even as
    # torch's .to() rounds: float32 as is; uint16 IEEE half bits (LLVM fptrunc: vcvtps2ph with F16C);
    # int16 bfloat16 bits, NaN as torch's 0x7fc0. For the KV cache (kv_store).
    i16, i32 = ir.IntType(16), ir.IntType(32)

    def f32(context, builder, signature, args):
        return args[0]

    def f16(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), i16)

    def bf16(context, builder, signature, args):
        bits = builder.bitcast(args[0], i32)
        lsb = builder.and_(builder.lshr(bits, ir.Constant(i32, 16)), ir.Constant(i32, 1))
        rounded = builder.lshr(builder.add(builder.add(bits, ir.Constant(i32, 0x7FFF)), lsb), ir.Constant(i32, 16))
        nan = builder.fcmp_unordered("uno", args[0], args[0])
        return builder.trunc(builder.select(nan, ir.Constant(i32, 0x7FC0), rounded), i16)

    codegen = {types.float32: f32, types.uint16: f16, types.int16: bf16}.get(like)
    if codegen is not None and x == types.float32:
        return like(x, like), codegen


@intrinsic
def _to_f32(typingctx, w):
    # One weight element -> float32, the conversion picked at compile time by
    # the element type: float32 as is; uint16 holds IEEE half bits; int16
    # holds bfloat16 bits (expert_ffn re-views bf16 data as int16 so that the
    # array type alone selects the kernel specialisation).
    i32 = ir.IntType(32)

    def f32(context, builder, signature, args):
        return args[0]

    def f16(context, builder, signature, args):
        # LLVM fpext is exact for subnormals, inf and nan, and becomes
        # vcvtph2ps on x86 with F16C.
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    def bf16(context, builder, signature, args):
        # bfloat16 is the top half of a float32.
        bits = builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16))
        return builder.bitcast(bits, ir.FloatType())

    codegen = {types.float32: f32, types.uint16: f16, types.int16: bf16}.get(w)
    if codegen is not None:
        return types.float32(w), codegen


# Weight dtype name -> (numpy dtype the caller passes, dtype the kernels see).
_WDTYPE = {
    "f32": (np.dtype(np.float32), np.dtype(np.float32)),
    "f16": (np.dtype(np.uint16), np.dtype(np.uint16)),
    "bf16": (np.dtype(np.uint16), np.dtype(np.int16)),
}


def _kernel_view(w, dtype):
    # Check the caller's dtype (a wrong one would compile a new specialisation
    # or, uint16 read as f32, give garbage) and re-view for the kernels.
    given, kernel = _WDTYPE[dtype]
    if w.dtype != given:
        raise TypeError(f"{dtype} weights must be {given}, got {w.dtype}")
    return w.view(kernel)


@numba.njit(**_JIT)
def _convert(w, out):
    for i in range(w.size):
        out[i] = _to_f32(w[i])


def to_f32(w, dtype):
    """Weights of any supported dtype ("f32", "f16", "bf16"; half types as
    uint16 views) -> new float32 array of the same shape, using the kernels'
    own conversion (for embeddings, checks and tests). A GGUF format (quant.FORMATS) takes rows of
    block bytes uint8 [..., row bytes] -> f32 [..., row elements]."""
    if dtype in quant.FORMATS:
        E, B = quant.FORMATS[dtype]
        rows = w.reshape(-1, w.shape[-1])
        return quant.dequantize(rows, dtype, (rows.shape[0], w.shape[-1] // B * E)).reshape(*w.shape[:-1], -1)
    flat = _kernel_view(np.ascontiguousarray(w).reshape(-1), dtype)
    out = np.empty(flat.size, np.float32)
    _convert(flat, out)
    return out.reshape(w.shape)


def embed(tokens, table, dtype, out):
    """out f32[T, D] = float32(table[tokens]): tokens int64[T]; table [V, D]."""
    out[:] = to_f32(table[tokens], dtype)


@numba.njit(fastmath=_FAST, **_JIT)
def rms_norm(x, w, eps, out=None):
    """x f32[T, N], w f32[N] -> out f32[T, N] (new when not given): w * (x / sqrt(mean(x^2) + eps))."""
    T, N = x.shape
    y = np.empty_like(x) if out is None else out
    for t in range(T):
        ss = np.float32(0.0)
        for i in range(N):
            ss += x[t, i] * x[t, i]
        r = np.float32(1.0) / np.sqrt(ss / np.float32(N) + np.float32(eps))
        # HF order: normalise first, then scale by the weight.
        for i in range(N):
            y[t, i] = w[i] * (x[t, i] * r)
    return y


@numba.njit(**_JIT)
def rope(x, cos, sin, start=0):
    """In place NeoX / HF rotate_half rotary embedding of the first rot = 2 * cos.shape[1] dims of
    each head of x f32[T, H, hd] (all of them, or a part: partial RoPE) at positions
    start..start+T-1; cos, sin f32[P, rot / 2] tables from position 0 (model.rope_tables; angle i
    pairs x[i], x[i + rot/2])."""
    T, H, hd = x.shape
    half = cos.shape[1]
    for t in range(T):
        p = start + t
        for h in range(H):
            for i in range(half):
                x1 = x[t, h, i]
                x2 = x[t, h, i + half]
                x[t, h, i] = x1 * cos[p, i] - x2 * sin[p, i]
                x[t, h, i + half] = x2 * cos[p, i] + x1 * sin[p, i]


@numba.njit(fastmath=_FAST, **_JIT)
def _softmax_inplace(z):
    # z f32[n] -> softmax(z), shifted by the max so exp cannot overflow.
    m = z[0]
    for j in range(1, z.size):
        m = max(m, z[j])
    tot = np.float32(0.0)
    for j in range(z.size):
        e = np.exp(z[j] - m)
        z[j] = e
        tot += e
    inv = np.float32(1.0) / tot
    for j in range(z.size):
        z[j] *= inv


@numba.njit(parallel=True, fastmath=_FAST, **_JIT)
def _attention(q, k_cache, v_cache, start, out):
    # One task per (token, kv head) handles that kv head's whole query group, so each cached
    # key/value row is read once per group rather than once per head.
    T, H, hd = q.shape
    KV = k_cache.shape[0]
    G = H // KV
    scale = np.float32(1.0 / np.sqrt(hd))
    # prange splits the tasks into one contiguous block per thread (the omp
    # layer schedules statically). Causal work grows with t, so visit tokens
    # zig-zag (0, T-1, 1, T-2, ...) to give each block a similar amount.
    for task in prange(T * KV):
        i = task // KV
        g = task % KV
        t = i // 2 if i % 2 == 0 else T - 1 - i // 2
        L = start + t + 1
        s = np.empty((G, L), np.float32)  # scores, then probabilities
        for j in range(L):
            for r in range(G):
                acc = np.float32(0.0)
                for d in range(hd):
                    acc += q[t, g * G + r, d] * _to_f32(k_cache[g, j, d])
                s[r, j] = acc * scale
        for r in range(G):
            _softmax_inplace(s[r])
            for d in range(hd):
                out[t, g * G + r, d] = 0.0
        for j in range(L):
            for r in range(G):
                p = s[r, j]
                for d in range(hd):
                    out[t, g * G + r, d] += p * _to_f32(v_cache[g, j, d])


def attention(q, k_cache, v_cache, start, out, dtype):
    """Causal GQA attention over a KV cache. q f32[T, H, hd]: query t sits at position start + t and
    sees positions 0..start+t. k_cache, v_cache [KV, S_max, hd] of `dtype` ("f32", or "f16" / "bf16"
    bits as uint16, converted as they are read), already filled up to start + T - 1. Query head h
    reads kv head h // (H // KV). Writes out f32[T, H, hd]."""
    _attention(q, _kernel_view(k_cache, dtype), _kernel_view(v_cache, dtype), start, out)


@numba.njit(**_JIT)
def _kv_store(k, v, k_cache, v_cache, start):
    T, KV, hd = k.shape
    for g in range(KV):
        for t in range(T):
            for d in range(hd):
                k_cache[g, start + t, d] = _from_f32(k[t, g, d], k_cache[0, 0, 0])
                v_cache[g, start + t, d] = _from_f32(v[t, g, d], v_cache[0, 0, 0])


def kv_store(k, v, k_cache, v_cache, start, dtype):
    """This step's keys and values k, v f32[T, KV, hd] -> the caches [KV, S_max, hd] of `dtype` at
    positions start..start+T-1, rounded to nearest even (as torch's .to(torch.float16 / bfloat16))."""
    _kv_store(k, v, _kernel_view(k_cache, dtype), _kernel_view(v_cache, dtype), start)


@numba.njit(**_JIT)
def router_topk(logits, k, renorm):
    """logits f32[T, E] -> (idx int64[T, k], weights f32[T, k]): softmax per
    row, the k most probable experts in descending order (ties: lower index
    first), weights optionally renormalised to sum to 1."""
    T, E = logits.shape
    idx = np.empty((T, k), np.int64)
    wts = np.empty((T, k), np.float32)
    p = np.empty(E, np.float32)
    taken = np.empty(E, np.bool_)
    for t in range(T):
        p[:] = logits[t]
        _softmax_inplace(p)
        # k is small (<= 8 or so): repeated argmax beats sorting E entries.
        taken[:] = False
        ksum = np.float32(0.0)
        for j in range(k):
            best = -1
            for e in range(E):
                # strict > keeps the lower index on ties
                if not taken[e] and (best < 0 or p[e] > p[best]):
                    best = e
            taken[best] = True
            idx[t, j] = best
            wts[t, j] = p[best]
            ksum += p[best]
        if renorm:
            for j in range(k):
                wts[t, j] /= ksum
    return idx, wts


@numba.njit(parallel=True, fastmath=_FAST, **_JIT)
def _gate_up(x, gate, up, h):
    # x f32[T, D]; gate, up [I, D]; h f32[T, I] = silu(gate @ x) * (up @ x). Each pair of weight
    # rows is read from memory once and used for all T tokens while it sits in L1.
    T, D = x.shape
    I = gate.shape[0]
    for i in prange(I):
        for t in range(T):
            g = np.float32(0.0)
            u = np.float32(0.0)
            for d in range(D):
                g += _to_f32(gate[i, d]) * x[t, d]
                u += _to_f32(up[i, d]) * x[t, d]
            h[t, i] = g / (np.float32(1.0) + np.exp(-g)) * u


@numba.njit(parallel=True, fastmath=_FAST, **_JIT)
def _linear(x, w, out):
    # x f32[T, D]; w [R, D]; out f32[T, R]. One weight row at a time, used for all T tokens
    # while it is in L1 (T = 1: a bandwidth-bound GEMV).
    T, D = x.shape
    R = w.shape[0]
    for r in prange(R):
        for t in range(T):
            acc = np.float32(0.0)
            for d in range(D):
                acc += _to_f32(w[r, d]) * x[t, d]
            out[t, r] = acc


def linear(x, w, dtype, out, bias=None):
    """out = x @ w.T (+ bias, added after the product): x f32[T, D]; w [R, D] (nn.Linear layout)
    float32, or uint16 views of float16 / bfloat16 data; bias f32[R]; out f32[T, R] overwritten. Used for every dense projection so that
    decode runs on one thread pool (NumPy's BLAS pool and Numba's spinning OpenMP pool, used in
    turn, starve each other: measured 5 vs 129 tok/s on a 0.8 GB model).
    dtype a GGUF format (quant.FORMATS, "q8_0" ... "q6_k"): w is its block bytes uint8 [R, row bytes]."""
    if dtype in _WDTYPE:
        _linear(x, _kernel_view(w, dtype), out)
    else:
        quant.linear(x, w, dtype, out)
    if bias is not None:
        out += bias


def expert_ffn(x, gate, up, down, dtype, out):
    """SwiGLU expert / dense MLP: out[t] = down @ (silu(gate @ x[t]) * (up @ x[t])).
    x f32[T, D]; gate, up [I, D]; down [D, I] (nn.Linear layout), float32 for
    dtype "f32" or uint16 views of float16 / bfloat16 data for "f16" / "bf16", or the block bytes
    of a GGUF format (quant.FORMATS); dtype one format or (gate's, up's, down's), e.g. llama.cpp's
    ("q4_k", "q4_k", "q6_k"), or ("q8_0", "q8_0", "f16") where its quantizer keeps rows of a
    length no block divides in f16. out f32[T, D] is overwritten."""
    g, u, d = dtype if isinstance(dtype, tuple) else (dtype,) * 3
    T, I = x.shape[0], gate.shape[0]
    h = np.empty((T, I), np.float32)
    if g == u and g in _WDTYPE:
        _gate_up(x, _kernel_view(gate, g), _kernel_view(up, u), h)
    elif g in quant.FORMATS and u in quant.FORMATS:
        quant.gate_up(x, gate, up, (g, u), h)
    else:  # one float, one block: no llama.cpp mix does this, but a GGUF file may
        hg = np.empty((T, I), np.float32)
        linear(x, gate, g, hg)
        linear(x, up, u, h)
        h *= hg / (np.float32(1.0) + np.exp(-hg))
    linear(h, down, d, out)


# Gated DeltaNet (Qwen3.5 / 3.6 linear attention), as transformers' torch fallbacks compute it.


@numba.njit(**_JIT)
def causal_conv(x, w, state, out):
    """Causal depthwise conv of K taps and SiLU: x f32[T, C] new inputs; w f32[C, K]; state
    f32[K - 1, C] the K - 1 inputs before x (zeros at the start), updated to the last K - 1 of
    [state; x]; out f32[T, C][t, c] = silu(sum_j w[c, j] window[t + j, c]), window = [state; x]."""
    T, C = x.shape
    K = w.shape[1]
    window = np.empty((K - 1 + T, C), np.float32)
    window[: K - 1] = state
    window[K - 1 :] = x
    for t in range(T):
        for c in range(C):
            acc = np.float32(0.0)
            for j in range(K):
                acc += w[c, j] * window[t + j, c]
            out[t, c] = acc / (np.float32(1.0) + np.exp(-acc))
    state[:] = window[T:]


def l2_norm(x, eps=1e-6):
    """x f32[rows, n] -> new f32 rows x / sqrt(sum(x^2) + eps) (transformers' l2norm)."""
    return x / np.sqrt(np.sum(x * x, axis=1, keepdims=True) + np.float32(eps))


def delta_gates(b, a, A, dt_bias):
    """Gated DeltaNet's gates: b, a f32[T, Hv]; A, dt_bias f32[Hv] -> (beta, g) f32[T, Hv]: beta =
    sigmoid(b), g = A softplus(a + dt_bias), softplus exactly its input past 20 (torch's threshold)."""
    z = a + dt_bias
    softplus = np.where(z > 20, z, np.log1p(np.exp(np.minimum(z, 20)))).astype(np.float32)
    return np.float32(1.0) / (np.float32(1.0) + np.exp(-b)), A * softplus


def gated_rms_norm(x, z, w, eps):
    """-> new f32[rows, N] = rms_norm(x, w, eps) * silu(z): x, z f32[rows, N] (Gated DeltaNet's norm of
    each value head's output)."""
    return rms_norm(x, w, eps) * (z / (np.float32(1.0) + np.exp(-z)))


@numba.njit(parallel=True, **_JIT)
def gated_delta_rule(q, k, v, g, beta, S, out, tiled):
    """The gated delta rule one token at a time: q, k f32[T, Hk, dk]; v f32[T, Hv, dv]; g, beta
    f32[T, Hv]; S f32[Hv, dk, dv] the recurrent state, updated; out f32[T, Hv, dv]. Value head h
    reads key head h // (Hv / Hk), or h % Hk when `tiled` (a GGUF's order). Per token: S *= exp(g);
    delta = beta (v - S^T k); S += k delta^T; out = S^T q."""
    T, Hk, dk = q.shape
    Hv, dv = v.shape[1], v.shape[2]
    for h in prange(Hv):
        hk = h % Hk if tiled else h // (Hv // Hk)
        mem = np.empty(dv, np.float32)
        for t in range(T):
            decay = np.exp(g[t, h])
            mem[:] = 0.0
            for i in range(dk):
                for j in range(dv):
                    S[h, i, j] *= decay
                    mem[j] += S[h, i, j] * k[t, hk, i]
            for j in range(dv):
                mem[j] = (v[t, h, j] - mem[j]) * beta[t, h]
            for j in range(dv):
                out[t, h, j] = 0.0
            for i in range(dk):
                for j in range(dv):
                    S[h, i, j] += k[t, hk, i] * mem[j]
                    out[t, h, j] += S[h, i, j] * q[t, hk, i]


# Last: quant.py builds its kernels on _to_f32 and the flags above.
from . import quant  # noqa: E402
