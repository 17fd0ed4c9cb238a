"""One-shot GPU check of lowmoe's CUDA kernels (run by tools/gpu_check.sh; needs a GPU and CuPy).

    python tools/gpu_check.py OUTDIR [--models DIR] [--tokens N] [--skip-bench] [--probe]

1. Every kernel (through lowmoe/backend/cuda.py; the cases are kernel_checks.py's) against NumPy
   float64 on fresh random inputs, never zeros, at several shapes including odd ones. Outputs and
   scratch buffers start as NaN (cuda.POISON), so every element must be written; KV cache rows past the context are NaN, so no
   kernel may read them. The expert kernels bit for bit against backend/exact.py.
2. Greedy tokens of device='cuda' equal device='cpu' on the bundled model, on the Q8_0 and Q4_K_M
   GGUF files in tests/data/gguf (the block-format kernels) and on every checkpoint in --models
   (tools/make_test_models.py output); logits of a prefill are compared too.
3. The GPU expert cache (issue 7) on the bundled model: device slots at several budgets and
   predictors, a VRAM budget, CPU-MoE and the cost model's choice give the resident GPU run's
   tokens (and its logits, bit for bit, where one group holds a layer's experts).
4. Kernel launches and host syncs per decoded token (tools/gpu_counts.py) for each placement of the
   experts (every one resident on the GPU, a GPU expert cache with and without a predictor,
   CPU-MoE), on the bundled model and on a random model with Qwen3-30B-A3B's layout (48 MoE layers,
   128 experts, top 8; small widths): every step must count the same, and the host wait as often as
   the placement's design says (gpu_counts.PLACEMENTS). At small batch the host's launch work bounds a fast
   GPU's decode: these are the numbers to cut by fusing kernels or capturing a CUDA graph. CuPy's
   own array operators (residual adds, KV cache writes) are not counted.
5. Bandwidth of the decode GEMVs (expert SwiGLU in bf16 and in Q4_K_M, lm_head-sized linear) against a large
   device-to-device copy measured in the same run.
6. Benchmark (tools/gpu_bench.py; --skip-bench leaves it out): reactive vs nextgate vs oracle
   under a 12 GiB budget emulation at 8K context, and CPU-MoE vs the GPU cache.

Writes OUTDIR/gpu_check.log (every case) and OUTDIR/summary.json; prints a short table last.
Exit status 0 when everything passed, 1 when something failed, 2 when no GPU is usable (one line
says why; --probe checks only that).
"""

import argparse
import json
import os
import sys
import time
import traceback

import numpy as np

from gpu_counts import count_decode, make_layout_model
from kernel_checks import BLOCK_EXPERTS, BLOCKS, DT, KERNEL_CASES, TOL, expert_sum
from kernel_inputs import err, randn, weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


class Report:
    def __init__(self, outdir):
        self.log = open(os.path.join(outdir, "gpu_check.log"), "w", encoding="utf-8")
        self.rows = []  # (check, cases, worst, result)

    def line(self, text):
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def row(self, check, cases, worst, ok):
        self.rows.append((check, cases, worst, "PASS" if ok else "FAIL"))

    def table(self):
        w = max(len(r[0]) for r in self.rows)
        lines = [f"{'check':<{w}}  {'cases':>5}  {'worst':>26}  result", "-" * (w + 45)]
        lines += [f"{c:<{w}}  {n:>5}  {str(x):>26}  {r}" for c, n, x, r in self.rows]
        return "\n".join(lines)


# ---------------------------------------------------------------------------- kernels (kernel_checks.py)


def run_kernels(rep, cuda, cp):
    for name, (fn, cases) in KERNEL_CASES.items():
        worst, ok = 0.0, True
        for i, case in enumerate(cases):
            g = np.random.default_rng([6, len(name), i])
            try:
                e = fn(cuda, cp, g, *case)
            except Exception:
                rep.line(f"{name} {case}: ERROR\n{traceback.format_exc()}")
                e = float("inf")
            rep.line(f"{name} {case}: err {e:.3g}")
            worst, ok = max(worst, e), ok and e <= TOL
        rep.row(name, len(cases), f"err {worst:.2g} (tol {TOL:g})", ok)


