"""`lowmoe bench` and the reusable prefilled Context it stands on: exact invariants only (the
bench's speeds are measurements, never asserted)."""

import gc
import json
import weakref

import numpy as np
import pytest

import lowmoe
from lowmoe.cli.benchmark import load_context, schedule, summarize
from lowmoe.cli.__main__ import main as cli
from lowmoe.errors import InputError

IDS = [int(t) for t in np.random.default_rng(3).integers(1, 4096, 40)]


@pytest.fixture(scope="module")
def engine():
    with lowmoe.Engine.from_pretrained() as e:
        yield e


def test_chunked_prefill_is_bitwise_one_shot(engine):
    whole = engine.prefill(IDS, room=8)
    chunked = engine.prefill(IDS, room=8, chunk=7)
    assert np.array_equal(whole.logits, chunked.logits)
    for i in range(engine.config.num_layers):
        assert np.array_equal(whole.kv.k[i][:, : len(IDS)], chunked.kv.k[i][:, : len(IDS)])
        assert np.array_equal(whole.kv.v[i][:, : len(IDS)], chunked.kv.v[i][:, : len(IDS)])


def test_a_context_serves_many_decodes(engine):
    expected = engine.generate(IDS, 12, stop_at_eos=False).tokens
    context = engine.prefill(IDS, room=12)
    for _ in range(2):  # the second decode must not see the first one's positions
        assert list(engine.stream_from(context, 12, stop_at_eos=False)) == expected


def test_context_cache_round_trip(engine, tmp_path):
    built, loaded = load_context(engine, IDS, 4, str(tmp_path))
    again, loaded_again = load_context(engine, IDS, 4, str(tmp_path))
    assert (loaded, loaded_again) == (False, True)
    assert np.array_equal(built.logits, again.logits) and again.length == len(IDS)
    for i in range(engine.config.num_layers):
        assert np.array_equal(built.kv.k[i][:, : len(IDS)], again.kv.k[i][:, : len(IDS)])
        assert np.array_equal(built.kv.v[i][:, : len(IDS)], again.kv.v[i][:, : len(IDS)])
    other, loaded_other = load_context(engine, IDS[:-1], 4, str(tmp_path))  # other ids: another key
    assert not loaded_other and other.length == len(IDS) - 1


def test_context_cache_damaged_file_is_rebuilt_and_unwritable_dir_is_one_error(engine, tmp_path):
    built, _ = load_context(engine, IDS, 4, str(tmp_path))
    (saved,) = tmp_path.glob("context-*.npz")
    saved.write_bytes(saved.read_bytes()[:1000])  # truncated
    again, loaded = load_context(engine, IDS, 4, str(tmp_path))
    assert not loaded and np.array_equal(again.logits, built.logits)
    assert load_context(engine, IDS, 4, str(tmp_path))[1]  # the rebuilt file is whole again
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(InputError, match="cannot save the context"):
        load_context(engine, IDS, 4, str(blocker / "sub"))


def test_summarize_medians_and_ratios():
    def run(tok_s, stall, nbytes, tokens=4):
        decode_s = tokens / tok_s
        return {"decode_tok_s": tok_s, "decode_s": decode_s, "decode_tokens": tokens, "stall_s": stall * decode_s,
                "bytes_read": nbytes, "topk_recall": 0.75, "prefetch_hit_rate": 0.5, "cache_hit_rate": 0.25}

    out = summarize({"reactive": [run(2.0, 0.5, 400), run(4.0, 0.3, 800), run(3.0, 0.4, 1200)],
                     "oracle": [run(6.0, 0.1, 400), run(9.0, 0.0, 400), run(5.0, 0.2, 400)]})
    r, o = out["reactive"], out["oracle"]
    assert (r["decode_tok_s"], r["ratio_to_reactive"], r["topk_recall"]) == (3.0, 1.0, None)
    assert (o["decode_tok_s"], o["ratio_to_reactive"], o["topk_recall"]) == (6.0, 2.0, 0.75)
    assert r["bytes_per_token"] == 200 and o["bytes_per_token"] == 100
    assert r["stall_fraction"] == pytest.approx(0.4) and o["stall_fraction"] == pytest.approx(0.1)
    assert r["runs"] == [2.0, 4.0, 3.0]


