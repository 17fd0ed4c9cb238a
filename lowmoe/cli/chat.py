"""`lowmoe chat [MODEL]`: talk to a chat model in the terminal, through its chat template.

Each turn renders the whole conversation with the template and prefills only what the sequence
state does not hold yet (chat/session.py): a new turn costs its own tokens, not the history's.
Input: a line is a message; a line ending in a backslash continues on the next; lines between
two lines of three double quotes are one message. /reset starts over, /stats prints the last
turn's numbers (and, with an expert cache, its counters), /exit or end of input quits.
"""

import importlib
import os
import sys
import time

from lowmoe.cli.decode import add_engine_arguments, engine_options

PROMPT, MORE = ">>> ", "... "


def add_arguments(p):
    p.add_argument("model", nargs="?", default=None, help="model folder or GGUF file with a chat template")
    p.add_argument("--system", default=None, help="system message to start every conversation with")
    p.add_argument("--max-new-tokens", type=int, default=512, help="most tokens per reply (default 512)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-turn tokens")
    p.add_argument("--dashboard", action="store_true",
                   help="after each reply, the expert cache's table per MoE layer, on stderr (needs an expert "
                   "cache; SHARPI_TRACE_MOE=1 does the same)")
    add_engine_arguments(p)


def read_message(read=input):
    """One message from the user (None at end of input or /exit): continued lines joined."""
    try:
        line = read(PROMPT)
        if line.strip() == '"""':
            lines = []
            while (line := read(MORE)).strip() != '"""':
                lines.append(line)
            return "\n".join(lines)
        while line.endswith("\\"):
            line = line[:-1] + "\n" + read(MORE)
    except EOFError:
        return None
    return None if line.strip() in ("/exit", "/quit") else line


def main(args):
    from lowmoe import DEFAULT_MODEL, Engine
    from lowmoe.chat.session import Session
    from lowmoe.chat.template import load_template
    from lowmoe.errors import InputError

    try:
        importlib.import_module("readline")  # line editing and history for input(), where Python has it
    except ImportError:
        pass
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    model = args.model or DEFAULT_MODEL
    with Engine.from_pretrained(model, **engine_options(args)) as engine:
        if engine.tokenizer is None:
            raise InputError(f"{engine.no_tokenizer}; chat needs the model's tokenizer")
        template = load_template(model, engine.tokenizer, engine.config.eos_token_ids, engine.gguf_metadata)
        traced = os.environ.get("SHARPI_TRACE_MOE", "") not in ("", "0")
        summary = _summary(engine) if args.dashboard or traced else None
        session, messages, last = Session(engine), [], {}
        if args.system:
            messages.append({"role": "system", "content": args.system})
        first = list(messages)
        while (text := read_message()) is not None:
            if text.strip() == "/reset":
                session.reset()
                messages, last = list(first), {}
                print("(conversation reset)")
                continue
            if text.strip() == "/stats":
                print(_format_stats(last, engine))
                continue
            if not text.strip():
                continue
            messages.append({"role": "user", "content": text})
            reply, last = _turn(engine, session, template, messages, args)
            messages.append({"role": "assistant", "content": reply})
            if summary is not None:
                _print_summary(summary)
    return 0


def _turn(engine, session, template, messages, args):
    """Prefills the rendered conversation, streams the reply to stdout -> (reply text, stats)."""
    from lowmoe.chat.session import TextStream

    # without the tokenizer's own BOS: the template writes its own (as transformers tokenizes a chat)
    ids = engine.tokenizer.encode(template.render(messages, add_generation_prompt=True), add_special_tokens=False).ids
    t0 = time.perf_counter()
    reused = session.prefill(ids)
    stats = {"prompt_tokens": len(ids), "reused_tokens": reused, "prefill_s": time.perf_counter() - t0}
    stop = () if args.ignore_eos else template.stop_ids
    out = TextStream(engine.tokenizer)
    tokens = []
    for token in session.generate(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed, stop, stats):
        if token in stop:  # the last one: generate ends after it
            continue
        tokens.append(token)
        sys.stdout.write(out.push(token))
        sys.stdout.flush()
    sys.stdout.write(out.rest() + "\n")
    stats["new_tokens"] = len(tokens)  # stream_from added the decode steps' time and expert-cache counters
    return out.text() if tokens else "", stats


def _format_stats(stats, engine):
    if not stats:
        return "(no turn yet)"
    prefilled = stats["prompt_tokens"] - stats["reused_tokens"]
    line = (f"prompt {stats['prompt_tokens']} tokens ({stats['reused_tokens']} reused, {prefilled} prefilled in "
            f"{stats['prefill_s']:.2f} s), reply {stats['new_tokens']} tokens")
    if stats.get("decode_s"):
        line += f" at {stats['decode_tokens'] / stats['decode_s']:.1f} tok/s"
    if "cache_hit_rate" in stats:
        line += f"; expert cache hits {stats['cache_hit_rate']:.0%}, prefetched {stats['prefetch_hit_rate']:.0%}"
    return line


def _summary(engine):
    from lowmoe.cli.decode import _has_cache
    from lowmoe.errors import InputError
    from lowmoe.trace import Summary

    if not _has_cache(engine):
        raise InputError("--dashboard shows the expert cache, and there is none: add --expert-cache BUDGET (e.g. 25%)")
    summary = Summary()
    engine.model.experts.on_event = summary
    return summary


def _print_summary(summary):
    from lowmoe.cli.console import table_console
    from lowmoe.trace import summary_table

    table_console(stderr=True).print(summary_table(summary.rows()))
