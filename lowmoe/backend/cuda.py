"""The GPU backend: CuPy arrays and the kernels of the CUDA sources in native/, with the operations of
backend/cpu.py and their signatures (buffer, to_device, to_host, embed, linear, rms_norm, rope,
kv_store, attention, router_topk, expert_ffn, the Gated DeltaNet ops causal_conv, l2_norm, delta_gates,
gated_delta_rule and gated_rms_norm, and `xp`, here CuPy), plus the stacked-expert kernels the GPU
expert tier launches (expert_rows, expert_combine).

Each native/<file>.cu is compiled once, on first use, by `cupy.RawModule` (NVRTC) and cached here
(CuPy also keeps the binary on disk). The source is prefixed with `#line 1 "native/<file>.cu"` so
that compiler errors name the .cu file and line; `#include "common.cuh"` is replaced by that
header's text (with its own #line), which keeps CuPy's on-disk cache keyed on everything compiled.

All activations are float32 C-contiguous CuPy arrays; weights are float32, float16 / bfloat16
bits as uint16, or the block bytes of a GGUF format ("q8_0" ... "q6_k", native/blocks.cuh) as uint8,
as on the CPU. Every function only enqueues kernels on the current stream: none
waits for the GPU. CuPy is imported on first use, so this module imports without it (the tests read
KERNELS on machines without a GPU).
"""

import math
import os
import re

import numpy as np

from ..errors import DeviceError

NATIVE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "native")
HEADER = "common.cuh"
_INCLUDE = re.compile(r'^#include "(\w+\.cuh)"$', re.M)

# The entry points Python launches, per source file. tests/test_native.py checks that each exists in
# the compiled module and that no `extern "C" __global__` in native/ is missing from here.
_BLOCKS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")  # quant.FORMATS, native/blocks.cuh
_DT = ("f32", "f16", "bf16") + _BLOCKS
KERNELS = {
    "embed.cu": tuple(f"embed_{d}" for d in _DT),
    "linear.cu": tuple(f"linear_{d}" for d in _DT),
    "norm.cu": ("rms_norm_f32", "gated_rms_norm_f32", "l2_norm_f32"),
    "rope.cu": ("rope_f32",),
    "attention.cu": ("attn_split_f32", "attn_split_f16", "attn_split_bf16", "attn_combine_f32", "kv_store_f32",
                     "kv_store_f16", "kv_store_bf16"),
    "router.cu": ("router_topk_f32",),
    "delta.cu": ("causal_conv_f32", "delta_gates_f32", "gated_delta_rule_f32"),
    "expert_gemv.cu": tuple(f"moe_{op}_{d}" for op in ("gate_up", "down") for d in _DT),
    "expert_gemm.cu": ("moe_sort_i32", "moe_combine_f32") + tuple(f"moe_group_{op}_{d}" for op in ("gate_up", "down") for d in _DT),
}

# Weight dtype name -> the element dtype of the arrays passed in (a block format: its bytes).
_WDTYPE = {"f32": np.dtype(np.float32), "f16": np.dtype(np.uint16), "bf16": np.dtype(np.uint16),
           **dict.fromkeys(_BLOCKS, np.dtype(np.uint8))}
_VN = {"f16": 8, "bf16": 8}  # weights per thread of embed (Weights<W>::VN): 4 for the others

# Fill scratch buffers with NaN (ints with -1) instead of leaving them uninitialised, so that an
# element a kernel forgets to write shows up in its result. For tools/gpu_check.py.
POISON = False

_cupy = None
_modules = {}  # file name -> compiled RawModule
_functions = {}  # (file name, entry point) -> its kernel
_sms = None


def __getattr__(name):
    # `xp`, the array module (PEP 562): CuPy, imported and checked on first use like every kernel.
    if name == "xp":
        return cupy()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cupy():
    """The cupy module once a GPU is known to be usable; DeviceError (one line) otherwise."""
    global _cupy
    if _cupy is None:
        try:
            import cupy
        except ImportError:
            raise DeviceError("device 'cuda' needs CuPy: pip install -e '.[cuda13]' (or '.[cuda12]' for a "
                              "CUDA 12 driver)") from None
        try:
            n = cupy.cuda.runtime.getDeviceCount()
        except cupy.cuda.runtime.CUDARuntimeError as e:
            raise DeviceError(f"device 'cuda': CuPy cannot use a GPU ({e})") from None
        if n == 0:
            raise DeviceError("device 'cuda': CuPy finds no GPU")
        if not os.path.isfile(os.path.join(NATIVE, HEADER)):
            raise DeviceError(f"device 'cuda': the CUDA sources are not in {NATIVE}; install lowmoe from a "
                              "source checkout (pip install -e '.[cuda13]')")
        _cupy = cupy
    return _cupy


