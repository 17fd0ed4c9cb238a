"""A Hugging Face checkpoint as the tensors and metadata of a GGUF file, named as llama.cpp's
`convert_hf_to_gguf.py` names them (and as load/gguf_config.py and load/gguf_weights.py read
them back): `token_embd`, `blk.N.attn_q`, `blk.N.ffn_gate_exps` (the layer's experts stacked
[E, I, D]) ..., keys `{arch}.block_count`, `{arch}.expert_count` ...

Each tensor is planned with its shape and a function that reads it (float32) from the
checkpoint when it is written, so a whole model never sits in memory: the largest piece is one
layer's stacked experts of one projection. The converter's transforms are done here too:
- Mixtral (GGUF architecture `llama`): q and k rows permuted into llama.cpp's interleaved rotary
  order;
- Qwen3.5 / 3.6-MoE (`qwen35moe`): every RMSNorm weight but the DeltaNet's gated one stored as
  1 + w, A_log as -exp(A_log), the conv squeezed to [C, K], and the value heads of the DeltaNet
  tensors reordered from transformers' grouping (the r = Hv / Hk heads of key head 0, then of key
  head 1 ...) to llama.cpp's tiling (value head 0 of every key head, then head 1 ...). Its MTP
  layers are left out, as lowmoe does not run them.
"""

from dataclasses import dataclass

import numpy as np

from ..errors import InputError

