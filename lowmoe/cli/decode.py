"""`lowmoe decode`: stream generated text, or print one JSON object with `--json`."""

import json
import os
import sys
import time


def add_arguments(p):
    p.add_argument(
        "positional", nargs="*", metavar="[MODEL] [PROMPT]",
        help="model folder or GGUF file (default: the bundled model) and/or prompt text; a first argument "
        "that is an existing folder, ends in .gguf or contains a path separator is the model",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="prompt text")
    src.add_argument("--prompt-ids", default=None, help="comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--ignore-eos", action="store_true", help="decode all --max-new-tokens, past any EOS (benchmarks)")
    p.add_argument("--trace", default=None, metavar="FILE",
                   help="write a JSONL trace of the expert cache, one line per decode token and MoE layer "
                   "(needs an expert cache; overrides a path in SHARPI_TRACE_MOE); read it with `lowmoe trace FILE`")
    p.add_argument("--dashboard", action="store_true",
                   help="live view while generating: text, tok/s, cache occupancy, read MB/s, recall and hit "
                   "rates per MoE layer (needs an expert cache)")
    add_engine_arguments(p)


def add_engine_arguments(p):
    """Flags that map onto EngineConfig (each overrides its SHARPI_* variable)."""
    p.add_argument("--device", default=None, choices=("cpu", "cuda"),
                   help="cpu (default) or cuda: the model on the GPU (needs CuPy); every expert resident there "
                   "when they fit, else give --vram-budget or --expert-cache for a GPU expert cache")
    p.add_argument("--vram-budget", default=None, metavar="BYTES",
                   help="with --device cuda: GPU memory to plan (12GiB): dense weights, KV cache for --max-context "
                   "tokens, workspace, and the rest expert slots (see `lowmoe info --vram-budget`)")
    p.add_argument("--max-context", type=int, default=None, metavar="N",
                   help="tokens of KV cache the VRAM budget reserves (default 8192)")
    p.add_argument("--kv-dtype", default=None, choices=("f16", "bf16", "f32"),
                   help="what the KV cache holds (default f16: half the bytes attention reads; f32 matches a float32 "
                   "reference)")
    p.add_argument("--miss-policy", default=None, choices=("wait", "cpu", "auto"),
                   help="with a GPU expert cache: a miss whose copy is still in flight waits for it, or is computed "
                   "on the CPU from the staged weights (same output bits); default auto: whichever the measured "
                   "costs say is faster")
    p.add_argument("--expert-cache", default=None, metavar="BUDGET",
                   help="expert cache budget: bytes (1.5GiB, 300MB), a share of the experts (25%%) or 'min'; "
                   "default: every expert resident")
    p.add_argument("--storage", default=None, choices=("checkpoint", "packed", "ram"),
                   help="slow tier the experts are read from (default: packed if the model folder is packed)")
    p.add_argument("--readers", type=int, default=None, help="reader threads (default 1)")
    p.add_argument("--predictor", default=None,
                   choices=("pregate", "learned", "nextgate", "history", "oracle", "none"),
                   help="expert prediction that starts reads early (default: pregate if the checkpoint ships "
                   "pre-gate heads, else learned if the model has a fitted predictor (MODEL/moe_predictor.safetensors; "
                   "NAME.moe_predictor.safetensors beside NAME.gguf), else "
                   "nextgate; none: the reactive cache; oracle: replays --oracle-trace)")
    p.add_argument("--no-refine", dest="refine", action="store_false", default=None,
                   help="hint each MoE layer once, from the layer before, without ranking it again on its own input")
    p.add_argument("--lookahead", type=int, default=None, choices=(1, 2),
                   help="MoE layers ahead that hints cover (default 1; with 2, nextgate and oracle also hint "
                   "the layer after next while the disk is idle)")
    p.add_argument("--oracle-trace", default=None, metavar="FILE",
                   help="for --predictor oracle: the --trace file of an earlier run of the same input "
                   "(perfect hints, the ceiling for benchmarks)")


def engine_options(args):
    return {"device": args.device, "expert_cache": args.expert_cache, "storage": args.storage, "readers": args.readers,
            "predictor": args.predictor, "oracle_trace": args.oracle_trace, "lookahead": args.lookahead,
            "refine": args.refine, "kv_dtype": args.kv_dtype,
            "vram_budget": args.vram_budget, "max_context": args.max_context, "miss_policy": args.miss_policy}


def _prompt_ids(engine, args):
    from lowmoe.errors import InputError

    if args.prompt_ids is not None:
        try:
            return [int(s) for s in args.prompt_ids.split(",") if s.strip()]
        except ValueError:
            raise InputError(f"--prompt-ids: expected comma-separated integers, got {args.prompt_ids!r}") from None
    if not args.prompt:
        raise InputError("empty prompt: give --prompt TEXT or --prompt-ids 1,2,3")
    return engine.encode(args.prompt)


def _split_positional(args):
    """`lowmoe decode "Once upon a time"` and `lowmoe decode MODEL --prompt ...` both work."""
    from lowmoe.errors import InputError

    words = list(args.positional)
    model = None
    if words and (os.path.isdir(words[0]) or words[0].endswith(".gguf") or os.sep in words[0] or len(words) == 2):
        model = words.pop(0)
    if len(words) > 1:
        raise InputError("too many positional arguments: expected [MODEL] [PROMPT]")
    if words:
        if args.prompt is not None or args.prompt_ids is not None:
            raise InputError("give the prompt either as an argument or with --prompt/--prompt-ids, not both")
        args.prompt = words[0]
    return model


