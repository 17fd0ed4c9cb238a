"""Loading a checkpoint into per-layer weight records.

Matrices keep their stored dtype (float32, uint16 bits of F16/BF16, or a GGUF block format's bytes,
load/gguf_weights.py): the kernels convert in registers, so a bf16 model streams half the bytes per
token and holds half the memory. Vectors (norm weights, biases) are float32. Routed experts are not
loaded here: the expert tier (tier/) owns where they live.
"""

from dataclasses import dataclass, fields, replace

import numpy as np

from .checkpoint import Checkpoint
from ..errors import CheckpointError

KERNEL_DTYPE = {"F32": "f32", "F16": "f16", "BF16": "bf16"}


@dataclass
class Matrix:
    w: np.ndarray  # [out, in] as stored (a block format: uint8 [out, row bytes])
    dtype: str  # kernel dtype: "f32", "f16", "bf16" or a GGUF format ("q8_0" ... "q6_k")
    bias: np.ndarray = None  # f32[out]


@dataclass
class FFN:
    """SwiGLU MLP: down @ (silu(gate @ x) * (up @ x))."""

    gate: np.ndarray  # [I, D] as stored
    up: np.ndarray  # [I, D]
    down: np.ndarray  # [D, I]
    dtype: object  # one kernel dtype, or a tuple (gate's, up's, down's) where they differ


@dataclass
class Attention:
    q: Matrix  # [H*hd, D]
    k: Matrix  # [KV*hd, D]
    v: Matrix  # [KV*hd, D]
    o: Matrix  # [D, H*hd]
    q_norm: np.ndarray = None  # [hd] (per head) or [H*hd] (full width)
    k_norm: np.ndarray = None  # [hd] or [KV*hd]


@dataclass
class LinearAttention:
    """A Gated DeltaNet token mixer (Qwen3.5 / 3.6): Hk key heads of dk, Hv value heads of dv, C = 2 Hk
    dk + Hv dv channels of q | k | v, a causal depthwise conv of K taps over them."""

    qkv: Matrix  # [C, D]
    z: Matrix  # [Hv*dv, D]: the output gate
    b: Matrix  # [Hv, D]: beta = sigmoid(b x)
    a: Matrix  # [Hv, D]: the decay's input
    conv: np.ndarray  # f32[C, K]
    dt_bias: np.ndarray  # f32[Hv]
    A: np.ndarray  # f32[Hv] = -exp(A_log): g = A softplus(a x + dt_bias)
    norm: np.ndarray  # f32[dv]: the gated RMSNorm of each value head (plain weight)
    out: Matrix  # [D, Hv*dv]


@dataclass
class Layer:
    input_norm: np.ndarray  # [D]
    post_norm: np.ndarray  # [D]
    attn: Attention  # None on a linear-attention layer
    router: Matrix = None  # [E, D] on MoE layers
    mlp: FFN = None  # dense layers
    shared: FFN = None  # the Qwen2-MoE shared expert
    shared_gate: Matrix = None  # [1, D]
    pre_gate: Matrix = None  # [E of the next MoE layer, D]: a pre-gate head shipped in the checkpoint
    linear: LinearAttention = None  # the token mixer of a linear-attention layer


@dataclass
class Weights:
    embed: Matrix  # [V, D]
    norm: np.ndarray  # [D]
    lm_head: Matrix  # [V, D]; the embedding itself when tied
    layers: list


def _matrix(ckpt, name, shape, bias=False):
    raw, dtype = ckpt.read(name, shape)
    b = ckpt.read_f32(name.replace(".weight", ".bias"), shape[:1]) if bias else None
    return Matrix(raw, KERNEL_DTYPE[dtype], b)


def ffn(ckpt, names, inter, hidden):
    """FFN from the (gate, up, down) tensor names, shapes and dtypes checked."""
    shapes = ((inter, hidden), (inter, hidden), (hidden, inter))
    parts = [ckpt.read(n, s) for n, s in zip(names, shapes)]
    if len({dtype for _, dtype in parts}) != 1:
        mixed = ", ".join(f"{n}: {dtype}" for n, (_, dtype) in zip(names, parts))
        raise CheckpointError(f"{ckpt.info(names[0]).file}: one MLP's weights mix dtypes ({mixed})")
    return FFN(*(raw for raw, _ in parts), KERNEL_DTYPE[parts[0][1]])


def _mlp(ckpt, prefix, inter, hidden):
    return ffn(ckpt, [prefix + n + ".weight" for n in ("gate_proj", "up_proj", "down_proj")], inter, hidden)


