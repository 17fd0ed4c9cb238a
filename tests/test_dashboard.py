"""The live dashboard renders the text, speed, occupancy and a row per MoE layer."""

import io

from rich.console import Console

import lowmoe
from lowmoe.cli.__main__ import main as cli
from lowmoe.cli.dashboard import Dashboard


def test_dashboard_renders_what_the_run_did():
    with lowmoe.Engine.from_pretrained(expert_cache="25%", predictor="nextgate") as e:
        dash = Dashboard(e)
        e.model.experts.on_event = dash
        tokens = []
        for t in e.stream(e.encode("In the beginning"), 6, stop_at_eos=False):
            tokens.append(t)
            dash.token(e.decode(tokens))
        console = Console(record=True, file=io.StringIO(), width=120)
        console.print(dash.render())
        out = console.export_text()
        slots = e.model.experts.plan.slots
        cached = len(e.model.experts.cache)
    assert e.decode(tokens).strip()[:20] in out
    assert "6 tokens" in out and f"cache {cached}/{slots} slots" in out
    for layer in e.config.moe_layers:
        assert f"\n│ {layer:>5} │" in out  # a row per MoE layer
    assert "total" in out


def test_dashboard_needs_an_expert_cache(capsys):
    assert cli(["decode", "--prompt-ids", "5,6", "--max-new-tokens", "2", "--dashboard"]) == 2
    assert "--expert-cache" in capsys.readouterr().err


def test_dashboard_from_the_cli(capsys):
    assert cli(["decode", "--prompt", "In the beginning", "--max-new-tokens", "5", "--expert-cache", "25%", "--dashboard"]) == 0
    out = capsys.readouterr().out
    assert "tok/s" in out and "total" in out
