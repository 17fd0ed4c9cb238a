"""Training-free prediction: the next MoE layer's own router applied to this layer's state.

The residual stream changes little from one layer to the next, so layer N+1's gating on layer N's
post-attention residual (normalised with N+1's own post-attention norm) ranks N+1's experts well.
"""

import numpy as np

from ..backend import cpu
from . import next_moe_layers


class NextGate:
    def __init__(self, cfg, weights):
        self.cfg = cfg
        self.layers = weights.layers
        self.next = next_moe_layers(cfg)

    def predict(self, layer, h, chosen):
        nxt = self.next.get(layer)
        if nxt is None:
            return None
        w = self.layers[nxt]
        u = cpu.rms_norm(h, w.post_norm, self.cfg.rms_norm_eps)  # [1, D]
        logits = np.empty((1, w.router.w.shape[0]), np.float32)
        cpu.linear(u, w.router.w, w.router.dtype, logits)
        return nxt, np.argsort(-logits[0], kind="stable")
