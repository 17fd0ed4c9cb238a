"""Qwen3.5 / 3.6-MoE, the hybrid of Gated DeltaNet and gated attention layers, beyond test_parity's
logits and greedy tokens against transformers (which also covers transformers' multimodal checkpoint
and Qwen3-Next): the recurrent state carried by a Context (prefill then decode, twice from one
Context) and by the bench's saved contexts, every predictor and lookahead, fused experts, llama.cpp's
GGUF, and device 'cuda' (on the CPU stand-in for the GPU)."""

import json
import os

import numpy as np
import pytest

import lowmoe
from lowmoe.cli.benchmark import load_context

PROMPT = [5, 17, 300, 42, 9, 77, 100, 3, 11, 200, 150, 7]


def _run(engine, n=12):
    return engine.generate(PROMPT, n, stop_at_eos=False).tokens, engine.logits(PROMPT)


@pytest.fixture(scope="module")
def hybrid(test_models):
    return test_models["qwen3_5_moe_f32"]


def test_a_context_carries_the_recurrent_state(hybrid):
    """Decoding from a prefilled Context twice gives the same tokens, those of generate: stream_from
    puts the DeltaNet layers' conv windows and states back to the prompt's end each time."""
    with lowmoe.Engine.from_pretrained(hybrid) as e:
        want = e.generate(PROMPT, 10, stop_at_eos=False).tokens
        context = e.prefill(PROMPT, room=10)
        assert len(context.recurrent) == e.config.layer_mixers.count("linear")
        for _ in range(2):
            assert list(e.stream_from(context, 10, stop_at_eos=False)) == want


def test_a_saved_bench_context_holds_the_recurrent_state(hybrid, tmp_path):
    with lowmoe.Engine.from_pretrained(hybrid) as e:
        built, loaded = load_context(e, PROMPT, 6, str(tmp_path))
        want = list(e.stream_from(built, 6, stop_at_eos=False))
        again, loaded_again = load_context(e, PROMPT, 6, str(tmp_path))
        assert (loaded, loaded_again) == (False, True)
        assert np.array_equal(again.logits, built.logits)
        assert list(e.stream_from(again, 6, stop_at_eos=False)) == want


def test_a_context_saved_without_the_state_is_built_again(hybrid, tmp_path):
    """A context file from before the state was saved (k/v only): rebuilt, never misread."""
    with lowmoe.Engine.from_pretrained(hybrid) as e:
        built, _ = load_context(e, PROMPT, 4, str(tmp_path))
        (path,) = tmp_path.iterdir()
        with np.load(path) as saved:
            old = {k: saved[k] for k in saved.files if not k.startswith(("conv", "ssm"))}
        np.savez(path, **old)
        again, loaded = load_context(e, PROMPT, 4, str(tmp_path))
        assert not loaded and np.array_equal(again.logits, built.logits)


@pytest.mark.parametrize("options", [dict(predictor="nextgate", lookahead=2), dict(predictor="history"),
                                     dict(predictor="none", readers=2)])
def test_every_predictor_gives_the_resident_tokens(hybrid, options):
    with lowmoe.Engine.from_pretrained(hybrid) as e:
        want_tokens, want_logits = _run(e)
    with lowmoe.Engine.from_pretrained(hybrid, expert_cache="min", **options) as e:
        tokens, logits = _run(e)
        assert e.model.experts.stats()["misses"] > 0
    assert tokens == want_tokens and np.array_equal(logits, want_logits)


def test_the_gpu_decodes_from_a_saved_context(hybrid, host_gpu, tmp_path):
    """device 'cuda' on the CPU stand-in (the kernels of native/delta.cu): the CPU's tokens, from a
    Context whose recurrent state lives on the device, built, then loaded from the bench's file."""
    with lowmoe.Engine.from_pretrained(hybrid) as e:
        want = e.generate(PROMPT, 6, stop_at_eos=False).tokens
    with lowmoe.Engine.from_pretrained(hybrid, device="cuda") as e:
        built, loaded = load_context(e, PROMPT, 6, str(tmp_path))
        again, loaded_again = load_context(e, PROMPT, 6, str(tmp_path))
        assert (loaded, loaded_again) == (False, True)
        for context in (built, again, built):
            assert list(e.stream_from(context, 6, stop_at_eos=False)) == want


