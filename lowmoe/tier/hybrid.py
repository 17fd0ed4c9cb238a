"""Where routed experts run when the GPU cannot hold them all: a cost model, not a fixed ratio.

Per decode token and MoE layer, with k experts per token, hit rate h of the GPU cache, one expert
of S bytes, transfer bandwidth B (a miss: the slow tier's read into pinned staging, then the copy
to the device; with experts in host memory the read is a memcpy, often slower than the copy), one
expert on the CPU in c seconds, and r seconds for the hidden state's round trip (u f32[D] to the
host, the sum back):

    GPU cache:  k * (1 - h) * S / B      (the misses' copies; hits cost next to nothing)
    CPU-MoE:    k * c + r                 (every expert on the CPU, from host memory)

so the CPU wins when moving a missed expert to the GPU takes longer than computing it on the CPU
and there are enough misses to pay for the round trip.

Misses on the CPU (--miss-policy auto): once a miss's read has landed in pinned staging, what is
left is its copy, S / C with C the copy's own bandwidth, against c on the CPU (u is on the host
already: the layer brought its routing there), so the CPU takes misses when c < S / C.

Either way the CPU computes with exact.expert_rows, the GPU kernels' arithmetic: these decisions,
made from timings, change speed and never the output. The GPU path's device time per expert (S over the
GPU's memory bandwidth, microseconds) is left out: it is small next to either side.

Measured at load: B, C and r by cuda_device.py (transfer_costs), c here
(cpu_expert_seconds). The expected hit rate is the share of experts the cache holds (the rate
under uniform routing; real routing favours some experts, so the GPU cache is if anything
under-rated).
"""

import time
from dataclasses import dataclass

import numpy as np

from ..backend import exact
from .slots import Slab

@dataclass(frozen=True)
class Costs:
    """Measured inputs of the model (see the module docstring)."""

    expert_bytes: int  # S: gate + up + down of one expert
    transfer_bytes_s: float  # B: slow tier -> pinned staging -> device, bytes per second
    copy_bytes_s: float  # C: pinned staging -> device alone
    cpu_expert_s: float  # c: one expert for one token on the CPU
    roundtrip_s: float  # r: hidden state to the host and back, with the sync


@dataclass(frozen=True)
class Decision:
    cpu_moe: bool
    gpu_cache_s: float  # predicted expert seconds per token and MoE layer, each way
    cpu_moe_s: float
    hit_rate: float

    def describe(self):
        where = "CPU-MoE (experts on the CPU)" if self.cpu_moe else "GPU expert cache"
        return (f"{where}: predicted {self.gpu_cache_s * 1e6:.0f} us per MoE layer with the GPU cache at a "
                f"{self.hit_rate:.0%} hit rate vs {self.cpu_moe_s * 1e6:.0f} us with CPU-MoE")


def choose_cpu_moe(costs, top_k, hit_rate):
    """Decision for one model and cache: CPU-MoE when its predicted time per layer is lower."""
    gpu = top_k * (1.0 - hit_rate) * costs.expert_bytes / costs.transfer_bytes_s
    host = top_k * costs.cpu_expert_s + costs.roundtrip_s
    return Decision(cpu_moe=host < gpu, gpu_cache_s=gpu, cpu_moe_s=host, hit_rate=hit_rate)


def misses_on_cpu(costs):
    """--miss-policy auto: True when the CPU computes a landed miss faster than its copy runs."""
    return costs.cpu_expert_s < costs.expert_bytes / costs.copy_bytes_s


def cpu_expert_seconds(store, cfg, repeats=5):
    """c: the median time of one expert for one token on the CPU (exact.expert_rows, as the CPU
    computes experts on device 'cuda'), its weights in host memory; the first call (compilation) is
    not timed."""
    slab = Slab(store.layout, 1)
    store.read(cfg.moe_layers[0], 0, slab.block(0))
    f = slab.ffn(0, store.layout.of(cfg.moe_layers[0]))
    x = np.random.default_rng(0).standard_normal((1, cfg.hidden_size)).astype(np.float32)
    y = np.empty_like(x)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        exact.expert_rows(x, f.gate, f.up, f.down, f.dtype, y)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))
