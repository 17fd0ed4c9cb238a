"""Prediction from co-activation counts: which experts of layer N+1 followed the experts layer N
just chose, counted online over the run. Needs no hidden state and no weights."""

import numpy as np

from . import next_moe_layers


class History:
    def __init__(self, cfg):
        self.next = next_moe_layers(cfg)
        self.prev = {n: p for p, n in self.next.items()}
        E = cfg.num_experts
        self.counts = {layer: np.zeros((E, E), np.int64) for layer in self.next}  # [expert of N, expert of N+1]
        self.last = {}  # layer -> experts it chose at this token

    def predict(self, layer, h, chosen):
        prev = self.prev.get(layer)
        if prev in self.last:
            self.counts[prev][np.ix_(self.last[prev], chosen)] += 1  # learn from this token
        self.last[layer] = chosen
        nxt = self.next.get(layer)
        if nxt is None:
            return []
        return [(nxt, np.argsort(-self.counts[layer][chosen].sum(0), kind="stable"))]