def _norm(ckpt, cfg, name, n):
    """A norm weight f32[n]; with cfg.norm_offset the (1 + w) it scales by (Qwen3.5), as transformers
    adds it in f32."""
    w = ckpt.read_f32(name, (n,))
    return np.float32(1.0) + w if cfg.norm_offset else w


def _grouped_projections(ckpt, cfg, p):
    """Qwen3-Next's in_proj_qkvz [Hk (2 dk + 2 r dv), D] and in_proj_ba [Hk 2 r, D] (r = Hv / Hk), rows
    grouped per key head (its q, k, the v of its r value heads, their z; their b, a), as the Matrix
    records of Qwen3.5's split layout: qkv [all q | all k | all v], z, b, a."""
    D, (Hk, Hv, dk, dv, _) = cfg.hidden_size, cfg.linear_shape
    r = Hv // Hk
    qkvz, dtype = ckpt.read(p + "in_proj_qkvz.weight", (Hk * (2 * dk + 2 * r * dv), D))
    ba, ba_dtype = ckpt.read(p + "in_proj_ba.weight", (Hk * 2 * r, D))
    qkvz, ba = qkvz.reshape(Hk, 2 * dk + 2 * r * dv, -1), ba.reshape(Hk, 2 * r, -1)
    parts = np.cumsum([0, dk, dk, r * dv, r * dv])
    q, k, v, z = (qkvz[:, a:b].reshape(-1, qkvz.shape[2]) for a, b in zip(parts, parts[1:]))

    def matrix(rows, kind):
        return Matrix(np.ascontiguousarray(rows), KERNEL_DTYPE[kind])

    return (matrix(np.concatenate([q, k, v]), dtype), matrix(z, dtype), matrix(ba[:, :r].reshape(Hv, -1), ba_dtype),
            matrix(ba[:, r:].reshape(Hv, -1), ba_dtype))


def _linear_attention(ckpt, cfg, p):
    D, (Hk, Hv, dk, dv, K) = cfg.hidden_size, cfg.linear_shape
    C = 2 * Hk * dk + Hv * dv
    conv = ckpt.read_f32(p + "conv1d.weight", (C, 1, K)).reshape(C, K)
    if cfg.model_type == "qwen3_next":
        qkv, z, b, a = _grouped_projections(ckpt, cfg, p)
    else:
        qkv, z = _matrix(ckpt, p + "in_proj_qkv.weight", (C, D)), _matrix(ckpt, p + "in_proj_z.weight", (Hv * dv, D))
        b, a = _matrix(ckpt, p + "in_proj_b.weight", (Hv, D)), _matrix(ckpt, p + "in_proj_a.weight", (Hv, D))
    return LinearAttention(qkv=qkv, z=z, b=b, a=a, conv=np.ascontiguousarray(conv), dt_bias=ckpt.read_f32(p + "dt_bias", (Hv,)),
                           A=-np.exp(ckpt.read_f32(p + "A_log", (Hv,))), norm=ckpt.read_f32(p + "norm.weight", (dv,)),
                           out=_matrix(ckpt, p + "out_proj.weight", (D, Hv * dv)))


def _attention(ckpt, cfg, p):
    D, H, KV, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    a = Attention(  # q_proj of a gated attention: per head its query, then its gate (2 hd rows)
        q=_matrix(ckpt, p + "q_proj.weight", ((2 if cfg.attn_gate else 1) * H * hd, D), cfg.qkv_bias),
        k=_matrix(ckpt, p + "k_proj.weight", (KV * hd, D), cfg.qkv_bias),
        v=_matrix(ckpt, p + "v_proj.weight", (KV * hd, D), cfg.qkv_bias),
        o=_matrix(ckpt, p + "o_proj.weight", (D, H * hd), cfg.o_bias),
    )
    if cfg.qk_norm == "head":
        a.q_norm = _norm(ckpt, cfg, p + "q_norm.weight", hd)
        a.k_norm = _norm(ckpt, cfg, p + "k_norm.weight", hd)
    elif cfg.qk_norm == "full":
        a.q_norm = ckpt.read_f32(p + "q_norm.weight", (H * hd,))
        a.k_norm = ckpt.read_f32(p + "k_norm.weight", (KV * hd,))
    return a


