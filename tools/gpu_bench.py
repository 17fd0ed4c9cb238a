"""GPU expert cache benchmark (issue 7), the benchmark section of tools/gpu_check.py:

    python tools/gpu_bench.py OUTDIR [--inter 10240] [--context 8192] [--new-tokens 32] [--repeats 2]

`lowmoe bench --device cuda` compares the prefetch strategies in a GPU expert cache; this adds
what it does not run (CPU-MoE, misses on the CPU, the cost models' own choices), side by side
through the API, all on device 'cuda':

- the model: the bundled model with every expert widened from 96 to --inter units (random gate/up
  rows, zero down columns: the same routing and the same function; 15.7 MB per bf16 expert at
  10240, 2.0 GB of experts), written with NumPy alone;
- the budget: the share of experts a 12 GiB card caches for Qwen3-30B-A3B (bf16) at 8K context,
  from lowmoe.tier.vram.plan_vram (about 13%), given as an expert cache of that share;
- the slow tier: host memory (storage 'ram'), as on a 12 GB card whose experts live in RAM;
- one 8K context prefilled once by the all-resident engine; each strategy decodes from it, runs
  interleaved, the median of --repeats reported: resident (every expert on the GPU: the ceiling),
  reactive, nextgate (both waiting for missed copies), miss-cpu (nextgate with --miss-policy cpu),
  oracle (the true routing of an earlier run), CPU-MoE (experts in host memory on the CPU,
  attention on the GPU), and the cost models' choices with SHARPI_CPU_MOE and --miss-policy unset;
- then the same budget through `lowmoe bench --device cuda` itself.

Tokens of every strategy must equal the resident run's: the GPU cache runs the same kernels, and
the CPU computes experts in their arithmetic (backend/exact.py).
"""

import argparse
import json
import logging
import os
import statistics
import struct
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

QWEN3_30B = {"model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
             "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
             "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
             "norm_topk_prob": True, "tie_word_embeddings": False}


def card_share(budget="12GiB", context=8192):
    """Share of Qwen3-30B-A3B's experts (bf16) a `budget` card caches at `context` tokens."""
    from lowmoe.load.config import parse_model_config
    from lowmoe.tier.vram import plan_vram

    cfg = parse_model_config(QWEN3_30B)
    D, V, hd, L = cfg.hidden_size, cfg.vocab_size, cfg.head_dim, cfg.num_layers
    rows = [(cfg.num_heads * hd, D), (cfg.num_kv_heads * hd, D), (cfg.num_kv_heads * hd, D), (D, cfg.num_heads * hd),
            (cfg.num_experts, D)]
    # dense as weights.device_bytes counts it: bf16 matrices with an f32 bias row, f32 vectors
    layer = sum(r * c * 2 + 4 * r for r, c in rows) + 4 * (2 * D + 2 * hd)
    dense = 2 * (V * D * 2 + 4 * V) + 4 * D + L * layer
    slot = 3 * cfg.expert_intermediate * D * 2
    return plan_vram(budget, cfg, dense, slot, context, cfg.top_k, "f16").cache.fraction


def _write_safetensors(path, tensors):
    """tensors {name: (safetensors dtype, array)}: the format, written with NumPy alone."""
    header, offset = {}, 0
    for name, (dtype, a) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, a in tensors.values():
            f.write(np.ascontiguousarray(a).tobytes())


def widen_bundled(out, inter, seed=0):
    """The bundled model with experts of `inter` units (see the module docstring) in `out`."""
    import shutil

    from lowmoe import DEFAULT_MODEL
    from lowmoe.load.checkpoint import Checkpoint, to_f32

    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    os.makedirs(out, exist_ok=True)
    ckpt = Checkpoint(DEFAULT_MODEL)
    g = np.random.default_rng(seed)
    shards = [{}]
    for name, t in sorted(ckpt.tensors.items()):
        raw, dtype = ckpt.read(name, t.shape)
        if ".experts." not in name:
            shards[0][name] = (dtype, raw)
            continue
        assert dtype == "BF16"
        layer = int(name.split(".")[2])
        while len(shards) <= layer + 1:
            shards.append({})
        if name.endswith("down_proj.weight"):  # [D, I0] -> [D, inter], zero columns
            wide = np.zeros((raw.shape[0], inter), np.uint16)
            wide[:, : raw.shape[1]] = raw
        else:  # gate/up [I0, D] -> [inter, D], random rows at the trained scale
            scale = float(to_f32(raw, dtype).std())
            extra = (g.standard_normal((inter - raw.shape[0], raw.shape[1]), np.float32) * scale)
            wide = np.concatenate([raw, (extra.view(np.uint32) >> 16).astype(np.uint16)])
        shards[layer + 1][name] = (dtype, wide)
    weight_map = {}
    for n, shard in enumerate(shards):
        file = f"model-{n:05d}.safetensors"
        _write_safetensors(os.path.join(out, file), shard)
        weight_map.update({k: file for k in shard})
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": weight_map}, f)
    with open(os.path.join(DEFAULT_MODEL, "config.json")) as f:
        cfg = json.load(f)
    cfg["moe_intermediate_size"] = inter
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    shutil.copyfile(os.path.join(DEFAULT_MODEL, "tokenizer.json"), os.path.join(out, "tokenizer.json"))
    return out