def compare_exact(rep, cuda, cp):
    """The expert kernels against exact.expert_rows / exact.combine on the CPU, bit for bit: what
    makes --miss-policy cpu and CPU-MoE give the GPU cache's output. Decode and prefill shapes,
    odd sizes (the element path), large activations (silu's exp far from 0)."""
    from lowmoe.backend import exact

    floats = [(8, 48, 64, 2, 1), (4, 37, 53, 2, 1), (16, 768, 2048, 8, 1), (8, 48, 64, 2, 9), (4, 37, 53, 3, 5),
              (16, 768, 2048, 8, 40)]
    for dtype in DT + BLOCKS:
        ok, worst = True, 0
        shapes = floats if dtype in DT else BLOCK_EXPERTS
        for i, (E, I, D, k, T) in enumerate(shapes):
            g = np.random.default_rng([7, i])
            x = randn(g, T, D) * 4
            gate, up = (weights(g, (E, I, D), dtype, 1 / np.sqrt(D))[0] for _ in range(2))
            down = weights(g, (E, D, I), dtype, 1 / np.sqrt(I))[0]
            idx = np.stack([g.choice(E, k, replace=False) for _ in range(T)]).astype(np.int32)
            w = g.uniform(0.1, 1.0, (T, k)).astype(np.float32)
            y = cp.full((T * k, D), np.nan, np.float32)
            out = cp.full((T, D), np.nan, np.float32)
            cuda.expert_rows(cp.asarray(x), cp.asarray(gate), cp.asarray(up), cp.asarray(down), dtype, cp.asarray(idx), y)
            cuda.expert_combine(y, cp.asarray(w), out)
            want = np.empty((T, k, D), np.float32)
            for t in range(T):
                for j, e in enumerate(idx[t]):
                    exact.expert_rows(x[t : t + 1], gate[e], up[e], down[e], dtype, want[t, j : j + 1])
            rows = cp.asnumpy(y).reshape(T, k, D)
            differ = int(np.sum(rows.view(np.uint32) != want.view(np.uint32)))
            same_sum = np.array_equal(cp.asnumpy(out).view(np.uint32), exact.combine(want, w).view(np.uint32))
            rep.line(f"exact bits {dtype} E{E} I{I} D{D} k{k} T{T}: {differ} of {rows.size} row values differ, "
                     f"combine {'same' if same_sum else 'DIFFERS'}")
            worst = max(worst, differ)
            ok = ok and differ == 0 and same_sum
        rep.row(f"exact bits {dtype}", len(shapes), f"{worst} values differ", ok)


# ------------------------------------------------------------------------ whole models


def compare_models(rep, paths, n_tokens):
    from lowmoe import Engine

    for label, path in paths:
        try:
            with Engine.from_pretrained(path) as c, Engine.from_pretrained(path, device="cuda") as gpu:
                ids = c.encode("In the beginning God created") if label.startswith("default") else list(range(3, 14))
                want = c.generate(ids, n_tokens, stop_at_eos=False)
                t0 = time.perf_counter()
                got = gpu.generate(ids, n_tokens, stop_at_eos=False)
                gpu_s = time.perf_counter() - t0
                lerr = err(gpu.logits(ids), c.logits(ids).astype(np.float64))
            same = want.tokens == got.tokens
            rep.line(f"tokens {label}: cpu {want.tokens}\n       {' ' * len(label)} gpu {got.tokens}\n"
                     f"       prefill logits err {lerr:.3g}; gpu decode {got.stats['decode_tok_s']:.1f} tok/s "
                     f"({gpu_s:.2f} s incl. prefill)")
            rep.row(f"tokens {label}", n_tokens, f"logits err {lerr:.2g}", same)
        except Exception:
            rep.line(f"tokens {label}: ERROR\n{traceback.format_exc()}")
            rep.row(f"tokens {label}", n_tokens, "error", False)


