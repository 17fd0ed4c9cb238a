"""`ModelConfig` from a GGUF model's metadata (`{arch}.block_count`, `.expert_count`, rope, norms
...) and, where llama.cpp's converter records a switch only as the presence or shape of a tensor
(dense layers, q/k norms, biases, a tied lm_head), from its tensor infos.

GGUF architectures: `qwen3moe`, `qwen2moe`, `olmoe`, Mixtral, which llama.cpp writes as `llama`
with `llama.expert_count`, and Qwen3.5 / 3.6-MoE as `qwen35moe`: its linear-attention layers from
`attention.recurrent_layers`, their shapes from `ssm.*` (group_count Hk, time_step_rank Hv,
state_size dk, inner_size Hv dv, conv_kernel), RoPE on `rope.dimension_count` dims; its norms are
stored with the 1 of (1 + w) added and its value heads tiled (config.ModelConfig). The expert softmax weights are renormalised over the top-k as each
architecture's llama.cpp graph does (`{arch}.expert_weights_norm` overrides it where written).
"""

import numpy as np

from ..errors import ConfigError
from .config import ModelConfig

ARCHS = {"qwen3moe": "qwen3_moe", "qwen2moe": "qwen2_moe", "olmoe": "olmoe", "llama": "mixtral",
         "qwen35moe": "qwen3_5_moe"}
_NORM_TOPK = {"qwen3_moe": True, "qwen2_moe": False, "olmoe": False, "mixtral": True, "qwen3_5_moe": True}


def gguf_model_config(model):
    """A load.gguf.GGUF -> ModelConfig; ConfigError naming the file and the key on bad metadata."""
    meta, tensors, path = model.metadata, model.tensors, model.path
    arch = meta.get("general.architecture")
    model_type = ARCHS.get(arch)
    if model_type == "mixtral" and not meta.get("llama.expert_count"):
        model_type = None  # a dense llama
    if model_type is None:
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported (supported: qwen3moe, qwen2moe, "
                          "olmoe, qwen35moe, and llama with experts: Mixtral)")

    def get(key, kind=int, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ConfigError(f"{path}: missing metadata '{arch}.{key}'")
        if isinstance(value, list):  # per-layer values: lowmoe needs them all equal
            if len(set(value)) != 1:
                raise ConfigError(f"{path}: metadata '{arch}.{key}' differs between layers, which lowmoe does not support")
            value = value[0]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
            raise ConfigError(f"{path}: metadata '{arch}.{key}' must be a{'n integer' if kind is int else ' number'}, "
                              f"got {value!r}")
        # GGUF stores these numbers as f32: its shortest decimal is what config.json had (0.001,
        # not 0.0010000000474974513), and the same float32 the kernels compute with.
        return float(str(np.float32(value))) if kind is float else value

    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise ConfigError(f"{path}: rope scaling '{scaling}' is not supported (only none)")
    layers, hidden = get("block_count"), get("embedding_length")
    heads = get("attention.head_count")
    kv_heads = get("attention.head_count_kv", default=heads)
    head_dim = get("attention.key_length", default=hidden // heads)
    experts, top_k = get("expert_count"), get("expert_used_count")
    if heads % kv_heads or not 0 < top_k <= experts:
        raise ConfigError(f"{path}: inconsistent heads ({heads}/{kv_heads}) or experts ({top_k} of {experts})")
    sparse = tuple(f"blk.{i}.ffn_gate_inp.weight" in tensors for i in range(layers))
    if model_type in ("qwen3_moe", "qwen2_moe", "qwen3_5_moe"):
        expert_inter = get("expert_feed_forward_length")
        dense_inter = get("feed_forward_length", default=0) if all(sparse) else get("feed_forward_length")
    else:
        expert_inter = dense_inter = get("feed_forward_length")
    q_norm = next((tensors[f"blk.{i}.attn_q_norm.weight"] for i in range(layers) if f"blk.{i}.attn_q_norm.weight" in tensors),
                  None)  # an attention layer's (qwen35moe's first layers are linear)
    vocab = meta.get(f"{arch}.vocab_size", len(meta.get("tokenizer.ggml.tokens", [])))
    if not vocab:
        raise ConfigError(f"{path}: no vocabulary size (neither '{arch}.vocab_size' nor tokenizer.ggml.tokens)")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    hybrid = {}
    if model_type == "qwen3_5_moe":
        recurrent = meta.get(f"{arch}.attention.recurrent_layers")
        if not isinstance(recurrent, list) or len(recurrent) != layers:
            raise ConfigError(f"{path}: metadata '{arch}.attention.recurrent_layers' must list each of the {layers} layers")
        Hk, Hv, dk, inner = (get(f"ssm.{k}") for k in ("group_count", "time_step_rank", "state_size", "inner_size"))
        if Hv % Hk or inner % Hv:
            raise ConfigError(f"{path}: inconsistent ssm shapes (group_count {Hk}, time_step_rank {Hv}, inner_size {inner})")
        hybrid = dict(mixers=tuple("linear" if r else "attention" for r in recurrent),
                      linear_shape=(Hk, Hv, dk, inner // Hv, get("ssm.conv_kernel")),
                      rotary_dim=get("rope.dimension_count", default=head_dim), attn_gate=True, tiled_value_heads=True)
    return ModelConfig(
        model_type=model_type,
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", float),
        rope_theta=get("rope.freq_base", float, 10000.0),  # llama.cpp's default where the key is absent
        tie_word_embeddings="output.weight" not in tensors,
        num_experts=experts,
        top_k=top_k,
        norm_topk_prob=bool(meta.get(f"{arch}.expert_weights_norm", _NORM_TOPK[model_type])),
        expert_intermediate=expert_inter,
        dense_intermediate=dense_inter,
        sparse_layers=sparse,
        shared_expert_intermediate=get("expert_shared_feed_forward_length") if model_type in ("qwen2_moe", "qwen3_5_moe") else 0,
        qk_norm="none" if q_norm is None else "head" if q_norm.shape == (head_dim,) else "full",
        clip_qkv=get("attention.clamp_kqv", float, 0.0),
        qkv_bias=any(f"blk.{i}.attn_q.bias" in tensors for i in range(layers)),
        o_bias=any(f"blk.{i}.attn_output.bias" in tensors for i in range(layers)),
        eos_token_ids=() if eos is None else (eos,),
        **hybrid,
    )
