"""Routed experts of the MoE layers and the weighted sum of their outputs.

Today every expert is resident in host memory in its stored dtype; this is the seam where the
expert cache and the slow tier plug in: `forward` asks for the experts the gating chose and
combines their outputs.
"""

import numpy as np

from .backend import cpu
from .weights import KERNEL_DTYPE, expert_infos


class ResidentExperts:
    def __init__(self, ckpt, cfg):
        # weights[layer][expert] = (gate [I, D], up [I, D], down [D, I]) as stored.
        self.weights = {}
        self.dtype = {}
        for layer in cfg.moe_layers:
            experts = []
            for e in range(cfg.num_experts):
                infos = expert_infos(ckpt, cfg, layer, e)
                experts.append(tuple(ckpt.read(t.name)[0] for t in infos))
                self.dtype[layer] = KERNEL_DTYPE[infos[0].dtype]
            self.weights[layer] = experts
        self.nbytes = sum(a.nbytes for ex in self.weights.values() for w in ex for a in w)

    def forward(self, layer, u, idx, w):
        """u f32[T, D]; idx int64[T, k] chosen experts; w f32[T, k] their weights -> f32[T, D].

        Tokens are grouped by expert so each expert's weights are streamed once per call.
        """
        out = np.zeros_like(u)
        for e in np.unique(idx):
            rows, slot = np.nonzero(idx == e)
            gate, up, down = self.weights[layer][e]
            y = np.empty((len(rows), u.shape[1]), dtype=np.float32)
            cpu.expert_ffn(np.ascontiguousarray(u[rows]), gate, up, down, self.dtype[layer], y)
            out[rows] += w[rows, slot][:, None] * y
        return out
