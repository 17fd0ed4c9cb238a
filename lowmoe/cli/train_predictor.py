"""`lowmoe train-predictor`: fit the `learned` expert predictor on calibration text and save it
beside the model (MODEL/moe_predictor.safetensors), where the engine then picks it by default."""

import os
import sys
import time


def add_arguments(p):
    p.add_argument("model", nargs="?", default=None, help="model folder (default: the bundled model)")
    p.add_argument("--calib", default=None, metavar="TEXTFILE",
                   help="calibration text (UTF-8); default: text the model samples itself at temperature 1 "
                   "(real text from the model's domain predicts better)")
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="output file (default: MODEL/moe_predictor.safetensors)")
    p.add_argument("--seed", type=int, default=0, help="seed for the self-sampled calibration text")


class _Recorder:
    """Stands in for the predictor: stores each MoE layer's input h and chosen experts, hints nothing."""

    def __init__(self):
        self.h = {}  # layer -> list of f32[D]
        self.chosen = {}  # layer -> list of int64[k]

    def predict(self, layer, h, chosen):
        self.h.setdefault(layer, []).append(h[0].copy())
        self.chosen.setdefault(layer, []).append(chosen.copy())
        return None


def record(engine, ids, n, seed):
    """Runs n decode steps one token at a time: teacher-forced through `ids`, or, when ids is
    None, sampling at temperature 1 from the first eos token. -> the recorder."""
    import numpy as np

    from lowmoe.errors import InputError
    from lowmoe.model import KVCache
    from lowmoe.sampling import sample

    if ids is None:
        if not engine.config.eos_token_ids:
            raise InputError(f"{engine.model_dir}: config.json has no eos_token_id to start sampling from; "
                             "give --calib TEXTFILE")
        ids = [engine.config.eos_token_ids[0]]
    rec, rng = _Recorder(), np.random.default_rng(seed)
    engine.model.predictor = rec  # called in decode only: the engine has an expert cache
    kv = KVCache(engine.config, n)
    token = ids[0]
    for i in range(n):
        logits = engine.model.forward(np.array([token], np.int64), kv)
        token = ids[i + 1] if i + 1 < len(ids) else sample(logits[-1], 1.0, 1.0, 0, rng)
    return rec


def train(engine, rec):
    """{MoE layer N: (W, b)} predicting the next MoE layer's choices from N's h: fitted on the first
    4/5 of the tokens, or nextgate's weights where those predict the last 1/5 at least as well."""
    import numpy as np

    from lowmoe.predict import learned, next_moe_layers

    cfg = engine.config
    layers = {}
    for n, nxt in next_moe_layers(cfg).items():
        u = learned.normalise(np.stack(rec.h[n]), cfg.rms_norm_eps)  # [T, D]
        chosen = np.stack(rec.chosen[nxt])  # [T, k]
        s = len(u) * 4 // 5
        w0, b0 = learned.nextgate_init(cfg, engine.model.w, n)
        w, b = learned.fit(u[:s], chosen[:s], w0, b0)
        fitted = learned.topk_recall(w, b, u[s:], chosen[s:]) > learned.topk_recall(w0, b0, u[s:], chosen[s:])
        layers[n] = (w, b) if fitted else (w0, b0)
    return layers


def main(args):
    from lowmoe import DEFAULT_MODEL, Engine
    from lowmoe.errors import InputError
    from lowmoe.predict.learned import FILENAME, save

    model = args.model or DEFAULT_MODEL
    if args.tokens < 16:
        raise InputError(f"--tokens must be >= 16, got {args.tokens}")
    out = args.out or os.path.join(model, FILENAME)
    if args.out is None and not os.access(model, os.W_OK):
        raise InputError(f"{model}: folder is not writable; give --out FILE")
    t0 = time.perf_counter()
    with Engine.from_pretrained(model, expert_cache="100%", predictor="none") as engine:
        ids = None
        if args.calib is not None:
            try:
                with open(args.calib, encoding="utf-8") as f:
                    ids = engine.encode(f.read())[: args.tokens]
            except (OSError, UnicodeDecodeError) as e:
                raise InputError(f"{args.calib}: cannot read calibration text ({e})") from None
        n = args.tokens if ids is None else len(ids)
        rec = record(engine, ids, n, args.seed)
        t1 = time.perf_counter()
        layers = train(engine, rec)
        save(out, engine.config, layers)
    print(f"recorded {n} tokens in {t1 - t0:.1f}s, fitted {len(layers)} layers in "
          f"{time.perf_counter() - t1:.1f}s -> {out}", file=sys.stderr)
    return 0
