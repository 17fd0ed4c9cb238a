"""Benchmark the CPU kernels against the machine's memory bandwidth.

expert_ffn at T=1 (decode) should be bound by reading its weights, so it is
reported as weight GB/s next to a large NumPy copy measured in the same run.
Weights of --experts distinct experts are used round-robin so that they come
from DRAM, not from the caches. GGUF block formats (backend/quant.py) are timed
the same way, as GB/s of block bytes read, next to the read-only bandwidth of
the same thread count: experts of --quant-inter filling --quant-mib.

    python tools/bench_kernels.py --repeats 5 --threads 1,2
    python tools/bench_kernels.py --repeats 3 --quant-only
"""

import argparse
import threading
import time

import numba
import numpy as np

from lowmoe.backend import cpu, quant

# Byte offsets of each block's f16 fields (d, and m / dmin; ggml-common.h): set to a small normal
# value in the random blocks so that the timed arithmetic is ordinary.
F16_AT = {"q8_0": [0], "q4_0": [0], "q4_1": [0, 2], "q5_0": [0], "q5_1": [0, 2], "q4_k": [0, 2], "q5_k": [0, 2],
          "q6_k": [208]}
QUANT_MIXES = [(f,) * 3 for f in quant.FORMATS] + [("q4_k", "q4_k", "q6_k")]  # the last: llama.cpp's Q4_K_M


def best_and_median(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), float(np.median(times))


def copy_bandwidth(repeats, nbytes=512 << 20):
    # Counts bytes read + bytes written (not the extra write-allocate reads).
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    best, med = best_and_median(lambda: np.copyto(b, a), repeats)
    return 2 * nbytes / best / 1e9, 2 * nbytes / med / 1e9


@numba.njit(parallel=True, fastmath=True, nogil=True)
def _sum(a):
    s = np.float32(0.0)
    for i in numba.prange(a.size):
        s += a[i]
    return s


