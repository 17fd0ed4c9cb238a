"""Parity of lowmoe with transformers on tiny random MoE checkpoints (tools/make_test_models.py).

For every variant: full-sequence logits must match transformers' float32 forward, and 24 greedy
tokens decoded step by step through lowmoe's KV cache must equal transformers' greedy tokens
(decoded one token per step through its own KV cache). A third test checks the reference itself:
that its greedy choices and expert choices are decisive (far above float32 noise) and that each
variant really exercises what it was built for (clipping, dense-MLP layers, shared-expert gate).
These run lowmoe with a float32 KV cache (kv_dtype="f32"); its half-precision caches are compared
with transformers whose attention reads keys and values rounded the same way.

transformers/torch missing: everything here is skipped (the `test_models` fixture skips).
lowmoe missing or broken: the lowmoe tests fail.
"""

import importlib.util
import inspect
import os

import numpy as np
import pytest

_MAKER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "make_test_models.py")
_spec = importlib.util.spec_from_file_location("make_test_models", _MAKER)
_maker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_maker)  # imports nothing heavy at module level

VARIANTS = _maker.VARIANTS
NAMES = list(VARIANTS)

PROMPT_LEN = 32
PROMPT_SEED = 1234
NEW_TOKENS = 24
# max|a-b| / max|b|. The reference is transformers in float32 over the checkpoint's own weights
# (half-precision weights upcast exactly), and lowmoe also computes in float32 over the same
# weights, so the dtype changes nothing but the weights' values: what remains is float32 rounding
# and summation order. Observed, all variants: at most 5.6e-6 (3.5e-6 for the bf16/f16 ones),
# native or NUMBA_CPU_NAME=generic codegen, 1 or 2 threads. 3e-5 is 5x that; an RMSNorm eps ten
# times too large gives 8e-5 to 0.45 (the least on qwen3_moe_f16_sharded) and fails every variant.
TOLERANCE = {"float32": 3e-5, "bfloat16": 3e-5, "float16": 3e-5}
MIN_GREEDY_GAP = 1e-3  # top-1 minus top-2 logit along the reference greedy path
MIN_ROUTER_GAP = 1e-3  # k-th minus (k+1)-th router logit, every MoE layer, every position


def _prompt(vocab_size):
    """PROMPT_LEN fixed random token ids, avoiding the special ids 0 (pad), 1 (bos), 2 (eos)."""
    rng = np.random.default_rng(PROMPT_SEED)
    return [int(t) for t in rng.integers(3, vocab_size, size=PROMPT_LEN)]


def _compute_reference(path):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    version = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if version >= (4, 56) else "torch_dtype"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model; a thread pool only waits for cores on a busy machine
    try:
        return _run_reference(torch, AutoModelForCausalLM.from_pretrained(
            path, attn_implementation="eager", **{dtype_kw: torch.float32}).eval())
    finally:
        torch.set_num_threads(threads)


def _run_reference(torch, model):
    cfg = model.config
    ids = _prompt(cfg.vocab_size)

    # transformers 5.x renamed the forward's past_key_values to cache (and the output field)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def cache_of(out):
        c = getattr(out, "cache", None)
        return c if c is not None else out.past_key_values

    # what the variant exercises, seen from inside transformers' forward
    clip = getattr(cfg, "clip_qkv", None)
    clipped, shared_gate, hooks = {}, [], []
    for mname, module in model.named_modules():
        kind = mname.rsplit(".", 1)[-1]
        if clip is not None and kind in ("q_norm", "k_norm", "v_proj"):
            def hook(mod, inp, out, kind=kind):
                clipped.setdefault(kind, []).append(float((out.abs() > clip).float().mean()))
            hooks.append(module.register_forward_hook(hook))
        if kind == "shared_expert_gate":
            hooks.append(module.register_forward_hook(lambda mod, inp, out: shared_gate.append(torch.sigmoid(out))))

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float().numpy()
        for h in hooks:
            h.remove()

        out = model(torch.tensor([ids]), use_cache=True)
        tokens, gaps = [], []
        while True:
            last = out.logits[0, -1]
            top2 = torch.topk(last, 2).values
            gaps.append(float(top2[0] - top2[1]))
            tokens.append(int(last.argmax()))
            if len(tokens) == NEW_TOKENS:
                break
            out = model(torch.tensor([[tokens[-1]]]), use_cache=True, **{cache_kw: cache_of(out)})

        full = model(torch.tensor([ids + tokens]), output_router_logits=True)
    nocache_tokens = [int(t) for t in full.logits[0, len(ids) - 1 : -1].argmax(-1)]
    k = cfg.num_experts_per_tok
    router_gaps = []
    for r in full.router_logits:
        s = torch.sort(r.float().reshape(-1, r.shape[-1]), dim=-1, descending=True).values
        router_gaps.append(float((s[:, k - 1] - s[:, k]).min()))
    sparse_layers = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    return dict(
        config=cfg,
        ids=ids,
        logits=logits,
        tokens=tokens,
        greedy_gap=min(gaps),
        nocache_tokens=nocache_tokens,
        router_gap=min(router_gaps),
        sparse_layers=sparse_layers,
        clipped=clipped,
        shared_gate=torch.cat([g.flatten() for g in shared_gate]).numpy() if shared_gate else None,
    )


