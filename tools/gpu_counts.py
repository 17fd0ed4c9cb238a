"""Kernel launches and host syncs per decoded token on the GPU, for each placement of the experts
(PLACEMENTS): `counting` wraps what lowmoe asks of CuPy, `decode_counts` counts decode steps,
`count_decode` makes tools/gpu_check.py's rows of them, `make_layout_model` writes a small model
with Qwen3-30B-A3B's layer layout (counts depend on the layout, not the widths). At small batch
the host's launch work bounds a fast GPU, so these numbers say where fusing or capturing pays.
"""

import contextlib
import json
import os
import threading
import traceback

import numpy as np

# The expert placements whose decode steps are counted: Engine options, and the host syncs each
# MoE layer adds to the one every token has (its logits). The slots runs wait for their misses
# (no rows computed on the CPU), so their counts do not depend on when copies land.
PLACEMENTS = {
    "resident": (dict(cpu_moe=False), 0),  # the router's ids stay on the device
    "slots": (dict(expert_cache="25%", predictor="none", miss_policy="wait", cpu_moe=False), 1),  # its ids
    # + the hidden state the predictor reads (its ids are on the host by then: no second wait), and
    # the refinement's router logits on the layer's input (model.Model._refine)
    "slots nextgate": (dict(expert_cache="25%", predictor="nextgate", miss_policy="wait", cpu_moe=False), 3),
    "cpu-moe": (dict(cpu_moe=True), 3),  # ids, u and w: three copies, each waited for
}
COUNTED = ("launches", "cupy", "uploads", "syncs")
PROMPT = [5, 17, 300, 42, 9, 77, 100, 3]  # token ids inside every vocabulary counted here


@contextlib.contextmanager
def counting(dev=None):
    """Counts what this thread asks of the GPU inside the block -> {name: count}, filled on exit:

    launches  lowmoe's kernels (every one goes through cuda._launch);
    cupy      CuPy kernels lowmoe calls by name: fills (full, ones; zeros, a memset), exp, clip, and
              ascontiguousarray where it copies;
    uploads   host-to-device copies: cupy.asarray of a host array;
    syncs     waits of the host for the GPU: cupy.asnumpy of a device array, and synchronize() of
              the expert tier's device `dev` (device_slots.py's event waits).

    Not counted: CuPy's array operators (x + y, +=, *, /, slice assignment: the residual adds, the
    KV cache writes, the shared expert's gate), methods of cupy.ndarray that cannot be wrapped; and
    other threads (the slot tier's readers wait there for their own copies, not the decode). Where
    cupy has no array type of its own (tests/host_cupy.py's stand-in: NumPy arrays) every asarray
    counts as an upload and every asnumpy as a sync; tests/test_gpu_check.py gives it one."""
    from lowmoe.backend import cuda

    cp = cuda.cupy()
    device_array = getattr(cp, "ndarray", None)
    if device_array is np.ndarray:  # a stand-in: its host and device arrays are alike
        device_array = None
    me = threading.get_ident()
    n = dict.fromkeys(COUNTED, 0)
    saved = []

    def wrap(obj, name, key, counts=lambda args, result: True):
        f = getattr(obj, name, None)
        if f is None:
            return
        saved.append((obj, name, vars(obj).get(name)))

        def counted(*args, **kwargs):
            result = f(*args, **kwargs)
            if threading.get_ident() == me and counts(args, result):
                n[key] += 1
            return result

        setattr(obj, name, counted)

    def on_host(a):
        return device_array is None or not isinstance(a, device_array)

    def on_device(a):
        return device_array is None or isinstance(a, device_array)

    wrap(cuda, "_launch", "launches")
    for name in ("full", "ones", "zeros", "exp", "clip"):
        wrap(cp, name, "cupy")
    wrap(cp, "ascontiguousarray", "cupy", lambda args, r: r is not args[0])
    wrap(cp, "asarray", "uploads", lambda args, r: on_host(args[0]))
    wrap(cp, "asnumpy", "syncs", lambda args, r: on_device(args[0]))  # of a host array: no copy, no wait
    if dev is not None:
        wrap(dev, "synchronize", "syncs")
    try:
        yield n
    finally:
        for obj, name, old in reversed(saved):
            if old is None:
                delattr(obj, name)  # it was the class's
            else:
                setattr(obj, name, old)