def load_dense(ckpt: Checkpoint, cfg):
    """Every non-expert weight, float32, shapes checked against the config."""
    D, V = cfg.hidden_size, cfg.vocab_size
    layers = []
    for i, mixer in enumerate(cfg.layer_mixers):
        p = f"{cfg.prefix}layers.{i}."
        layer = Layer(
            input_norm=_norm(ckpt, cfg, p + "input_layernorm.weight", D),
            post_norm=_norm(ckpt, cfg, p + "post_attention_layernorm.weight", D),
            attn=_attention(ckpt, cfg, p + "self_attn.") if mixer == "attention" else None,
            linear=_linear_attention(ckpt, cfg, p + "linear_attn.") if mixer == "linear" else None,
        )
        if cfg.sparse_layers[i]:
            layer.router = _matrix(ckpt, f"{p}{cfg.moe_prefix}.gate.weight", (cfg.num_experts, D))
            head = p + "mlp.pre_gate.weight"
            if head in ckpt:
                if i == cfg.moe_layers[-1]:
                    raise CheckpointError(f"{ckpt.info(head).file}: '{head}' on the last MoE layer: no layer to predict")
                layer.pre_gate = _matrix(ckpt, head, (cfg.num_experts, D))
            if cfg.shared_expert_intermediate:
                layer.shared = _mlp(ckpt, p + "mlp.shared_expert.", cfg.shared_expert_intermediate, D)
                layer.shared_gate = _matrix(ckpt, p + "mlp.shared_expert_gate.weight", (1, D))
        else:
            layer.mlp = _mlp(ckpt, p + "mlp.", cfg.dense_intermediate, D)
        layers.append(layer)
    embed = _matrix(ckpt, f"{cfg.prefix}embed_tokens.weight", (V, D))
    if cfg.tie_word_embeddings and "lm_head.weight" not in ckpt:
        lm_head = embed
    else:
        lm_head = _matrix(ckpt, "lm_head.weight", (V, D))
    return Weights(embed=embed, norm=_norm(ckpt, cfg, f"{cfg.prefix}norm.weight", D), lm_head=lm_head, layers=layers)


def to_device(w, put, memo=None):
    """A copy of the weights record `w` (Weights, Layer, Attention, FFN, Matrix, or one of their
    arrays) with every array moved by `put` (a backend's to_device). Arrays and records shared by
    two fields (a tied embedding) move once. Matrices without a bias get zeros, as the GPU's linear
    kernel always adds one (x + 0 is exact). Pre-gate heads stay behind: only the predictors, on
    the host, read them."""
    memo = {} if memo is None else memo
    if w is None or isinstance(w, (str, tuple)):  # a dtype, or (gate's, up's, down's)
        return w
    if isinstance(w, list):
        return [to_device(x, put, memo) for x in w]
    if id(w) not in memo:
        if isinstance(w, np.ndarray):
            memo[id(w)] = put(w)
        elif isinstance(w, Matrix):
            bias = w.bias if w.bias is not None else np.zeros(w.w.shape[0], np.float32)
            memo[id(w)] = Matrix(put(w.w), w.dtype, put(bias))
        else:
            memo[id(w)] = replace(w, **{f.name: None if f.name == "pre_gate" else to_device(getattr(w, f.name), put, memo)
                                        for f in fields(w)})
    return memo[id(w)]


def device_bytes(dense):
    """Bytes to_device allocates for the dense weights: every Matrix with an f32 bias (zeros when it
    has none), vectors f32, the shared embedding once, pre-gate heads not at all."""
    seen = set()

    def size(a):
        if a is None or id(a) in seen:
            return 0
        seen.add(id(a))
        return a.nbytes

    def matrix(m):
        if m is None or id(m) in seen:
            return 0
        seen.add(id(m))
        return m.w.nbytes + 4 * m.w.shape[0]

    def ffn(f):
        return 0 if f is None else f.gate.nbytes + f.up.nbytes + f.down.nbytes

    total = matrix(dense.embed) + size(dense.norm) + matrix(dense.lm_head)
    for layer in dense.layers:
        total += size(layer.input_norm) + size(layer.post_norm) + ffn(layer.mlp) + ffn(layer.shared)
        total += sum(matrix(m) for m in (layer.router, layer.shared_gate))
        a, L = layer.attn, layer.linear
        if a is not None:
            total += size(a.q_norm) + size(a.k_norm) + sum(matrix(m) for m in (a.q, a.k, a.v, a.o))
        if L is not None:
            total += sum(size(v) for v in (L.conv, L.dt_bias, L.A, L.norm)) + sum(matrix(m) for m in (L.qkv, L.z, L.b, L.a, L.out))
    return total
