"""`lowmoe decode`: stream generated text, or print one JSON object with `--json`."""

import json
import os
import sys
import time


def add_arguments(p):
    p.add_argument(
        "positional", nargs="*", metavar="[MODEL] [PROMPT]",
        help="model folder (default: the bundled model) and/or prompt text; a first argument that is "
        "an existing folder or contains a path separator is the model",
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
    add_engine_arguments(p)


def add_engine_arguments(p):
    """Flags that map onto EngineConfig (each overrides its SHARPI_* variable)."""
    p.add_argument("--expert-cache", default=None, metavar="BUDGET",
                   help="expert cache budget: bytes (1.5GiB, 300MB), a share of the experts (25%%) or 'min'; "
                   "default: every expert resident")
    p.add_argument("--storage", default=None, choices=("checkpoint", "packed", "ram"),
                   help="slow tier the experts are read from (default: packed if the model folder is packed)")
    p.add_argument("--readers", type=int, default=None, help="reader threads (default 2)")
    p.add_argument("--predictor", default=None, choices=("nextgate", "history", "none"),
                   help="expert prediction that starts reads early (default nextgate; none: the reactive cache)")


def engine_options(args):
    return {"expert_cache": args.expert_cache, "storage": args.storage, "readers": args.readers,
            "predictor": args.predictor}


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
    if words and (os.path.isdir(words[0]) or os.sep in words[0] or len(words) == 2):
        model = words.pop(0)
    if len(words) > 1:
        raise InputError("too many positional arguments: expected [MODEL] [PROMPT]")
    if words:
        if args.prompt is not None or args.prompt_ids is not None:
            raise InputError("give the prompt either as an argument or with --prompt/--prompt-ids, not both")
        args.prompt = words[0]
    return model


def main(args):
    from lowmoe import DEFAULT_MODEL, Engine
    from lowmoe.errors import InputError

    model = _split_positional(args)
    if args.max_new_tokens < 0:
        raise InputError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(model or DEFAULT_MODEL, **engine_options(args))
    ids = _prompt_ids(engine, args)
    stats = {}
    stream = engine.stream(ids, args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed, stats=stats)
    tokens, shown = [], ""
    first_token_s = None
    for token in stream:
        if first_token_s is None:
            first_token_s = time.perf_counter() - t0
        tokens.append(token)
        if not args.json and engine.tokenizer is not None:
            text = engine.decode(tokens)
            # Print only the stable new suffix: a partial UTF-8 sequence decodes to U+FFFD until complete.
            if not text.endswith("\ufffd"):
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
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
        sys.stdout.write(engine.decode(tokens)[len(shown):] + "\n")
    return 0
