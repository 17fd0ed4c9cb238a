"""The decoder on the GPU: model.py's forward pass with the dense weights and the KV cache in
device memory, computed by the kernels of cuda.py. The routed experts are, by `load_experts`:

- "resident": every expert on the GPU when they fit, stacked per MoE layer (gate, up [E, I, D],
  down [E, D, I]). The per-layer loop only enqueues work: the router's expert ids and weights stay
  on the device and the expert kernels read them there, so the host waits for the GPU once per
  forward pass, when the logits are copied back for sampling.
- "slots": an expert cache in device slots (device_slots.py) under a VRAM budget or an
  expert-cache budget. The cache policy runs on the host, so each MoE layer copies its chosen
  expert ids (int32[T, k]) to the host and waits for them; the hidden state stays on the device.
- "host": CPU-MoE, the experts in host memory computed on the CPU (experts.py) with exact.expert_rows,
  the GPU expert kernels' arithmetic, so CPU-MoE and the GPU cache give the same output; each MoE
  layer moves only its normalised hidden state u f32[T, D] to the host and the sum back.

The dense MLPs and the Qwen2-MoE shared expert go through the expert kernels as a single expert
(E = 1, id 0, weight 1).
"""

import logging

import numpy as np

from .tier.budget import plan_cache
from .tier.device_slots import device_experts
from .errors import DeviceError
from .tier.experts import OffloadedExperts, ResidentExperts
from .tier.hybrid import Costs, choose_cpu_moe, cpu_expert_seconds, misses_on_cpu
from .model import KVCache, rope_tables
from .tier.slots import Slab
from .tier.vram import plan_vram
from .load.weights import FFN, Attention, Layer, Matrix, Weights
from .backend import cuda, exact
from .tier.cuda_device import CupyDevice, transfer_costs

log = logging.getLogger("lowmoe")


class DeviceKVCache(KVCache):
    """model.KVCache on the GPU, plus the RoPE tables cos, sin f32[capacity, hd/2] of every
    position it can hold."""

    def __init__(self, cfg, capacity=256):
        self.xp = cuda.cupy()
        super().__init__(cfg, capacity)
        self._tables(capacity)

    def _tables(self, capacity):
        cos, sin = rope_tables(self.cfg, np.arange(capacity))
        self.cos, self.sin = self.xp.asarray(cos), self.xp.asarray(sin)

    def reserve(self, length):
        grew = super().reserve(length)
        if grew:
            self._tables(self.k[0].shape[1])
        return grew


class DeviceExperts:
    """Every routed expert resident on the GPU, stacked per MoE layer: {layer: FFN of [E, ...]}.
    Has the counters interface the engine calls on an expert cache (there is nothing to count)."""

    token = 0

    def __init__(self, store, cfg):
        cp = cuda.cupy()
        E = cfg.num_experts
        self.layout = store.layout
        slab = Slab(store.layout, E)  # one layer at a time in host memory
        self.layers = {}
        for layer in cfg.moe_layers:
            for e in range(E):
                store.read(layer, e, slab.block(e))
            parts = [slab.ffn(e) for e in range(E)]
            self.layers[layer] = FFN(*(cp.asarray(np.stack([getattr(p, n) for p in parts])) for n in ("gate", "up", "down")),
                                     store.layout.dtype)

    def stats(self):
        return {}

    def reset_stats(self):
        pass

    def close(self):
        pass


def device_bytes(dense):
    """Bytes _upload allocates on the device for the dense weights: every Matrix with an f32 bias
    (zeros when it has none), vectors f32, the shared embedding once, pre-gate heads not at all."""
    seen = set()

    def size(a):
        if a is None or id(a) in seen:
            return 0
        seen.add(id(a))
        return a.nbytes

    def matrix(m):
        if m is None or id(m) in seen:
            return 0
        seen.add(id(m))
        return m.w.nbytes + 4 * m.w.shape[0]

    def ffn(f):
        return 0 if f is None else f.gate.nbytes + f.up.nbytes + f.down.nbytes

    total = matrix(dense.embed) + size(dense.norm) + matrix(dense.lm_head)
    for layer in dense.layers:
        a = layer.attn
        total += size(layer.input_norm) + size(layer.post_norm) + size(a.q_norm) + size(a.k_norm)
        total += sum(matrix(m) for m in (a.q, a.k, a.v, a.o, layer.router, layer.shared_gate))
        total += ffn(layer.mlp) + ffn(layer.shared)
    return total