def read_bandwidth(repeats, nbytes=512 << 20):
    # Read-only streaming: the ceiling a weight-reading kernel can reach.
    a = np.ones(nbytes // 4, np.float32)
    _sum(a)
    best, med = best_and_median(lambda: _sum(a), repeats)
    return nbytes / best / 1e9, nbytes / med / 1e9


def make_experts(n, D, I, seed=0):
    """n experts as f32 arrays: list of (gate [I, D], up [I, D], down [D, I])."""
    g = np.random.default_rng(seed)
    return [
        tuple(g.standard_normal(s, dtype=np.float32) * 0.02 for s in [(I, D), (I, D), (D, I)])
        for _ in range(n)
    ]


def as_dtype(w, dtype):
    if dtype == "f16":
        return w.astype(np.float16).view(np.uint16)
    if dtype == "bf16":
        return (w.view(np.uint32) >> 16).astype(np.uint16)  # truncation is fine for timing
    return w


def bench_ffn(experts, dtype, T, repeats):
    ws = [tuple(as_dtype(w, dtype) for w in e) for e in experts]
    D = ws[0][0].shape[1]
    x = np.random.default_rng(1).standard_normal((T, D), dtype=np.float32)
    out = np.empty((T, D), np.float32)

    def run():
        for gate, up, down in ws:
            cpu.expert_ffn(x, gate, up, down, dtype, out)

    run()  # compile / load from cache
    nbytes = sum(w.nbytes for e in ws for w in e)
    flops = 2 * T * sum(w.size for e in ws for w in e)
    best, med = best_and_median(run, repeats)
    return nbytes, flops, best, med


def quant_experts(pool, fmts, D, I):
    """As many experts in formats fmts = (gate's, up's, down's) as fit in the random bytes `pool`
    (their f16 fields set in place): list of (gate [I, D], up [I, D], down [D, I]) block bytes."""
    shapes = [(I, D), (I, D), (D, I)]
    sizes = [r * (c // quant.FORMATS[f][0] * quant.FORMATS[f][1]) for f, (r, c) in zip(fmts, shapes)]
    experts = []
    for e in range(pool.size // sum(sizes)):
        at = e * sum(sizes)
        ws = []
        for f, (r, c), n in zip(fmts, shapes, sizes):
            w = pool[at : at + n].reshape(r, -1)
            blocks = w.reshape(-1, quant.FORMATS[f][1])
            for o in F16_AT[f]:
                blocks[:, o : o + 2] = np.array([0.01], np.float16).view(np.uint8)
            ws.append(w)
            at += n
        experts.append(tuple(ws))
    return experts


def bench_quant_ffn(experts, fmts, D, repeats):
    x = np.random.default_rng(1).standard_normal((1, D), dtype=np.float32)
    out = np.empty((1, D), np.float32)

    def run():
        for gate, up, down in experts:
            cpu.expert_ffn(x, gate, up, down, fmts, out)

    run()
    nbytes = sum(w.nbytes for e in experts for w in e)
    best, med = best_and_median(run, repeats)
    return nbytes, best, med


def quant_table(args, threads, read_gbs):
    # read_gbs: {threads: the read-only GB/s measured in this run}
    pool = np.random.default_rng(4).integers(0, 256, args.quant_mib << 20, dtype=np.uint8)
    print(f"GGUF expert_ffn T=1 D={args.dim} I={args.quant_inter}, {args.quant_mib} MiB of experts round-robin, "
          f"best/median of {args.repeats}; best/read: of the read-only bandwidth measured above")
    print(f"{'formats (gate, up, down)':<28}{'threads':>8}{'best GB/s':>11}{'med GB/s':>10}{'best/read':>11}"
          f"{'G weights/s':>13}")
    for fmts in QUANT_MIXES:
        experts = quant_experts(pool, fmts, args.dim, args.quant_inter)
        for nt in threads:
            numba.set_num_threads(nt)
            nbytes, best, med = bench_quant_ffn(experts, fmts, args.dim, args.repeats)
            weights = len(experts) * 3 * args.dim * args.quant_inter
            print(f"{','.join(fmts):<28}{nt:>8}{nbytes / best / 1e9:>11.1f}{nbytes / med / 1e9:>10.1f}"
                  f"{nbytes / best / 1e9 / read_gbs[nt]:>10.0%}{weights / best / 1e9:>13.1f}")


def bench_attention(S, H, KV, hd, repeats):
    g = np.random.default_rng(2)
    q = g.standard_normal((1, H, hd), dtype=np.float32)
    k = g.standard_normal((KV, S, hd), dtype=np.float32)
    v = g.standard_normal((KV, S, hd), dtype=np.float32)
    out = np.empty_like(q)
    cpu.attention(q, k, v, S - 1, out)
    best, med = best_and_median(lambda: cpu.attention(q, k, v, S - 1, out), repeats)
    return k.nbytes + v.nbytes, best, med


def concurrent_calls_agree(expert):
    """Two Python threads calling a parallel kernel at once give the same
    result as one thread (checks the threading layer is thread safe)."""
    gate, up, down = expert
    x = np.random.default_rng(3).standard_normal((1, gate.shape[1]), dtype=np.float32)
    ref = np.empty_like(x)
    cpu.expert_ffn(x, gate, up, down, "f32", ref)
    outs = [np.empty_like(x) for _ in range(2)]

    def work(o):
        for _ in range(20):
            cpu.expert_ffn(x, gate, up, down, "f32", o)

    threads = [threading.Thread(target=work, args=(o,)) for o in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return all(np.array_equal(o, ref) for o in outs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", default=f"1,{numba.config.NUMBA_NUM_THREADS}", help="comma list of thread counts")
    ap.add_argument("--experts", type=int, default=16, help="distinct experts used round-robin")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=1408)
    ap.add_argument("--prefill-tokens", type=int, default=32, help="T for the prefill (compute) line")
    ap.add_argument("--quant-inter", type=int, default=768, help="I of the GGUF experts")
    ap.add_argument("--quant-mib", type=int, default=1024, help="MiB of GGUF experts used round-robin")
    ap.add_argument("--quant-only", action="store_true", help="only the memory and GGUF lines")
    args = ap.parse_args()
    threads = sorted({int(t) for t in args.threads.split(",")})

    copy_best, copy_med = copy_bandwidth(args.repeats)
    print(f"memory: NumPy copy of 512 MiB, read + write bytes counted: best {copy_best:.1f} GB/s, median {copy_med:.1f} GB/s")
    read_gbs = {}
    for nt in threads:
        numba.set_num_threads(nt)
        rd_best, rd_med = read_bandwidth(args.repeats)
        read_gbs[nt] = rd_best
        print(f"memory: read-only sum of 512 MiB, {nt} thread(s): best {rd_best:.1f} GB/s, median {rd_med:.1f} GB/s "
              f"({rd_best / copy_best:.0%} of copy)")
    if args.quant_only:
        quant_table(args, threads, read_gbs)
        return
    experts = make_experts(args.experts, args.dim, args.inter)
    print(f"expert_ffn D={args.dim} I={args.inter}, {args.experts} experts round-robin, best/median of {args.repeats}")
    print(f"{'kernel':<28}{'threads':>8}{'best GB/s':>11}{'med GB/s':>10}{'best/copy':>11}")
    for nt in threads:
        numba.set_num_threads(nt)
        for dtype in ("f16", "bf16", "f32"):
            nbytes, _, best, med = bench_ffn(experts, dtype, 1, args.repeats)
            print(f"{'expert_ffn T=1 ' + dtype:<28}{nt:>8}{nbytes / best / 1e9:>11.1f}{nbytes / med / 1e9:>10.1f}"
                  f"{nbytes / best / 1e9 / copy_best:>10.0%}")
    print(f"{'':<28}{'threads':>8}{'best ms':>11}{'med ms':>10}{'GFLOP/s':>11}")
    for nt in threads:
        numba.set_num_threads(nt)
        T = args.prefill_tokens
        _, flops, best, med = bench_ffn(experts[:4], "bf16", T, args.repeats)
        print(f"{f'expert_ffn T={T} bf16 x4':<28}{nt:>8}{best * 1e3:>11.2f}{med * 1e3:>10.2f}{flops / best / 1e9:>11.1f}")
    for nt in threads:
        numba.set_num_threads(nt)
        kv_bytes, best, med = bench_attention(8192, 16, 4, 128, args.repeats)
        print(f"{'attention decode S=8192':<28}{nt:>8}{best * 1e3:>11.2f}{med * 1e3:>10.2f}"
              f"   ({kv_bytes / best / 1e9:.1f} GB/s of K+V; H=16 KV=4 hd=128)")
    quant_table(args, threads, read_gbs)
    numba.set_num_threads(max(threads))
    ok = concurrent_calls_agree(experts[0])
    print(f"threading layer: {numba.threading_layer()}, {max(threads)} threads; "
          f"two Python threads calling expert_ffn concurrently: {'same results' if ok else 'MISMATCH'}")


if __name__ == "__main__":
    main()
