"""ModelConfig from GGUF metadata (lowmoe/load/gguf_config.py): the files llama.cpp's converter
wrote from tools/make_test_models.py's checkpoints (tests/data/gguf, remade by
tools/make_test_ggufs.py) give the config that config.json gives; bad metadata is a one-line
ConfigError naming the file and the key."""

import os

import numpy as np
import pytest

from lowmoe.errors import ConfigError
from lowmoe.load.config import load_model_config
from lowmoe.load.gguf import GGUF
from lowmoe.load.gguf_config import gguf_model_config

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "gguf")
gguf = pytest.importorskip("gguf")


@pytest.mark.parametrize("outtype", ["bf16", "q8_0"])
def test_llama_cpp_files_give_the_checkpoints_config(test_models, outtype):
    want = load_model_config(test_models["mixtral_bf16_sharded"])
    assert gguf_model_config(GGUF(os.path.join(DATA, f"mixtral_bf16_sharded-{outtype}.gguf"))) == want


def _model(tmp_path, arch="qwen3moe", meta=(), tensors=("blk.0.ffn_gate_inp.weight",)):
    """A GGUF of the given metadata (writer method, value) and tiny f32 tensors of the given names."""
    path = str(tmp_path / "m.gguf")
    w = gguf.GGUFWriter(path, arch)
    for add, value in meta:
        getattr(w, add)(*value) if isinstance(value, tuple) else getattr(w, add)(value)
    for name in tensors:
        w.add_tensor(name, np.zeros((2, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return GGUF(path)


QWEN3 = [("add_block_count", 1), ("add_embedding_length", 64), ("add_head_count", 4), ("add_head_count_kv", 2),
         ("add_expert_count", 8), ("add_expert_used_count", 2), ("add_expert_feed_forward_length", 32),
         ("add_layer_norm_rms_eps", 1e-6), ("add_rope_freq_base", 1e6), ("add_vocab_size", 100)]


def test_qwen3moe_metadata(tmp_path):
    cfg = gguf_model_config(_model(tmp_path, meta=QWEN3))
    assert (cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == \
        ("qwen3_moe", 1, 64, 4, 2, 16)
    assert (cfg.num_experts, cfg.top_k, cfg.expert_intermediate, cfg.norm_topk_prob, cfg.sparse_layers) == \
        (8, 2, 32, True, (True,))
    assert (cfg.rms_norm_eps, cfg.rope_theta, cfg.vocab_size, cfg.tie_word_embeddings) == (1e-6, 1e6, 100, True)


@pytest.mark.parametrize("arch,meta,message", [
    ("llama", [("add_block_count", 1)], "GGUF architecture 'llama' is not supported"),  # no experts: dense
    ("gemma", [], "GGUF architecture 'gemma' is not supported"),
    ("qwen3moe", [m for m in QWEN3 if m[0] != "add_block_count"], "missing metadata 'qwen3moe.block_count'"),
    ("qwen3moe", QWEN3 + [("add_rope_scaling_type", gguf.RopeScalingType.YARN)], "rope scaling 'yarn' is not supported"),
    ("qwen3moe", [m for m in QWEN3 if m[0] != "add_head_count_kv"] + [("add_head_count_kv", [2, 4])],
     "'qwen3moe.attention.head_count_kv' differs between layers"),
    ("qwen3moe", [m for m in QWEN3 if m[0] != "add_expert_count"] + [("add_string", ("qwen3moe.expert_count", "8"))],
     "'qwen3moe.expert_count' must be an integer"),
])
def test_bad_metadata_is_a_one_line_error(tmp_path, arch, meta, message):
    model = _model(tmp_path, arch, meta)
    with pytest.raises(ConfigError, match=message) as err:
        gguf_model_config(model)
    assert str(err.value).startswith(model.path) and "\n" not in str(err.value)
