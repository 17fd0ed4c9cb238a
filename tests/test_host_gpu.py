"""lowmoe's CUDA kernels run on the CPU (tests/host_cupy.py: each native/*.cu, as NVRTC gets it,
built as host C++ with every GPU thread a fiber), so their source is checked without a GPU:
each kernel against NumPy float64 on tools/gpu_check.py's cases, the expert kernels bit for bit
against backend/exact.py (what lets the CPU stand in for them), and the whole GPU decoder on the
bundled model against the CPU decoder, with the experts resident on the device, in a GPU expert
cache (fake copy stream: tests/fake_device.py) at several budgets, with misses computed on the CPU,
and as CPU-MoE, all bit-identical to the resident run.

What this cannot show: the hardware (f16 cvt, memory coalescing, the copy stream really
overlapping compute), CuPy itself, and the speed; tools/gpu_check.sh does on a GPU."""

import os
import sys

import numpy as np
import pytest

import lowmoe
from lowmoe.backend import cuda

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import gpu_check  # noqa: E402  (tools/, for its float64 references and cases)
import kernel_inputs  # noqa: E402

# Launches of more than this many weight or key elements are left to gpu_check on a GPU: every GPU
# thread is a fiber here, and a context switch per barrier makes the largest shapes take minutes.
MAX_WORK = 3 << 20
PROMPT = [5, 17, 300, 42, 9, 77, 100, 3]  # ids inside the test models' 384-token vocabulary
GGUF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "gguf")


def _work(name, case):
    """Elements one case's largest launch reads (weights, or keys times heads)."""
    if name == "linear":
        T, D, R = case[1:]
        return D * R
    if name.startswith("expert_ffn"):
        E, I, D, k, T = case[1:]
        return 3 * I * D * min(E, k * T)
    if name == "attention":
        T, H, KV, hd, start = case[1:]
        return T * H * (start + T) * hd
    return 0


@pytest.mark.parametrize("name", list(gpu_check.KERNEL_CASES))
def test_kernel_against_float64(host_gpu, name):
    fn, cases = gpu_check.KERNEL_CASES[name]
    ran = 0
    for i, case in enumerate(cases):
        if _work(name, case) > MAX_WORK:
            continue
        g = np.random.default_rng([6, len(name), i])  # gpu_check's own seeds
        err = fn(cuda, host_gpu, g, *case)
        assert err <= gpu_check.TOL, f"{name} {case}: error {err:.3g}"
        ran += 1
    assert ran >= 2


_FLOAT_SHAPES = [(4, 48, 64, 2, 1, False), (6, 37, 53, 3, 3, False), (3, 40, 264, 2, 4, True)]
# Block formats: rows a multiple of 256 (of 32: q8_0 ... q5_1), a partial second pass of the warp
# (D 768 = 512 + 256), formats mixed as llama.cpp's Q4_K_M mixes them.
_BLOCK_SHAPES = [(4, 256, 256, 2, 1, False), (3, 256, 768, 2, 3, True)]


@pytest.mark.parametrize("dtype,E,I,D,k,T,skip",
                         [(d, *s) for d in ("f32", "f16", "bf16") for s in _FLOAT_SHAPES]
                         + [(d, *s) for d in gpu_check.BLOCKS for s in _BLOCK_SHAPES]
                         + [(("q4_k", "q4_k", "q6_k"), 3, 256, 512, 2, 2, False),
                            (("q8_0", "q8_0", "q5_0"), 3, 96, 256, 2, 2, False)])
