"""The dense weights of llama.cpp-written GGUF files (tests/data/gguf) against the checkpoint they
were converted from: every matrix and vector of the bf16 file has the checkpoint's values exactly
(q and k rows back in transformers' order, the router widened to f32 by the converter), and the
Q8_0 file's dequantized matrices (gguf.quants.dequantize) are within Q8_0's rounding of them."""

import os

import numpy as np
import pytest

from lowmoe.backend import cpu
from lowmoe.errors import CheckpointError
from lowmoe.load.checkpoint import Checkpoint
from lowmoe.load.gguf import GGUF
from lowmoe.load.gguf_config import gguf_model_config
from lowmoe.load.gguf_weights import load_dense_gguf
from lowmoe.load.weights import load_dense

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "gguf")
gguf = pytest.importorskip("gguf")


def _matrices(w):
    """{name: Matrix} and {name: vector} of a Weights, by the role they play."""
    mats, vecs = {"embed": w.embed, "lm_head": w.lm_head}, {"norm": w.norm}
    for i, layer in enumerate(w.layers):
        a = layer.attn
        mats.update({f"{i}.{n}": getattr(a, n) for n in ("q", "k", "v", "o")})
        mats[f"{i}.router"] = layer.router
        vecs.update({f"{i}.input_norm": layer.input_norm, f"{i}.post_norm": layer.post_norm})
    return mats, vecs


def _values(m):
    if m.dtype in ("f32", "f16", "bf16"):
        return cpu.to_f32(m.w, m.dtype)
    kind = gguf.GGMLQuantizationType[m.dtype.upper()]
    return gguf.quants.dequantize(m.w, kind)


@pytest.fixture(scope="module")
def reference(test_models):
    path = test_models["mixtral_bf16_sharded"]
    model = GGUF(os.path.join(DATA, "mixtral_bf16_sharded-bf16.gguf"))
    cfg = gguf_model_config(model)
    return cfg, _matrices(load_dense(Checkpoint(path), cfg))


def test_the_bf16_file_holds_the_checkpoints_weights(reference):
    cfg, (want, want_vecs) = reference
    got, got_vecs = _matrices(load_dense_gguf(GGUF(os.path.join(DATA, "mixtral_bf16_sharded-bf16.gguf")), cfg))
    for name, m in want.items():
        assert got[name].w.shape == m.w.shape, name
        assert np.array_equal(_values(got[name]), _values(m)), name
    for name, v in want_vecs.items():
        assert np.array_equal(got_vecs[name], v), name
    assert got["0.q"].dtype == "bf16" and got["0.router"].dtype == "f32"


def test_the_q8_0_file_dequantizes_to_the_checkpoints_weights(reference):
    cfg, (want, _) = reference
    got, _ = _matrices(load_dense_gguf(GGUF(os.path.join(DATA, "mixtral_bf16_sharded-q8_0.gguf")), cfg))
    assert got["0.q"].dtype == "q8_0" and got["0.q"].w.dtype == np.uint8
    for name, m in want.items():
        ref, deq = _values(m).astype(np.float64), _values(got[name]).astype(np.float64)
        # Q8_0: 32 values share one f16 scale, max|block| / 127: at most half a step off (plus the
        # scale's own f16 rounding), per block. A row order left permuted would be off by O(|w|).
        blocks = ref.reshape(ref.shape[0], -1, 32) if ref.shape[1] % 32 == 0 else None
        step = np.abs(blocks).max(-1, keepdims=True) / 127 if blocks is not None else np.abs(ref).max() / 127
        err = np.abs(deq - ref).reshape(blocks.shape) if blocks is not None else np.abs(deq - ref)
        assert (err <= 0.51 * step + 1e-3 * np.abs(blocks if blocks is not None else ref)).all(), name


def test_a_missing_or_misshapen_tensor_is_a_clear_error(reference, tmp_path):
    cfg, _ = reference
    path = str(tmp_path / "m.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("token_embd.weight", np.zeros((3, 5), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="missing tensor 'blk.0.attn_norm.weight'"):
        load_dense_gguf(GGUF(path), cfg)
    with pytest.raises(CheckpointError, match=r"tensor 'token_embd.weight' has shape \[3, 5\], expected"):
        from lowmoe.load.gguf_weights import matrix

        matrix(GGUF(path), "token_embd.weight", (cfg.vocab_size, cfg.hidden_size))
