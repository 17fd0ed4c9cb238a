"""Expert prediction: hints change speed, never results or the cache's decisions; recall stats
agree with a recount from the recorded routing."""

import threading

import numpy as np
import pytest

import lowmoe
from lowmoe.predict.oracle import Oracle, Recorder

PROMPT = [5, 17, 300, 42, 9, 77, 1000, 3, 12, 250, 8, 64]
NEW = 16


@pytest.fixture(scope="module")
def reference():
    with lowmoe.Engine.from_pretrained() as e:
        gen = e.generate(PROMPT, NEW, stop_at_eos=False)
        return gen.tokens, e.logits(PROMPT + gen.tokens[:4])


class Wrong:
    """Ranks the next layer's experts in the reverse of nextgate's order: mostly wrong hints."""

    def __init__(self, engine):
        self.inner = engine.model.predictor

    def predict(self, layer, h, chosen):
        return [(later, ranked[::-1]) for later, ranked in self.inner.predict(layer, h, chosen)]


@pytest.mark.parametrize("lookahead", [1, 2])
@pytest.mark.parametrize("budget", ["min", "25%"])
@pytest.mark.parametrize("predictor", ["none", "nextgate", "history", "wrong", "nextgate unrefined"])
def test_output_identical_for_every_predictor(predictor, budget, lookahead, reference):
    name = {"wrong": "nextgate", "nextgate unrefined": "nextgate"}.get(predictor, predictor)
    with lowmoe.Engine.from_pretrained(expert_cache=budget, lookahead=lookahead, predictor=name,
                                       refine=predictor != "nextgate unrefined") as e:
        assert e.model.experts.plan.staging == 4 * lookahead
        if predictor == "wrong":
            e.model.predictor = Wrong(e)
        gen = e.generate(PROMPT, NEW, stop_at_eos=False)
        assert gen.tokens == reference[0]
        assert np.array_equal(e.logits(PROMPT + gen.tokens[:4]), reference[1])
        if predictor in ("nextgate", "history"):
            assert gen.stats["prefetched"] > 0


def _cache_states(engine):
    """The cache's (key -> segment) after every decode step."""
    cache, states = engine.model.experts.cache, []
    for _ in engine.stream(PROMPT, NEW, stop_at_eos=False):
        states.append({k: cache.segment(k) for k in list(cache._prob) + list(cache._prot)})
    return states


@pytest.mark.parametrize("predictor", ["nextgate", "wrong"])
def test_hints_never_change_what_the_cache_holds(predictor):
    """Hints only read into staging slots: after every step the cache holds the same experts in the
    same segments as the reactive run (slot ids may differ: admission swaps them)."""
    with lowmoe.Engine.from_pretrained(expert_cache="25%", predictor="none") as e:
        reactive = _cache_states(e)
    with lowmoe.Engine.from_pretrained(expert_cache="25%", predictor="nextgate") as e:
        if predictor == "wrong":
            e.model.predictor = Wrong(e)
        assert _cache_states(e) == reactive


def test_a_cache_of_every_expert_keeps_the_hints_it_read():
    """Where every expert fits, an unchosen hint's finished read stays cached (nothing is
    evicted for it): after every step the cache holds all the reactive run holds, and more."""
    with lowmoe.Engine.from_pretrained(expert_cache="100%", predictor="none") as e:
        reactive = _cache_states(e)
    with lowmoe.Engine.from_pretrained(expert_cache="100%", predictor="nextgate") as e:
        e.model.predictor = Wrong(e)
        kept = _cache_states(e)
    assert all(r.keys() <= k.keys() for r, k in zip(reactive, kept))
    assert any(len(k) > len(r) for r, k in zip(reactive, kept))


