"""A small predictor per MoE layer, fitted offline by `lowmoe train-predictor` (PreScope-style).

For MoE layer N (all but the last): logits of the next MoE layer's experts = W @ rms(h) + b, with
h layer N's post-attention residual, rms() an RMS norm without weight, W f32[E, D], b f32[E].
Fitting starts from nextgate (the next router with the next post-attention norm folded into W)
and learns a correction by softmax regression on the experts the next layer really chose; a layer
keeps nextgate's weights where the fit does not beat it on held-back calibration tokens (on the
bundled model the fit won on 6 of 7 layers: held-out recall 88.2% vs nextgate's 86.2%). At run
time each fitted layer is also scored against nextgate on what the gating really chooses, and the
better of the two ranks (Learned).

File: safetensors beside the model, `moe_predictor.safetensors`, tensors
`predictor.layers.{N}.weight` [E, D] and `predictor.layers.{N}.bias` [E] (f32), optionally
`predictor.first_layer.experts` int32 [V, k] (the first MoE layer's routing by token id, -1 where
unseen: predict/first_layer.py), metadata model_type, hidden_size, num_experts.
"""

import os

import numpy as np

from ..backend import cpu
from ..errors import CheckpointError
from . import next_moe_layers

FILENAME = "moe_predictor.safetensors"


def predictor_file(model):
    """Where the learned predictor of `model` is kept: FILENAME in a model folder; beside a GGUF file,
    NAME.moe_predictor.safetensors (of the first split for a split model), one per file, since a
    folder often holds several quantizations of a model."""
    if model.endswith(".gguf"):
        return f"{model[: -len('.gguf')]}.{FILENAME}"
    return os.path.join(model, FILENAME)


def normalise(h, eps):
    """h f32[T, D] -> f32[T, D] with unit RMS per row."""
    return h / np.sqrt(np.mean(h * h, axis=1, keepdims=True) + np.float32(eps))


def nextgate_init(cfg, dense, layer):
    """(W f32[E, D], b f32[E]) equal to nextgate for `layer`: the next router with the next
    post-attention norm's weight folded into its columns."""
    w = dense.layers[next_moe_layers(cfg)[layer]]
    router = cpu.to_f32(w.router.w, w.router.dtype) * w.post_norm[None, :]
    bias = w.router.bias if w.router.bias is not None else np.zeros(cfg.num_experts, np.float32)
    return router.astype(np.float32), bias.astype(np.float32)


def fit(u, chosen, w0, b0, steps=300, lr=0.01, l2=1e-3, bias=True):
    """Softmax regression from the next layer's choices, started at (w0, b0).

    u f32[N, D] normalised inputs; chosen int[N, k] the experts the next layer picked (the target
    puts 1/k on each); w0 f32[E, D], b0 f32[E]. Full-batch Adam on the cross-entropy plus
    l2 * |W - w0|^2, which keeps the fit near its start where data is scarce. bias=False keeps
    b at b0 (pre-gate heads have no bias). -> (W, b) f32.
    """
    n, k = chosen.shape
    E = w0.shape[0]
    target = np.zeros((n, E), np.float32)
    np.put_along_axis(target, chosen, 1.0 / k, axis=1)
    params = [w0.astype(np.float32).copy(), b0.astype(np.float32).copy()]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        z = u @ params[0].T + params[1]  # [N, E]
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        d = (p - target) / n  # d loss / d z
        grads = [d.T @ u + 2 * l2 * (params[0] - w0), d.sum(axis=0)]
        for i, g in enumerate(grads if bias else grads[:1]):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            params[i] -= lr * (m[i] / (1 - 0.9**t)) / (np.sqrt(v[i] / (1 - 0.999**t)) + 1e-8)
    return params[0].astype(np.float32), params[1].astype(np.float32)


def topk_recall(w, b, u, chosen):
    """Mean |top-k of (u @ w.T + b) & chosen| / k over rows; u f32[N, D], chosen int[N, k]."""
    k = chosen.shape[1]
    top = np.argsort(-(u @ w.T + b), axis=1, kind="stable")[:, :k]
    return float(np.mean([len(set(p) & set(c)) for p, c in zip(top.tolist(), chosen.tolist())]) / k)


FIRST = "predictor.first_layer.experts"


