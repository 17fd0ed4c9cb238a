"""How much each quantization of a model changes what it predicts, on held-out text.

    python tools/quant_quality.py MODEL --calib TEXT --eval TEXT [--llama-quantize PATH] [--types q4_k_m,...]

For each type, the GGUF that `lowmoe quantize` writes without and with `--calib TEXT`, and, where
`--llama-quantize` names llama.cpp's tool, the file it makes from lowmoe's bf16 GGUF of the same
model (no importance matrix: llama-imatrix is not built here). Every file is decoded by lowmoe
(which decodes llama.cpp's files as transformers does their dequantized weights), over the first
--tokens tokens of the eval text in windows of 512, each from an empty context, against the
unquantized checkpoint: the KL divergence of the file's next-token distribution from the
checkpoint's (mean and 99th percentile over positions), how often both pick the same most likely
token, and the file's perplexity on the text.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lowmoe  # noqa: E402
from lowmoe.quantize.imatrix import WINDOW, collect  # noqa: E402
from lowmoe.quantize.write import quantize_model  # noqa: E402

LLAMA_TYPES = {"q8_0": "Q8_0", "q6_k": "Q6_K", "q5_k_m": "Q5_K_M", "q4_k_m": "Q4_K_M"}


def log_probs(path, ids):
    """log softmax of every position's logits, f64[T, V], windows of WINDOW tokens."""
    with lowmoe.Engine.from_pretrained(path, kv_dtype="f32") as e:
        logits = np.concatenate([e.logits(ids[i : i + WINDOW]) for i in range(0, len(ids), WINDOW)]).astype(np.float64)
    logits -= logits.max(1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(1, keepdims=True))


def compare(ref, lp, ids):
    kl = (np.exp(ref) * (ref - lp)).sum(1)
    nll = -lp[np.arange(len(ids) - 1), np.asarray(ids[1:])]  # position t predicts token t + 1
    return {"kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)),
            "top1_agree": float((ref.argmax(1) == lp.argmax(1)).mean()), "ppl": float(np.exp(nll.mean()))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--calib", required=True, metavar="TEXT")
    ap.add_argument("--eval", required=True, metavar="TEXT")
    ap.add_argument("--types", default="q8_0,q6_k,q5_k_m,q4_k_m")
    ap.add_argument("--tokens", type=int, default=4096, help="eval tokens (default 4096)")
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--llama-quantize", default=None, metavar="PATH")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    with lowmoe.Engine.from_pretrained(args.model) as e:
        ids = e.encode(open(args.eval, encoding="utf-8").read())[: args.tokens]
        calib = e.encode(open(args.calib, encoding="utf-8").read())[: args.calib_tokens]
        importance = collect(e, calib)
    ref = log_probs(args.model, ids)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bf16 = os.path.join(tmp, "bf16.gguf")
        quantize_model(args.model, bf16, "bf16")
        for kind in args.types.split(","):
            files = {}
            for label, imp in (("lowmoe", None), ("lowmoe --calib", importance)):
                files[label] = os.path.join(tmp, f"{label.replace(' ', '')}-{kind}.gguf")
                quantize_model(args.model, files[label], kind, imp)
            if args.llama_quantize and kind in LLAMA_TYPES:
                files["llama-quantize"] = os.path.join(tmp, f"llama-{kind}.gguf")
                subprocess.run([args.llama_quantize, bf16, files["llama-quantize"], LLAMA_TYPES[kind]], check=True,
                               capture_output=True)
            for label, path in files.items():
                row = dict(type=kind, quantizer=label, mb=os.path.getsize(path) / 1e6, **compare(ref, log_probs(path, ids), ids))
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    base = compare(ref, ref, ids)["ppl"]
    if args.json:
        print(json.dumps({"model": args.model, "eval_tokens": len(ids), "ppl_unquantized": base, "rows": rows}, indent=1))
        return
    print(f"{args.model}: {len(ids)} eval tokens; perplexity unquantized {base:.3f}\n")
    print("| type | quantizer | MB | KL mean | KL p99 | top-1 agree | perplexity |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['type']} | {r['quantizer']} | {r['mb']:.2f} | {r['kl_mean']:.5f} | {r['kl_p99']:.4f} | "
              f"{r['top1_agree']:.3f} | {r['ppl']:.3f} |")


if __name__ == "__main__":
    main()
