"""Write tiny random MoE checkpoints with transformers itself, for lowmoe's parity tests.

Each variant is built as `XForCausalLM(config)` under a fixed `torch.manual_seed`, every parameter is
then re-drawn (see `_randomize`) so that norms and biases are not the trivial ones/zeros that would
hide a missing norm weight or bias, and the model is written with `save_pretrained` into
`OUTDIR/<variant>/`.

    python tools/make_test_models.py OUTDIR [--only NAME ...]

or, from Python (tools/ is not a package, so import this file by path):

    make_models(outdir, names=None) -> {name: path}

Weights are scaled well above the usual std 0.02 so that next-token distributions are peaked and
router decisions are decisive: greedy ties and near-tied expert choices would otherwise flip on
1e-7 differences and make token-exact parity tests flaky.

Some variants are rewritten afterwards to look like older checkpoints: `rope_theta` at the top level
of config.json instead of inside `rope_parameters`, and `torch_dtype` instead of `dtype`.
transformers still reads those, and `make_models` checks that it reads the intended rope_theta.
"""

import argparse
import json
import os
import sys

# Every variant: (model_type, dtype, seed, config kwargs, options). Each architecture has one
# old-style (legacy) config.json and one as transformers 5.x writes it.
# options: shard  -> max_shard_size for save_pretrained (several shards + index.json)
#          legacy -> rewrite config.json old-style (top-level rope_theta, torch_dtype)
#          scales -> per-kind std overrides for _randomize
#          tokenizer -> also write a word-level tokenizer.json (see _write_tokenizer)
#          vision -> a multimodal checkpoint: this vision tower's config beside the text model
_COMMON = dict(
    vocab_size=384,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    use_cache=True,
    initializer_range=0.2,  # recorded in config.json only: _randomize re-draws every parameter
)

