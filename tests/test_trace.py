"""Expert cache trace: the JSONL file, its reader, and the summary agree with the run's stats."""

import contextlib
import io
import json

import pytest

from lowmoe.cli.__main__ import main as cli
from lowmoe.trace import read_trace, summarize

DECODE = ["decode", "--prompt-ids", "5,6,7", "--max-new-tokens", "8", "--expert-cache", "25%"]


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """(trace path, the run's --json object, its stderr) of one traced decode of the bundled model,
    with SHARPI_TRACE_MOE naming another path that --trace overrides."""
    folder = tmp_path_factory.mktemp("trace")
    path, env_path = folder / "run.jsonl", folder / "env.jsonl"
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setenv("SHARPI_TRACE_MOE", str(env_path))
        assert cli(DECODE + ["--trace", str(path), "--json"]) == 0
    assert not env_path.exists()
    return path, json.loads(out.getvalue()), err.getvalue()


def test_trace_matches_run_stats(traced):
    path, run, _ = traced
    header, events = read_trace(path)
    assert header == {"lowmoe_trace": 1, "model": header["model"], "expert_cache": "25%", "predictor": "nextgate"}
    # The first new token comes from the prefill; each later one is a decode step through 8 MoE layers.
    assert len(events) == (8 - 1) * 8 == run["decode_tokens"] * 8
    assert sorted({(e.token, e.layer) for e in events}) == [(t, l) for t in range(7) for l in range(8)]
    rows = summarize(events)
    total = rows[-1]
    assert total["layer"] == "total" and total["tokens"] == 7
    for key in ("topk_recall", "prefetch_hit_rate", "cache_hit_rate"):
        assert total[key] == pytest.approx(run[key])
    assert [r["layer"] for r in rows[:-1]] == [r["layer"] for r in run["per_layer"]]
    for mine, theirs in zip(rows, run["per_layer"]):
        for key in ("hits", "prefetched", "misses", "wasted_bytes"):
            assert mine[key] == theirs[key], (mine["layer"], key)
        for key in ("topk_recall", "prefetch_hit_rate", "cache_hit_rate", "stall_s"):
            assert mine[key] == pytest.approx(theirs[key]), (mine["layer"], key)


def test_trace_command_prints_the_same_rows(traced, capsys):
    path, _, _ = traced
    assert cli(["trace", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(summarize(read_trace(path)[1])))
    assert cli(["trace", str(path)]) == 0
    assert "total" in capsys.readouterr().out


def test_env_prints_table_on_stderr(traced, monkeypatch, capsys):
    assert "total" in traced[2] and "recall" in traced[2]  # a path in the variable: JSONL and table
    monkeypatch.setenv("SHARPI_TRACE_MOE", "1")
    assert cli(["decode", "--prompt-ids", "5,6,7", "--max-new-tokens", "2", "--expert-cache", "25%", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["tokens"] and "total" in err and "recall" in err
    # not a terminal: the table at its natural width, every header whole (rich alone cuts it at 80)
    assert "…" not in err and all(h in err for h in ("prefetched", "read MiB", "waste MiB"))


def test_malformed_and_missing_files(traced, tmp_path, capsys):
    lines = traced[0].read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:2] + ["{not json"] + lines[3:]) + "\n")
    assert cli(["trace", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:3:" in err and len(err.strip().splitlines()) == 1
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text("\n".join(lines[:3] + [lines[3].replace('"hits": ', '"hits": "x", "_": ')]) + "\n")
    assert cli(["trace", str(wrong)]) == 2
    assert f"{wrong}:4:" in capsys.readouterr().err
    assert cli(["trace", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "missing.jsonl" in err and len(err.strip().splitlines()) == 1


def test_trace_needs_an_expert_cache(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("SHARPI_EXPERT_CACHE", raising=False)
    assert cli(["decode", "--prompt-ids", "5,6,7", "--max-new-tokens", "2", "--trace", str(tmp_path / "t.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "--expert-cache" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "t.jsonl").exists()


def test_expert_stats_file(tmp_path, monkeypatch, capsys):
    path = tmp_path / "stats.json"
    monkeypatch.setenv("SHARPI_EXPERT_STATS", str(path))
    assert cli(["decode", "--prompt-ids", "5,6,7", "--max-new-tokens", "6", "--expert-cache", "25%", "--json"]) == 0
    run = json.loads(capsys.readouterr().out)
    data = json.loads(path.read_text())
    assert data["per_layer"] == run["per_layer"]
    for layer, top in data["hottest_experts"].items():
        uses = [n for _, n in top]
        assert uses == sorted(uses, reverse=True) and sum(uses) <= 5 * 4  # 5 decode steps x top-4
        assert sum(uses) == 5 * 4 or len(top) == 8