def compare_gpu_cache(rep, n_tokens):
    """Tokens (and prefill logits) of the GPU expert cache against the resident GPU run."""
    from lowmoe import Engine

    cases = [dict(expert_cache="25%", predictor="none", cpu_moe=False),
             dict(expert_cache="25%", predictor="nextgate", cpu_moe=False),
             dict(expert_cache="25%", predictor="nextgate", lookahead=2, readers=2, cpu_moe=False),
             dict(expert_cache="min", predictor="nextgate", cpu_moe=False),
             dict(vram_budget="1GiB", max_context=1024, predictor="nextgate", cpu_moe=False),
             dict(expert_cache="25%", predictor="none", cpu_moe=False, miss_policy="cpu"),
             dict(expert_cache="min", predictor="nextgate", cpu_moe=False, miss_policy="cpu"),
             dict(expert_cache="25%", storage="ram"),  # SHARPI_CPU_MOE unset: the cost model decides
             dict(cpu_moe=True), dict(cpu_moe=True, expert_cache="25%")]
    with Engine.from_pretrained(device="cuda") as gpu:
        ids = gpu.encode("In the beginning God created")
        want = gpu.generate(ids, n_tokens, stop_at_eos=False).tokens
        want_logits = gpu.logits(ids)
    for options in cases:
        label = "gpu cache " + ",".join(f"{k}={v}" for k, v in options.items())
        try:
            with Engine.from_pretrained(device="cuda", **options) as e:
                got = e.generate(ids, n_tokens, stop_at_eos=False)
                logits = e.logits(ids)
                where = e.model.where
            exact = np.array_equal(logits, want_logits)
            lerr = err(logits, want_logits.astype(np.float64))
            # Any grouping, misses computed on the CPU and CPU-MoE all compute the resident kernels' bits.
            ok = got.tokens == want and exact
            rep.line(f"{label}: experts {where}, tokens {'same' if got.tokens == want else got.tokens}, "
                     f"logits {'bit-identical' if exact else f'err {lerr:.3g}'}, hits {got.stats.get('hits')}, "
                     f"prefetched {got.stats.get('prefetched')}, misses {got.stats.get('misses')}, "
                     f"on the CPU {getattr(getattr(e.model.experts, 'tier', None), 'on_cpu', '-')}")
            rep.row(label, n_tokens, f"{where}, {'exact' if exact else f'err {lerr:.2g}'}", ok)
        except Exception:
            rep.line(f"{label}: ERROR\n{traceback.format_exc()}")
            rep.row(label, n_tokens, "error", False)


# ------------------------------------------------------------------------- bandwidth


def _time(cp, fn, reps):
    fn()  # warm-up (and compile)
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for i in range(reps):
        fn(i)
    end.record()
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) / 1e3 / reps


def _bf16_ones(cp, shape):
    # bf16 bits of values near 1 (not zeros), made on the device: fast for GBs of weights.
    return (cp.arange(int(np.prod(shape)), dtype=np.int32) % 64 + 0x3F80).astype(np.uint16).reshape(shape)


