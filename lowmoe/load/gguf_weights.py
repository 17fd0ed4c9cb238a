"""The dense weights of a GGUF model (load.gguf.GGUF) as weights.Weights, matrices in their stored
format: f32; f16 / bf16 bits as uint16 [R, C]; a GGUF block type as its bytes uint8 [R, row bytes],
exactly the file's. Names are llama.cpp's (`token_embd`, `blk.N.attn_q`, `blk.N.ffn_gate_inp` ...).

llama.cpp's converter permutes the q and k rows of `llama` models (Mixtral) for its rotary
embedding, which pairs x[2i] with x[2i+1] where lowmoe (and transformers) pair x[i] with
x[i + hd/2]: those rows are put back in transformers' order here. A row is whole in every format,
so the same permutation of rows undoes it for block bytes.
"""

import numpy as np

from ..errors import CheckpointError
from .checkpoint import to_f32
from .weights import FFN, Attention, Layer, LinearAttention, Matrix, Weights


def _raw(model, name, shape):
    """The tensor `name`, checked to be `shape` (elements, outermost first; a [1, n] matrix may be
    stored as the vector [n]: llama.cpp's converter drops the 1 of Qwen2-MoE's shared-expert gate):
    f32 as float32, f16 / bf16 as uint16 bits, a block type as uint8 [..., row bytes] -> (array, format)."""
    info = model.tensors.get(name)
    if info is None:
        raise CheckpointError(f"{model.path}: missing tensor '{name}'")
    if info.shape != tuple(shape) and not (shape[0] == 1 and info.shape == tuple(shape[1:])):
        raise CheckpointError(f"{info.file}: tensor '{name}' has shape {list(info.shape)}, expected {list(shape)}")
    raw = model.read(name)
    if info.format == "f32":
        return raw.view(np.float32).reshape(shape), "f32"
    if info.format in ("f16", "bf16"):
        return raw.view(np.uint16).reshape(shape), info.format
    return raw.reshape(*shape[:-1], -1), info.format


def vector(model, name, n):
    """A norm weight or bias as float32[n] (GGUF keeps them f32; f16 / bf16 are widened)."""
    a, fmt = _raw(model, name, (n,))
    if fmt in ("f32", "f16", "bf16"):
        return a if fmt == "f32" else to_f32(a, fmt.upper())
    raise CheckpointError(f"{model.path}: tensor '{name}' is {fmt}; a vector must be f32, f16 or bf16")


def _unpermute(w, heads):
    """Rows of q or k [heads * hd, ...] from llama.cpp's interleaved rotary order back to halves."""
    return np.ascontiguousarray(w.reshape(heads, -1, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def matrix(model, name, shape, heads=None, bias=False):
    w, fmt = _raw(model, name, shape)
    if heads is not None:
        w = _unpermute(w, heads)
    b = vector(model, name.replace(".weight", ".bias"), shape[0]) if bias else None
    return Matrix(w, fmt, b)


def _attention(model, cfg, p):
    D, H, KV, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    llama = cfg.model_type == "mixtral"
    attn = Attention(  # a gated attention's q: per head its query, then its gate (2 hd rows)
        q=matrix(model, p + "attn_q.weight", ((2 if cfg.attn_gate else 1) * H * hd, D), H if llama else None, cfg.qkv_bias),
        k=matrix(model, p + "attn_k.weight", (KV * hd, D), KV if llama else None, cfg.qkv_bias),
        v=matrix(model, p + "attn_v.weight", (KV * hd, D), None, cfg.qkv_bias),
        o=matrix(model, p + "attn_output.weight", (D, H * hd), None, cfg.o_bias),
    )
    if cfg.qk_norm != "none":
        n = (hd, hd) if cfg.qk_norm == "head" else (H * hd, KV * hd)
        attn.q_norm, attn.k_norm = vector(model, p + "attn_q_norm.weight", n[0]), vector(model, p + "attn_k_norm.weight", n[1])
    return attn


def _linear_attention(model, cfg, p):
    """A qwen35moe Gated DeltaNet layer as llama.cpp's converter wrote it: in_proj_qkv as attn_qkv,
    in_proj_z as attn_gate, b and a as ssm_beta, ssm_alpha, A_log already as -exp(A_log) (ssm_a),
    dt_bias as ssm_dt.bias, the conv squeezed to [C, K]; value heads tiled (cfg.tiled_value_heads)."""
    D, (Hk, Hv, dk, dv, K) = cfg.hidden_size, cfg.linear_shape
    C = 2 * Hk * dk + Hv * dv
    conv, fmt = _raw(model, p + "ssm_conv1d.weight", (C, K))
    if fmt not in ("f32", "f16", "bf16"):
        raise CheckpointError(f"{model.path}: tensor '{p}ssm_conv1d.weight' is {fmt}; it must be f32, f16 or bf16")
    return LinearAttention(
        qkv=matrix(model, p + "attn_qkv.weight", (C, D)), z=matrix(model, p + "attn_gate.weight", (Hv * dv, D)),
        b=matrix(model, p + "ssm_beta.weight", (Hv, D)), a=matrix(model, p + "ssm_alpha.weight", (Hv, D)),
        conv=np.ascontiguousarray(conv if fmt == "f32" else to_f32(conv, fmt.upper())),
        dt_bias=vector(model, p + "ssm_dt.bias", Hv), A=vector(model, p + "ssm_a", Hv),
        norm=vector(model, p + "ssm_norm.weight", dv), out=matrix(model, p + "ssm_out.weight", (D, Hv * dv)))


def load_dense_gguf(model, cfg):
    """Every non-expert weight of `model` for the ModelConfig `cfg` (gguf_config.gguf_model_config),
    shapes checked."""
    D, V = cfg.hidden_size, cfg.vocab_size
    layers = []
    for i, mixer in enumerate(cfg.layer_mixers):
        p = f"blk.{i}."
        post = p + ("post_attention_norm.weight" if p + "post_attention_norm.weight" in model.tensors else "ffn_norm.weight")
        layer = Layer(input_norm=vector(model, p + "attn_norm.weight", D), post_norm=vector(model, post, D), attn=None)
        if mixer == "linear":
            layer.linear = _linear_attention(model, cfg, p)
        else:
            layer.attn = _attention(model, cfg, p)
        if cfg.sparse_layers[i]:
            layer.router = matrix(model, p + "ffn_gate_inp.weight", (cfg.num_experts, D))
            if cfg.shared_expert_intermediate:
                S = cfg.shared_expert_intermediate
                layer.shared = _ffn(model, p, "_shexp", S, D)
                layer.shared_gate = matrix(model, p + "ffn_gate_inp_shexp.weight", (1, D))
        else:
            layer.mlp = _ffn(model, p, "", cfg.dense_intermediate, D)
        layers.append(layer)
    embed = matrix(model, "token_embd.weight", (V, D))
    lm_head = embed if cfg.tie_word_embeddings else matrix(model, "output.weight", (V, D))
    return Weights(embed=embed, norm=vector(model, "output_norm.weight", D), lm_head=lm_head, layers=layers)


def _ffn(model, p, suffix, inter, hidden):
    """A SwiGLU MLP from blk.N.ffn_{gate,up,down}{suffix}.weight, its dtype one format or a tuple
    (gate's, up's, down's) where they differ, as cpu.expert_ffn takes them."""
    parts = [matrix(model, f"{p}ffn_{n}{suffix}.weight", s)
             for n, s in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter)))]
    dtypes = tuple(m.dtype for m in parts)
    return FFN(*(m.w for m in parts), dtypes[0] if len(set(dtypes)) == 1 else dtypes)
