"""A tiny random Qwen3-MoE checkpoint written with safetensors alone (no transformers), for tests
that need a valid model folder to corrupt or to run through the CLI."""

import json
import os

import numpy as np
from safetensors.numpy import save_file

CONFIG = {
    "model_type": "qwen3_moe",
    "vocab_size": 50,
    "hidden_size": 16,
    "intermediate_size": 24,
    "moe_intermediate_size": 8,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 4,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "eos_token_id": 1,
}


def tensors(cfg, seed=0):
    rng = np.random.default_rng(seed)
    D, V, hd = cfg["hidden_size"], cfg["vocab_size"], cfg["head_dim"]
    H, KV, I, E = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["moe_intermediate_size"], cfg["num_experts"]

    def w(*shape):
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    out = {"model.embed_tokens.weight": w(V, D), "model.norm.weight": 1 + w(D), "lm_head.weight": w(V, D)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": 1 + w(D),
            p + "post_attention_layernorm.weight": 1 + w(D),
            p + "self_attn.q_proj.weight": w(H * hd, D),
            p + "self_attn.k_proj.weight": w(KV * hd, D),
            p + "self_attn.v_proj.weight": w(KV * hd, D),
            p + "self_attn.o_proj.weight": w(D, H * hd),
            p + "self_attn.q_norm.weight": 1 + w(hd),
            p + "self_attn.k_norm.weight": 1 + w(hd),
            p + "mlp.gate.weight": w(E, D),
        })
        for e in range(E):
            q = f"{p}mlp.experts.{e}."
            out.update({q + "gate_proj.weight": w(I, D), q + "up_proj.weight": w(I, D), q + "down_proj.weight": w(D, I)})
    return out


def write_tiny_model(path, config_overrides=None, tensor_overrides=None, drop=()):
    """Writes config.json and model.safetensors into `path`; returns `path`."""
    os.makedirs(path, exist_ok=True)
    cfg = dict(CONFIG, **(config_overrides or {}))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    ts = tensors(CONFIG)
    ts.update(tensor_overrides or {})
    for name in drop:
        del ts[name]
    save_file(ts, os.path.join(path, "model.safetensors"))
    return path