def test_schedule_puts_no_timed_run_after_a_none_run():
    assert schedule(["none", "reactive", "oracle"], 2) == [
        ("none", 0), ("none", 1), ("reactive", None), ("reactive", 0), ("oracle", 0), ("reactive", 1), ("oracle", 1)]
    assert schedule(["oracle"], 1) == [("oracle", None), ("oracle", 0)]
    assert schedule(["none"], 2) == [("none", 0), ("none", 1)]


def test_bench_json(tmp_path, capsys):
    """Every strategy decodes the resident run's tokens (the bench refuses otherwise); the oracle's
    recall is exactly 1; reactive reads every miss itself; `none` reads nothing."""
    args = ["bench", "--context", "48", "--new-tokens", "6", "--repeats", "2", "--expert-cache", "25%",
            "--context-cache", str(tmp_path), "--json"]
    assert cli(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["context"], out["expert_cache"], out["context_from_cache"]) == (48, "25%", False)
    s = out["strategies"]
    assert list(s) == ["none", "reactive", "nextgate", "history", "oracle"]
    for name, row in s.items():
        assert len(row["runs"]) == 2 and row["decode_tok_s"] == (row["runs"][0] + row["runs"][1]) / 2
        assert set(row) >= {"decode_tok_s", "ratio_to_reactive", "stall_fraction", "topk_recall",
                            "prefetch_hit_rate", "bytes_per_token", "runs"}
    assert s["reactive"]["ratio_to_reactive"] == 1.0 and s["reactive"]["prefetch_hit_rate"] == 0.0
    assert s["oracle"]["topk_recall"] == 1.0
    assert s["none"]["bytes_per_token"] == 0 and s["reactive"]["bytes_per_token"] > 0
    assert s["none"]["disk_gb_s"] is None and all(s[n]["disk_gb_s"] > 0 for n in s if n != "none")
    assert cli(args + ["--strategies", "reactive,oracle", "--repeats", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["context_from_cache"] is True


@pytest.mark.parametrize("extra, message", [
    (["--strategies", "reactive,psychic"], "strategy 'psychic'"),
    (["--strategies", "learned"], "moe_predictor.safetensors"),
    (["--strategies", "pregate"], "no pre-gate heads"),
    (["--context", "0"], "--context must be >= 1"),
    (["--expert-cache", "lots"], "lots"),
    (["--miss-policy", "cpu"], "give --device cuda"),
])
def test_bench_bad_input_is_one_line(extra, message, tmp_path, capsys):
    assert cli(["bench", "--context", "16", "--new-tokens", "2", "--context-cache", "none"] + extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


@pytest.mark.parametrize("var,value", [("SHARPI_EXPERT_CACHE", "25%"), ("SHARPI_VRAM_BUDGET", "12GiB")])
def test_bench_refuses_an_expert_cache_from_the_environment(var, value, monkeypatch, capsys):
    monkeypatch.setenv(var, value)
    assert cli(["bench", "--context", "16", "--context-cache", "none"]) == 2
    assert f"unset {var}" in capsys.readouterr().err


def test_bench_prompt_file_too_short(tmp_path, capsys):
    prompt = tmp_path / "short.txt"
    prompt.write_text("In the beginning")
    assert cli(["bench", "--context", "500", "--prompt-file", str(prompt), "--context-cache", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(prompt) in err and "fewer than the context of 500" in err


def test_a_forced_decode_takes_the_given_tokens_and_digests_their_logits(engine):
    """stream_from(forced=ids) yields the ids and computes each step's logits as a full-sequence
    forward over the context and the ids would (digested: the same bytes give the same digest)."""
    import hashlib

    forced = [int(t) for t in np.random.default_rng(5).integers(1, 4096, 6)]
    context = engine.prefill(IDS, room=6)
    stats = {}
    assert list(engine.stream_from(context, 6, stop_at_eos=False, stats=stats, forced=forced)) == forced
    full = engine.logits(IDS + forced)[len(IDS) : len(IDS) + 5]  # after forced[0] .. forced[4]
    steps = hashlib.sha256()
    kv, step_logits = context.kv, []
    kv.length = context.length
    for t in forced[:5]:
        step_logits.append(engine.model.forward(np.array([t], np.int64), kv))
        steps.update(step_logits[-1].tobytes())
    assert stats["logits_sha256"] == steps.hexdigest()
    assert np.abs(np.concatenate(step_logits) - full).max() <= 1e-4 * np.abs(full).max()
    with pytest.raises(InputError, match="5 forced token ids for 6 new tokens"):
        list(engine.stream_from(context, 6, forced=forced[:5]))


def test_bench_along_a_text(tmp_path, capsys):
    """--text: every strategy decodes along the text's tokens, and its logits' digest equals the
    resident run's (the bench refuses otherwise); a text shorter than --new-tokens is one line."""
    text = tmp_path / "text.txt"
    text.write_text("And God said, Let there be light: and there was light. And God saw the light, that it was good.")
    args = ["bench", "--context", "32", "--new-tokens", "8", "--repeats", "1", "--expert-cache", "25%",
            "--strategies", "none,reactive,nextgate,oracle", "--context-cache", "none", "--json"]
    assert cli(args + ["--text", str(text)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] == str(text) and out["strategies"]["oracle"]["topk_recall"] == 1.0
    assert out["strategies"]["reactive"]["cache_hit_rate"] < 1
    text.write_text("And God said")
    assert cli(args + ["--text", str(text)]) == 2
    assert "fewer than --new-tokens of 8" in capsys.readouterr().err


def test_bench_without_a_resident_engine(tmp_path, capsys, monkeypatch):
    """--no-resident: no engine ever holds every expert (the reference is a reactive run through the
    budget's cache); each strategy decodes the reference's tokens, the oracle replays its routing;
    asking for 'none' is one line."""
    from lowmoe.tier import experts

    held, alive, others = [], weakref.WeakSet(), []
    resident_init, offloaded_init = experts.ResidentExperts.__init__, experts.OffloadedExperts.__init__
    monkeypatch.setattr(experts.ResidentExperts, "__init__", lambda self, *a, **k: held.append(1) or resident_init(self, *a, **k))

    def offloaded(self, *a, **k):  # how many other expert caches are still alive when one is made
        gc.collect()
        others.append(len(alive))
        alive.add(self)
        offloaded_init(self, *a, **k)

    monkeypatch.setattr(experts.OffloadedExperts, "__init__", offloaded)
    args = ["bench", "--context", "32", "--new-tokens", "6", "--repeats", "1", "--expert-cache", "25%",
            "--context-cache", "none", "--no-resident", "--json"]
    assert cli(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["resident"] is False and "none" not in out["strategies"] and not held
    assert len(others) == 1 + len(out["strategies"]) + 1 and max(others) == 0  # one budget's slots at a time
    assert out["strategies"]["oracle"]["topk_recall"] == 1.0
    assert cli(args + ["--strategies", "none,reactive"]) == 2
    assert "leave it out with --no-resident" in capsys.readouterr().err


def test_bench_leaves_out_the_resident_run_when_every_expert_would_not_fit(tmp_path, capsys, monkeypatch):
    """With less memory left than the weights and the KV cache (faked here), the bench runs as with
    --no-resident, says so in one line, and reports its peak resident set."""
    from lowmoe.tier import experts, host_memory

    held = []
    resident_init = experts.ResidentExperts.__init__
    monkeypatch.setattr(experts.ResidentExperts, "__init__", lambda self, *a, **k: held.append(1) or resident_init(self, *a, **k))
    free = {"bytes": 10 << 20}  # less than the bundled model's 24 MB of weights
    monkeypatch.setattr(host_memory, "available_bytes", lambda: free["bytes"])
    args = ["bench", "--context", "32", "--new-tokens", "4", "--repeats", "1", "--expert-cache", "25%",
            "--context-cache", "none", "--strategies", "reactive,oracle", "--json"]
    assert cli(args) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["resident"] is False and not held and "as with --no-resident" in err
    assert [line for line in err.splitlines() if line.strip()] == [err.strip()]  # one line
    assert 0 < result["peak_rss_bytes"] < 64 << 30
    free["bytes"] = 1 << 40  # room to spare: the resident reference again
    assert cli(args) == 0
    assert json.loads(capsys.readouterr().out)["resident"] is True and held
