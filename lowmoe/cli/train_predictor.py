"""`lowmoe train-predictor`: fit the `learned` expert predictor on calibration text and save it
beside the model (MODEL/moe_predictor.safetensors), where the engine then picks it by default."""

import os
import sys
import time


def add_arguments(p):
    p.add_argument("model", nargs="?", default=None, help="model folder or GGUF file (default: the bundled model)")
    p.add_argument("--calib", default=None, metavar="TEXTFILE",
                   help="calibration text (UTF-8); default: text the model samples itself at temperature 1 "
                   "(real text from the model's domain predicts better)")
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="output file (default: MODEL/moe_predictor.safetensors)")
    p.add_argument("--seed", type=int, default=0, help="seed for the self-sampled calibration text")
    p.add_argument("--kind", choices=("learned", "pregate"), default="learned",
                   help="learned: a predictor file beside the model; pregate: pre-gate heads written into a "
                   "copy of the checkpoint (--write-into)")
    p.add_argument("--write-into", default=None, metavar="MODEL_COPY",
                   help="with --kind pregate: the copy to write the heads into (made from MODEL if absent)")


class _Recorder:
    """Stands in for the predictor: stores each MoE layer's input h and chosen experts, hints nothing."""

    def __init__(self):
        self.h = {}  # layer -> list of f32[D]
        self.chosen = {}  # layer -> list of int64[k]
        self.tokens = []  # the id of each step

    def predict(self, layer, h, chosen):
        self.h.setdefault(layer, []).append(h[0].copy())
        self.chosen.setdefault(layer, []).append(chosen.copy())
        return []


def record(engine, ids, n, seed):
    """Runs n decode steps one token at a time: teacher-forced through `ids`, or, when ids is
    None, sampling at temperature 1 from the first eos token. -> the recorder."""
    import numpy as np

    from lowmoe.errors import InputError
    from lowmoe.sampling import sample

    if ids is None:
        if not engine.config.eos_token_ids:
            raise InputError(f"{engine.model_dir}: config.json has no eos_token_id to start sampling from; "
                             "give --calib TEXTFILE")
        ids = [engine.config.eos_token_ids[0]]
    rec, rng = _Recorder(), np.random.default_rng(seed)
    engine.model.predictor = rec  # called in decode only: the engine has an expert cache
    kv = engine.kv_cache(n)
    token = ids[0]
    for i in range(n):
        rec.tokens.append(token)
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


def train_pregate(engine, rec):
    """{MoE layer N: W f32[E, D]} pre-gate heads scoring the next MoE layer's experts from N's MoE
    input, started at the next router; kept there where the fit does not predict the held-back
    fifth of the tokens better."""
    import numpy as np

    from lowmoe.backend import cpu
    from lowmoe.predict import learned, next_moe_layers

    cfg, layers, heads = engine.config, engine.model.w.layers, {}
    for n, nxt in next_moe_layers(cfg).items():
        u = cpu.rms_norm(np.stack(rec.h[n]), layers[n].post_norm, cfg.rms_norm_eps)  # [T, D]
        chosen = np.stack(rec.chosen[nxt])
        s = len(u) * 4 // 5
        w0, b0 = cpu.to_f32(layers[nxt].router.w, layers[nxt].router.dtype), np.zeros(cfg.num_experts, np.float32)
        w, _ = learned.fit(u[:s], chosen[:s], w0, b0, bias=False)
        better = learned.topk_recall(w, b0, u[s:], chosen[s:]) > learned.topk_recall(w0, b0, u[s:], chosen[s:])
        heads[n] = w if better else w0
    return heads


def write_heads(model, copy, heads, prefix="model."):
    """Writes `heads` into `copy` (a copy of `model`, made if absent) as pre_gate.safetensors, named
    under the model's tensor `prefix`, and lists them in the copy's shard index if it has one. The
    original is never touched."""
    import json
    import shutil

    import numpy as np
    from safetensors.numpy import save_file

    from lowmoe.errors import InputError

    if os.path.exists(copy) and os.path.realpath(copy) == os.path.realpath(model):
        raise InputError(f"{copy}: --write-into must be a copy of the model, not the model itself")
    if not os.path.exists(copy):
        shutil.copytree(model, copy)
    elif not os.path.isfile(os.path.join(copy, "config.json")):
        raise InputError(f"{copy}: not a model folder (no config.json); give a copy of {model} or a new path")
    names = {f"{prefix}layers.{n}.mlp.pre_gate.weight": np.ascontiguousarray(w, np.float32) for n, w in heads.items()}
    save_file(names, os.path.join(copy, "pre_gate.safetensors"))
    index = os.path.join(copy, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            data = json.load(f)
        data["weight_map"].update({name: "pre_gate.safetensors" for name in names})
        with open(index + ".tmp", "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
        os.replace(index + ".tmp", index)


def main(args):
    from lowmoe import DEFAULT_MODEL, Engine
    from lowmoe.errors import InputError
    from lowmoe.load.model import DENSE_GGUF
    import numpy as np

    from lowmoe.predict.first_layer import TokenTable
    from lowmoe.predict.learned import predictor_file, save

    model = args.model or DEFAULT_MODEL
    if args.tokens < 16:
        raise InputError(f"--tokens must be >= 16, got {args.tokens}")
    if (args.kind == "pregate") != (args.write_into is not None):
        raise InputError("--kind pregate and --write-into MODEL_COPY go together")
    if args.kind == "pregate" and (model.endswith(".gguf") or os.path.isfile(os.path.join(model, DENSE_GGUF))):
        raise InputError(f"{model}: pre-gate heads are written into a safetensors model copy, not a GGUF model; "
                         "use --kind learned")
    out = args.write_into or args.out or predictor_file(model)
    if args.kind == "learned" and args.out is None and not os.access(os.path.dirname(os.path.abspath(out)), os.W_OK):
        raise InputError(f"{os.path.dirname(os.path.abspath(out))}: folder is not writable; give --out FILE")
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
        if args.kind == "pregate":
            layers = train_pregate(engine, rec)
            write_heads(model, out, layers, engine.config.prefix)
        else:
            layers = train(engine, rec)
            cfg = engine.config
            table = TokenTable(cfg.vocab_size, cfg.top_k)  # the first MoE layer's routing of each calibration token
            table.update(rec.tokens, np.stack(rec.chosen[cfg.moe_layers[0]]))
            save(out, cfg, layers, table.experts)
    print(f"recorded {n} tokens in {t1 - t0:.1f}s, fitted {len(layers)} layers in "
          f"{time.perf_counter() - t1:.1f}s -> {out}", file=sys.stderr)
    return 0
