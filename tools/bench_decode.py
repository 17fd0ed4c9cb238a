"""Decode speed of lowmoe vs transformers on the CPU, same thread count, side by side in one run;
and lowmoe's time to first token with a cold and a warm Numba kernel cache.

    python tools/bench_decode.py [--threads 2] [--new-tokens 64] [--repeats 3] [--large-dir DIR]

Models: the bundled model, and a larger random Qwen3-MoE checkpoint written with transformers
(bf16, ~0.8 GB of experts) into --large-dir (made once). transformers runs in float32 (the usual
CPU setting; bf16 weights upcast), with its KV cache, one token per step, greedy.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np


def large_model(path):
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        vocab_size=8000, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512,
        num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
        num_experts=32, num_experts_per_tok=4, norm_topk_prob=True, initializer_range=0.05,
    )
    Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return path


def time_lowmoe(path, prompt, new_tokens):
    import lowmoe

    engine = lowmoe.Engine.from_pretrained(path)
    engine.generate(prompt[:4], 2)  # compile / warm up
    out = engine.generate(prompt, new_tokens, stop_at_eos=False)
    return out.stats["decode_tok_s"], out.tokens


def time_transformers(path, prompt, new_tokens):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = []
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        past, token = out.past_key_values, int(out.logits[0, -1].argmax())
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            tokens.append(token)
            out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past, token = out.past_key_values, int(out.logits[0, -1].argmax())
        dt = time.perf_counter() - t0
    return new_tokens / dt, tokens


def first_token_seconds(cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "lowmoe.cli", "decode", "--prompt", "In the beginning", "--max-new-tokens", "1", "--json"],
        env=env, capture_output=True, text=True, check=True,
    )
    return time.perf_counter() - t0, json.loads(r.stdout)["time_to_first_token_s"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--large-dir", default=os.path.join(tempfile.gettempdir(), "lowmoe-bench-large"))
    args = ap.parse_args()

    import numba
    import torch

    import lowmoe

    numba.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    models = {"bundled": lowmoe.DEFAULT_MODEL, "large-random": large_model(args.large_dir)}
    rng = np.random.default_rng(0)
    rows = []
    for name, path in models.items():
        vocab = lowmoe.Engine.from_pretrained(path).config.vocab_size
        prompt = [int(t) for t in rng.integers(0, vocab, 32)]
        lm, tf = [], []
        for _ in range(args.repeats):  # alternate, so drift in machine load hits both alike
            s, lm_tokens = time_lowmoe(path, prompt, args.new_tokens)
            lm.append(s)
            s, tf_tokens = time_transformers(path, prompt, args.new_tokens)
            tf.append(s)
        same = sum(a == b for a, b in zip(lm_tokens, tf_tokens))
        rows.append((name, statistics.median(lm), statistics.median(tf), same))

    with tempfile.TemporaryDirectory() as cache:
        cold = first_token_seconds(cache)
        warm = first_token_seconds(cache)

    print(f"threads: {args.threads}, prompt 32 tokens, {args.new_tokens} new tokens, median of {args.repeats}")
    print("| model | lowmoe tok/s | transformers tok/s | ratio | greedy tokens equal |")
    print("|---|---|---|---|---|")
    for name, a, b, same in rows:
        print(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {same}/{args.new_tokens} |")
    print()
    print("| start | process wall s | time to first token s |")
    print("|---|---|---|")
    print(f"| cold kernel cache | {cold[0]:.1f} | {cold[1]:.1f} |")
    print(f"| warm kernel cache | {warm[0]:.1f} | {warm[1]:.1f} |")


if __name__ == "__main__":
    main()
