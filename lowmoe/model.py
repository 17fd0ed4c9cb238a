"""The decoder: one forward pass over T new tokens at positions start..start+T-1, on any device.

`ops` is the backend: backend/cpu.py (NumPy arrays, Numba kernels) or backend/cuda.py (CuPy arrays,
the kernels of native/), the same operations with the same signatures; `ops.xp` is the array module
that holds their arrays, and the weights are on that device (load/weights.to_device for the GPU).
Architecture differences (q/k norms, clipping, biases, dense vs MoE layers, shared expert, each
layer's token mixer: softmax attention or Gated DeltaNet linear attention) are switches in
ModelConfig.

Where the routed experts live and compute is the expert tier's business (tier/placement.py):
`experts.forward(layer, u, idx, w)` takes and returns the backend's arrays. With every expert
resident it takes the router's expert ids where the router left them, so on the GPU the host waits
once per forward pass, for the logits; an expert cache or CPU-MoE takes them on the host, where
its policy runs.
"""

import numpy as np

from .backend import cpu
from .predict.first_layer import TokenTable


class KVCache:
    """A sequence's state in the arrays of the backend `ops`: for each attention layer its keys and
    values k[layer], v[layer] [KV, capacity, hd] of `dtype` ("f16", "bf16": their bits as uint16, or
    "f32"; the step's f32 keys and values rounded once, by ops.kv_store, and converted back to f32 as
    attention reads them) and the RoPE tables cos, sin f32[capacity, rot/2]
    of every position they can hold; for each linear-attention (Gated DeltaNet) layer its conv window
    conv[layer] f32[K - 1, C] (the last K - 1 inputs of the causal conv) and its recurrent state
    ssm[layer] f32[Hv, dk, dv] (None in the other kind's slots). The KV part grows to exactly what
    `reserve` asks for, never more (the VRAM plan counts max_context positions): the engine reserves
    a whole sequence before decoding it, so decode never copies."""

    def __init__(self, cfg, capacity=256, ops=cpu, dtype="f16"):
        self.cfg = cfg
        self.ops = ops
        self.xp = ops.xp
        self.dtype = dtype
        self.length = 0
        shape = (cfg.num_kv_heads, capacity, cfg.head_dim)
        attention = [m == "attention" for m in cfg.layer_mixers]
        store = kv_storage(dtype)
        self.k = [self.xp.zeros(shape, store) if a else None for a in attention]
        self.v = [self.xp.zeros(shape, store) if a else None for a in attention]
        self.conv, self.ssm = [None] * cfg.num_layers, [None] * cfg.num_layers
        if cfg.linear_shape:
            Hk, Hv, dk, dv, K = cfg.linear_shape
            for i, a in enumerate(attention):
                if not a:
                    self.conv[i] = self.xp.zeros((K - 1, 2 * Hk * dk + Hv * dv), np.float32)
                    self.ssm[i] = self.xp.zeros((Hv, dk, dv), np.float32)
        self._tables(capacity)

    def _tables(self, capacity):
        cos, sin = rope_tables(self.cfg, np.arange(capacity))
        self.cos, self.sin = self.ops.to_device(cos), self.ops.to_device(sin)

    def reserve(self, length):
        """Room for `length` positions -> True when the cache had to grow."""
        if length <= self.cos.shape[0]:
            return False
        for cache in (self.k, self.v):
            for i, old in enumerate(cache):
                if old is not None:
                    new = self.xp.zeros((old.shape[0], length, old.shape[2]), old.dtype)
                    new[:, : self.length] = old[:, : self.length]
                    cache[i] = new
        self._tables(length)
        return True

    def recurrent(self):
        """A copy of the linear-attention layers' state, (conv, ssm) per layer (empty without them):
        what `restore` puts back so that a Context decodes from its prompt's end again."""
        return [(c.copy(), s.copy()) for c, s in zip(self.conv, self.ssm) if c is not None]

    def restore(self, saved):
        """Puts back the state `recurrent` copied."""
        linear = [i for i, c in enumerate(self.conv) if c is not None]
        for i, (c, s) in zip(linear, saved):
            self.conv[i][...] = c
            self.ssm[i][...] = s


