"""An Engine on a GGUF file that llama.cpp's converter wrote (tests/data/gguf): the bf16 file of the
Mixtral test checkpoint decodes exactly as the checkpoint does, and the Q8_0 and Q4_K_M ones as
transformers does on their dequantized weights, with every expert resident and through the expert cache;
`lowmoe decode FILE.gguf` and `lowmoe info FILE.gguf`."""

import os

import numpy as np
import pytest

import lowmoe
from lowmoe.cli.__main__ import main as cli
from lowmoe.load.gguf import GGUF

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "gguf")
BF16 = os.path.join(DATA, "mixtral_bf16_sharded-bf16.gguf")
PROMPT = [5, 17, 300, 42, 9, 77, 100, 3]


def _run(engine):
    return engine.logits(PROMPT), engine.generate(PROMPT, 16, stop_at_eos=False).tokens


@pytest.mark.parametrize("options", [{}, dict(expert_cache="25%", predictor="nextgate"), dict(storage="ram")])
def test_the_bf16_file_decodes_as_its_checkpoint(test_models, options):
    with lowmoe.Engine.from_pretrained(test_models["mixtral_bf16_sharded"]) as e:
        want_logits, want = _run(e)
    with lowmoe.Engine.from_pretrained(BF16, **options) as e:
        logits, tokens = _run(e)
    assert tokens == want and np.array_equal(logits, want_logits)


def test_decode_takes_a_gguf_file(capsys, monkeypatch):
    monkeypatch.chdir(DATA)
    assert cli(["decode", os.path.basename(BF16), "--prompt-ids", "5,17,300", "--max-new-tokens", "4", "--json"]) == 0
    assert '"tokens"' in capsys.readouterr().out


