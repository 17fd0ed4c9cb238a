"""Pre-gate heads shipped in a checkpoint: loaded, used by default instead of any other predictor,
output unchanged; a wrong shape or a head on the last MoE layer is rejected."""

import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

import lowmoe
from lowmoe.backend import cpu
from lowmoe.predict.pregate import PreGate

PROMPT = [5, 17, 300, 42, 9, 77, 1000, 3]


def _with_heads(tmp_path, heads):
    """A copy of the bundled model plus a shard holding `heads` {layer: f32[E, D]}."""
    path = str(tmp_path / "m")
    shutil.copytree(lowmoe.DEFAULT_MODEL, path)
    save_file({f"model.layers.{l}.mlp.pre_gate.weight": w for l, w in heads.items()}, os.path.join(path, "pre_gate.safetensors"))
    return path


def _router_heads(engine):
    """Heads equal to the next layer's router: a plausible, planted pre-gate."""
    cfg, layers = engine.config, engine.model.w.layers
    return {l: cpu.to_f32(layers[n].router.w, layers[n].router.dtype) for l, n in zip(cfg.moe_layers, cfg.moe_layers[1:])}


def test_heads_replace_the_predictor_and_keep_output(tmp_path):
    with lowmoe.Engine.from_pretrained() as e:
        ref = e.generate(PROMPT, 12, stop_at_eos=False).tokens
        heads = _router_heads(e)
    path = _with_heads(tmp_path, heads)
    for budget, lookahead, refine in (("min", 1, True), ("min", 2, True), ("25%", 2, True), ("25%", 1, False)):
        with lowmoe.Engine.from_pretrained(path, expert_cache=budget, lookahead=lookahead, refine=refine) as e:
            assert isinstance(e.model.predictor, PreGate)
            gen = e.generate(PROMPT, 12, stop_at_eos=False)
        assert gen.tokens == ref
    assert gen.stats["prefetched"] > 0 and gen.stats["topk_recall"] > 0.5
    per_layer = {s["layer"]: s for s in gen.stats["per_layer"]}
    # the heads alone (no refinement) predict every MoE layer after the first, and not the first
    assert per_layer[7]["topk_recall"] > 0 and per_layer[0]["topk_recall"] == 0


def test_wrong_shape_and_last_layer_are_rejected(tmp_path):
    with lowmoe.Engine.from_pretrained() as e:
        D, E = e.config.hidden_size, e.config.num_experts
    bad = _with_heads(tmp_path / "a", {2: np.zeros((E, D + 1), np.float32)})
    with pytest.raises(lowmoe.CheckpointError, match=r"model\.layers\.2\.mlp\.pre_gate\.weight.*shape"):
        lowmoe.Engine.from_pretrained(bad)
    last = _with_heads(tmp_path / "b", {7: np.zeros((E, D), np.float32)})
    with pytest.raises(lowmoe.CheckpointError, match="last MoE layer"):
        lowmoe.Engine.from_pretrained(last)
    with pytest.raises(lowmoe.InputError, match="pre_gate"):
        lowmoe.Engine.from_pretrained(expert_cache="25%", predictor="pregate")


def test_train_predictor_fits_heads_into_a_copy(tmp_path, capsys):
    from lowmoe.cli.__main__ import main as cli

    copy = str(tmp_path / "copy")
    before = sorted(os.listdir(lowmoe.DEFAULT_MODEL))
    assert cli(["train-predictor", "--kind", "pregate", "--tokens", "200", "--write-into", copy]) == 0
    assert sorted(os.listdir(lowmoe.DEFAULT_MODEL)) == before  # the original is untouched
    with lowmoe.Engine.from_pretrained() as e:
        ref = e.generate(PROMPT, 12, stop_at_eos=False).tokens
    with lowmoe.Engine.from_pretrained(copy, expert_cache="25%") as e:
        assert isinstance(e.model.predictor, PreGate)
        gen = e.generate(PROMPT, 12, stop_at_eos=False)
    assert gen.tokens == ref and gen.stats["topk_recall"] > 0.5
    assert cli(["train-predictor", "--kind", "pregate", "--write-into", lowmoe.DEFAULT_MODEL]) == 2
    assert cli(["train-predictor", "--kind", "pregate"]) == 2
    capsys.readouterr()
