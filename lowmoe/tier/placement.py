"""Where the routed experts live, for the engine's device and options: `place_experts` -> (experts,
where), `where` one of

- "resident": every expert on the compute device. On the CPU, one host slab (ResidentExperts); on
  the GPU, stacked per MoE layer (DeviceExperts: gate, up [E, I, D], down [E, D, I]), computed
  from the router's ids where the router left them on the device, so the forward pass only
  enqueues work and the host waits for the GPU once per forward, for the logits.
- "slots": an expert cache under a budget (OffloadedExperts): host slots on the CPU; device slots
  (device_slots.py) on the GPU, under a VRAM budget or an expert-cache budget. The cache policy
  runs on the host, so each MoE layer copies its chosen ids int32[T, k] to the host and waits for
  them; on the GPU the hidden state stays on the device.
- "host": CPU-MoE on the GPU device: the experts in host memory computed on the CPU with
  exact.expert_rows, the GPU expert kernels' arithmetic, so CPU-MoE and the GPU cache give the same
  output; each MoE layer moves its chosen ids int32[T, k], its normalised hidden state u f32[T, D]
  and the weights w f32[T, k] to the host (three waits) and the sum back.
"""

import logging

import numpy as np

from ..backend import cuda, exact
from ..errors import DeviceError
from ..load.weights import FFN, device_bytes
from .budget import plan_cache
from .cuda_device import CupyDevice, transfer_costs
from .device_slots import device_experts
from .experts import HostSlots, OffloadedExperts, Resident, ResidentExperts
from .hybrid import Costs, choose_cpu_moe, cpu_expert_seconds, misses_on_cpu
from .slots import Slab
from .vram import plan_vram

log = logging.getLogger("lowmoe")


class DeviceExperts(Resident):
    """Every routed expert resident on the GPU, stacked per MoE layer: {layer: FFN of [E, ...]}."""

    def __init__(self, store, cfg):
        E = cfg.num_experts
        self.layout = store.layout
        slab = Slab(store.layout, E)  # one layer at a time in host memory
        self.layers = {}
        for layer in cfg.moe_layers:
            L = store.layout.of(layer)
            for e in range(E):
                store.read(layer, e, slab.block(e))
            parts = [slab.ffn(e, L) for e in range(E)]
            stacked = (cuda.to_device(np.stack([getattr(p, n) for p in parts])) for n in ("gate", "up", "down"))
            self.layers[layer] = FFN(*stacked, L.dtype)

    def forward(self, layer, u, idx, w):
        """u f32[T, D], idx int32[T, k], w f32[T, k] on the device -> the weighted sum f32[T, D]."""
        f = self.layers[layer]
        y = cuda.buffer((idx.size, u.shape[1]))
        cuda.expert_rows(u, f.gate, f.up, f.down, f.dtype, idx, y)
        out = cuda.buffer(u.shape)
        cuda.expert_combine(y, w, out)
        return out


def check_fits(cfg, dense, layout):
    """DeviceError unless the dense weights and every expert fit in the GPU's free memory with 10%
    (at least 512 MiB) left for the KV cache and scratch."""
    free, _ = cuda.cupy().cuda.Device().mem_info
    experts = cfg.num_experts * sum(layout.of(layer).nbytes for layer in cfg.moe_layers)
    need = device_bytes(dense) + experts
    if need + max(free // 10, 512 << 20) > free:
        raise DeviceError(f"device 'cuda': the model needs {need / 2**30:.2f} GiB of GPU memory ({experts / 2**30:.2f} "
                          f"GiB of experts) and {free / 2**30:.2f} GiB are free; give a budget for a GPU expert "
                          "cache (--vram-budget, e.g. 12GiB) or keep the experts on the CPU (SHARPI_CPU_MOE=1)")


def place_experts(cfg, dense, store, options):
    """The routed experts -> (experts, where); see the module docstring. Closes `store` unless the
    experts keep reading from it. On the CPU: every expert resident, or a cache of
    options.expert_cache."""
    if options.device == "cuda":
        return _on_gpu(cfg, dense, store, options)
    if options.expert_cache is None:
        experts = ResidentExperts(store, cfg)
        store.close()
        return experts, "resident"
    # Staging slots: one layer's top-k for each layer of lookahead.
    plan = plan_cache(options.expert_cache, cfg, store.layout.block, cfg.top_k * options.lookahead)
    return OffloadedExperts(store, cfg, plan, options.readers, options.read_timeout_s), "slots"


def _on_gpu(cfg, dense, store, options):
    """cpu_moe True: "host" (an expert_cache budget is then the host cache's). Otherwise a
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
    slot = sum(store.layout.role_sizes)  # a device slot: each part as large as the largest layer's
    if options.vram_budget is not None:
        plan = plan_vram(options.vram_budget, cfg, device_bytes(dense), slot, options.max_context, staging,
                         options.kv_dtype).cache
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
    """CPU-MoE: every expert in host memory, or a host expert cache of `budget`; u and w come from
    the GPU and the sum goes back to it."""
    if budget is None:
        experts = ResidentExperts(store, cfg, exact.expert_rows, cuda)
        store.close()
        return experts
    plan = plan_cache(budget, cfg, store.layout.block, staging)
    tier = HostSlots(store, plan.slots + plan.staging, exact.expert_rows, cuda)
    return OffloadedExperts(store, cfg, plan, options.readers, options.read_timeout_s, tier)
