"""llama.cpp and lowmoe side by side on one GGUF file, runs interleaved (issue 15, item 7).

    python tools/bench_peers.py FILE.gguf --llama-bench PATH [--packed DIR] [--expert-cache 50%]

(a) resident: every weight in RAM, decode at --context tokens of depth: `llama-bench -d CONTEXT -n N
    -p 0 -fa off` against `lowmoe bench --strategies none` (on --packed DIR when given);
(b) out of core: each process in a memory cgroup (v1; needs root) capped at the bytes lowmoe's budget
    uses (dense weights + expert cache + KV cache at CONTEXT, from `lowmoe info`) plus --allowance
    for each process's own runtime (the Python interpreter and Numba's kernels for lowmoe); llama.cpp
    reads FILE through mmap (the page cache is dropped first, so nothing read outside the cgroup is
    free to it; `-fa on`, which needs no score matrix), lowmoe its packed store (`lowmoe pack FILE
    DIR`) with `--no-resident`, reactive and the given predictors.

Both use --threads threads and the same f16 KV cache (llama.cpp's default, lowmoe's default). Each
repeat runs every engine once, in turn, so drift of the shared machine hits all alike. Prints a
Markdown table (median [min-max] decode tok/s) and writes every run to --json.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CGROUP = "/sys/fs/cgroup/memory/lowmoe-peers"


def lowmoe_bench(model, context, tokens, strategies, extra, cgroup):
    cmd = [sys.executable, "-m", "lowmoe.cli", "bench", model, "--context", str(context), "--new-tokens", str(tokens),
           "--repeats", "1", "--strategies", ",".join(strategies), "--json", *extra]
    out = _run(cmd, cgroup)
    return {name: s["decode_tok_s"] for name, s in json.loads(out)["strategies"].items()} if out else None


def llama_bench(binary, gguf, context, tokens, threads, cgroup):
    # Flash attention off where memory is plenty (faster on this CPU); on in the cgroup, where the
    # score matrix of -fa off (heads x 512 x context f32: 539 MB for the bench model at 8K) would not fit.
    cmd = [binary, "-m", gguf, "-d", str(context), "-n", str(tokens), "-p", "0", "-t", str(threads),
           "-fa", "on" if cgroup else "off", "-r", "1", "-o", "json"]
    out = _run(cmd, cgroup)
    return json.loads(out)[0]["avg_ts"] if out else None


def _run(cmd, cgroup):
    """stdout of cmd (None when it fails: out of memory in the cgroup, say), run in `cgroup` if given."""
    if cgroup:  # the shell joins the cgroup, then becomes the command
        cmd = ["sh", "-c", f'echo $$ > {CGROUP}/cgroup.procs && exec "$@"', "sh", *cmd]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        tail = (p.stderr or "").strip().splitlines()[-1:] or [f"exit {p.returncode}"]
        print(f"  failed ({p.returncode}): {' '.join(cmd[-12:])}: {tail[0]}", file=sys.stderr)
        return None
    return p.stdout


def budget_bytes(model, expert_cache, context):
    """Bytes lowmoe's plan holds (`lowmoe info`'s host_plan_bytes): dense weights, the expert cache
    with its staging slots, the f16 KV cache of `context` positions and the linear layers' state."""
    out = subprocess.run([sys.executable, "-m", "lowmoe.cli", "info", model, "--json", "--expert-cache", expert_cache,
                          "--context", str(context)], capture_output=True, text=True, check=True).stdout
    return json.loads(out)["host_plan_bytes"]


def make_cgroup(limit):
    os.makedirs(CGROUP, exist_ok=True)
    names = [n for n in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes") if os.path.exists(os.path.join(CGROUP, n))]
    for attempt in range(2):  # memsw (memory + swap) must stay >= the memory limit: one order or the other works
        for name in names:
            try:
                with open(os.path.join(CGROUP, name), "w") as f:
                    f.write(str(limit))
            except OSError:
                if attempt:
                    raise


def drop_page_cache():
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def summary(runs):
    ok = [r for r in runs if r is not None]
    if not ok:
        return "failed"
    return f"{statistics.median(ok):.2f} [{min(ok):.2f}-{max(ok):.2f}]" + (f" ({len(runs) - len(ok)} failed)" if len(ok) < len(runs) else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf")
    ap.add_argument("--llama-bench", required=True, help="llama.cpp's llama-bench binary")
    ap.add_argument("--packed", default=None, help="`lowmoe pack GGUF DIR` output: lowmoe's store for both cases "
                    "(default: the GGUF itself for (a) and no out-of-core case)")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--expert-cache", default="50%", help="lowmoe's budget in (b), and so the cgroup's cap")
    ap.add_argument("--strategies", default="reactive,learned", help="lowmoe's strategies in (b)")
    ap.add_argument("--allowance", default="512MiB", help="added to the cap for each process's runtime")
    ap.add_argument("--cases", default="resident,offload", help="which of (a) resident and (b) offload to run")
    ap.add_argument("--json", default=None, metavar="FILE", help="write every run here")
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from lowmoe.tier.budget import parse_bytes

    os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
    model = args.packed or args.gguf
    cases = args.cases.split(",")
    result = {"gguf": args.gguf, "lowmoe_model": model, "context": args.context, "new_tokens": args.new_tokens,
              "threads": args.threads, "runs": {}}
    runs = result["runs"]
    if "offload" in cases:
        if not args.packed:
            sys.exit("bench_peers.py: the out-of-core case needs --packed DIR (lowmoe pack GGUF DIR)")
        plan = budget_bytes(model, args.expert_cache, args.context)
        cap = plan + parse_bytes(args.allowance, "--allowance")
        result.update(expert_cache=args.expert_cache, plan_bytes=plan, cgroup_bytes=cap)
        make_cgroup(cap)
        print(f"out of core: lowmoe's plan {plan / 2**20:.0f} MiB, cgroup cap {cap / 2**20:.0f} MiB", file=sys.stderr)
    strategies = [s for s in args.strategies.split(",") if s]
    for r in range(args.repeats):
        print(f"repeat {r + 1}/{args.repeats} {time.strftime('%H:%M:%S')}", file=sys.stderr)
        if "resident" in cases:
            runs.setdefault("llama.cpp resident", []).append(
                llama_bench(args.llama_bench, args.gguf, args.context, args.new_tokens, args.threads, None))
            got = lowmoe_bench(model, args.context, args.new_tokens, ["none"], [], None)
            runs.setdefault("lowmoe resident", []).append(None if got is None else got["none"])
        if "offload" in cases:
            drop_page_cache()
            runs.setdefault("llama.cpp mmap in the cgroup", []).append(
                llama_bench(args.llama_bench, args.gguf, args.context, args.new_tokens, args.threads, True))
            got = lowmoe_bench(model, args.context, args.new_tokens, strategies,
                               ["--no-resident", "--expert-cache", args.expert_cache], True)
            for s in strategies:
                runs.setdefault(f"lowmoe {s} in the cgroup", []).append(None if got is None else got[s])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(f"| engine | decode tok/s at {args.context} context, median [min-max] of {args.repeats} |")
    print("|---|---|")
    for name, values in runs.items():
        print(f"| {name} | {summary(values)} |")


if __name__ == "__main__":
    main()
