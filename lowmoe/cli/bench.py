"""`lowmoe bench MODEL`: decode tok/s of reactive, predictive and oracle prefetch side by side, at a
long context with the expert cache at a fraction of the experts (see lowmoe/cli/benchmark.py)."""

import gc
import json
import os


def add_arguments(p):
    p.add_argument("model", nargs="?", default=None, help="model folder or GGUF file (default: the bundled model)")
    p.add_argument("--context", type=int, default=8192, help="context tokens before decoding (default 8192)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per run (default 64)")
    p.add_argument("--expert-cache", default="50%", metavar="BUDGET", help="cache budget (25%%, 1.5GiB, min; default 50%%)")
    p.add_argument("--strategies", default=None,
                   help="comma-separated, run interleaved: none, reactive, nextgate, learned, pregate, history, "
                   "oracle (default: all the model supports)")
    p.add_argument("--storage", default=None, choices=("checkpoint", "packed", "ram"),
                   help="slow tier (default: packed if the folder is packed, else checkpoint)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each strategy (default 3); the median is reported")
    p.add_argument("--lookahead", type=int, default=None, choices=(1, 2), help="MoE layers ahead hints cover (default 1; 2: the layer after next too, while the disk is idle)")
    p.add_argument("--no-refine", dest="refine", action="store_false", default=None,
                   help="hint each MoE layer once, from the layer before, without ranking it again on its own input")
    p.add_argument("--readers", type=int, default=None, help="reader threads (default 1)")
    p.add_argument("--kv-dtype", default=None, choices=("f16", "bf16", "f32"),
                   help="what the KV cache holds, in every strategy (default f16)")
    p.add_argument("--prompt-file", default=None, metavar="TEXTFILE",
                   help="context text (default: MODEL/bench_prompt.txt if present, else random token ids)")
    p.add_argument("--text", default=None, metavar="TEXTFILE",
                   help="decode along this text: each step takes its next token instead of the model's own choice, "
                   "so routing follows real text (default: MODEL/bench_text.txt if present; 'none': greedy)")
    p.add_argument("--context-cache", default=os.path.join(os.path.expanduser("~"), ".cache", "lowmoe", "contexts"),
                   metavar="DIR", help="where built contexts are kept for later benches ('none': keep nothing)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cuda: the model on the GPU, the offloaded strategies in a GPU expert cache of --expert-cache "
                   "(none: every expert on the GPU)")
    p.add_argument("--miss-policy", default=None, choices=("wait", "cpu", "auto"),
                   help="with --device cuda: where the GPU expert cache computes a miss whose copy is in flight "
                   "(default auto)")
    p.add_argument("--no-resident", action="store_true",
                   help="never hold every expert (a model larger than memory): the context is prefilled and the "
                   "reference decoded through a reactive cache of --expert-cache; no 'none' strategy. Also chosen "
                   "when every expert would not fit in the memory this process can take (MemAvailable, its cgroup)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def main(args):
    from rich.console import Console
    from rich.progress import Progress

    from lowmoe import DEFAULT_MODEL, Engine
    from lowmoe.cli.console import table_console
    from lowmoe.cli.benchmark import PROMPT_FILE, STRATEGIES, TEXT_FILE, Bench, check_strategies, context_ids, load_context
    from lowmoe.cli.benchmark import schedule
    from lowmoe.cli.benchmark import summarize
    from lowmoe.tier.budget import fmt_bytes, plan_cache
    from lowmoe.tier.host_memory import available_bytes, peak_rss_bytes
    from lowmoe.load.config import EngineConfig
    from lowmoe.errors import InputError
    from lowmoe.predict.learned import predictor_file
    from lowmoe.predict.pregate import has_heads
    from lowmoe.tier.store import is_packed

    model = args.model or DEFAULT_MODEL
    for name, value, least in (("--context", args.context, 1), ("--new-tokens", args.new_tokens, 2),
                               ("--repeats", args.repeats, 1)):
        if value < least:
            raise InputError(f"{name} must be >= {least}, got {value}")
    for var in ("SHARPI_EXPERT_CACHE", "SHARPI_VRAM_BUDGET"):  # either would make the resident `none` a cache
        if os.environ.get(var):
            raise InputError(f"lowmoe bench sets the expert cache itself (--expert-cache): unset {var}")
    err = Console(stderr=True)
    gpu = dict(device="cuda", cpu_moe=False, miss_policy=args.miss_policy) if args.device == "cuda" else {}
    if args.miss_policy is not None and not gpu:
        raise InputError("--miss-policy is for the GPU expert cache: give --device cuda")
    options = dict(expert_cache=args.expert_cache, storage=args.storage, readers=args.readers,
                   lookahead=args.lookahead, refine=args.refine, kv_dtype=args.kv_dtype, **gpu)
    config = EngineConfig.from_options(**options)  # bad options fail here, before loading anything
    if not args.no_resident and not gpu:
        need, free = resident_need(model, args.context, config.kv_dtype), available_bytes()
        if free is not None and need > free:
            err.print(f"lowmoe bench: every expert resident needs {fmt_bytes(need)}, more than the {fmt_bytes(free)} "
                      "this process can take: the reference is a reactive run, as with --no-resident", soft_wrap=True)
            args.no_resident = True
    if args.no_resident:  # the reference: a reactive run, holding no more experts than the budget
        resident = Engine.from_pretrained(model, **dict(options, predictor="none"))
    else:
        resident = Engine.from_pretrained(model, storage=args.storage, device=args.device, kv_dtype=args.kv_dtype,
                                          cpu_moe=False if gpu else None)
    try:
        learned = os.path.isfile(predictor_file(model))
        heads = has_heads(resident.model.w)
        if args.strategies is None:
            names = [s for s in STRATEGIES if (s != "learned" or learned) and (s != "pregate" or heads)
                     and (s != "none" or not args.no_resident)]
        else:
            names = [s.strip() for s in args.strategies.split(",") if s.strip()]
        check_strategies(names, model, learned, heads)
        if args.no_resident and "none" in names:
            raise InputError("strategy 'none' holds every expert: leave it out with --no-resident")
        prompt = args.prompt_file
        if prompt is None and os.path.isfile(os.path.join(model, PROMPT_FILE)):
            prompt = os.path.join(model, PROMPT_FILE)
        ids = context_ids(resident, prompt, args.context)
        text = args.text
        if text is None and os.path.isfile(os.path.join(model, TEXT_FILE)):
            text = os.path.join(model, TEXT_FILE)
        forced = None if text in (None, "none") else context_ids(resident, text, args.new_tokens, "--new-tokens")
        plan_cache(args.expert_cache, resident.config, resident.model.experts.layout.block)
        cache_dir = None if args.context_cache == "none" else args.context_cache
        with Progress(console=err, transient=True) as bar:
            task = bar.add_task(f"prefill {args.context} tokens", total=args.context)
            context, loaded = load_context(resident, ids, args.new_tokens, cache_dir,
                                           lambda done, total: bar.update(task, completed=done))
        bench = Bench(model, context, resident, args.new_tokens, options, forced)
        if args.no_resident:  # the reference's cache is done with: freed before each strategy's engine takes one
            bench.resident = None
            resident.close()
            resident = None
            gc.collect()
        runs = {n: [] for n in names}
        with Progress(console=err, transient=True) as bar:
            order = schedule(names, args.repeats)
            task = bar.add_task("runs", total=len(order))
            for n, r in order:
                bar.update(task, description=f"{n} ({'untimed' if r is None else f'repeat {r + 1}/{args.repeats}'})")
                stats = bench.run(n)
                if r is not None:
                    runs[n].append(stats)
                bar.advance(task)
    finally:
        if resident is not None:
            resident.close()
    result = {"model": model, "device": args.device, "context": args.context, "expert_cache": args.expert_cache,
              "storage": args.storage or ("packed" if is_packed(model) else "checkpoint"),
              "new_tokens": args.new_tokens, "repeats": args.repeats, "context_from_cache": loaded,
              "text": None if forced is None else text, "resident": not args.no_resident,
              "peak_rss_bytes": peak_rss_bytes(), "strategies": summarize(runs)}
    if args.json:
        print(json.dumps(result))
        return 0
    _print_table(result, table_console())
    return 0


def resident_need(model, context, kv_dtype):
    """Host bytes of an engine holding every expert: the weights, and a KV cache of `context`
    positions."""
    from lowmoe.load.model import open_model
    from lowmoe.tier.host_memory import weight_bytes
    from lowmoe.tier.store import is_packed, open_store
    from lowmoe.tier.vram import kv_bytes

    ckpt, cfg = open_model(model)
    store = open_store("packed" if is_packed(model) else "checkpoint", model, ckpt, cfg)
    store.close()
    dense, experts = weight_bytes(ckpt, cfg, store.layout, is_packed(model))
    return dense + experts + kv_bytes(cfg, context, kv_dtype)


def _print_table(result, console):
    from rich.table import Table

    table = Table(title=f"{result['model']} on {result['device']}: context {result['context']}, expert cache "
                  f"{result['expert_cache']}, "
                  f"{result['storage']} store, {result['new_tokens']} new tokens "
                  f"({'greedy' if result['text'] is None else 'along ' + os.path.basename(result['text'])}) x {result['repeats']}"
                  f"; peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB",
                  caption="stall: share of decode time spent waiting for expert reads; recall: |predicted top-k ∩ "
                  "chosen| / k; prefetch hits / cache hits: chosen experts a hint had read (or was reading) / that "
                  "were cached; disk GB/s: one reader's speed in the second before each run")
    for col in ("strategy", "tok/s", "vs reactive", "stall", "recall", "prefetch hits", "cache hits", "MB/token",
                "disk GB/s", "runs (tok/s)"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for name, s in result["strategies"].items():
        table.add_row(name, f"{s['decode_tok_s']:.2f}",
                      "-" if s["ratio_to_reactive"] is None else f"{s['ratio_to_reactive']:.2f}x",
                      f"{s['stall_fraction']:.2f}", "-" if s["topk_recall"] is None else f"{s['topk_recall']:.1%}",
                      f"{s['prefetch_hit_rate']:.1%}", f"{s['cache_hit_rate']:.1%}", f"{s['bytes_per_token'] / 1e6:.1f}",
                      "-" if s["disk_gb_s"] is None else f"{s['disk_gb_s']:.2f}", " ".join(f"{t:.2f}" for t in s["runs"]))
    console.print(table)
