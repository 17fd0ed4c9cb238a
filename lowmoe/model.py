"""The decoder: one forward pass over T new tokens at positions start..start+T-1.

Architecture differences (q/k norms, clipping, biases, dense vs MoE layers, shared expert) are
switches in ModelConfig. Dense matrix products use NumPy (BLAS) in float32; the per-token kernels
(norms, RoPE, attention, routing, expert FFNs) are the backend's.
"""

import numpy as np

from .backend import cpu


class KVCache:
    """Keys and values of every layer: k[layer], v[layer] f32[KV, capacity, hd], grown by doubling.
    `xp` is the array module holding them (CuPy in cuda_model.DeviceKVCache)."""

    xp = np

    def __init__(self, cfg, capacity=256):
        self.cfg = cfg
        self.length = 0
        shape = (cfg.num_kv_heads, capacity, cfg.head_dim)
        self.k = [self.xp.zeros(shape, np.float32) for _ in range(cfg.num_layers)]
        self.v = [self.xp.zeros(shape, np.float32) for _ in range(cfg.num_layers)]

    def reserve(self, length):
        """Room for `length` positions -> True when the cache had to grow."""
        capacity = self.k[0].shape[1]
        if length <= capacity:
            return False
        while capacity < length:
            capacity *= 2
        for cache in (self.k, self.v):
            for i, old in enumerate(cache):
                new = self.xp.zeros((old.shape[0], capacity, old.shape[2]), np.float32)
                new[:, : self.length] = old[:, : self.length]
                cache[i] = new
        return True


def rope_tables(cfg, positions):
    """cos, sin f32[T, hd/2], computed in float32 the way transformers does."""
    hd = cfg.head_dim
    exponent = np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / np.float32(hd)
    inv_freq = (np.float32(1.0) / np.power(np.float32(cfg.rope_theta), exponent)).astype(np.float32)
    freqs = positions.astype(np.float32)[:, None] * inv_freq[None, :]
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


def _linear(x, m):
    """x f32[T, in] @ m.w.T (+ bias) -> f32[T, out]."""
    y = np.empty((x.shape[0], m.w.shape[0]), np.float32)
    cpu.linear(x, m.w, m.dtype, y)
    if m.bias is not None:
        y += m.bias
    return y


def _swiglu(x, f):
    out = np.empty_like(x)
    cpu.expert_ffn(x, f.gate, f.up, f.down, f.dtype, out)
    return out


class Model:
    def __init__(self, cfg, weights, experts, predictor=None):
        self.cfg = cfg
        self.w = weights
        self.experts = experts
        self.predictor = predictor  # hints the next MoE layer's experts during decode

    def forward(self, tokens, kv, all_logits=False):
        """tokens int64[T] at positions kv.length.. -> logits f32[T, V] (or [1, V], last token)."""
        cfg = self.cfg
        T, start = len(tokens), kv.length
        kv.reserve(start + T)
        cos, sin = rope_tables(cfg, np.arange(start, start + T))
        x = cpu.to_f32(self.w.embed.w[tokens], self.w.embed.dtype)  # [T, D]
        for i, layer in enumerate(self.w.layers):
            x = x + self._attention(i, layer, cpu.rms_norm(x, layer.input_norm, cfg.rms_norm_eps), kv, cos, sin)
            u = cpu.rms_norm(x, layer.post_norm, cfg.rms_norm_eps)
            x = x + self._mlp(i, layer, u, x)
        kv.length = start + T
        if not all_logits:
            x = x[-1:]
        return _linear(cpu.rms_norm(np.ascontiguousarray(x), self.w.norm, cfg.rms_norm_eps), self.w.lm_head)

    def _attention(self, i, layer, h, kv, cos, sin):
        cfg, a = self.cfg, layer.attn
        T, H, KV, hd = h.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = _linear(h, a.q)  # [T, H*hd]
        k = _linear(h, a.k)  # [T, KV*hd]
        v = _linear(h, a.v)
        if cfg.qk_norm == "full":
            q = cpu.rms_norm(q, a.q_norm, cfg.rms_norm_eps)
            k = cpu.rms_norm(k, a.k_norm, cfg.rms_norm_eps)
        elif cfg.qk_norm == "head":
            q = cpu.rms_norm(q.reshape(T * H, hd), a.q_norm, cfg.rms_norm_eps)
            k = cpu.rms_norm(k.reshape(T * KV, hd), a.k_norm, cfg.rms_norm_eps)
        if cfg.clip_qkv:
            for t in (q, k, v):
                np.clip(t, -cfg.clip_qkv, cfg.clip_qkv, out=t)
        q = np.ascontiguousarray(q.reshape(T, H, hd))
        k = np.ascontiguousarray(k.reshape(T, KV, hd))
        cpu.rope(q, cos, sin)
        cpu.rope(k, cos, sin)
        start = kv.length
        kv.k[i][:, start : start + T] = k.transpose(1, 0, 2)
        kv.v[i][:, start : start + T] = v.reshape(T, KV, hd).transpose(1, 0, 2)
        out = np.empty((T, H, hd), np.float32)
        cpu.attention(q, kv.k[i], kv.v[i], start, out)
        return _linear(out.reshape(T, H * hd), a.o)

    def _mlp(self, i, layer, u, h):
        """u f32[T, D] normalised input of the MLP; h f32[T, D] the residual it is added to."""
        if layer.router is None:
            return _swiglu(u, layer.mlp)
        idx, w = cpu.router_topk(_linear(u, layer.router), self.cfg.top_k, self.cfg.norm_topk_prob)
        if self.predictor is not None and len(u) == 1:
            # Start reads for the next MoE layer before this layer computes its experts.
            for later, ranked in self.predictor.predict(i, h, idx[0]):
                self.experts.hint(later, ranked)
        out = self.experts.forward(i, u, idx, w)
        if layer.shared is not None:
            gate = 1.0 / (1.0 + np.exp(-_linear(u, layer.shared_gate)))  # [T, 1]
            out += gate * _swiglu(u, layer.shared)
        return out
