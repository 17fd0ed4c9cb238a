"""`lowmoe info MODEL`: architecture, layer and expert counts, bytes of dense vs expert weights."""

import json


def add_arguments(p):
    p.add_argument("model", nargs="?", default=None, help="model folder or GGUF file (default: the bundled model)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--expert-cache", default=None, metavar="BUDGET",
                   help="also print the cache plan for this budget (1.5GiB, 300MB, 25%%, min)")
    p.add_argument("--vram-budget", default=None, metavar="BYTES",
                   help="also print the GPU memory plan for this budget (12GiB): dense weights, KV cache, workspace, "
                   "expert slots")
    p.add_argument("--context", type=int, default=8192,
                   help="tokens of KV cache in the memory plans (default 8192)")
    p.add_argument("--kv-dtype", default="f16", choices=("f16", "bf16", "f32"),
                   help="KV cache element type, for the bytes per token and the VRAM plan (default f16)")
    p.add_argument("--lookahead", type=int, default=1, choices=(1, 2),
                   help="MoE layers ahead hints cover: staging slots are top-k per layer (default 1)")


def main(args):
    from lowmoe import DEFAULT_MODEL
    from lowmoe.load.gguf import GGUF
    from lowmoe.load.model import open_model
    from lowmoe.tier.host_memory import weight_bytes
    from lowmoe.tier.vram import kv_bytes, kv_bytes_per_token, state_bytes
    from lowmoe.tier.budget import plan_cache
    from lowmoe.tier.store import is_packed, open_store

    path = args.model or DEFAULT_MODEL
    ckpt, cfg = open_model(path)
    experts = len(cfg.moe_layers) * cfg.num_experts
    store = open_store("packed" if is_packed(path) else "checkpoint", path, ckpt, cfg)
    store.close()
    layout, block = store.layout, store.layout.block
    dense_bytes, expert_bytes = weight_bytes(ckpt, cfg, layout, is_packed(path))
    formats = {}
    if isinstance(ckpt, GGUF):
        for t in ckpt.tensors.values():
            formats[t.format] = formats.get(t.format, 0) + t.nbytes
        if is_packed(path):  # its dense.gguf holds no experts: their formats from the packed layout
            for layer in cfg.moe_layers:
                L = layout.of(layer)
                for fmt, size in zip(L.formats, L.sizes):
                    formats[fmt] = formats.get(fmt, 0) + cfg.num_experts * size
    info = {
        "model": path,
        "model_type": cfg.model_type,
        "layers": cfg.num_layers,
        "moe_layers": len(cfg.moe_layers),
        "experts_per_layer": cfg.num_experts,
        "experts_per_token": cfg.top_k,
        "hidden_size": cfg.hidden_size,
        "expert_intermediate_size": cfg.expert_intermediate,
        "heads": f"{cfg.num_heads} query / {cfg.num_kv_heads} kv, head_dim {cfg.head_dim}",
        "vocab_size": cfg.vocab_size,
        "linear_attention_layers": [i for i, m in enumerate(cfg.layer_mixers) if m == "linear"],
        # per sequence: KV of the attention layers for each token, and the linear layers' fixed state
        "kv_dtype": args.kv_dtype,
        "kv_bytes_per_token": kv_bytes_per_token(cfg, args.kv_dtype),
        "state_bytes": state_bytes(cfg),
        "dense_bytes": dense_bytes,
        "expert_bytes": expert_bytes,
        "bytes_per_expert": expert_bytes // max(1, experts),
    }
    if formats:
        info["format_bytes"] = formats  # GGUF: bytes per weight format over every tensor
    if args.expert_cache is not None:
        plan = plan_cache(args.expert_cache, cfg, block)
        info.update(plan.describe())
        # what decode on the CPU holds: dense weights, cache and staging slots, the sequence state at --context
        info["host_plan_bytes"] = dense_bytes + plan.nbytes + kv_bytes(cfg, args.context, args.kv_dtype)
    if args.vram_budget is not None:
        from lowmoe.errors import InputError
        from lowmoe.load.model import dense_weights
        from lowmoe.load.weights import device_bytes
        from lowmoe.tier.vram import plan_vram

        if args.context < 1:
            raise InputError(f"--context must be >= 1, got {args.context}")
        dense = device_bytes(dense_weights(ckpt, cfg))
        staging = cfg.top_k * args.lookahead
        slot = sum(layout.role_sizes)  # a GPU slot holds the largest layer's gate, up and down
        info.update(plan_vram(args.vram_budget, cfg, dense, slot, args.context, staging, args.kv_dtype).describe())
    if args.json:
        print(json.dumps(info))
        return 0
    from rich.table import Table

    from lowmoe.cli.console import table_console

    table = Table(show_header=False, box=None)
    for k, v in info.items():
        table.add_row(k.replace("_", " "), _fmt(k, v))
    table_console().print(table)
    return 0


def _fmt(key, value):
    if isinstance(value, dict):
        return ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in value.items())
    if key.endswith("fraction_cached"):
        return f"{value:.1%}"
    if "bytes" in key:
        return f"{value / 2**20:.1f} MiB ({value:,} bytes)"
    return str(value)