def test_expert_kernels_compute_exact_bits(host_gpu, dtype, E, I, D, k, T, skip):
    """Decode (one token at a time) and grouped prefill: every row bit for bit exact.expert_rows, the
    combine exact.combine; entries idx < 0 leave their rows untouched. Shapes: under one 16-byte
    load per lane, odd sizes (the element path), more than one pass of the warp with a partial last
    one (264 = 256 + 8 weights); the GGUF block formats, one or mixed."""
    from lowmoe.backend import exact

    g = np.random.default_rng([E, I, D, k, T])
    x = (g.standard_normal((T, D)) * 3).astype(np.float32)
    fg, fu, fd = dtype if isinstance(dtype, tuple) else (dtype,) * 3
    gate, up = (kernel_inputs.weights(g, (E, I, D), f, 1 / np.sqrt(D))[0] for f in (fg, fu))
    down = kernel_inputs.weights(g, (E, D, I), fd, 1 / np.sqrt(I))[0]
    idx = np.stack([g.choice(E, k, replace=False) for _ in range(T)]).astype(np.int32)
    if skip:
        idx[::2, 0] = -1
    w = g.uniform(0.1, 1, (T, k)).astype(np.float32)
    want = np.full((T, k, D), np.nan, np.float32)
    for t in range(T):
        for j, e in enumerate(idx[t]):
            if e >= 0:
                exact.expert_rows(x[t : t + 1], gate[e], up[e], down[e], dtype, want[t, j : j + 1])
    decode = np.full((T, k, D), np.nan, np.float32)
    for t in range(T):
        cuda.expert_rows(x[t : t + 1], gate, up, down, dtype, idx[t : t + 1], decode[t])
    prefill = np.full((T * k, D), np.nan, np.float32)
    cuda.expert_rows(x, gate, up, down, dtype, idx, prefill)
    assert np.array_equal(decode.view(np.uint32), want.view(np.uint32))
    assert np.array_equal(prefill.reshape(T, k, D).view(np.uint32), want.view(np.uint32))
    if not skip:
        out = np.full((T, D), np.nan, np.float32)
        cuda.expert_combine(prefill, w, out)
        assert np.array_equal(out.view(np.uint32), exact.combine(want, w).view(np.uint32))


def _run(engine):
    gen = engine.generate(PROMPT, 4, stop_at_eos=False)
    return gen.tokens, engine.logits(PROMPT + gen.tokens[:2]), gen.stats


def _same_as_cpu(path, **options):
    with lowmoe.Engine.from_pretrained(path, **options) as e:
        want, want_logits, _ = _run(e)
    with lowmoe.Engine.from_pretrained(path, device="cuda", **options) as e:
        got, logits, _ = _run(e)
    assert got == want, path
    assert np.abs(logits - want_logits).max() <= gpu_check.TOL * np.abs(want_logits).max(), path


def test_gpu_decoder_matches_the_cpu(host_gpu):
    _same_as_cpu(lowmoe.DEFAULT_MODEL)


def test_gpu_decoder_matches_the_cpu_on_every_architecture(host_gpu, test_models):
    """Mixtral, Qwen2-MoE (shared expert), Qwen3-MoE, OLMoE (clip_qkv, full q/k norm), Qwen3.5-MoE
    (Gated DeltaNet layers, gated attention with partial RoPE); f32, f16, bf16. A float32 KV cache:
    on these random models a key that float32 noise moves across an f16 rounding boundary moves
    the logits by more than TOL (the trained models above and below decode with the default f16)."""
    for path in test_models.values():
        _same_as_cpu(path, kv_dtype="f32")


def test_gpu_decoder_matches_the_cpu_on_gguf_files(host_gpu):
    """llama.cpp's files computed in their block formats by the CUDA kernels: the Q4_K_M of the Mixtral
    test checkpoint, the Q8_0 of the Qwen2-MoE one (its shared expert's down kept f16: rows of 24),
    and the bundled model's Q4_K_M (Q4_K, Q6_K, Q8_0 and Q5_0, the experts' down format varying by
    layer). (Every format's kernels: test_expert_kernels_compute_exact_bits and tools/gpu_check's
    cases.)"""
    for name in ("mixtral_bf16_sharded-q4_k_m", "qwen2_moe_bf16-q8_0", "default-q4_k_m"):
        _same_as_cpu(os.path.join(GGUF, f"{name}.gguf"))