def save(path, cfg, layers, first=None):
    """layers: {MoE layer N: (W f32[E, D], b f32[E])} for every MoE layer but the last; first: the
    token table int32 [V, k] or None."""
    from safetensors.numpy import save_file

    tensors = {} if first is None else {FIRST: np.ascontiguousarray(first, np.int32)}
    for n, (w, b) in layers.items():
        tensors[f"predictor.layers.{n}.weight"] = np.ascontiguousarray(w, np.float32)
        tensors[f"predictor.layers.{n}.bias"] = np.ascontiguousarray(b, np.float32)
    meta = {"model_type": cfg.model_type, "hidden_size": str(cfg.hidden_size), "num_experts": str(cfg.num_experts)}
    save_file(tensors, path, metadata=meta)


def load(path, cfg):
    """({MoE layer N: (W f32[E, D], b f32[E])}, token table int32 [V, k] or None), or
    CheckpointError naming the file and tensor."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            want = {"model_type": cfg.model_type, "hidden_size": str(cfg.hidden_size),
                    "num_experts": str(cfg.num_experts)}
            for key, value in want.items():
                if meta.get(key) != value:
                    raise CheckpointError(f"{path}: metadata {key}={meta.get(key)!r}, but the model has {value!r}")
            layers = {}
            for n in next_moe_layers(cfg):
                pair = []
                for suffix, shape in (("weight", (cfg.num_experts, cfg.hidden_size)), ("bias", (cfg.num_experts,))):
                    name = f"predictor.layers.{n}.{suffix}"
                    if name not in names:
                        raise CheckpointError(f"{path}: missing tensor '{name}'")
                    t = f.get_tensor(name)
                    if t.shape != shape:
                        raise CheckpointError(f"{path}: tensor '{name}' has shape {list(t.shape)}, expected {list(shape)}")
                    pair.append(np.ascontiguousarray(t, np.float32))
                layers[n] = tuple(pair)
            first = None
            if FIRST in names:
                first = f.get_tensor(FIRST)
                want = (cfg.vocab_size, cfg.top_k)
                if first.shape != want or first.dtype != np.int32 or first.min() < -1 or first.max() >= cfg.num_experts:
                    raise CheckpointError(f"{path}: tensor '{FIRST}' must be int32 {list(want)} of expert ids or -1")
            return layers, first
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own errors on truncated or corrupt files
        raise CheckpointError(f"{path}: cannot read predictor ({str(e).splitlines()[0]})") from None


class Learned:
    """The fitted maps, each scored online against nextgate (the map it started from) on the layer
    it predicts: the gating reveals that layer's experts, so each keeps a decaying count of the
    chosen experts its top-k held, and the better one ranks (a tie: the fitted map). A fit to
    calibration text unlike what is then decoded costs nothing (measured on such a model: fitted
    0.79 top-k recall against nextgate's 0.84). A layer whose file holds nextgate itself computes
    once; the others take one more GEMV [E, D] a token."""

    DECAY = 0.98  # a count weighs about the last 50 tokens

    def __init__(self, cfg, weights_file, dense):
        self.eps = cfg.rms_norm_eps
        self.k = cfg.top_k
        self.next = next_moe_layers(cfg)
        self.layers, self.first = load(os.fspath(weights_file), cfg)  # first: read by model.Model
        self.nextgate = {}  # MoE layer N -> nextgate's (W, b), where the file's differ
        for n, (w, b) in self.layers.items():
            w0, b0 = nextgate_init(cfg, dense, n)
            if not (np.array_equal(w, w0) and np.array_equal(b, b0)):
                self.nextgate[n] = (w0, b0)
        self.hits = {}  # predicted layer -> [fitted, nextgate] decayed hit counts
        self.pending = {}  # predicted layer -> (fitted top-k, nextgate top-k) of the last prediction

    def predict(self, layer, h, chosen):
        if layer in self.pending:
            truth = set(chosen.tolist())
            hits = self.hits.setdefault(layer, [0.0, 0.0])
            for i, top in enumerate(self.pending.pop(layer)):
                hits[i] = self.DECAY * hits[i] + len(truth & top)
        nxt = self.next.get(layer)
        if nxt is None:
            return []
        u = normalise(h, self.eps)
        ranked = _rank(u, *self.layers[layer])
        if layer in self.nextgate:
            other = _rank(u, *self.nextgate[layer])
            self.pending[nxt] = (set(ranked[: self.k].tolist()), set(other[: self.k].tolist()))
            fitted, plain = self.hits.get(nxt, (0.0, 0.0))
            if plain > fitted:
                ranked = other
        return [(nxt, ranked)]


def _rank(u, w, b):
    """Experts by u f32[1, D] @ w.T + b, best first."""
    logits = np.empty((1, w.shape[0]), np.float32)
    cpu.linear(u, w, "f32", logits)
    return np.argsort(-(logits[0] + b), kind="stable")