VARIANTS = {
    # Plain Mixtral: 8 experts, top-2 (always renormalised), GQA; old-style config.json.
    "mixtral_f32": (
        "mixtral", "float32", 11,
        dict(intermediate_size=48, num_hidden_layers=3, num_local_experts=8, num_experts_per_tok=2,
             rms_norm_eps=1e-5, rope_theta=2.5e5, tie_word_embeddings=False),
        dict(legacy=True),
    ),
    # bf16, sharded; explicit head_dim (32) != hidden/heads (16), large rms eps, other rope_theta.
    "mixtral_bf16_sharded": (
        "mixtral", "bfloat16", 12,
        dict(intermediate_size=32, num_hidden_layers=4, num_local_experts=4, num_experts_per_tok=2,
             head_dim=32, rms_norm_eps=1e-3, rope_theta=5e4, tie_word_embeddings=False),
        dict(shard="60KB"),
    ),
    # Shared expert + sigmoid gate, qkv bias, dense-MLP layers from both decoder_sparse_step and
    # mlp_only_layers, un-normalised top-k; old-style config.json.
    # MoE layers: i not in [3] and (i+1) % 2 == 0  ->  1, 5 sparse; 0, 2, 3, 4 dense.
    "qwen2_moe_f32": (
        "qwen2_moe", "float32", 24,
        dict(intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=80,
             num_hidden_layers=6, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
             decoder_sparse_step=2, mlp_only_layers=[3], qkv_bias=True, rms_norm_eps=1e-4,
             rope_theta=2e4, tie_word_embeddings=False),
        dict(legacy=True),
    ),
    # bf16, every layer sparse (decoder_sparse_step 1, no mlp_only_layers), normalised top-k.
    "qwen2_moe_bf16": (
        "qwen2_moe", "bfloat16", 25,
        dict(intermediate_size=96, moe_intermediate_size=24, shared_expert_intermediate_size=48,
             num_hidden_layers=3, num_experts=6, num_experts_per_tok=2, norm_topk_prob=True,
             qkv_bias=True, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False),
        dict(),
    ),
    # head_dim 24 != 64/4, per-head q/k norm, normalised top-k, layer 0 dense via mlp_only_layers,
    # tied embeddings (no lm_head.weight saved), large rms eps; old-style config.json with
    # `num_experts` as real Qwen3 checkpoints have it.
    "qwen3_moe_f32": (
        "qwen3_moe", "float32", 31,
        dict(intermediate_size=80, moe_intermediate_size=32, num_hidden_layers=4, num_experts=8,
             num_experts_per_tok=2, head_dim=24, norm_topk_prob=True, mlp_only_layers=[0],
             rms_norm_eps=1e-3, rope_theta=1e6, tie_word_embeddings=True),
        dict(legacy=True, tokenizer=True, scales=dict(embed=0.6)),  # embed is also the output head
    ),
    # float16, sharded, rope_theta 2e5, un-normalised top-k, decoder_sparse_step=2 (layers 1, 3
    # sparse; 0, 2 dense), attention_bias (q/k/v AND o_proj biases in qwen3_moe).
    "qwen3_moe_f16_sharded": (
        "qwen3_moe", "float16", 32,
        dict(intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=4, num_experts=4,
             num_experts_per_tok=2, head_dim=16, norm_topk_prob=False, decoder_sparse_step=2,
             attention_bias=True, rms_norm_eps=1e-6, rope_theta=2e5, tie_word_embeddings=False),
        dict(shard="40KB"),
    ),
    # Full-width q/k norm (q: hidden, k: kv_heads*head_dim), clip_qkv small enough to clip q, k
    # and v, un-normalised top-k; old-style config.json.
    "olmoe_f32": (
        "olmoe", "float32", 41,
        dict(intermediate_size=48, num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
             norm_topk_prob=False, clip_qkv=0.9, rms_norm_eps=1e-4, rope_theta=3e4,
             tie_word_embeddings=False),
        dict(legacy=True),
    ),
    # bf16, no clipping, normalised top-k, attention_bias (q/k/v/o biases).
    "olmoe_bf16": (
        "olmoe", "bfloat16", 42,
        dict(intermediate_size=32, num_hidden_layers=3, num_experts=4, num_experts_per_tok=2,
             norm_topk_prob=True, clip_qkv=None, attention_bias=True, rms_norm_eps=1e-5,
             rope_theta=5e5, tie_word_embeddings=False),
        dict(),
    ),
    # Qwen3.5 / 3.6-MoE text model (hybrid): Gated DeltaNet layers (value heads sharing key heads,
    # dk != dv) and gated full attention with RoPE on a quarter of head_dim, (1 + w) norms, a shared
    # expert with its sigmoid gate, top-k renormalised; layers alternating linear / full.
    "qwen3_5_moe_f32": (
        "qwen3_5_moe", "float32", 53,
        dict(num_hidden_layers=4, full_attention_interval=2, head_dim=32, linear_num_key_heads=2,
             linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8, linear_conv_kernel_dim=4,
             num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
             rms_norm_eps=1e-6, rope_theta=1e4, tie_word_embeddings=False),
        dict(),
    ),
    # bf16, three linear layers to one full (the released models' pattern), one value head per key
    # head, a 3-tap conv, tied embeddings.
    "qwen3_5_moe_bf16": (
        "qwen3_5_moe", "bfloat16", 54,
        dict(num_hidden_layers=4, layer_types=["linear_attention"] * 3 + ["full_attention"], head_dim=16,
             linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
             linear_conv_kernel_dim=3, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
             shared_expert_intermediate_size=32, rms_norm_eps=1e-5, rope_theta=5e4, tie_word_embeddings=True),
        dict(),
    ),
    # The multimodal checkpoint as transformers writes it (Qwen3_5MoeForConditionalGeneration): the
    # text model's config under text_config, its tensors under model.language_model., a one-block
    # vision tower beside them; every third layer full attention (full_attention_interval 3).
    "qwen3_5_moe_mm_bf16": (
        "qwen3_5_moe", "bfloat16", 55,
        dict(num_hidden_layers=3, full_attention_interval=3, head_dim=16, linear_num_key_heads=1,
             linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=32,
             rms_norm_eps=1e-6, rope_theta=1e4, tie_word_embeddings=False),
        dict(vision=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64, patch_size=4,
                         temporal_patch_size=1, spatial_merge_size=1, num_position_embeddings=16)),
    ),
    # Qwen3-Next: in_proj_qkvz / in_proj_ba grouped per key head, un-normalised top-k, a dense layer
    # (mlp_only_layers), partial RoPE of half the head (partial_rotary_factor 0.5).
    "qwen3_next_f32": (
        "qwen3_next", "float32", 61,
        dict(num_hidden_layers=4, full_attention_interval=2, head_dim=32, linear_num_key_heads=2,
             linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8, linear_conv_kernel_dim=4,
             num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
             intermediate_size=80, mlp_only_layers=[1], norm_topk_prob=False, partial_rotary_factor=0.5,
             rms_norm_eps=1e-6, rope_theta=1e4, tie_word_embeddings=False),
        dict(),
    ),
}

NAMES = list(VARIANTS)

# std of the re-drawn parameters, by kind (see _randomize)
_SCALES = dict(matrix=0.2, embed=0.3, lm_head=0.6, router=0.5, bias=0.2, norm=0.25)


def _classes(model_type):
    import transformers

    return {
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
        "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
        "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM),
        "qwen3_5_moe": (transformers.Qwen3_5MoeTextConfig, transformers.Qwen3_5MoeForCausalLM),
        "qwen3_next": (transformers.Qwen3NextConfig, transformers.Qwen3NextForCausalLM),
    }[model_type]