def decode_counts(engine, ids=PROMPT, steps=4):
    """[{name: count}] of each of `steps` greedy decode steps (counting) after a prefill of `ids`."""
    ctx = engine.prefill(ids, steps)
    kv, token = ctx.kv, int(np.argmax(ctx.logits))
    dev = getattr(getattr(engine.model.experts, "tier", None), "dev", None)
    per_step = []
    for _ in range(steps):
        with counting(dev) as n:
            logits = engine.model.forward(np.array([token], np.int64), kv)
        per_step.append(n)
        token = int(np.argmax(logits[-1]))
    return per_step


def make_layout_model(path, layers=48, experts=128, top_k=8, seed=0):
    """A random qwen3_moe checkpoint in `path` with Qwen3-30B-A3B's layout (48 layers, every one
    MoE, 128 experts, top 8, per-head q/k norm, separate lm_head) and small widths, f16: what a decode
    step launches and waits for depends on the layout only (attention is 2 launches at any
    context, a linear 1 at any size). -> path"""
    from safetensors.numpy import save_file

    D, H, KV, hd, I, V = 64, 4, 2, 16, 32, 512
    g = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    config = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=V, hidden_size=D,
                  num_hidden_layers=layers, num_attention_heads=H, num_key_value_heads=KV, head_dim=hd,
                  intermediate_size=4 * I, moe_intermediate_size=I, num_experts=experts, num_experts_per_tok=top_k,
                  norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6,
                  rope_theta=1e6, tie_word_embeddings=False, eos_token_id=2, torch_dtype="float16")
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)

    def w(*shape):
        return (g.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float16)

    t = {"model.embed_tokens.weight": w(V, D), "model.norm.weight": 1 + w(D), "lm_head.weight": w(V, D)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": 1 + w(D), p + "post_attention_layernorm.weight": 1 + w(D),
                  p + "self_attn.q_proj.weight": w(H * hd, D), p + "self_attn.k_proj.weight": w(KV * hd, D),
                  p + "self_attn.v_proj.weight": w(KV * hd, D), p + "self_attn.o_proj.weight": w(D, H * hd),
                  p + "self_attn.q_norm.weight": 1 + w(hd), p + "self_attn.k_norm.weight": 1 + w(hd),
                  p + "mlp.gate.weight": w(experts, D)})
        for e in range(experts):
            q = f"{p}mlp.experts.{e}."
            t.update({q + "gate_proj.weight": w(I, D), q + "up_proj.weight": w(I, D), q + "down_proj.weight": w(D, I)})
    save_file(t, os.path.join(path, "model.safetensors"))
    return path


def count_decode(rep, models, steps=4):
    """Kernel launches and host syncs per decoded token for each placement (PLACEMENTS) of each
    (label, path) in `models`: a row each, failing unless every step counts the same and the host
    waits 1 + (the placement's syncs per MoE layer) x (MoE layers) times."""
    from lowmoe import Engine

    for model, path in models:
        for label, (options, per_layer) in PLACEMENTS.items():
            check = f"per token {label} {model}"
            try:
                with Engine.from_pretrained(path, device="cuda", **options) as e:
                    per_step = decode_counts(e, steps=steps)
                    moe = len(e.config.moe_layers)
                n, want = per_step[-1], 1 + per_layer * moe
                same = all(s == n for s in per_step)
                rep.line(f"{check}: {n['launches']} lowmoe kernels + {n['cupy']} CuPy kernels named (not counted: "
                         f"CuPy array operators), {n['uploads']} uploads, {n['syncs']} host syncs (want 1 + "
                         f"{per_layer} x {moe} MoE layers = {want}); steps {'agree' if same else per_step}")
                ok = same and n["syncs"] == want
                rep.row(check, steps, f"{n['launches'] + n['cupy']} launches, {n['syncs']} syncs", ok)
            except Exception:
                rep.line(f"{check}: ERROR\n{traceback.format_exc()}")
                rep.row(check, steps, "error", False)