def _read(name):
    with open(os.path.join(NATIVE, name), encoding="utf-8") as f:
        return f.read()


def source(name):
    """The text compiled for native/<name>: the headers it includes (`#include "X.cuh"`, and theirs)
    inlined first, each once, then the file; each part after a #line directive naming its file, and
    each include line left empty, so that line numbers in compiler errors stay exact."""
    order = []

    def visit(f):
        for h in _INCLUDE.findall(_read(f)):
            if h not in order:
                visit(h)
                order.append(h)

    visit(name)
    return "\n".join(f'#line 1 "native/{f}"\n{_INCLUDE.sub("", _read(f))}' for f in order + [name])


def kernel(name, fn):
    """The compiled entry point `fn` of native/<name>, compiling the file on first use."""
    f = _functions.get((name, fn))
    if f is not None:
        return f
    module = _modules.get(name)
    if module is None:
        cp = cupy()
        try:
            module = cp.RawModule(code=source(name), options=("-std=c++17",))
            module.compile()
        except cp.cuda.compiler.CompileException as e:
            raise RuntimeError(f"native/{name} does not compile:\n{e.get_message()}") from None
        _modules[name] = module
    f = _functions[(name, fn)] = module.get_function(fn)
    return f


def _launch(name, fn, grid, block, args, shared_mem=0):
    kernel(name, fn)(grid, (block,), args, shared_mem=shared_mem)


def buffer(shape, dtype=np.float32):
    """Scratch space on the device (NaN- or -1-filled when POISON)."""
    cp = cupy()
    if not POISON:
        return cp.empty(shape, dtype)
    return cp.full(shape, np.nan if np.dtype(dtype).kind == "f" else -1, dtype)


def to_device(a):
    """A device copy of the host array `a`."""
    return cupy().asarray(a)


def to_host(a):
    """A host copy of the device array `a`: the host waits for the GPU."""
    return cupy().asnumpy(a)


def _weights(w, dtype):
    if w.dtype != _WDTYPE[dtype]:
        raise TypeError(f"{dtype} weights must be {_WDTYPE[dtype]}, got {w.dtype}")
    return w


def _sm_count():
    global _sms
    if _sms is None:
        _sms = cupy().cuda.Device().attributes["MultiProcessorCount"]
    return _sms


def embed(tokens, table, dtype, out):
    """out f32[T, D] = float32(table[tokens]): tokens int64[T] (host or device); table [V, D] (a block
    format: uint8 [V, row bytes])."""
    T, D = out.shape
    tokens = cupy().asarray(tokens, dtype=np.int64)
    _launch("embed.cu", f"embed_{dtype}", (math.ceil(D / (256 * _VN.get(dtype, 4))), T), 256,
            (tokens, _weights(table, dtype), out, np.int32(D)))


def linear(x, w, dtype, out, bias=None):
    """out f32[T, R] = x @ w.T + bias: x f32[T, D]; w [R, D] (a block format: uint8 [R, row bytes]);
    bias f32[R], zeros when None (the kernel always adds one; load/weights.to_device gives every
    matrix one)."""
    T, D = x.shape
    R = w.shape[0]
    if bias is None:
        bias = cupy().zeros(R, np.float32)
    _launch("linear.cu", f"linear_{dtype}", (math.ceil(R / 8),), 256,
            (x, _weights(w, dtype), bias, out, np.int32(T), np.int32(D), np.int32(R)))


def rms_norm(x, w, eps, out=None):
    """-> out f32[rows, N] (new when not given) = w * (x / sqrt(mean(x^2) + eps)) per row; out may be x."""
    rows, N = x.shape
    out = buffer(x.shape) if out is None else out
    _launch("norm.cu", "rms_norm_f32", (rows,), 256, (x, w, out, np.int32(N), np.float32(eps)))
    return out


def gated_rms_norm(x, z, w, eps):
    """-> new f32[rows, N] = rms_norm(x, w, eps) * silu(z): x, z f32[rows, N]."""
    rows, N = x.shape
    out = buffer(x.shape)
    _launch("norm.cu", "gated_rms_norm_f32", (rows,), 256, (x, z, w, out, np.int32(N), np.float32(eps)))
    return out