def _randomize(model, seed, scales):
    """Re-draws every parameter deterministically: matrices N(0, s), norm weights 1 + N(0, s)
    (not all ones), biases N(0, s) (not zeros), router weights wider for decisive routing."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters are listed once
            if "norm" in name:
                v = 1.0 + scales["norm"] * torch.randn(p.shape, generator=gen)
            elif name.endswith(".bias"):
                v = scales["bias"] * torch.randn(p.shape, generator=gen)
            elif name.endswith("lm_head.weight"):
                v = scales["lm_head"] * torch.randn(p.shape, generator=gen)
            elif name.endswith("embed_tokens.weight"):
                v = scales["embed"] * torch.randn(p.shape, generator=gen)
            elif name.endswith("mlp.gate.weight") or "block_sparse_moe.gate" in name:
                v = scales["router"] * torch.randn(p.shape, generator=gen)
            else:
                v = scales["matrix"] * torch.randn(p.shape, generator=gen)
            p.copy_(v.to(p.dtype))


class _one_thread:
    """torch on one thread while building: these models are tiny, and on a small busy machine
    torch's default thread pool makes every op wait for a core."""

    def __init__(self, torch):
        self.torch = torch

    def __enter__(self):
        self.saved = self.torch.get_num_threads()
        self.torch.set_num_threads(1)

    def __exit__(self, *exc):
        self.torch.set_num_threads(self.saved)


def _legacy_config(path, rope_theta, dtype):
    """Rewrites config.json the way pre-5.x checkpoints look: top-level rope_theta (no
    rope_parameters), torch_dtype instead of dtype, and for qwen3_moe `num_experts` (what real
    Qwen3 checkpoints use; transformers 5.24 itself writes qwen3_moe's count as
    `num_local_experts` because of its attribute_map)."""
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    rp = cfg.pop("rope_parameters", None)
    assert rp is None or (rp.get("rope_type", "default") == "default" and float(rp["rope_theta"]) == rope_theta), rp
    cfg["rope_theta"] = rope_theta
    cfg["rope_scaling"] = None
    cfg.pop("dtype", None)
    cfg["torch_dtype"] = dtype
    if "head_dim" in cfg and cfg["head_dim"] is None:  # old Mixtral configs have no head_dim key
        del cfg["head_dim"]
    if cfg["model_type"] == "qwen3_moe" and "num_local_experts" in cfg:
        cfg["num_experts"] = cfg.pop("num_local_experts")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def _write_tokenizer(path, vocab_size):
    """A word-level tokenizer.json over the whole vocab: <pad>=0, <s>=1, </s>=2, then the words
    w3 .. w{vocab-1}; text is split on whitespace, unknown words map to <pad>."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    tok.save(os.path.join(path, "tokenizer.json"))


def build_one(name, outdir):
    """Builds variant `name` into outdir/name and returns that path."""
    import torch
    import transformers
    from transformers import AutoConfig

    transformers.utils.logging.disable_progress_bar()

    model_type, dtype, seed, cfg_kwargs, opts = VARIANTS[name]
    config_cls, model_cls = _classes(model_type)
    kwargs = dict(_COMMON, **cfg_kwargs)
    rope_theta = float(kwargs["rope_theta"])
    config = config_cls(**kwargs)  # 5.x moves rope_theta into config.rope_parameters
    if "vision" in opts:
        model_cls = transformers.Qwen3_5MoeForConditionalGeneration
        config = transformers.Qwen3_5MoeConfig(text_config=config.to_dict(), vision_config=opts["vision"],
                                               tie_word_embeddings=config.tie_word_embeddings)

    with _one_thread(torch):
        torch.manual_seed(seed)
        model = model_cls(config).eval()
        _randomize(model, seed, dict(_SCALES, **opts.get("scales", {})))
        model = model.to(getattr(torch, dtype))

    path = os.path.join(outdir, name)
    os.makedirs(path, exist_ok=True)
    save_kwargs = {}
    if "shard" in opts:
        save_kwargs["max_shard_size"] = opts["shard"]
    model.save_pretrained(path, **save_kwargs)
    if opts.get("legacy"):
        _legacy_config(path, rope_theta, dtype)
    if opts.get("tokenizer"):
        _write_tokenizer(path, config.vocab_size)

    # transformers must read back what was meant (the legacy rewrite must not change the math)
    back = AutoConfig.from_pretrained(path).get_text_config()
    config = config.get_text_config()
    for key in ("num_hidden_layers", "num_experts_per_tok", "rms_norm_eps", "vocab_size"):
        assert getattr(back, key) == getattr(config, key), (name, key)
    n_exp = getattr(config, "num_local_experts", None) or config.num_experts
    assert (getattr(back, "num_local_experts", None) or back.num_experts) == n_exp, name
    rp = getattr(back, "rope_parameters", None) or {"rope_theta": back.rope_theta}
    assert float(rp["rope_theta"]) == rope_theta, (name, rp, rope_theta)
    assert rp.get("rope_type", "default") == "default", rp
    if "shard" in opts:
        assert os.path.exists(os.path.join(path, "model.safetensors.index.json")), name
        shards = [f for f in os.listdir(path) if f.endswith(".safetensors")]
        assert len(shards) >= 3, (name, shards)
    return path


def make_models(outdir, names=None):
    """Builds the named variants (all by default) under outdir; returns {name: path}."""
    names = NAMES if names is None else list(names)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {NAMES}")
    os.makedirs(outdir, exist_ok=True)
    return {n: build_one(n, outdir) for n in names}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir")
    ap.add_argument("--only", nargs="+", metavar="NAME", choices=NAMES, help="variants to build")
    args = ap.parse_args(argv)
    for name, path in make_models(args.outdir, args.only).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
