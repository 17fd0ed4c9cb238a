"""The VRAM budget (`--vram-budget 12GiB`, SHARPI_VRAM_BUDGET, API `vram_budget=`): what the GPU
holds when the model does not fit, and how many expert slots are left for the cache.

    budget = dense weights + KV cache for the context + workspace + (cache + staging slots) * slot

- dense weights: everything but the routed experts, as load/weights.to_device moves them
  (weights.device_bytes);
- KV cache: model.KVCache on the GPU at a capacity of `context` tokens: k and v [KV, context, hd] per
  attention layer in the KV dtype (2 bytes for f16 / bf16, 4 for f32), the RoPE tables cos, sin
  f32[context, rot/2] and the linear-attention layers' state;
- workspace: the activations of the largest forward pass, a prefill chunk of PREFILL_CHUNK tokens
  (x and its norms, q/k/v, attention output and partials, router logits, expert scratch h [T*k, I]
  and y [T*k, D], the last token's logits), plus WORKSPACE_FIXED for CuPy's pool rounding and
  the small per-launch buffers;
- one slot: gate, up [I, D] and down [D, I] in the stored dtype (no padding on the device);
  staging slots (top-k per layer of lookahead) hold hinted experts until the gating decides.

The engine runs every forward pass of a prompt in PREFILL_CHUNK tokens and refuses a sequence longer
than `context` (Engine._check_context), so the plan holds. Engine.logits, which returns the logits
of every position, also holds PREFILL_CHUNK x vocab f32 logits per chunk: that is outside the plan.

The CUDA context itself (a few hundred MiB, outside cudaMalloc) is not in the budget: leave room
for it when the budget is the card's whole memory. Pinned host staging is host memory, also not
in the budget.
"""

from dataclasses import dataclass

from .budget import CachePlan, fmt_bytes, parse_bytes
from ..errors import InputError
from ..load.config import KV_BYTES

PREFILL_CHUNK = 512  # tokens per forward of a long prompt (bench and engine prefill chunks)
WORKSPACE_FIXED = 256 << 20


def state_bytes(cfg):
    """The f32 state of one sequence's linear-attention layers (model.KVCache): each its conv window
    [K - 1, C] and recurrent state [Hv, dk, dv]."""
    if not cfg.linear_shape:
        return 0
    Hk, Hv, dk, dv, K = cfg.linear_shape
    return cfg.layer_mixers.count("linear") * ((K - 1) * (2 * Hk * dk + Hv * dv) + Hv * dk * dv) * 4


def kv_bytes_per_token(cfg, dtype):
    """Keys and values of one position in every attention layer, in KV cache dtype `dtype`."""
    return cfg.layer_mixers.count("attention") * 2 * cfg.num_kv_heads * cfg.head_dim * KV_BYTES[dtype]


def kv_bytes(cfg, context, dtype):
    """model.KVCache of `context` positions in KV cache dtype `dtype`: keys and values of the
    attention layers, the RoPE tables, the linear layers' state."""
    rot = cfg.rotary_dim or cfg.head_dim
    return kv_bytes_per_token(cfg, dtype) * context + 2 * context * (rot // 2) * 4 + state_bytes(cfg)


def workspace_bytes(cfg, chunk=PREFILL_CHUNK):
    D, I, k, hd = cfg.hidden_size, cfg.expert_intermediate, cfg.top_k, cfg.head_dim
    H, KV, E = cfg.num_heads, cfg.num_kv_heads, cfg.num_experts
    per_token = 4 * D + (3 * H + 2 * KV) * hd + E + k * (I + D) + 2 * k  # f32 values per token in flight
    if cfg.linear_shape:  # a Gated DeltaNet layer's: q | k | v before and after the conv, q, k, v, z, core
        Hk, Hv, dk, dv, _ = cfg.linear_shape
        per_token += 3 * (2 * Hk * dk + Hv * dv) + 3 * Hv * dv + 4 * Hv
    return WORKSPACE_FIXED + 4 * (chunk * per_token + cfg.vocab_size)


@dataclass(frozen=True)
class VramPlan:
    budget: int
    dense: int
    kv: int
    workspace: int
    context: int
    cache: CachePlan

    def describe(self):
        c = self.cache
        return {"vram_budget_bytes": self.budget, "vram_dense_bytes": self.dense, "vram_kv_cache_bytes": self.kv,
                "vram_kv_context_tokens": self.context, "vram_workspace_bytes": self.workspace,
                "vram_expert_slots": c.slots, "vram_staging_slots": c.staging, "vram_slot_bytes": c.slot_bytes,
                "vram_slots_bytes": c.nbytes, "vram_fraction_cached": c.fraction,
                "vram_unplanned_bytes": self.budget - self.dense - self.kv - self.workspace - c.nbytes}


def plan_vram(spec, cfg, dense, slot_bytes, context, staging, kv_dtype):
    """VramPlan for a budget spec ("12GiB", "8000MB", bytes): the expert slots are what is left
    after dense weights, a KV cache of `context` positions in `kv_dtype` and workspace, at most one per routed expert, at least top_k
    (one layer's experts at once) plus `staging`; less is an InputError naming the minimum."""
    budget = parse_bytes(spec, "VRAM budget")
    experts = len(cfg.moe_layers) * cfg.num_experts
    kv, work = kv_bytes(cfg, context, kv_dtype), workspace_bytes(cfg)
    fixed = dense + kv + work
    slots = (budget - fixed) // slot_bytes - staging
    if slots < cfg.top_k:
        minimum = fixed + (cfg.top_k + staging) * slot_bytes
        raise InputError(
            f"VRAM budget {spec!r} is too small: the minimum is {fmt_bytes(minimum)} ({minimum} bytes: dense weights "
            f"{fmt_bytes(dense)}, KV cache for {context} tokens {fmt_bytes(kv)}, workspace {fmt_bytes(work)}, "
            f"{cfg.top_k} + {staging} expert slots of {fmt_bytes(slot_bytes)})")
    cache = CachePlan(slots=min(slots, experts), staging=staging, slot_bytes=slot_bytes, experts=experts)
    return VramPlan(budget, dense, kv, work, context, cache)