class _Lines(logging.Handler):
    def __init__(self, say):
        super().__init__(logging.INFO)
        self.say = say

    def emit(self, record):
        self.say(record.getMessage())


def _decode(engine, context, n):
    stats = {}
    tokens = list(engine.stream_from(context, n, stop_at_eos=False, stats=stats))
    return tokens, stats["decode_tokens"] / stats["decode_s"], stats


def run_bench(say, row, outdir, inter=10240, context_len=8192, new_tokens=32, repeats=2):
    """Runs the benchmark; say(text) logs a line, row(check, cases, worst, ok) adds a summary row.
    Returns the result dict (also written to OUTDIR/gpu_bench.json)."""
    from lowmoe import Engine
    from lowmoe.predict.oracle import Oracle, Recorder

    t0 = time.perf_counter()
    model = widen_bundled(os.path.join(outdir, "bench-model"), inter)
    share = card_share("12GiB", context_len)
    budget = f"{100 * share:.2f}%"
    say(f"bench: model {model} (experts of {inter} units), 12 GiB card = {share:.1%} of Qwen3-30B-A3B's experts "
        f"-> expert cache {budget}, storage ram, context {context_len}, {new_tokens} new tokens x {repeats} "
        f"(model written in {time.perf_counter() - t0:.0f} s)")
    log = logging.getLogger("lowmoe")
    log.setLevel(logging.INFO)
    log.addHandler(_Lines(say))

    resident = Engine.from_pretrained(model, device="cuda")
    ids = np.random.default_rng(0).integers(1, resident.config.vocab_size, context_len).tolist()
    t = time.perf_counter()
    context = resident.prefill(ids, new_tokens, chunk=512)
    say(f"bench: prefill of {context_len} tokens (all experts resident) {time.perf_counter() - t:.1f} s")
    cached = dict(device="cuda", expert_cache=budget, storage="ram")
    engines = {
        "resident": resident,
        "reactive": Engine.from_pretrained(model, predictor="none", cpu_moe=False, miss_policy="wait", **cached),
        "nextgate": Engine.from_pretrained(model, predictor="nextgate", cpu_moe=False, miss_policy="wait", **cached),
        "miss-cpu": Engine.from_pretrained(model, predictor="nextgate", cpu_moe=False, miss_policy="cpu", **cached),
        "oracle": Engine.from_pretrained(model, predictor="none", cpu_moe=False, miss_policy="wait", **cached),
        "cpu-moe": Engine.from_pretrained(model, device="cuda", storage="ram", cpu_moe=True),
        "auto": Engine.from_pretrained(model, predictor="nextgate", **cached),
    }
    # The oracle's routes: an untimed recording run (greedy: the same routing in every run).
    recorder = Recorder(resident.config)
    engines["oracle"].model.predictor = recorder
    reference, _, _ = _decode(engines["oracle"], context, new_tokens)
    engines["oracle"].model.predictor = Oracle(resident.config, recorder.routes)
    where = engines["auto"].model.where
    say(f"bench: with SHARPI_CPU_MOE unset the cost model chose {'CPU-MoE' if where == 'host' else 'the GPU cache'}")
    runs = {name: [] for name in engines}
    tokens = {}
    for r in range(repeats):
        for name, engine in engines.items():
            if name == "oracle":
                engine.model.predictor.step = -1
            tokens[name], tok_s, stats = _decode(engine, context, new_tokens)
            runs[name].append((tok_s, stats))
    result = {"model": model, "expert_cache": budget, "context": context_len, "new_tokens": new_tokens,
              "auto_choice": where, "strategies": {}}
    say(f"{'strategy':<10} {'tok/s':>8} {'vs reactive':>11} {'stall':>6} {'prefetch hits':>13} {'cache hits':>10} "
        f"{'MB/token':>9}  tokens")
    base = statistics.median(t for t, _ in runs["reactive"])
    for name, rs in runs.items():
        tok_s = statistics.median(t for t, _ in rs)
        s = rs[-1][1]
        same = tokens[name] == reference
        result["strategies"][name] = {"decode_tok_s": tok_s, "runs": [t for t, _ in rs], "same_tokens": same,
                                      "prefetch_hit_rate": s.get("prefetch_hit_rate"), "cache_hit_rate": s.get("cache_hit_rate"),
                                      "stall_s": s.get("stall_s"), "bytes_read": s.get("bytes_read")}
        stall = s.get("stall_s", 0.0) / s["decode_s"]
        mb = s.get("bytes_read", 0) / max(1, s["decode_tokens"]) / 1e6
        say(f"{name:<10} {tok_s:8.2f} {tok_s / base:10.2f}x {stall:6.2f} {s.get('prefetch_hit_rate', 0):13.1%} "
            f"{s.get('cache_hit_rate', 1):10.1%} {mb:9.1f}  {'same' if same else 'DIFFERENT'}")
    for engine in engines.values():
        engine.close()
    row("bench tokens (every strategy = resident)", len(engines), "", all(tokens[n] == reference for n in engines))
    tps = {n: result["strategies"][n]["decode_tok_s"] for n in engines}
    row("bench nextgate vs reactive (12 GiB emul.)", repeats, f"{tps['nextgate'] / tps['reactive']:.2f}x",
        tps["nextgate"] > tps["reactive"])
    row("bench oracle vs reactive", repeats, f"{tps['oracle'] / tps['reactive']:.2f}x", tps["oracle"] >= tps["reactive"])
    say(f"bench: misses on the CPU vs waiting for the copy (nextgate): {tps['miss-cpu'] / tps['nextgate']:.2f}x")
    # "auto" is the nextgate GPU cache unless the cost model picked CPU-MoE: was its pick the faster one?
    best = "host" if tps["cpu-moe"] > tps["nextgate"] else "slots"
    row("bench cost model choice", 1, f"chose {where}, faster {best}", where == best)
    result["lowmoe_bench"] = cli_bench(say, row, model, budget, context_len, new_tokens, repeats)
    with open(os.path.join(outdir, "gpu_bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    say(f"bench: {time.perf_counter() - t0:.0f} s")
    return result


def cli_bench(say, row, model, budget, context_len, new_tokens, repeats):
    """The same budget through `lowmoe bench --device cuda` (none, reactive, nextgate, oracle; misses
    wait for their copies) -> its JSON result."""
    import contextlib
    import io

    from lowmoe.cli.__main__ import main as lowmoe

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        rc = lowmoe(["bench", model, "--device", "cuda", "--miss-policy", "wait", "--storage", "ram",
                     "--expert-cache", budget, "--context", str(context_len), "--new-tokens", str(new_tokens),
                     "--repeats", str(repeats), "--strategies", "none,reactive,nextgate,oracle",
                     "--context-cache", "none", "--json"])
    if rc != 0:
        row("lowmoe bench --device cuda", 1, f"exit {rc}", False)
        return None
    out = json.loads(text.getvalue())
    s = out["strategies"]
    say("lowmoe bench --device cuda: " + ", ".join(f"{n} {v['decode_tok_s']:.2f} tok/s" for n, v in s.items()))
    ratio = s["nextgate"]["ratio_to_reactive"]
    row("lowmoe bench nextgate vs reactive", repeats, f"{ratio:.2f}x", ratio > 1)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("outdir")
    p.add_argument("--inter", type=int, default=10240)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    os.makedirs(args.outdir, exist_ok=True)
    rows = []
    run_bench(lambda text: print(text, flush=True), lambda *r: rows.append(r), args.outdir, args.inter, args.context,
              args.new_tokens, args.repeats)
    for check, _, worst, ok in rows:
        print(f"{check:<45} {worst:>24}  {'PASS' if ok else 'FAIL'}")
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