def l2_norm(x, eps=1e-6):
    """x f32[rows, n] -> new f32 rows x / sqrt(sum(x^2) + eps)."""
    rows, N = x.shape
    x = cupy().ascontiguousarray(x)
    out = buffer(x.shape)
    _launch("norm.cu", "l2_norm_f32", (rows,), 256, (x, out, np.int32(N), np.float32(eps)))
    return out


def causal_conv(x, w, state, out):
    """As cpu.causal_conv: x f32[T, C]; w f32[C, K]; state f32[K - 1, C], updated; out f32[T, C]."""
    T, C = x.shape
    _launch("delta.cu", "causal_conv_f32", (math.ceil(C / 256),), 256,
            (x, w, state, out, np.int32(T), np.int32(C), np.int32(w.shape[1])))


def delta_gates(b, a, A, dt_bias):
    """As cpu.delta_gates: b, a f32[T, Hv]; A, dt_bias f32[Hv] -> (beta, g) new f32[T, Hv]."""
    beta, g = buffer(b.shape), buffer(b.shape)
    _launch("delta.cu", "delta_gates_f32", (math.ceil(b.size / 256),), 256,
            (b, a, A, dt_bias, beta, g, np.int32(b.size), np.int32(b.shape[1])))
    return beta, g


def gated_delta_rule(q, k, v, g, beta, S, out, tiled):
    """As cpu.gated_delta_rule: q, k f32[T, Hk, dk]; v f32[T, Hv, dv]; g, beta f32[T, Hv]; S f32[Hv,
    dk, dv], updated; out f32[T, Hv, dv]."""
    T, Hk, dk = q.shape
    Hv, dv = v.shape[1:]
    _launch("delta.cu", "gated_delta_rule_f32", (Hv, math.ceil(dv / 32)), 32,
            (q, k, v, g, beta, S, out, np.int32(T), np.int32(Hk), np.int32(Hv), np.int32(dk), np.int32(dv),
             np.int32(bool(tiled))))


def rope(x, cos, sin, start=0):
    """In place rotate-half RoPE of the first 2 * cos.shape[1] dims of each head of x f32[T, H, hd]
    (all of them, or a part: partial RoPE) at positions start..start+T-1; cos, sin f32[P, rot/2]
    tables from position 0 (model.rope_tables)."""
    T, H, hd = x.shape
    _launch("rope.cu", "rope_f32", (T * H,), 64,
            (x, cos, sin, np.int32(start), np.int32(H), np.int32(hd), np.int32(cos.shape[1])))


def kv_store(k, v, k_cache, v_cache, start, dtype):
    """This step's keys and values k, v f32[T, KV, hd] -> the caches [KV, cap, hd] ("f32", or "f16" /
    "bf16" bits as uint16, as cpu.kv_store) at positions start..start+T-1, rounded to nearest even."""
    T, KV, hd = k.shape
    _launch("attention.cu", f"kv_store_{dtype}", (T * KV,), 128,
            (k, v, _weights(k_cache, dtype), _weights(v_cache, dtype), np.int32(start), np.int32(KV),
             np.int32(k_cache.shape[1]), np.int32(hd)))