def kv_storage(dtype):
    """The element type of a KV cache of `dtype` ("f32", "f16", "bf16"; the half types as bits)."""
    return np.float32 if dtype == "f32" else np.uint16


def rope_tables(cfg, positions):
    """cos, sin f32[T, rot/2] (rot: the rotated dims of a head, cfg.rotary_dim or all of it),
    computed in float32 the way transformers does."""
    hd = getattr(cfg, "rotary_dim", 0) or cfg.head_dim
    exponent = np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / np.float32(hd)
    inv_freq = (np.float32(1.0) / np.power(np.float32(cfg.rope_theta), exponent)).astype(np.float32)
    freqs = positions.astype(np.float32)[:, None] * inv_freq[None, :]
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


class Model:
    """where: "resident" (every expert on the compute device), "slots" (an expert cache there) or
    "host" (CPU-MoE: the experts on the CPU while the GPU runs the rest); see tier/placement.py."""

    def __init__(self, cfg, weights, experts, ops=cpu, predictor=None, where="resident", refine=False):
        self.cfg = cfg
        self.w = weights
        self.experts = experts
        self.ops = ops
        self.predictor = predictor  # hints the next MoE layer's experts during decode
        self.where = where
        self.refine = refine  # rank each MoE layer's hint again on its input (_refine)
        # the first MoE layer's routing by token id, from the learned predictor's fitted table if it has one
        fitted = getattr(predictor, "first", None)
        self.first = TokenTable(cfg.vocab_size, cfg.top_k, fitted) if refine and cfg.moe_layers else None

    def forward(self, tokens, kv, all_logits=False):
        """tokens int64[T] (host) at positions kv.length.. -> logits f32[T, V] (or [1, V], the last
        token) on the host."""
        cfg, ops = self.cfg, self.ops
        T, start = len(tokens), kv.length
        kv.reserve(start + T)
        x = ops.buffer((T, cfg.hidden_size))
        ops.embed(tokens, self.w.embed.w, self.w.embed.dtype, x)
        for i, layer in enumerate(self.w.layers):
            if self.refine and T == 1 and layer.router is not None:
                self._refine(i, layer, x, tokens[0])
            mixer = self._attention if layer.attn is not None else self._linear_attention
            x = x + mixer(i, layer, self._norm(x, layer.input_norm), kv)
            x = x + self._mlp(i, layer, self._norm(x, layer.post_norm), x, tokens)
        kv.length = start + T
        if not all_logits:
            x = x[-1:]
        return ops.to_host(self._linear(self._norm(ops.xp.ascontiguousarray(x), self.w.norm), self.w.lm_head))

    def _refine(self, i, layer, x, token):
        """The second stage of prediction: layer i's own router on its input x f32[1, D] (normalised
        by its post-mixer norm, as the router's input will be) ranks its experts again while its
        token mixer runs. On the first MoE layer, the only prediction of this token: the experts it
        chose for `token` last time (predict/first_layer.py) first."""
        logits = self.ops.to_host(self._linear(self._norm(x, layer.post_norm), layer.router))  # [1, E]
        ranked = np.argsort(-logits[0], kind="stable")
        if i == self.cfg.moe_layers[0]:
            ranked = self.first.rank(token, ranked)
        self.experts.refine_hint(i, ranked)

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
        q = self._linear(h, a.q)  # [T, H*hd]; gated: [T, H, 2 hd], each head's query then its gate
        if cfg.attn_gate:
            qg = q.reshape(T, H, 2 * hd)
            q, gate = ops.xp.ascontiguousarray(qg[:, :, :hd]).reshape(T, H * hd), qg[:, :, hd:].reshape(T, H * hd)
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
        for x in (q, k):  # RoPE on the first 2 * cos.shape[1] dims of each head (Qwen3.5: a quarter)
            ops.rope(x, kv.cos, kv.sin, start)
        ops.kv_store(k, v.reshape(T, KV, hd), kv.k[i], kv.v[i], start, kv.dtype)
        out = ops.buffer((T, H, hd))
        ops.attention(q, kv.k[i], kv.v[i], start, out, kv.dtype)
        out = out.reshape(T, H * hd)
        if cfg.attn_gate:
            out = out / (np.float32(1.0) + ops.xp.exp(-gate))  # * sigmoid(gate)
        return self._linear(out, a.o)

    def _linear_attention(self, i, layer, h, kv):
        """A Gated DeltaNet layer on h f32[T, D] (transformers' Qwen3_5MoeGatedDeltaNet): q | k | v
        through a causal depthwise conv and SiLU, q and k L2-normalised (q also by dk^-0.5), value
        head j reading key head j // (Hv / Hk) (j % Hk in a GGUF's order); per token the state decays by exp(g), takes the
        delta rule's update and is read by q; each value head RMS-normalised and gated by silu(z)."""
        cfg, L, ops = self.cfg, layer.linear, self.ops
        Hk, Hv, dk, dv, _ = cfg.linear_shape
        T = h.shape[0]
        mixed = ops.buffer((T, 2 * Hk * dk + Hv * dv))
        ops.causal_conv(self._linear(h, L.qkv), L.conv, kv.conv[i], mixed)
        q = ops.l2_norm(mixed[:, : Hk * dk].reshape(T * Hk, dk)) * np.float32(dk**-0.5)
        k = ops.l2_norm(mixed[:, Hk * dk : 2 * Hk * dk].reshape(T * Hk, dk))
        v = ops.xp.ascontiguousarray(mixed[:, 2 * Hk * dk :])
        beta, g = ops.delta_gates(self._linear(h, L.b), self._linear(h, L.a), L.A, L.dt_bias)  # [T, Hv]
        core = ops.buffer((T, Hv, dv))
        ops.gated_delta_rule(q.reshape(T, Hk, dk), k.reshape(T, Hk, dk), v.reshape(T, Hv, dv), g, beta, kv.ssm[i], core,
                             cfg.tiled_value_heads)
        z = self._linear(h, L.z)  # [T, Hv*dv]
        core = ops.gated_rms_norm(core.reshape(T * Hv, dv), z.reshape(T * Hv, dv), L.norm, cfg.rms_norm_eps)
        return self._linear(core.reshape(T, Hv * dv), L.out)

    def _mlp(self, i, layer, u, h, tokens):
        """u f32[T, D] normalised input of the MLP; h f32[T, D] the residual it is added to (the
        predictors' input); tokens int64[T] the ids of the forward pass."""
        cfg, ops = self.cfg, self.ops
        if layer.router is None:
            return self._ffn(u, layer.mlp)
        idx, w = ops.router_topk(self._linear(u, layer.router), cfg.top_k, cfg.norm_topk_prob)  # [T, k]
        if self.where != "resident":  # the cache policy runs on the host: wait for the ids
            idx = np.asarray(ops.to_host(idx), np.int64)
        if self.first is not None and i == cfg.moe_layers[0]:  # refine is on: ids are on the host
            self.first.update(tokens, idx)
        if self.predictor is not None and len(u) == 1:
            # Start reads for the next MoE layers (N+1, then N+2) before this layer computes its experts.
            chosen = np.asarray(ops.to_host(idx[0]), np.int64)
            for distance, (later, ranked) in enumerate(self.predictor.predict(i, ops.to_host(h), chosen), 1):
                self.experts.hint(later, ranked, distance)
        out = self.experts.forward(i, u, idx, w)
        if layer.shared is not None:
            gate = 1.0 / (1.0 + ops.xp.exp(-self._linear(u, layer.shared_gate)))  # [T, 1]
            out += gate * self._ffn(u, layer.shared)
        return out