@pytest.mark.parametrize("refine", [False, True])
def test_recall_and_prefetch_stats_match_a_recount(refine):
    """topk_recall and recall_at_2k count the final hints (refined on each layer's input, or the
    predictor's own), early_topk_recall the predictor's; the refinement, which ranks with the
    layer's own router on its actual input, beats nextgate's ranking from the layer before, and is
    the only prediction of the first MoE layer."""
    with lowmoe.Engine.from_pretrained(expert_cache="25%", predictor="nextgate", refine=refine) as e:
        early, final, chosen = {}, {}, {}
        experts = e.model.experts
        inner_predict, inner_forward, inner_refine = e.model.predictor.predict, experts.forward, experts.refine_hint

        def predict(layer, h, c):
            hints = inner_predict(layer, h, c)
            for later, ranked in hints:
                early.setdefault(later, []).append(ranked)
            return hints

        def refine_hint(layer, ranked):
            final.setdefault(layer, []).append(ranked)
            return inner_refine(layer, ranked)

        def forward(layer, u, idx, w):
            if len(u) == 1:
                chosen.setdefault(layer, []).append(set(idx[0].tolist()))
            return inner_forward(layer, u, idx, w)

        e.model.predictor.predict, experts.forward, experts.refine_hint = predict, forward, refine_hint
        stats = e.generate(PROMPT, NEW, stop_at_eos=False).stats
    k = e.config.top_k
    first = e.config.moe_layers[0]
    hints = final if refine else early

    def recount(ranks, width):
        out = []
        for layer, preds in ranks.items():
            for ranked, c in zip(preds, chosen[layer][-len(preds):]):
                out.append(len(set(ranked[:width].tolist()) & c) / k)
        return np.mean(out)

    # stats cover the decode steps after prefill; the recount covers the same forwards
    assert stats["topk_recall"] == pytest.approx(recount(hints, k))
    assert stats["recall_at_2k"] == pytest.approx(recount(hints, 2 * k))
    assert stats["early_topk_recall"] == pytest.approx(recount({**early, first: hints.get(first, [])}, k))
    assert stats["topk_recall"] > 0.5  # the trained router predicts its next layer well
    per_layer = {s["layer"]: s for s in stats["per_layer"]}
    if refine:
        assert stats["topk_recall"] > stats["early_topk_recall"]
        assert per_layer[first]["topk_recall"] > 0.25  # chance: 4 of 16
    else:
        assert not final and per_layer[first]["topk_recall"] == 0.0  # nothing predicts the first layer
    used = stats["hits"] + stats["prefetched"] + stats["misses"]
    assert stats["prefetch_hit_rate"] == pytest.approx(stats["prefetched"] / used)


def test_oracle_replays_a_trace_with_perfect_recall(tmp_path, capsys):
    import json

    from lowmoe.cli.__main__ import main as cli

    trace = str(tmp_path / "run.jsonl")
    args = ["decode", "--prompt-ids", "5,17,300,42", "--max-new-tokens", "10", "--expert-cache", "25%", "--json"]
    assert cli(args + ["--trace", trace]) == 0
    first = json.loads(capsys.readouterr().out)
    for extra in (["--lookahead", "2"], ["--expert-cache", "min"], ["--expert-cache", "min", "--lookahead", "2"]):
        assert cli(args + ["--predictor", "oracle", "--oracle-trace", trace] + extra) == 0
        assert json.loads(capsys.readouterr().out)["tokens"] == first["tokens"]
    assert cli(args + ["--predictor", "oracle", "--oracle-trace", trace]) == 0
    oracle = json.loads(capsys.readouterr().out)
    assert oracle["tokens"] == first["tokens"]
    assert oracle["topk_recall"] == 1.0
    assert all(s["topk_recall"] == 1.0 for s in oracle["per_layer"][1:])
    assert cli(args + ["--predictor", "oracle"]) == 2
    assert "oracle_trace" in capsys.readouterr().err


def test_lookahead_two_hints_two_layers_ahead(reference):
    with lowmoe.Engine.from_pretrained(expert_cache="25%", predictor="nextgate", lookahead=2) as e:
        layers = e.config.moe_layers
        hints = e.model.predictor.predict(layers[0], np.ones((1, e.config.hidden_size), np.float32), None)
        assert [h[0] for h in hints] == layers[1:3]
        assert e.model.predictor.predict(layers[-2], np.ones((1, e.config.hidden_size), np.float32), None)[0][0] == layers[-1]
        gen = e.generate(PROMPT, NEW, stop_at_eos=False)
    assert gen.tokens == reference[0] and gen.stats["prefetched"] > 0


class GatedStore:
    """Wraps a store: records the order of reads; the first blocks until `gate` is set."""

    def __init__(self, store):
        self.store, self.layout = store, store.layout
        self.gate, self.order = threading.Event(), []

    def read(self, layer, expert, dest):
        self.order.append((layer, expert))
        if len(self.order) == 1:
            self.gate.wait(5)
        return self.store.read(layer, expert, dest)

    def close(self):
        self.store.close()


