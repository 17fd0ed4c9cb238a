"""The upper bound for benchmarks: replays the true routing of an earlier run of the same input
(greedy decoding routes identically whatever the cache, so the recording fits the replay)."""

import numpy as np

from . import next_moe_layers


class Recorder:
    """Records, without hinting, the experts every MoE layer chose at each decode step."""

    def __init__(self, cfg):
        self.first = cfg.moe_layers[0]
        self.routes = []  # per decode step: {layer: chosen experts}

    def predict(self, layer, h, chosen):
        if layer == self.first:
            self.routes.append({})
        self.routes[-1][layer] = chosen.copy()
        return []


class Oracle:
    def __init__(self, cfg, routes, lookahead=1):
        self.ahead = [next_moe_layers(cfg, d) for d in range(1, lookahead + 1)]
        self.first = cfg.moe_layers[0]
        self.experts = cfg.num_experts
        self.routes = routes
        self.step = -1

    @classmethod
    def from_trace(cls, cfg, path, lookahead=1):
        """The routing recorded in a `lowmoe decode --trace` file (see trace.py)."""
        from ..trace import read_trace

        _, events = read_trace(path)
        routes = {}
        for ev in events:
            routes.setdefault(ev.token, {})[ev.layer] = ev.chosen
        return cls(cfg, [routes[t] for t in sorted(routes)], lookahead)

    def predict(self, layer, h, chosen):
        if layer == self.first:
            self.step += 1
        hints = []
        for later in self.ahead:
            target = later.get(layer)
            if target is None or self.step >= len(self.routes):
                break
            true = [int(e) for e in self.routes[self.step][target]]
            hints.append((target, np.array(true + [e for e in range(self.experts) if e not in true])))
        return hints
