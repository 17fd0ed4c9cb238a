"""`lowmoe info MODEL`: architecture, layer and expert counts, bytes of dense vs expert weights."""

import json


def add_arguments(p):
    p.add_argument("model", nargs="?", default=None, help="model folder (default: the bundled model)")
    p.add_argument("--json", action="store_true")


def main(args):
    from lowmoe import DEFAULT_MODEL
    from lowmoe.checkpoint import Checkpoint
    from lowmoe.config import load_model_config

    path = args.model or DEFAULT_MODEL
    cfg = load_model_config(path)
    ckpt = Checkpoint(path)
    expert_bytes = sum(
        ckpt.info(name).nbytes
        for layer in cfg.moe_layers
        for e in range(cfg.num_experts)
        for name in cfg.expert_tensor_names(layer, e)
    )
    total = sum(t.nbytes for t in ckpt.tensors.values())
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
        "dense_bytes": total - expert_bytes,
        "expert_bytes": expert_bytes,
        "bytes_per_expert": expert_bytes // max(1, len(cfg.moe_layers) * cfg.num_experts),
    }
    if args.json:
        print(json.dumps(info))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for k, v in info.items():
        table.add_row(k.replace("_", " "), _fmt(k, v))
    Console().print(table)
    return 0


def _fmt(key, value):
    if "bytes" in key:
        return f"{value / 2**20:.1f} MiB ({value:,} bytes)"
    return str(value)