def test_hints_read_in_need_order_and_two_layers_ahead_only_on_an_idle_disk():
    with lowmoe.Engine.from_pretrained(expert_cache="25%", predictor="nextgate", lookahead=2) as e:
        ex, layers, k = e.model.experts, e.config.moe_layers, e.config.top_k
        store = ex.tier.store = GatedStore(ex.tier.store)
        ranked = np.arange(e.config.num_experts)[::-1]
        ex.hint(layers[2], ranked, 2)  # the disk is idle: N+2's hints read
        while not store.order:
            pass
        ex.hint(layers[3], ranked, 2)  # busy: nothing more for two layers ahead
        ex.hint(layers[1], ranked, 1)  # the next layer's hints queue ahead of N+2's
        assert sorted(ex.staged) == sorted((layer, int(x)) for layer in layers[1:3] for x in ranked[:k])
        store.gate.set()
        for req in ex.staged.values():
            ex.reader.wait(req)
        first = (layers[2], int(ranked[0]))
        assert store.order == [first] + [(layers[1], int(x)) for x in ranked[:k]] + [
            (layers[2], int(x)) for x in ranked[1:k]]


class LastRankWrong:
    """The true routing (from a Recorder run) in its first k-1 ranks, and an expert that was not
    chosen in the last rank: ranks 1..k-1 always come true, rank k never."""

    def __init__(self, cfg, routes):
        self.oracle = Oracle(cfg, routes)

    def predict(self, layer, h, chosen):
        hints = []
        for later, ranked in self.oracle.predict(layer, h, chosen):
            k = len(chosen)
            hints.append((later, np.concatenate([ranked[: k - 1], ranked[k:], ranked[k - 1 : k]])))
        return hints


def test_hints_narrow_to_the_ranks_that_come_true():
    with lowmoe.Engine.from_pretrained(expert_cache="100%", predictor="none") as e:
        e.model.predictor = recorder = Recorder(e.config)
        expected = e.generate(PROMPT, NEW, stop_at_eos=False).tokens
    with lowmoe.Engine.from_pretrained(expert_cache="25%", predictor="none") as e:
        ex, k = e.model.experts, e.config.top_k
        e.model.predictor = LastRankWrong(e.config, recorder.routes)
        assert ex.hint_width() == k  # no evidence yet: every rank is trusted
        assert e.generate(PROMPT, NEW, stop_at_eos=False).tokens == expected
        seen = (NEW - 1) * (len(e.config.moe_layers) - 1)
        assert ex.rank_seen["early"] == seen and ex.rank_right["early"].tolist() == [seen] * (k - 1) + [0]
        assert ex.hint_width() == k - 1 and ex.hint_width("refined") == k  # refinement is off here


def test_token_table_keeps_each_tokens_last_routing_and_ranks_it_first():
    from lowmoe.predict.first_layer import TokenTable

    table = TokenTable(10, 2)
    table.update(np.array([3, 5, 3]), np.array([[1, 2], [7, 0], [4, 6]]))
    ranked = np.array([6, 0, 1, 2, 3, 4, 5, 7])
    assert table.rank(3, ranked).tolist() == [4, 6, 0, 1, 2, 3, 5, 7]  # the last of token 3's routings
    assert table.rank(5, ranked).tolist() == [7, 0, 6, 1, 2, 3, 4, 5]
    assert table.rank(9, ranked) is ranked  # never seen: the router's ranking


def test_the_first_moe_layer_is_predicted_from_the_token_table():
    """The prefill's and each step's first-layer routing fill the table; a prompt whose tokens come
    back gets a better first-layer recall than the router on the embedding alone, the same output."""
    from lowmoe.predict.first_layer import TokenTable

    prompt = PROMPT * 3
    recalls, outputs = {}, []
    for use_table in (False, True):
        with lowmoe.Engine.from_pretrained(expert_cache="25%", predictor="nextgate") as e:
            first = e.config.moe_layers[0]
            if not use_table:
                e.model.first.rank = lambda token, ranked: ranked
            gen = e.generate(prompt, NEW, stop_at_eos=False)
            table = e.model.first
        outputs.append(gen.tokens)
        recalls[use_table] = {s["layer"]: s["topk_recall"] for s in gen.stats["per_layer"]}[first]
        assert isinstance(table, TokenTable) and (table.experts[prompt] >= 0).all()
    assert recalls[True] > recalls[False] and outputs[0] == outputs[1]