def test_info_shows_the_linear_layers_and_the_state(hybrid, capsys):
    from lowmoe.cli.__main__ import main as cli

    assert cli(["info", hybrid, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["linear_attention_layers"] == [0, 2]  # full_attention_interval 2
    assert info["kv_bytes_per_token"] == 2 * 2 * 2 * 32 * 2  # 2 attention layers, k and v, 2 KV heads of 32, f16
    # per linear layer: the conv window of 3 inputs of 2*2*16 + 4*8 channels, the state [4, 16, 8]; f32
    assert info["state_bytes"] == 2 * (3 * 96 + 4 * 16 * 8) * 4
    assert cli(["info", hybrid, "--json", "--kv-dtype", "f32"]) == 0
    assert json.loads(capsys.readouterr().out)["kv_bytes_per_token"] == 2 * 2 * 2 * 32 * 4


def test_fused_experts_decode_as_per_expert_ones(hybrid, tmp_path):
    """The hub checkpoints' layout (experts.gate_up_proj [E, 2I, D], gate rows first, and
    experts.down_proj [E, D, I]): each expert read as byte ranges of those, resident, through the
    expert cache and from a packed copy (whose dense part leaves them out)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from lowmoe.load.config import load_model_config
    from lowmoe.tier.pack import pack_model

    cfg = load_model_config(hybrid)
    tensors = load_file(os.path.join(hybrid, "model.safetensors"))
    for layer in cfg.moe_layers:
        names = [cfg.expert_tensor_names(layer, e) for e in range(cfg.num_experts)]
        base = f"model.layers.{layer}.mlp.experts."
        tensors[base + "gate_up_proj"] = np.stack([np.concatenate([tensors[g], tensors[u]]) for g, u, _ in names])
        tensors[base + "down_proj"] = np.stack([tensors[d] for _, _, d in names])
        for n in sum(map(list, names), []):
            del tensors[n]
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file(tensors, str(fused / "model.safetensors"))
    shutil.copy(os.path.join(hybrid, "config.json"), fused)
    pack_model(str(fused), str(tmp_path / "packed"))
    dense = load_file(str(tmp_path / "packed" / "dense.safetensors"))
    assert not any(".experts." in n for n in dense)
    with lowmoe.Engine.from_pretrained(hybrid) as e:
        want = _run(e)
    for path, options in ((fused, {}), (fused, dict(expert_cache="min")), (tmp_path / "packed", dict(expert_cache="25%"))):
        with lowmoe.Engine.from_pretrained(str(path), **options) as e:
            tokens, logits = _run(e)
        assert tokens == want[0] and np.array_equal(logits, want[1]), (path, options)


def test_llama_cpps_gguf_decodes_as_the_checkpoint(hybrid):
    """tests/data/gguf/qwen3_5_moe_f32-f32.gguf, llama.cpp's converter's qwen35moe of this checkpoint:
    its norms stored with the 1 added, -exp(A_log) for A_log, the value heads tiled (computed in that
    order, so quantized out_proj columns never need moving): logits within 1e-4, the same 24 greedy
    tokens, resident and through the expert cache."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "gguf", "qwen3_5_moe_f32-f32.gguf")
    with lowmoe.Engine.from_pretrained(hybrid) as e:
        want_tokens, want_logits = _run(e, 24)
    for options in ({}, dict(expert_cache="min", predictor="nextgate")):
        with lowmoe.Engine.from_pretrained(path, **options) as e:
            assert e.config.tiled_value_heads and e.config.layer_mixers == ("linear", "attention") * 2
            tokens, logits = _run(e, 24)
        assert tokens == want_tokens
        assert np.abs(logits - want_logits).max() <= 1e-4 * np.abs(want_logits).max()


def test_predictors_fitted_on_it_change_no_output(hybrid, tmp_path):
    """train-predictor on the hybrid (hidden states of its Gated DeltaNet and attention layers alike):
    the learned predictor and pre-gate heads it fits predict, and decode the resident tokens."""
    import shutil

    from lowmoe.cli.__main__ import main as cli
    from lowmoe.predict.learned import Learned
    from lowmoe.predict.pregate import PreGate

    model = shutil.copytree(hybrid, tmp_path / "model")
    assert cli(["train-predictor", str(model), "--tokens", "160"]) == 0
    assert cli(["train-predictor", str(model), "--kind", "pregate", "--tokens", "160", "--write-into",
                str(tmp_path / "heads")]) == 0
    with lowmoe.Engine.from_pretrained(hybrid) as e:
        want_tokens, want_logits = _run(e)
    for path, kind in ((model, Learned), (tmp_path / "heads", PreGate)):
        with lowmoe.Engine.from_pretrained(str(path), expert_cache="min") as e:
            assert isinstance(e.model.predictor, kind)
            gen = e.generate(PROMPT, 12, stop_at_eos=False)
            logits = e.logits(PROMPT)
        assert gen.tokens == want_tokens and np.array_equal(logits, want_logits)
        assert gen.stats["topk_recall"] > 0.4 and gen.stats["prefetched"] > 0  # chance: 2 of 8, 0.25
