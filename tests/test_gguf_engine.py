"""An Engine on a GGUF file that llama.cpp's converter wrote (tests/data/gguf): the bf16 file of the
Mixtral test checkpoint decodes exactly as the checkpoint does, with every expert resident and
through the expert cache; `lowmoe decode FILE.gguf`; formats the expert tier cannot read yet are a
one-line error."""

import os

import numpy as np
import pytest

import lowmoe
from lowmoe.cli.__main__ import main as cli

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


def test_quantized_experts_are_a_one_line_error(capsys):
    path = os.path.join(DATA, "mixtral_bf16_sharded-q8_0.gguf")
    assert cli(["decode", path, "--prompt-ids", "5,17", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{path}: routed experts in q8_0" in err and "\n" not in err


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