def check_fits(cfg, dense, layout):
    """DeviceError unless the dense weights and every expert fit in the GPU's free memory with 10%
    (at least 512 MiB) left for the KV cache and scratch."""
    cp = cuda.cupy()
    free, _ = cp.cuda.Device().mem_info
    experts = len(cfg.moe_layers) * cfg.num_experts * 3 * layout.part
    need = device_bytes(dense) + experts
    if need + max(free // 10, 512 << 20) > free:
        raise DeviceError(f"device 'cuda': the model needs {need / 2**30:.2f} GiB of GPU memory ({experts / 2**30:.2f} "
                          f"GiB of experts) and {free / 2**30:.2f} GiB are free; give a budget for a GPU expert "
                          "cache (--vram-budget, e.g. 12GiB) or keep the experts on the CPU (SHARPI_CPU_MOE=1)")


def load_experts(cfg, dense, store, options):
    """The routed experts for device 'cuda' -> (experts, where: "resident", "slots" or "host"); see
    the module docstring. Closes `store` unless the experts keep reading from it.

    cpu_moe True: "host" (an expert_cache budget is then the host cache's). Otherwise a
    vram_budget or expert_cache plans device slots; without either, every expert goes on the GPU.
    With slots and cpu_moe unset, hybrid.choose_cpu_moe decides between the slots and "host" (every
    expert in host memory) from measured costs, and logs why; with slots, miss_policy "auto" (or
    unset) lets hybrid.misses_on_cpu decide whether the CPU computes misses whose copy is in flight."""
    staging = cfg.top_k * options.lookahead
    if options.cpu_moe:
        return _host_experts(cfg, store, options, options.expert_cache, staging), "host"
    if options.vram_budget is None and options.expert_cache is None:
        check_fits(cfg, dense, store.layout)
        experts = DeviceExperts(store, cfg)
        store.close()
        return experts, "resident"
    slot = 3 * store.layout.part
    if options.vram_budget is not None:
        plan = plan_vram(options.vram_budget, cfg, device_bytes(dense), slot, options.max_context, staging).cache
    else:
        plan = plan_cache(options.expert_cache, cfg, slot, staging)
    dev = CupyDevice()
    policy = options.miss_policy or "auto"
    if options.cpu_moe is None or policy == "auto":
        bandwidth, copy, roundtrip = transfer_costs(dev, store, cfg)
        costs = Costs(slot, bandwidth, copy, cpu_expert_seconds(store, cfg), roundtrip)
        log.info("lowmoe: slow tier to GPU %.1f GB/s, the copy alone %.1f GB/s, CPU expert %.0f us, round trip %.0f us",
                 bandwidth / 1e9, copy / 1e9, costs.cpu_expert_s * 1e6, roundtrip * 1e6)
    if options.cpu_moe is None:
        decision = choose_cpu_moe(costs, cfg.top_k, plan.fraction)
        log.info("lowmoe: %s (SHARPI_CPU_MOE=0/1 forces one)", decision.describe())
        if decision.cpu_moe:  # the budget was the GPU's: CPU-MoE holds every expert in host memory
            return _host_experts(cfg, store, options, None, staging), "host"
    cpu_misses = policy == "cpu" or (policy == "auto" and misses_on_cpu(costs))
    if policy == "auto":
        log.info("lowmoe: misses whose copy is in flight %s (--miss-policy wait/cpu forces one)",
                 "are computed on the CPU" if cpu_misses else "wait for their copy")
    return device_experts(store, cfg, plan, dev, options.readers, options.read_timeout_s, cpu_misses), "slots"


def _host_experts(cfg, store, options, budget, staging):
    """CPU-MoE: every expert in host memory, or a host expert cache of `budget`."""
    if budget is None:
        experts = ResidentExperts(store, cfg, exact.expert_rows)
        store.close()
        return experts
    plan = plan_cache(budget, cfg, store.layout.block, staging)
    return OffloadedExperts(store, cfg, plan, options.readers, options.read_timeout_s, kernel=exact.expert_rows)


def _vec(a):
    return None if a is None else cuda.cupy().asarray(a)


def _upload(w, memo):
    """A device copy of a weights record (Matrix, FFN, Attention, Layer, Weights); shared arrays
    (tied embeddings) are copied once. Matrices without a bias get zeros (x + 0 is exact), FFNs
    a leading expert axis of 1."""
    cp = cuda.cupy()
    if id(w) in memo:
        return memo[id(w)]
    if isinstance(w, Matrix):
        bias = w.bias if w.bias is not None else np.zeros(w.w.shape[0], np.float32)
        out = Matrix(cp.asarray(w.w), w.dtype, cp.asarray(bias))
    elif isinstance(w, FFN):
        out = FFN(*(cp.asarray(a[None]) for a in (w.gate, w.up, w.down)), w.dtype)
    elif isinstance(w, Attention):
        out = Attention(*(_upload(m, memo) for m in (w.q, w.k, w.v, w.o)), _vec(w.q_norm), _vec(w.k_norm))
    elif isinstance(w, Layer):
        # pre_gate heads only feed the expert-cache predictor, which the GPU path does not have yet.
        out = Layer(_vec(w.input_norm), _vec(w.post_norm), _upload(w.attn, memo),
                    *(None if m is None else _upload(m, memo) for m in (w.router, w.mlp, w.shared, w.shared_gate)))
    else:
        out = Weights(_upload(w.embed, memo), _vec(w.norm), _upload(w.lm_head, memo), [_upload(x, memo) for x in w.layers])
    memo[id(w)] = out
    return out


class CudaModel:
    """Same interface as model.Model: forward(tokens, kv, all_logits) -> NumPy logits."""

    def __init__(self, cfg, dense, experts, where, predictor=None):
        self.cfg = cfg
        self.w = _upload(dense, {})
        self.experts = experts
        self.where = where  # "resident", "slots" or "host" (load_experts)
        self.predictor = predictor  # hints the expert cache ("slots", or "host" with a budget)
        cp = cuda.cupy()
        self._one = (cp.zeros((1, 1), np.int32), cp.ones((1, 1), np.float32))

    def forward(self, tokens, kv, all_logits=False):
        """tokens int64[T] at positions kv.length.. (host) -> logits f32[T, V] (or [1, V], last
        token) copied to the host: the one wait for the GPU."""
        cp = cuda.cupy()
        cfg = self.cfg
        T, start = len(tokens), kv.length
        kv.reserve(start + T)
        x = cp.empty((T, cfg.hidden_size), np.float32)
        cuda.embed(cp.asarray(tokens, dtype=np.int64), self.w.embed.w, self.w.embed.dtype, x)
        for i, layer in enumerate(self.w.layers):
            x += self._attention(i, layer, self._norm(x, layer.input_norm), kv, start)
            x += self._mlp(i, layer, self._norm(x, layer.post_norm), x)
        kv.length = start + T
        if not all_logits:
            x = x[-1:]
        return cp.asnumpy(self._linear(self._norm(x, self.w.norm), self.w.lm_head))

    def _norm(self, x, w):
        out = cuda.buffer(x.shape)
        cuda.rms_norm(x, w, self.cfg.rms_norm_eps, out)
        return out

    def _linear(self, x, m):
        out = cuda.buffer((x.shape[0], m.w.shape[0]))
        cuda.linear(x, m.w, m.dtype, m.bias, out)
        return out

    def _ffn(self, u, f, idx, w):
        out = cuda.buffer(u.shape)
        cuda.expert_ffn(u, f.gate, f.up, f.down, f.dtype, idx, w, out)
        return out

    def _attention(self, i, layer, h, kv, start):
        cp = cuda.cupy()
        cfg, a = self.cfg, layer.attn
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
                cp.clip(t, -cfg.clip_qkv, cfg.clip_qkv, out=t)
        q = q.reshape(T, H, hd)
        k = k.reshape(T, KV, hd)
        cuda.rope(q, kv.cos, kv.sin, start)
        cuda.rope(k, kv.cos, kv.sin, start)
        kv.k[i][:, start : start + T] = k.transpose(1, 0, 2)
        kv.v[i][:, start : start + T] = v.reshape(T, KV, hd).transpose(1, 0, 2)
        out = cuda.buffer((T, H, hd))
        cuda.attention(q, kv.k[i], kv.v[i], start, out)
        return self._linear(out.reshape(T, H * hd), a.o)

    def _units(self, T):
        """Expert ids 0 and weights 1 for T tokens: an FFN as the only expert of its layer."""
        if T == 1:
            return self._one
        cp = cuda.cupy()
        return cp.zeros((T, 1), np.int32), cp.ones((T, 1), np.float32)

    def _mlp(self, i, layer, u, h):
        """u f32[T, D] normalised input of the MLP; h f32[T, D] the residual (the predictors' input)."""
        cp = cuda.cupy()
        cfg, T = self.cfg, u.shape[0]
        if layer.router is None:
            return self._ffn(u, layer.mlp, *self._units(T))
        idx = cuda.buffer((T, cfg.top_k), np.int32)
        w = cuda.buffer((T, cfg.top_k))
        cuda.router_topk(self._linear(u, layer.router), cfg.top_k, cfg.norm_topk_prob, idx, w)
        if self.where == "resident":
            out = self._ffn(u, self.experts.layers[i], idx, w)
        else:
            chosen = cp.asnumpy(idx).astype(np.int64)  # the host decides what is cached: wait for the ids
            if self.predictor is not None and T == 1:
                for later, ranked in self.predictor.predict(i, cp.asnumpy(h), chosen[0]):
                    self.experts.hint(later, ranked)
            if self.where == "slots":
                out = self.experts.forward(i, u, chosen, w)
            else:
                out = cp.asarray(self.experts.forward(i, cp.asnumpy(u), chosen, cp.asnumpy(w)))
        if layer.shared is not None:
            gate = 1.0 / (1.0 + cp.exp(-self._linear(u, layer.shared_gate)))  # [T, 1]
            out += gate * self._ffn(u, layer.shared, *self._units(T))
        return out