@pytest.mark.parametrize("model", ["bundled", "default-q4_k_m.gguf", "qwen3_5_moe_f32"])
def test_gpu_expert_cache_is_bit_identical_to_resident_experts(host_gpu, monkeypatch, request, model):
    """The slots path's kernels over slot ids, grouped or not, rows computed on the CPU for misses
    (exact.py), and CPU-MoE (exact.py for every expert): the resident GPU run's bits. Also for the
    bundled model's Q4_K_M, whose layers' experts differ in size: slots sized for the largest, and
    for a Qwen3.5-MoE checkpoint (Gated DeltaNet layers, a shared expert)."""
    from fake_device import KernelDevice

    from lowmoe.tier import placement

    if model == "bundled":
        path = lowmoe.DEFAULT_MODEL
    elif model.endswith(".gguf"):
        path = os.path.join(GGUF, model)
    else:
        path = request.getfixturevalue("test_models")[model]
    # Copies slower than reads: misses find them in flight.
    monkeypatch.setattr(placement, "CupyDevice", lambda: KernelDevice(host_gpu, delay_s=0.01, seed=4))
    with lowmoe.Engine.from_pretrained(path, device="cuda") as e:
        want, want_logits, _ = _run(e)
    runs = ((dict(expert_cache="25%", miss_policy="wait"), "slots"), (dict(expert_cache="min", miss_policy="wait"), "slots"),
            (dict(expert_cache="25%", miss_policy="cpu", predictor="none"), "slots"), (dict(cpu_moe=True), "host"))
    for options, where in runs[2:] if model.endswith(".gguf") else runs:  # the stand-in's block kernels are slow
        with lowmoe.Engine.from_pretrained(path, device="cuda", cpu_moe=options.pop("cpu_moe", False), **options) as e:
            got, logits, stats = _run(e)
            assert e.model.where == where
            on_cpu = getattr(e.model.experts, "tier", None) and e.model.experts.tier.on_cpu
        assert got == want and np.array_equal(logits, want_logits), options
        if options.get("miss_policy") == "cpu":
            assert on_cpu > 0
        if where == "slots":
            assert stats["misses"] > 0


def test_bench_on_the_gpu(host_gpu, monkeypatch, capsys):
    """`lowmoe bench --device cuda`: the context prefilled on the device, reactive, nextgate and
    oracle in a GPU expert cache (fake copy stream), each run's tokens equal the resident run's
    (the bench refuses otherwise), and the oracle replays the routing the resident GPU run recorded."""
    import json

    from fake_device import KernelDevice

    from lowmoe.tier import placement
    from lowmoe.cli.__main__ import main as cli

    monkeypatch.setattr(placement, "CupyDevice", lambda: KernelDevice(host_gpu))
    assert cli(["bench", "--device", "cuda", "--miss-policy", "cpu", "--context", "24", "--new-tokens", "3",
                "--repeats", "1", "--strategies", "none,reactive,nextgate,oracle", "--expert-cache", "25%",
                "--context-cache", "none", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["device"] == "cuda" and set(result["strategies"]) == {"none", "reactive", "nextgate", "oracle"}
    assert result["strategies"]["reactive"]["cache_hit_rate"] < 1
    assert result["strategies"]["oracle"]["topk_recall"] == 1.0  # the resident run recorded the routing


def test_a_saved_context_loads_onto_the_device(host_gpu, tmp_path):
    from lowmoe.cli.benchmark import load_context

    with lowmoe.Engine.from_pretrained(device="cuda") as e:
        built, loaded = load_context(e, PROMPT, 4, str(tmp_path))
        again, loaded_again = load_context(e, PROMPT, 4, str(tmp_path))
    assert (loaded, loaded_again) == (False, True)
    assert np.array_equal(again.logits, built.logits) and again.length == built.length == len(PROMPT)
    for a, b in zip(again.kv.k + again.kv.v, built.kv.k + built.kv.v):
        assert type(a) is type(b) and np.array_equal(a[:, : len(PROMPT)], b[:, : len(PROMPT)])


def test_a_planned_gpu_forward_stays_inside_the_plan(host_gpu, monkeypatch):
    """With a VRAM budget, no forward pass holds more tokens than the plan's workspace was sized for
    (vram.PREFILL_CHUNK, 3 here), the KV cache never more than max_context positions (a prompt
    decoded from a Context without room grows it to the sequence, not to twice the prompt), and a
    longer sequence is a one-line error."""
    from fake_device import KernelDevice

    from lowmoe.tier import placement, vram

    monkeypatch.setattr(placement, "CupyDevice", lambda: KernelDevice(host_gpu))
    monkeypatch.setattr(vram, "PREFILL_CHUNK", 3)
    with lowmoe.Engine.from_pretrained(device="cuda", vram_budget="1GiB", max_context=12, cpu_moe=False,
                                       miss_policy="wait") as e:
        seen, forward = [], e.model.forward

        def recording(tokens, kv, all_logits=False):
            seen.append((len(tokens), kv.k[0].shape[1]))
            return forward(tokens, kv, all_logits)

        e.model.forward = recording
        e.logits(PROMPT)
        context = e.prefill(PROMPT)
        assert len(list(e.stream_from(context, 4, stop_at_eos=False))) == 4
        assert max(t for t, _ in seen) == 3 and max(c for _, c in seen) == len(PROMPT) + 4
        with pytest.raises(lowmoe.InputError, match="exceed max_context 12"):
            e.generate(PROMPT, 5)
