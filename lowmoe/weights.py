"""Loading a checkpoint into per-layer weight records.

Dense weights (attention, norms, router, dense MLPs, shared expert, embeddings) are converted to
float32 once: they are read every token and are a small part of an MoE model. Routed experts keep
their stored dtype (float32, or uint16 bits of F16/BF16) and are handed to `experts.py`, which
owns where they live.
"""

from dataclasses import dataclass

import numpy as np

from .checkpoint import Checkpoint
from .errors import CheckpointError

KERNEL_DTYPE = {"F32": "f32", "F16": "f16", "BF16": "bf16"}


@dataclass
class Attention:
    q: np.ndarray  # [H*hd, D]
    k: np.ndarray  # [KV*hd, D]
    v: np.ndarray  # [KV*hd, D]
    o: np.ndarray  # [D, H*hd]
    q_bias: np.ndarray = None
    k_bias: np.ndarray = None
    v_bias: np.ndarray = None
    o_bias: np.ndarray = None
    q_norm: np.ndarray = None  # [hd] (per head) or [H*hd] (full width)
    k_norm: np.ndarray = None  # [hd] or [KV*hd]


@dataclass
class Layer:
    input_norm: np.ndarray  # [D]
    post_norm: np.ndarray  # [D]
    attn: Attention
    router: np.ndarray = None  # [E, D] on MoE layers
    mlp: tuple = None  # (gate [I, D], up [I, D], down [D, I]) f32 on dense layers
    shared: tuple = None  # (gate, up, down) f32 of the Qwen2-MoE shared expert
    shared_gate: np.ndarray = None  # [1, D]


@dataclass
class Weights:
    embed: np.ndarray  # [V, D]
    norm: np.ndarray  # [D]
    lm_head: np.ndarray  # [V, D]; the same array as embed when tied
    layers: list


def _mlp(ckpt, prefix, inter, hidden):
    return (
        ckpt.read_f32(prefix + "gate_proj.weight", (inter, hidden)),
        ckpt.read_f32(prefix + "up_proj.weight", (inter, hidden)),
        ckpt.read_f32(prefix + "down_proj.weight", (hidden, inter)),
    )


def _attention(ckpt, cfg, p):
    D, H, KV, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    a = Attention(
        q=ckpt.read_f32(p + "q_proj.weight", (H * hd, D)),
        k=ckpt.read_f32(p + "k_proj.weight", (KV * hd, D)),
        v=ckpt.read_f32(p + "v_proj.weight", (KV * hd, D)),
        o=ckpt.read_f32(p + "o_proj.weight", (D, H * hd)),
    )
    if cfg.qkv_bias:
        a.q_bias = ckpt.read_f32(p + "q_proj.bias", (H * hd,))
        a.k_bias = ckpt.read_f32(p + "k_proj.bias", (KV * hd,))
        a.v_bias = ckpt.read_f32(p + "v_proj.bias", (KV * hd,))
    if cfg.o_bias:
        a.o_bias = ckpt.read_f32(p + "o_proj.bias", (D,))
    if cfg.qk_norm == "head":
        a.q_norm = ckpt.read_f32(p + "q_norm.weight", (hd,))
        a.k_norm = ckpt.read_f32(p + "k_norm.weight", (hd,))
    elif cfg.qk_norm == "full":
        a.q_norm = ckpt.read_f32(p + "q_norm.weight", (H * hd,))
        a.k_norm = ckpt.read_f32(p + "k_norm.weight", (KV * hd,))
    return a


def load_dense(ckpt: Checkpoint, cfg):
    """Every non-expert weight, float32, shapes checked against the config."""
    D, V = cfg.hidden_size, cfg.vocab_size
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        layer = Layer(
            input_norm=ckpt.read_f32(p + "input_layernorm.weight", (D,)),
            post_norm=ckpt.read_f32(p + "post_attention_layernorm.weight", (D,)),
            attn=_attention(ckpt, cfg, p + "self_attn."),
        )
        if cfg.sparse_layers[i]:
            layer.router = ckpt.read_f32(f"{p}{cfg.moe_prefix}.gate.weight", (cfg.num_experts, D))
            if cfg.shared_expert_intermediate:
                layer.shared = _mlp(ckpt, p + "mlp.shared_expert.", cfg.shared_expert_intermediate, D)
                layer.shared_gate = ckpt.read_f32(p + "mlp.shared_expert_gate.weight", (1, D))
        else:
            layer.mlp = _mlp(ckpt, p + "mlp.", cfg.dense_intermediate, D)
        layers.append(layer)
    embed = ckpt.read_f32("model.embed_tokens.weight", (V, D))
    if cfg.tie_word_embeddings and "lm_head.weight" not in ckpt:
        lm_head = embed
    else:
        lm_head = ckpt.read_f32("lm_head.weight", (V, D))
    return Weights(embed=embed, norm=ckpt.read_f32("model.norm.weight", (D,)), lm_head=lm_head, layers=layers)


def expert_infos(ckpt: Checkpoint, cfg, layer, expert):
    """TensorInfo of (gate, up, down) of one routed expert, shapes and dtypes checked."""
    D, I = cfg.hidden_size, cfg.expert_intermediate
    g, u, d = cfg.expert_tensor_names(layer, expert)
    infos = (ckpt.info(g, (I, D)), ckpt.info(u, (I, D)), ckpt.info(d, (D, I)))
    if len({t.dtype for t in infos}) != 1:
        mixed = ", ".join(f"{t.name}: {t.dtype}" for t in infos)
        raise CheckpointError(f"{infos[0].file}: one expert's weights mix dtypes ({mixed})")
    return infos