ARCH = {"qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "olmoe": "olmoe", "mixtral": "llama", "qwen3_5_moe": "qwen35moe"}


@dataclass
class Planned:
    name: str  # GGUF tensor name
    shape: tuple  # elements, outermost first
    load: object  # () -> float32 ndarray of `shape`


def _permute(w, heads):
    """q or k rows [heads * hd, D] from halves to llama.cpp's interleaved rotary order (the inverse
    of gguf_weights._unpermute)."""
    return np.ascontiguousarray(w.reshape(heads, 2, -1, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _tile_heads(w, cfg, axis=0, width=None):
    """Value heads along `axis` of w (each `width` wide, default dv) from grouped to tiled order."""
    Hk, Hv, _, dv, _ = cfg.linear_shape
    width = dv if width is None else width
    w = np.moveaxis(w, axis, 0)
    shape = w.shape
    w = w.reshape(Hk, Hv // Hk, width, *shape[1:]).swapaxes(0, 1).reshape(shape)
    return np.ascontiguousarray(np.moveaxis(w, 0, axis))


def _tile_qkv(w, cfg):
    """in_proj_qkv's rows [q | k | v] (or the conv's channels) with the v part's heads tiled."""
    Hk, _, dk, _, _ = cfg.linear_shape
    qk = 2 * Hk * dk
    return np.concatenate([w[:qk], _tile_heads(w[qk:], cfg)])


def _linear_attention(add, cfg, a, b):
    """A Gated DeltaNet layer's tensors (prefix a: HF's linear_attn., b: blk.N.)."""
    Hk, Hv, dk, dv, K = cfg.linear_shape
    tile = Hk != Hv

    def heads(fn):
        return fn if tile else None

    add(b + "attn_qkv.weight", a + "in_proj_qkv.weight", heads(lambda w: _tile_qkv(w, cfg)))
    add(b + "attn_gate.weight", a + "in_proj_z.weight", heads(lambda w: _tile_heads(w, cfg)))
    add(b + "ssm_beta.weight", a + "in_proj_b.weight", heads(lambda w: _tile_heads(w, cfg, width=1)))
    add(b + "ssm_alpha.weight", a + "in_proj_a.weight", heads(lambda w: _tile_heads(w, cfg, width=1)))
    add(b + "ssm_a", a + "A_log", lambda w: -np.exp(_tile_heads(w, cfg, width=1) if tile else w))
    add(b + "ssm_dt.bias", a + "dt_bias", heads(lambda w: _tile_heads(w, cfg, width=1)))
    add(b + "ssm_conv1d.weight", a + "conv1d.weight", lambda w: _tile_qkv(w[:, 0], cfg) if tile else w[:, 0],
        (2 * Hk * dk + Hv * dv, K))
    add(b + "ssm_norm.weight", a + "norm.weight")
    add(b + "ssm_out.weight", a + "out_proj.weight", heads(lambda w: _tile_heads(w, cfg, axis=1)))


def plan(ckpt, cfg):
    """[Planned] of the checkpoint `ckpt` (load.checkpoint.Checkpoint) with ModelConfig `cfg`, in the
    order the file will hold them."""
    if cfg.model_type not in ARCH:
        raise InputError(f"{ckpt.model_dir}: lowmoe quantize does not support model_type '{cfg.model_type}' yet "
                         f"(supported: {', '.join(ARCH)})")
    out = []

    def add(gguf_name, hf_name, transform=None, shape=None):
        """shape: where the transform changes it (the conv's squeeze)."""
        def load():
            w = ckpt.read_f32(hf_name)
            return w if transform is None else transform(w)

        out.append(Planned(gguf_name, shape or ckpt.info(hf_name).shape, load))

    def norm(gguf_name, hf_name):
        add(gguf_name, hf_name, (lambda w: np.float32(1) + w) if cfg.norm_offset else None)

    p0, llama = cfg.prefix, cfg.model_type == "mixtral"
    add("token_embd.weight", p0 + "embed_tokens.weight")
    for i, mixer in enumerate(cfg.layer_mixers):
        p, b = f"{p0}layers.{i}.", f"blk.{i}."
        norm(b + "attn_norm.weight", p + "input_layernorm.weight")
        if mixer == "linear":
            _linear_attention(add, cfg, p + "linear_attn.", b)
        else:
            a = p + "self_attn."
            heads = {"q": cfg.num_heads, "k": cfg.num_kv_heads}
            for x, gguf in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output")):
                perm = (lambda w, h=heads[x]: _permute(w, h)) if llama and x in heads else None
                add(f"{b}{gguf}.weight", f"{a}{x}_proj.weight", perm)
                if (cfg.qkv_bias and x != "o") or (cfg.o_bias and x == "o"):
                    add(f"{b}{gguf}.bias", f"{a}{x}_proj.bias", perm)
            if cfg.qk_norm == "head":
                norm(b + "attn_q_norm.weight", a + "q_norm.weight")
                norm(b + "attn_k_norm.weight", a + "k_norm.weight")
            elif cfg.qk_norm == "full":
                add(b + "attn_q_norm.weight", a + "q_norm.weight")
                add(b + "attn_k_norm.weight", a + "k_norm.weight")
        norm(b + ("post_attention_norm.weight" if cfg.norm_offset else "ffn_norm.weight"), p + "post_attention_layernorm.weight")
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
    norm("output_norm.weight", p0 + "norm.weight")
    if "lm_head.weight" in ckpt and not cfg.tie_word_embeddings:
        add("output.weight", "lm_head.weight")
    return out


def add_metadata(writer, cfg, raw, name):
    """The model's `{arch}.*` keys as llama.cpp's converter writes them; `raw`: config.json's dict."""
    arch = ARCH[cfg.model_type]
    raw = raw.get("text_config", raw)  # a multimodal Qwen3.5 nests its text model's
    w = writer
    w.add_name(name)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(int(raw.get("max_position_embeddings", 4096)))
    w.add_embedding_length(cfg.hidden_size)
    if arch != "qwen35moe":  # every layer is sparse there: the converter writes no dense width
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
    if arch == "qwen35moe":
        Hk, Hv, dk, dv, K = cfg.linear_shape
        w.add_ssm_conv_kernel(K)
        w.add_ssm_state_size(dk)
        w.add_ssm_group_count(Hk)
        w.add_ssm_time_step_rank(Hv)
        w.add_ssm_inner_size(Hv * dv)
        w.add_array(f"{arch}.attention.recurrent_layers", [m == "linear" for m in cfg.layer_mixers])  # no add_ in gguf 0.19
        w.add_full_attention_interval(int(raw.get("full_attention_interval", 4)))
        w.add_rope_dimension_count(cfg.rotary_dim)
        rope = raw.get("rope_parameters") or {}
        w.add_rope_dimension_sections((list(rope.get("mrope_section", [11, 11, 10])) + [0])[:4])