def _trace_target(args):
    """(JSONL path or None, print the summary table?) from --trace and SHARPI_TRACE_MOE: `1` asks
    for the table, any other value is a path for the JSONL and asks for the table too. `0` is off,
    like the other SHARPI switches, rather than a file named 0."""
    env = os.environ.get("SHARPI_TRACE_MOE", "")
    path = args.trace or (env if env not in ("", "0", "1") else None)
    return path, env not in ("", "0")


def _has_cache(engine):
    """An expert cache, CPU or GPU (with device cuda, a VRAM budget also plans one)."""
    from lowmoe.tier.experts import OffloadedExperts

    return isinstance(engine.model.experts, OffloadedExperts)


def _attach_trace(engine, model, path, table, dashboard):
    """Sets the expert cache's event callback; returns (JSONL sink or None, Summary or None)."""
    from lowmoe.errors import InputError
    from lowmoe.trace import JsonlSink, Summary

    if not _has_cache(engine):
        raise InputError("--trace, --dashboard and SHARPI_TRACE_MOE show the expert cache, and there is none: "
                         "add --expert-cache BUDGET (e.g. 25%)")
    # The engine resolves the default predictor itself (learned if fitted, else nextgate): name the
    # one it built, from its class (NextGate -> "nextgate").
    p = engine.model.predictor
    predictor = "none" if p is None else type(p).__name__.lower()
    sink = JsonlSink(path, model, engine.options.expert_cache or engine.options.vram_budget, predictor) if path else None
    summary = Summary() if table else None
    consumers = [c for c in (sink, summary, dashboard) if c is not None]

    def on_event(event):
        for c in consumers:
            c(event)

    engine.model.experts.on_event = on_event
    return sink, summary


def main(args):
    from lowmoe import DEFAULT_MODEL, Engine
    from lowmoe.errors import InputError

    model = _split_positional(args)
    if args.max_new_tokens < 0:
        raise InputError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    t0 = time.perf_counter()
    trace_path, table = _trace_target(args)
    engine = Engine.from_pretrained(model or DEFAULT_MODEL, **engine_options(args))
    ids = _prompt_ids(engine, args)
    sink = summary = dashboard = None
    if args.dashboard:
        from lowmoe.cli.dashboard import Dashboard

        dashboard = Dashboard(engine)
    if trace_path or table or dashboard:
        sink, summary = _attach_trace(engine, model or DEFAULT_MODEL, trace_path, table, dashboard)
    try:
        if dashboard is not None:
            _run_live(engine, ids, args, dashboard)
        else:
            _run(engine, ids, args, t0)
    finally:
        if sink is not None:
            sink.close()
    stats_path = os.environ.get("SHARPI_EXPERT_STATS", "")
    if stats_path and _has_cache(engine):
        _write_expert_stats(engine, stats_path)
    if summary is not None:
        from lowmoe.cli.console import table_console
        from lowmoe.trace import summary_table

        table_console(stderr=True).print(summary_table(summary.rows()))
    return 0


def _write_expert_stats(engine, path):
    """SHARPI_EXPERT_STATS=PATH: per-layer hit rates and the hottest experts of the decode steps."""
    from lowmoe.errors import InputError

    experts = engine.model.experts
    hottest = {str(layer): [[int(e), int(uses[e])] for e in uses.argsort(kind="stable")[::-1][:8] if uses[e]]
               for layer, uses in experts.uses.items()}
    out = {"model": engine.model_dir, "expert_cache": engine.options.expert_cache,
           "per_layer": experts.stats()["per_layer"], "hottest_experts": hottest}
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    except OSError as e:
        raise InputError(f"{path}: cannot write SHARPI_EXPERT_STATS ({e.strerror})") from None


def _run_live(engine, ids, args, dashboard):
    """The dashboard replaces the streamed text; rich redraws it a few times a second."""
    from rich.live import Live

    tokens = []
    with Live(get_renderable=dashboard.render, refresh_per_second=4):
        for token in engine.stream(ids, args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed,
                                   stop_at_eos=not args.ignore_eos):
            tokens.append(token)
            dashboard.token(engine.decode(tokens))


def _run(engine, ids, args, t0):
    """Streams the tokens to stdout, or prints the JSON object."""
    from lowmoe.chat.session import TextStream

    stats = {}
    stream = engine.stream(ids, args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed,
                           stop_at_eos=not args.ignore_eos, stats=stats)
    tokens, text = [], TextStream(engine.tokenizer) if engine.tokenizer is not None else None
    first_token_s = None
    for token in stream:
        if first_token_s is None:
            first_token_s = time.perf_counter() - t0
        tokens.append(token)
        if not args.json and text is not None:
            sys.stdout.write(text.push(token))
            sys.stdout.flush()
        elif not args.json:
            sys.stdout.write(f"{token} ")
            sys.stdout.flush()
    if args.json:
        out = {
            "tokens": tokens,
            "text": engine.decode(tokens),
            "prefill_tok_s": stats["prefill_tokens"] / stats["prefill_s"] if stats.get("prefill_s") else 0.0,
            "decode_tok_s": stats["decode_tokens"] / stats["decode_s"] if stats.get("decode_s") else 0.0,
            "time_to_first_token_s": first_token_s,
        }
        out.update({k: v for k, v in stats.items() if k not in out})
        print(json.dumps(out))
    else:
        sys.stdout.write((text.rest() if text is not None else "") + "\n")
