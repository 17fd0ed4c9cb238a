"""The bundled model: it matches transformers, it decodes text from the CLI, and its routing is
trained (every MoE layer uses all of its experts on real text)."""

import json

import numpy as np
import pytest

import lowmoe
from lowmoe.cli.__main__ import main as cli

TEXT = "And God said unto Moses, I AM THAT I AM: and he said, Thus shalt thou say unto the children of Israel."


@pytest.fixture(scope="module")
def engine():
    return lowmoe.Engine.from_pretrained()


def test_bundled_model_matches_transformers(engine):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ids = engine.encode(TEXT)
    model = transformers.AutoModelForCausalLM.from_pretrained(lowmoe.DEFAULT_MODEL, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    got = engine.logits(ids)
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 2e-3  # bf16 weights


def test_decode_cli_streams_text(capsys):
    assert cli(["decode", "In the beginning", "--max-new-tokens", "12"]) == 0
    text = capsys.readouterr().out
    assert len(text.strip()) > 0
    assert cli(["decode", "--prompt", "In the beginning", "--max-new-tokens", "12", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["tokens"]) == 12 and out["text"] and out["decode_tok_s"] > 0
    assert text.strip() == out["text"].strip()


def test_every_layer_uses_all_experts(engine):
    """Routing comes from training: on held-in text each MoE layer picks every expert, none hogs."""
    cfg = engine.config
    ids = np.array(engine.encode(TEXT * 6), np.int64)
    counts = np.zeros((cfg.num_layers, cfg.num_experts), np.int64)

    class Recorder:
        def forward(self, layer, u, idx, weights):
            np.add.at(counts[layer], idx.reshape(-1), 1)
            return experts.forward(layer, u, idx, weights)

    experts = engine.model.experts
    engine.model.experts = Recorder()
    try:
        engine.logits(ids)
    finally:
        engine.model.experts = experts
    share = counts / counts.sum(1, keepdims=True)
    assert (counts[cfg.moe_layers] > 0).all(), counts
    assert share.max() < 4.0 / cfg.num_experts, share.max()
