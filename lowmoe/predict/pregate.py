"""Phase 2: pre-gate heads shipped in the checkpoint. `model.layers.{N}.mlp.pre_gate.weight`
[experts of the next MoE layer, hidden] scores the next MoE layer's experts from layer N's MoE
input (its post-attention state after N's own norm: what N's router reads). When a checkpoint has
them they replace every other predictor."""

import numpy as np

from ..backend import cpu
from . import next_moe_layers


def has_heads(weights):
    return any(layer.pre_gate is not None for layer in weights.layers)


class PreGate:
    def __init__(self, cfg, weights):
        self.cfg = cfg
        self.layers = weights.layers
        self.next = next_moe_layers(cfg)

    def predict(self, layer, h, chosen):
        head = self.layers[layer].pre_gate
        if head is None:
            return []
        u = cpu.rms_norm(h, self.layers[layer].post_norm, self.cfg.rms_norm_eps)  # [1, D]
        logits = np.empty((1, head.w.shape[0]), np.float32)
        cpu.linear(u, head.w, head.dtype, logits)
        return [(self.next[layer], np.argsort(-logits[0], kind="stable"))]
