"""A Hugging Face checkpoint as the tensors and metadata of a GGUF file, named as llama.cpp's
`convert_hf_to_gguf.py` names them (and as load/gguf_config.py and load/gguf_weights.py read
them back): `token_embd`, `blk.N.attn_q`, `blk.N.ffn_gate_exps` (the layer's experts stacked
[E, I, D]) ..., keys `{arch}.block_count`, `{arch}.expert_count` ...

Each tensor is planned with its shape and a function that reads it (float32) from the
checkpoint when it is written, so a whole model never sits in memory: the largest piece is one
layer's stacked experts of one projection. Mixtral (GGUF architecture `llama`) has its q and k
rows permuted into llama.cpp's interleaved rotary order, as its converter does.
"""

from dataclasses import dataclass

import numpy as np

from ..errors import InputError

ARCH = {"qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "olmoe": "olmoe", "mixtral": "llama"}


@dataclass
class Planned:
    name: str  # GGUF tensor name
    shape: tuple  # elements, outermost first
    load: object  # () -> float32 ndarray of `shape`


def _permute(w, heads):
    """q or k rows [heads * hd, D] from halves to llama.cpp's interleaved rotary order (the inverse
    of gguf_weights._unpermute)."""
    return np.ascontiguousarray(w.reshape(heads, 2, -1, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def plan(ckpt, cfg):
    """[Planned] of the checkpoint `ckpt` (load.checkpoint.Checkpoint) with ModelConfig `cfg`, in the
    order the file will hold them."""
    if cfg.model_type not in ARCH:
        raise InputError(f"{ckpt.model_dir}: lowmoe quantize does not support model_type '{cfg.model_type}' yet "
                         f"(supported: {', '.join(ARCH)})")
    out = []

    def add(gguf_name, hf_name, transform=None):
        shape = ckpt.info(hf_name).shape

        def load():
            w = ckpt.read_f32(hf_name)
            return w if transform is None else transform(w)

        out.append(Planned(gguf_name, shape, load))

    p0, llama = cfg.prefix, cfg.model_type == "mixtral"
    add("token_embd.weight", p0 + "embed_tokens.weight")
    for i in range(cfg.num_layers):
        p, b = f"{p0}layers.{i}.", f"blk.{i}."
        add(b + "attn_norm.weight", p + "input_layernorm.weight")
        a = p + "self_attn."
        heads = {"q": cfg.num_heads, "k": cfg.num_kv_heads}
        for x, gguf in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output")):
            perm = (lambda w, h=heads[x]: _permute(w, h)) if llama and x in heads else None
            add(f"{b}{gguf}.weight", f"{a}{x}_proj.weight", perm)
            if (cfg.qkv_bias and x != "o") or (cfg.o_bias and x == "o"):
                add(f"{b}{gguf}.bias", f"{a}{x}_proj.bias", perm)
        if cfg.qk_norm != "none":
            add(b + "attn_q_norm.weight", a + "q_norm.weight")
            add(b + "attn_k_norm.weight", a + "k_norm.weight")
        add(b + "ffn_norm.weight", p + "post_attention_layernorm.weight")
        if cfg.sparse_layers[i]:
            m = f"{p}{cfg.moe_prefix}."
            add(b + "ffn_gate_inp.weight", m + "gate.weight")
            for role, gguf in enumerate(("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")):
                names = [cfg.expert_tensor_names(i, e)[role] for e in range(cfg.num_experts)]
                shape = (cfg.num_experts, *ckpt.info(names[0]).shape)
                out.append(Planned(f"{b}{gguf}.weight", shape,
                                   lambda names=names: np.stack([ckpt.read_f32(n) for n in names])))
            if cfg.shared_expert_intermediate:
                for x in ("gate", "up", "down"):
                    add(f"{b}ffn_{x}_shexp.weight", f"{m}shared_expert.{x}_proj.weight")
                add(b + "ffn_gate_inp_shexp.weight", m + "shared_expert_gate.weight")
        else:
            for x in ("gate", "up", "down"):
                add(f"{b}ffn_{x}.weight", f"{p}mlp.{x}_proj.weight")
    add("output_norm.weight", p0 + "norm.weight")
    if "lm_head.weight" in ckpt and not cfg.tie_word_embeddings:
        add("output.weight", "lm_head.weight")
    return out


def add_metadata(writer, cfg, raw, name):
    """The model's `{arch}.*` keys as llama.cpp's converter writes them; `raw`: config.json's dict."""
    arch = ARCH[cfg.model_type]
    w = writer
    w.add_name(name)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(int(raw.get("max_position_embeddings", 4096)))
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.expert_intermediate if arch == "llama" else cfg.dense_intermediate)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.top_k)
    w.add_expert_weights_norm(cfg.norm_topk_prob)
    if arch != "llama" and arch != "olmoe":
        w.add_expert_feed_forward_length(cfg.expert_intermediate)
    if cfg.shared_expert_intermediate:
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate)
    w.add_vocab_size(cfg.vocab_size)  # the converter writes it for llama only; lowmoe reads it where no tokenizer is
    if arch == "llama":
        w.add_rope_dimension_count(cfg.head_dim)
    if cfg.clip_qkv:
        w.add_clamp_kqv(cfg.clip_qkv)
