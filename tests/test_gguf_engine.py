"""An Engine on a GGUF file that llama.cpp's converter wrote (tests/data/gguf): the bf16 file of the
Mixtral test checkpoint decodes exactly as the checkpoint does, and the Q8_0 and Q4_K_M ones as
transformers does on their dequantized weights, with every expert resident and through the expert cache;
`lowmoe decode FILE.gguf` and `lowmoe info FILE.gguf`; `lowmoe pack FILE.gguf OUT` and every
expert-cache feature on the packed Q4_K_M model."""

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
    return engine.logits(PROMPT), engine.generate(PROMPT, 32, stop_at_eos=False).tokens


VARIANTS = ("mixtral_bf16_sharded", "olmoe_bf16", "qwen2_moe_bf16")  # tools/make_test_ggufs.py's


@pytest.fixture(scope="module")
def checkpoints(test_models, tmp_path_factory):
    """{variant: the checkpoint its GGUF files hold}: the test checkpoint, except that llama.cpp's
    OLMoE and Qwen2-MoE never renormalise the top-k routing weights (no GGUF key can say they do), so
    the GGUFs of those two are their checkpoints with norm_topk_prob false."""
    import json
    import shutil

    out = {}
    for v in VARIANTS:
        with open(os.path.join(test_models[v], "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        out[v] = test_models[v]
        if cfg["model_type"] in ("olmoe", "qwen2_moe") and cfg.get("norm_topk_prob"):
            out[v] = str(tmp_path_factory.mktemp("gguf_checkpoints") / v)
            shutil.copytree(test_models[v], out[v])
            with open(os.path.join(out[v], "config.json"), "w", encoding="utf-8") as f:
                json.dump(dict(cfg, norm_topk_prob=False), f)
    return out


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("options", [{}, dict(expert_cache="25%", predictor="nextgate"), dict(storage="ram")])
def test_the_bf16_file_decodes_as_its_checkpoint(checkpoints, variant, options):
    with lowmoe.Engine.from_pretrained(checkpoints[variant]) as e:
        want_logits, want = _run(e)
    with lowmoe.Engine.from_pretrained(os.path.join(DATA, f"{variant}-bf16.gguf"), **options) as e:
        logits, tokens = _run(e)
    assert tokens == want and np.array_equal(logits, want_logits)


def test_greedy_text_is_llama_cpps():
    """The bundled model's Q4_K_M continues the prompt greedily with the very text llama.cpp's
    llama-simple printed for it (recorded by tools/make_test_ggufs.py): llama.cpp rounds activations
    to 8 bits, lowmoe keeps them f32, and on this trained model the greedy choices agree."""
    import json

    with open(os.path.join(DATA, "llama_greedy.json"), encoding="utf-8") as f:
        rec = json.load(f)
    with lowmoe.Engine.from_pretrained(os.path.join(DATA, rec["file"])) as e:
        tokens = e.generate(e.encode(rec["prompt"]), rec["tokens"], stop_at_eos=False).tokens
        assert e.tokenizer.decode(tokens).encode() == bytes.fromhex(rec["continuation_hex"])


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
    c, shapes = hf.config, {k: v.shape for k, v in hf.state_dict().items()}
    llama = c.model_type == "mixtral"  # the converter permutes q and k rows for llama only
    state = {"model.embed_tokens.weight": w("token_embd.weight"), "model.norm.weight": w("output_norm.weight")}
    state["lm_head.weight"] = w("output.weight") if "output.weight" in model.tensors else state["model.embed_tokens.weight"]
    for i in range(c.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        state.update({p + "self_attn.q_proj.weight": w(b + "attn_q.weight", c.num_attention_heads if llama else None),
                      p + "self_attn.k_proj.weight": w(b + "attn_k.weight", c.num_key_value_heads if llama else None),
                      p + "mlp.experts.gate_up_proj": torch.cat([w(b + "ffn_gate_exps.weight"), w(b + "ffn_up_exps.weight")], 1)})
        for hf_name, name in (("input_layernorm.weight", "attn_norm.weight"),
                              ("post_attention_layernorm.weight", "ffn_norm.weight"),
                              ("self_attn.v_proj.weight", "attn_v.weight"), ("self_attn.o_proj.weight", "attn_output.weight"),
                              ("self_attn.q_norm.weight", "attn_q_norm.weight"), ("self_attn.k_norm.weight", "attn_k_norm.weight"),
                              ("self_attn.q_proj.bias", "attn_q.bias"), ("self_attn.k_proj.bias", "attn_k.bias"),
                              ("self_attn.v_proj.bias", "attn_v.bias"), ("self_attn.o_proj.bias", "attn_output.bias"),
                              ("mlp.gate.weight", "ffn_gate_inp.weight"),
                              ("mlp.experts.down_proj", "ffn_down_exps.weight"),
                              ("mlp.shared_expert.gate_proj.weight", "ffn_gate_shexp.weight"),
                              ("mlp.shared_expert.up_proj.weight", "ffn_up_shexp.weight"),
                              ("mlp.shared_expert.down_proj.weight", "ffn_down_shexp.weight"),
                              ("mlp.shared_expert_gate.weight", "ffn_gate_inp_shexp.weight")):
            if b + name in model.tensors:
                state[p + hf_name] = w(b + name).reshape(shapes[p + hf_name])
    assert set(state) == set(hf.state_dict())
    hf.load_state_dict(state)
    return hf


@pytest.mark.parametrize("name", [f"{v}-{q}" for v in VARIANTS for q in ("q8_0", "q4_k_m")] + ["default-q4_k_m"])
def test_a_quantized_file_decodes_as_transformers_on_its_dequantized_weights(checkpoints, name):
    """Experts and matrices in Q8_0, or llama-quantize's Q4_K_M mix (for the bundled model Q4_K, Q6_K,
    Q8_0 and Q5_0, the experts' formats differing by layer), computed in place: logits within 1e-4 of
    transformers' float32 over the same dequantized weights, the same greedy tokens, and the same
    bits with the experts out of core as resident."""
    import torch

    path = os.path.join(DATA, f"{name}.gguf")
    checkpoint = lowmoe.DEFAULT_MODEL if name.startswith("default") else checkpoints[name.rsplit("-", 1)[0]]
    hf = _dequantized_transformers(checkpoint, path)
    hf.generation_config.eos_token_id = None  # 32 tokens, as lowmoe's generate(stop_at_eos=False)
    with torch.no_grad():
        want = hf(torch.tensor([PROMPT])).logits[0].numpy()
        greedy = hf.generate(torch.tensor([PROMPT]), max_new_tokens=32, do_sample=False)[0, len(PROMPT):].tolist()
    with lowmoe.Engine.from_pretrained(path, kv_dtype="f32") as e:  # transformers' float32 keys and values
        logits, tokens = _run(e)
    assert np.abs(logits - want).max() <= 1e-4 * np.abs(want).max()
    assert tokens == greedy
    with lowmoe.Engine.from_pretrained(path, expert_cache="25%", predictor="nextgate", kv_dtype="f32") as e:
        cached_logits, cached = _run(e)
    assert cached == tokens and np.array_equal(cached_logits, logits)


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


Q4_K_M = os.path.join(DATA, "default-q4_k_m.gguf")  # the bundled model's: experts' down format varies by layer


@pytest.fixture(scope="module")
def packed_q4_k_m(tmp_path_factory):
    """`lowmoe pack` of the bundled model's Q4_K_M, with a learned predictor fitted on the file beside it
    (copied into the packed folder)."""
    tmp = tmp_path_factory.mktemp("packed_gguf")
    src = tmp / "default-q4_k_m.gguf"
    src.write_bytes(open(Q4_K_M, "rb").read())
    assert cli(["train-predictor", str(src), "--tokens", "64"]) == 0
    assert (tmp / "default-q4_k_m.moe_predictor.safetensors").is_file()
    assert cli(["pack", str(src), str(tmp / "packed")]) == 0
    return str(src), str(tmp / "packed")


def test_pack_keeps_a_gguf_files_bytes(packed_q4_k_m):
    """dense.gguf, read by gguf's own GGUFReader: the file's metadata and its non-expert tensors, bytes
    as they were; experts.bin: each expert's slices of the stacked tensors, back to back, then zeros."""
    gguf = pytest.importorskip("gguf")
    from lowmoe.tier.slots import aligned_empty
    from lowmoe.tier.store import PackedStore

    src, packed = packed_q4_k_m
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(os.path.join(packed, "dense.gguf"))
    assert {k: a.fields[k].contents() for k in a.fields if not k.startswith("GGUF.")} == \
           {k: b.fields[k].contents() for k in b.fields if not k.startswith("GGUF.")}
    dense = {t.name: t for t in a.tensors if "_exps." not in t.name}
    assert [t.name for t in b.tensors] == list(dense)
    for t in b.tensors:
        assert t.tensor_type == dense[t.name].tensor_type and np.array_equal(t.data, dense[t.name].data), t.name
    model, store = GGUF(src), PackedStore(packed)
    for layer in store.layers:
        L = store.layout.of(layer)
        for e in (0, store.experts - 1):
            block = aligned_empty(store.layout.block)  # O_DIRECT reads need an aligned buffer
            store.read(layer, e, block)
            want = [model.read(f"blk.{layer}.ffn_{r}_exps.weight").reshape(store.experts, -1)[e] for r in ("gate", "up", "down")]
            assert np.array_equal(block[: L.nbytes], np.concatenate(want)) and not block[L.nbytes :].any()
    store.close()


@pytest.mark.parametrize("options", [dict(expert_cache="25%", predictor="nextgate"),
                                     dict(expert_cache="25%", predictor="learned"),
                                     dict(expert_cache="min", predictor="history", lookahead=2),
                                     dict(expert_cache="50%", predictor="none", readers=2), dict(storage="ram"), {}])
def test_a_packed_q4_k_m_model_decodes_as_its_file(packed_q4_k_m, options):
    src, packed = packed_q4_k_m
    with lowmoe.Engine.from_pretrained(src) as e:
        want_logits, want = _run(e)
    with lowmoe.Engine.from_pretrained(packed, **options) as e:
        logits, tokens = _run(e)
        if "expert_cache" in options:
            assert e.model.where == "slots" and e.model.experts.stats()["misses"] > 0
    assert tokens == want and np.array_equal(logits, want_logits)


def test_a_gguf_files_learned_predictor_is_found_beside_it(packed_q4_k_m):
    from lowmoe.predict.learned import Learned

    src, packed = packed_q4_k_m
    for path in (src, packed):
        with lowmoe.Engine.from_pretrained(path, expert_cache="25%") as e:
            assert isinstance(e.model.predictor, Learned), path


def test_bench_on_a_packed_q4_k_m_model(packed_q4_k_m, capsys):
    """Every strategy, the learned predictor's too, decodes the resident run's tokens (the bench
    refuses otherwise)."""
    import json

    _, packed = packed_q4_k_m
    assert cli(["bench", packed, "--context", "16", "--new-tokens", "4", "--repeats", "1", "--expert-cache", "25%",
                "--context-cache", "none", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["strategies"]
    assert {"none", "reactive", "nextgate", "learned", "history", "oracle"} <= set(result)
    assert result["oracle"]["topk_recall"] == 1.0 and result["reactive"]["cache_hit_rate"] < 1


def test_pre_gate_heads_are_not_written_into_a_gguf_model(packed_q4_k_m, tmp_path, capsys):
    src, packed = packed_q4_k_m
    for model in (src, packed):
        assert cli(["train-predictor", model, "--kind", "pregate", "--write-into", str(tmp_path / "copy")]) == 2
        err = capsys.readouterr().err
        assert "not a GGUF model" in err and len(err.strip().splitlines()) == 1


def test_info_of_a_packed_gguf_model_is_its_files(packed_q4_k_m, capsys):
    import json

    infos = []
    for path in packed_q4_k_m:
        assert cli(["info", path, "--json"]) == 0
        infos.append(json.loads(capsys.readouterr().out))
    keys = ("format_bytes", "expert_bytes", "dense_bytes", "bytes_per_expert")
    assert [{k: i[k] for k in keys} for i in infos][0] == [{k: i[k] for k in keys} for i in infos][1]
    assert {"q4_k", "q6_k", "q8_0", "q5_0"} <= set(infos[1]["format_bytes"])
