"""The importance of each input column of each matrix (what llama.cpp calls an importance matrix):
the mean squared activation that column multiplies, over calibration text run through the model.
Quantization error on a column that carries large activations costs more output error, so the
quantizers weigh it by this.

The model runs in lowmoe (windows of WINDOW tokens, each from an empty context) with its
linears and MLPs observed from outside: `Model._linear` and `Model._ffn` (dense and shared MLPs)
are wrapped on the instance, and the routed experts by a stand-in for `model.experts` that sees
each expert's rows. The down projections' inputs, silu(gate x) * (up x), are computed here in
float32 from the resident experts' gate and up weights (the kernels keep them internal).
"""

import numpy as np

from ..errors import InputError
from ..load.checkpoint import to_f32
from ..tier.experts import ResidentExperts

WINDOW = 512  # tokens per calibration window (llama-imatrix's default context)


class _Sums:
    def __init__(self):
        self.sq = {}  # GGUF name -> f64[cols] or f64[E, cols]: sum of squared activations
        self.n = {}  # GGUF name -> token count (f64[E, 1] for stacked experts)

    def add(self, name, x, expert=None, experts=0):
        x = np.asarray(x, np.float64)
        if expert is None:
            self.sq[name] = self.sq.get(name, 0.0) + (x * x).sum(0)
            self.n[name] = self.n.get(name, 0) + len(x)
            return
        if name not in self.sq:
            self.sq[name], self.n[name] = np.zeros((experts, x.shape[1])), np.zeros((experts, 1))
        self.sq[name][expert] += (x * x).sum(0)
        self.n[name][expert] += len(x)

    def means(self):
        """{name: f32 mean squares}; an expert that saw no token gets its layer's mean over experts."""
        out = {}
        for name, sq in self.sq.items():
            n = self.n[name]
            if np.ndim(n) == 0:
                out[name] = (sq / max(n, 1)).astype(np.float32)
                continue
            seen = n[:, 0] > 0
            m = np.where(seen[:, None], sq / np.maximum(n, 1), 0.0)
            if seen.any():
                m[~seen] = m[seen].mean(0)
            else:
                m[:] = 1.0
            out[name] = m.astype(np.float32)
        return out


def _silu_product(x, gate, up):
    g, u = x @ gate.T, x @ up.T
    return g / (1.0 + np.exp(-g)) * u


class _Experts:
    """Stands in for model.experts (ResidentExperts): notes each expert's rows, then computes as the
    real one, whose slab holds the gate and up weights the down projection's input needs."""

    def __init__(self, inner, sums, cfg):
        self.inner, self.sums, self.cfg = inner, sums, cfg

    def forward(self, layer, u, idx, w):
        u32 = np.asarray(u, np.float32)
        E, inner = self.cfg.num_experts, self.inner
        for e in np.unique(idx):
            rows = u32[(idx == e).any(1)]
            f = inner.slab.ffn(inner.slot[(layer, int(e))], inner.layout.of(layer))
            gate, up = (to_f32(m, f.dtype.upper()) for m in (f.gate, f.up))
            for role in ("gate", "up"):
                self.sums.add(f"blk.{layer}.ffn_{role}_exps.weight", rows, int(e), E)
            self.sums.add(f"blk.{layer}.ffn_down_exps.weight", _silu_product(rows, gate, up), int(e), E)
        return self.inner.forward(layer, u, idx, w)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _names(weights, tied):
    """{id of a Matrix or FFN record: GGUF name(s)} for the dense weights (load/weights.py records)."""
    names = {id(weights.lm_head): "token_embd.weight" if tied else "output.weight"}
    for i, layer in enumerate(weights.layers):
        b = f"blk.{i}."
        if layer.attn is not None:
            for x, gguf in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output")):
                names[id(getattr(layer.attn, x))] = f"{b}{gguf}.weight"
        if layer.mlp is not None:
            names[id(layer.mlp)] = tuple(f"{b}ffn_{x}.weight" for x in ("gate", "up", "down"))
        if layer.shared is not None:
            names[id(layer.shared)] = tuple(f"{b}ffn_{x}_shexp.weight" for x in ("gate", "up", "down"))
    return names


def collect(engine, ids):
    """{GGUF name: f32[cols] or f32[E, cols]} over the token ids `ids`, run through `engine` (an
    Engine of a Hugging Face checkpoint with every expert resident)."""
    model, cfg, sums = engine.model, engine.config, _Sums()
    if not isinstance(model.experts, ResidentExperts):
        raise InputError(f"{engine.model_dir}: calibration runs with every expert resident, not an expert cache")
    names = _names(model.w, cfg.tie_word_embeddings)
    linear, ffn = model._linear, model._ffn

    def observed_linear(x, m):
        if id(m) in names:
            sums.add(names[id(m)], model.ops.to_host(x))
        return linear(x, m)

    def observed_ffn(x, f):
        gate_name, up_name, down_name = names[id(f)]
        h = np.asarray(model.ops.to_host(x), np.float32)
        for name in (gate_name, up_name):
            sums.add(name, h)
        sums.add(down_name, _silu_product(h, to_f32(f.gate, f.dtype.upper()), to_f32(f.up, f.dtype.upper())))
        return ffn(x, f)

    model._linear, model._ffn = observed_linear, observed_ffn
    inner = model.experts
    model.experts = _Experts(inner, sums, cfg)
    try:
        for start in range(0, len(ids), WINDOW):
            engine.logits(ids[start : start + WINDOW])  # every position's logits: the lm_head sees every token
    finally:
        del model._linear, model._ffn
        model.experts = inner
    return sums.means()
