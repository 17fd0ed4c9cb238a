"""Routed experts of the MoE layers and the weighted sum of their outputs.

Today every expert is resident in host memory in its stored dtype; this is the seam where the
expert cache and the slow tier plug in: `forward` asks for the experts the gating chose and
combines their outputs.
"""

import numpy as np

from .backend import cpu
from .weights import load_expert


class ResidentExperts:
    def __init__(self, ckpt, cfg):
        # weights[layer][expert]: FFN with gate, up [I, D], down [D, I] as stored.
        self.weights = {l: [load_expert(ckpt, cfg, l, e) for e in range(cfg.num_experts)] for l in cfg.moe_layers}

    def forward(self, layer, u, idx, w):
        """u f32[T, D]; idx int64[T, k] chosen experts; w f32[T, k] their weights -> f32[T, D].

        Tokens are grouped by expert so each expert's weights are streamed once per call.
        """
        out = np.zeros_like(u)
        for e in np.unique(idx):
            rows, slot = np.nonzero(idx == e)
            f = self.weights[layer][e]
            y = np.empty((len(rows), u.shape[1]), dtype=np.float32)
            cpu.expert_ffn(np.ascontiguousarray(u[rows]), f.gate, f.up, f.down, f.dtype, y)
            out[rows] += w[rows, slot][:, None] * y
        return out
