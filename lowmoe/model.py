"""The decoder: one forward pass over T new tokens at positions start..start+T-1, on any device.

`ops` is the backend: backend/cpu.py (NumPy arrays, Numba kernels) or backend/cuda.py (CuPy arrays,
the kernels of native/), the same operations with the same signatures; `ops.xp` is the array module
that holds their arrays, and the weights are on that device (load/weights.to_device for the GPU).
Architecture differences (q/k norms, clipping, biases, dense vs MoE layers, shared expert) are
switches in ModelConfig.

Where the routed experts live and compute is the expert tier's business (tier/placement.py):
`experts.forward(layer, u, idx, w)` takes and returns the backend's arrays. With every expert
resident it takes the router's expert ids where the router left them, so on the GPU the host waits
once per forward pass, for the logits; an expert cache or CPU-MoE takes them on the host, where
its policy runs.
"""

import numpy as np

from .backend import cpu


class KVCache:
    """Keys and values of every layer: k[layer], v[layer] f32[KV, capacity, hd] in the arrays of the
    backend `ops`, and the RoPE tables cos, sin f32[capacity, hd/2] of every position they can hold.
    It grows to exactly what `reserve` asks for, never more (the VRAM plan counts max_context
    positions): the engine reserves a whole sequence before decoding it, so decode never copies."""

    def __init__(self, cfg, capacity=256, ops=cpu):
        self.cfg = cfg
        self.ops = ops
        self.xp = ops.xp
        self.length = 0
        shape = (cfg.num_kv_heads, capacity, cfg.head_dim)
        self.k = [self.xp.zeros(shape, np.float32) for _ in range(cfg.num_layers)]
        self.v = [self.xp.zeros(shape, np.float32) for _ in range(cfg.num_layers)]
        self._tables(capacity)

    def _tables(self, capacity):
        cos, sin = rope_tables(self.cfg, np.arange(capacity))
        self.cos, self.sin = self.ops.to_device(cos), self.ops.to_device(sin)

    def reserve(self, length):
        """Room for `length` positions -> True when the cache had to grow."""
        if length <= self.k[0].shape[1]:
            return False
        for cache in (self.k, self.v):
            for i, old in enumerate(cache):
                new = self.xp.zeros((old.shape[0], length, old.shape[2]), np.float32)
                new[:, : self.length] = old[:, : self.length]
                cache[i] = new
        self._tables(length)
        return True


def rope_tables(cfg, positions):
    """cos, sin f32[T, hd/2], computed in float32 the way transformers does."""
    hd = cfg.head_dim
    exponent = np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / np.float32(hd)
    inv_freq = (np.float32(1.0) / np.power(np.float32(cfg.rope_theta), exponent)).astype(np.float32)
    freqs = positions.astype(np.float32)[:, None] * inv_freq[None, :]
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


class Model:
    """where: "resident" (every expert on the compute device), "slots" (an expert cache there) or
    "host" (CPU-MoE: the experts on the CPU while the GPU runs the rest); see tier/placement.py."""

    def __init__(self, cfg, weights, experts, ops=cpu, predictor=None, where="resident"):
        self.cfg = cfg
        self.w = weights
        self.experts = experts
        self.ops = ops
        self.predictor = predictor  # hints the next MoE layer's experts during decode
        self.where = where

    def forward(self, tokens, kv, all_logits=False):
        """tokens int64[T] (host) at positions kv.length.. -> logits f32[T, V] (or [1, V], the last
        token) on the host."""
        cfg, ops = self.cfg, self.ops
        T, start = len(tokens), kv.length
        kv.reserve(start + T)
        x = ops.buffer((T, cfg.hidden_size))
        ops.embed(tokens, self.w.embed.w, self.w.embed.dtype, x)
        for i, layer in enumerate(self.w.layers):
            x = x + self._attention(i, layer, self._norm(x, layer.input_norm), kv)
            x = x + self._mlp(i, layer, self._norm(x, layer.post_norm), x)
        kv.length = start + T
        if not all_logits:
            x = x[-1:]
        return ops.to_host(self._linear(self._norm(ops.xp.ascontiguousarray(x), self.w.norm), self.w.lm_head))

    def _norm(self, x, w):
        return self.ops.rms_norm(x, w, self.cfg.rms_norm_eps)

    def _linear(self, x, m):
        """x f32[T, in] @ m.w.T (+ bias) -> f32[T, out]."""
        y = self.ops.buffer((x.shape[0], m.w.shape[0]))
        self.ops.linear(x, m.w, m.dtype, y, m.bias)
        return y

    def _ffn(self, x, f):
        out = self.ops.buffer(x.shape)
        self.ops.expert_ffn(x, f.gate, f.up, f.down, f.dtype, out)
        return out

    def _attention(self, i, layer, h, kv):
        cfg, a, ops = self.cfg, layer.attn, self.ops
        T, H, KV, hd = h.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = self._linear(h, a.q)  # [T, H*hd]
        k = self._linear(h, a.k)  # [T, KV*hd]
        v = self._linear(h, a.v)
        if cfg.qk_norm == "full":
            q = self._norm(q, a.q_norm)
            k = self._norm(k, a.k_norm)
        elif cfg.qk_norm == "head":
            q = self._norm(q.reshape(T * H, hd), a.q_norm)
            k = self._norm(k.reshape(T * KV, hd), a.k_norm)
        if cfg.clip_qkv:
            for t in (q, k, v):
                ops.xp.clip(t, -cfg.clip_qkv, cfg.clip_qkv, out=t)
        q = ops.xp.ascontiguousarray(q.reshape(T, H, hd))
        k = ops.xp.ascontiguousarray(k.reshape(T, KV, hd))
        start = kv.length
        ops.rope(q, kv.cos, kv.sin, start)
        ops.rope(k, kv.cos, kv.sin, start)
        kv.k[i][:, start : start + T] = k.transpose(1, 0, 2)
        kv.v[i][:, start : start + T] = v.reshape(T, KV, hd).transpose(1, 0, 2)
        out = ops.buffer((T, H, hd))
        ops.attention(q, kv.k[i], kv.v[i], start, out)
        return self._linear(out.reshape(T, H * hd), a.o)

    def _mlp(self, i, layer, u, h):
        """u f32[T, D] normalised input of the MLP; h f32[T, D] the residual it is added to (the
        predictors' input)."""
        cfg, ops = self.cfg, self.ops
        if layer.router is None:
            return self._ffn(u, layer.mlp)
        idx, w = ops.router_topk(self._linear(u, layer.router), cfg.top_k, cfg.norm_topk_prob)  # [T, k]
        if self.where != "resident":  # the cache policy runs on the host: wait for the ids
            idx = np.asarray(ops.to_host(idx), np.int64)
        if self.predictor is not None and len(u) == 1:
            # Start reads for the next MoE layer before this layer computes its experts.
            chosen = np.asarray(ops.to_host(idx[0]), np.int64)
            for later, ranked in self.predictor.predict(i, ops.to_host(h), chosen):
                self.experts.hint(later, ranked)
        out = self.experts.forward(i, u, idx, w)
        if layer.shared is not None:
            gate = 1.0 / (1.0 + ops.xp.exp(-self._linear(u, layer.shared_gate)))  # [T, 1]
            out += gate * self._ffn(u, layer.shared)
        return out