def attention(q, k_cache, v_cache, start, out, dtype):
    """Causal GQA attention as cpu.attention: q f32[T, H, hd] at positions start.., caches
    [KV, cap, hd] of `dtype` filled up to start + T - 1; writes out f32[T, H, hd]. The keys are split
    into S chunks so that about 4 blocks per SM run even for one query (decode); the chunks' partial
    softmax sums are combined by a second kernel."""
    T, H, hd = q.shape
    KV, cap, _ = k_cache.shape
    if hd > 256:
        raise ValueError(f"head_dim {hd} > 256 is not supported by attn_split_{dtype}")
    L = start + T
    S = max(1, min(math.ceil(L / 128), 4 * _sm_count() // (T * H)))
    chunk = math.ceil(L / S)
    S = math.ceil(L / chunk)
    part_o = buffer((T, H, S, hd))
    part_ml = buffer((T, H, S, 2))
    _launch("attention.cu", f"attn_split_{dtype}", (S, H, T), 128,
            (q, _weights(k_cache, dtype), _weights(v_cache, dtype), part_o, part_ml, np.int32(start), np.int32(H),
             np.int32(KV), np.int32(cap), np.int32(hd), np.int32(chunk), np.float32(1.0 / np.sqrt(hd))))
    _launch("attention.cu", "attn_combine_f32", (T * H,), 128, (part_o, part_ml, out, np.int32(S), np.int32(hd)))


def router_topk(logits, k, renorm):
    """logits f32[T, E] -> (idx int32[T, k], w f32[T, k]) on the device, as cpu.router_topk: softmax,
    the k most probable in descending order (ties: lower id first), optionally renormalised."""
    T, E = logits.shape
    idx, w = buffer((T, k), np.int32), buffer((T, k))
    _launch("router.cu", "router_topk_f32", (T,), 32, (logits, np.int32(E), np.int32(k), np.int32(bool(renorm)), idx, w),
            shared_mem=4 * E)
    return idx, w


def expert_rows(x, gate, up, down, dtype, idx, y):
    """y[t * k + j] = down_e @ (silu(gate_e @ x[t]) * (up_e @ x[t])), e = idx[t, j], in the fixed
    arithmetic that exact.expert_rows reproduces on the CPU; rows with idx < 0 are left as they are.
    x f32[T, D]; gate, up [E, I, D], down [E, D, I] (a layer's experts stacked; in a block format
    uint8 [E, I, row bytes], [E, D, row bytes], an expert's rows packed from the start of its
    [I, row bytes] or [D, row bytes], which may be larger: a slot of a GPU expert cache); dtype
    one format, or (gate's, up's, down's) with gate's = up's; idx int32[T, k] on the device;
    y f32[T * k, D]. One token: the decode GEMVs; more: grouped by expert."""
    T, D = x.shape
    E, I = gate.shape[:2]
    k = idx.shape[1]
    g, u, d = dtype if isinstance(dtype, tuple) else (dtype,) * 3
    if g != u or gate.shape != up.shape:
        raise ValueError(f"expert gate and up differ in format ({g} {list(gate.shape)}, {u} {list(up.shape)})")
    gate, up, down = _weights(gate, g), _weights(up, u), _weights(down, d)
    gs, ds = np.int64(gate[0].size), np.int64(down[0].size)  # elements of one expert's stacked part
    if T == 1:
        h = buffer((k, I))
        _launch("expert_gemv.cu", f"moe_gate_up_{g}", (math.ceil(I / 8), k), 256,
                (x, idx, gate, up, h, np.int32(D), np.int32(I), gs))
        _launch("expert_gemv.cu", f"moe_down_{d}", (math.ceil(D / 8), k), 256,
                (h, idx, down, y, np.int32(D), np.int32(I), ds))
        return
    n = T * k
    offsets, order = buffer(E + 1, np.int32), buffer(n, np.int32)
    _launch("expert_gemm.cu", "moe_sort_i32", (1,), 1024, (idx, np.int32(n), np.int32(E), offsets, order))
    h = buffer((n, I))
    groups = min(E, 65535)  # grid.y's limit (E may be a GPU cache's slots): block y does groups y, y + 65535, ...
    _launch("expert_gemm.cu", f"moe_group_gate_up_{g}", (math.ceil(I / 8), groups), 256,
            (x, order, offsets, gate, up, h, np.int32(k), np.int32(D), np.int32(I), np.int32(E), gs))
    _launch("expert_gemm.cu", f"moe_group_down_{d}", (math.ceil(D / 8), groups), 256,
            (h, order, offsets, down, y, np.int32(D), np.int32(I), np.int32(E), ds))


def expert_combine(y, w, out):
    """out[t] = ((0 + w[t, 0] y[t k]) + w[t, 1] y[t k + 1]) + ... (exact.combine): y f32[T * k, D],
    w f32[T, k], out f32[T, D], on the device."""
    T, k = w.shape
    D = out.shape[1]
    _launch("expert_gemm.cu", "moe_combine_f32", (math.ceil(D / 256), T), 256, (y, w, out, np.int32(k), np.int32(D)))


def expert_ffn(x, gate, up, down, dtype, out):
    """A dense SwiGLU MLP, as cpu.expert_ffn: out[t] = down @ (silu(gate @ x[t]) * (up @ x[t])).
    x f32[T, D]; gate, up [I, D]; down [D, I]; out f32[T, D]. Computed by the expert kernels as the
    only expert (id 0, weight 1) of a layer of one."""
    T = x.shape[0]
    y = buffer(x.shape)
    expert_rows(x, gate[None], up[None], down[None], dtype, cupy().zeros((T, 1), np.int32), y)
    expert_combine(y, cupy().ones((T, 1), np.float32), out)