def run_bandwidth(rep, cuda, cp):
    g = np.random.default_rng(66)
    n = 1 << 30  # 1 GiB copy: far past L2
    src, dst = cp.ones(n // 4, np.float32), cp.empty(n // 4, np.float32)
    copy_s = _time(cp, lambda i=0: cp.copyto(dst, src), 20)
    copy_bw = 2 * n / copy_s  # read + write
    rep.line(f"device-to-device copy of 1 GiB: {copy_s * 1e3:.3f} ms, {copy_bw / 1e9:.0f} GB/s (read + write)")
    del src, dst

    # Expert SwiGLU GEMV, a Qwen3-30B-A3B layer (E 128, k 8, D 2048, I 768, bf16); each call takes the
    # next 8 experts, so 16 calls walk all 1.2 GB of the layer and nothing is served from L2.
    E, I, D, k = 128, 768, 2048, 8
    gate, up, down = (_bf16_ones(cp, s) for s in [(E, I, D), (E, I, D), (E, D, I)])
    x = cp.asarray(randn(g, 1, D))
    idx = [cp.arange(j * k, (j + 1) * k, dtype=np.int32).reshape(1, k) for j in range(E // k)]
    w = cp.full((1, k), 0.125, np.float32)
    out = cp.empty((1, D), np.float32)
    moe_s = _time(cp, lambda i=0: expert_sum(cuda, x, gate, up, down, "bf16", idx[i % len(idx)], w, out), 64)
    moe_bw = 3 * k * I * D * 2 / moe_s
    del gate, up, down
    # The same layer in llama.cpp's Q4_K_M (gate, up Q4_K, down Q6_K): random block bytes, the same
    # time whatever they decode to.
    qg, qu = (cp.random.randint(0, 256, (E, I, D // 256 * 144), dtype=np.uint8) for _ in range(2))
    qd = cp.random.randint(0, 256, (E, D, I // 256 * 210), dtype=np.uint8)
    q_s = _time(cp, lambda i=0: expert_sum(cuda, x, qg, qu, qd, ("q4_k", "q4_k", "q6_k"), idx[i % len(idx)], w, out), 64)
    q_bw = k * (qg[0].nbytes + qu[0].nbytes + qd[0].nbytes) / q_s
    del qg, qu, qd

    # lm_head-sized linear GEMV: 151936 x 2048 bf16 = 622 MB.
    R = 151936
    wl = _bf16_ones(cp, (R, D))
    bias, y = cp.zeros(R, np.float32), cp.empty((1, R), np.float32)
    lin_s = _time(cp, lambda i=0: cuda.linear(x, wl, "bf16", y, bias), 20)
    lin_bw = R * D * 2 / lin_s
    for label, s, bw in (("expert SwiGLU GEMV (Qwen3-30B-A3B layer, bf16)", moe_s, moe_bw),
                         ("expert SwiGLU GEMV Q4_K_M (Qwen3-30B-A3B layer, q4_k / q6_k)", q_s, q_bw),
                         ("linear GEMV (151936 x 2048, bf16)", lin_s, lin_bw)):
        rep.line(f"{label}: {s * 1e6:.1f} us, {bw / 1e9:.0f} GB/s = {bw / copy_bw:.0%} of copy")
        rep.row(f"bandwidth {label.split(' (')[0]}", 1, f"{bw / 1e9:.0f} GB/s = {bw / copy_bw:.0%} of copy", bw >= 0.7 * copy_bw)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("outdir")
    p.add_argument("--models", default=None, help="folder of tools/make_test_models.py checkpoints (one per subfolder)")
    p.add_argument("--tokens", type=int, default=24, help="greedy tokens compared per model")
    p.add_argument("--skip-bench", action="store_true", help="leave out the GPU expert cache benchmark")
    p.add_argument("--probe", action="store_true", help="only see whether a GPU is usable (exit 0 or 2)")
    args = p.parse_args(argv)
    os.makedirs(args.outdir, exist_ok=True)

    from lowmoe import DEFAULT_MODEL, DeviceError
    from lowmoe.backend import cuda

    rep = Report(args.outdir)
    try:
        cp = cuda.cupy()
    except DeviceError as e:
        rep.line(f"gpu_check: no usable GPU: {e}")
        return 2
    if args.probe:
        return 0
    cuda.POISON = True
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    rep.line(f"GPU: {props['name'].decode()}, {props['totalGlobalMem'] / 2**30:.0f} GiB, CuPy {cp.__version__}, "
             f"CUDA runtime {cp.cuda.runtime.runtimeGetVersion()}, driver {cp.cuda.runtime.driverGetVersion()}")
    t0 = time.perf_counter()
    run_kernels(rep, cuda, cp)
    compare_exact(rep, cuda, cp)
    gguf = os.path.join(ROOT, "tests", "data", "gguf")  # llama.cpp's files: block formats, per-layer mixes
    models = [("default", DEFAULT_MODEL)] + [(f, os.path.join(gguf, f)) for f in sorted(os.listdir(gguf))
                                             if f.endswith(("-q8_0.gguf", "-q4_k_m.gguf"))]
    if args.models:
        models += [(n, os.path.join(args.models, n)) for n in sorted(os.listdir(args.models))
                   if os.path.isfile(os.path.join(args.models, n, "config.json"))]
    else:
        rep.row("tokens transformers-made models", 0, "no --models given", False)
    compare_models(rep, models, args.tokens)
    compare_gpu_cache(rep, args.tokens)
    cuda.POISON = False  # counting and timing without the NaN fills
    counted = [("default", DEFAULT_MODEL)]
    try:
        counted.append(("Qwen3-30B-A3B layout", make_layout_model(os.path.join(args.outdir, "layout_model"))))
    except Exception:
        rep.line(f"Qwen3-30B-A3B layout model: ERROR\n{traceback.format_exc()}")
        rep.row("per token Qwen3-30B-A3B layout", 0, "error", False)
    count_decode(rep, counted)
    try:
        run_bandwidth(rep, cuda, cp)
    except Exception:
        rep.line(f"bandwidth: ERROR\n{traceback.format_exc()}")
        rep.row("bandwidth", 0, "error", False)
    if not args.skip_bench:
        try:
            from gpu_bench import run_bench  # tools/, beside this file

            run_bench(rep.line, rep.row, args.outdir)
        except Exception:
            rep.line(f"bench: ERROR\n{traceback.format_exc()}")
            rep.row("bench", 0, "error", False)
    rep.line(f"total {time.perf_counter() - t0:.0f} s")
    ok = all(r[3] == "PASS" for r in rep.rows)
    with open(os.path.join(args.outdir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"passed": ok, "rows": rep.rows}, f, indent=1)
    rep.line("\n" + rep.table())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
