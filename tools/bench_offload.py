"""Decode with the experts out of core: tok/s, stall fraction and bytes per token against the
expert cache budget, with cold reads from a packed store (O_DIRECT), all in one run.

    python tools/bench_offload.py [--dir DIR] [--new-tokens 48] [--budgets 100%,50%,25%,10%]

The model is a random Qwen3-MoE with 1.2 GB of f16 experts (8 layers x 32 experts of 1024x768,
top-4), written with NumPy and packed once into DIR. Random routing is harsher than a trained
model's (no favourite experts), so hit rates here are a floor. Also measured in the same run:
the disk's sequential O_DIRECT read bandwidth, reads alone (the same experts with no compute) and
compute alone (every expert resident), to show how much of the read time decode hides.
"""

import argparse
import json
import os
import time

import numpy as np

import lowmoe
from lowmoe.tier.pack import pack_model
from lowmoe.predict.oracle import Oracle, Recorder

CONFIG = {"model_type": "qwen3_moe", "vocab_size": 4096, "hidden_size": 1024, "intermediate_size": 2048,
          "moe_intermediate_size": 768, "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 4,
          "head_dim": 64, "num_experts": 32, "num_experts_per_tok": 4, "norm_topk_prob": True,
          "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "eos_token_id": 0}


def write_model(path):
    """Random f16 checkpoint, one safetensors file per layer (keeps peak memory small)."""
    from safetensors.numpy import save_file

    c = CONFIG
    D, I, E, H, KV, hd = (c["hidden_size"], c["moe_intermediate_size"], c["num_experts"],
                          c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"])
    rng = np.random.default_rng(0)

    def w(*shape, scale=None):
        scale = scale or 1 / np.sqrt(shape[-1])
        return (rng.standard_normal(shape, np.float32) * scale).astype(np.float16)

    os.makedirs(path, exist_ok=True)
    weight_map = {}
    shards = [{"model.embed_tokens.weight": w(c["vocab_size"], D, scale=0.05), "model.norm.weight": np.ones(D, np.float16)}]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t = {p + "input_layernorm.weight": np.ones(D, np.float16), p + "post_attention_layernorm.weight": np.ones(D, np.float16),
             p + "self_attn.q_proj.weight": w(H * hd, D), p + "self_attn.k_proj.weight": w(KV * hd, D),
             p + "self_attn.v_proj.weight": w(KV * hd, D), p + "self_attn.o_proj.weight": w(D, H * hd),
             p + "self_attn.q_norm.weight": np.ones(hd, np.float16), p + "self_attn.k_norm.weight": np.ones(hd, np.float16),
             p + "mlp.gate.weight": w(E, D, scale=0.5)}
        for e in range(E):
            q = f"{p}mlp.experts.{e}."
            t.update({q + "gate_proj.weight": w(I, D), q + "up_proj.weight": w(I, D), q + "down_proj.weight": w(D, I)})
        shards.append(t)
    for n, tensors in enumerate(shards):
        name = f"model-{n:05d}.safetensors"
        save_file(tensors, os.path.join(path, name))
        weight_map.update({k: name for k in tensors})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(c, f)


def disk_bandwidth(path, seconds=3.0, chunk=64 * 2**20):
    """Sequential O_DIRECT read bandwidth of `path` in GB/s (buffered where O_DIRECT is refused)."""
    from lowmoe.tier.slots import aligned_empty

    buf = aligned_empty(chunk)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        fd = os.open(path, os.O_RDONLY)
    size, done, t0 = os.path.getsize(path), 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n = os.preadv(fd, [memoryview(buf)], done % (size - chunk) // 4096 * 4096)
        done += n
    os.close(fd)
    return done / (time.perf_counter() - t0) / 1e9


def reads_alone(engine, keys):
    """Seconds for the reader pool to read `keys` into the cache slots, with no compute.
    It overwrites slots behind the cache policy's back: call it only on an engine about to close."""
    ex = engine.model.experts
    slots = list(range(min(len(keys), ex.plan.slots)))
    t0 = time.perf_counter()
    reqs = [ex.reader.submit(k, slots[i % len(slots)]) for i, k in enumerate(keys[: len(slots)])]
    for r in reqs:
        ex.reader.wait(r)
    return time.perf_counter() - t0, len(reqs)


def decode(packed, budget, prompt, new_tokens, strategy, routes=None):
    """One cold-cache run: (generation, seconds of the same reads done alone)."""
    predictor = "nextgate" if strategy == "oracle" else strategy
    with lowmoe.Engine.from_pretrained(packed, expert_cache=budget, predictor=predictor) as e:
        if strategy == "oracle":
            e.model.predictor = Oracle(e.config, routes)
        g = e.generate(prompt, new_tokens, stop_at_eos=False)
        read_s, n = reads_alone(e, [(l, x) for l in e.config.moe_layers for x in range(e.config.num_experts)])
        direct = e.model.experts.tier.store.direct
    return g, read_s / n * g.stats["bytes_read"] / e.model.experts.slab.layout.block, direct


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/var/tmp/lowmoe-bench-offload")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--budgets", default="100%,50%,25%,10%")
    ap.add_argument("--strategies", default="none,nextgate,history,oracle")
    args = ap.parse_args()

    src, packed = os.path.join(args.dir, "model"), os.path.join(args.dir, "packed")
    if not os.path.isfile(os.path.join(src, "config.json")):
        write_model(src)
    if not os.path.isfile(os.path.join(packed, "experts.json")):
        pack_model(src, packed)
    prompt = [int(t) for t in np.random.default_rng(1).integers(1, CONFIG["vocab_size"], 16)]
    disk = disk_bandwidth(os.path.join(packed, "experts.bin"))

    with lowmoe.Engine.from_pretrained(packed) as e:  # compute alone: every expert resident
        e.generate(prompt, 2)
        resident = e.generate(prompt, args.new_tokens, stop_at_eos=False)
    with lowmoe.Engine.from_pretrained(packed, expert_cache="100%", predictor="none") as e:
        e.model.predictor = recorder = Recorder(e.config)
        e.generate(prompt, args.new_tokens, stop_at_eos=False)
    rows = []
    for budget in args.budgets.split(","):
        for strategy in args.strategies.split(","):  # side by side, same budget, each from a cold cache
            g, reads_s, direct = decode(packed, budget, prompt, args.new_tokens, strategy, recorder.routes)
            assert g.tokens == resident.tokens, "offloaded output differs from the resident run"
            s, d = g.stats, g.stats["decode_s"]
            hidden = (reads_s + resident.stats["decode_s"] - d) / reads_s if reads_s else 0.0
            rows.append((budget, strategy, g.stats["decode_tok_s"], s["stall_s"] / d, s["bytes_read"] / g.stats["decode_tokens"],
                         s["cache_hit_rate"], s["prefetch_hit_rate"], s["topk_recall"], hidden, direct))

    print(f"model: {CONFIG['num_hidden_layers']} MoE layers x {CONFIG['num_experts']} experts, "
          f"{os.path.getsize(os.path.join(packed, 'experts.bin')) / 1e9:.2f} GB packed experts; "
          f"disk sequential read (O_DIRECT, 64 MiB): {disk:.2f} GB/s; {args.new_tokens} new tokens")
    print(f"every expert resident (compute alone): {resident.stats['decode_tok_s']:.1f} tok/s")
    print("| budget | strategy | decode tok/s | vs none | stall fraction | MB read/token | cache hit rate | prefetch hit rate | top-k recall | read time hidden | O_DIRECT |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    base = {r[0]: r[2] for r in rows if r[1] == "none"}
    for b, strat, tps, stall, bpt, hit, pre, rec, hidden, direct in rows:
        ratio = f"{tps / base[b]:.2f}x" if b in base else "-"
        print(f"| {b} | {strat} | {tps:.1f} | {ratio} | {stall:.2f} | {bpt / 1e6:.1f} | {hit:.2f} | {pre:.2f} | {rec:.2f} | {max(hidden, 0):.0%} | {direct} |")


if __name__ == "__main__":
    main()
