"""config.json keys that change the math map onto ModelConfig as transformers reads them."""

import pytest

from lowmoe.load.config import parse_model_config
from lowmoe.errors import ConfigError

BASE = {"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 6, "num_attention_heads": 2,
        "num_key_value_heads": 1, "num_experts_per_tok": 2, "intermediate_size": 12}


def cfg(**kw):
    return parse_model_config(dict(BASE, **kw))


def test_expert_count_under_either_name():
    assert cfg(model_type="mixtral", num_local_experts=8).num_experts == 8
    assert cfg(model_type="olmoe", num_experts=6).num_experts == 6


def test_mixtral_always_renormalises():
    assert cfg(model_type="mixtral", num_local_experts=4, norm_topk_prob=False).norm_topk_prob
    assert not cfg(model_type="olmoe", num_experts=4).norm_topk_prob
    assert cfg(model_type="qwen3_moe", num_experts=4, moe_intermediate_size=3, norm_topk_prob=True).norm_topk_prob


def test_intermediate_sizes():
    q = cfg(model_type="qwen2_moe", num_experts=4, moe_intermediate_size=3, shared_expert_intermediate_size=5)
    assert (q.expert_intermediate, q.dense_intermediate, q.shared_expert_intermediate) == (3, 12, 5)
    o = cfg(model_type="olmoe", num_experts=4)
    assert (o.expert_intermediate, o.shared_expert_intermediate) == (12, 0)


def test_dense_layers_follow_transformers_rule():
    # transformers: sparse iff layer not in mlp_only_layers and (layer + 1) % decoder_sparse_step == 0
    c = cfg(model_type="qwen3_moe", num_experts=4, moe_intermediate_size=3, decoder_sparse_step=2, mlp_only_layers=[3])
    assert c.sparse_layers == (False, True, False, False, False, True)
    assert c.moe_layers == [1, 5]


def test_rope_theta_top_level_or_nested():
    assert cfg(model_type="olmoe", num_experts=4, rope_theta=5e5).rope_theta == 5e5
    assert cfg(model_type="olmoe", num_experts=4, rope_parameters={"rope_theta": 7e4, "rope_type": "default"}).rope_theta == 7e4
    assert cfg(model_type="mixtral", num_local_experts=4).rope_theta == 1e6
    with pytest.raises(ConfigError, match="rope type 'yarn'"):
        cfg(model_type="olmoe", num_experts=4, rope_parameters={"rope_type": "yarn", "factor": 4})


def test_head_dim_norms_clip_bias():
    q3 = cfg(model_type="qwen3_moe", num_experts=4, moe_intermediate_size=3, head_dim=16)
    assert (q3.head_dim, q3.qk_norm, q3.qkv_bias) == (16, "head", False)
    o = cfg(model_type="olmoe", num_experts=4, clip_qkv=8.0, attention_bias=True)
    assert (o.head_dim, o.qk_norm, o.clip_qkv, o.qkv_bias, o.o_bias) == (4, "full", 8.0, True, True)
    q2 = cfg(model_type="qwen2_moe", num_experts=4, moe_intermediate_size=3)
    assert q2.qkv_bias and not q2.o_bias and q2.qk_norm == "none"


def test_errors_name_the_problem():
    with pytest.raises(ConfigError, match="supported: mixtral, qwen2_moe, qwen3_moe, olmoe"):
        cfg(model_type="deepseek_v3")
    with pytest.raises(ConfigError, match="sliding-window"):
        cfg(model_type="mixtral", num_local_experts=4, sliding_window=4096)
    with pytest.raises(ConfigError, match="'hidden_size' must be an integer"):
        cfg(model_type="olmoe", num_experts=4, hidden_size="8")
    with pytest.raises(ConfigError, match="missing key 'num_experts'"):
        cfg(model_type="olmoe")