@pytest.fixture(scope="module")
def reference(test_models):
    """reference(name) -> transformers' results for that variant, computed once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = _compute_reference(test_models[name])
        return cache[name]

    return get


@pytest.mark.parametrize("name", NAMES)
def test_reference_is_decisive_and_exercises_variant(name, reference):
    ref = reference(name)
    cfg = ref["config"]
    assert ref["tokens"] == ref["nocache_tokens"], "transformers' cached and uncached greedy disagree"
    assert ref["greedy_gap"] >= MIN_GREEDY_GAP, f"near-tie in reference greedy path: {ref['greedy_gap']:.2e}"
    assert ref["router_gap"] >= MIN_ROUTER_GAP, f"near-tie in reference expert choice: {ref['router_gap']:.2e}"
    assert np.isfinite(ref["logits"]).all()

    n_layers = cfg.num_hidden_layers
    if cfg.model_type in ("qwen2_moe", "qwen3_moe", "qwen3_next"):
        # the rule in Qwen2Moe/Qwen3Moe/Qwen3NextDecoderLayer.__init__
        want = [
            i for i in range(n_layers)
            if i not in cfg.mlp_only_layers and cfg.num_experts > 0 and (i + 1) % cfg.decoder_sparse_step == 0
        ]
        assert ref["sparse_layers"] == want
        if cfg.mlp_only_layers or cfg.decoder_sparse_step > 1:
            assert 0 < len(want) < n_layers, "variant meant to mix dense and MoE layers"
    else:
        assert ref["sparse_layers"] == list(range(n_layers))

    if cfg.model_type == "qwen2_moe":
        g = ref["shared_gate"]
        assert g is not None and g.min() < 0.3 and g.max() > 0.7, "shared-expert gate should vary"

    if getattr(cfg, "clip_qkv", None) is not None:
        for kind in ("q_norm", "k_norm", "v_proj"):
            fracs = ref["clipped"][kind]
            assert len(fracs) == n_layers and min(fracs) > 0.01, f"clip_qkv barely clips {kind}: {fracs}"


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name, test_models, reference):
    import lowmoe

    ref = reference(name)
    want = ref["logits"]
    engine = lowmoe.Engine.from_pretrained(test_models[name], kv_dtype="f32")  # the reference's own precision
    got = engine.logits(list(ref["ids"]))
    assert isinstance(got, np.ndarray) and got.dtype == np.float32, (type(got), getattr(got, "dtype", None))
    assert got.shape == want.shape
    assert np.isfinite(got).all()
    err = np.abs(got - want)
    rel = float(err.max() / np.abs(want).max())
    tol = TOLERANCE[VARIANTS[name][1]]
    t, v = np.unravel_index(int(err.argmax()), err.shape)
    assert rel <= tol, (
        f"max|lowmoe - transformers| / max|transformers| = {rel:.2e} > {tol:.0e} "
        f"(worst at position {t}, token {v}: {got[t, v]:.6f} vs {want[t, v]:.6f}; "
        f"argmax differs at {int((got.argmax(-1) != want.argmax(-1)).sum())} of {len(want)} positions)"
    )


@pytest.mark.parametrize("name", NAMES)
def test_greedy_tokens_match_transformers(name, test_models, reference):
    import lowmoe

    ref = reference(name)
    engine = lowmoe.Engine.from_pretrained(test_models[name], kv_dtype="f32")
    result = engine.generate(list(ref["ids"]), max_new_tokens=NEW_TOKENS, temperature=0.0, stop_at_eos=False)
    got = [int(t) for t in result.tokens]
    want = ref["tokens"]
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    assert got == want, f"first difference at generated token {first}:\n  lowmoe       {got}\n  transformers {want}"



def _half_kv_logits(path, kv_dtype, ids):
    """transformers' float32 logits with the keys and values rounded to `kv_dtype` where attention
    reads them (SDPA, registered under a name of its own), as lowmoe's half-precision KV cache
    stores them: rounding is idempotent, so rounding the whole cache at every call is the same."""
    import torch
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    half = {"f16": torch.float16, "bf16": torch.bfloat16}[kv_dtype]
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def attend(module, query, key, value, *args, **kwargs):
        return sdpa(module, query, key.to(half).float(), value.to(half).float(), *args, **kwargs)

    AttentionInterface.register(f"lowmoe_kv_{kv_dtype}", attend)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=f"lowmoe_kv_{kv_dtype}",
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


# Two steps of the half type (2^-10 for f16, 2^-7 for bf16) relative: a key or value within float32
# noise of a rounding boundary rounds the other way in one of the two, one step apart. Observed, all
# variants: at most 2.7e-4 (f16) and 2.3e-3 (bf16); against transformers' unrounded float32 the
# errors are 2e-4 to 5e-3 (f16) and 1e-3 to 0.17 (bf16).
HALF_KV_TOLERANCE = {"f16": 2.0**-10, "bf16": 2.0**-7}


@pytest.mark.parametrize("kv_dtype", ["f16", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_half_kv_cache_matches_transformers_with_rounded_keys_and_values(name, kv_dtype, test_models, reference):
    import lowmoe

    ids = list(reference(name)["ids"])
    want = _half_kv_logits(test_models[name], kv_dtype, ids)
    got = lowmoe.Engine.from_pretrained(test_models[name], kv_dtype=kv_dtype).logits(ids)
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    assert rel <= HALF_KV_TOLERANCE[kv_dtype], f"max|lowmoe - transformers| / max|transformers| = {rel:.2e}"