def _dequantized_transformers(checkpoint, path):
    """transformers' float32 model of `checkpoint` with every weight replaced by the GGUF file's,
    dequantized by gguf itself (q and k rows back from llama.cpp's rotary order)."""
    import torch
    import transformers

    gguf = pytest.importorskip("gguf")
    model = GGUF(path)

    def w(name, heads=None):
        info, raw = model.tensors[name], model.read(name)
        kind = gguf.GGMLQuantizationType(info.ggml_type)
        a = raw.view(np.float32).reshape(info.shape) if info.format == "f32" else \
            gguf.quants.dequantize(raw.reshape(*info.shape[:-1], -1), kind)
        if heads is not None:  # llama.cpp's permute, inverted: [heads, hd/2, 2, D] -> [heads, 2, hd/2, D]
            a = a.reshape(heads, -1, 2, a.shape[-1]).swapaxes(1, 2).reshape(a.shape)
        return torch.from_numpy(np.ascontiguousarray(a, np.float32))

    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    c = hf.config
    llama = c.model_type == "mixtral"  # the converter permutes q and k rows for llama only
    state = {"model.embed_tokens.weight": w("token_embd.weight"), "model.norm.weight": w("output_norm.weight")}
    state["lm_head.weight"] = w("output.weight") if "output.weight" in model.tensors else state["model.embed_tokens.weight"]
    for i in range(c.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        if b + "attn_q_norm.weight" in model.tensors:
            state.update({p + "self_attn.q_norm.weight": w(b + "attn_q_norm.weight"),
                          p + "self_attn.k_norm.weight": w(b + "attn_k_norm.weight")})
        state.update({p + "input_layernorm.weight": w(b + "attn_norm.weight"),
                      p + "post_attention_layernorm.weight": w(b + "ffn_norm.weight"),
                      p + "self_attn.q_proj.weight": w(b + "attn_q.weight", c.num_attention_heads if llama else None),
                      p + "self_attn.k_proj.weight": w(b + "attn_k.weight", c.num_key_value_heads if llama else None),
                      p + "self_attn.v_proj.weight": w(b + "attn_v.weight"),
                      p + "self_attn.o_proj.weight": w(b + "attn_output.weight"),
                      p + "mlp.gate.weight": w(b + "ffn_gate_inp.weight"),
                      p + "mlp.experts.gate_up_proj": torch.cat([w(b + "ffn_gate_exps.weight"), w(b + "ffn_up_exps.weight")], 1),
                      p + "mlp.experts.down_proj": w(b + "ffn_down_exps.weight")})
    assert set(state) == set(hf.state_dict())
    hf.load_state_dict(state)
    return hf


@pytest.mark.parametrize("name", ["mixtral_bf16_sharded-q8_0", "mixtral_bf16_sharded-q4_k_m", "default-q4_k_m"])
def test_a_quantized_file_decodes_as_transformers_on_its_dequantized_weights(test_models, name):
    """Experts and matrices in Q8_0, or llama-quantize's Q4_K_M mix (for the bundled model Q4_K, Q6_K,
    Q8_0 and Q5_0, the experts' formats differing by layer), computed in place: logits within 1e-4 of
    transformers' float32 over the same dequantized weights, the same greedy tokens, and the same
    bits with the experts out of core as resident."""
    import torch

    path = os.path.join(DATA, f"{name}.gguf")
    checkpoint = lowmoe.DEFAULT_MODEL if name.startswith("default") else test_models["mixtral_bf16_sharded"]
    hf = _dequantized_transformers(checkpoint, path)
    with torch.no_grad():
        want = hf(torch.tensor([PROMPT])).logits[0].numpy()
        greedy = hf.generate(torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False)[0, len(PROMPT):].tolist()
    with lowmoe.Engine.from_pretrained(path) as e:
        logits, tokens = _run(e)
    assert np.abs(logits - want).max() <= 1e-4 * np.abs(want).max()
    assert tokens == greedy
    with lowmoe.Engine.from_pretrained(path, expert_cache="25%", predictor="nextgate") as e:
        cached_logits, cached = _run(e)
    assert cached == tokens and np.array_equal(cached_logits, logits)


def test_quantized_experts_on_the_gpu_are_a_one_line_error(host_gpu):
    """On the CPU stand-in for the GPU: the GPU kernels take float weights only, so far."""
    with pytest.raises(lowmoe.DeviceError, match="weights in the GGUF format q8_0 run on the CPU only"):
        lowmoe.Engine.from_pretrained(os.path.join(DATA, "mixtral_bf16_sharded-q8_0.gguf"), device="cuda")


def test_info_shows_a_gguf_files_formats_and_bytes_per_expert(capsys):
    import json

    path = os.path.join(DATA, "mixtral_bf16_sharded-q8_0.gguf")
    assert cli(["info", path, "--json", "--expert-cache", "50%"]) == 0
    info = json.loads(capsys.readouterr().out)
    I, D = info["expert_intermediate_size"], info["hidden_size"]
    assert info["bytes_per_expert"] == 3 * I * D // 32 * 34  # Q8_0: 34 bytes per 32 weights
    assert set(info["format_bytes"]) == {"q8_0", "f32"}  # the converter keeps norms and the router f32
    assert info["dense_bytes"] + info["expert_bytes"] == sum(info["format_bytes"].values())
    assert info["cache_slots"] == info["moe_layers"] * info["experts_per_layer"] // 2


def test_bench_on_a_q8_0_file(capsys):
    """`lowmoe bench` on the Q8_0 file: every strategy decodes the resident run's tokens (the bench
    refuses otherwise) and the oracle replays the recorded routing."""
    import json

    path = os.path.join(DATA, "mixtral_bf16_sharded-q8_0.gguf")
    assert cli(["bench", path, "--context", "16", "--new-tokens", "4", "--repeats", "1", "--expert-cache", "50%",
                "--strategies", "none,reactive,nextgate,history,oracle", "--context-cache", "none", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["strategies"]
    assert result["oracle"]["topk_recall"] == 1.0 and result["reactive"]["cache_hit_rate"] < 1
